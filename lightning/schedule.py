"""AnimateDiff's noise schedule, and the timestep spacings that pick a few-step grid from it.

AnimateDiff (and therefore AnimateDiff-Lightning) was trained with *linear* betas from 0.00085 to 0.012 over
1000 steps, epsilon prediction, no zero-terminal-SNR rescale. ComfyUI calls this schedule "sqrt_linear",
diffusers calls it "linear"; Stable Diffusion's own default ("scaled_linear" / ComfyUI "linear") is a
different curve (sigma_max 14.6 instead of 25.1), and sampling Lightning on it is off-distribution.

Sigmas live in the variance-exploding parameterisation used by k-diffusion, ComfyUI and diffusers' Euler:
``x_sigma = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model sees
``x_sigma / sqrt(sigma^2 + 1)``, which is the variance-preserving ``x_t``.

All tables are computed in float64 and cached; public functions return fresh tensors.
"""

from __future__ import annotations

import functools
import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

#: Spacings that follow diffusers' conventions (sigma linearly interpolated in t).
DIFFUSERS_SPACINGS = ("trailing", "leading", "linspace")
#: Spacings that follow ComfyUI's scheduler conventions (sigma log-linearly interpolated in t).
COMFY_SPACINGS = ("sgm_uniform", "simple")
SPACINGS = DIFFUSERS_SPACINGS + COMFY_SPACINGS

#: diffusers' AnimateDiff/SD scheduler configs use ``steps_offset=1`` with "leading" spacing.
LEADING_STEPS_OFFSET = 1


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    betas_ = torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas_, dim=0)
    sig = ((1.0 - abar) / abar).sqrt()
    return betas_, abar, sig


def betas() -> torch.Tensor:
    """Linear betas 0.00085..0.012 over 1000 training steps (float64)."""
    return _tables()[0].clone()


def alphas_cumprod() -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 0..999 (float64)."""
    return _tables()[1].clone()


def train_sigmas() -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t = 0..999 (float64, increasing)."""
    return _tables()[2].clone()


# Built at import as real tensors and Python floats: code traced on fake tensors (the training memory plan)
# calls into this module and must neither build the cached tables as fakes nor read a tensor back.
_SIGMA_MIN, _SIGMA_MAX = float(_tables()[2][0]), float(_tables()[2][-1])


def sigma_max() -> float:
    """The largest training sigma (t = 999): about 25.146116."""
    return _SIGMA_MAX


def sigma_min() -> float:
    """The smallest training sigma (t = 0): about 0.029167."""
    return _SIGMA_MIN


def timestep_to_sigma(t: torch.Tensor | float, interpolation: str = "linear") -> torch.Tensor:
    """Sigma at a (possibly fractional) timestep.

    ``interpolation="linear"`` interpolates sigma linearly between integer timesteps, as diffusers' Euler
    does; ``"log"`` interpolates log-sigma, as ComfyUI's ``ModelSamplingDiscrete.sigma`` does. Both agree
    exactly at integer timesteps.
    """
    sig = _tables()[2]
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low.to(torch.float64)
    if interpolation == "linear":
        return (1 - w) * sig[low] + w * sig[high]
    if interpolation == "log":
        log_sig = sig.log()
        return ((1 - w) * log_sig[low] + w * log_sig[high]).exp()
    raise ValueError(f"interpolation must be 'linear' or 'log', got {interpolation!r}")


def sigma_to_timestep(sigma: torch.Tensor | float) -> torch.Tensor:
    """The continuous timestep whose sigma is ``sigma`` (inverse of log-linear interpolation, float64).

    Grid sigmas map back to their integer timestep up to float rounding; sigmas outside the training range
    are clamped to t = 0 or t = 999.
    """
    log_sig = _tables()[2].log()
    s = torch.as_tensor(sigma, dtype=torch.float64)
    ls = s.clamp(min=float(_tables()[2][0]), max=float(_tables()[2][-1])).log()
    # log-sigma is strictly increasing in t, so a sorted search finds the bracketing integers.
    high = torch.searchsorted(log_sig, ls.reshape(-1)).clamp(1, NUM_TRAIN_TIMESTEPS - 1).reshape(ls.shape)
    low = high - 1
    w = (ls - log_sig[low]) / (log_sig[high] - log_sig[low])
    return low.to(torch.float64) + w.clamp(0, 1)


def timesteps(steps: int, spacing: str = "trailing") -> torch.Tensor:
    """The ``steps`` model timesteps of a schedule, first (noisiest) first, as float64.

    - ``trailing``: ``round(arange(1000, 0, -1000/steps)) - 1`` (what Lightning was trained on: 4 steps ->
      999, 749, 499, 249);
    - ``leading``: ``arange(steps) * (1000 // steps)`` reversed, plus diffusers' ``steps_offset`` of 1;
    - ``linspace``: ``linspace(0, 999, steps)`` reversed;
    - ``sgm_uniform``: ComfyUI's ``linspace(999, 0, steps + 1)[:-1]`` (fractional, 4 steps -> 999, 749.25, ...);
    - ``simple``: ComfyUI's integer pick ``999 - int(i * 1000 / steps)``.
    """
    check_steps(steps)
    n = NUM_TRAIN_TIMESTEPS
    if spacing == "trailing":
        ts = torch.tensor(trailing_timesteps(steps), dtype=torch.float64)
    elif spacing == "leading":
        ratio = n // steps
        ts = torch.arange(steps, dtype=torch.float64).mul(ratio).flip(0) + LEADING_STEPS_OFFSET
    elif spacing == "linspace":
        ts = torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0)
    elif spacing == "sgm_uniform":
        ts = torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    elif spacing == "simple":
        ratio = n / steps
        ts = torch.tensor([n - 1 - int(i * ratio) for i in range(steps)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    return ts


def trailing_timesteps(steps: int) -> list[int]:
    """The trailing grid as Python ints (999, 749, 499, 249 for 4 steps), for code that must not read tensors back."""
    check_steps(steps)
    ratio = NUM_TRAIN_TIMESTEPS / steps
    # numpy's arange with a float step, rounded half-to-even as numpy does
    return [round(NUM_TRAIN_TIMESTEPS - i * ratio) - 1 for i in range(steps)]


def sigmas(steps: int, spacing: str = "trailing") -> torch.Tensor:
    """The sampling sigmas for ``steps`` steps: float32, length ``steps + 1``, decreasing, last element 0.

    4 trailing steps give 25.146116, 6.557212, 2.275962, 0.867020, 0.
    """
    ts = timesteps(steps, spacing)
    interpolation = "log" if spacing in COMFY_SPACINGS else "linear"
    sig = timestep_to_sigma(ts, interpolation)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def scale_model_input(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x / sqrt(sigma^2 + 1)``: the variance-preserving input an epsilon-prediction UNet expects."""
    if isinstance(sigma, torch.Tensor):
        sigma = as_batch_column(sigma, x)
        return x / (sigma * sigma + 1).sqrt()
    return x / math.sqrt(sigma * sigma + 1.0)


def as_batch_column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-batch vector reshaped (and moved to ``like``'s device and dtype) so it broadcasts over
    ``like``'s trailing dimensions: one value per batch row."""
    v = v.to(device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def check_steps(steps: int) -> None:
    """Raise ``ValueError`` unless ``steps`` is a usable step count (an int from 1 to the training steps)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1 or steps > NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be an integer between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps!r}")
