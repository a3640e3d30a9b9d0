"""The flow-conditional video discriminator of AnimateDiff-Lightning §3.3 (SDXL-Lightning §3.3 for video).

    D (x_t, x_{t-ns}, t, t-ns, c, i) = sigmoid(head(d(x_{t-ns}, t-ns, c, i), d(x_t, t, c, i)))
    D'(x_{t-ns}, t-ns, c, i)         = sigmoid(head(d(x_{t-ns}, t-ns, c, i)))

``d`` is a backbone - in the paper the AnimateDiff UNet's encoder and mid block (SD1.5 weights plus the
v2 motion modules), trained whole - applied *independently* to the two inputs. The base-model index ``i``
(which frozen base produced the flow) is a new learnable embedding added to the backbone's time embedding,
so one discriminator can judge several bases' flows apart. The mid-block features of the two passes are
concatenated on channels and reduced by 3-D convolutions (kernel 4, stride 2) with GroupNorm and SiLU to a
single logit per clip. We return the logit; ``sigmoid(logit)`` is the probability that x_{t-ns} came from
the teacher, and the losses in :mod:`lightning.distill` work on logits for numerical stability.

The backbone is an interface (:class:`Backbone`): :class:`lightning.toy.critic.ToyBackbone` for the toy world,
the SD1.5 encoder taken from ComfyUI's UNet in ``training/``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .errors import InvalidInputError

MAX_GROUPS = 32
#: Head width for the SD1.5 backbone. The paper gives none; the head's input width (2 x 1280 for D)
#: would make the head alone larger than the motion module at 512x512x16.
SD15_HEAD_CHANNELS = 512
MIN_GROUP_CHANNELS = 16  # the head ends on 1x1x1 maps, where a group's statistics come from its channels alone


class Backbone(Protocol):
    """``backbone(x_in, timestep, cond, extra_embedding, video_length) -> [(clips*frames), C, h, w]``.

    ``extra_embedding`` ``[(clips*frames), embedding_dim]`` is added to the backbone's time embedding
    (where the UNet adds its class embedding). ``channels`` is C of the mid features.
    """

    channels: int
    embedding_dim: int

    def __call__(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any, extra_embedding: torch.Tensor,
                 video_length: int) -> torch.Tensor: ...


def groups_for(channels: int, min_channels: int = 1) -> int:
    """The most GroupNorm groups (at most 32, the UNet's choice) dividing ``channels`` with ``min_channels`` each."""
    fits = [g for g in range(1, MAX_GROUPS + 1) if channels % g == 0 and channels // g >= min_channels]
    return max(fits, default=1)


def _down(size: int) -> tuple[int, int, int]:
    """Kernel, stride, padding along one axis: k4 s2 p1 halves it; an axis already at 1 is left alone."""
    return (4, 2, 1) if size > 1 else (1, 1, 0)


class ConvHead(nn.Module):
    """3-D conv blocks (kernel 4, stride 2, GroupNorm, SiLU) over (frames, h, w) down to 1x1x1, then one logit.

    Every block halves each axis that is still longer than one (sizes are rounded up), keeping the width.
    For SD1.5 at 512x512, 16 frames: mid features 16x8x8 -> 8x4x4 -> 4x2x2 -> 2x1x1 -> 1x1x1. GroupNorm
    groups keep at least ``MIN_GROUP_CHANNELS`` channels: on the final 1x1x1 maps a one-channel group would
    normalise every value to zero and cut the logit off from the input (SD1.5's 32 groups of 80 are fine).
    """

    def __init__(self, in_channels: int, frames: int, height: int, width: int, channels: int | None = None):
        super().__init__()
        channels = channels or in_channels
        blocks: list[nn.Module] = []
        size = [frames, height, width]
        c_in = in_channels
        while max(size) > 1:
            k, s, p = zip(*(_down(n) for n in size))
            blocks += [nn.Conv3d(c_in, channels, kernel_size=k, stride=s, padding=p),
                       nn.GroupNorm(groups_for(channels, MIN_GROUP_CHANNELS), channels), nn.SiLU()]
            size = [(n + 2 * pi - ki) // si + 1 for n, ki, si, pi in zip(size, k, s, p)]
            c_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.to_logit = nn.Conv3d(c_in, 1, kernel_size=1)
        self.input_size = (frames, height, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[clips, C, frames, h, w]`` -> ``[clips]`` logits."""
        if tuple(features.shape[2:]) != self.input_size:
            raise InvalidInputError(f"discriminator head was built for (frames, h, w) = {self.input_size}, "
                                    f"got {tuple(features.shape[2:])}")
        return self.to_logit(self.blocks(features)).flatten(1).squeeze(1)


class FlowDiscriminator(nn.Module):
    """D (``conditional=True``, sees x_t and x_{t-ns}) or D' (``conditional=False``, sees x_{t-ns} only).

    ``feature_size`` = (frames, h, w) of the backbone's mid features for the clips it will judge.
    """

    def __init__(self, backbone: nn.Module, *, num_bases: int, feature_size: tuple[int, int, int],
                 conditional: bool = True, head_channels: int | None = None):
        super().__init__()
        if num_bases < 1:
            raise InvalidInputError(f"num_bases must be at least 1, got {num_bases}")
        self.backbone = backbone
        self.conditional = bool(conditional)
        self.num_bases = int(num_bases)
        self.base_embedding = nn.Embedding(num_bases, backbone.embedding_dim)
        nn.init.zeros_(self.base_embedding.weight)  # starts as the backbone's own time embedding
        passes = 2 if conditional else 1
        frames, height, width = feature_size
        self.frames = frames
        self.head = ConvHead(passes * backbone.channels, frames, height, width, head_channels)

    def features(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any, index) -> torch.Tensor:
        """Backbone mid features as ``[clips, C, frames, h, w]``, with the base index in the time embedding."""
        rows = x_in.shape[0]
        # Checked on the Python value when there is one: a training iteration passes an int and must not read
        # a tensor back (the memory plan traces it on fake tensors); a tensor of indices is checked as data.
        values = [index] if isinstance(index, int) else index.tolist() if isinstance(index, torch.Tensor) else list(index)
        if any(not 0 <= int(i) < self.num_bases for i in values):
            raise InvalidInputError(f"base index must be in 0..{self.num_bases - 1}, got {values}")
        index = torch.as_tensor(index, dtype=torch.long, device=x_in.device)
        if index.ndim == 0:
            index = index.expand(rows // self.frames)
        extra = self.base_embedding(index).repeat_interleave(self.frames, dim=0)
        mid = self.backbone(x_in, timestep, cond, extra, self.frames)
        clips = rows // self.frames
        return mid.reshape(clips, self.frames, *mid.shape[1:]).transpose(1, 2)

    def forward(self, x_next_in: torch.Tensor, t_next: torch.Tensor, cond: Any, index, *,
                x_in: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logit per clip that ``x_next_in`` (model input at ``t_next``) is the teacher's jump from ``x_in``."""
        if x_next_in.shape[0] % self.frames:
            raise InvalidInputError(f"discriminator input has {x_next_in.shape[0]} frames, not a whole number of "
                                    f"{self.frames}-frame clips")
        feats = [self.features(x_next_in, t_next, cond, index)]
        if self.conditional:
            if x_in is None or t is None:
                raise InvalidInputError("the conditional discriminator D needs x_in and t (the jump's start)")
            feats.append(self.features(x_in, t, cond, index))
        return self.head(torch.cat(feats, dim=1))
