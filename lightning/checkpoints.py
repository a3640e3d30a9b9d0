"""Motion-module files: read, recognise, validate, load, save (key layouts and sizes: lightning/REFERENCE.md
§1).

Two key layouts exist for the same weights:

* **original** (guoyww/AnimateDiff, ComfyUI / AnimateDiff-Evolved, Lightning ``*_comfyui.safetensors``):
  ``down_blocks.0.motion_modules.0.temporal_transformer.…``, 28 tensors per module including two
  positional tables ``attention_blocks.{0,1}.pos_encoder.pe`` (AnimateLCM stores none).
* **diffusers** (``MotionAdapter``, Lightning ``*_diffusers.safetensors``): ``temporal_transformer.``
  dropped, ``attention_blocks.N`` → ``attnN+1``, ``norms.N`` → ``normN+1``, ``ff_norm`` → ``norm3``, and one
  table ``transformer_blocks.0.pos_embed.pe`` per module (27 tensors).

Generations differ only in shape: v1 = no mid block, table length 24; v2 (and every Lightning file) = mid
block, 32; v3 = no mid block, 32; AnimateLCM = mid block, no tables (its code uses 64). SD1.5 modules have
four down levels; SDXL ones three (the rule AnimateDiff-Evolved uses), which is how we refuse them.

Files are read with safetensors or ``torch.load(weights_only=True)`` only. Anything that is not a usable
SD1.5 motion module raises :class:`~lightning.errors.MotionModuleFileError` naming the file, saying what it
is, and saying what to use instead.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import __version__
from .errors import (PROBLEM_KEYS, PROBLEM_MISSING_FILE, PROBLEM_NON_FINITE, PROBLEM_UNREADABLE,
                     PROBLEM_WRONG_KIND, InvalidInputError, ModelFileError, MotionModuleFileError,
                     describe_source)
from .files import atomic_output
from .motion_module import (ANIMATELCM_PE_LENGTH, MotionModuleInfo, MotionModuleSet, sinusoidal_positions,
                            version_from_layout)

log = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_EXTENSIONS = SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("original", "diffusers")
SD15_LEVELS = 4
SDXL_LEVELS = 3
HEADS = 8
NORM_GROUPS = 32
METADATA_PREFIX = "adlightning."
#: Metadata key of the Lightning step count in files we save. Callers that know the count (the training loop)
#: may pass it as plain ``lightning_steps`` in ``save_motion_module(metadata=...)``; both keys are read.
STEPS_KEY = METADATA_PREFIX + "lightning_steps"
STEPS_KEYS = (STEPS_KEY, "lightning_steps")
#: The step count in a release file name (``animatediff_lightning_4step_comfyui``), case-insensitive. Written
#: so that JavaScript's RegExp reads it the same way: the frontend gets this very string with the node schema.
STEP_PATTERN = r"lightning[_-]?(\d+)[_-]?steps?"
#: Where a step count came from, as :func:`lightning_steps_origin` reports it.
FROM_METADATA = "metadata"
FROM_FILE_NAME = "file name"
SUGGESTION = ("an SD1.5 motion module such as animatediff_lightning_4step_comfyui.safetensors, "
              "mm_sd_v15_v2.ckpt or v3_sd15_mm.ckpt")

# --- the layouts ---------------------------------------------------------------------------------------

_BLOCK = "temporal_transformer.transformer_blocks.0."
# Original per-module suffix -> shape as a function of the width C (positional tables handled apart).
_ORIGINAL_SHAPES = {
    "temporal_transformer.norm.weight": lambda c: (c,),
    "temporal_transformer.norm.bias": lambda c: (c,),
    "temporal_transformer.proj_in.weight": lambda c: (c, c),
    "temporal_transformer.proj_in.bias": lambda c: (c,),
    **{f"{_BLOCK}attention_blocks.{i}.{name}.weight": (lambda c: (c, c))
       for i in range(2) for name in ("to_q", "to_k", "to_v", "to_out.0")},
    **{f"{_BLOCK}attention_blocks.{i}.to_out.0.bias": (lambda c: (c,)) for i in range(2)},
    **{f"{_BLOCK}norms.{i}.{p}": (lambda c: (c,)) for i in range(2) for p in ("weight", "bias")},
    f"{_BLOCK}ff.net.0.proj.weight": lambda c: (8 * c, c),
    f"{_BLOCK}ff.net.0.proj.bias": lambda c: (8 * c,),
    f"{_BLOCK}ff.net.2.weight": lambda c: (c, 4 * c),
    f"{_BLOCK}ff.net.2.bias": lambda c: (c,),
    f"{_BLOCK}ff_norm.weight": lambda c: (c,),
    f"{_BLOCK}ff_norm.bias": lambda c: (c,),
    "temporal_transformer.proj_out.weight": lambda c: (c, c),
    "temporal_transformer.proj_out.bias": lambda c: (c,),
}
ORIGINAL_PE_SUFFIXES = tuple(f"{_BLOCK}attention_blocks.{i}.pos_encoder.pe" for i in range(2))
DIFFUSERS_PE_SUFFIX = "transformer_blocks.0.pos_embed.pe"


def _to_diffusers_suffix(suffix: str) -> str:
    suffix = suffix.removeprefix("temporal_transformer.")
    for old, new in (("attention_blocks.0.", "attn1."), ("attention_blocks.1.", "attn2."),
                     ("norms.0.", "norm1."), ("norms.1.", "norm2."), ("ff_norm.", "norm3.")):
        suffix = suffix.replace(old, new)
    return suffix


_DIFFUSERS_FROM_ORIGINAL = {s: _to_diffusers_suffix(s) for s in _ORIGINAL_SHAPES}
_ORIGINAL_FROM_DIFFUSERS = {d: o for o, d in _DIFFUSERS_FROM_ORIGINAL.items()}


def _split_module_key(key: str) -> tuple[str, str]:
    match = _PREFIX.match(key)
    return (match.group(1) + ".", match.group(7)) if match else ("", key)


def diffusers_key(original: str) -> str:
    """The diffusers name of an original-layout weight key (full key or per-module suffix).

    Positional tables have no one-to-one name (two original tables, one diffusers table); they raise KeyError.
    """
    prefix, suffix = _split_module_key(original)
    return prefix + _DIFFUSERS_FROM_ORIGINAL[suffix]


def original_key(diffusers: str) -> str:
    """The original-layout name of a diffusers weight key (full key or per-module suffix); KeyError for tables."""
    prefix, suffix = _split_module_key(diffusers)
    return prefix + _ORIGINAL_FROM_DIFFUSERS[suffix]

_PREFIX = re.compile(r"^(down_blocks\.(\d+)\.motion_modules\.(\d+)|mid_block\.motion_modules\.(\d+)"
                     r"|up_blocks\.(\d+)\.motion_modules\.(\d+))\.(.+)$")


def module_prefixes(levels: int, has_mid: bool) -> list[tuple[str, int]]:
    """``(key prefix, down-level index giving its width)`` for every module, in UNet order."""
    prefixes = [(f"down_blocks.{i}.motion_modules.{j}", i) for i in range(levels)
                for j in range(MotionModuleSet.LAYERS_PER_DOWN_LEVEL)]
    if has_mid:
        prefixes.append(("mid_block.motion_modules.0", levels - 1))
    prefixes += [(f"up_blocks.{i}.motion_modules.{j}", levels - 1 - i) for i in range(levels)
                 for j in range(MotionModuleSet.LAYERS_PER_UP_LEVEL)]
    return prefixes


def original_layout(channels: Sequence[int], has_mid: bool, pe_length: int | None) -> dict[str, tuple]:
    """Every key and shape of an original-layout file (``pe_length`` None: no tables, as AnimateLCM)."""
    layout = {}
    for prefix, level in module_prefixes(len(channels), has_mid):
        c = channels[level]
        layout.update({f"{prefix}.{s}": shape(c) for s, shape in _ORIGINAL_SHAPES.items()})
        if pe_length is not None:
            layout.update({f"{prefix}.{s}": (1, pe_length, c) for s in ORIGINAL_PE_SUFFIXES})
    return layout


def diffusers_layout(channels: Sequence[int], has_mid: bool, pe_length: int) -> dict[str, tuple]:
    """Every key and shape of a diffusers ``MotionAdapter`` state dict."""
    layout = {}
    for prefix, level in module_prefixes(len(channels), has_mid):
        c = channels[level]
        layout.update({f"{prefix}.{_DIFFUSERS_FROM_ORIGINAL[s]}": shape(c) for s, shape in _ORIGINAL_SHAPES.items()})
        layout[f"{prefix}.{DIFFUSERS_PE_SUFFIX}"] = (1, pe_length, c)
    return layout


# --- reading files --------------------------------------------------------------------------------------

def read_state_dict(path, *, error_type: type[ModelFileError] = MotionModuleFileError,
                    role: str = "model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` file, and its metadata.

    Pickles are opened only with ``torch.load(weights_only=True)``. Checkpoints that wrap their tensors
    (``{"state_dict": {...}}``) are unwrapped; non-tensor entries (``global_step``…) are ignored. Every
    failure becomes ``error_type`` with ``problem`` set, never a library-specific exception.
    """
    path = Path(path)
    where = describe_source(path)
    if not path.is_file():
        raise error_type(f"{where} does not exist (or is not a file); check the file name and folder",
                         path=path, problem=PROBLEM_MISSING_FILE)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise error_type(f"{where} has the extension {suffix or '(none)'!r}; a {role} must be one of "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}", path=path, problem=PROBLEM_UNREADABLE)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise error_type(f"{where} is empty or truncated ({path.stat().st_size} bytes); download it again",
                         path=path, problem=PROBLEM_UNREADABLE)
    if head[8:9] == b"{":
        tensors, metadata = _read_safetensors(path, error_type)
    elif head[:2] == b"PK" or head[:1] == b"\x80":
        tensors, metadata = _read_torch(path, error_type), {}
    else:
        raise error_type(f"{where} is neither a safetensors file nor a PyTorch checkpoint (corrupt or a "
                         f"different format); download it again", path=path, problem=PROBLEM_UNREADABLE)
    if not tensors:
        raise error_type(f"{where} contains no tensors; it is not a {role}", path=path,
                         problem=PROBLEM_UNREADABLE)
    return tensors, metadata


def _read_safetensors(path: Path, error_type) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for broken headers and short data
        raise error_type(f"{describe_source(path)} is a truncated or corrupt safetensors file ({exc}); "
                         "download it again", path=path, problem=PROBLEM_UNREADABLE) from exc
    return tensors, metadata


def _read_torch(path: Path, error_type) -> dict[str, torch.Tensor]:
    import pickle

    where = describe_source(path)
    try:
        loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise error_type(f"{where} contains Python objects besides tensors, which we refuse to unpickle "
                             "for safety; convert it to .safetensors with a tool you trust, or use the "
                             "official release file", path=path, problem=PROBLEM_UNREADABLE) from exc
        raise error_type(f"{where} is a corrupt PyTorch checkpoint ({exc}); download it again",
                         path=path, problem=PROBLEM_UNREADABLE) from exc
    except Exception as exc:  # zip, pickle and storage errors come in many types
        raise error_type(f"{where} is a truncated or corrupt PyTorch checkpoint ({type(exc).__name__}: "
                         f"{exc}); download it again", path=path, problem=PROBLEM_UNREADABLE) from exc
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping):
        raise error_type(f"{where} holds a {type(loaded).__name__}, not a dictionary of tensors",
                         path=path, problem=PROBLEM_UNREADABLE)
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


# --- recognising what a file is ---------------------------------------------------------------------------

def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(d) for d in value)


def _wrong_kind(path, kind: str, what: str) -> MotionModuleFileError:
    return MotionModuleFileError(f"{describe_source(path)} {what}", path=path, problem=PROBLEM_WRONG_KIND,
                                 kind=kind)


def classify_foreign(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(kind, explanation)`` when the keys belong to a model that is not an SD1.5 motion module.

    Shared with the motion-LoRA loader. Returns None when the keys look like a motion module.
    """
    keys = list(keys)
    has = lambda pred: any(pred(k) for k in keys)  # noqa: E731
    motion = has(lambda k: ".motion_modules." in k or k.startswith("mid_block.motion_modules."))
    lora = has(lambda k: "lora" in k.lower())
    if has(lambda k: k.startswith("control_model.") or "input_hint_block" in k or "zero_convs" in k
           or "controlnet_cond_embedding" in k or k.startswith("controlnet_")):
        if motion:
            return "controlnet", ("is a SparseCtrl ControlNet (it has its own motion modules); load it with a "
                                  "SparseCtrl/ControlNet loader, not as a motion module")
        return "controlnet", "is a ControlNet; load it with ComfyUI's Load ControlNet Model node"
    if has(lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                   "conditioner.embedders."))):
        return "sd_checkpoint", ("is a Stable Diffusion checkpoint (the image model), not a motion module; "
                                 "load it with ComfyUI's Load Checkpoint node")
    if lora and motion:
        return "motion_lora", ("is a motion LoRA; load it with the Load Motion LoRA node, on top of a "
                               "motion module")
    if lora:
        return "sd_lora", ("is a LoRA for the image model (it contains no temporal keys), not a motion "
                           "module; load it with ComfyUI's LoraLoader")
    if has(lambda k: "temporal_attentions." in k or k.endswith("pos_encoder.positional_encoding")):
        return "sdxl_motion_module", ("is an SDXL motion module (AnimateDiff-SDXL / HotshotXL); this pack "
                                      "supports SD1.5 modules")
    if motion:
        return None
    if has(lambda k: k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed."))
           or k.startswith("time_embedding.") or (".attentions." in k and k.startswith("down_blocks."))):
        return "unet", ("is an image UNet, not a motion module; load it with ComfyUI's Load Diffusion Model "
                        "or Load Checkpoint node")
    if has(lambda k: k.startswith(("encoder.conv_in", "decoder.conv_in", "quant_conv", "post_quant_conv"))):
        return "vae", "is a VAE, not a motion module; load it with ComfyUI's Load VAE node"
    if has(lambda k: "text_model." in k):
        return "text_encoder", "is a CLIP text encoder, not a motion module; load it with ComfyUI's Load CLIP node"
    return "unknown", ("has no AnimateDiff motion-module keys (expected keys like "
                       "'down_blocks.0.motion_modules.0.temporal_transformer.norm.weight')")


_C_FROM_SHAPE = {  # suffix kind -> width C recovered from a tensor's shape
    "square": lambda s: s[0] if len(s) == 2 and s[0] == s[1] else None,
    "vector": lambda s: s[0] if len(s) == 1 else None,
    "ff_in": lambda s: s[1] if len(s) == 2 and s[0] == 8 * s[1] else None,
    "ff_in_bias": lambda s: s[0] // 8 if len(s) == 1 and s[0] % 8 == 0 else None,
    "ff_out": lambda s: s[0] if len(s) == 2 and s[1] == 4 * s[0] else None,
    "pe": lambda s: s[2] if len(s) == 3 and s[0] == 1 else None,
}


def _width_kind(original_suffix: str) -> str:
    if original_suffix.endswith(".pe"):
        return "pe"
    if original_suffix.endswith("ff.net.0.proj.weight"):
        return "ff_in"
    if original_suffix.endswith("ff.net.0.proj.bias"):
        return "ff_in_bias"
    if original_suffix.endswith("ff.net.2.weight"):
        return "ff_out"
    return "square" if original_suffix.endswith("weight") and "norm" not in original_suffix else "vector"


def _parse_key(key: str):
    """``(module prefix, (part, level index), suffix)`` with part in down/mid/up, or None for other keys."""
    match = _PREFIX.match(key)
    if not match:
        return None
    prefix, down, _, mid, up, _, suffix = match.groups()
    if down is not None:
        return prefix, ("down", int(down)), suffix
    if mid is not None:
        return prefix, ("mid", 0), suffix
    return prefix, ("up", int(up)), suffix


def detect(tensors: Mapping[str, Any], *, path=None, metadata: Mapping[str, str] | None = None) -> MotionModuleInfo:
    """Recognise a motion-module state dict from its keys and shapes (values: tensors or shapes).

    Returns a :class:`MotionModuleInfo` with ``format``, ``version``, ``pe_length``, ``has_mid``,
    ``channels`` and, when the file name or our metadata says so, ``lightning_steps``. Raises
    :class:`MotionModuleFileError` for any other kind of model (``problem="wrong_kind"``) and for layouts
    whose structure cannot be read (``problem="keys"``). Missing or extra tensors are checked later, by
    :func:`to_original_state_dict`.
    """
    where = describe_source(path)
    foreign = classify_foreign(tensors.keys())
    if foreign is not None:
        kind, what = foreign
        if kind != "motion_lora":
            what += f". As the motion module, use {SUGGESTION}"
        raise _wrong_kind(path, kind, what)

    parsed = {key: _parse_key(key) for key in tensors}
    module_keys = {k: p for k, p in parsed.items() if p is not None}
    original = any(p[2].startswith("temporal_transformer.") for p in module_keys.values())
    diffusers = any(not p[2].startswith("temporal_transformer.") for p in module_keys.values())
    if original and diffusers:
        sample = sorted(k for k, p in module_keys.items() if not p[2].startswith("temporal_transformer."))[:3]
        raise MotionModuleFileError(
            f"{where} mixes the original and the diffusers key layouts (e.g. {', '.join(sample)}); it was "
            f"probably merged by hand. Use the unmodified release file", path=path, problem=PROBLEM_KEYS,
            unexpected=sample)
    layout = "original" if original else "diffusers"

    down_levels = {p[1][1] for p in module_keys.values() if p[1][0] == "down"}
    up_levels = {p[1][1] for p in module_keys.values() if p[1][0] == "up"}
    levels = max(max(down_levels, default=-1), max(up_levels, default=-1)) + 1
    if levels == SDXL_LEVELS:
        raise _wrong_kind(path, "sdxl_motion_module",
                          "is an SDXL motion module (AnimateDiff-SDXL / HotshotXL: three down levels); this pack "
                          f"supports SD1.5 modules; use {SUGGESTION}")
    if levels != SD15_LEVELS:
        raise MotionModuleFileError(
            f"{where} has motion modules on {levels} down levels; SD1.5 motion modules have {SD15_LEVELS}. "
            f"It is not a motion module this pack can use; use {SUGGESTION}", path=path, problem=PROBLEM_KEYS)
    has_mid = any(p[1][0] == "mid" for p in module_keys.values())

    # Width of each level: majority vote over every tensor that belongs to it (robust to a mangled tensor).
    votes = [collections.Counter() for _ in range(levels)]
    to_original = (lambda s: s) if layout == "original" else (lambda s: _ORIGINAL_FROM_DIFFUSERS.get(
        s, ORIGINAL_PE_SUFFIXES[0] if s == DIFFUSERS_PE_SUFFIX else None))
    pe_lengths = collections.Counter()
    for key, (_, (part, index), suffix) in module_keys.items():
        original_suffix = to_original(suffix)
        if original_suffix is None or (original_suffix not in _ORIGINAL_SHAPES
                                       and original_suffix not in ORIGINAL_PE_SUFFIXES):
            continue
        level = index if part == "down" else levels - 1 if part == "mid" else levels - 1 - index
        if not 0 <= level < levels:
            continue
        shape = _shape(tensors[key])
        width = _C_FROM_SHAPE[_width_kind(original_suffix)](shape)
        if width:
            votes[level][width] += 1
        if original_suffix in ORIGINAL_PE_SUFFIXES and len(shape) == 3:
            pe_lengths[shape[1]] += 1
    channels = []
    for level, counter in enumerate(votes):
        if not counter:
            raise MotionModuleFileError(
                f"{where} has no readable tensors for down level {level} of its motion modules (missing or "
                f"wrongly shaped); the file is damaged. Download it again", path=path, problem=PROBLEM_KEYS,
                missing=[f"down_blocks.{level}.motion_modules.*"])
        width = counter.most_common(1)[0][0]
        if width % NORM_GROUPS or width % HEADS:
            raise MotionModuleFileError(
                f"{where} has motion modules {width} channels wide at level {level}; widths must be multiples "
                f"of {NORM_GROUPS}. The file is damaged or not an AnimateDiff motion module", path=path,
                problem=PROBLEM_KEYS)
        channels.append(width)

    if pe_lengths:
        pe_length = pe_lengths.most_common(1)[0][0]
        if pe_length < 1:
            raise MotionModuleFileError(f"{where} has empty positional tables; the file is damaged",
                                        path=path, problem=PROBLEM_KEYS)
        version = version_from_layout(has_mid, pe_length)
    elif layout == "original":
        pe_length, version = ANIMATELCM_PE_LENGTH, "animatelcm"
    else:
        pe_length = 32  # MotionAdapter's default table length, when a saver dropped the buffer
        version = version_from_layout(has_mid, pe_length)

    metadata = dict(metadata or {})
    return MotionModuleInfo(
        format=layout, version=version, pe_length=pe_length, has_mid=has_mid, channels=tuple(channels),
        lightning_steps=lightning_steps_from(path, metadata), source=os.fspath(path) if path is not None else None,
        dtype=_dominant_dtype(tensors), tensor_count=len(tensors), metadata=metadata)


def _steps_value(value) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() and int(text) >= 1 else None


def lightning_steps_origin(path, metadata: Mapping[str, str] | None = None) -> tuple[int | None, str | None]:
    """``(step count, where it came from)``: our metadata first (:data:`FROM_METADATA`), else a release-style file
    name (:data:`FROM_FILE_NAME`), else ``(None, None)``."""
    for key in STEPS_KEYS:
        steps = _steps_value((metadata or {}).get(key))
        if steps is not None:
            return steps, FROM_METADATA
    if path is not None:
        steps = steps_in_file_name(Path(path).name)
        if steps is not None:
            return steps, FROM_FILE_NAME
    return None, None


def lightning_steps_from(path, metadata: Mapping[str, str] | None = None) -> int | None:
    """Step count from our metadata, else from a release file name (``animatediff_lightning_4step_…``)."""
    return lightning_steps_origin(path, metadata)[0]


def steps_in_file_name(name: str) -> int | None:
    match = re.search(STEP_PATTERN, str(name), re.IGNORECASE)
    return int(match.group(1)) if match else None


def read_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file, reading its header only (a few KB of a 900 MB file); ``{}`` for other
    files and for files that cannot be read."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        return {}
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _dominant_dtype(tensors: Mapping[str, Any]) -> str | None:
    counts = collections.Counter(str(v.dtype).removeprefix("torch.") for v in tensors.values()
                                 if isinstance(v, torch.Tensor) and v.dim() != 3)
    return counts.most_common(1)[0][0] if counts else None


# --- validating and converting ----------------------------------------------------------------------------

def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere. Min and max propagate NaN and expose ±Inf, and one fused min/max pass is
    ~10x faster than ``isfinite().all()`` on fp16 (a full-size module checks in well under a second)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


def to_original_state_dict(tensors: Mapping[str, torch.Tensor], info: MotionModuleInfo, *, path=None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Validate against the detected layout and return ``(weights, positional tables)`` in original keys.

    ``weights`` has exactly the parameter keys of a :class:`MotionModuleSet`; tables are per module prefix
    (two each; empty when the file has none). Raises :class:`MotionModuleFileError` listing missing,
    unexpected and wrongly shaped tensors, naming non-float tensors, and naming the first tensor that holds
    NaN or Inf.
    """
    where = describe_source(path)
    channels, has_mid = info.channels, info.has_mid
    if info.format == "original":
        expected = original_layout(channels, has_mid, None if info.version == "animatelcm" else info.pe_length)
    else:
        expected = diffusers_layout(channels, has_mid, info.pe_length)
        if not any(k.endswith(DIFFUSERS_PE_SUFFIX) for k in tensors):
            expected = {k: v for k, v in expected.items() if not k.endswith(DIFFUSERS_PE_SUFFIX)}

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(f"{k}: {list(_shape(tensors[k]))} instead of {list(expected[k])}"
                        for k in set(expected) & set(tensors) if _shape(tensors[k]) != tuple(expected[k]))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} tensor(s) with the wrong shape: {_listing(mismatched)}")
        raise MotionModuleFileError(
            f"{where} looks like an {info.label} motion module but does not match that layout: "
            f"{'; '.join(parts)}. The file is damaged or was edited; download it again",
            path=path, problem=PROBLEM_KEYS, missing=missing, unexpected=unexpected, mismatched=mismatched)

    for key in sorted(tensors):
        value = tensors[key]
        if value.dtype not in FLOAT_DTYPES:
            raise MotionModuleFileError(
                f"{where}: tensor {key} has dtype {str(value.dtype).removeprefix('torch.')}; motion-module "
                "weights must be fp16, bf16 or fp32. The file is damaged or not a motion module",
                path=path, problem=PROBLEM_KEYS, mismatched=[f"{key}: dtype {value.dtype}"])
        if not all_finite(value):
            bad = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise MotionModuleFileError(
                f"{where}: tensor {key} contains {bad} values, so every video would come out broken. The file "
                "is damaged (or was saved from a diverged training run); download it again",
                path=path, problem=PROBLEM_NON_FINITE)

    weights, tables = {}, collections.defaultdict(list)
    for prefix, _ in module_prefixes(len(channels), has_mid):
        for suffix in _ORIGINAL_SHAPES:
            source = suffix if info.format == "original" else _DIFFUSERS_FROM_ORIGINAL[suffix]
            weights[f"{prefix}.{suffix}"] = tensors[f"{prefix}.{source}"]
        if info.format == "original":
            for suffix in ORIGINAL_PE_SUFFIXES:
                if f"{prefix}.{suffix}" in tensors:
                    tables[prefix].append(tensors[f"{prefix}.{suffix}"])
        elif f"{prefix}.{DIFFUSERS_PE_SUFFIX}" in tensors:
            shared = tensors[f"{prefix}.{DIFFUSERS_PE_SUFFIX}"]
            tables[prefix] = [shared, shared]
    return weights, dict(tables)


def motion_module_from_state_dict(tensors: Mapping[str, torch.Tensor], *, path=None,
                                  metadata: Mapping[str, str] | None = None, device="cpu", dtype=None,
                                  norm_mode: str = "per_frame") -> MotionModuleSet:
    """Build a :class:`MotionModuleSet` from an in-memory state dict in either layout (see :func:`detect`).

    ``dtype`` None keeps the file's weight dtype. Weights are assigned, never copied into randomly
    initialised modules, so a full-size set loads without initialising 453 M parameters first.
    """
    info = detect(tensors, path=path, metadata=metadata)
    weights, tables = to_original_state_dict(tensors, info, path=path)
    target_dtype = dtype if dtype is not None else getattr(torch, info.dtype or "float32")
    module_set = MotionModuleSet(info.channels, has_mid=info.has_mid, pe_length=info.pe_length,
                                 norm_mode=norm_mode, heads=HEADS, norm_groups=NORM_GROUPS, info=info,
                                 device="meta")
    weights = {k: v.to(device=device, dtype=target_dtype) for k, v in weights.items()}
    module_set.load_state_dict(weights, strict=True, assign=True)
    for prefix, module in module_set.named_modules_in_unet_order():
        if prefix in tables:
            found = [t.to(device=device, dtype=target_dtype) for t in tables[prefix]]
        else:
            found = [sinusoidal_positions(info.pe_length, module.channels).to(device=device, dtype=target_dtype)] * 2
        module.set_positional_tables(found)
    return module_set


def load_motion_module(path, *, device="cpu", dtype=None, norm_mode: str = "per_frame") -> MotionModuleSet:
    """Load any SD1.5 motion-module file (v1, v2, v3, AnimateLCM, Lightning; original or diffusers keys).

    The returned set's ``.info`` tells format, version, table length, mid block and Lightning step count.
    Raises :class:`~lightning.errors.MotionModuleFileError` for anything unusable (see module docstring).
    """
    tensors, metadata = read_state_dict(path, error_type=MotionModuleFileError, role="motion module")
    return motion_module_from_state_dict(tensors, path=path, metadata=metadata, device=device, dtype=dtype,
                                         norm_mode=norm_mode)


# --- saving -----------------------------------------------------------------------------------------------

def motion_module_tensors(module_set: MotionModuleSet, *, layout: str = "original", dtype=None
                          ) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_motion_module` writes (CPU, contiguous), in ``"original"`` or ``"diffusers"`` keys.

    Original layout carries both positional tables of every module (as the release files do; AnimateLCM
    sets none, as its files); diffusers carries one per module (``MotionAdapter`` loads it strictly). Meta tensors are kept on meta, which lets
    tests plan full-size files without allocating them.
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def prepare(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not t.is_meta:
            t = t.to("cpu")
        return t.to(dtype if dtype is not None else t.dtype).contiguous()

    out = {}
    weights = module_set.state_dict()
    for prefix, module in module_set.named_modules_in_unet_order():
        for suffix in _ORIGINAL_SHAPES:
            name = suffix if layout == "original" else _DIFFUSERS_FROM_ORIGINAL[suffix]
            out[f"{prefix}.{name}"] = prepare(weights[f"{prefix}.{suffix}"])
        tables = module.positional_tables()
        if layout == "original" and module_set.info.version == "animatelcm":
            continue  # AnimateLCM files carry no tables; writing them would make loaders call it v2
        if layout == "original":
            for suffix, table in zip(ORIGINAL_PE_SUFFIXES, tables):
                out[f"{prefix}.{suffix}"] = prepare(table).clone()
        else:
            out[f"{prefix}.{DIFFUSERS_PE_SUFFIX}"] = prepare(tables[0]).clone()
    return out


def provenance_metadata(module_set: MotionModuleSet, layout: str, extra: Mapping[str, str] | None = None
                        ) -> dict[str, str]:
    """What we record in files we save, so a later load knows the step count and origin."""
    info = module_set.info
    meta = {"format": "pt", f"{METADATA_PREFIX}version": __version__, f"{METADATA_PREFIX}layout": layout,
            f"{METADATA_PREFIX}motion_version": info.version, f"{METADATA_PREFIX}pe_length": str(module_set.pe_length)}
    if info.source:
        meta[f"{METADATA_PREFIX}source"] = Path(info.source).name
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError(f"metadata must map str to str; got {key!r}: {value!r}")
        meta[key] = value
    # the caller's count wins: a student distilled from an 8-step teacher still carries the teacher's info
    given = {key: (extra or {})[key] for key in STEPS_KEYS if key in (extra or {})}
    steps = None
    for key, value in given.items():
        steps = _steps_value(value)
        if steps is None:
            raise InvalidInputError(f"metadata {key!r} must be a positive whole number of steps, got {value!r}")
    if len({_steps_value(v) for v in given.values()}) > 1:
        raise InvalidInputError(f"metadata gives two different step counts: {given}")
    steps = steps or info.lightning_steps
    if steps:
        meta[STEPS_KEY] = str(steps)
    return meta


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def safetensors_file_size(shapes: Mapping[str, tuple], dtype: torch.dtype, metadata: Mapping[str, str] | None = None
                          ) -> int:
    """Exact size of the safetensors file that ``save_file`` writes for these shapes, all of one dtype.

    Mirrors the format: 8-byte header length, a compact JSON header (metadata first, then tensors sorted by
    name, each with dtype, shape and data offsets) padded with spaces to a multiple of 8, then the data.
    Lets us check free disk space before writing a 900 MB file and check byte compatibility without one.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise InvalidInputError(f"unsupported dtype {dtype} for a motion-module file")
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(encoded) + (-len(encoded)) % 8
    return 8 + padded + offset


def planned_file_size(module_set: MotionModuleSet, *, layout: str = "original", dtype=None,
                      byte_compatible: bool = False, metadata: Mapping[str, str] | None = None) -> int:
    """Bytes :func:`save_motion_module` will write with the same arguments (works on the meta device)."""
    dtype, meta = _save_settings(module_set, layout, dtype, byte_compatible, metadata)
    tensors = motion_module_tensors(module_set, layout=layout, dtype=dtype)
    return safetensors_file_size({k: tuple(v.shape) for k, v in tensors.items()}, dtype, meta)


def _save_settings(module_set, layout, dtype, byte_compatible, metadata):
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if byte_compatible:
        if dtype not in (None, torch.float16):
            raise InvalidInputError(f"byte_compatible saves are fp16 (as the release files); got dtype={dtype}")
        if metadata:
            raise InvalidInputError("byte_compatible saves carry no metadata (the release files have none); "
                                    "drop metadata= or byte_compatible=True")
        return torch.float16, None
    if dtype is None:
        dtype = next(iter(module_set.parameters())).dtype
    if dtype not in _SAFETENSORS_DTYPES:
        raise InvalidInputError(f"dtype must be one of fp16, bf16, fp32, fp64; got {dtype}")
    return dtype, provenance_metadata(module_set, layout, metadata)


def _check_complete(path: Path) -> None:
    """Refuse a written safetensors file whose length disagrees with its own header (a short write)."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    data = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    written = path.stat().st_size
    if written != 8 + header_length + data:
        raise OSError(f"short write: {os.fspath(path)!r} has {written:,} bytes, its header says "
                      f"{8 + header_length + data:,}")


def save_motion_module(module_set: MotionModuleSet, path, *, layout: str = "original", dtype=None,
                       byte_compatible: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a ``.safetensors`` motion module in the original (ComfyUI/Evolved) or diffusers layout.

    ``byte_compatible=True`` writes fp16 without metadata, exactly as the Lightning release files (a
    full-size v2 set is 908,929,664 bytes original / 907,702,248 diffusers). Otherwise provenance
    metadata is added (our version, layout, generation, Lightning steps, source file name) plus
    ``metadata``. The file appears atomically: written next to its destination, then renamed.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        raise InvalidInputError(f"motion modules are saved as .safetensors; got {os.fspath(path)!r}")
    dtype, meta = _save_settings(module_set, layout, dtype, byte_compatible, metadata)
    tensors = motion_module_tensors(module_set, layout=layout, dtype=dtype)
    if any(t.is_meta for t in tensors.values()):
        raise InvalidInputError("this motion module set lives on the meta device and has no weights to save")
    size = safetensors_file_size({k: tuple(v.shape) for k, v in tensors.items()}, dtype, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise InvalidInputError(f"not enough disk space for {os.fspath(path)!r}: needs {size:,} bytes, "
                                f"{free:,} free")
    with atomic_output(path) as temporary:
        save_file(tensors, os.fspath(temporary), metadata=meta)
        _check_complete(temporary)
    log.info("saved %s motion module (%s layout, %s) to %s", module_set.info.label, layout, dtype, path)
    return path
