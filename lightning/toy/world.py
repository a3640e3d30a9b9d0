"""A world of tiny videos whose exact denoiser is closed-form.

Each style ("base model") is a Gaussian mixture over videos of ``frames x channels x size x size`` latents.
Component k is one *motion*: a soft blob that starts on a circle around the centre and travels across the
frame in direction ``2*pi*k/K``. Every style renders the same K motions, only differently: its own colour
(how the blob spreads over the 4 latent channels) and its own blob shape. Around each rendered mean the
video varies by a small isotropic ``spread``.

Because the data is a mixture of isotropic Gaussians, ``E[x0 | x_t]`` is exact: with the model input
``x_in = a*x0 + b*eps`` (``a = 1/sqrt(sigma^2+1)``, ``b = sigma*a``), component k is responsible for x_in
with log-weight ``-|x_in - a*mu_k|^2 / (2*(a^2 s^2 + b^2))`` and its posterior mean is
``mu_k + (a s^2 / (a^2 s^2 + b^2)) * (x_in - a*mu_k)``. Everything here is float64 with log-sum-exp.

Why these numbers (``amplitude`` 0.3, ``spread`` 0.02): the nearest motions are about 2.9 apart (L2 over the
whole video), which Euler sampling of the exact flow resolves at 32 steps (last sigma 0.18) but not at 4
(last sigma 0.87) or 2 (2.28): there the final step returns a posterior mean that still blends the
neighbouring motions - the mode-averaging blur that distillation is meant to remove.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import schedule
from ..errors import InvalidInputError

#: Colours of the first styles (how the blob spreads over the 4 latent channels); later styles are drawn.
STYLE_COLOURS = ((1.0, 0.5, -0.5, 0.2), (0.2, 1.0, 0.4, -0.6), (-0.5, 0.3, 1.0, 0.5), (0.6, -0.4, 0.3, 1.0))
#: Blob widths (along rows, along columns) of the first styles.
STYLE_SHAPES = ((1.2, 1.2), (1.5, 1.0), (1.0, 1.5), (1.35, 1.35))
COLOUR_NORM = 2.0  # every style puts the same energy into its colour, so no style is easier by being louder


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    frames: int = 8
    channels: int = 4
    size: int = 8
    motions: int = 8
    styles: int = 4
    amplitude: float = 0.3
    spread: float = 0.02
    speed: float = 0.7  # pixels per frame
    # Motion k travels along angle (k + angle_offset) * 2*pi/K. Off the axes (0.5) no motion is a pure row or
    # column shift, so a coarse (pooled) view of a frame cannot tell neighbouring motions apart as easily.
    angle_offset: float = 0.0
    seed: int = 0  # only used for styles beyond the built-in tables

    def __post_init__(self):
        for name in ("frames", "channels", "size", "motions", "styles"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"WorldConfig.{name} must be a positive integer, got {value!r}")
        if self.motions < 2:
            raise InvalidInputError(f"WorldConfig.motions must be at least 2 (a mixture), got {self.motions}")
        if not self.spread > 0 or not self.amplitude > 0:
            raise InvalidInputError(f"WorldConfig.spread and amplitude must be positive, got {self.spread}, "
                                    f"{self.amplitude}")

    @property
    def frame_dim(self) -> int:
        return self.channels * self.size * self.size

    @property
    def video_dim(self) -> int:
        return self.frames * self.frame_dim

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


class GaussianMixture:
    """Equal-weight mixture of ``N(mu_k, spread^2 I)`` over flattened videos, with its exact denoiser."""

    def __init__(self, means: torch.Tensor, spread: float, frames: int):
        if means.ndim != 2 or means.shape[1] % frames:
            raise InvalidInputError(f"means must be [components, frames*frame_dim], got {list(means.shape)}")
        self.means = means.to(torch.float64)
        self.spread = float(spread)
        self.frames = int(frames)
        self._sq_norms = self.means.square().sum(1)

    @property
    def components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def frame_means(self) -> torch.Tensor:
        """``[K, frames, frame_dim]``: mean k's frame f, for bases that look at one frame at a time."""
        return self.means.reshape(self.components, self.frames, -1)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``a``, ``b`` and the per-component variance ``v = a^2 s^2 + b^2`` of x_in, as ``[N, 1]`` columns."""
        sigma = sigma.to(torch.float64).reshape(-1, 1)
        a = 1.0 / torch.sqrt(sigma * sigma + 1.0)
        b = sigma * a
        return a, b, a * a * self.spread ** 2 + b * b

    def logits(self, x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-responsibilities ``[N, K]`` of the components for model inputs ``x_in [N, D]``."""
        a, _, v = self.coefficients(sigma)
        x = x_in.to(torch.float64)
        # |x - a mu|^2 without the |x|^2 term, which is the same for every component
        return (a * (x @ self.means.T) - 0.5 * a * a * self._sq_norms) / v

    def posterior_mean(self, x_in: torch.Tensor, sigma: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k * E[x0 | x_in, k]`` for responsibilities ``weights`` ``[N, K]`` (or ``[N, F, K]`` per frame)."""
        a, _, v = self.coefficients(sigma)
        x = x_in.to(torch.float64)
        if weights.ndim == 2:
            mixed = weights @ self.means
        else:  # one set of weights per frame
            mixed = torch.einsum("nfk,kfd->nfd", weights, self.frame_means()).reshape(x.shape)
        return mixed + (a * self.spread ** 2 / v) * (x - a * mixed)

    def denoise(self, x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_in]`` for ``x_in [N, D]`` at per-row ``sigma [N]``."""
        return self.posterior_mean(x_in, sigma, torch.softmax(self.logits(x_in, sigma), dim=1))

    def eps_from_x0(self, x_in: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a, b, _ = self.coefficients(sigma)
        return (x_in.to(torch.float64) - a * x0) / b

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact draws ``[n, D]`` (float64)."""
        k = torch.randint(self.components, (n,), generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.spread * noise

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance ``[N]`` from each video to its nearest mean, and that mean's index."""
        d = torch.cdist(x.to(torch.float64), self.means)
        return d.min(dim=1)

    def min_separation(self) -> float:
        d = torch.cdist(self.means, self.means)
        d.fill_diagonal_(float("inf"))
        return float(d.min())


def sigma_of(timestep: torch.Tensor) -> torch.Tensor:
    """Sigma the sampler meant by a model timestep (the sampler maps sigma -> t log-linearly; this inverts it)."""
    return schedule.timestep_to_sigma(timestep.to(torch.float64), "log")


def per_clip(values: torch.Tensor, frames: int, what: str) -> torch.Tensor:
    """One value per clip from a per-frame-row vector, refusing clips whose frames disagree."""
    clips = values.reshape(-1, frames)
    # a memory plan traces the toy on fake tensors, which hold no values to compare
    if not is_fake(clips) and not torch.equal(clips, clips[:, :1].expand_as(clips)):
        raise InvalidInputError(f"every frame of a clip must share one {what}; got {clips.tolist()}")
    return clips[:, 0]


class ToyWorld:
    """The styles of the world and their mixtures. ``world.mixture(j)`` is style j's data distribution."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        self._mixtures = [GaussianMixture(self._render(j), self.config.spread, self.config.frames)
                          for j in range(self.config.styles)]

    def mixture(self, style: int) -> GaussianMixture:
        if not 0 <= style < self.config.styles:
            raise InvalidInputError(f"style must be in 0..{self.config.styles - 1}, got {style!r}")
        return self._mixtures[style]

    def style_look(self, style: int) -> tuple[torch.Tensor, tuple[float, float]]:
        """Colour (unit direction over latent channels, scaled to ``COLOUR_NORM``) and blob widths of a style."""
        cfg = self.config
        if style < len(STYLE_COLOURS) and cfg.channels == 4:
            colour = torch.tensor(STYLE_COLOURS[style], dtype=torch.float64)
            shape = STYLE_SHAPES[style]
        else:
            g = torch.Generator().manual_seed(10_000 * (cfg.seed + 1) + style)
            colour = torch.randn(cfg.channels, generator=g, dtype=torch.float64)
            widths = 1.0 + 0.5 * torch.rand(2, generator=g, dtype=torch.float64)
            shape = (float(widths[0]), float(widths[1]))
        return colour / colour.norm() * COLOUR_NORM, shape

    def trajectories(self) -> torch.Tensor:
        """Blob centres ``[K, frames, 2]`` (row, column) of the K motions; the same in every style.

        Motion k's blob enters from the edge opposite direction k and glides towards the centre, which it
        reaches at the last frame: all motions converge, so neighbouring ones overlap more and more as the
        clip goes on and only the early frames tell them apart.
        """
        cfg = self.config
        angle = (torch.arange(cfg.motions, dtype=torch.float64) + cfg.angle_offset) * 2 * math.pi / cfg.motions
        direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # [K, 2]
        centre = (cfg.size - 1) / 2
        behind = 2.5 * cfg.size / 8  # how far behind the centre the blob is at mid-clip
        t = torch.arange(cfg.frames, dtype=torch.float64) - (cfg.frames - 1) / 2
        return centre + direction[:, None, :] * (cfg.speed * t[None, :, None] - behind)

    def _render(self, style: int) -> torch.Tensor:
        cfg = self.config
        colour, (wy, wx) = self.style_look(style)
        rows = torch.arange(cfg.size, dtype=torch.float64)
        yy, xx = torch.meshgrid(rows, rows, indexing="ij")
        centres = self.trajectories()
        py = centres[..., 0, None, None]
        px = centres[..., 1, None, None]
        blob = torch.exp(-0.5 * ((yy - py) ** 2 / wy ** 2 + (xx - px) ** 2 / wx ** 2))  # [K, F, H, W]
        video = cfg.amplitude * colour[None, None, :, None, None] * blob[:, :, None]  # [K, F, C, H, W]
        return video.reshape(cfg.motions, -1)

    def exact_denoiser(self, style: int) -> Callable:
        """The exact eps-predictor of a style, in the sampler's ``denoiser(x_in, timestep, cond)`` form."""
        mixture = self.mixture(style)
        frames = self.config.frames

        def denoiser(x_in: torch.Tensor, timestep: torch.Tensor, cond=None) -> torch.Tensor:
            sigma = sigma_of(per_clip(timestep, frames, "timestep"))
            x = x_in.reshape(-1, mixture.dim)
            eps = mixture.eps_from_x0(x, sigma, mixture.denoise(x, sigma))
            return eps.reshape(x_in.shape).to(x_in.dtype)

        return denoiser
