"""A shape-only SD1.5 UNet for the memory plan when ComfyUI is not at hand (CI, the benchmark table).

The real training run uses ComfyUI's UNet (``training.sd15_setup``). The memory plan only needs something
with the same parameters (names, shapes, dtypes) and the same activation structure, built on the ``meta``
device and never given real weights: this module. It follows the SD1.5 architecture of
``v1-inference.yaml`` (the same rules ``lightning.testing.sd15`` writes its key tables from, and a test checks
every key and shape against that table): 320 base channels, multipliers 1-2-4-4, two residual blocks per
level, a one-layer spatial transformer (self-attention, cross-attention to 77x768 text tokens, GEGLU
feed-forward) on the top three levels and in the middle, nearest upsampling. AnimateDiff's 21 motion
modules sit where AnimateDiff puts them: after each down and up block's residual block (+ transformer),
and in the middle block between the transformer and the second residual block.

It is NOT the model users sample with and is never trained; where it differs from ComfyUI's (attention
kernels, fused norms, in-place tricks), activation memory can differ by a few per cent. The plan says in its
output which UNet it traced.

``gradient_checkpointing`` (attribute) recomputes every UNet block (with its motion module) in backward,
non-reentrant, the way diffusers does it for its UNets.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._core import core
MotionModuleSet = core("motion_module").MotionModuleSet

SD15 = {"model_channels": 320, "channel_mult": (1, 2, 4, 4), "context_dim": 768, "heads": 8, "groups": 32}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cosine half first (the SD UNet's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _Attention(nn.Module):
    def __init__(self, ch: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_k = nn.Linear(kv_dim, ch, bias=False)
        self.to_v = nn.Linear(kv_dim, ch, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class _GEGLU(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.proj = nn.Linear(ch, 8 * ch)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(ch), nn.Dropout(0.0), nn.Linear(4 * ch, ch)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class _TransformerBlock(nn.Module):
    def __init__(self, ch: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = _Attention(ch, ch, heads)
        self.attn2 = _Attention(ch, context_dim, heads)
        self.ff = _FeedForward(ch)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(ch) for _ in range(3))

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class _SpatialTransformer(nn.Module):
    def __init__(self, ch: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([_TransformerBlock(ch, context_dim, heads)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        tokens = self.transformer_blocks[0](tokens, context)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w)) + x


class _Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.ModuleList):
    """One UNet block: a list of layers, each called with what its kind needs; the motion module goes after
    the residual block and transformer, before any resampling (AnimateDiff's place)."""

    def run(self, x, emb, context, motion, frames: int):
        for layer in self:
            if isinstance(layer, _ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, _SpatialTransformer):
                x = layer(x, context)
            else:
                if motion is not None:
                    x = motion(x, frames)
                    motion = None
                x = layer(x)
        return motion(x, frames) if motion is not None else x


class StandInUNet(nn.Module):
    """SD1.5-shaped UNet (or, with ``encoder_only``, its time embedding, input blocks and middle block: the
    discriminator backbone's part). Parameter names and shapes are the ldm checkpoint's
    ``model.diffusion_model.*`` keys. ``forward(x_in, timestep, cond, motion_module) -> eps`` is the frozen-base
    interface of :mod:`lightning.distill` (``cond`` per clip, ``[clips, tokens, context_dim]``)."""

    def __init__(self, *, model_channels: int = 320, channel_mult=(1, 2, 4, 4), context_dim: int = 768,
                 heads: int = 8, groups: int = 32, attention_levels=(0, 1, 2), encoder_only: bool = False,
                 index: int = 0):
        super().__init__()
        self.index = index
        self.model_channels = model_channels
        self.gradient_checkpointing = False
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = model_channels
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(4, ch, 3, padding=1)])])
        skips = [ch]
        self.down_motion_slots: list[tuple[int, int] | None] = [None]
        for level, mult in enumerate(channel_mult):
            for j in range(2):
                layers = [_ResBlock(ch, mult * model_channels, emb_dim, groups)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(_SpatialTransformer(ch, context_dim, heads, groups))
                self.input_blocks.append(_Block(layers))
                self.down_motion_slots.append((level, j))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Block([_Downsample(ch)]))
                self.down_motion_slots.append(None)
                skips.append(ch)
        self.middle_block = nn.ModuleList([_ResBlock(ch, ch, emb_dim, groups),
                                           _SpatialTransformer(ch, context_dim, heads, groups),
                                           _ResBlock(ch, ch, emb_dim, groups)])
        self.mid_channels = ch
        self.embedding_dim = emb_dim
        if encoder_only:
            return
        self.output_blocks = nn.ModuleList()
        self.up_motion_slots: list[tuple[int, int]] = []
        for i, level in enumerate(reversed(range(len(channel_mult)))):
            width = channel_mult[level] * model_channels
            for j in range(3):
                layers = [_ResBlock(ch + skips.pop(), width, emb_dim, groups)]
                ch = width
                if level in attention_levels:
                    layers.append(_SpatialTransformer(ch, context_dim, heads, groups))
                if level != 0 and j == 2:
                    layers.append(_Upsample(ch))
                self.output_blocks.append(_Block(layers))
                self.up_motion_slots.append((i, j))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, padding=1))

    # -- pieces ------------------------------------------------------------------------------------------

    def _call(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # The recomputation must see the forward's autocast; re-entered explicitly, as CPU autocast was
            # found missing there on fake tensors (bf16 + checkpointing failed with a dtype mismatch).
            enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

            def run(*inputs):
                with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                    return fn(*inputs)

            return checkpoint(run, *args, use_reentrant=False)
        return fn(*args)

    def _middle(self, x, emb, context, motion, frames):
        x = self.middle_block[1](self.middle_block[0](x, emb), context)
        if motion is not None and motion.mid is not None:
            x = motion.mid(x, frames)
        return self.middle_block[2](x, emb)

    def encode(self, x_in, timestep, cond, motion, frames: int, extra_embedding=None):
        """Time embedding, input blocks, middle block; returns (mid features, skips, emb, context)."""
        emb = self.time_embed(timestep_embedding(timestep, self.model_channels).to(x_in.dtype))
        if extra_embedding is not None:
            emb = emb + extra_embedding
        context = cond.repeat_interleave(frames, dim=0) if cond is not None else None
        h, skips = x_in, []
        for block, slot in zip(self.input_blocks, self.down_motion_slots):
            mm = motion.down[slot[0]][slot[1]] if motion is not None and slot is not None else None
            h = self._call(lambda h, block=block, mm=mm: block.run(h, emb, context, mm, frames), h)
            skips.append(h)
        h = self._call(lambda h: self._middle(h, emb, context, motion, frames), h)
        return h, skips, emb, context

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any,
                motion_module: MotionModuleSet | None) -> torch.Tensor:
        rows = x_in.shape[0]
        clips = cond.shape[0] if cond is not None else 1
        frames = rows // clips
        h, skips, emb, context = self.encode(x_in, timestep, cond, motion_module, frames)
        for block, (i, j) in zip(self.output_blocks, self.up_motion_slots):
            mm = motion_module.up[i][j] if motion_module is not None else None
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._call(lambda h, block=block, mm=mm: block.run(h, emb, context, mm, frames), h)
        return self.out(h)


class StandInBackbone(nn.Module):
    """The discriminator backbone (``lightning.discriminator.Backbone``): the UNet encoder + middle block
    with the down and mid motion modules; ``gradient_checkpointing`` is the attribute the loop sets."""

    def __init__(self, encoder: StandInUNet, motion: MotionModuleSet):
        super().__init__()
        self.encoder = encoder
        self.motion = motion
        self.channels = encoder.mid_channels
        self.embedding_dim = encoder.embedding_dim

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def forward(self, x_in, timestep, cond, extra_embedding, video_length):
        return self.encoder.encode(x_in, timestep, cond, self.motion, video_length, extra_embedding)[0]


def down_mid_motion(channels, **kwargs) -> MotionModuleSet:
    """A motion module set without its up modules (what the discriminator backbone carries)."""
    motion = MotionModuleSet(channels, has_mid=True, **kwargs)
    motion.up_blocks = nn.ModuleList()
    return motion
