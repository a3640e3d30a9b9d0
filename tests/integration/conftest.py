"""Integration tests against a real ComfyUI (``COMFYUI_PATH``, ``COMFYUI_PYTHON``); skipped, saying why, without.

Fixtures are random-weight files in the real layouts, written once into ``ADL_FIXTURE_DIR`` (default
``~/.cache/adlightning/fixtures``): a full-size SD1.5 checkpoint and ControlNet, a full-size Lightning-layout
motion module, a motion LoRA, an SDXL-layout module and a tiny SD2 UNet. ``EVOLVED_PATH`` (an
AnimateDiff-Evolved checkout matching the ComfyUI version) enables the parity tests.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers below are plain modules next to the tests

from comfy_harness import ComfyServer, comfyui_path, fixture_dir  # noqa: E402
from graphs import CONTROLNET, LIGHTNING_4STEP, MOTION_LORA, SD2_UNET, SD15, SDXL_MODULE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is None:
        skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: point it at a ComfyUI checkout (and "
                                       "COMFYUI_PYTHON at its Python) to run the integration tests")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


def _fixtures() -> dict[str, dict[str, Path]]:
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


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    path = comfyui_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is not set")
    extra = {}
    evolved = os.environ.get("EVOLVED_PATH")
    if evolved:
        extra["ComfyUI-AnimateDiff-Evolved"] = Path(evolved)
    server = ComfyServer(path, tmp_path_factory.mktemp("comfy_base"), extra_custom_nodes=extra, models=_fixtures())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def evolved_available(comfy):
    if not os.environ.get("EVOLVED_PATH"):
        pytest.skip("EVOLVED_PATH is not set: point it at an AnimateDiff-Evolved checkout to run parity tests")
    if "ADE_AnimateDiffLoaderGen1" not in comfy.object_info():
        pytest.skip(f"AnimateDiff-Evolved did not load in this ComfyUI; log tail:\n{comfy.log()[-2000:]}")
    return True
