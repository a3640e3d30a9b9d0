"""The random-weight fixture files the integration tests put into ComfyUI's model folders (written once, cached
in ``ADL_FIXTURE_DIR``)."""

from __future__ import annotations

from pathlib import Path

from comfy_harness import fixture_dir
from graphs import CONTROLNET, LIGHTNING_4STEP, MOTION_LORA, SD2_UNET, SD15, SDXL_MODULE


def fixture_models() -> dict[str, dict[str, Path]]:
    """Model folder -> {file name in that folder: fixture file}, writing missing fixtures first."""
    from lightning.testing import foreign, motion, sd15

    d = fixture_dir()
    if not (d / SD15).exists():
        sd15.write_sd15_checkpoint(d / SD15)
    if not (d / CONTROLNET).exists():
        sd15.write_sd15_controlnet(d / CONTROLNET)
    if not (d / SD2_UNET).exists():
        foreign.write_sd2_tiny_unet(d / SD2_UNET)
    mm = d / "motion"
    wanted = [LIGHTNING_4STEP, MOTION_LORA]
    if not all((mm / name).exists() for name in wanted):
        motion.write_fixture_set(mm, full=True, only=wanted, wrong=False)
    wrong = mm / "wrong"
    if not (wrong / "sdxl_motion_module.safetensors").exists():
        motion.write_fixture_set(mm, only=["wrong/sdxl_motion_module.safetensors"], wrong=True)
    return {
        "checkpoints": {SD15: d / SD15},
        "controlnet": {CONTROLNET: d / CONTROLNET},
        "diffusion_models": {SD2_UNET: d / SD2_UNET},
        "animatediff_models": {LIGHTNING_4STEP: mm / LIGHTNING_4STEP,
                               SDXL_MODULE: wrong / "sdxl_motion_module.safetensors",
                               # a motion LoRA put where motion modules go, as users do by mistake
                               "motion_lora_in_wrong_folder.ckpt": mm / MOTION_LORA},
        "animatediff_motion_lora": {MOTION_LORA: mm / MOTION_LORA},
    }
