"""The toy "AnimateDiff": a frozen per-style base that is the exact denoiser, plus a shared motion module.

A real AnimateDiff model is a frozen image UNet with motion modules riding along its feature maps; the
modules add residuals that the frozen decoder turns into a different eps. Here the frozen base is the
exact posterior of its style's mixture, written as an encoder, a bottleneck and a decoder:

- **encoder**: per frame f and motion k, the evidence that frame f shows motion k (the frame's share of
  component k's log-likelihood), the clip-level log-responsibility of k, and the noise level. These raw
  features are lifted to ``width`` channels by a frozen matrix. The encoder looks at each frame through a
  coarse ``view_grid`` x ``view_grid`` pooling (a UNet's bottleneck has lost the fine detail too): the
  motion module can only judge a clip from that lossy view, while the base's own posterior stays exact.
- **bottleneck**: a ``[(clips*frames), width, K, 1]`` feature map - one "pixel" per motion template, so each
  pixel has already pooled the whole frame, as a UNet bottleneck has. The motion module (our real
  :class:`~lightning.motion_module.TemporalTransformer`) attends over the frames of each of these pixels,
  with weights shared across templates.
- **decoder**: a frozen read-out turns each template pixel's feature *change* into a change of that
  template's logit for that frame; the responsibilities (now per frame) mix the templates into
  ``E[x0 | x_t]`` exactly as the exact posterior does, and eps follows.

With the zero-initialised motion modules the feature change is exactly zero, so the student *is* the exact
teacher at initialisation, bit for bit. What the modules can learn is what few-step sampling lacks: to
commit to one motion (sharpen the responsibilities) earlier than the exact posterior does at that noise
level, consistently across frames.

Why the lossy view: with the exact evidence the module can reproduce any teacher jump, so MSE distillation
alone already makes sharp 2-step students and a discriminator has nothing to add. Through the pooled view,
which motion a many-step teacher ends on from pure noise depends on detail the module cannot see; the
MSE-optimal jump is then the blend of the motions the view leaves possible (the blur of real few-step
MSE students), while a discriminator rewards committing to one of them.

Styles differ like fine-tuned base models: each renders the motions in its own look (so its templates and
evidence scales differ), and its frozen lift and read-out are the shared ones plus a style-specific random
perturbation (``style_perturbation``, as large as the shared part by default), so a module trained on one
style sees different features, and is read differently, on another. With a small perturbation (0.2) a
module distilled on style 0 alone transferred to the other styles as well as a multi-style one: there was
nothing for cross-model distillation to fix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidInputError
from ..motion_module import MotionModuleSet
from .world import ToyWorld, per_clip, sigma_of

TIME_FEATURES = 6  # sin/cos of log-sigma at three frequencies
RAW_FEATURES = 2 + TIME_FEATURES  # per-frame evidence, clip log-responsibility, time
LOG_RESPONSIBILITY_FLOOR = -20.0  # beyond this a template is simply "not this one"; keeps features bounded


def time_features(sigma: torch.Tensor) -> torch.Tensor:
    """``[N, TIME_FEATURES]`` smooth, bounded features of the noise level (sigma spans 0.03 .. 25)."""
    log_sigma = torch.log(sigma.to(torch.float64))[:, None]
    freqs = 0.5 * torch.exp(torch.linspace(0, math.log(4.0), TIME_FEATURES // 2, dtype=torch.float64))[None]
    return torch.cat([torch.sin(log_sigma * freqs), torch.cos(log_sigma * freqs)], dim=1)


def frame_evidence(x_in: torch.Tensor, sigma: torch.Tensor, templates: torch.Tensor, spread: float) -> torch.Tensor:
    """``[clips, frames, K]``: each frame's share of each template's log-likelihood (summed over frames it is
    the clip's log-responsibility up to a constant), for model inputs ``x_in [clips, frames, frame_dim]``.

    Works in the dtype of ``x_in`` so a trainable copy (the discriminator's backbone) can run it in float32.
    """
    sigma = sigma.to(x_in.dtype)[:, None, None]
    a = 1.0 / torch.sqrt(sigma * sigma + 1.0)
    v = a * a * spread ** 2 + (sigma * a) ** 2
    t = templates.to(x_in.dtype)
    return (a * torch.einsum("nfd,kfd->nfk", x_in, t) - 0.5 * a * a * t.square().sum(-1).T[None]) / v


def encoder_features(evidence: torch.Tensor, sigma: torch.Tensor, spread: float, template_scale
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's raw features ``[clips, frames, K, RAW_FEATURES]`` and the evidence unit ``[clips, 1, 1]``.

    Evidence is centred over templates and divided by ``unit = template_scale / sqrt(spread^2 + sigma^2)``,
    which gives its noise part unit variance at every sigma (the signal part grows as sigma shrinks).
    """
    clips, frames, k = evidence.shape
    sigma = sigma.to(evidence.dtype)
    unit = (template_scale / torch.sqrt(spread ** 2 + sigma * sigma))[:, None, None]
    centred = (evidence - evidence.mean(-1, keepdim=True)) / unit
    logits = evidence.sum(dim=1, keepdim=True)
    log_resp = torch.log_softmax(logits, -1).clamp(min=LOG_RESPONSIBILITY_FLOOR) / -LOG_RESPONSIBILITY_FLOOR
    time = time_features(sigma).to(evidence.dtype)[:, None, None, :].expand(clips, frames, k, TIME_FEATURES)
    raw = torch.cat([centred[..., None], log_resp.expand(clips, frames, k)[..., None], time], dim=-1)
    return raw, unit


def pool_frames(x: torch.Tensor, latent_shape: tuple[int, int, int], grid: int) -> torch.Tensor:
    """``[..., frame_dim]`` frames -> ``[..., channels*grid*grid]``: block sums divided by the block side.

    That is the orthogonal projection onto block-constant frames, so isotropic noise stays isotropic with the
    same variance and :func:`frame_evidence` of pooled frames against pooled templates is exact for them.
    """
    channels, size, _ = latent_shape
    if grid < 1 or size % grid:
        raise InvalidInputError(f"view_grid must divide the latent size {size}, got {grid!r}")
    block = size // grid
    if block == 1:
        return x
    blocks = x.reshape(*x.shape[:-1], channels, grid, block, grid, block)
    return blocks.sum(dim=(-3, -1)).reshape(*x.shape[:-1], channels * grid * grid) / block


def make_motion_module(width: int = 32, *, heads: int = 4, norm_groups: int = 1) -> MotionModuleSet:
    """The toy student: a one-level motion-module set, zero-initialised (an exact identity).

    The toy UNet has a single feature map, its bottleneck, so only the set's *mid* module acts; the down
    and up modules have no feature map to ride on, get no gradient and stay identities. Carrying the whole
    set keeps checkpoints in the real AnimateDiff file layout (``checkpoints.save_motion_module``).
    ``norm_groups=1``: the bottleneck pixels are templates, so the input GroupNorm should compare all
    templates of a frame with each other (one group), not normalise each template's few channels alone.
    """
    return MotionModuleSet.from_channels((width,), has_mid=True, heads=heads, norm_groups=norm_groups)


def shared_frozen_maps(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lift ``[width, RAW_FEATURES]`` (orthonormal columns) and read-out ``[width]`` all styles start from."""
    g = torch.Generator().manual_seed(seed)
    lift = torch.linalg.qr(torch.randn(width, RAW_FEATURES, generator=g, dtype=torch.float64))[0]
    return lift, lift[:, 0].clone()  # the read-out reads back the evidence direction


class ToyBase(nn.Module):
    """Style ``style``'s frozen base. ``base(x_in, timestep, cond, motion_module) -> eps``.

    ``motion_module=None`` skips the bottleneck and is the exact teacher. ``index`` is the base-model index
    the flow-conditional discriminator is told.
    """

    def __init__(self, world: ToyWorld, style: int, *, width: int = 32, style_perturbation: float = 1.0,
                 seed: int = 0, view_grid: int | None = None):
        super().__init__()
        self.world = world
        self.index = int(style)
        self.mixture = world.mixture(style)
        self.frames = world.config.frames
        self.width = int(width)
        lift, readout = shared_frozen_maps(width, seed)
        g = torch.Generator().manual_seed(seed * 1000 + 1 + style)
        lift = lift + style_perturbation * torch.randn(lift.shape, generator=g, dtype=torch.float64) / math.sqrt(width)
        readout = readout + style_perturbation * torch.randn(readout.shape, generator=g, dtype=torch.float64) / math.sqrt(width)
        frame_means = self.mixture.frame_means()  # [K, F, frame_dim]
        # Frozen parameters (not buffers) so that "the base is untouched" is checked on real parameters.
        self.lift = nn.Parameter(lift.float(), requires_grad=False)
        self.readout = nn.Parameter(readout.float(), requires_grad=False)
        self.templates = nn.Parameter(frame_means, requires_grad=False)
        # the motion module's view: None (or the full size) is the exact frame
        self.view_grid = int(view_grid or world.config.size)
        self.view_templates = nn.Parameter(pool_frames(frame_means, world.config.latent_shape, self.view_grid),
                                           requires_grad=False)
        # Typical template norm per frame: the unit of evidence features and of logit changes.
        self.register_buffer("template_scale", frame_means.square().sum(-1).mean().sqrt())

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, cond=None, motion_module=None) -> torch.Tensor:
        cfg = self.world.config
        frames = self.frames
        if x_in.ndim != 4 or x_in.shape[1:] != cfg.latent_shape or x_in.shape[0] % frames:
            raise InvalidInputError(
                f"toy base input must be [(clips*{frames}), {', '.join(map(str, cfg.latent_shape))}], "
                f"got {list(x_in.shape)}")
        clips = x_in.shape[0] // frames
        sigma = sigma_of(per_clip(timestep, frames, "timestep"))
        mixture = self.mixture
        x = x_in.to(torch.float64).reshape(clips, frames, -1)
        evidence = frame_evidence(x, sigma, self.templates, mixture.spread)
        logits = evidence.sum(dim=1, keepdim=True)  # [clips, 1, K]: the exact log-responsibilities (+ const)
        if motion_module is not None:
            logits = logits + self._logit_change(motion_module, x, sigma)
        weights = torch.softmax(logits, dim=-1).expand(clips, frames, -1)
        x0 = mixture.posterior_mean(x.reshape(clips, -1), sigma, weights)
        eps = mixture.eps_from_x0(x.reshape(clips, -1), sigma, x0)
        return eps.reshape(x_in.shape).to(x_in.dtype)

    def _logit_change(self, motion_module, x, sigma) -> torch.Tensor:
        view = pool_frames(x, self.world.config.latent_shape, self.view_grid)
        evidence = frame_evidence(view, sigma, self.view_templates, self.mixture.spread)
        clips, frames, k = evidence.shape
        raw, unit = encoder_features(evidence, sigma, self.mixture.spread, self.template_scale)
        features = raw.to(self.lift.dtype) @ self.lift.T  # [clips, frames, K, width]
        h = features.reshape(clips * frames, k, self.width).permute(0, 2, 1).unsqueeze(-1).contiguous()
        out = _bottleneck_module(motion_module)(h, frames)
        change = (out - h).squeeze(-1).permute(0, 2, 1) @ self.readout  # [(clips*frames), K]
        return change.to(torch.float64).reshape(clips, frames, k) * unit


def _bottleneck_module(motion_module):
    """The module that acts on the bottleneck: a set's mid module, or a bare TemporalTransformer."""
    if isinstance(motion_module, MotionModuleSet):
        if motion_module.mid is None:
            raise InvalidInputError("the toy base needs a motion-module set with a mid block (has_mid=True)")
        return motion_module.mid
    return motion_module


def make_bases(world: ToyWorld, styles, **kwargs) -> list[ToyBase]:
    """Frozen bases for ``styles`` (all sharing the same frozen maps before their style perturbation)."""
    bases = [ToyBase(world, s, **kwargs) for s in styles]
    for base in bases:
        base.requires_grad_(False).eval()
    return bases
