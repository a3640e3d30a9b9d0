"""Issue 4 in a real ComfyUI: text-to-video in 4 steps, no leaks into the shared model, parity with Evolved,
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
