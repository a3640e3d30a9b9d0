"""In a real ComfyUI: what a first-time user stumbled on. A renamed Lightning module samples with steps 0
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


def _sigmas_graph(*settings):
    """Load, apply and one Lightning Sigmas node per (steps, denoise): warnings without a single UNet call."""
    graph = with_motion(base(frames=8))
    for i, (steps, denoise) in enumerate(settings):
        graph[f"sigmas{i}"] = {"class_type": "ADL_LightningSigmas",
                               "inputs": {"model": ["apply", 0], "steps": steps, "denoise": denoise}}
        graph[f"show{i}"] = {"class_type": "PreviewAny", "inputs": {"source": [f"sigmas{i}", 0]}}
    return graph


def _warnings(listener, prompt_id):
    return [data for _, data in listener.of_type("adlightning.warning") if data["prompt_id"] == prompt_id]


def test_run_time_warnings_arrive_on_the_websocket_once_per_run(comfy):
    listener = WebSocketListener(comfy)
    done = lambda prompt_id: (lambda t, kind, data: kind in ("execution_success", "execution_error",  # noqa: E731
                                                             "execution_interrupted")
                              and data.get("prompt_id") == prompt_id)
    try:
        # two nodes of one run with the same wrong step count: that warning once; the snapped denoise of each
        prompt_id = comfy.submit(_sigmas_graph((8, 0.3), (8, 0.27)), client_id=listener.client_id)
        listener.wait_for(done(prompt_id))
        warnings = _warnings(listener, prompt_id)
        for w in warnings:
            print("websocket:", w)
        messages = sorted(w["message"] for w in warnings)
        assert len(messages) == 3, messages
        assert messages[1] == ("[AnimateDiff-Lightning] denoise 0.3 is not on the 8-step grid; using 0.25 (2 of 8 "
                               "steps). Denoise values on the grid are multiples of 1/8.")
        assert messages[0].startswith("[AnimateDiff-Lightning] denoise 0.27 is not on the 8-step grid; using 0.25")
        assert messages[2].startswith("[AnimateDiff-Lightning] sampling 8 steps with the 4-step Lightning module "
                                      "(step count read from the file name; if that is wrong, set lightning_steps")
        assert {w["node"] for w in warnings} <= {"sigmas0", "sigmas1"}
        # the next run hears the step warning again
        prompt_id = comfy.submit(_sigmas_graph((8, 0.5)), client_id=listener.client_id)
        listener.wait_for(done(prompt_id))
        assert [w["message"][:40] for w in _warnings(listener, prompt_id)] == [messages[2][:40]]
        # cfg 8 on KSampler: warned when sampling starts (the run is then cut short: the model calls are not
        # what this test is about)
        prompt_id = comfy.submit(save_latent(ksampler(with_motion(base(frames=8)), cfg=8.0, steps=4), "adl/ws_cfg"),
                                 client_id=listener.client_id)
        _, _, cfg = listener.wait_for(lambda t, kind, data: kind == "adlightning.warning"
                                      and data.get("prompt_id") == prompt_id)
        comfy.post("/interrupt", {})
        listener.wait_for(done(prompt_id))
        print("websocket:", cfg)
        assert cfg["message"].startswith("[AnimateDiff-Lightning] cfg 8 with the 4-step Lightning module")
        assert "set cfg to 1" in cfg["message"] and cfg["node"] == "sampler"
        assert len(_warnings(listener, prompt_id)) == 1
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
            lambda t, kind, data: kind == "execution_error" and data.get("prompt_id") == prompt_id)
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
