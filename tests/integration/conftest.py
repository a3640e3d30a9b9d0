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

from comfy_harness import ComfyServer, comfyui_path  # noqa: E402
from fixture_files import fixture_models  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is None:
        skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: point it at a ComfyUI checkout (and "
                                       "COMFYUI_PYTHON at its Python) to run the integration tests")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    path = comfyui_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is not set")
    extra = {}
    evolved = os.environ.get("EVOLVED_PATH")
    if evolved:
        extra["ComfyUI-AnimateDiff-Evolved"] = Path(evolved)
    server = ComfyServer(path, tmp_path_factory.mktemp("comfy_base"), extra_custom_nodes=extra, models=fixture_models())
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
