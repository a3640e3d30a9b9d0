"""Weight-free temporal-consistency metrics for generated videos: flicker, warping error, context-window seams.

Few-step samplers fail in ways that a per-frame image metric cannot see: whole-frame brightness pumping from
one frame to the next ("flicker"), content that does not follow any motion (high warping error), and jumps
where one context window hands over to the next ("seams"). The proxies here need no downloaded weights
(only OpenCV's classical optical flows), so they run offline and in CI; they are regression signals to
compare runs of the same prompt and seed, not absolute quality scores.

Videos come as ComfyUI's IMAGE layout, ``[F, H, W, C]`` RGB, either float in 0..1 or uint8 in 0..255, as a
numpy array or a torch tensor (any device). Bad input raises ``InvalidInputError`` (a ``ValueError``)
naming the value and the fix. Every function returns plain Python numbers and lists, with
``None`` where a value is undefined, so results can go straight to JSON. All intensities and differences
are on the 0..1 scale, whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import InvalidInputError
from .opencv import require_cv2

# Rec. 601 luma on the gamma-encoded values, i.e. exactly OpenCV's RGB2GRAY. The same luma feeds the flow
# estimators, so "brightness" means one thing across every metric here. The weights sum to 1, so adding a
# constant c to all three channels moves the luma by exactly c.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

FLOW_METHODS = ("dis", "farneback")

# DIS (and Farneback's pyramid) cannot work on tiny images: DIS' coarsest level must still hold one patch.
_MIN_FLOW_SIDE = 16

# Float frames a little outside 0..1 are normal (blend nodes, un-clamped decodes); far outside almost
# certainly means a 0..255 float video, which would silently scale every number by 255.
_FLOAT_RANGE_SLACK = 0.5


# ----------------------------------------------------------------------------------------------- input

def as_video(frames, name: str = "frames") -> np.ndarray:
    """Validate a video and return it as float32 ``[F, H, W, C]`` on the 0..1 scale (C is 1 or 3).

    uint8 is divided by 255; an alpha channel is dropped. A CPU float32 tensor or array is not copied.
    """
    if isinstance(frames, torch.Tensor):
        t = frames.detach()
        if t.dtype == torch.uint8:
            arr = t.cpu().numpy()
        elif t.is_floating_point():
            arr = t.to(device="cpu", dtype=torch.float32).numpy()
        else:
            raise InvalidInputError(f"{name}: tensor dtype {t.dtype} is not supported; pass float in 0..1 or uint8 in 0..255")
    else:
        arr = np.asarray(frames)
    if arr.ndim != 4:
        hint = ""
        if arr.ndim == 3:
            hint = (" (a single [H, W, C] image has no time axis, and a grayscale [F, H, W] video needs a trailing"
                    " channel axis: frames[..., None])")
        raise InvalidInputError(f"{name} must be a video [F, H, W, C] (ComfyUI IMAGE layout); got shape {tuple(arr.shape)}{hint}")
    f, h, w, c = arr.shape
    if c not in (1, 3, 4):
        raise InvalidInputError(f"{name} must have 1, 3 or 4 channels in the last axis ([F, H, W, C]); got shape "
                         f"{tuple(arr.shape)} - a channels-first [F, C, H, W] video needs .permute(0, 2, 3, 1)")
    if f < 2:
        raise InvalidInputError(f"{name} has {f} frame(s); temporal metrics need at least 2")
    if h < 1 or w < 1:
        raise InvalidInputError(f"{name} has empty frames (shape {tuple(arr.shape)})")
    if c == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"{name}: dtype {arr.dtype} is not supported; pass float in 0..1 or uint8 in 0..255")
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    if lo < -_FLOAT_RANGE_SLACK or hi > 1.0 + _FLOAT_RANGE_SLACK:
        raise InvalidInputError(f"{name}: float frames must be in 0..1, got values in [{lo:.4g}, {hi:.4g}]; "
                         "divide a 0..255 video by 255 or pass it as uint8")
    return arr


def luma(frames) -> np.ndarray:
    """Per-pixel Rec. 601 luma ``0.299 R' + 0.587 G' + 0.114 B'`` of the gamma-encoded frames, ``[F, H, W]`` float32.

    Rec. 601 rather than 709 because it is what ``cv2.cvtColor(..., COLOR_RGB2GRAY)`` computes, which is
    the grayscale the optical-flow estimators see. A single-channel video is its own luma.
    """
    video = as_video(frames)
    return _luma(video)


def _luma(video: np.ndarray) -> np.ndarray:
    if video.shape[-1] == 1:
        return video[..., 0]
    r, g, b = LUMA_WEIGHTS
    return r * video[..., 0] + g * video[..., 1] + b * video[..., 2]


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------------------------- flicker

def flicker_index(frames) -> dict:
    """Frame-to-frame change of mean luma: the "2-step brightness pumping" failure mode.

    Returns ``frame_luma`` (mean luma per frame), ``per_transition`` (``|Y[t+1] - Y[t]|`` for t = 0..F-2),
    and their ``mean`` and ``max``. Motion barely moves the mean luma while an exposure change moves it by
    its full size, so this isolates global brightness flicker from content change.
    """
    video = as_video(frames)
    y = _luma(video).mean(axis=(1, 2), dtype=np.float64)
    steps = np.abs(np.diff(y))
    return {
        "frame_luma": [float(v) for v in y],
        "per_transition": [float(v) for v in steps],
        "mean": float(steps.mean()),
        "max": float(steps.max()),
    }


# ----------------------------------------------------------------------------------------- optical flow

def _flow_input(gray: np.ndarray) -> np.ndarray:
    """8-bit luma: DIS only takes 8-bit, and both estimators are tuned for 0..255 contrast."""
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)


def optical_flow(prev_gray: np.ndarray, next_gray: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow ``f`` with ``prev(x) ~ next(x + f(x))``, ``[H, W, 2]`` float32 (dx, dy) in pixels.

    Inputs are luma images ``[H, W]`` (float 0..1 or uint8). ``dis`` is OpenCV's DIS at the MEDIUM preset,
    ``farneback`` is Farneback with OpenCV's documented example parameters; neither needs weights.
    """
    if method not in FLOW_METHODS:
        raise InvalidInputError(f"unknown flow method {method!r}; choose one of {FLOW_METHODS}")
    a, b = (g if g.dtype == np.uint8 else _flow_input(g) for g in (prev_gray, next_gray))
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidInputError(f"optical_flow needs two [H, W] images of one shape; got {a.shape} and {b.shape}")
    if min(a.shape) < _MIN_FLOW_SIDE:
        raise InvalidInputError(f"frames of {a.shape[1]}x{a.shape[0]} are too small for optical flow; "
                         f"both sides must be at least {_MIN_FLOW_SIDE} pixels")
    cv2 = require_cv2("optical flow (video metrics)")
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(a, b, None)
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _sample_grid(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute sampling positions ``x + f(x)`` as the float32 maps ``cv2.remap`` wants."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def backward_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image(x + flow(x))`` by bilinear sampling: brings ``next`` onto ``prev``'s pixel grid.

    Positions outside the image repeat the border; callers mask them (see ``occlusion_mask``).
    """
    map_x, map_y = _sample_grid(flow)
    cv2 = require_cv2("warping (video metrics)")
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def occlusion_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, motion_boundaries: bool = True) -> np.ndarray:
    """Pixels of the first frame with no trustworthy match in the second: ``[H, W]`` bool, True = excluded.

    The rules of Sundaram et al. (2010) as Ruder et al. (2016) use them for video style transfer. A pixel x
    is excluded when its forward flow ``f`` leaves the frame, or when the forward and backward flows disagree::

        |f(x) + b(x + f(x))|^2  >=  0.01 * (|f(x)|^2 + |b(x + f(x))|^2) + 0.5

    A visible point maps forward and back to itself, so ``f + b`` is ~0 up to an error that grows with the
    motion (the relative term) plus estimation noise (the 0.5 px^2 floor); a point covered in the second
    frame gets the occluder's backward flow instead. With ``motion_boundaries`` it is also excluded where
    the forward flow changes fast::

        |grad f_x(x)|^2 + |grad f_y(x)|^2  >  0.01 * |f(x)|^2 + 0.002

    because classical flows (DIS, Farneback) are smooth across object edges: they drag the occluder's
    motion onto the background strip it is about to cover, so forward and backward agree there and the
    first test alone misses most real occlusions (measured: on a textured square moving 8 px over a
    textured background, over 20 random textures DIS flagged a median 73% of the covered strip with the
    first test alone and 92% with both).
    The price is a few percent fewer pixels compared on strong zoom or rotation.
    """
    flow_fw = np.asarray(flow_fw, dtype=np.float32)
    flow_bw = np.asarray(flow_bw, dtype=np.float32)
    if flow_fw.shape != flow_bw.shape or flow_fw.ndim != 3 or flow_fw.shape[-1] != 2:
        raise InvalidInputError(f"occlusion_mask needs two [H, W, 2] flows of one shape; got {flow_fw.shape} and {flow_bw.shape}")
    h, w = flow_fw.shape[:2]
    map_x, map_y = _sample_grid(flow_fw)
    cv2 = require_cv2("occlusion masks (video metrics)")
    bw_at = cv2.remap(flow_bw, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    fw_sq = (flow_fw ** 2).sum(axis=-1)
    loop_sq = ((flow_fw + bw_at) ** 2).sum(axis=-1)
    excluded = loop_sq >= 0.01 * (fw_sq + (bw_at ** 2).sum(axis=-1)) + 0.5
    excluded |= (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    if motion_boundaries and h > 1 and w > 1:
        grad_sq = sum(np.square(g) for c in (0, 1) for g in np.gradient(flow_fw[..., c]))
        excluded |= grad_sq > 0.01 * fw_sq + 0.002
    return excluded


# ---------------------------------------------------------------------------------------- warping error

def _flow_function(method) -> tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in FLOW_METHODS:
        raise InvalidInputError(f"unknown flow method {method!r}; choose one of {FLOW_METHODS} or pass a callable")
    return method, lambda a, b: optical_flow(a, b, method)


def warp_error(frames, method: str | Callable[[np.ndarray, np.ndarray], np.ndarray] = "dis") -> dict:
    """Motion-compensated change: how much of each frame is *not* explained by moving the previous one.

    For each transition t -> t+1: flows both ways on the luma, frame t+1 warped back onto frame t with the
    forward flow, then the mean absolute RGB difference (0..1 scale) over the pixels ``occlusion_mask``
    keeps. Returns ``per_transition`` and its ``mean``; ``valid_fraction`` (share of pixels compared, so a
    low error over few pixels can be recognised: incoherent content makes the two flows disagree over most
    of the frame); ``unmasked_per_transition`` (the same error over all pixels, for contrast); ``method``.
    A transition with no valid pixel gets ``None`` and is left out of the mean.

    ``method`` may also be a callable ``flow(prev, next) -> [H, W, 2]`` on uint8 luma frames with the
    convention of ``optical_flow``: a learned flow plugs in here, and tests pass the exact flow.
    """
    name, flow = _flow_function(method)
    video = as_video(frames)
    gray = _flow_input(_luma(video))
    h, w = gray.shape[1:]
    masked, unmasked, valid = [], [], []
    for t in range(video.shape[0] - 1):
        fw, bw = (np.asarray(flow(a, b), dtype=np.float32) for a, b in ((gray[t], gray[t + 1]), (gray[t + 1], gray[t])))
        if fw.shape != (h, w, 2) or bw.shape != (h, w, 2):
            raise InvalidInputError(f"flow method {name!r} returned shapes {fw.shape} and {bw.shape}; expected {(h, w, 2)}")
        warped = backward_warp(video[t + 1], fw)
        if warped.ndim == 2:  # cv2.remap drops a single channel axis
            warped = warped[..., None]
        err = np.abs(warped - video[t]).mean(axis=-1, dtype=np.float64)
        keep = ~occlusion_mask(fw, bw)
        n = int(keep.sum())
        masked.append(float(err[keep].mean()) if n else None)
        unmasked.append(float(err.mean()))
        valid.append(n / keep.size)
    return {
        "method": name,
        "per_transition": masked,
        "mean": _mean(masked),
        "valid_fraction": valid,
        "unmasked_per_transition": unmasked,
    }


# ------------------------------------------------------------------------------------------------ seams

def _checked_windows(windows, num_frames: int) -> list[np.ndarray]:
    if windows is None or isinstance(windows, (str, bytes)) or not hasattr(windows, "__len__") or len(windows) == 0:
        raise InvalidInputError("windows must be a non-empty list of frame-index lists (as lightning.context.windows returns)")
    checked = []
    for i, window in enumerate(windows):
        idx = np.asarray(window.cpu() if isinstance(window, torch.Tensor) else window)
        if idx.ndim != 1 or idx.size == 0:
            raise InvalidInputError(f"windows[{i}] must be a non-empty list of frame indices; got {window!r}")
        if idx.dtype.kind not in "iu":
            raise InvalidInputError(f"windows[{i}] must hold integer frame indices; got dtype {idx.dtype}")
        bad = idx[(idx < 0) | (idx >= num_frames)]
        if bad.size:
            raise InvalidInputError(f"windows[{i}] contains frame {int(bad[0])} but the video has {num_frames} frames "
                             f"(0..{num_frames - 1}); build the windows for this video's frame count")
        if np.unique(idx).size != idx.size:
            raise InvalidInputError(f"windows[{i}] lists a frame twice: {idx.tolist()}")
        checked.append(idx)
    covered = np.zeros(num_frames, dtype=bool)
    for idx in checked:
        covered[idx] = True
    if not covered.all():
        missing = np.flatnonzero(~covered)
        raise InvalidInputError(f"windows do not cover frame(s) {missing[:8].tolist()}{' ...' if missing.size > 8 else ''} "
                         f"of the {num_frames}-frame video; they do not belong to this video")
    return checked


def window_borders(windows, num_frames: int) -> tuple[list[int], list[int]]:
    """Split the transitions t -> t+1 into (border, inside) by the windows covering each frame.

    A transition is a *border* when the set of windows containing frame t differs from the set containing
    frame t+1, and *inside* otherwise. Why this rule: every frame's prediction is a (weighted) fusion of the
    windows that cover it. Across a run of frames with the same covering set the same windows are fused,
    so disagreement between windows cannot create a jump there; a jump can only appear where a window's
    influence starts or stops. For disjoint windows that is the one transition between them; for
    overlapping windows it is both ends of each overlap (entering and leaving the shared frames) - which a
    rule of "transitions contained in no window" would miss entirely, since overlapping windows contain
    every transition. Strided windows (uniform schedules with step > 1) make every transition a border.
    """
    checked = _checked_windows(windows, num_frames)
    cover = [set() for _ in range(num_frames)]
    for k, idx in enumerate(checked):
        for frame in idx.tolist():
            cover[frame].add(k)
    border = [t for t in range(num_frames - 1) if cover[t] != cover[t + 1]]
    inside = [t for t in range(num_frames - 1) if cover[t] == cover[t + 1]]
    return border, inside


def seam_score(frames, windows) -> dict:
    """Temporal discontinuity at context-window borders relative to inside windows.

    The energy of a transition is the mean squared RGB difference ``mean((x[t+1] - x[t])^2)`` (0..1 scale).
    ``score`` = mean energy over border transitions / mean energy over inside transitions (see
    ``window_borders`` for the exact split): ~1 means the borders look like any other frame step, well
    above 1 means visible seams. It is ``None`` when either set is empty, 1.0 when both energies are 0,
    and ``inf`` when only the inside energy is 0. Also returns both energies, the split, and the
    ``energy_per_transition`` series.
    """
    video = as_video(frames)
    border, inside = window_borders(windows, video.shape[0])
    energy = [float(np.mean(np.square(video[t + 1] - video[t]), dtype=np.float64)) for t in range(video.shape[0] - 1)]
    e_border = _mean([energy[t] for t in border])
    e_inside = _mean([energy[t] for t in inside])
    if e_border is None or e_inside is None:
        score = None
    elif e_inside == 0.0:
        score = 1.0 if e_border == 0.0 else math.inf
    else:
        score = e_border / e_inside
    return {
        "score": score,
        "border_energy": e_border,
        "inside_energy": e_inside,
        "border_transitions": border,
        "inside_transitions": inside,
        "energy_per_transition": energy,
    }


# ------------------------------------------------------------------------------------------------- plot

# Colour-blind-friendly qualitative palette (Okabe-Ito), RGB.
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (240, 228, 66), (0, 0, 0)]
MARK_COLOUR = (150, 150, 150)
_DPI = 100
# Dots on every point make single points (a finite value between two gaps) visible; past this many points
# they would merge into a thick line.
_MAX_DOTTED_POINTS = 64


def _as_values(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise InvalidInputError(f"series {name!r} holds {v!r}, which is not a number (use None for a gap)") from None
    return np.asarray(out, dtype=np.float64)


def _y_limits(data: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """From 0 when nothing is negative (a bar of flicker reads as its size), with headroom for the legend."""
    finite = np.concatenate([v[np.isfinite(v)] for v in data.values()] + [np.zeros(0)])
    if finite.size == 0:
        return 0.0, 1.0
    y_lo, y_hi = float(finite.min()), float(finite.max())
    if y_lo >= 0:
        y_lo = 0.0
    if y_hi - y_lo < 1e-12:
        pad = abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = (0.0 if y_lo >= 0 else y_lo - pad), y_hi + pad
    return y_lo, y_hi + 0.08 * (y_hi - y_lo) * (1 + len(data))


def series_figure(series: Mapping[str, Sequence[float | None]], title: str = "", size: tuple[int, int] = (640, 360),
                  marks: Sequence[float] | None = None):
    """The matplotlib ``Figure`` that ``plot_series`` renders (same arguments), not yet drawn.

    Each series is a line against its index (0, 1, ...) labelled with its name; ``None``, NaN or inf leave
    a gap. ``marks`` are dashed grey vertical lines. The figure has its own Agg canvas and never touches
    pyplot's global state, so nodes running in ComfyUI's worker thread cannot interfere with each other.
    """
    if not isinstance(series, Mapping) or len(series) == 0:
        raise InvalidInputError("plot_series needs a non-empty dict {name: values}")
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"size must be (width, height) in pixels; got {size!r}") from None
    if width < 160 or height < 120:
        raise InvalidInputError(f"size {width}x{height} is too small for a readable plot; use at least 160x120")
    data = {str(k): _as_values(str(k), v) for k, v in series.items()}
    try:
        mark_xs = [] if marks is None else [float(m) for m in marks]
    except (TypeError, ValueError):
        raise InvalidInputError(f"marks must be a list of x positions; got {marks!r}") from None
    if any(not math.isfinite(m) for m in mark_xs):
        raise InvalidInputError(f"marks must be finite x positions; got {list(marks)!r}")

    # Imported here: only a plot needs matplotlib, and importing it costs more than the metrics themselves.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scale = max(0.5, min(width / 640.0, height / 360.0))
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for m in mark_xs:
        ax.axvline(m, color=np.divide(MARK_COLOUR, 255), linestyle="--", linewidth=scale, zorder=1, label="_mark")
    for k, (name, values) in enumerate(data.items()):
        with np.errstate(invalid="ignore"):
            shown = np.where(np.isfinite(values), values, np.nan)
        ax.plot(np.arange(values.size), shown, color=np.divide(PALETTE[k % len(PALETTE)], 255),
                linewidth=2 * scale, marker="o" if values.size <= _MAX_DOTTED_POINTS else None,
                markersize=5 * scale, label=name[:40], zorder=3)
    longest = max(v.size for v in data.values())
    x_lo, x_hi = min([0.0] + mark_xs), max([float(max(longest - 1, 0))] + mark_xs)
    if x_hi - x_lo < 1e-9:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    x_pad = 0.02 * (x_hi - x_lo)  # keeps the end points and marks off the frame
    ax.set_xlim(x_lo - x_pad, x_hi + x_pad)
    ax.set_ylim(*_y_limits(data))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8 * scale)
    ax.legend(loc="upper right", fontsize=8 * scale, frameon=True)
    if title:
        ax.set_title(title, fontsize=9.5 * scale)
    fig.tight_layout(pad=0.4)
    return fig


def render(fig) -> np.ndarray:
    """A figure drawn by Agg as ``uint8 [H, W, 3]`` RGB."""
    canvas = fig.canvas
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def plot_series(series: Mapping[str, Sequence[float | None]], title: str = "", size: tuple[int, int] = (640, 360),
                marks: Sequence[float] | None = None) -> np.ndarray:
    """A line plot as ``uint8 [H, W, 3]`` RGB, where ``size`` is ``(width, height)``: what a node shows as an image.

    See ``series_figure`` for what is drawn. Non-negative data are drawn from 0, so the height of a point
    of flicker reads as its size.
    """
    return render(series_figure(series, title, size, marks))


# ---------------------------------------------------------------------------------------------- bundle

def video_metrics(frames, windows=None, method: str | Callable[[np.ndarray, np.ndarray], np.ndarray] = "dis") -> dict:
    """Every metric above in one JSON-ready dict: ``{"frames", "height", "width", "flicker", "warp", "seam"}``.

    ``flicker``, ``warp`` and ``seam`` are the dicts of ``flicker_index``, ``warp_error`` and ``seam_score``;
    ``seam`` is ``None`` without ``windows``. A non-finite seam score (only the inside energy is 0) becomes
    ``None`` so that the result is strict JSON; its two energies stay in the dict.
    """
    _flow_function(method)  # a bad method name fails before any work
    video = as_video(frames)
    seam = None
    if windows is not None:
        seam = seam_score(video, windows)
        if seam["score"] is not None and not math.isfinite(seam["score"]):
            seam["score"] = None
    return {
        "frames": int(video.shape[0]),
        "height": int(video.shape[1]),
        "width": int(video.shape[2]),
        "flicker": flicker_index(video),
        "warp": warp_error(video, method),
        "seam": seam,
    }


def video_metrics_figure(metrics: Mapping, size: tuple[int, int] = (640, 360)):
    """The figure ``plot_video_metrics`` renders: flicker and warping error per transition, window borders marked."""
    try:
        flicker, warp, seam = metrics["flicker"], metrics["warp"], metrics.get("seam")
        series = {"flicker |dY|": flicker["per_transition"], f"warp error ({warp['method']})": warp["per_transition"]}
    except (KeyError, TypeError):
        raise InvalidInputError("plot_video_metrics needs the dict returned by video_metrics") from None
    parts = [f"flicker {flicker['mean']:.3g}"]
    if warp["mean"] is not None:
        parts.append(f"warp {warp['mean']:.3g}")
    marks = None
    if seam is not None:
        marks = seam["border_transitions"]
        parts.append("seam " + ("n/a" if seam["score"] is None else f"{seam['score']:.2f}"))
    return series_figure(series, title="  ".join(parts), size=size, marks=marks)


def plot_video_metrics(metrics: Mapping, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """The plot a metrics node shows, ``uint8 [H, W, 3]`` RGB (see ``video_metrics_figure``)."""
    return render(video_metrics_figure(metrics, size))
