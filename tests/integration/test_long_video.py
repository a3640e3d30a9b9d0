"""Long videos in a real ComfyUI: Context Windows (Lightning) with core's ControlNet, FreeNoise, batched windows, the
vid2vid workflow and the metrics node.

What each window's ControlNet sees is read by a probe: a small custom node pack this module writes into the
server's base directory at run time (test code only, never part of the pack; the server is restarted once to load
it). ``ADLTestProbeControlNet`` wraps a loaded ControlNet so that every ``get_control`` call appends to a JSON-lines
file what the ControlNet actually used: the hint rows (after ComfyUI prepared them), the first pixel of every latent
row and the sigma. ``ADLTestProbeModel`` does the same for every UNet call (an APPLY_MODEL wrapper). The test then
identifies frames independently: hint rows by their grey level (hint frame ``f`` is a flat image of level
``4 (f + 1)``), latent rows at the first step by matching them against the seed's noise.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import CONTROLNET, LIGHTNING_4STEP, SD15, base, lightning_sampler, save_latent, with_motion

from lightning import context, sampling

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROBE_PACK = "adl_test_probe"
PROBE_SOURCE = textwrap.dedent('''
    """Test-only probes for tests/integration/test_long_video.py (written at run time; not part of the pack)."""
    import json

    import comfy.controlnet
    import comfy.patcher_extension


    def _append(path, record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\\n")


    def _record(kind, label, x, t, transformer_options, **extra):
        return {"kind": kind, "label": label, "sigma": float(t.flatten()[0]), "rows": int(x.shape[0]),
                "x_head": x[:, :, 0, 0].float().cpu().tolist(),
                "windows": transformer_options.get("adl_context_windows"),
                "video_length": transformer_options.get("adl_video_length"), **extra}


    class ProbeControlNet(comfy.controlnet.ControlNet):
        probe_path = None
        probe_label = ""

        @classmethod
        def wrap(cls, control, path, label):
            probe = cls(None, global_average_pooling=control.global_average_pooling, load_device=control.load_device,
                        manual_cast_dtype=control.manual_cast_dtype)
            probe.control_model = control.control_model
            probe.control_model_wrapped = control.control_model_wrapped
            control.copy_to(probe)
            probe.probe_path, probe.probe_label = path, label
            return probe

        def copy(self):
            return ProbeControlNet.wrap(self, self.probe_path, self.probe_label)

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            out = super().get_control(x_noisy, t, cond, batched_number, transformer_options)
            hint = self.cond_hint.float()
            _append(self.probe_path, _record("control", self.probe_label, x_noisy, t, transformer_options,
                                             chunks=int(batched_number),
                                             hint_levels=hint[:, 0].mean(dim=(1, 2)).cpu().tolist()))
            return out


    class ProbeControlNetNode:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"control_net": ("CONTROL_NET",), "log_path": ("STRING", {"default": ""}),
                                 "label": ("STRING", {"default": "a"})}}

        RETURN_TYPES = ("CONTROL_NET",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, control_net, log_path, label):
            return (ProbeControlNet.wrap(control_net, log_path, label),)


    class ProbeModelNode:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "log_path": ("STRING", {"default": ""})}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, model, log_path):
            def apply_model(executor, x, t, *args, **kwargs):
                options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
                _append(log_path, _record("model", "unet", x, t, options))
                return executor(x, t, *args, **kwargs)

            model = model.clone()
            model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "adl_test_probe",
                                       apply_model)
            return (model,)


    NODE_CLASS_MAPPINGS = {"ADLTestProbeControlNet": ProbeControlNetNode, "ADLTestProbeModel": ProbeModelNode}
''')

FRAMES = 48
SIZE = 64
STEP_LEVEL = 4  # grey level step between hint frames (0..255)


# --- fixtures and helpers -------------------------------------------------------------------------------------

def write_probe_pack(custom_nodes: Path) -> None:
    pack = custom_nodes / PROBE_PACK
    pack.mkdir(parents=True, exist_ok=True)
    (pack / "__init__.py").write_text(PROBE_SOURCE)


@pytest.fixture(scope="module")
def probed(comfy):
    """The session's server with the probe pack loaded (restarted once if it was started without it)."""
    if "ADLTestProbeControlNet" not in comfy.object_info():
        write_probe_pack(comfy.base / "custom_nodes")
        comfy.stop()
        comfy.start()
    assert "ADLTestProbeControlNet" in comfy.object_info(), comfy.log()[-3000:]
    return comfy


def write_hint_frames(comfy, name: str, frames: int, *, reverse: bool = False) -> str:
    """A multi-page TIFF (lossless) in the input folder: page f is a flat grey image of level 4 (f + 1)."""
    import cv2

    levels = [STEP_LEVEL * (f + 1) for f in range(frames)]
    if reverse:
        levels = levels[::-1]
    pages = [np.full((SIZE, SIZE, 3), level, dtype=np.uint8) for level in levels]
    path = comfy.base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwritemulti(str(path), pages)
    return name


def hint_frames(levels: list[float], *, reverse: bool = False, frames: int = FRAMES) -> list[int]:
    ids = [round(level * 255 / STEP_LEVEL) - 1 for level in levels]
    assert all(abs(level * 255 - STEP_LEVEL * (i + 1)) < 0.5 for level, i in zip(levels, ids)), levels[:4]
    return [frames - 1 - i for i in ids] if reverse else ids


def read_log(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def by_step(records: list[dict], sigmas: list[float]) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for r in records:
        steps.setdefault(context.step_for_sigma(r["sigma"], sigmas), []).append(r)
    return steps


def noise_frames(x_head: list[list[float]], noise: torch.Tensor, sigma: float) -> list[int]:
    """Which frame of the seed's noise (scaled by the first sigma) each latent row is."""
    heads = noise[:, :, 0, 0] * sigma
    found = []
    for row in torch.tensor(x_head):
        distance = (heads - row).abs().amax(dim=1)
        frame = int(distance.argmin())
        assert float(distance[frame]) <= 1e-4 * float(row.abs().max()) + 1e-6, "row is not a noise frame"
        found.append(frame)
    return found


def context_windows(graph: dict, model=("apply", 0), **options) -> dict:
    graph = dict(graph)
    inputs = {"context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
              "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "freenoise": True,
              "max_windows_per_call": 0}
    inputs.update(options)
    graph["cw"] = {"class_type": "ADL_ContextWindows", "inputs": {"model": list(model), **inputs}}
    return graph


def with_probed_controlnet(graph: dict, log: Path, hint_file: str, *, chain_hint_file: str | None = None) -> dict:
    graph = dict(graph)
    graph["cnl"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    layers = [("a", hint_file)] + ([("b", chain_hint_file)] if chain_hint_file else [])
    positive, negative = ["pos", 0], ["neg", 0]
    for label, hint in layers:
        graph[f"hint_{label}"] = {"class_type": "LoadImage", "inputs": {"image": hint}}
        graph[f"probe_{label}"] = {"class_type": "ADLTestProbeControlNet",
                                   "inputs": {"control_net": ["cnl", 0], "log_path": str(log), "label": label}}
        graph[f"cna_{label}"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": [f"probe_{label}", 0],
            "image": [f"hint_{label}", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        positive, negative = [f"cna_{label}", 0], [f"cna_{label}", 1]
    graph["sampler"]["inputs"]["positive"] = positive
    graph["sampler"]["inputs"]["negative"] = negative
    return graph


def with_model_probe(graph: dict, log: Path, model=("cw", 0)) -> dict:
    graph = dict(graph)
    graph["probe_model"] = {"class_type": "ADLTestProbeModel", "inputs": {"model": list(model),
                                                                         "log_path": str(log)}}
    graph["sampler"]["inputs"]["model"] = ["probe_model", 0]
    return graph


def seed_noise(frames: int, seed: int) -> torch.Tensor:
    generator = torch.manual_seed(seed)  # comfy.sample.prepare_noise, written out
    return torch.randn([frames, 4, SIZE // 8, SIZE // 8], generator=generator)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- ControlNet hints per window, batched vs sequential -------------------------------------------------------

def test_each_window_controlnet_sees_its_own_hint_frames_batched_and_one_by_one(probed, tmp_path):
    comfy = probed
    hints = write_hint_frames(comfy, "adl_hints_48.tiff", FRAMES)
    reversed_hints = write_hint_frames(comfy, "adl_hints_48_rev.tiff", FRAMES, reverse=True)
    seed, denoise = 11, 0.5
    sigmas = sampling.strength_sigmas(4, denoise).tolist()  # [2.28, 0.87, 0]: two steps
    expected_windows = context.windows(FRAMES, 16, 4)
    assert expected_windows == [list(range(s, s + 16)) for s in (0, 12, 24, 32)]
    noise = seed_noise(FRAMES, seed)
    latents = {}
    for mode, cap in (("batched", 0), ("one_by_one", 1)):
        log = tmp_path / f"{mode}.jsonl"
        graph = context_windows(with_motion(base(frames=FRAMES, size=SIZE)), freenoise=False,
                                max_windows_per_call=cap)
        graph = lightning_sampler(graph, model=("cw", 0), seed=seed, denoise=denoise)
        graph = with_probed_controlnet(graph, log, hints, chain_hint_file=reversed_hints)
        latents[mode] = comfy.latent(comfy.run(save_latent(graph, f"adl/cw_{mode}")), "save")
        records = read_log(log, "control")
        for label in ("a", "b"):
            steps = by_step([r for r in records if r["label"] == label], sigmas)
            assert sorted(steps) == [0, 1]
            for step, calls in steps.items():
                if cap == 1:
                    assert len(calls) == len(expected_windows)
                else:  # as many per call as free memory allows: all four here, unless the machine is short of RAM
                    assert len(calls) < len(expected_windows), (step, len(calls))
                # the windows ComfyUI ran at this step are the schedule's, in order, each call one length
                assert [w for r in calls for w in r["windows"]] == context.windows(FRAMES, 16, 4, step=step)
                for r in calls:
                    frames = [f for w in r["windows"] for f in w]
                    assert r["video_length"] == 16 and r["rows"] == len(frames) * r["chunks"]
                    # the hint rows this ControlNet used are exactly the call's frames (every cond chunk)
                    assert hint_frames(r["hint_levels"], reverse=label == "b") == frames * r["chunks"]
                    if step == 0:  # ...and so are the latent rows, identified by their noise
                        assert noise_frames(r["x_head"], noise, sigmas[0]) == frames * r["chunks"]
    assert latents["batched"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    difference = relative(latents["batched"], latents["one_by_one"])
    print(f"batched vs one window per call: relative difference {difference:.2e}")
    assert difference <= 1e-5
    assert bool(torch.isfinite(latents["batched"]).all())


def test_cond_and_uncond_of_a_window_share_one_call_with_their_hints(probed, tmp_path):
    """At cfg > 1 ComfyUI runs cond and uncond in one call only if they share the control object; our per-window
    view must keep that sharing, and both halves of the call must see the window's hints."""
    comfy = probed
    frames, seed, denoise = 20, 4, 0.25
    hints = write_hint_frames(comfy, "adl_hints_20.tiff", frames)
    sigma = sampling.strength_sigmas(4, denoise).tolist()[0]
    log = tmp_path / "cfg.jsonl"
    graph = context_windows(with_motion(base(frames=frames, size=SIZE)), freenoise=False, max_windows_per_call=1)
    graph = with_probed_controlnet(lightning_sampler(graph, model=("cw", 0), seed=seed, cfg=2.0, denoise=denoise),
                                   log, hints)
    comfy.run(save_latent(graph, "adl/cw_cfg"))
    calls = read_log(log, "control")
    assert [w for r in calls for w in r["windows"]] == context.windows(frames, 16, 4)
    noise = seed_noise(frames, seed)
    for r in calls:
        window = r["windows"][0]
        assert r["chunks"] == 2 and r["rows"] == 32
        assert hint_frames(r["hint_levels"], frames=frames) == window * 2
        assert noise_frames(r["x_head"], noise, sigma) == window * 2


# --- context_length >= frames ---------------------------------------------------------------------------------

def test_clip_within_context_length_equals_no_windows_exactly(comfy):
    plain = lightning_sampler(with_motion(base(frames=16, size=SIZE)), seed=5, denoise=0.5)
    without = comfy.latent(comfy.run(save_latent(plain, "adl/cw_off")), "save")
    graph = lightning_sampler(context_windows(with_motion(base(frames=16, size=SIZE)), freenoise=True), seed=5,
                              model=("cw", 0), denoise=0.5)
    within = comfy.run(save_latent(graph, "adl/cw_on"))
    assert "sampler" not in within.cached_nodes()
    assert torch.equal(comfy.latent(within, "save"), without)


# --- FreeNoise ------------------------------------------------------------------------------------------------

def test_freenoise_is_applied_by_seed_and_reproducible(probed, tmp_path):
    comfy = probed
    frames, denoise = 20, 0.25  # two windows, one step
    sigma = sampling.strength_sigmas(4, denoise).tolist()[0]
    runs = {}
    for name, seed in (("a", 7), ("a_again", 7), ("b", 8)):
        log = tmp_path / f"{name}.jsonl"  # a new log file makes ComfyUI run the sampler again
        graph = lightning_sampler(context_windows(with_motion(base(frames=frames, size=SIZE)), freenoise=True),
                                  model=("cw", 0), seed=seed, denoise=denoise)
        graph = with_model_probe(graph, log)
        result = comfy.run(save_latent(graph, f"adl/freenoise_{name}"))
        assert "sampler" not in result.cached_nodes()
        runs[name] = (comfy.latent(result, "save"), read_log(log, "model"))
    for name, seed in (("a", 7), ("b", 8)):
        noise = seed_noise(frames, seed)
        shuffled = context.freenoise(noise, 16, 4, seed=seed)
        assert not torch.equal(shuffled[16:], noise[16:])
        calls = runs[name][1]
        assert [w for call in calls for w in call["windows"]] == context.windows(frames, 16, 4)
        for call in calls:  # the latent rows each call started from are the FreeNoise rows of its frames
            frames_in_call = [f for w in call["windows"] for f in w]
            expected = shuffled[frames_in_call][:, :, 0, 0] * sigma
            torch.testing.assert_close(torch.tensor(call["x_head"]), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(runs["a"][0], runs["a_again"][0])
    assert relative(runs["a"][0], runs["b"][0]) > 1e-2


# --- ComfyUI core's own context windows -----------------------------------------------------------------------

def test_core_context_windows_fail_on_frame_batches_which_is_why_we_have_our_own(comfy):
    """ComfyUI 0.3.64's ContextWindowsManual looks the step up by comparing the per-frame sigma vector with the
    sigma list, which only works when the clip has as many frames as the list has sigmas."""
    version = comfy.get("/system_stats")["system"].get("comfyui_version", "")
    if version != "0.3.64":
        pytest.skip(f"checked on ComfyUI 0.3.64; this is {version}")
    graph = with_motion(base(frames=20, size=SIZE))
    graph["core_cw"] = {"class_type": "ContextWindowsManual", "inputs": {
        "model": ["apply", 0], "context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
        "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 0}}
    error = comfy.run_error(save_latent(lightning_sampler(graph, model=("core_cw", 0), denoise=0.5), "adl/core_cw"))
    assert "must match the size of tensor" in error["exception_message"], error["exception_message"]


# --- the vid2vid workflow -------------------------------------------------------------------------------------

def write_video(path: Path, frames: list[np.ndarray], fps: float = 8.0) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0]))
    for frame in frames:
        writer.write(frame[:, :, ::-1].copy())
    writer.release()
    assert path.stat().st_size > 0


def test_vid2vid_workflow_runs_and_writes_a_video(comfy):
    import cv2
    from workflow_tools import live_schemas, to_api

    frames = 18
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    source = [np.stack([(xx * 4 + 9 * f) % 256, (yy * 4) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
              for f in range(frames)]
    poses = []
    for f in range(frames):
        pose = np.zeros((SIZE, SIZE, 3), np.uint8)
        cv2.line(pose, (32, 10), (20 + f, 54), (255, 0, 0), 3)
        cv2.circle(pose, (32, 10), 5, (0, 255, 0), -1)
        poses.append(pose)
    token = uuid.uuid4().hex[:8]
    write_video(comfy.base / "input" / f"adl_src_{token}.mp4", source)
    pose_dir = comfy.base / "input" / f"adl_poses_{token}"
    pose_dir.mkdir(parents=True)
    for f, pose in enumerate(poses):  # unpadded numbers: only a natural-order loader keeps them in sequence
        cv2.imwrite(str(pose_dir / f"pose_{f}.png"), pose[:, :, ::-1])

    workflow = json.loads((REPO / "workflows" / "vid2vid_pose_controlnet.json").read_text())
    ids = {n.get("title", n["type"]): n["id"] for n in workflow["nodes"]}
    overrides = {
        (ids["Source video"], "file"): f"adl_src_{token}.mp4",
        (ids["Pose frames (one per source frame)"], "folder"): pose_dir.name,
        ("ImageScale", "width"): SIZE, ("ImageScale", "height"): SIZE,
        ("CheckpointLoaderSimple", "ckpt_name"): SD15,
        ("ControlNetLoader", "control_net_name"): CONTROLNET,
        ("ADL_LoadMotionModule", "name"): LIGHTNING_4STEP,
        ("ADL_LightningSampler", "denoise"): 0.5,
        ("SaveVideo", "filename_prefix"): f"adl/vid2vid_{token}",
    }
    prompt = to_api(workflow, live_schemas(comfy.object_info()), overrides)
    result = comfy.run(prompt)
    save_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "SaveVideo"))
    (item,) = result.outputs[save_id]["images"]
    video = cv2.VideoCapture(str(comfy.output_file(item)))
    count = 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        assert frame.shape[:2] == (SIZE, SIZE)
        count += 1
    assert count == frames
    metrics_id = str(next(n["id"] for n in workflow["nodes"] if n["type"] == "ADL_VideoMetrics"))
    (plot,) = result.outputs[metrics_id]["images"]
    assert comfy.base.joinpath("temp", plot["subfolder"], plot["filename"]).stat().st_size > 1000


def test_video_metrics_node_returns_the_numbers_of_lightning_metrics_and_a_plot(comfy):
    from lightning import metrics

    frames = 40
    name = write_hint_frames(comfy, "adl_metrics_40.tiff", frames)  # flat grey frames, +4 levels per frame
    graph = {
        "frames": {"class_type": "LoadImage", "inputs": {"image": name}},
        "metrics": {"class_type": "ADL_VideoMetrics", "inputs": {
            "images": ["frames", 0], "flow_method": "farneback", "context_length": 16, "context_overlap": 4,
            "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False}},
    }
    for slot, output in enumerate(("flicker", "warp_error", "seam_score", "report")):
        graph[output] = {"class_type": "PreviewAny", "inputs": {"source": ["metrics", slot]}}
    result = comfy.run(graph)
    shown = {k: result.outputs[k]["text"][0] for k in ("flicker", "warp_error", "seam_score", "report")}
    video = torch.tensor([[[[STEP_LEVEL * (f + 1)] * 3] * SIZE] * SIZE for f in range(frames)],
                         dtype=torch.uint8)
    expected = metrics.video_metrics(video, context.windows(frames, 16, 4), "farneback")
    report = json.loads(shown["report"])
    assert report["seam"]["border_transitions"] == expected["seam"]["border_transitions"]
    assert float(shown["flicker"]) == pytest.approx(STEP_LEVEL / 255, rel=1e-5)
    assert float(shown["flicker"]) == pytest.approx(expected["flicker"]["mean"], rel=1e-6)
    assert float(shown["seam_score"]) == pytest.approx(1.0, rel=1e-5)  # every step is the same: no seams
    assert float(shown["warp_error"]) == pytest.approx(expected["warp"]["mean"], rel=1e-4, abs=1e-6)
    (plot,) = result.outputs["metrics"]["images"]
    assert comfy.base.joinpath("temp", plot["subfolder"], plot["filename"]).stat().st_size > 1000
