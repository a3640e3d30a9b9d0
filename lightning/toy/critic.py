"""The toy world's discriminator: the flow-conditional D of :mod:`lightning.discriminator` on a toy backbone."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..discriminator import FlowDiscriminator, groups_for
from ..errors import InvalidInputError
from ..motion_module import TemporalTransformer
from .models import encoder_features, frame_evidence
from .world import sigma_of


FIT_FLOOR = 1e-3  # template fits closer than this (in template norms) are all "on the template"
GRAM_RIDGE = 1e-6  # keeps the solve defined should training make two templates collinear
# Near the end of sampling the evidence features run to tens of units; the fit enters at a comparable
# scale, or the transformer's GroupNorm would shrink the motion-against-blend gap to a few percent.
FIT_GAIN = 8.0


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (continuous) timesteps, cos first as in the SD UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timestep.device)
    args = timestep.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyBackbone(nn.Module):
    """The toy world's D backbone: a trainable copy of a toy base's encoder, then a motion module.

    As the paper starts D from the base UNet's encoder (it already knows what the data looks like at every
    noise level), this starts from a :class:`~lightning.toy.models.ToyBase`'s encoder: the per-frame
    evidence for each motion template at the input's noise level, lifted to ``width`` channels by a copy
    of the base's lift; then the time + base-index embedding is added and a temporal transformer runs over
    the frames of each template "pixel". Templates, lift and all the rest are trained.

    One feature the base's encoder lacks is added to every template pixel: the **template fit**, the log of
    the clip's distance to that template clip (:func:`template_fit`). Evidence is linear in the clip: "motion
    3" and "half of motion 3 plus half of motion 4" differ in it only by a threshold D would first have to
    learn, and with the few dozen steps of a toy phase it did not (its preference for the teacher's jump
    stayed at chance). The fit is small for a motion and a fraction of the separation for a blend.
    Shapes: ``[(clips*frames), C, s, s]`` -> ``[(clips*frames), width, K, 1]`` (K templates).
    """

    def __init__(self, base, *, heads: int = 4):
        super().__init__()
        templates = base.templates.detach()
        if templates.ndim != 3:
            raise InvalidInputError(f"templates must be [K, frames, frame_dim], got {list(templates.shape)}")
        width = base.lift.shape[0]
        self.channels = width
        self.embedding_dim = width
        self.spread = float(base.mixture.spread)
        self.register_buffer("template_scale", base.template_scale.detach().to(torch.float32).clone())
        self.templates = nn.Parameter(templates.to(torch.float32).clone())
        lift = base.lift.detach().to(torch.float32)
        fit_column = FIT_GAIN * torch.randn(width, 1, generator=torch.Generator().manual_seed(0)) / math.sqrt(width)
        fit_column = fit_column.to(lift.device)  # a memory plan builds D from a base on the meta device
        self.lift = nn.Parameter(torch.cat([lift, fit_column], dim=1))
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        # zero_init=False: a discriminator starts from random weights, not from an identity module
        self.motion = TemporalTransformer(width, heads=heads, norm_groups=groups_for(width), zero_init=False)

    def forward(self, x_in, timestep, cond, extra_embedding, video_length):
        k, frames, dim = self.templates.shape
        if video_length != frames or x_in[0].numel() != dim:
            raise InvalidInputError(f"toy backbone was built for {frames}-frame clips of {dim} values per frame, "
                                    f"got video_length={video_length}, frame shape {list(x_in.shape[1:])}")
        clips = x_in.shape[0] // frames
        sigma = sigma_of(timestep.reshape(clips, frames)[:, 0]).to(torch.float32)
        evidence = frame_evidence(x_in.reshape(clips, frames, dim).float(), sigma, self.templates, self.spread)
        raw, _ = encoder_features(evidence, sigma, self.spread, self.template_scale)
        fit = template_fit(x_in.reshape(clips, frames * dim).float(), sigma, self.templates)
        raw = torch.cat([raw, fit[:, None, :, None].expand(clips, frames, k, 1)], dim=-1)
        emb = self.time(timestep_embedding(timestep, self.channels)) + extra_embedding  # [(clips*frames), width]
        h = (raw @ self.lift.T).reshape(clips * frames, k, self.channels) + emb[:, None, :]
        return self.motion(h.transpose(1, 2).unsqueeze(-1).contiguous(), video_length)


def template_fit(x_in: torch.Tensor, sigma: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """``[clips, K]``: log of each clip's distance to each template clip, within the templates' span.

    Measured inside the span (the directions that tell motions apart), in units of the typical template
    norm: the jitter of a motion around its template is hundreds of dimensions wide and barely shows there,
    while a blend of two motions sits a fraction of their separation away from both. With ``w`` the span
    coordinates of the clip (``G w = e``, ``e_k = x . T_k``, ``G`` the templates' Gram matrix),
    ``|P x - a T_k|^2 = w . e - 2 a e_k + a^2 G_kk``.
    """
    clips = x_in.shape[0]
    t = templates.reshape(templates.shape[0], -1).to(x_in.dtype)
    x = x_in.reshape(clips, -1)
    a = (1.0 / torch.sqrt(sigma.to(x.dtype) ** 2 + 1.0))[:, None]
    gram = t @ t.T
    gram = gram + GRAM_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=x.dtype, device=x.device)
    e = x @ t.T
    w = torch.linalg.solve(gram, e.T).T
    squared = (w * e).sum(-1, keepdim=True) - 2 * a * e + a * a * gram.diagonal()[None]
    # floored before the root: sqrt's gradient at 0 is infinite, and the student is trained through D
    scale = gram.diagonal().mean()
    return 0.5 * torch.log(squared.clamp(min=FIT_FLOOR ** 2 * scale) / scale)


def toy_discriminator(conditional: bool, *, base, num_bases: int) -> FlowDiscriminator:
    """D or D' for toy-world clips, its backbone started from ``base``'s encoder (a ``ToyBase``)."""
    k, frames, _ = base.templates.shape
    return FlowDiscriminator(ToyBackbone(base), num_bases=num_bases, feature_size=(frames, k, 1),
                             conditional=conditional)
