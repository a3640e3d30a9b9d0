"""Video metrics against videos whose answer is known by construction (motion, brightness, occlusion, seams)."""

import json
import math

import cv2
import numpy as np
import pytest
import torch

from lightning import metrics
from lightning.errors import InvalidInputError


def texture(h, w=None, seed=0, sigma=2.0):
    """Smooth random RGB texture in 0..1: enough structure for flow, no periodicity to alias on."""
    w = w or h
    t = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    t = cv2.GaussianBlur(t, (0, 0), sigma)
    return (t - t.min()) / (t.max() - t.min())


BIG = texture(192, seed=7)


def translated(frames=8, dx=2, dy=1, size=64, jumps=None):
    """Crops of one texture sliding by (dx, dy) a frame; content enters at the edges like a camera pan.

    In frame t+1 a pixel x shows what frame t showed at x + (dx, dy), so the flow t -> t+1 is -(dx, dy).
    ``jumps`` maps a transition index to an extra x shift added there (a hard cut in the motion).
    """
    out, extra = [], 0
    for t in range(frames):
        if jumps and (t - 1) in jumps:
            extra += jumps[t - 1]
        x, y = 40 + t * dx + extra, 40 + t * dy
        out.append(BIG[y:y + size, x:x + size])
    return np.stack(out)


def to_uint8(video):
    return np.rint(video * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- luma/flicker

def test_luma_is_opencv_rec601_gray():
    video = texture(16, seed=1)[None].repeat(2, axis=0)
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video])
    np.testing.assert_allclose(metrics.luma(video), expected, atol=1e-6)


def test_static_video_has_zero_flicker():
    video = np.repeat(texture(32, seed=2)[None], 6, axis=0)
    result = metrics.flicker_index(video)
    assert result["mean"] == 0.0 and result["max"] == 0.0
    assert result["per_transition"] == [0.0] * 5


def test_brightness_step_gives_exactly_its_size():
    base = 0.2 + 0.4 * texture(32, seed=3)
    offsets = np.array([0.0, 0.0, 0.0, 0.25, 0.25, 0.25, 0.1, 0.1], dtype=np.float32)
    video = base[None] + offsets[:, None, None, None]
    result = metrics.flicker_index(video)
    expected = np.abs(np.diff(offsets.astype(np.float64)))
    np.testing.assert_allclose(result["per_transition"], expected, atol=1e-6)
    assert result["max"] == pytest.approx(0.25, abs=1e-6)
    assert result["mean"] == pytest.approx((0.25 + 0.15) / 7, abs=1e-6)
    y_base = (0.299 * base[..., 0] + 0.587 * base[..., 1] + 0.114 * base[..., 2]).mean()
    np.testing.assert_allclose(result["frame_luma"], y_base + offsets, atol=1e-6)


def test_luma_brightness_from_one_channel_uses_its_weight():
    video = np.zeros((2, 8, 8, 3), dtype=np.float32)
    video[1, ..., 2] = 1.0  # pure blue frame after black: a Rec. 601 luma step of 0.114 (709 would say 0.0722)
    assert metrics.flicker_index(video)["max"] == pytest.approx(0.114, abs=1e-6)


# ------------------------------------------------------------------------------------------------ warp error

@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_static_video_has_no_warp_error(method):
    video = np.repeat(texture(64, seed=4)[None], 4, axis=0)
    result = metrics.warp_error(video, method)
    assert result["mean"] < 1e-3
    assert min(result["valid_fraction"]) > 0.95


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flows_recover_a_known_integer_shift(method):
    video = translated(frames=2, dx=2, dy=1)
    gray = metrics.luma(video)
    flow = metrics.optical_flow(gray[0], gray[1], method)
    inner = flow[8:-8, 8:-8]  # away from the edges, where content enters and leaves
    np.testing.assert_allclose(np.median(inner.reshape(-1, 2), axis=0), [-2.0, -1.0], atol=0.1)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_translation_is_explained_and_shuffling_is_not(method):
    video = translated(frames=8, dx=2, dy=1)
    ordered = metrics.warp_error(video, method)
    assert ordered["mean"] < 0.003  # vs ~0.1-0.2 for an unrelated pair of frames below
    assert min(ordered["valid_fraction"]) > 0.85  # only the 2 px leaving the frame (~5%) and a margin
    # The shuffled order is still a set of translations (by up to 14 px), so flow catches part of it; the
    # error must still be far above the ordered one.
    shuffled = metrics.warp_error(video[[0, 5, 2, 7, 1, 6, 3, 4]], method)
    assert shuffled["mean"] > 10 * ordered["mean"]
    # Frames with nothing in common cannot be explained by any motion.
    unrelated = np.stack([texture(64, seed=100 + k) for k in range(4)])
    assert metrics.warp_error(unrelated, method)["mean"] > 0.05


def occluding_square(frames=3, step=8, size=24, seed=11):
    """A textured square sliding right over a static background, and the exact flows and occlusions."""
    bg, fg = texture(64, seed=seed), texture(size, seed=seed + 1)
    x0 = [8 + step * t for t in range(frames)]
    video = np.stack([bg.copy() for _ in range(frames)])
    for t in range(frames):
        video[t, 20:20 + size, x0[t]:x0[t] + size] = fg

    def square_flow(t, dx):
        flow = np.zeros((64, 64, 2), dtype=np.float32)
        flow[20:20 + size, x0[t]:x0[t] + size, 0] = dx
        return flow

    # Background pixels of frame t that the square covers in frame t+1: the strip right of the square.
    occluded = []
    for t in range(frames - 1):
        strip = np.zeros((64, 64), dtype=bool)
        strip[20:20 + size, x0[t] + size:x0[t + 1] + size] = True
        occluded.append(strip)
    exact = {}
    gray = metrics._flow_input(metrics.luma(video))
    for t in range(frames - 1):
        exact[gray[t].tobytes(), gray[t + 1].tobytes()] = square_flow(t, step)
        exact[gray[t + 1].tobytes(), gray[t].tobytes()] = square_flow(t + 1, -step)
    return video, exact, occluded, square_flow


def test_consistency_rule_marks_exactly_the_covered_pixels():
    _, _, occluded, square_flow = occluding_square(frames=2)
    mask = metrics.occlusion_mask(square_flow(0, 8), square_flow(1, -8), motion_boundaries=False)
    np.testing.assert_array_equal(mask, occluded[0])


def test_motion_boundary_rule_adds_the_square_outline():
    _, _, occluded, square_flow = occluding_square(frames=2)
    square = (square_flow(0, 8)[..., 0] != 0).astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    # Central differences see the 8 px flow step on both pixels that straddle each edge.
    outline = cv2.dilate(square, cross).astype(bool) & ~cv2.erode(square, cross).astype(bool)
    mask = metrics.occlusion_mask(square_flow(0, 8), square_flow(1, -8))
    np.testing.assert_array_equal(mask, occluded[0] | outline)


def test_flow_leaving_the_frame_is_excluded():
    flow = np.zeros((16, 16, 2), dtype=np.float32)
    flow[..., 0] = 3.0
    mask = metrics.occlusion_mask(flow, -flow)
    assert mask[:, 13:].all() and not mask[:, :13].any()


def test_warp_error_ignores_occluded_pixels_given_the_exact_flow():
    video, exact, occluded, _ = occluding_square()

    def oracle(a, b):
        return exact[a.tobytes(), b.tobytes()]

    result = metrics.warp_error(video, oracle)
    assert result["method"] == "oracle"
    assert result["mean"] == pytest.approx(0.0, abs=1e-6)  # integer flows: the visible part warps exactly
    assert min(result["unmasked_per_transition"]) > 0.003  # the covered strip is where the error was
    for fraction, strip in zip(result["valid_fraction"], occluded):
        assert fraction < 1 - strip.mean()


@pytest.mark.parametrize("seed", [11, 21, 31])
def test_dis_finds_most_of_a_real_occlusion(seed):
    video, _, occluded, _ = occluding_square(frames=2, step=4, seed=seed)
    gray = metrics.luma(video)
    fw = metrics.optical_flow(gray[0], gray[1], "dis")
    bw = metrics.optical_flow(gray[1], gray[0], "dis")
    assert metrics.occlusion_mask(fw, bw)[occluded[0]].mean() > 0.7
    result = metrics.warp_error(video, "dis")
    assert result["mean"] < 0.75 * result["unmasked_per_transition"][0]


# ---------------------------------------------------------------------------------------------------- seams

def test_window_borders_disjoint_and_overlapping():
    assert metrics.window_borders([[0, 1, 2, 3], [4, 5, 6, 7]], 8) == ([3], [0, 1, 2, 4, 5, 6])
    # Overlap on frames 4, 5: the covering set changes entering it (3->4) and leaving it (5->6).
    border, inside = metrics.window_borders([list(range(0, 6)), list(range(4, 10))], 10)
    assert border == [3, 5] and inside == [0, 1, 2, 4, 6, 7, 8]
    # Looped windows wrap around: frames 0, 1 are covered by windows 0 and 2, frames 2, 3 by 0 and 1, frames
    # 4, 5 by 1 and 2. Only transitions of the linear video are scored (5 -> 0 is not one).
    assert metrics.window_borders([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 0, 1]], 6) == ([1, 3], [0, 2, 4])
    # Strided windows (uniform schedules, step 2): every transition changes windows.
    assert metrics.window_borders([[0, 2, 4], [1, 3, 5]], 6) == ([0, 1, 2, 3, 4], [])


@pytest.mark.parametrize("windows", [
    [list(range(0, 8)), list(range(8, 16))],
    [list(range(0, 8)), list(range(4, 12)), list(range(8, 16))],
])
def test_smooth_video_has_seam_score_near_one(windows):
    result = metrics.seam_score(translated(frames=16, dx=1, dy=0), windows)
    assert 0.85 < result["score"] < 1.15


def test_jump_at_a_window_border_is_a_seam():
    windows = [list(range(0, 8)), list(range(8, 16))]
    at_border = metrics.seam_score(translated(frames=16, dx=1, dy=0, jumps={7: 6}), windows)
    assert at_border["border_transitions"] == [7]
    assert at_border["score"] > 4
    # The same jump inside a window is not a seam: it raises the inside energy instead.
    inside = metrics.seam_score(translated(frames=16, dx=1, dy=0, jumps={4: 6}), windows)
    assert inside["score"] < 1


def test_seam_energy_is_mean_squared_frame_difference():
    video = translated(frames=6, dx=1, dy=0)
    result = metrics.seam_score(video, [[0, 1, 2], [3, 4, 5]])
    diffs = [np.mean((video[t + 1].astype(np.float64) - video[t]) ** 2) for t in range(5)]
    np.testing.assert_allclose(result["energy_per_transition"], diffs, rtol=1e-5)
    assert result["score"] == pytest.approx(diffs[2] / np.mean([diffs[0], diffs[1], diffs[3], diffs[4]]), rel=1e-5)


def test_seam_score_degenerate_cases():
    video = translated(frames=4, dx=1, dy=0)
    assert metrics.seam_score(video, [[0, 1, 2, 3]])["score"] is None  # no border at all
    static = np.repeat(video[:1], 4, axis=0)
    assert metrics.seam_score(static, [[0, 1], [2, 3]])["score"] == 1.0
    cut = static.copy()
    cut[2:] = 1.0 - cut[2:]
    assert metrics.seam_score(cut, [[0, 1], [2, 3]])["score"] == math.inf
    assert metrics.video_metrics(cut, [[0, 1], [2, 3]])["seam"]["score"] is None  # strict JSON


# ------------------------------------------------------------------------------------------------------ plot

def _data_lines(fig):
    """The series' lines of a plot figure, in series order (marks and other artists have '_' labels)."""
    return [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]


def _marks(fig):
    return [line for line in fig.axes[0].get_lines() if line.get_label() == "_mark"]


def test_plot_figure_holds_exactly_the_series_marks_legend_and_title():
    series = {"flicker": [0.01, 0.03, None, 0.02, math.inf, 0.05], "warp": torch.tensor([0.02, 0.04, 0.03])}
    fig = metrics.series_figure(series, title="run 7", marks=[1, 3.5])
    ax = fig.axes[0]
    lines = _data_lines(fig)
    assert [line.get_label() for line in lines] == ["flicker", "warp"]
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(6))
    # Gaps (None) and non-finite values are NaN, which matplotlib leaves undrawn.
    np.testing.assert_array_equal(lines[0].get_ydata(), [0.01, 0.03, np.nan, 0.02, np.nan, 0.05])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.02, 0.04, 0.03])
    for line, colour in zip(lines, metrics.PALETTE):
        assert np.allclose(line.get_color(), np.divide(colour, 255))
    assert sorted(m.get_xdata()[0] for m in _marks(fig)) == [1.0, 3.5]
    assert all(m.get_linestyle() == "--" for m in _marks(fig))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["flicker", "warp"]
    assert ax.get_title() == "run 7"
    lo, hi = ax.get_ylim()
    assert lo == 0.0 and hi > 0.05  # non-negative data from 0, the largest point inside
    assert ax.get_xlim()[0] < 0 and ax.get_xlim()[1] > 5  # every index and mark inside


def test_plot_limits_of_negative_flat_and_empty_series():
    neg = metrics.series_figure({"neg": [-1.0, 2.0, -3.0]}).axes[0].get_ylim()
    assert neg[0] <= -3.0 and neg[1] >= 2.0
    flat = metrics.series_figure({"zero": [0.0] * 7}).axes[0].get_ylim()
    assert flat[0] == 0.0 and flat[1] > 0.0
    assert metrics.series_figure({"gaps": [None, None]}).axes[0].get_ylim() == (0.0, 1.0)
    for series in ({"zero": [0.0] * 7}, {"one": [0.4]}, {"gaps": [None, None]}, {"neg": [-1.0, 2.0, -3.0]}):
        img = metrics.plot_series(series)
        assert img.shape == (360, 640, 3) and img.dtype == np.uint8


def _pixel(img, fig, x, y):
    """The RGB pixel where data point (x, y) lands; display coordinates count from the bottom left."""
    px, py = fig.axes[0].transData.transform((x, y))
    return img[int(round(img.shape[0] - py - 0.5)), int(round(px - 0.5))].astype(int)


def test_rendered_plot_shows_each_point_in_its_colour_at_its_position():
    series = {"a": [0.2, 0.6, 0.4, None, 0.3], "b": [0.1, 0.15, 0.5, 0.05, 0.12]}
    fig = metrics.series_figure(series, size=(640, 360), marks=[3])
    img = metrics.render(fig)
    assert img.shape == (360, 640, 3) and img.dtype == np.uint8
    for k, values in enumerate(series.values()):
        colour = np.array(metrics.PALETTE[k])
        for x, y in enumerate(values):
            if y is not None:
                assert np.abs(_pixel(img, fig, x, y) - colour).max() <= 4, (k, x, y)
    a = np.array(metrics.PALETTE[0])
    # Halfway along a drawn segment the line has the series' colour...
    assert np.abs(_pixel(img, fig, 0.5, 0.4) - a).max() <= 4
    # ... but not across the gap at x=3 (from (2, 0.4) to (4, 0.3)): nothing of "a" is drawn there.
    assert np.abs(_pixel(img, fig, 3, 0.35) - a).max() > 60
    # The mark is a dashed grey column at x=3; no other column holds its grey.
    grey = (np.abs(img.astype(int) - metrics.MARK_COLOUR).max(axis=-1) <= 6)
    columns = np.flatnonzero(grey.sum(axis=0) > 20)
    mark_x = fig.axes[0].transData.transform((3, 0))[0]
    assert columns.size and np.abs(columns - mark_x).max() <= 2


def test_plot_sizes_are_exact():
    assert metrics.plot_series({"s": [0.1, 0.2]}, size=(800, 300)).shape == (300, 800, 3)
    assert metrics.plot_series({"s": [0.1, 0.2]}, size=(333, 127)).shape == (127, 333, 3)


def test_video_metrics_figure_plots_the_per_transition_numbers_and_window_borders():
    result = metrics.video_metrics(translated(frames=6), windows=[[0, 1, 2], [3, 4, 5]])
    fig = metrics.video_metrics_figure(result)
    flicker, warp = _data_lines(fig)
    np.testing.assert_allclose(flicker.get_ydata(), result["flicker"]["per_transition"])
    np.testing.assert_allclose(warp.get_ydata(), result["warp"]["per_transition"])
    assert warp.get_label() == "warp error (dis)"
    assert [m.get_xdata()[0] for m in _marks(fig)] == result["seam"]["border_transitions"] == [2]
    title = fig.axes[0].get_title()
    assert f"flicker {result['flicker']['mean']:.3g}" in title and "seam " in title
    assert metrics.plot_video_metrics(result).shape == (360, 640, 3)


# --------------------------------------------------------------------------------------------------- bundle

def test_uint8_float_and_tensor_inputs_agree():
    video8 = to_uint8(translated(frames=5))
    windows = [[0, 1, 2], [2, 3, 4]]
    from_uint8 = metrics.video_metrics(video8, windows)
    from_float = metrics.video_metrics(video8.astype(np.float32) / 255, windows)
    from_tensor = metrics.video_metrics(torch.from_numpy(video8.astype(np.float32) / 255).to(torch.float64), windows)

    def close(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                close(x, y)
        elif isinstance(a, float):
            assert a == pytest.approx(b, abs=1e-6)
        else:
            assert a == b

    close(from_uint8, from_float)
    close(from_uint8, from_tensor)


def test_video_metrics_is_plain_json():
    result = metrics.video_metrics(to_uint8(translated(frames=5)), [[0, 1, 2], [3, 4]], method="farneback")
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert (result["frames"], result["height"], result["width"]) == (5, 64, 64)
    assert result["warp"]["method"] == "farneback" and result["seam"]["border_transitions"] == [2]
    assert metrics.video_metrics(to_uint8(translated(frames=3)))["seam"] is None


def test_alpha_and_gray_channels():
    video = translated(frames=3)
    rgba = np.concatenate([video, np.full(video.shape[:-1] + (1,), 0.5, np.float32)], axis=-1)
    assert metrics.flicker_index(rgba) == metrics.flicker_index(video)
    gray = metrics.luma(video)[..., None]
    np.testing.assert_allclose(metrics.luma(gray), gray[..., 0])
    assert metrics.warp_error(gray)["mean"] < 0.003  # the translation is explained on one channel too


# ---------------------------------------------------------------------------------------------- bad input

GOOD = translated(frames=4)


@pytest.mark.parametrize("frames, match", [
    (GOOD[0], r"\[F, H, W, C\].*single"),
    (GOOD[..., 0], r"\[F, H, W, C\].*grayscale"),
    (GOOD[:1], r"1 frame"),
    (np.moveaxis(GOOD, -1, 1), r"channels-first"),
    (GOOD * 255, r"0\.\.1.*divide"),
    (np.where(GOOD > 0.5, np.nan, GOOD), r"NaN"),
    (GOOD.astype(np.int32), r"dtype int32"),
    (torch.zeros(3, 8, 8, 3, dtype=torch.int64), r"dtype torch.int64"),
])
def test_bad_video_is_rejected_clearly(frames, match):
    with pytest.raises(InvalidInputError, match=match):
        metrics.flicker_index(frames)


@pytest.mark.parametrize("windows, match", [
    ([[0, 1], [2, 3, 4]], r"windows\[1\] contains frame 4 but the video has 4 frames"),
    ([[0, 1], [3]], r"do not cover frame\(s\) \[2\]"),
    ([[0, 1, 1], [2, 3]], r"windows\[0\] lists a frame twice"),
    ([[0, 1], []], r"windows\[1\] must be a non-empty"),
    ([0, 1, 2, 3], r"windows\[0\] must be a non-empty list"),
    ([[0.0, 1.0], [2, 3]], r"integer frame indices"),
    ([], r"non-empty list of frame-index lists"),
])
def test_mismatched_windows_are_rejected_clearly(windows, match):
    with pytest.raises(InvalidInputError, match=match):
        metrics.seam_score(GOOD, windows)


def test_bad_flow_and_plot_arguments():
    with pytest.raises(InvalidInputError, match="unknown flow method 'raft'"):
        metrics.warp_error(GOOD, "raft")
    with pytest.raises(InvalidInputError, match="too small for optical flow"):
        metrics.warp_error(np.zeros((2, 8, 64, 3), np.float32))
    with pytest.raises(InvalidInputError, match=r"returned shapes"):
        metrics.warp_error(GOOD, lambda a, b: np.zeros((4, 4, 2)))
    with pytest.raises(InvalidInputError, match="non-empty dict"):
        metrics.plot_series({})
    with pytest.raises(InvalidInputError, match="not a number"):
        metrics.plot_series({"s": [0.1, "x"]})
    with pytest.raises(InvalidInputError, match="too small"):
        metrics.plot_series({"s": [0.1]}, size=(50, 40))
