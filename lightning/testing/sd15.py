"""Random-weight Stable Diffusion 1.5 checkpoint and SD1.5 ControlNet, in the original (CompVis/ldm) layout.

Integration tests run a real ComfyUI (CheckpointLoaderSimple, ControlNetLoader, KSampler, VAEDecode) on
these files, so they must be indistinguishable from the released ones by key name, shape and dtype:

* ``sd15_random.safetensors``: like ``v1-5-pruned-emaonly.safetensors``: ``model.diffusion_model.*`` (the
  UNet), ``cond_stage_model.transformer.text_model.*`` (CLIP ViT-L/14 text encoder, including the
  ``embeddings.position_ids`` buffer that real files carry) and ``first_stage_model.*`` (the KL-f8 VAE).
  The DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...) and ``model_ema.*`` counters that some
  releases also carry are left out: no loader reads them (ComfyUI and diffusers take the schedule from their
  own configs), and writing them would mean re-deriving Stable Diffusion's schedule here.
* ``controlnet_sd15_random.safetensors``: like ``control_v11p_sd15_openpose.pth``: ``control_model.*``
  (the UNet encoder copy, ``input_hint_block``, ``zero_convs``, ``middle_block_out``).

The key/shape tables are generated from the architecture (levels, residual blocks, attention levels), so
the tests can compare them with diffusers' models built on the meta device without writing 2 GB.

Values are random but chosen so that a forward pass stays finite and O(1) in fp16 through 25 UNet blocks,
12 CLIP layers and the VAE decoder: weights ~ N(0, 1/fan_in) keep each layer's output variance near its
input's, norm gains ~ 1, biases small. Norm gains and biases are *not* exactly 1 and 0 and the ControlNet's
"zero" convolutions are not zero (a trained ControlNet's are not), so a wrong key mapping or an ignored
control changes results visibly. Every tensor is drawn from its own generator seeded by ``(seed, key)``,
hence writing any subset of keys gives exactly the values of the full file.

Files are streamed one tensor at a time into a temporary file next to the target, then renamed, so peak
memory is one tensor (the 49408 x 768 token embedding) and an interrupted run leaves nothing half-written.

CLI: ``python -m lightning.testing.sd15 --out DIR [--force] [--seed N] [--dtype fp16|bf16|fp32]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_output

Shape = tuple[int, ...]

CHECKPOINT_FILENAME = "sd15_random.safetensors"
CONTROLNET_FILENAME = "controlnet_sd15_random.safetensors"

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."

# UNet (ldm ``UNetModel`` as configured by v1-inference.yaml).
MODEL_CHANNELS = 320
CHANNEL_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
#: Levels whose blocks carry a SpatialTransformer (attention_resolutions 4, 2, 1 = the top three levels).
ATTENTION_LEVELS = frozenset({0, 1, 2})
CONTEXT_DIM = 768
TIME_EMBED_DIM = 4 * MODEL_CHANNELS
LATENT_CHANNELS = 4
#: The feed-forward is GEGLU: ``ff.net.0.proj`` emits value and gate halves of a 4x-wide inner layer.
FF_MULT = 4

# ControlNet (ldm ``cldm.ControlNet``): RGB hint, downsampled 8x by this conv stack (stride 2 where the
# width changes) before it joins the latent-resolution features.
HINT_CHANNELS = 3
HINT_BLOCK_CHANNELS = (16, 16, 32, 32, 96, 96, 256)

# CLIP ViT-L/14 text encoder.
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77
CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_MLP_WIDTH = 3072

# VAE (ldm ``AutoencoderKL`` with ``ddconfig`` ch=128, ch_mult 1,2,4,4, attention only in the mid block).
VAE_CHANNELS = 128
VAE_CHANNEL_MULT = (1, 2, 4, 4)
VAE_NUM_RES_BLOCKS = 2
VAE_Z_CHANNELS = 4
IMAGE_CHANNELS = 3

_FLOAT_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_SAFETENSORS_DTYPES = {**_FLOAT_DTYPES, torch.int64: "I64"}
_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------------
# Key/shape tables, built from the architecture rules.


def _linear(out: dict, name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (fan_out, fan_in)
    if bias:
        out[f"{name}.bias"] = (fan_out,)


def _conv(out: dict, name: str, cin: int, cout: int, kernel: int) -> None:
    out[f"{name}.weight"] = (cout, cin, kernel, kernel)
    out[f"{name}.bias"] = (cout,)


def _norm(out: dict, name: str, channels: int) -> None:
    out[f"{name}.weight"] = (channels,)
    out[f"{name}.bias"] = (channels,)


def _unet_resblock(out: dict, name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.in_layers.0", cin)
    _conv(out, f"{name}.in_layers.2", cin, cout, 3)
    _linear(out, f"{name}.emb_layers.1", TIME_EMBED_DIM, cout)
    _norm(out, f"{name}.out_layers.0", cout)
    _conv(out, f"{name}.out_layers.3", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.skip_connection", cin, cout, 1)


def _spatial_transformer(out: dict, name: str, ch: int) -> None:
    # SD1.x projects in and out with 1x1 convolutions (SD2.x and SDXL use linears); ComfyUI reads the
    # weight's rank to tell them apart, so these must stay 4-D.
    _norm(out, f"{name}.norm", ch)
    _conv(out, f"{name}.proj_in", ch, ch, 1)
    block = f"{name}.transformer_blocks.0"
    for attn, kv_width in (("attn1", ch), ("attn2", CONTEXT_DIM)):
        _linear(out, f"{block}.{attn}.to_q", ch, ch, bias=False)
        _linear(out, f"{block}.{attn}.to_k", kv_width, ch, bias=False)
        _linear(out, f"{block}.{attn}.to_v", kv_width, ch, bias=False)
        _linear(out, f"{block}.{attn}.to_out.0", ch, ch)
    _linear(out, f"{block}.ff.net.0.proj", ch, 2 * FF_MULT * ch)
    _linear(out, f"{block}.ff.net.2", FF_MULT * ch, ch)
    for i in (1, 2, 3):
        _norm(out, f"{block}.norm{i}", ch)
    _conv(out, f"{name}.proj_out", ch, ch, 1)


def _unet_encoder(out: dict) -> list[int]:
    """time embedding, input blocks and middle block; returns the channels of each skip connection."""
    _linear(out, "time_embed.0", MODEL_CHANNELS, TIME_EMBED_DIM)
    _linear(out, "time_embed.2", TIME_EMBED_DIM, TIME_EMBED_DIM)
    _conv(out, "input_blocks.0.0", LATENT_CHANNELS, MODEL_CHANNELS, 3)
    skips = [MODEL_CHANNELS]
    ch = MODEL_CHANNELS
    block = 1
    last_level = len(CHANNEL_MULT) - 1
    for level, mult in enumerate(CHANNEL_MULT):
        for _ in range(NUM_RES_BLOCKS):
            _unet_resblock(out, f"input_blocks.{block}.0", ch, mult * MODEL_CHANNELS)
            ch = mult * MODEL_CHANNELS
            if level in ATTENTION_LEVELS:
                _spatial_transformer(out, f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level != last_level:
            _conv(out, f"input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    _unet_resblock(out, "middle_block.0", ch, ch)
    _spatial_transformer(out, "middle_block.1", ch)
    _unet_resblock(out, "middle_block.2", ch, ch)
    return skips


def sd15_unet_shapes() -> dict[str, Shape]:
    """The SD1.5 UNet's keys (without ``model.diffusion_model.``) and shapes: 686 tensors, 859,520,964 values."""
    out: dict[str, Shape] = {}
    skips = _unet_encoder(out)
    ch = skips[-1]
    block = 0
    for level in reversed(range(len(CHANNEL_MULT))):
        width = CHANNEL_MULT[level] * MODEL_CHANNELS
        for i in range(NUM_RES_BLOCKS + 1):
            name = f"output_blocks.{block}"
            _unet_resblock(out, f"{name}.0", ch + skips.pop(), width)
            ch = width
            layer = 1
            if level in ATTENTION_LEVELS:
                _spatial_transformer(out, f"{name}.1", ch)
                layer = 2
            if level != 0 and i == NUM_RES_BLOCKS:
                _conv(out, f"{name}.{layer}.conv", ch, ch, 3)
            block += 1
    _norm(out, "out.0", MODEL_CHANNELS)
    _conv(out, "out.2", MODEL_CHANNELS, LATENT_CHANNELS, 3)
    return out


def sd15_clip_shapes() -> dict[str, Shape]:
    """CLIP ViT-L/14 text encoder keys (without ``cond_stage_model.transformer.text_model.``): 197 tensors.

    Includes the int64 ``embeddings.position_ids`` buffer [1, 77] that real SD1.5 files carry; ComfyUI
    ignores it silently (it only logs at debug level) and diffusers drops it.
    """
    out: dict[str, Shape] = {
        "embeddings.token_embedding.weight": (CLIP_VOCAB, CLIP_WIDTH),
        "embeddings.position_embedding.weight": (CLIP_POSITIONS, CLIP_WIDTH),
        "embeddings.position_ids": (1, CLIP_POSITIONS),
    }
    for i in range(CLIP_LAYERS):
        layer = f"encoder.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            _linear(out, f"{layer}.self_attn.{proj}_proj", CLIP_WIDTH, CLIP_WIDTH)
        _norm(out, f"{layer}.layer_norm1", CLIP_WIDTH)
        _linear(out, f"{layer}.mlp.fc1", CLIP_WIDTH, CLIP_MLP_WIDTH)
        _linear(out, f"{layer}.mlp.fc2", CLIP_MLP_WIDTH, CLIP_WIDTH)
        _norm(out, f"{layer}.layer_norm2", CLIP_WIDTH)
    _norm(out, "final_layer_norm", CLIP_WIDTH)
    return out


def _vae_resnet(out: dict, name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout, 3)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.nin_shortcut", cin, cout, 1)


def _vae_mid(out: dict, name: str, ch: int) -> None:
    _vae_resnet(out, f"{name}.block_1", ch, ch)
    # ldm's VAE attention uses 1x1 convolutions (diffusers converts them to linears).
    _norm(out, f"{name}.attn_1.norm", ch)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.attn_1.{proj}", ch, ch, 1)
    _vae_resnet(out, f"{name}.block_2", ch, ch)


def sd15_vae_shapes() -> dict[str, Shape]:
    """KL-f8 VAE keys (without ``first_stage_model.``) and shapes: 248 tensors, 83,653,863 values."""
    out: dict[str, Shape] = {}
    last_level = len(VAE_CHANNEL_MULT) - 1

    _conv(out, "encoder.conv_in", IMAGE_CHANNELS, VAE_CHANNELS, 3)
    ch = VAE_CHANNELS
    for level, mult in enumerate(VAE_CHANNEL_MULT):
        for j in range(VAE_NUM_RES_BLOCKS):
            _vae_resnet(out, f"encoder.down.{level}.block.{j}", ch, mult * VAE_CHANNELS)
            ch = mult * VAE_CHANNELS
        if level != last_level:
            _conv(out, f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    _vae_mid(out, "encoder.mid", ch)
    _norm(out, "encoder.norm_out", ch)
    # The encoder emits mean and log-variance of the latent, hence twice the latent channels.
    _conv(out, "encoder.conv_out", ch, 2 * VAE_Z_CHANNELS, 3)

    _conv(out, "quant_conv", 2 * VAE_Z_CHANNELS, 2 * VAE_Z_CHANNELS, 1)
    _conv(out, "post_quant_conv", VAE_Z_CHANNELS, VAE_Z_CHANNELS, 1)

    ch = VAE_CHANNEL_MULT[-1] * VAE_CHANNELS
    _conv(out, "decoder.conv_in", VAE_Z_CHANNELS, ch, 3)
    _vae_mid(out, "decoder.mid", ch)
    # ldm names decoder levels by resolution index, so ``up.3`` is the first (lowest-resolution) one run.
    for level in reversed(range(len(VAE_CHANNEL_MULT))):
        for j in range(VAE_NUM_RES_BLOCKS + 1):
            _vae_resnet(out, f"decoder.up.{level}.block.{j}", ch, VAE_CHANNEL_MULT[level] * VAE_CHANNELS)
            ch = VAE_CHANNEL_MULT[level] * VAE_CHANNELS
        if level != 0:
            _conv(out, f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    _norm(out, "decoder.norm_out", ch)
    _conv(out, "decoder.conv_out", ch, IMAGE_CHANNELS, 3)
    return out


def _prefixed(prefix: str, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    return {prefix + k: v for k, v in shapes.items()}


def sd15_checkpoint_shapes() -> dict[str, Shape]:
    """Every key and shape of an SD1.5 single-file checkpoint (UNet + CLIP text encoder + VAE): 1131 tensors."""
    return {
        **_prefixed(UNET_PREFIX, sd15_unet_shapes()),
        **_prefixed(CLIP_PREFIX, sd15_clip_shapes()),
        **_prefixed(VAE_PREFIX, sd15_vae_shapes()),
    }


def sd15_controlnet_shapes() -> dict[str, Shape]:
    """Every key and shape of an SD1.5 ControlNet in ldm layout (``control_model.*``): 340 tensors."""
    out: dict[str, Shape] = {}
    skips = _unet_encoder(out)
    # One zero conv per input block, sized like the skip connection it feeds.
    for i, ch in enumerate(skips):
        _conv(out, f"zero_convs.{i}.0", ch, ch, 1)
    cin = HINT_CHANNELS
    # ldm's hint block is a Sequential of conv/SiLU pairs, so the convolutions sit at even indices.
    for i, cout in enumerate((*HINT_BLOCK_CHANNELS, MODEL_CHANNELS)):
        _conv(out, f"input_hint_block.{2 * i}", cin, cout, 3)
        cin = cout
    _conv(out, "middle_block_out.0", skips[-1], skips[-1], 1)
    return _prefixed(CONTROLNET_PREFIX, out)


# --------------------------------------------------------------------------------------------------------
# Values.


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_tensor(key: str, shape: Shape, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The value stored under ``key``: depends only on ``(seed, key, shape)``, never on the other keys."""
    if key.endswith("position_ids"):
        # An index buffer, not a weight: real files hold 0..76, and a random one would scramble positions.
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    _check_float_dtype(dtype)
    noise = torch.randn(shape, generator=_key_generator(seed, key), dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if "embedding" in key:
        # Token/position tables feed a LayerNorm, so their scale is free; CLIP's own init uses 0.02.
        values = noise * 0.02
    elif leaf == "bias":
        values = noise * 0.02
    elif len(shape) == 1:
        # Every 1-D weight here is a GroupNorm/LayerNorm gain.
        values = 1.0 + noise * 0.02
    else:
        fan_in = math.prod(shape[1:])
        values = noise / math.sqrt(fan_in)
    return values.to(dtype)


def _check_float_dtype(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        names = ", ".join(str(d) for d in _FLOAT_DTYPES)
        raise ValueError(f"dtype {dtype} is not supported for random weights; use one of {names}")


def _stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if key.endswith("position_ids") else dtype


# --------------------------------------------------------------------------------------------------------
# Streaming safetensors writer (format: 8-byte little-endian header length, JSON header, raw data).


def _header_bytes(shapes: Mapping[str, Shape], dtype: torch.dtype) -> tuple[bytes, list[str]]:
    order = sorted(shapes)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        stored = _stored_dtype(key, dtype)
        nbytes = math.prod(shapes[key]) * stored.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[stored],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The reference writer pads the header with spaces so that tensor data starts 8-byte aligned.
    raw += b" " * (-len(raw) % 8)
    return raw, order


def safetensors_size(shapes: Mapping[str, Shape], *, dtype: torch.dtype = torch.float16) -> int:
    """Exact size in bytes of the file ``write_random_weights`` makes for these shapes and dtype."""
    _check_float_dtype(dtype)
    header, _ = _header_bytes(shapes, dtype)
    data = sum(math.prod(s) * _stored_dtype(k, dtype).itemsize for k, s in shapes.items())
    return 8 + len(header) + data


def write_random_weights(path: str | os.PathLike, shapes: Mapping[str, Shape], *, seed: int = 0,
                         dtype: torch.dtype = torch.float16) -> Path:
    """Write ``random_tensor`` values for ``shapes`` to a safetensors file, one tensor in memory at a time."""
    _check_float_dtype(dtype)
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; writing it on a big-endian machine is not supported")
    for key, shape in shapes.items():
        if not shape or any(int(d) <= 0 for d in shape):
            raise ValueError(f"shape {shape!r} for key {key!r} must have at least one dimension, all positive")
    path = Path(path)
    header, order = _header_bytes(shapes, dtype)

    def write(f) -> None:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for key in order:
            tensor = random_tensor(key, shapes[key], seed=seed, dtype=dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy())

    _atomic_write(path, write)
    return path


def _atomic_write(path: Path, write) -> None:
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_sd15_checkpoint(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size random SD1.5 single-file checkpoint (about 2.1 GB in fp16) that ComfyUI detects as SD15."""
    return write_random_weights(path, sd15_checkpoint_shapes(), seed=seed, dtype=dtype)


def write_sd15_controlnet(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random SD1.5 ControlNet (about 720 MB in fp16) that ComfyUI's ControlNetLoader loads."""
    return write_random_weights(path, sd15_controlnet_shapes(), seed=seed, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning.testing.sd15",
        description=f"Write random-weight {CHECKPOINT_FILENAME} and {CONTROLNET_FILENAME} for integration tests.")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the two files into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPE_NAMES), default="fp16")
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist with the right size")
    args = parser.parse_args(argv)
    dtype = _DTYPE_NAMES[args.dtype]
    for name, shapes in ((CHECKPOINT_FILENAME, sd15_checkpoint_shapes()),
                         (CONTROLNET_FILENAME, sd15_controlnet_shapes())):
        target = args.out / name
        size = safetensors_size(shapes, dtype=dtype)
        if not args.force and target.is_file() and target.stat().st_size == size:
            print(f"{target}: already there ({size} bytes); --force rewrites it")
            continue
        write_random_weights(target, shapes, seed=args.seed, dtype=dtype)
        print(f"{target}: wrote {len(shapes)} tensors, {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
