"""A tiny stand-in for ComfyUI's SD1.5 ``UNetModel`` with the same block structure (12 input blocks, a
ResBlock/SpatialTransformer/ResBlock middle, 12 output blocks; layers recognised by class name) and the same
calling conventions (``forward_timestep_embed`` dispatch, ``forward_timestep_embed_patch`` for foreign
layers, ``transformer_options``), so ``training.sd15_unet`` is tested in CI without ComfyUI. The layers
themselves are deliberately simple: only the structure and the protocol matter here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.sd15_unet import UNetCalls

VIDEO_LENGTH_KEY = "adl_video_length"
OPTIONS_KEY = "adl_motion_options"  # nodes/keys.py MOTION_OPTIONS


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.out_channels = cout
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_layers = nn.Linear(emb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(x)) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Linear(context_dim, channels)

    def forward(self, x, context, transformer_options):
        return x + self.proj(x) * torch.tanh(self.to_k(context).mean(1))[:, :, None, None]


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def forward(self, x, output_shape=None):
        size = output_shape[2:] if output_shape is not None else [2 * s for s in x.shape[2:]]
        return F.interpolate(x, size=size, mode="nearest")


class TimestepEmbedSequential(nn.Sequential):
    pass


def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, output_shape=None, *args):
    for layer in ts:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context, transformer_options)
        elif isinstance(layer, Upsample):
            x = layer(x, output_shape=output_shape)
        else:
            for class_type, handler in transformer_options.get("patches", {}).get("forward_timestep_embed_patch", []):
                if isinstance(layer, class_type):
                    x = handler(layer, x, emb, context, transformer_options, output_shape, None, None, None)
                    break
            else:
                x = layer(x)
    return x


def timestep_embedding(timesteps, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def motion_handler(layer, x, emb, context, transformer_options, *args):
    return layer(x, transformer_options[VIDEO_LENGTH_KEY], scale=transformer_options[OPTIONS_KEY]["scale"])


CALLS = UNetCalls(forward_timestep_embed=forward_timestep_embed, timestep_embedding=timestep_embedding,
                  motion_handler=motion_handler, video_length_key=VIDEO_LENGTH_KEY, motion_options_key=OPTIONS_KEY)


class FakeUNet(nn.Module):
    """Levels of widths ``channels``; transformers on the first three levels, as SD1.5."""

    def __init__(self, channels=(32, 32, 64, 64), context_dim: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        mc = channels[0]
        self.model_channels = mc
        emb = 4 * mc
        self.dtype = torch.float32
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        seq = TimestepEmbedSequential
        blocks = [seq(nn.Conv2d(4, mc, 3, padding=1))]
        cin = mc
        skips = [mc]
        for level, c in enumerate(channels):
            for _ in range(2):
                layers = [ResBlock(cin, c, emb)] + ([SpatialTransformer(c, context_dim)] if level < 3 else [])
                blocks.append(seq(*layers))
                cin = c
                skips.append(c)
            if level < len(channels) - 1:
                blocks.append(seq(Downsample(c)))
                skips.append(c)
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = seq(ResBlock(cin, cin, emb), SpatialTransformer(cin, context_dim), ResBlock(cin, cin, emb))
        out = []
        for level, c in reversed(list(enumerate(channels))):
            for i in range(3):
                layers = [ResBlock(cin + skips.pop(), c, emb)]
                if level < 3:
                    layers.append(SpatialTransformer(c, context_dim))
                if level > 0 and i == 2:
                    layers.append(Upsample())
                out.append(seq(*layers))
                cin = c
        self.output_blocks = nn.ModuleList(out)
        self.out = nn.Conv2d(cin, 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, transformer_options={}, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = forward_timestep_embed(module, h, emb, context, transformer_options)
            hs.append(h)
        h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options)
        for module in self.output_blocks:
            skip = hs.pop()
            h = torch.cat([h, skip], dim=1)
            h = forward_timestep_embed(module, h, emb, context, transformer_options, hs[-1].shape if hs else None)
        return self.out(h)
