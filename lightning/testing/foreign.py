"""Small random models of other families, for testing that SD1.5-only code refuses them clearly.

``sd2_tiny_unet_shapes`` is a two-level UNet in the Stable Diffusion 2.x layout (320 channels, linear transformer
projections, 1024-wide text context), which ComfyUI's ``UNETLoader`` detects as SD2 while holding only ~30M
weights instead of 865M.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .sd15 import Shape, write_random_weights

SD2_CHANNELS = 320
SD2_CONTEXT = 1024
SD2_MULT = (1, 2)
SD2_FILENAME = "sd2_tiny_unet.safetensors"


def _add(out, name, shape, bias=None):
    out[f"{name}.weight"] = shape
    if bias is not None:
        out[f"{name}.bias"] = (bias,)


def _resblock(out, name, cin, cout, emb):
    _add(out, f"{name}.in_layers.0", (cin,), cin)
    _add(out, f"{name}.in_layers.2", (cout, cin, 3, 3), cout)
    _add(out, f"{name}.emb_layers.1", (cout, emb), cout)
    _add(out, f"{name}.out_layers.0", (cout,), cout)
    _add(out, f"{name}.out_layers.3", (cout, cout, 3, 3), cout)
    if cin != cout:
        _add(out, f"{name}.skip_connection", (cout, cin, 1, 1), cout)


def _linear_transformer(out, name, ch):
    _add(out, f"{name}.norm", (ch,), ch)
    _add(out, f"{name}.proj_in", (ch, ch), ch)
    block = f"{name}.transformer_blocks.0"
    for attn, kv in (("attn1", ch), ("attn2", SD2_CONTEXT)):
        _add(out, f"{block}.{attn}.to_q", (ch, ch))
        _add(out, f"{block}.{attn}.to_k", (ch, kv))
        _add(out, f"{block}.{attn}.to_v", (ch, kv))
        _add(out, f"{block}.{attn}.to_out.0", (ch, ch), ch)
    _add(out, f"{block}.ff.net.0.proj", (8 * ch, ch), 8 * ch)
    _add(out, f"{block}.ff.net.2", (ch, 4 * ch), ch)
    for i in (1, 2, 3):
        _add(out, f"{block}.norm{i}", (ch,), ch)
    _add(out, f"{name}.proj_out", (ch, ch), ch)


def sd2_tiny_unet_shapes() -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    c, emb = SD2_CHANNELS, 4 * SD2_CHANNELS
    _add(out, "time_embed.0", (emb, c), emb)
    _add(out, "time_embed.2", (emb, emb), emb)
    _add(out, "input_blocks.0.0", (c, 4, 3, 3), c)
    skips, ch, block = [c], c, 1
    for level, mult in enumerate(SD2_MULT):
        _resblock(out, f"input_blocks.{block}.0", ch, mult * c, emb)
        ch = mult * c
        _linear_transformer(out, f"input_blocks.{block}.1", ch)
        skips.append(ch)
        block += 1
        if level < len(SD2_MULT) - 1:
            _add(out, f"input_blocks.{block}.0.op", (ch, ch, 3, 3), ch)
            skips.append(ch)
            block += 1
    _resblock(out, "middle_block.0", ch, ch, emb)
    _linear_transformer(out, "middle_block.1", ch)
    _resblock(out, "middle_block.2", ch, ch, emb)
    block = 0
    for level in reversed(range(len(SD2_MULT))):
        width = SD2_MULT[level] * c
        for i in range(2):
            _resblock(out, f"output_blocks.{block}.0", ch + skips.pop(), width, emb)
            ch = width
            _linear_transformer(out, f"output_blocks.{block}.1", ch)
            if level > 0 and i == 1:
                _add(out, f"output_blocks.{block}.2.conv", (ch, ch, 3, 3), ch)
            block += 1
    _add(out, "out.0", (c,), c)
    _add(out, "out.2", (4, c, 3, 3), 4)
    return out


def write_sd2_tiny_unet(path, *, seed: int = 0, dtype=torch.float16) -> Path:
    return write_random_weights(path, sd2_tiny_unet_shapes(), seed=seed, dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny SD2-layout UNet (for 'not SD1.5' tests).")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    print(write_sd2_tiny_unet(args.out / SD2_FILENAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
