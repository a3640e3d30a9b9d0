"""Guard rails: the settings that silently ruin an AnimateDiff-Lightning video, caught with a message that names
the fix. Plain Python (no ComfyUI), so every rule is unit-tested in CI; the nodes call these with values they
read off ComfyUI objects.
"""

from __future__ import annotations

import math
from typing import Sequence

from ._core import core

errors = core("errors")
schedule = core("schedule")

#: Fewer frames than this and AnimateDiff modules produce washed-out or noisy clips (Evolved issues #347, #174).
MIN_GOOD_FRAMES = 8
#: How far (relative) a sigma may sit from the trained trailing grid before we call the schedule off-grid.
GRID_TOLERANCE = 0.25



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


def check_steps(steps: int, module_steps: int | None) -> str | None:
    """A warning when ``steps`` leaves the module's distilled grid (3 on the 2-step module is a known good pair)."""
    if module_steps is None or steps == module_steps:
        return None
    if module_steps == 2 and steps == 3:
        return None
    return (f"sampling {steps} steps with the {module_steps}-step Lightning module: the module was distilled for "
            f"exactly {module_steps} steps, so quality may drop. Set steps to 0 (= {module_steps}) or load the "
            f"animatediff_lightning_{steps}step module if it exists"
            + (" (or try 3 steps with the 2-step module)" if module_steps == 2 else "") + ".")


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
