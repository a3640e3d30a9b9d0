"""Generation in a real ComfyUI: text-to-video in 4 steps, no leaks into the shared model, parity with Evolved,
and clear node errors for wrong inputs while the server keeps serving."""

import pytest
import torch

from graphs import (LIGHTNING_4STEP, SD2_UNET, SDXL_MODULE, base, ksampler, lightning_sampler, save_latent,
                    with_motion)

pytestmark = pytest.mark.integration


def test_txt2vid_4_steps_gives_16_frames_that_the_motion_module_shaped(comfy):
    result = comfy.run(save_latent(lightning_sampler(with_motion(base())), "adl/txt2vid"))
    video = comfy.latent(result, "save")
    assert video.shape == (16, 4, 8, 8)
    assert bool(torch.isfinite(video).all())
    without = comfy.latent(comfy.run(save_latent(lightning_sampler(base(), model=("ckpt", 0), steps=4),
                                                 "adl/txt2vid_plain")), "save")
    assert without.shape == video.shape
    assert (video - without).norm() / without.norm() > 1e-2


def test_plain_graph_after_a_patched_run_is_bit_identical_to_a_never_patched_run(comfy):
    never_patched = comfy.latent(comfy.run(save_latent(ksampler(base(), model=("ckpt", 0)), "adl/plain_a")),
                                 "save")
    comfy.run(save_latent(ksampler(with_motion(base())), "adl/patched"))
    after = comfy.run(save_latent(ksampler(base(), model=("ckpt", 0)), "adl/plain_b"))
    assert "sampler" not in after.cached_nodes(), "the plain sampler must really run again"
    assert "ckpt" in after.cached_nodes(), "the test is only meaningful on the same (shared) loaded model"
    assert torch.equal(comfy.latent(after, "save"), never_patched)


def test_same_latents_as_animatediff_evolved_gen1(comfy, evolved_available):
    ours = comfy.latent(comfy.run(save_latent(ksampler(with_motion(base())), "adl/parity_ours")), "save")
    graph = base()
    graph["ade"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
        "model": ["ckpt", 0], "model_name": LIGHTNING_4STEP, "beta_schedule": "sqrt_linear (AnimateDiff)"}}
    theirs = comfy.latent(comfy.run(save_latent(ksampler(graph, model=("ade", 0)), "adl/parity_ade")), "save")
    assert ours.shape == theirs.shape == (16, 4, 8, 8)
    scale = theirs.abs().max()
    difference = float((ours - theirs).abs().max() / scale)
    print(f"max |ours - Evolved| / max |Evolved| = {difference:.3g}")
    assert difference <= 1e-4
    # and not trivially: the motion module moved the latents far more than the tolerance
    plain = comfy.latent(comfy.run(save_latent(ksampler(base(), model=("ckpt", 0)), "adl/parity_plain")), "save")
    assert float((plain - theirs).abs().max() / scale) > 100 * max(difference, 1e-6)


@pytest.mark.parametrize("name,expected", [
    (SDXL_MODULE, "SDXL"),
    ("motion_lora_in_wrong_folder.ckpt", "motion LoRA"),
])
def test_wrong_motion_files_give_our_error_and_the_server_keeps_serving(comfy, name, expected):
    error = comfy.run_error(save_latent(lightning_sampler(with_motion(base(), module=name)), "adl/err"))
    assert error["node_type"] == "ADL_LoadMotionModule"
    assert expected in error["exception_message"] and name in error["exception_message"]
    assert comfy.alive() and "system" in comfy.get("/system_stats")


def test_non_sd15_model_gives_our_error(comfy):
    graph = base()
    graph["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": SD2_UNET, "weight_dtype": "default"}}
    graph = with_motion(graph)
    graph["apply"]["inputs"]["model"] = ["unet", 0]
    error = comfy.run_error(save_latent(ksampler(graph), "adl/err_sd2"))
    assert error["node_type"] == "ADL_ApplyMotionModule"
    assert "not Stable Diffusion 1.5" in error["exception_message"] and "SD2" in error["exception_message"]
    assert comfy.alive() and "system" in comfy.get("/system_stats")


def test_motion_lora_changes_the_video_and_leaves_no_trace(comfy):
    from graphs import MOTION_LORA

    plain = comfy.latent(comfy.run(save_latent(lightning_sampler(with_motion(base(), scale=1.0)), "adl/nolora_a")),
                         "save")
    graph = with_motion(base(), scale=1.0)
    graph["lora"] = {"class_type": "ADL_LoadMotionLoRA", "inputs": {"name": MOTION_LORA, "strength": 0.8}}
    graph["apply"]["inputs"]["motion_lora"] = ["lora", 0]
    with_lora = comfy.latent(comfy.run(save_latent(lightning_sampler(graph), "adl/lora")), "save")
    assert bool(torch.isfinite(with_lora).all())
    assert (with_lora - plain).norm() / plain.norm() > 1e-3
    # the LoRA was a weight patch on our module's own ModelPatcher: without it, the output is bit-identical again
    again = comfy.run(save_latent(lightning_sampler(with_motion(base(), scale=1.0)), "adl/nolora_b"))
    assert "sampler" not in again.cached_nodes()
    assert torch.equal(comfy.latent(again, "save"), plain)


def test_too_many_frames_without_context_windows_is_a_clear_error(comfy):
    error = comfy.run_error(save_latent(lightning_sampler(with_motion(base(frames=40))), "adl/err_frames"))
    assert error["node_type"] == "ADL_LightningSampler"
    assert "40 frames" in error["exception_message"] and "Context Windows" in error["exception_message"]
    assert comfy.alive()


def test_guard_rail_warnings_reach_the_log(comfy):
    start = len(comfy.log())
    comfy.run(save_latent(ksampler(with_motion(base(frames=4)), steps=2, scheduler="normal"), "adl/warn"))
    log = comfy.log()[start:]
    assert "only 4 frame(s)" in log
    assert "off the grid Lightning was distilled on" in log and "breaks few-step sampling" in log
    start = len(comfy.log())
    comfy.run(save_latent(lightning_sampler(with_motion(base(frames=8)), steps=8, denoise=0.6), "adl/warn2"))
    log = comfy.log()[start:]
    assert "sampling 8 steps with the 4-step Lightning module" in log
    assert "denoise 0.6 is not on the 8-step grid; using 0.625" in log


def test_released_module_is_downloaded_through_the_loader_from_the_hub(tmp_path_factory):
    """A fresh server whose hub is a loopback fake serving our full-size random module as the 2-step release."""
    import os

    from comfy_harness import ComfyServer, comfyui_path
    from fake_hub import FakeHub
    from fixture_files import fixture_models

    fixtures = fixture_models()
    module = fixtures["animatediff_models"][LIGHTNING_4STEP]
    wanted = "animatediff_lightning_2step_comfyui.safetensors"
    hub = FakeHub({f"ByteDance/AnimateDiff-Lightning/{wanted}": module})
    models = {k: v for k, v in fixtures.items() if k != "animatediff_models"}
    server = ComfyServer(comfyui_path(), tmp_path_factory.mktemp("comfy_hub"), models=models)
    server.start(env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": hub.endpoint,
                      "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(server.base / "hf_home")})
    try:
        graph = save_latent(lightning_sampler(with_motion(base(frames=8), module=wanted)), "adl/downloaded")
        result = server.run(graph)
        target = server.base / "models" / "animatediff_models" / wanted
        assert target.is_file() and target.stat().st_size == os.path.getsize(module)
        assert any(method == "GET" and path.endswith(wanted) for method, path in hub.requests)
        assert server.latent(result, "save").shape[0] == 8
        assert "Lightning 2-step" in server.log()  # the loader read the step count from the downloaded file
        # a release the hub does not have fails with the manual route spelled out
        missing = "animatediff_lightning_8step_comfyui.safetensors"
        error = server.run_error(save_latent(lightning_sampler(with_motion(base(frames=8), module=missing)),
                                             "adl/missing"))
        message = error["exception_message"]
        assert error["node_type"] == "ADL_LoadMotionModule"
        assert f"https://huggingface.co/ByteDance/AnimateDiff-Lightning/resolve/main/{missing}" in message
        assert "animatediff_models" in message and server.alive()
    finally:
        server.stop()
        hub.close()
