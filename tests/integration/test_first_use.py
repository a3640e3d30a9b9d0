"""Issue 13 in a real ComfyUI: what a first-time user stumbled on. A renamed Lightning module samples with steps 0
once lightning_steps says its count; run-time warnings reach the browser's websocket once per run; the loader's
schema tells the frontend which releases are not downloaded; offline, picking one fails at once."""

import os
import time

import pytest
import torch

from comfy_harness import WebSocketListener
from graphs import LIGHTNING_4STEP, base, ksampler, lightning_sampler, save_latent, with_motion

pytestmark = pytest.mark.integration

RENAMED = "my_favourite_motion.safetensors"


@pytest.fixture(scope="module")
def renamed(comfy):
    """The Lightning fixture under a name that does not say its step count (and no metadata: like a copy)."""
    folder = comfy.base / "models" / "animatediff_models"
    original = (folder / LIGHTNING_4STEP).resolve()
    link = folder / RENAMED
    if not link.exists():
        link.symlink_to(original)
    return RENAMED


def _with_steps(graph, value):
    graph["mm"]["inputs"]["lightning_steps"] = value
    return graph


def test_renamed_lightning_file_samples_with_steps_0_once_lightning_steps_is_set(comfy, renamed):
    auto = comfy.run_error(save_latent(lightning_sampler(with_motion(base(frames=8), module=renamed)), "adl/ren0"))
    message = auto["exception_message"]
    print("steps 0, lightning_steps auto:", message)
    assert auto["node_type"] == "ADL_LightningSampler"
    assert "set lightning_steps on Load Motion Module" in message
    assert "neither its metadata nor its file name" in message

    graph = _with_steps(with_motion(base(frames=8), module=renamed), "4")
    ours = comfy.latent(comfy.run(save_latent(lightning_sampler(graph), "adl/ren4")), "save")
    release = comfy.latent(comfy.run(save_latent(lightning_sampler(with_motion(base(frames=8))), "adl/rel4")), "save")
    print("renamed + lightning_steps 4 vs release name, max |diff|:", float((ours - release).abs().max()))
    assert ours.shape == (8, 4, 8, 8) and torch.equal(ours, release)
    assert "step count set by lightning_steps on Load Motion Module" in comfy.log()


def test_loader_schema_carries_the_rules_and_the_not_downloaded_releases(comfy, renamed):
    info = comfy.get("/object_info/ADL_LoadMotionModule")["ADL_LoadMotionModule"]
    kind, name_input = info["input"]["required"]["name"]
    assert kind == "COMBO" and LIGHTNING_4STEP in name_input["options"] and RENAMED in name_input["options"]
    rules = name_input["adl_rules"]
    print("not_downloaded:", rules["not_downloaded"])
    assert rules["not_downloaded"] == sorted(f"animatediff_lightning_{n}step_comfyui.safetensors" for n in (1, 2, 8))
    assert rules["step_pattern"] and rules["extra_good_steps"] == {"2": [3]} and rules["cfg_warn_above"] == 2.0
    kind, steps_input = info["input"]["optional"]["lightning_steps"]
    assert steps_input["options"] == ["auto", "1", "2", "4", "8"] and steps_input["default"] == "auto"


def test_run_time_warnings_arrive_on_the_websocket_once_per_run(comfy):
    listener = WebSocketListener(comfy)
    try:
        # cfg 8 (and 1 step) on KSampler, and a second KSampler in the same run with the same problems: one
        # warning each
        graph = ksampler(with_motion(base(frames=8)), cfg=8.0, steps=1)
        graph["sampler2"] = dict(graph["sampler"], inputs={**graph["sampler"]["inputs"], "seed": 7})
        graph["save2"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler2", 0],
                                                                 "filename_prefix": "adl/ws_b"}}
        prompt_id = comfy.submit(save_latent(graph, "adl/ws_a"), client_id=listener.client_id)
        listener.wait_for(lambda t, kind, data: kind == "execution_success" and data.get("prompt_id") == prompt_id)
        warnings = [data for _, data in listener.of_type("adlightning.warning") if data["prompt_id"] == prompt_id]
        for w in warnings:
            print("websocket:", w)
        cfg = [w for w in warnings if "cfg 8" in w["message"]]
        assert len(cfg) == 1 and cfg[0]["message"].startswith("[AnimateDiff-Lightning] cfg 8 with the 4-step")
        assert cfg[0]["node"] in ("sampler", "sampler2")
        steps = [w for w in warnings if "sampling 1 steps" in w["message"]]
        assert len(steps) == 1 and "step count read from the file name" in steps[0]["message"]
        assert len(warnings) == 2
        # a snapped denoise on the Lightning Sampler: the widget's word, the value used
        prompt_id = comfy.submit(save_latent(lightning_sampler(with_motion(base(frames=8)), denoise=0.3),
                                             "adl/ws_c"), client_id=listener.client_id)
        listener.wait_for(lambda t, kind, data: kind == "execution_success" and data.get("prompt_id") == prompt_id)
        snapped = [data for _, data in listener.of_type("adlightning.warning") if data["prompt_id"] == prompt_id]
        print("websocket:", snapped)
        assert [w["message"] for w in snapped] == [
            "[AnimateDiff-Lightning] denoise 0.3 is not on the 4-step grid; using 0.25 (1 of 4 steps). Denoise "
            "values on the grid are multiples of 1/4."]
        assert snapped[0]["node"] == "sampler"
    finally:
        listener.close()


def test_offline_pick_of_a_missing_release_fails_in_under_2_seconds(comfy):
    """The session server runs with HF_HUB_OFFLINE=1 (comfy_harness), as a machine without network would."""
    missing = "animatediff_lightning_8step_comfyui.safetensors"
    graph = {"mm": {"class_type": "ADL_LoadMotionModule", "inputs": {"name": missing}},
             "show": {"class_type": "PreviewAny", "inputs": {"source": ["mm", 0]}}}
    listener = WebSocketListener(comfy)
    try:
        prompt_id = comfy.submit(graph, client_id=listener.client_id)
        error_at, _, error = listener.wait_for(
            lambda t, kind, data: kind == "execution_error" and data.get("prompt_id") == prompt_id, timeout=120)
        started_at, _, _ = listener.wait_for(
            lambda t, kind, data: kind == "executing" and data.get("node") == "mm" and data.get("prompt_id") == prompt_id)
    finally:
        listener.close()
    took = error_at - started_at
    print(f"offline pick failed after {took:.3f}s: {error['exception_message']}")
    assert took < 2.0
    message = error["exception_message"]
    assert error["node_type"] == "ADL_LoadMotionModule" and "HF_HUB_OFFLINE is set" in message
    assert f"https://huggingface.co/ByteDance/AnimateDiff-Lightning/resolve/main/{missing}" in message
    assert "animatediff_models" in message and comfy.alive()
