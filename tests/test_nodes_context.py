"""The ComfyUI-free parts of the Context Windows node (nodes/context_windows.py), with stand-ins for ComfyUI objects.

The stand-ins reproduce only the documented behaviour that matters here (lightning/REFERENCE.md §3, last paragraph): a
ControlNet prepares its hint batch from ``cond_hint_original`` when it has none, and when the hint's row count
differs from the call's it takes the first rows-per-cond-chunk rows (cycling a shorter batch) and repeats them for
every cond chunk; ``_calc_cond_batch`` concatenates the cond chunks' rows and uses the control of the batch. The
real thing is checked in tests/integration/test_long_video.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from workflow_tools import offline_schemas, validate

from lightning import context, metrics
from lightning.errors import InvalidInputError
from nodes import context_windows as cw
from nodes import guards, specs

REPO = Path(__file__).resolve().parents[1]


# --- stand-ins -------------------------------------------------------------------------------------------------

class FakeControl:
    """A ControlNet's hint bookkeeping; its "control" for a row is the row's hint value times a per-net factor."""

    def __init__(self, hint, factor=1.0, previous=None, log=None):
        self.cond_hint_original = hint
        self.cond_hint = None
        self.previous_controlnet = previous
        self.factor = factor
        self.log = [] if log is None else log
        self.strength = 1.0

    def get_control(self, x, chunks):
        previous = self.previous_controlnet.get_control(x, chunks) if self.previous_controlnet else 0.0
        if self.cond_hint is None:
            self.cond_hint = self.cond_hint_original.clone()  # "prepare": scaling would happen here
        if self.cond_hint.shape[0] not in (1, x.shape[0]):
            per_chunk = x.shape[0] // chunks
            rows = [r % self.cond_hint.shape[0] for r in range(per_chunk)]
            self.cond_hint = self.cond_hint[rows].repeat(chunks, 1)
        self.log.append((self.factor, self.cond_hint[:, 0].tolist()))
        return previous + self.factor * self.cond_hint[:, :1].view(-1, 1, 1, 1).expand_as(x)


class FakeCond:
    """``comfy.conds.CONDRegular``'s interface: a ``cond`` tensor, rebuilt with ``_copy_with``."""

    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return FakeCond(cond)


def fake_calc_cond_batch(conds, x, timestep):
    """A frame-local model in ``_calc_cond_batch``'s shape: one output per cond (zeros for None), cond rows
    concatenated into one evaluation with the control of the batch, per-frame embeddings and timesteps."""
    outs = [torch.zeros_like(x) for _ in conds]
    live = [i for i, c in enumerate(conds) if c is not None]
    if not live:
        return outs
    rows = torch.cat([x] * len(live))
    t = torch.cat([timestep] * len(live)).view(-1, 1, 1, 1)
    emb = torch.cat([conds[i][0]["model_conds"]["c_crossattn"].cond.expand(x.shape[0], -1)[:, :1]
                     for i in live]).view(-1, 1, 1, 1)
    control = conds[live[-1]][0].get("control")
    ctrl = control.get_control(rows, len(live)) if control is not None else 0.0
    y = 2.0 * rows + 0.1 * t + emb + ctrl
    for k, i in enumerate(live):
        outs[i] = y[k * x.shape[0]:(k + 1) * x.shape[0]]
    return outs


def make_conds(num_frames, *, per_frame_prompt=True, cfg=True, hint_rows=None, chain=False):
    hint_rows = num_frames if hint_rows is None else hint_rows
    hint = torch.arange(1, hint_rows + 1, dtype=torch.float32).view(-1, 1).repeat(1, 3) / 100
    log = []
    control = FakeControl(hint, 1.0, log=log)
    if chain:  # a second ControlNet applied on top of the first, with its own (reversed) hints
        control = FakeControl(hint.flip(0), 1000.0, previous=control, log=log)
    prompt = torch.arange(num_frames if per_frame_prompt else 1, dtype=torch.float32).view(-1, 1) * 10
    positive = [{"model_conds": {"c_crossattn": FakeCond(prompt)}, "control": control, "uuid": "p"}]
    negative = [{"model_conds": {"c_crossattn": FakeCond(-prompt)}, "control": control, "uuid": "n"}] if cfg else None
    return [positive, negative], control, log


def window_call(calls):
    def call(sub_conds, sub_x, sub_t, windows):
        calls.append([list(w) for w in windows])
        assert len({len(w) for w in windows}) == 1  # one video length per call
        return fake_calc_cond_batch(sub_conds, sub_x, sub_t)
    return call


# --- settings --------------------------------------------------------------------------------------------------

def test_settings_fail_at_the_node_with_the_setting_named():
    assert cw.ContextSettings().windows(40) == context.windows(40)
    with pytest.raises(InvalidInputError, match="overlap 16 must be smaller than context_length 16"):
        cw.ContextSettings(context_length=16, overlap=16)
    with pytest.raises(InvalidInputError, match="unknown context schedule 'uniform'"):
        cw.ContextSettings(schedule="uniform")
    with pytest.raises(InvalidInputError, match="unknown fuse_method 'gauss'"):
        cw.ContextSettings(fuse_method="gauss")
    with pytest.raises(InvalidInputError, match="max_windows_per_call must be 0"):
        cw.ContextSettings(max_windows_per_call=-1)
    cw.ContextSettings(schedule="batched", overlap=20)  # batched ignores the overlap


def test_node_options_are_the_core_lists():
    assert set(specs.CONTEXT_SCHEDULES) == set(context.SCHEDULES)
    assert set(specs.FUSE_METHODS) == set(context.FUSE_METHODS)
    assert specs.resolve_core_options(specs.VIDEO_METRICS.input("flow_method").options) == list(metrics.FLOW_METHODS)
    node = specs.spec_by_id()["ADL_ContextWindows"]
    defaults = {i.id: i.default for i in node.inputs}
    assert defaults == {"model": None, "context_length": 16, "context_overlap": 4,
                        "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False,
                        "fuse_method": "pyramid", "freenoise": True, "max_windows_per_call": 0}
    settings = cw.ContextSettings()
    assert (settings.context_length, settings.overlap, settings.schedule, settings.fuse_method,
            settings.freenoise, settings.max_windows_per_call) == (16, 4, "standard_static", "pyramid", True, 0)


def test_every_step_is_checked_before_sampling():
    broken = cw.ContextSettings(context_length=16, overlap=2, stride=2, schedule="standard_uniform")
    broken.check_clip(34, 4)  # usable at the steps of a 4-step run...
    with pytest.raises(InvalidInputError, match="step=4"):
        broken.check_clip(34, 5)  # ...but not at step 4, which a 5-step run reaches
    broken.check_clip(16, 100)  # one window: nothing to check


def test_memory_estimate_and_window_length_guard():
    assert cw.ContextSettings().frames_per_call(200) == 16
    assert cw.ContextSettings(max_windows_per_call=3).frames_per_call(200) == 48
    assert cw.ContextSettings(max_windows_per_call=3).frames_per_call(40) == 40
    assert cw.ContextSettings().frames_per_call(12) == 12
    cw.check_window_length(cw.ContextSettings(context_length=32), 100, 32)
    cw.check_window_length(cw.ContextSettings(context_length=48), 20, 32)  # the clip is one 20-frame window
    with pytest.raises(guards.VideoLengthError, match="context_length 48 gives windows of 40 frames.*at most 32"):
        cw.check_window_length(cw.ContextSettings(context_length=48), 40, 32)


def test_call_plan_from_free_memory_and_cap():
    ws = context.windows(100, 16, 4)  # 8 windows of 16
    assert cw.call_plan(ws, cw.ContextSettings(), frame_bytes=None, free_memory=None) == [list(range(8))]
    # 1.5x margin: 3 windows need 4800 bytes * 1.5 = 7200; 7000 free fits two per call
    plan = cw.call_plan(ws, cw.ContextSettings(), frame_bytes=100, free_memory=7000)
    assert max(len(b) for b in plan) == 2 and [k for b in plan for k in b] == list(range(8))
    plan = cw.call_plan(ws, cw.ContextSettings(max_windows_per_call=1), frame_bytes=100, free_memory=1e12)
    assert plan == [[k] for k in range(8)]


def test_step_from_sigma_with_fallbacks():
    sigmas = torch.tensor([25.1, 6.5, 2.3, 0.87, 0.0])
    assert cw.current_step(torch.full((48,), 2.3), sigmas) == 2
    assert cw.current_step(torch.full((48,), 2.3), None) == 0
    assert cw.current_step(torch.full((48,), 30.0), sigmas) == 0  # a churned sigma above the list
    assert cw.current_step(torch.full((48,), 4.0), sigmas) == 1


def test_freenoise_only_where_windows_are_used_and_by_seed():
    noise = torch.randn(40, 4, 2, 2)
    on = cw.ContextSettings()
    a = cw.initial_noise(noise, on, 7)
    assert torch.equal(a, context.freenoise(noise, 16, 4, seed=7))
    assert torch.equal(a, cw.initial_noise(noise, on, 7)) and not torch.equal(a, cw.initial_noise(noise, on, 8))
    assert not torch.equal(a, noise) and torch.equal(a[:16], noise[:16])
    assert cw.initial_noise(noise, cw.ContextSettings(freenoise=False), 7) is noise
    short = noise[:16]
    assert cw.initial_noise(short, on, 7) is short  # a clip within one window is sampled as without windows
    batched = cw.ContextSettings(schedule="batched", overlap=4)  # windows without overlap, whatever it says
    assert torch.equal(cw.initial_noise(noise, batched, 1), context.freenoise(noise, 16, 0, seed=1))


# --- slicing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hint_count, num_frames", [(48, 48), (60, 48), (10, 48), (1, 48)])
def test_hint_rows_are_the_rows_comfyui_pairs_with_each_frame_without_windows(hint_count, num_frames):
    hint = torch.arange(hint_count)
    # ComfyUI without windows: the first num_frames rows, a shorter batch repeated from its start
    paired = hint if hint_count == 1 else torch.cat([hint] * (num_frames // hint_count + 1))[:num_frames]
    frames = [30, 31, 47, 0, 5]
    rows = cw.hint_rows(hint_count, frames)
    if hint_count == 1:
        assert rows is None
    else:
        assert hint[rows].tolist() == paired[frames].tolist()


def test_window_control_slices_the_whole_chain_and_leaves_the_originals_alone():
    num_frames = 40
    _, control, _ = make_conds(num_frames, chain=True)
    first = control.previous_controlnet
    original_hints = (control.cond_hint_original.clone(), first.cond_hint_original.clone())
    control.cond_hint = torch.zeros(40, 3)  # prepared for other frames: must not leak into a window
    frames = [12, 13, 14, 39]
    memo = {}
    view = cw.window_control(control, frames, memo)
    assert view is not control and view.previous_controlnet is not first
    assert view.cond_hint is None and view.previous_controlnet.cond_hint is None
    assert torch.equal(view.cond_hint_original, original_hints[0][frames])
    assert torch.equal(view.previous_controlnet.cond_hint_original, original_hints[1][frames])
    assert cw.window_control(control, frames, memo) is view  # cond and uncond keep sharing one object
    assert torch.equal(control.cond_hint_original, original_hints[0]) and control.cond_hint is not None
    assert torch.equal(first.cond_hint_original, original_hints[1]) and control.previous_controlnet is first
    single = FakeControl(torch.ones(1, 3))
    assert torch.equal(cw.window_control(single, frames, {}).cond_hint_original, single.cond_hint_original)
    assert cw.window_control(None, frames, {}) is None


def test_per_frame_conds_are_sliced_and_shared_ones_kept():
    num_frames = 20
    per_frame = torch.randn(num_frames, 77, 8)
    shared = torch.randn(1, 77, 8)
    mask = torch.rand(num_frames, 4, 4)
    cond = {"model_conds": {"c_crossattn": FakeCond(per_frame), "y": FakeCond(shared)}, "mask": mask,
            "pooled_output": torch.randn(1, 8), "strength": 0.5, "uuid": "u"}
    frames = [3, 4, 5, 19]
    out = cw.slice_cond(cond, frames, num_frames, {})
    assert torch.equal(out["model_conds"]["c_crossattn"].cond, per_frame[frames])
    assert out["model_conds"]["y"] is cond["model_conds"]["y"]
    assert torch.equal(out["mask"], mask[frames]) and out["pooled_output"] is cond["pooled_output"]
    assert out["strength"] == 0.5 and out["uuid"] == "u"
    assert cond["mask"] is mask and cond["model_conds"]["c_crossattn"].cond is per_frame  # input untouched
    assert cw.slice_conds([[cond], None], frames, num_frames)[1] is None


# --- the window loop -------------------------------------------------------------------------------------------

CASES = [("standard_static", 1, False), ("standard_uniform", 1, False), ("looped_uniform", 2, True),
         ("batched", 1, False)]


@pytest.mark.parametrize("schedule, stride, closed_loop", CASES)
@pytest.mark.parametrize("fuse_method", context.FUSE_METHODS)
@pytest.mark.parametrize("cap", [1, 0])
def test_frame_local_model_with_per_frame_hints_reproduces_the_full_clip(schedule, stride, closed_loop,
                                                                         fuse_method, cap):
    num_frames = 45
    settings = cw.ContextSettings(context_length=12, overlap=3, stride=stride, closed_loop=closed_loop,
                                  schedule=schedule, fuse_method=fuse_method, max_windows_per_call=cap)
    conds, _, _ = make_conds(num_frames, chain=True)
    x = torch.randn(num_frames, 2, 2, 2)
    t = torch.full((num_frames,), 6.5)
    full = fake_calc_cond_batch(conds, x, t)
    step = 3
    calls = []
    fused = cw.run_windows(window_call(calls), conds, x, t, settings, step)
    windows = settings.windows(num_frames, step)
    assert [w for call in calls for w in call] == windows
    assert len(calls) == (len(windows) if cap == 1 else len(context.plan_batches(windows)))
    for a, b in zip(fused, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_each_call_sees_the_hints_of_its_own_frames_for_cond_and_uncond():
    num_frames = 48
    conds, control, log = make_conds(num_frames, chain=True)
    x = torch.randn(num_frames, 2, 2, 2)
    calls = []
    cw.run_windows(window_call(calls), conds, x, torch.ones(num_frames), cw.ContextSettings(max_windows_per_call=2),
                   0)
    assert len(calls) == 2  # four windows, two per call
    hints = control.cond_hint_original[:, 0].tolist()
    first_hints = control.previous_controlnet.cond_hint_original[:, 0].tolist()
    for k, windows in enumerate(calls):
        frames = [f for w in windows for f in w]
        (f_first, seen_first), (f_top, seen_top) = log[2 * k], log[2 * k + 1]  # the chain runs bottom-up
        assert (f_first, f_top) == (1.0, 1000.0)
        assert seen_first == [first_hints[f] for f in frames] * 2  # cond rows, then uncond rows
        assert seen_top == [hints[f] for f in frames] * 2
    assert control.cond_hint is None  # the original was never prepared for a window


def test_without_hint_slicing_windows_would_get_the_first_frames():
    # what core's context windows do (A6): the same stand-ins, hints left whole -> frames after the first
    # window get the wrong control, so the previous tests can fail
    num_frames = 40
    conds, _, _ = make_conds(num_frames)
    x = torch.randn(num_frames, 2, 2, 2)
    t = torch.ones(num_frames)
    full = fake_calc_cond_batch(conds, x, t)
    original = cw.window_control
    try:
        cw.window_control = lambda control, frames, memo: control
        fused = cw.run_windows(window_call([]), conds, x, t, cw.ContextSettings(max_windows_per_call=1), 0)
    finally:
        cw.window_control = original
    assert torch.allclose(fused[0][:12], full[0][:12])
    assert not torch.allclose(fused[0][16:], full[0][16:], atol=1e-3)


def test_hints_shorter_than_the_clip_and_single_hints_follow_comfyui_pairing():
    num_frames = 40
    for hint_rows in (7, 1):
        conds, _, _ = make_conds(num_frames, hint_rows=hint_rows, cfg=False, per_frame_prompt=False)
        x = torch.randn(num_frames, 2, 2, 2)
        t = torch.ones(num_frames)
        full = fake_calc_cond_batch(conds, x, t)
        fused = cw.run_windows(window_call([]), conds, x, t, cw.ContextSettings(), 0)
        torch.testing.assert_close(fused[0], full[0])
        assert torch.equal(fused[1], torch.zeros_like(x))  # no uncond at cfg 1: ComfyUI's zeros, fused


def test_cancel_is_checked_before_every_call():
    num_frames = 40
    conds, _, _ = make_conds(num_frames, cfg=False)
    checks = []

    def interrupt():
        checks.append(1)
        if len(checks) == 2:
            raise KeyboardInterrupt("cancelled")

    calls = []
    with pytest.raises(KeyboardInterrupt):
        cw.run_windows(window_call(calls), conds, torch.randn(num_frames, 1, 1, 1), torch.ones(num_frames),
                       cw.ContextSettings(max_windows_per_call=1), 0, interrupt=interrupt)
    assert len(calls) == 1  # the second window never ran


# --- the vid2vid workflow ---------------------------------------------------------------------------------------

def test_vid2vid_workflow_wires_fps_into_create_video_as_a_widget_input():
    workflow = json.loads((REPO / "workflows" / "vid2vid_pose_controlnet.json").read_text())
    types = {n["type"] for n in workflow["nodes"]}
    assert {"LoadVideo", "GetVideoComponents", "ControlNetApplyAdvanced", "ADL_ContextWindows",
            "ADL_LightningSampler", "CreateVideo", "SaveVideo"} <= types
    create = next(n for n in workflow["nodes"] if n["type"] == "CreateVideo")
    fps = next(i for i in create["inputs"] if i["name"] == "fps")
    assert fps["widget"] == {"name": "fps"} and fps["link"] is not None
    sampler = next(n for n in workflow["nodes"] if n["type"] == "ADL_LightningSampler")
    assert sampler["widgets_values"][-1] in (0.25, 0.5, 0.75)  # denoise on the 4-step module's grid
    schemas = offline_schemas()
    assert validate(workflow, schemas) == []
    del fps["widget"]  # how a link into a widget must not be stored: the frontend would add a second fps socket
    assert any("'fps' is a widget" in p for p in validate(workflow, schemas))
