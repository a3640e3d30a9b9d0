"""Guard rails: the settings that silently ruin an AnimateDiff-Lightning video, caught with a message that names
the fix. Plain Python (no ComfyUI), so every rule is unit-tested in CI; the nodes call these with values they
read off ComfyUI objects.
"""

from __future__ import annotations

import math
from typing import Sequence

from . import keys, specs
from ._core import core

checkpoints = core("checkpoints")
errors = core("errors")
sampling = core("sampling")
schedule = core("schedule")

#: Fewer frames than this and AnimateDiff modules produce washed-out or noisy clips (Evolved issues #347, #174).
MIN_GOOD_FRAMES = 8
#: How far (relative) a sigma may sit from the trained trailing grid before we call the schedule off-grid.
GRID_TOLERANCE = 0.25
#: Step counts that suit a module besides its own: the AnimateDiff-Lightning model card reports that 3 steps on
#: the 2-step module give great results. The frontend reads this table from the loader's schema.
EXTRA_GOOD_STEPS = {2: (3,)}
#: Lightning was distilled for cfg 1 (the model card: some bases look better with some CFG, 1.5-2 in practice);
#: above this every step runs the model twice and the video burns.
CFG_WARN_ABOVE = 2.0
#: The sampler and schedulers that walk Lightning's grid in ComfyUI's KSampler.
GOOD_SAMPLER = "euler"
GOOD_SCHEDULERS = schedule.COMFY_SPACINGS
#: Where a step count came from, besides the file (``checkpoints.FROM_METADATA`` / ``FROM_FILE_NAME``).
FROM_INPUT = "lightning_steps input"
HOW_TO_SET_STEPS = "set lightning_steps on Load Motion Module"



class ModelFamilyError(errors.InvalidInputError):
    """The MODEL is not a Stable Diffusion 1.5 UNet, so AnimateDiff SD1.5 motion modules cannot go in."""


class VideoLengthError(errors.InvalidInputError):
    """More frames than the motion module can see at once, with no context windows to split them."""


def describe_unet(config: dict, family: str | None = None) -> str:
    parts = [f"model_channels {config.get('model_channels')}", f"context_dim {config.get('context_dim')}",
             f"channel_mult {list(config.get('channel_mult') or [])}"]
    if config.get("adm_in_channels"):
        parts.append(f"adm_in_channels {config.get('adm_in_channels')}")
    return f"{family or 'UNet'} ({', '.join(parts)})"


def check_sd15_unet(config: dict, family: str | None = None, *, module_channels: Sequence[int] | None = None,
                    node: str = "Apply Motion Module") -> None:
    """Raise ``ModelFamilyError`` unless ``config`` (ComfyUI's ``unet_config``) is an SD1.5-shaped UNet whose
    level widths match the motion module's."""
    if not isinstance(config, dict) or "model_channels" not in config:
        raise ModelFamilyError(f"{node}: the MODEL is not a UNet diffusion model ({family or 'unknown type'}). "
                               "AnimateDiff motion modules need a Stable Diffusion 1.5 checkpoint.")
    mult = tuple(config.get("channel_mult") or ())
    res = config.get("num_res_blocks")
    res_ok = res == 2 or (isinstance(res, (list, tuple)) and all(r == 2 for r in res) and len(res) == len(mult))
    is_sd15 = (config.get("model_channels") == 320 and mult == (1, 2, 4, 4) and res_ok
               and config.get("context_dim") == 768 and not config.get("adm_in_channels")
               and not config.get("use_temporal_attention") and not config.get("use_linear_in_transformer"))
    if not is_sd15:
        hint = ""
        if config.get("context_dim") == 2048 or config.get("adm_in_channels"):
            hint = " This looks like an SDXL model; AnimateDiff-Lightning exists for SD1.5 only."
        elif config.get("context_dim") == 1024:
            hint = " This looks like an SD2.x model; AnimateDiff motion modules were trained on SD1.5."
        raise ModelFamilyError(
            f"{node}: the MODEL is {describe_unet(config, family)}, not Stable Diffusion 1.5.{hint} "
            "Load an SD1.5 checkpoint (e.g. ToonYou, epiCRealism, DreamShaper 8) with Load Checkpoint.")
    if module_channels is not None:
        widths = tuple(config["model_channels"] * m for m in mult)
        if tuple(module_channels) != widths:
            raise ModelFamilyError(
                f"{node}: the motion module has level widths {tuple(module_channels)} but this UNet has {widths}; "
                "the module was made for a different model size.")


def check_frames(frames: int, pe_length: int, *, windows: bool) -> list[str]:
    """Warnings for the frame count; raises when frames exceed the positional encoding without windows."""
    if frames > pe_length and not windows:
        raise VideoLengthError(
            f"{frames} frames is more than this motion module can see at once ({pe_length}). Add a Context Windows "
            f"(Lightning) node before the sampler (context_length 16 suits Lightning), or lower the latent "
            f"batch_size to at most {pe_length} (16 is what Lightning was trained on).")
    warnings = []
    if frames < MIN_GOOD_FRAMES:
        warnings.append(f"only {frames} frame(s): AnimateDiff modules need about 16 frames (at least "
                        f"{MIN_GOOD_FRAMES}) to make coherent motion; set the latent batch_size to 16.")
    return warnings


def good_steps(module_steps: int) -> tuple[int, ...]:
    """The step counts that suit a module distilled for ``module_steps`` steps."""
    return (module_steps, *EXTRA_GOOD_STEPS.get(module_steps, ()))


def steps_origin_text(origin: str | None) -> str:
    """Where a module's step count came from, in words, with how to change it."""
    if origin == FROM_INPUT:
        return "set by lightning_steps on Load Motion Module"
    where = {checkpoints.FROM_METADATA: "the file's metadata",
             checkpoints.FROM_FILE_NAME: "the file name"}.get(origin, "the file")
    return f"read from {where}; if that is wrong, {HOW_TO_SET_STEPS}"


def module_phrase(module_steps: int, origin: str | None) -> str:
    return f"the {module_steps}-step Lightning module (step count {steps_origin_text(origin)})"


def check_steps(steps: int, module_steps: int | None, origin: str | None = None) -> str | None:
    """A warning when ``steps`` leaves the module's distilled grid (see ``EXTRA_GOOD_STEPS``)."""
    if module_steps is None or steps in good_steps(module_steps):
        return None
    others = [n for n in good_steps(module_steps) if n != module_steps]
    also = f" (or {', '.join(map(str, others))})" if others else ""
    return (f"sampling {steps} step{'' if steps == 1 else 's'} with {module_phrase(module_steps, origin)}: the "
            f"module was distilled for exactly {module_steps} steps, so quality may drop. Set steps to "
            f"{module_steps}{also} (0 on the Lightning nodes), or load the animatediff_lightning_{steps}step module "
            "if it exists.")


def missing_steps_message(node: str, label: str) -> str:
    """The error for steps 0 on a MODEL whose motion module has no known step count."""
    return (f"{node}: steps 0 means 'the Lightning module's step count', but the motion module on this MODEL "
            f"({label}) has none: neither its metadata nor its file name says one. If it is a Lightning module, "
            f"{HOW_TO_SET_STEPS} (1, 2, 4 or 8, as the module was distilled); otherwise set steps here (20-25 "
            "with cfg 7.5 for AnimateDiff v2/v3).")


def no_module_message(node: str) -> str:
    return (f"{node}: steps 0 means 'the Lightning module's step count', but this MODEL has no motion module. "
            "Connect the MODEL from Apply Motion Module, or set steps explicitly.")


def check_schedule_steps(sigmas: Sequence[float], module_steps: int | None, origin: str | None = None
                         ) -> str | None:
    """``check_steps`` for a full-denoise schedule (KSampler and custom sigmas), whose length is its step count;
    partial schedules (video-to-video) do not show how many steps the full one had."""
    sig = [float(s) for s in sigmas]
    if module_steps is None or len(sig) < 2 or not math.isclose(sig[0], schedule.sigma_max(), rel_tol=1e-3):
        return None
    return check_steps(len(sig) - 1, module_steps, origin)


def check_cfg(cfg: float | None, module_steps: int | None, origin: str | None = None) -> str | None:
    """A warning when a Lightning module is sampled with cfg above ``CFG_WARN_ABOVE``."""
    if module_steps is None or cfg is None or float(cfg) <= CFG_WARN_ABOVE:
        return None
    return (f"cfg {float(cfg):g} with {module_phrase(module_steps, origin)}: Lightning was distilled for cfg 1 "
            f"(some base models look better at 1.5-{CFG_WARN_ABOVE:g}). Above {CFG_WARN_ABOVE:g} every step runs "
            "the model twice and the video comes out burnt; set cfg to 1.")


def check_denoise(steps: int, denoise: float) -> str | None:
    """A note when ``denoise`` is not on the ``steps``-step grid, saying what is used instead."""
    k = sampling.strength_steps(steps, denoise)
    if abs(k / steps - denoise) <= 1e-6:
        return None
    return (f"denoise {denoise:g} is not on the {steps}-step grid; using {k / steps:g} ({k} of {steps} steps). "
            f"Denoise values on the grid are multiples of 1/{steps}.")


def frontend_rules(not_downloaded: Sequence[str] = (), steps_in_metadata: dict | None = None) -> dict:
    """What the browser hints need, as JSON-able data carried by the loader's node schema, so that the
    JavaScript holds no copy of any rule (``js/lightning_core.js`` reads only this)."""
    return {
        "step_pattern": checkpoints.STEP_PATTERN,
        "extra_good_steps": {str(k): list(v) for k, v in EXTRA_GOOD_STEPS.items()},
        "cfg_warn_above": CFG_WARN_ABOVE,
        "sampler": GOOD_SAMPLER,
        "schedulers": list(GOOD_SCHEDULERS),
        "auto": specs.AUTO_STEPS,
        "warning_event": keys.WARNING_EVENT,
        "not_downloaded": sorted(not_downloaded),
        "steps_in_metadata": dict(steps_in_metadata or {}),
    }


def check_sigmas(sigmas: Sequence[float], module_steps: int | None) -> str | None:
    """A warning when a full-denoise schedule is off Lightning's trailing grid, e.g. ComfyUI's ``normal`` or
    ``karras`` scheduler, which end near sigma_min: at 1-2 steps they jump straight from pure noise to almost
    clean (2 steps = 25.1, 0.03, 0) and break the video."""
    sig = [float(s) for s in sigmas]
    if module_steps is None or len(sig) < 2 or not math.isclose(sig[0], schedule.sigma_max(), rel_tol=1e-3):
        return None
    steps = len(sig) - 1
    grid = schedule.sigmas(steps).tolist()
    off = [s for s, g in zip(sig[:-1], grid[:-1]) if abs(s - g) > GRID_TOLERANCE * g]
    if not off:
        return None
    severity = "breaks" if steps <= 2 else "degrades"
    return (f"the {steps}-step schedule {', '.join(f'{s:.3g}' for s in sig)} is off the grid Lightning was "
            f"distilled on ({', '.join(f'{g:.3g}' for g in grid)}), which {severity} few-step sampling. With "
            "KSampler use scheduler sgm_uniform (or simple) and sampler euler, or use the Lightning Sampler / "
            "Lightning Sigmas nodes.")
