"""Motion LoRA (the original AnimateDiff format): load, merge into a motion module set, unmerge exactly.

File keys (lightning/REFERENCE.md §1.6)::

    <module>.temporal_transformer.transformer_blocks.0.attention_blocks.N.processor.to_q_lora.down.weight  [r, C]
    …                                                                             .to_q_lora.up.weight    [C, r]

for ``to_q``, ``to_k``, ``to_v`` and ``to_out`` (which patches ``to_out.0``). The merge is
``W += strength · up @ down`` in fp32 with no alpha/rank factor, as AnimateDiff and AnimateDiff-Evolved
apply these files; a ``….alpha`` entry, which the original format does not have, scales by ``alpha / r``.
The default strength is 0.8: the Lightning card advises 0.7–0.8 against watermarks.

Merges stack. Exact reversal: the first merge touching a weight keeps its original; every later change
recomputes ``original + Σ strength_i · delta_i`` in a fixed order, and removing the last LoRA copies the
original back, so unmerging restores the weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from .checkpoints import all_finite, classify_foreign, read_state_dict
from .errors import (PROBLEM_KEYS, PROBLEM_NON_FINITE, PROBLEM_WRONG_KIND, InvalidInputError, MotionLoraFileError,
                     describe_source)
from .motion_module import MotionModuleSet

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.8
_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_LORA_STATE = "_motion_lora_state"


_FOREIGN_FOR_LORA = {
    "sd_lora": ("is a LoRA for the image model (an SD LoRA, like v3_sd15_adapter); load it with ComfyUI's "
                "LoraLoader instead"),
    "unknown": "has no AnimateDiff keys at all; use a motion LoRA such as v2_lora_ZoomIn.ckpt",
}


@dataclasses.dataclass
class MotionLora:
    """A motion LoRA as low-rank pairs keyed by the module-set parameter they patch."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight key -> (down, up, alpha scale)
    source: str | None = None
    rank: int = 0

    @property
    def name(self) -> str:
        return Path(self.source).name if self.source else "motion LoRA"

    @property
    def has_mid(self) -> bool:
        return any(k.startswith("mid_block.") for k in self.pairs)

    def delta(self, key: str) -> torch.Tensor:
        """``scale · up @ down`` in fp32 for one patched weight."""
        down, up, scale = self.pairs[key]
        return (up.float() @ down.float()) * scale


def _weight_key(lora_key: str) -> tuple[str, str] | None:
    """``(weight key, "down"|"up"|"alpha")`` for a motion-LoRA key, else None."""
    for projection, target in _PROJECTIONS.items():
        for part in ("down.weight", "up.weight", "alpha"):
            ending = f".processor.{projection}_lora.{part}"
            if lora_key.endswith(ending):
                return f"{lora_key[: -len(ending)]}.{target}.weight", part.split(".")[0]
    return None


def motion_lora_from_state_dict(tensors: Mapping[str, torch.Tensor], *, path=None) -> MotionLora:
    """Validate and pair up a motion-LoRA state dict; see :func:`load_motion_lora` for the errors."""
    where = describe_source(path)
    temporal = {k: v for k, v in tensors.items() if "temporal" in k or "motion_modules" in k}
    if not any("lora" in k.lower() for k in temporal):
        foreign = classify_foreign(tensors.keys())
        if foreign is None:
            kind = "motion_module"
            what = ("is a motion module, not a motion LoRA; load it with the Load Motion Module node and put "
                    "the LoRA on top of it")
        else:
            kind = foreign[0]
            what = (f"contains no temporal keys, so it is not a motion LoRA: it {_FOREIGN_FOR_LORA.get(kind, foreign[1])}")
        raise MotionLoraFileError(f"{where} {what}", path=path, problem=PROBLEM_WRONG_KIND, kind=kind)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in temporal.items():
        parsed = _weight_key(key)
        if parsed is None:
            unexpected.append(key)
            continue
        parts.setdefault(parsed[0], {})[parsed[1]] = value
    unexpected += [k for k in tensors if k not in temporal]
    incomplete = sorted(k for k, p in parts.items() if "down" not in p or "up" not in p)
    mismatched = []
    for key, p in parts.items():
        if "down" in p and "up" in p:
            down, up = p["down"], p["up"]
            if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
                mismatched.append(f"{key}: down {list(down.shape)}, up {list(up.shape)}")
    if unexpected or incomplete or mismatched:
        details = []
        if unexpected:
            details.append(f"unexpected keys: {', '.join(sorted(unexpected)[:8])}")
        if incomplete:
            details.append(f"down/up pairs incomplete for: {', '.join(incomplete[:8])}")
        if mismatched:
            details.append(f"ranks disagree: {', '.join(mismatched[:8])}")
        raise MotionLoraFileError(
            f"{where} is not a well-formed motion LoRA ({'; '.join(details)}); download it again",
            path=path, problem=PROBLEM_KEYS, missing=incomplete, unexpected=sorted(unexpected), mismatched=mismatched)

    pairs, ranks = {}, set()
    for key in sorted(parts):
        p = parts[key]
        for name in ("down", "up", "alpha"):
            if name in p and (not p[name].is_floating_point() or not all_finite(p[name])):
                raise MotionLoraFileError(
                    f"{where}: the {name} tensor for {key} is not finite floating point (NaN/Inf or wrong dtype); "
                    "the file is damaged, download it again", path=path, problem=PROBLEM_NON_FINITE)
        rank = p["down"].shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else 1.0
        pairs[key] = (p["down"], p["up"], scale)
        ranks.add(rank)
    return MotionLora(pairs=pairs, source=os.fspath(path) if path is not None else None,
                      rank=max(ranks) if ranks else 0)


def load_motion_lora(path) -> MotionLora:
    """Read an original-format motion LoRA (``.ckpt`` / ``.safetensors``).

    Raises :class:`~lightning.errors.MotionLoraFileError`: "contains no temporal keys" for an image (SD)
    LoRA or any other model, a pointer to the motion-module loader for a motion module, key/shape problems
    listed, NaN/Inf named, unreadable files as in :func:`lightning.checkpoints.read_state_dict`.
    """
    tensors, _ = read_state_dict(path, error_type=MotionLoraFileError, role="motion LoRA")
    return motion_lora_from_state_dict(tensors, path=path)


# --- merging ----------------------------------------------------------------------------------------------

def _state(module_set: MotionModuleSet) -> dict:
    state = getattr(module_set, _LORA_STATE, None)
    if state is None:
        state = {"originals": {}, "stack": []}
        setattr(module_set, _LORA_STATE, state)
    return state


def applied_loras(module_set: MotionModuleSet) -> list[tuple[MotionLora, float]]:
    """The LoRAs currently merged, in merge order, with their strengths."""
    return list(_state(module_set)["stack"])


def _targets(module_set: MotionModuleSet, lora: MotionLora) -> dict[str, torch.nn.Parameter]:
    params = dict(module_set.named_parameters())
    where = describe_source(lora.source)
    targets, skipped_mid, missing, mismatched = {}, [], [], []
    for key, (down, up, _) in lora.pairs.items():
        if key.startswith("mid_block.") and not module_set.has_mid:
            skipped_mid.append(key)
            continue
        if key not in params:
            missing.append(key)
            continue
        shape = (up.shape[0], down.shape[1])
        if tuple(params[key].shape) != shape:
            mismatched.append(f"{key}: LoRA gives {list(shape)}, module has {list(params[key].shape)}")
            continue
        targets[key] = params[key]
    if missing or mismatched:
        details = ([f"patches weights this module set does not have: {', '.join(missing[:6])}"] if missing else []) + (
            [f"shapes disagree: {', '.join(mismatched[:6])}"] if mismatched else [])
        raise MotionLoraFileError(
            f"{where} does not fit this motion module ({module_set.info.label}): {'; '.join(details)}. Use a "
            "motion LoRA trained for this module family (SD1.5 v2 LoRAs for v2/Lightning modules)",
            path=lora.source, problem=PROBLEM_KEYS, missing=missing, mismatched=mismatched)
    if skipped_mid:
        log.warning("%s: skipping %d mid-block weights because %s has no mid block", lora.name, len(skipped_mid),
                    module_set.info.label)
    return targets


def lora_deltas(lora: MotionLora, module_set: MotionModuleSet) -> dict[str, torch.Tensor]:
    """``{weight key: scale · up @ down}`` (fp32, CPU, strength not applied) for the weights it patches.

    For callers that patch weights themselves (ComfyUI's additive ``"diff"`` patches, as Evolved does);
    keys are the module set's parameter names. Checks fit exactly like :func:`merge_motion_lora` (mid-block
    weights skipped with a warning when the set has none; anything else that does not fit raises).
    """
    return {key: lora.delta(key) for key in _targets(module_set, lora)}


def _recompute(module_set: MotionModuleSet, keys) -> None:
    state = _state(module_set)
    params = dict(module_set.named_parameters())
    with torch.no_grad():
        for key in keys:
            original = state["originals"][key]
            contributions = [(lora, strength) for lora, strength in state["stack"] if key in lora.pairs]
            if not contributions:
                params[key].copy_(original)
                del state["originals"][key]
                continue
            total = original.float()
            for lora, strength in contributions:
                total = total + strength * lora.delta(key).to(total.device)
            params[key].copy_(total.to(params[key].dtype))


def merge_motion_lora(module_set: MotionModuleSet, lora: MotionLora, strength: float = DEFAULT_STRENGTH) -> None:
    """Add ``strength · up @ down`` to every weight the LoRA patches. Stacks with earlier merges."""
    strength = float(strength)
    if not torch.isfinite(torch.tensor(strength)):
        raise InvalidInputError(f"motion LoRA strength must be a finite number, got {strength}")
    if any(existing is lora for existing, _ in _state(module_set)["stack"]):
        raise InvalidInputError(f"{lora.name} is already merged into this motion module; unmerge it first "
                                "or load the file again to stack it twice")
    targets = _targets(module_set, lora)
    state = _state(module_set)
    for key, param in targets.items():
        state["originals"].setdefault(key, param.detach().clone())
    state["stack"].append((lora, strength))
    _recompute(module_set, targets)


def unmerge_motion_lora(module_set: MotionModuleSet, lora: MotionLora | None = None) -> None:
    """Remove one merged LoRA (or all with None); weights return exactly to what the rest implies."""
    state = _state(module_set)
    if lora is None:
        removed = [l for l, _ in state["stack"]]
        state["stack"].clear()
    else:
        if not any(existing is lora for existing, _ in state["stack"]):
            raise InvalidInputError(f"{lora.name} is not merged into this motion module")
        removed = [lora]
        state["stack"][:] = [(l, s) for l, s in state["stack"] if l is not lora]
    touched = sorted({key for l in removed for key in l.pairs if key in state["originals"]})
    _recompute(module_set, touched)
