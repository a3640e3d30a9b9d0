"""Random-weight motion-module and motion-LoRA files in the exact layouts of the real ones.

Every release format gets a writer (v1, v2, v3, AnimateLCM, Lightning ``_comfyui`` and ``_diffusers``,
original motion LoRA), at tiny widths for unit tests or at full SD1.5 widths for integration tests that
point a real ComfyUI at them. The "wrong files" the error tests need (SDXL and HotshotXL modules, an SD
LoRA, an SD checkpoint, a ControlNet, truncated, NaN, unsafe pickle…) are written here too.

Weights are seeded per tensor (seed and key name), so a tensor has the same values whichever file or
subset it is written in: the Lightning ``_comfyui`` and ``_diffusers`` fixtures hold the same model, as the
release files do. Files appear atomically (temporary file, then rename).

CLI: ``python -m lightning.testing.motion --out DIR [--full] [--only NAME ...] [--seed N] [--no-wrong]``.
Release-shaped files go to ``DIR``, tiny wrong/damaged ones to ``DIR/wrong`` (ComfyUI lists subfolders of a
model folder too; ``--no-wrong`` keeps it clean). ``--full`` writes about 5.3 GB: the ``.ckpt`` files are fp16
there (the real ones are fp32), which loads the same way at half the disk.
"""

from __future__ import annotations

import argparse
import fractions
import math
import os
import zlib
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoints import DIFFUSERS_PE_SUFFIX, ORIGINAL_PE_SUFFIXES, diffusers_key, module_prefixes, original_layout
from ..files import atomic_output
from ..motion_module import sinusoidal_positions

TINY_CHANNELS = (32, 32, 64, 64)
FULL_CHANNELS = (320, 640, 1280, 1280)
SDXL_CHANNELS_TINY = (32, 64, 64)
VERSIONS = {  # version -> (has_mid, pe_length or None for AnimateLCM's missing tables)
    "v1": (False, 24),
    "v2": (True, 32),
    "v3": (False, 32),
    "animatelcm": (True, None),
}
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def random_tensor(key: str, shape, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A seeded tensor scaled like a trained layer: weights ~ 1/sqrt(fan_in), norm gains near 1, small biases."""
    if key.endswith(".pe"):
        raise ValueError("positional tables are not random; use sinusoidal_positions")
    values = torch.randn(tuple(shape), generator=_generator(seed, key))
    if len(shape) >= 2:
        values /= math.sqrt(shape[-1])
    elif "norm" in key and key.endswith("weight"):
        values = 1.0 + 0.1 * values
    else:
        values *= 0.05
    return values.to(dtype)


def motion_state_dict(*, version: str = "v2", layout: str = "original", channels=TINY_CHANNELS, seed: int = 0,
                      dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A full state dict of one generation in ``"original"`` or ``"diffusers"`` keys, random weights."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    has_mid, pe_length = VERSIONS[version]
    if layout == "diffusers" and pe_length is None:
        raise ValueError("AnimateLCM files exist only in the original layout")
    tensors = {}
    for key, shape in original_layout(channels, has_mid, pe_length).items():
        if key.endswith(ORIGINAL_PE_SUFFIXES):
            tensors[key] = sinusoidal_positions(shape[1], shape[2]).to(dtype)
        else:
            tensors[key] = random_tensor(key, shape, seed=seed, dtype=dtype)
    if layout == "original":
        return tensors
    if layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    converted = {diffusers_key(k): v for k, v in tensors.items() if not k.endswith(ORIGINAL_PE_SUFFIXES)}
    for prefix, _ in module_prefixes(len(channels), has_mid):
        converted[f"{prefix}.{DIFFUSERS_PE_SUFFIX}"] = tensors[f"{prefix}.{ORIGINAL_PE_SUFFIXES[0]}"].clone()
    return converted


def motion_lora_state_dict(*, channels=TINY_CHANNELS, has_mid: bool = True, rank: int = 4, seed: int = 0,
                           dtype=torch.float16) -> dict[str, torch.Tensor]:
    """An original-format motion LoRA (``…attention_blocks.N.processor.to_q_lora.down.weight`` …)."""
    tensors = {}
    for prefix, level in module_prefixes(len(channels), has_mid):
        c = channels[level]
        for block in range(2):
            base = f"{prefix}.temporal_transformer.transformer_blocks.0.attention_blocks.{block}.processor"
            for projection in LORA_PROJECTIONS:
                down, up = f"{base}.{projection}_lora.down.weight", f"{base}.{projection}_lora.up.weight"
                tensors[down] = random_tensor(down, (rank, c), seed=seed, dtype=dtype)
                tensors[up] = random_tensor(up, (c, rank), seed=seed, dtype=dtype)
    return tensors


# --- writing --------------------------------------------------------------------------------------------


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere, in place: a fresh motion module is an identity (zero proj_out), which
    would let a wrong implementation pass a parity test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module

def save_tensors(tensors: Mapping[str, object], path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a dict as ``.safetensors`` or (any other suffix) a torch pickle, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_output(path) as temporary:
        if path.suffix in (".safetensors", ".sft"):
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(temporary), metadata=metadata)
        else:
            torch.save(dict(tensors), os.fspath(temporary))
    return path


def write_motion_module(path, *, version: str = "v2", layout: str = "original", channels=TINY_CHANNELS,
                        seed: int = 0, dtype=torch.float16) -> Path:
    """One random motion-module file; the suffix picks safetensors or torch pickle (``.ckpt``)."""
    return save_tensors(motion_state_dict(version=version, layout=layout, channels=channels, seed=seed,
                                          dtype=dtype), path)


def write_motion_lora(path, *, channels=TINY_CHANNELS, has_mid: bool = True, rank: int = 4, seed: int = 0,
                      dtype=torch.float16) -> Path:
    return save_tensors(motion_lora_state_dict(channels=channels, has_mid=has_mid, rank=rank, seed=seed,
                                               dtype=dtype), path)


# --- wrong files ------------------------------------------------------------------------------------------

def _small(key: str, shape, seed: int = 0) -> torch.Tensor:
    return random_tensor(key, shape, seed=seed, dtype=torch.float16)


def wrong_state_dict(kind: str, *, seed: int = 0) -> dict[str, object]:
    """Small state dicts with the key names of things users mistake for motion modules."""
    if kind == "sdxl_motion_module":  # AnimateDiff-SDXL: three down levels
        return _three_level_module(seed)
    if kind == "hotshotxl":
        keys = {"down_blocks.0.temporal_attentions.0.pos_encoder.positional_encoding": (1, 24, 32),
                "down_blocks.0.temporal_attentions.0.transformer_blocks.0.attention_blocks.0.to_q.weight": (32, 32),
                "down_blocks.0.temporal_attentions.0.proj_in.weight": (32, 32)}
        return {k: _small(k, s, seed) if not k.endswith("encoding") else sinusoidal_positions(24, 32)
                for k, s in keys.items()}
    if kind == "sd_lora":
        keys = {}
        for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
            keys[f"{name}.lora_down.weight"] = (4, 32)
            keys[f"{name}.lora_up.weight"] = (32, 4)
        tensors = {k: _small(k, s, seed) for k, s in keys.items()}
        tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(4.0)
        return tensors
    if kind == "sd_checkpoint":
        keys = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
                "model.diffusion_model.input_blocks.0.0.bias": (32,),
                "first_stage_model.decoder.conv_in.weight": (32, 4, 3, 3),
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (16, 32)}
        return {k: _small(k, s, seed) for k, s in keys.items()}
    if kind == "controlnet":
        keys = {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                "control_model.zero_convs.0.0.weight": (32, 32, 1, 1),
                "control_model.input_blocks.0.0.weight": (32, 4, 3, 3)}
        return {k: _small(k, s, seed) for k, s in keys.items()}
    if kind == "motion_lora":
        return motion_lora_state_dict(seed=seed)
    raise ValueError(f"unknown wrong-file kind {kind!r}; choose from {WRONG_KINDS}")


def _three_level_module(seed: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, shape in original_layout(SDXL_CHANNELS_TINY, False, 32).items():
        tensors[key] = (sinusoidal_positions(shape[1], shape[2]).half() if key.endswith(".pe")
                        else _small(key, shape, seed))
    return tensors


WRONG_KINDS = ("sdxl_motion_module", "hotshotxl", "sd_lora", "sd_checkpoint", "controlnet", "motion_lora")


def write_wrong_file(path, kind: str, *, seed: int = 0) -> Path:
    """A file that is not a usable motion module: any of ``WRONG_KINDS``, or a damaged module:

    ``"truncated"`` (a valid file cut short), ``"corrupt_header"`` (safetensors header overwritten),
    ``"nan"`` / ``"inf"`` (one weight poisoned), ``"missing_keys"``, ``"unexpected_keys"``,
    ``"wrong_shape"``, ``"unsafe_pickle"`` (a .ckpt holding a Python object ``weights_only`` refuses).
    """
    path = Path(path)
    if kind in WRONG_KINDS:
        return save_tensors(wrong_state_dict(kind, seed=seed), path)
    tensors = motion_state_dict(version="v2", seed=seed)
    first = sorted(k for k in tensors if k.endswith("proj_in.weight"))[0]
    if kind in ("nan", "inf"):
        poisoned = tensors[first].clone()
        poisoned[0, 0] = float("nan") if kind == "nan" else float("inf")
        tensors[first] = poisoned
    elif kind == "missing_keys":
        for key in sorted(tensors)[:3]:
            del tensors[key]
    elif kind == "unexpected_keys":
        tensors["down_blocks.0.motion_modules.0.temporal_transformer.extra.weight"] = torch.zeros(2, dtype=torch.float16)
        tensors["down_blocks.0.motion_modules.7.temporal_transformer.norm.weight"] = torch.ones(32, dtype=torch.float16)
    elif kind == "wrong_shape":
        tensors[first] = tensors[first][:, :-8].contiguous()
    elif kind == "unsafe_pickle":
        if path.suffix in (".safetensors", ".sft"):
            raise ValueError("an unsafe pickle needs a .ckpt/.pt path")
        tensors = dict(tensors, extra=fractions.Fraction(1, 3))
        return save_tensors(tensors, path)
    elif kind in ("truncated", "corrupt_header"):
        data = bytearray(_file_bytes(tensors, path.suffix))
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:
            data[8:40] = b"\x00" * 32 if path.suffix in (".safetensors", ".sft") else b"\xff" * 32
        return _write_bytes(path, bytes(data))
    else:
        raise ValueError(f"unknown wrong-file kind {kind!r}")
    return save_tensors(tensors, path)


def _file_bytes(tensors, suffix: str) -> bytes:
    import io

    from safetensors.torch import save

    if suffix in (".safetensors", ".sft"):
        return save(tensors)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)
    return path


# --- the whole set ------------------------------------------------------------------------------------------

def fixture_plan(*, full: bool = False) -> dict[str, dict]:
    """File name -> writer arguments for the release-shaped set (names as users have them)."""
    channels = FULL_CHANNELS if full else TINY_CHANNELS
    # The real .ckpt files are fp32; at full size fp16 halves their disk use and loads the same way.
    ckpt_dtype = torch.float16 if full else torch.float32
    return {
        "animatediff_lightning_4step_comfyui.safetensors": dict(version="v2", layout="original", channels=channels),
        "animatediff_lightning_4step_diffusers.safetensors": dict(version="v2", layout="diffusers", channels=channels),
        "mm_sd_v15_v2.ckpt": dict(version="v2", channels=channels, dtype=ckpt_dtype),
        "mm_sd_v14.ckpt": dict(version="v1", channels=channels, dtype=ckpt_dtype),
        "v3_sd15_mm.ckpt": dict(version="v3", channels=channels, dtype=ckpt_dtype),
        "AnimateLCM_sd15_t2v.ckpt": dict(version="animatelcm", channels=channels, dtype=ckpt_dtype),
        "v2_lora_ZoomIn.ckpt": dict(lora=True, channels=channels, rank=64 if full else 4),
    }


def write_fixture_set(out, *, full: bool = False, seed: int = 0, only=None, wrong: bool = True) -> dict[str, Path]:
    """Write the release-shaped set into ``out`` (and tiny wrong files into ``out/wrong``); returns name -> path."""
    out = Path(out)
    written = {}
    for name, spec in fixture_plan(full=full).items():
        if only and name not in only:
            continue
        spec = dict(spec)
        if spec.pop("lora", False):
            written[name] = write_motion_lora(out / name, seed=seed, **spec)
        else:
            written[name] = write_motion_module(out / name, seed=seed, **spec)
    if wrong:
        for kind in WRONG_KINDS:
            name = f"wrong/{kind}.safetensors"
            if not only or name in only:
                written[name] = write_wrong_file(out / name, kind, seed=seed)
        for kind, suffix in (("truncated", ".safetensors"), ("corrupt_header", ".safetensors"), ("nan", ".safetensors"),
                             ("unsafe_pickle", ".ckpt"), ("truncated", ".ckpt")):
            name = f"wrong/{kind}{suffix}"
            if not only or name in only:
                written[name] = write_wrong_file(out / name, kind, seed=seed)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write into (created if missing)")
    parser.add_argument("--full", action="store_true", help="full SD1.5 widths (about 5.3 GB) instead of tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", help="write only this file name (repeatable)")
    parser.add_argument("--no-wrong", action="store_true", help="skip the wrong/damaged files")
    args = parser.parse_args(argv)
    for name, path in write_fixture_set(args.out, full=args.full, seed=args.seed, only=args.only,
                                        wrong=not args.no_wrong).items():
        print(f"{path.stat().st_size:>14,}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
