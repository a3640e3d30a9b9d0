"""lightning.context against ComfyUI core / AnimateDiff-Evolved (recorded values) and against its own contract.

The reference values in tests/data/context_reference/reference.json.gz were produced by running core's and
Evolved's code (generate.py there); nothing here imports either project.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning import context
from lightning.errors import InvalidInputError

REFERENCE = Path(__file__).parent / "data" / "context_reference" / "reference.json.gz"


@pytest.fixture(scope="module")
def reference():
    with gzip.open(REFERENCE, "rt") as f:
        return json.load(f)


def _usable(windows, num_frames):
    """What core/Evolved could actually sample with: indices in range and every frame covered."""
    flat = [i for w in windows for i in w]
    return all(0 <= i < num_frames for i in flat) and len(set(flat)) == num_frames


def _fake_x(num_frames):
    # the generator's x (see the reference header): exact in float32
    f = torch.arange(num_frames).view(num_frames, 1, 1, 1)
    c = torch.arange(2).view(1, 2, 1, 1)
    return (((7 * f + 3 * c) % 11) - 5).to(torch.float32) / 4


def _fake_model():
    """The generator's fake model: window number k's output depends on k, so windows disagree where they overlap."""
    calls = [0]

    def model_fn(x_windows, windows):
        outs = ([], [])
        pos = torch.arange(x_windows.shape[1], dtype=torch.float32).view(-1, 1, 1, 1)
        for b in range(x_windows.shape[0]):
            k = calls[0]
            for i in range(2):
                outs[i].append((1 - 2 * i) * x_windows[b] * (1 + 0.25 * k) + 0.01 * (i + 1) * pos)
            calls[0] += 1
        return [torch.stack(o) for o in outs]

    return model_fn


def _frame_local(x):
    """No temporal mixing; values kept away from 0 so overlap-linear's 1e-37 weights stay out of subnormals."""
    return 2.0 + torch.tanh(x) * torch.cos(x)


# ---------------------------------------------------------------------------------------------------------------
# Reference data: windows, weights, fusion, FreeNoise
# ---------------------------------------------------------------------------------------------------------------

def test_reference_grid_covers_every_parameter_value(reference):
    rows = reference["windows"]
    columns = list(zip(*[r[:7] for r in rows]))
    assert set(columns[0]) == set(context.SCHEDULES)
    assert set(columns[1]) == set(range(17, 201))
    assert set(columns[2]) == set(range(8, 33))
    assert set(columns[3]) == set(range(0, 9))
    assert set(columns[4]) == {1, 2, 3}
    assert set(columns[5]) == {0, 1}
    assert set(columns[6]) == set(range(0, 21))
    header = reference["header"]
    assert header["comfyui_commit"].startswith("a125cd84") and header["evolved_commit"].startswith("90fb133")
    assert header["disagreements"] == {"windows": [], "weights": [], "fusion": []}


def test_windows_equal_core_and_evolved(reference):
    mismatches, should_raise, usable_count = [], [], 0
    for schedule, frames, length, overlap, stride, closed, step, ref in reference["windows"]:
        kwargs = dict(num_frames=frames, context_length=length, overlap=overlap, stride=stride,
                      closed_loop=bool(closed), schedule=schedule, step=step)
        if isinstance(ref, list) and _usable(ref, frames):
            usable_count += 1
            # frames == length: the reference rows hold the raw schedule, which core never runs there and Evolved
            # runs only with use_on_equal_length
            ours = context.windows(**kwargs, use_on_equal_length=True)
            if ours != ref:
                mismatches.append(kwargs)
            if frames <= length:
                assert context.windows(**kwargs) == [list(range(frames))]
        else:
            try:
                context.windows(**kwargs)
                should_raise.append(kwargs)
            except InvalidInputError as error:
                if isinstance(ref, list):
                    # core/Evolved ran but their windows are unusable: only the standard_uniform corner at
                    # stride > 1, refused with the fix (rows where they raised may be refused for any named reason)
                    assert schedule == "standard_uniform" and stride > 1, kwargs
                    assert str(error).endswith("use stride=1 or the looped_uniform schedule"), str(error)
    assert not mismatches, f"{len(mismatches)} window lists differ from core/Evolved, e.g. {mismatches[:3]}"
    assert not should_raise, f"settings core/Evolved cannot sample were accepted, e.g. {should_raise[:3]}"
    assert usable_count > 6500


def test_equal_length_looped_schedule_only_with_use_on_equal_length():
    assert context.windows(16, 16, 4, schedule="looped_uniform", step=1) == [list(range(16))]
    wrapped = context.windows(16, 16, 4, schedule="looped_uniform", step=1, use_on_equal_length=True)
    assert wrapped == [[(8 + k) % 16 for k in range(16)]]  # shifted by ordered_halving(1) = 1/2 of the clip


def test_fuse_weights_equal_core(reference):
    for record in reference["weights"]:
        kwargs = dict(overlap=record.get("overlap", 0), window=record.get("window"),
                      num_frames=record.get("num_frames"))
        ours = context.fuse_weights(record["method"], record["length"], **kwargs)
        if isinstance(record["weights"], dict):
            # core crashes on overlap 0 (empty ramp into a full slice); nothing overlaps, so we give flat weights
            assert record["overlap"] == 0
            assert torch.equal(ours, torch.ones(record["length"]))
        else:
            assert ours.dtype == torch.float32
            assert ours.tolist() == record["weights"], record


def test_fused_outputs_equal_core(reference):
    flat_results = {tuple(r["config"]): r["fused"] for r in reference["fusion"] if r["method"] == "flat"}
    checked = 0
    for record in reference["fusion"]:
        schedule, frames, length, overlap, stride, closed, step = record["config"]
        method, ref = record["method"], record["fused"]
        if ref == {"raises": "IndexError"}:  # core indexed past the last frame
            with pytest.raises(ValueError, match="past the last frame"):
                context.windows(frames, length, overlap, stride, bool(closed), schedule, step)
            continue
        windows = context.windows(frames, length, overlap, stride, bool(closed), schedule, step)
        if isinstance(ref, dict):
            assert method == "overlap-linear" and ref == {"raises": "RuntimeError"}
            if overlap == 0:  # core crashes; ours fuses flat
                out = context.evaluate_windows(_fake_model(), _fake_x(frames), windows, fuse_method=method)
                ref = flat_results[tuple(record["config"])]
            else:  # batched tail shorter than the overlap: a clear error instead of core's shape mismatch
                with pytest.raises(ValueError, match="overlap-linear fusing needs overlap <= window length"):
                    context.evaluate_windows(_fake_model(), _fake_x(frames), windows, fuse_method=method,
                                             overlap=overlap)
                continue
        else:
            assert windows == record["windows"]
            out = context.evaluate_windows(_fake_model(), _fake_x(frames), windows, fuse_method=method,
                                           overlap=overlap)
        for ours, theirs in zip(out, ref):
            torch.testing.assert_close(ours.flatten(), torch.tensor(theirs), rtol=0, atol=0)
        checked += 1
    assert checked >= 78


def test_freenoise_equals_evolved(reference):
    for record in reference["freenoise"]:
        noise = torch.arange(record["frames"], dtype=torch.float32).view(-1, 1, 1, 1)
        out = context.freenoise(noise, record["length"], record["overlap"], record["seed"])
        assert out.flatten().long().tolist() == record["source_frames"], record


def test_step_for_sigma_where_core_set_step_fails(reference):
    sigmas = torch.tensor([14.6, 4.0, 1.2, 0.3, 0.0])
    probe = reference["set_step_probe"]
    assert probe["48"] == {"raises": "RuntimeError"}  # core compares the whole [48] timestep with 5 sigmas
    for frames in (1, 5, 48):
        step = context.step_for_sigma(torch.full((frames,), 1.2), sigmas)
        assert step == 2
        if isinstance(probe[str(frames)], int):
            assert step == probe[str(frames)]


# ---------------------------------------------------------------------------------------------------------------
# Schedule properties
# ---------------------------------------------------------------------------------------------------------------

def test_ordered_halving_is_the_van_der_corput_sequence():
    expected = [0, 1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8, 3 / 8, 7 / 8, 1 / 16]
    assert [context.ordered_halving(s) for s in range(9)] == expected
    assert context.ordered_halving(2**63) == 2.0**-64
    for bad in (-1, 2**64, 1.0, True):
        with pytest.raises(ValueError, match="step"):
            context.ordered_halving(bad)


@pytest.mark.parametrize("schedule", context.SCHEDULES)
@pytest.mark.parametrize("frames", [1, 7, 16])
def test_clip_within_context_length_is_one_window_and_the_plain_output(schedule, frames):
    assert context.windows(frames, 16, 4, stride=3, closed_loop=True, schedule=schedule, step=5) == [
        list(range(frames))]
    x = torch.randn(frames, 3, 4, 4)

    def temporal_model(x_windows, windows):  # mixes frames: any slicing or fusing would change it
        return x_windows.cumsum(dim=1) * 0.7 + x_windows.flip(1)

    expected = temporal_model(x.unsqueeze(0), None)[0]
    for method in context.FUSE_METHODS:
        out = context.evaluate_windows(temporal_model, x, context.windows(frames, 16, 4, schedule=schedule),
                                       fuse_method=method, overlap=4)
        assert torch.equal(out, expected)


def test_every_frame_is_covered_at_every_step():
    refused = set()
    for schedule in context.SCHEDULES:
        for frames in (17, 33, 48, 100):
            for length in (8, 16):
                for overlap in (0, 4, 7):
                    for stride in (1, 2, 3):
                        for closed_loop in (False, True):
                            for step in range(21):
                                setting = (schedule, frames, length, overlap, stride, closed_loop, step)
                                try:
                                    ws = context.windows(frames, length, overlap, stride, closed_loop, schedule,
                                                         step)
                                except InvalidInputError as error:
                                    assert str(error).endswith("use stride=1 or the looped_uniform schedule")
                                    refused.add(setting)
                                    continue
                                flat = [i for w in ws for i in w]
                                assert set(flat) == set(range(frames)), setting
                                assert all(len(w) == length for w in ws[:-1]) and 1 <= len(ws[-1]) <= length
    # Exactly the reference's broken corner: standard_uniform at stride > 1 when a strided pass cannot span the
    # clip (frames <= length * stride; core/Evolved index past the end), at every step and either loop setting;
    # plus the one step where its strided windows leave frames 1 and 3 of a 33-frame clip uncovered.
    expected = {("standard_uniform", frames, length, overlap, stride, closed_loop, step)
                for frames in (17, 33, 48, 100) for length in (8, 16) for overlap in (0, 4, 7) for stride in (2, 3)
                for closed_loop in (False, True) for step in range(21) if frames <= length * stride}
    expected |= {("standard_uniform", 33, 16, 4, 2, closed_loop, 20) for closed_loop in (False, True)}
    assert refused == expected


def test_standard_static_windows_by_hand():
    assert context.windows(40, 16, 4) == [list(range(0, 16)), list(range(12, 28)), list(range(24, 40))]
    # the last window is pulled back to end on the last frame, overlapping its neighbour by 14
    assert context.windows(30, 16, 4) == [list(range(0, 16)), list(range(12, 28)), list(range(14, 30))]
    assert context.windows(35, 16, 4, schedule="batched") == [list(range(0, 16)), list(range(16, 32)),
                                                              [32, 33, 34]]


def test_closed_loop_wraps_end_to_start():
    length, overlap = 16, 4
    open_loop_short_seams = 0
    for frames in range(40, 70):
        for step in range(6):
            closed = context.windows(frames, length, overlap, closed_loop=True, schedule="looped_uniform", step=step)
            opened = context.windows(frames, length, overlap, schedule="looped_uniform", step=step)
            assert opened == closed[:len(opened)]
            assert any(a == frames - 1 and b == 0 for w in closed for a, b in zip(w, w[1:]))
            # closed loop: consecutive window starts, including the one across the loop, are at most
            # length - overlap apart around the cycle, so every seam overlaps by at least `overlap` frames
            starts = [w[0] for w in closed]
            gaps = [(b - a) % frames for a, b in zip(starts, starts[1:] + starts[:1])]
            assert max(gaps) <= length - overlap, (frames, step, starts)
            open_starts = [w[0] for w in opened]
            open_loop_short_seams += (open_starts[0] - open_starts[-1]) % frames > length - overlap
    assert open_loop_short_seams > 0  # without closed_loop the seam across the loop can overlap less
    # the uniform schedules move the seams every step: step 1 shifts by half the clip
    assert context.windows(48, length, overlap, schedule="looped_uniform", step=1)[0][0] == 24


def test_standard_uniform_never_wraps():
    for step in range(12):
        for w in context.windows(50, 16, 4, schedule="standard_uniform", step=step):
            assert w == sorted(w) and w == list(range(w[0], w[0] + 16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="uniform"), "unknown context schedule 'uniform'"),
    (dict(overlap=16), "overlap 16 must be smaller than context_length 16"),
    (dict(context_length=0), "context_length must be an integer >= 1"),
    (dict(stride=0), "stride must be an integer >= 1"),
    (dict(step=-1), "step must be an integer"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):  # the package's error type, which nodes show as is
        context.windows(40, **{"context_length": 16, "overlap": 4, **kwargs})


def test_broken_standard_uniform_corner_is_refused_with_a_fix():
    # core and Evolved produce index 45.. for a 44-frame clip here and crash
    with pytest.raises(ValueError, match="use stride=1 or the looped_uniform schedule"):
        context.windows(44, 24, 6, stride=3, schedule="standard_uniform", step=13)
    # and here they leave frames 1, 3, ..., 15 uncovered (NaN after dividing by a zero weight)
    with pytest.raises(ValueError, match=r"leaves frames \[1, 3, 5"):
        context.windows(70, 27, 2, stride=2, schedule="standard_uniform", step=2)


# ---------------------------------------------------------------------------------------------------------------
# Fusion math
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(17, 72), length=st.integers(4, 20), overlap=st.integers(0, 8),
       stride=st.integers(1, 3), closed_loop=st.booleans(), step=st.integers(0, 20),
       schedule=st.sampled_from(context.SCHEDULES), method=st.sampled_from(context.FUSE_METHODS))
def test_frame_local_model_reproduces_the_full_batch(frames, length, overlap, stride, closed_loop, step, schedule,
                                                     method):
    if overlap >= length:
        overlap = length - 1
    try:
        ws = context.windows(frames, length, overlap, stride, closed_loop, schedule, step)
    except InvalidInputError as error:
        # Only the standard_uniform corner at stride > 1 may be refused (pinned exactly above); any other
        # refusal here fails the test instead of passing silently.
        assert schedule == "standard_uniform" and stride > 1, (schedule, frames, length, overlap, stride, step)
        assert str(error).endswith("use stride=1 or the looped_uniform schedule")
        return
    if method == "overlap-linear" and overlap > len(ws[-1]) and max(ws[-1]) == frames - 1 and min(ws[-1]) > 0:
        return  # a batched tail shorter than the overlap: refused, tested above
    x = torch.randn(frames, 2, 3, 3, generator=torch.Generator().manual_seed(frames * 31 + step))
    out = context.evaluate_windows(lambda xw, _: _frame_local(xw), x, ws, fuse_method=method, overlap=overlap)
    torch.testing.assert_close(out, _frame_local(x), rtol=1e-6, atol=1e-6)


def _weighted_mean(values_per_window, weights_per_window, windows, frames):
    """sum(w * v) / sum(w) per frame, written out with Python floats (an independent check of the fuser)."""
    num = [0.0] * frames
    den = [0.0] * frames
    for window, values, weights in zip(windows, values_per_window, weights_per_window):
        for idx, v, w in zip(window, values, weights):
            num[idx] += w * v
            den[idx] += w
    return torch.tensor([n / d for n, d in zip(num, den)], dtype=torch.float64)


@pytest.mark.parametrize("schedule, frames, stride, step", [
    ("standard_static", 40, 1, 0), ("standard_uniform", 50, 1, 3), ("looped_uniform", 48, 2, 5),
    ("looped_uniform", 40, 1, 1)])
def test_fused_values_are_the_weighted_mean_of_the_equations(schedule, frames, stride, step):
    length, overlap = 16, 4
    ws = context.windows(frames, length, overlap, stride, True, schedule, step)
    values = [torch.rand(len(w), dtype=torch.float64).tolist() for w in ws]

    def model_fn(x_windows, windows):
        k = ws.index(windows[0])
        return torch.tensor(values[k], dtype=torch.float32).view(1, -1, 1)

    x = torch.zeros(frames, 1)
    for method in ("flat", "pyramid", "relative", "overlap-linear"):
        if method == "flat":
            weights = [[1.0] * len(w) for w in ws]
        elif method == "pyramid":  # distance to the nearer edge, 1-based
            weights = [[float(min(p + 1, len(w) - p)) for p in range(len(w))] for w in ws]
        elif method == "relative":  # bias from the window's first/last index
            weights = [[max(0.01, 1 - abs(i - (w[0] + w[-1]) / 2) / ((w[-1] - w[0] + 0.01) / 2)) for i in w]
                       for w in ws]
        else:  # linear ramps over `overlap` positions on inner edges, ramp 1e-37 .. 1
            weights = []
            for w in ws:
                ramp = [1e-37 + (1 - 1e-37) * k / (overlap - 1) for k in range(overlap)]
                ww = [1.0] * len(w)
                if min(w) > 0:
                    ww[:overlap] = ramp
                if max(w) < frames - 1:
                    ww[-overlap:] = ramp[::-1]
                weights.append(ww)
        out = context.evaluate_windows(model_fn, x, ws, fuse_method=method, overlap=overlap)
        expected = _weighted_mean(values, weights, ws, frames)
        torch.testing.assert_close(out.flatten().double(), expected, rtol=2e-6, atol=1e-7)


def test_fuser_refuses_uncovered_frames_and_bad_windows():
    fuser = context.WindowFuser(10, "pyramid")
    fuser.add(list(range(6)), torch.ones(6, 2))
    with pytest.raises(ValueError, match=r"frames \[6, 7, 8, 9\] were not covered"):
        fuser.result()
    with pytest.raises(ValueError, match="outside 0..9"):
        fuser.add([8, 9, 10], torch.ones(3, 2))
    with pytest.raises(ValueError, match="has 2 frames but the window has 3"):
        fuser.add([7, 8, 9], torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown fuse method 'gauss'"):
        context.WindowFuser(10, "gauss")
    with pytest.raises(ValueError, match="needs the window's frame indices and num_frames"):
        context.fuse_weights("overlap-linear", 8, overlap=2)


# ---------------------------------------------------------------------------------------------------------------
# Batching planner
# ---------------------------------------------------------------------------------------------------------------

class _TemporalModel(torch.nn.Module):
    """Tiny temporal self-attention over each window's frames plus a per-position embedding: it mixes frames, so
    windows must be evaluated whole, and a batch of windows must not leak between windows."""

    def __init__(self, channels=8, max_len=32):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.qkv = torch.nn.Parameter(torch.randn(3, channels, channels, generator=g) / channels**0.5)
        self.pos = torch.nn.Parameter(torch.randn(max_len, channels, generator=g) * 0.1)
        self.calls = 0

    def forward(self, x_windows, windows):  # [B, L, C, H, W]
        self.calls += 1
        b, length, c, h, w = x_windows.shape
        tokens = x_windows.permute(0, 3, 4, 1, 2).reshape(b * h * w, length, c) + self.pos[:length]
        q, k, v = (tokens @ m for m in self.qkv)
        attn = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        out = (tokens + attn).reshape(b, h, w, length, c).permute(0, 3, 4, 1, 2)
        return out, -0.5 * out  # two outputs, like cond and uncond


@pytest.mark.parametrize("schedule, stride", [("standard_static", 1), ("looped_uniform", 2), ("batched", 1),
                                              ("standard_uniform", 1)])
@pytest.mark.parametrize("method", context.FUSE_METHODS)
def test_batched_evaluation_equals_sequential(schedule, stride, method):
    frames, length, overlap = 45, 12, 3
    model = _TemporalModel()
    x = torch.randn(frames, 8, 2, 2)
    ws = context.windows(frames, length, overlap, stride, True, schedule, step=3)
    if method == "overlap-linear" and len(ws[-1]) < overlap:
        pytest.skip("batched tail shorter than the overlap")
    with torch.no_grad():
        sequential = context.evaluate_windows(model, x, ws, fuse_method=method, overlap=overlap)
        assert model.calls == len(ws)
        model.calls = 0
        batches = context.plan_batches(ws, max_windows_per_call=3)
        batched = context.evaluate_windows(model, x, ws, fuse_method=method, overlap=overlap, batches=batches)
    assert model.calls == len(batches) < len(ws)
    assert isinstance(batched, tuple) and len(batched) == 2
    for a, b in zip(batched, sequential):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plan_respects_cap_budget_and_lengths():
    ws = context.windows(100, 16, 0, schedule="batched")  # six of 16 frames, then one of 4
    assert context.plan_batches(ws) == [[0, 1, 2, 3, 4, 5], [6]]
    # balanced: 6 windows at most 4 per call -> 3 + 3, not 4 + 2
    assert context.plan_batches(ws, max_windows_per_call=4) == [[0, 1, 2], [3, 4, 5], [6]]
    # 100 bytes per frame, 3300 bytes: two 16-frame windows fit (3200), three do not
    assert context.plan_batches(ws, frame_bytes=100, memory_budget=3300) == [[0, 1], [2, 3], [4, 5], [6]]
    # a window over budget on its own still runs, alone
    assert context.plan_batches(ws, frame_bytes=100, memory_budget=10) == [[k] for k in range(7)]
    # the tighter of the two limits wins
    assert context.plan_batches(ws, frame_bytes=100, memory_budget=10**6, max_windows_per_call=2) == [
        [0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(ValueError, match="memory_budget needs frame_bytes"):
        context.plan_batches(ws, memory_budget=1000)
    with pytest.raises(ValueError, match="max_windows_per_call must be a positive integer"):
        context.plan_batches(ws, max_windows_per_call=0)


def test_evaluate_refuses_batches_that_break_the_plan():
    ws = context.windows(35, 16, 4, schedule="batched")
    x = torch.randn(35, 2)
    with pytest.raises(ValueError, match="mixes windows of different lengths"):
        context.evaluate_windows(lambda xw, _: xw, x, ws, batches=[[0, 1, 2]])
    with pytest.raises(ValueError, match="every window index exactly once, in schedule order"):
        context.evaluate_windows(lambda xw, _: xw, x, ws, batches=[[1, 0], [2]])


# ---------------------------------------------------------------------------------------------------------------
# FreeNoise
# ---------------------------------------------------------------------------------------------------------------

def test_freenoise_reproducible_and_seed_dependent():
    noise = torch.randn(64, 4, 8, 8)
    before = noise.clone()
    a = context.freenoise(noise, 16, 4, seed=123)
    b = context.freenoise(noise, 16, 4, seed=123)
    c = context.freenoise(noise, 16, 4, seed=124)
    assert torch.equal(noise, before)  # the input is not modified
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:16], noise[:16])
    g = torch.Generator().manual_seed(123)
    assert torch.equal(context.freenoise(noise, 16, 4, seed=None, generator=g), a)
    # frames after the first window are copies of earlier frames, distinct within each copied block
    labels = context.freenoise(torch.arange(64.0), 16, 4, seed=5).long().tolist()
    for frame in range(16, 64):
        assert labels[frame] < frame
    for start in range(16, 64, 12):
        block = labels[start:start + 12]
        assert len(set(block)) == len(block)


def test_freenoise_frame_dimension_and_short_clips():
    noise = torch.randn(2, 4, 40, 3, 3)  # frames in dim 2 (e.g. a [B, C, T, H, W] latent)
    out = context.freenoise(noise, 16, 4, seed=9, dim=2)
    expected = context.freenoise(noise.movedim(2, 0), 16, 4, seed=9).movedim(0, 2)
    assert torch.equal(out, expected)
    short = torch.randn(16, 4)
    assert torch.equal(context.freenoise(short, 16, 4, seed=1), short)
    with pytest.raises(ValueError, match="0 <= overlap < context_length"):
        context.freenoise(short, 16, 16, seed=1)


def test_step_for_sigma_maps_like_core_and_between_steps_like_evolved():
    sigmas = torch.tensor([14.6146, 6.0, 2.5, 0.9, 0.0])
    assert [context.step_for_sigma(s, sigmas) for s in sigmas[:-1].tolist()] == [0, 1, 2, 3]
    assert context.step_for_sigma(6.0 * (1 + 5e-5), sigmas) == 1  # within rtol 1e-4
    assert context.step_for_sigma(4.0, sigmas) == 1  # a midpoint evaluation belongs to the step it is in
    with pytest.raises(ValueError, match="outside the sampler's sigmas"):
        context.step_for_sigma(20.0, sigmas)
