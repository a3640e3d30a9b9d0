"""Few-step sampling over any epsilon-prediction denoiser, with the one Euler/DDIM ``move``.

``move`` is the only integration step in the package: the sampler, the distillation teacher (n moves of
stride s) and the distillation student (one move of stride n*s) all call it. In sigma space it is the Euler
step of the probability-flow ODE, ``x + (sigma_next - sigma) * eps``, which is algebraically identical to
DDIM with eta = 0 in the variance-preserving variables (AnimateDiff-Lightning's ``move``).

A denoiser is any callable ``denoiser(x_in, timestep, cond) -> eps`` where ``x_in = x / sqrt(sigma^2 + 1)``
is the variance-preserving model input and ``timestep`` is a float64 vector (one entry per batch row) of
continuous training timesteps. Videos keep their frames in the batch dimension, as ComfyUI does; with
classifier-free guidance the cond clip and the uncond clip are concatenated whole.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from . import schedule

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def move(x: torch.Tensor, eps: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step from ``sigma`` to ``sigma_next`` given the predicted noise (= DDIM, eta 0).

    ``sigma`` and ``sigma_next`` may be Python floats, 0-d tensors or per-batch vectors.
    """
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        ds = torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma, dtype=torch.float64)
        return x + schedule.as_batch_column(ds, x) * eps
    return x + (float(sigma_next) - float(sigma)) * eps


def predicted_x0(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """The clean sample implied by ``eps`` at ``sigma``: ``x - sigma * eps`` (a move to sigma 0)."""
    return move(x, eps, sigma, 0.0)


def make_noise(shape, seed: int | None = None, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU, then moved: the same seed gives the same noise on any device.

    With ``seed`` it draws exactly what ComfyUI's ``prepare_noise`` draws for that seed and shape.
    """
    if generator is None:
        generator = torch.Generator(device="cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device="cpu").to(device)


NOISE_SCALINGS = ("sigma", "comfyui")


def initial_latent(noise: torch.Tensor, sigmas: torch.Tensor, latent: torch.Tensor | None = None, *,
                   noise_scaling: str = "sigma") -> torch.Tensor:
    """The sampler's starting point: ``latent + scale * noise``.

    ``noise_scaling="sigma"`` scales by the first sigma, as diffusers' Euler scheduler does with trailing
    spacing (``init_noise_sigma = sigma_max``; the Lightning model card's setup) and as both diffusers and
    ComfyUI do below the top of the schedule (img2vid / vid2vid). ``"comfyui"`` follows ComfyUI's
    ``noise_scaling`` instead: from the top of the schedule it scales by ``sqrt(sigma_0^2 + 1)``, so the model
    input ``x / sqrt(sigma_0^2 + 1)`` is exactly the noise (pure noise at t = 999, as Lightning was trained).
    The two differ by 0.08% at sigma_max = 25.146.
    """
    if noise_scaling not in NOISE_SCALINGS:
        raise ValueError(f"noise_scaling must be one of {NOISE_SCALINGS}, got {noise_scaling!r}")
    s0 = float(sigmas[0])
    at_top = s0 >= schedule.sigma_max() * (1 - 1e-5)
    scale = math.sqrt(s0 * s0 + 1.0) if (at_top and noise_scaling == "comfyui") else s0
    x = noise * scale
    if latent is not None:
        x = x + latent.to(device=x.device, dtype=x.dtype)
    return x


def guided_eps(denoiser: Denoiser, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any, uncond: Any,
               cfg: float) -> torch.Tensor:
    """Classifier-free guidance: one denoiser call at ``cfg == 1``, otherwise cond and uncond.

    When both conditionings are tensors of one shape they go through a single call on the doubled batch
    (cond clip first, then uncond clip), which is what a GPU wants; otherwise two calls.
    """
    if cfg == 1.0:
        return denoiser(x_in, timestep, cond)
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor) and cond.shape == uncond.shape:
        both = denoiser(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]), torch.cat([cond, uncond]))
        eps_c, eps_u = both.chunk(2)
    else:
        eps_c = denoiser(x_in, timestep, cond)
        eps_u = denoiser(x_in, timestep, uncond)
    return eps_u + cfg * (eps_c - eps_u)


def sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cfg: float = 1.0, cond: Any = None,
           uncond: Any = None, latent: torch.Tensor | None = None,
           callback: Callable[[dict], None] | None = None, noise_scaling: str = "sigma") -> torch.Tensor:
    """Euler sampling along ``sigmas`` (for example ``schedule.sigmas(4)`` or a ``strength_sigmas`` tail).

    ``noise`` fixes shape, dtype and device; ``latent`` is the clean starting video for img2vid/vid2vid;
    ``noise_scaling`` is explained in ``initial_latent``.
    ``callback`` gets ``{"i", "x", "sigma", "sigma_next", "eps", "denoised"}`` after each model evaluation.
    Returns the final sample in sigma space (= the clean latent when the schedule ends at 0).
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least two entries, got shape {tuple(sigmas.shape)}")
    if cfg != 1.0 and uncond is None:
        raise ValueError(f"cfg={cfg} needs an uncond conditioning; pass uncond=..., or use cfg=1.0")
    sig = [float(s) for s in sigmas]
    timesteps = schedule.sigma_to_timestep(sigmas[:-1].to(torch.float64)).tolist()
    x = initial_latent(noise, sigmas, latent, noise_scaling=noise_scaling)
    batch = x.shape[0]
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        t = torch.full((batch,), timesteps[i], dtype=torch.float64, device=x.device)
        eps = guided_eps(denoiser, x / math.sqrt(s * s + 1.0), t, cond, uncond, cfg)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "eps": eps,
                      "denoised": predicted_x0(x, eps, s)})
        x = move(x, eps, s, s_next)
    return x


def strength_steps(steps: int, strength: float) -> int:
    """How many of the ``steps`` grid steps a strength (denoise) of ``strength`` runs, snapped to the grid.

    The trained grid only has ``steps`` entry points, at strengths k/steps; the nearest one is used (never
    fewer than one step). 4 steps: strengths 0.25 / 0.5 / 0.75 / 1.0 run 1 / 2 / 3 / 4 steps, starting at
    timesteps 249 / 499 / 749 / 999.
    """
    schedule.check_steps(steps)
    if not (0.0 < strength <= 1.0):
        raise ValueError(f"strength (denoise) must be in (0, 1], got {strength!r}")
    return max(1, min(steps, int(math.floor(strength * steps + 0.5))))


def start_index(steps: int, strength: float) -> int:
    """Index into ``schedule.sigmas(steps)`` where img2vid/vid2vid at ``strength`` starts."""
    return steps - strength_steps(steps, strength)


def snapped_strength(steps: int, strength: float) -> float:
    """The strength actually used after snapping ``strength`` to the ``steps``-step grid."""
    return strength_steps(steps, strength) / steps


def strength_sigmas(steps: int, strength: float = 1.0, spacing: str = "trailing") -> torch.Tensor:
    """The tail of the ``steps``-step schedule that a strength of ``strength`` runs (snapped to the grid).

    Logs a debug note when the requested strength is not on the grid (callers that face a person say so in
    their own words).
    """
    k = strength_steps(steps, strength)
    if abs(k / steps - strength) > 1e-6:
        log.debug("strength %.4g is not on the %d-step grid; using %.4g (%d of %d steps)",
                 strength, steps, k / steps, k, steps)
    return schedule.sigmas(steps, spacing)[steps - k:]
