"""Context windows for long videos: which frames each model call sees, how overlapping results are fused,
FreeNoise initial noise, and grouping several windows into one model call.

AnimateDiff's motion module was trained on 16-frame clips, so a longer clip is denoised as overlapping windows
whose predictions are blended per frame. Workflows are ported between ComfyUI core's context windows
(``comfy/context_windows.py``, 0.3.64) and AnimateDiff-Evolved (``animatediff/context.py``, 90fb133); both use the
same index lists and weights, and so do we: ``tests/test_context.py`` checks every function here against values
recorded from running their code (``tests/data/context_reference/``). Where their lists are unusable (indices past
the last frame, or frames no window covers: both happen with ``standard_uniform`` at stride > 1) they crash or
return NaN frames; we raise ``InvalidInputError`` (a ``ValueError``) instead, naming the settings.

Frames live in dimension 0 (ComfyUI's batch of latents). A window is a list of frame indices, not necessarily
contiguous or increasing: ``looped_uniform`` windows wrap around the end and strided windows skip frames.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence, Union

import torch

from .errors import InvalidInputError

SCHEDULES = ("standard_static", "standard_uniform", "looped_uniform", "batched")
FUSE_METHODS = ("flat", "pyramid", "overlap-linear", "relative")

# overlap-linear ramps start at this weight rather than 0 so a frame seen only by a ramp end still has a weight
# to divide by; the value is the references' own.
_RAMP_FLOOR = 1e-37

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]
ModelFn = Callable[[torch.Tensor, list], Outputs]


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------

def ordered_halving(step: int) -> float:
    """The step's 64 bits read backwards as a binary fraction: 0, 1/2, 1/4, 3/4, 1/8, 5/8, ...

    The uniform schedules shift their windows by this fraction of the clip, so successive steps put the window
    borders at maximally spread positions and no frame sits on a seam twice in a row.
    """
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 64:
        raise InvalidInputError(f"step must be an integer in [0, 2**64), got {step!r}")
    reversed_bits = 0
    for _ in range(64):
        reversed_bits = (reversed_bits << 1) | (step & 1)
        step >>= 1
    return reversed_bits / (1 << 64)


def step_for_sigma(sigma, sample_sigmas) -> int:
    """The step index ``windows(..., step=)`` expects for a model call at ``sigma``.

    ComfyUI core uses the index of the first entry of the sampler's sigma list (``transformer_options
    ["sample_sigmas"]``) that equals ``sigma`` within rtol 1e-4; we do the same. Evolved instead counts sampler
    callbacks from KSampler's ``start_step``; the two agree for one-evaluation-per-step samplers (euler, the
    Lightning default) started from step 0, and differ for KSamplerAdvanced with ``start_at_step`` > 0 (core
    restarts at 0) and for samplers that evaluate at the next step's sigma (heun: core moves on, Evolved does not).
    For a sigma between two listed ones (dpm_2, res_2s, ...) core raises; we return the step whose interval holds
    it, which is what Evolved's counter gives.

    ``sigma`` may be a per-frame vector (k-diffusion passes ``sigma * ones(batch)``); all frames share one sigma,
    so the first entry is used. Core compares the whole vector and so fails for dim-0 batches of more than one
    frame unless their count equals the list length.
    """
    sigmas = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
    value = torch.as_tensor(sigma, dtype=torch.float64).flatten().cpu()
    if sigmas.numel() == 0 or value.numel() == 0:
        raise InvalidInputError("step_for_sigma needs a non-empty sigma and sample_sigmas list")
    value = value[:1]
    matches = torch.nonzero(torch.isclose(sigmas, value, rtol=1e-4)).flatten()
    if matches.numel():
        return int(matches[0])
    above = torch.nonzero(sigmas >= value).flatten()
    if above.numel() == 0 or float(value) < float(sigmas.min()):
        raise InvalidInputError(f"sigma {float(value):.6g} lies outside the sampler's sigmas "
                                f"[{float(sigmas.min()):.6g}, {float(sigmas.max()):.6g}]")
    return int(above[-1])


# ---------------------------------------------------------------------------------------------------------------
# Window schedules
# ---------------------------------------------------------------------------------------------------------------

def windows(num_frames: int, context_length: int = 16, overlap: int = 4, stride: int = 1, closed_loop: bool = False,
            schedule: str = "standard_static", step: int = 0, *, use_on_equal_length: bool = False) -> list[list[int]]:
    """Frame index lists, one per model call, for the sampling step ``step`` (see ``step_for_sigma``).

    - ``standard_static``: contiguous windows every ``context_length - overlap`` frames; the last one is pulled
      back to end on the last frame, so it overlaps its neighbour by more than ``overlap``.
    - ``looped_uniform``: windows shifted by ``ordered_halving(step)`` of the clip each step and wrapping around
      the end (with ``closed_loop`` one more window joins the end back to the start). ``stride`` > 1 adds windows
      that take every 2nd, 4th, ... frame, capped at ``ceil(log2(num_frames / context_length)) + 1`` levels.
    - ``standard_uniform``: the same shifted windows, but a window that would wrap is slid to end on the last
      frame, a window starting at the wrap point is added when needed, and repeats are dropped.
    - ``batched``: consecutive non-overlapping chunks; the last may be shorter. ``overlap`` is not used.

    A clip no longer than ``context_length`` is one window of every frame: core and Evolved skip windowing then.
    Evolved's ``use_on_equal_length`` runs the schedule when the clip is exactly ``context_length`` long, which
    only changes anything for ``looped_uniform`` (its windows then wrap).
    """
    _check_window_settings(num_frames, context_length, overlap, stride, schedule, step)
    n, length = num_frames, context_length
    if n < length or (n == length and not (use_on_equal_length and schedule == "looped_uniform")):
        return [list(range(n))]
    if schedule == "standard_static":
        result = _static_windows(n, length, overlap)
    elif schedule == "batched":
        result = [list(range(start, min(start + length, n))) for start in range(0, n, length)]
    elif schedule == "looped_uniform":
        result = _shifted_windows(n, length, overlap, stride, closed_loop, step)
    else:
        result = _unwrap_windows(_shifted_windows(n, length, overlap, stride, False, step), n, length)
    _check_usable(result, n, context_length, overlap, stride, closed_loop, schedule, step)
    return result


def _check_window_settings(num_frames, context_length, overlap, stride, schedule, step):
    if schedule not in SCHEDULES:
        raise InvalidInputError(f"unknown context schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    for name, value, low in (("num_frames", num_frames, 1), ("context_length", context_length, 1),
                             ("overlap", overlap, 0), ("stride", stride, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if schedule != "batched" and overlap >= context_length:
        raise InvalidInputError(f"overlap {overlap} must be smaller than context_length {context_length} for "
                                f"the {schedule} schedule (windows would not advance); lower the overlap")
    ordered_halving(step)  # validates step


def _static_windows(n: int, length: int, overlap: int) -> list[list[int]]:
    advance = length - overlap
    starts = list(range(0, n - length, advance))  # every window that ends before the last frame...
    starts.append(n - length)                     # ...then one pulled back to end exactly on it
    return [list(range(start, start + length)) for start in starts]


def _stride_levels(n: int, length: int, stride: int) -> int:
    """``min(stride, ceil(log2(n / length)) + 1)`` in exact integer arithmetic: spacings beyond the one that
    already spans the clip add nothing."""
    chunks = -(-n // length)  # ceil(n / length)
    return min(stride, (chunks - 1).bit_length() + 1)


def _shifted_windows(n, length, overlap, stride, closed_loop, step) -> list[list[int]]:
    shift = ordered_halving(step)
    pad = round(n * shift)  # Python rounds halves to even, exactly as the references do
    result = []
    for level in range(_stride_levels(n, length, stride)):
        spacing = 1 << level
        first = int(shift * spacing) + pad
        stop = n + pad - (0 if closed_loop else overlap)
        for start in range(first, stop, length * spacing - overlap):
            result.append([(start + spacing * k) % n for k in range(length)])
    return result


def _wrap_position(window: list[int], n: int) -> int:
    """Position of the first index that is smaller than its predecessor (mod n), or -1 if none."""
    for pos in range(1, len(window)):
        if window[pos] % n < window[pos - 1] % n:
            return pos
    return -1


def _slide_to_end(window: list[int], n: int) -> list[int]:
    """Keep the window's spacing pattern (relative to its first index, mod n) but make it end on frame n - 1."""
    relative = [(i - window[0]) % n for i in window]
    offset = n - 1 - relative[-1]
    return [r + offset for r in relative]


def _unwrap_windows(raw: list[list[int]], n: int, length: int) -> list[list[int]]:
    """standard_uniform from the looped windows: slide wrapping windows to the end, and where the frames after
    the wrap point are not in the following window, add a contiguous window starting there; drop repeats.

    The "following window" is the next one still to be processed (or, for the last, the first processed one),
    which is what the references compare against.
    """
    pending = deque(raw)
    done: list[list[int]] = []
    while pending:
        window = pending.popleft()
        pos = _wrap_position(window, n)
        if pos >= 0:
            wrap_value = window[pos]
            window = _slide_to_end(window, n)
            following = pending[0] if pending else (done[0] if done else window)
            if wrap_value not in following:
                pending.appendleft(list(range(wrap_value, wrap_value + length)))
        done.append(window)
    unique: list[list[int]] = []
    for window in done:
        if window not in unique:
            unique.append(window)
    return unique


def _check_usable(result, n, context_length, overlap, stride, closed_loop, schedule, step):
    """Refuse lists the references would crash on (index past the end) or fill with NaN (uncovered frames)."""
    settings = (f"num_frames={n}, context_length={context_length}, overlap={overlap}, stride={stride}, "
                f"closed_loop={closed_loop}, schedule={schedule!r}, step={step}")
    flat = {i for window in result for i in window}
    if any(i < 0 or i >= n for i in flat):
        raise InvalidInputError(f"{settings}: the schedule (as in ComfyUI core and Evolved) yields frame indices "
                                f"past the last frame, which they crash on; use stride=1 or the looped_uniform "
                                f"schedule")
    if len(flat) != n:
        missing = sorted(set(range(n)) - flat)
        raise InvalidInputError(f"{settings}: the schedule (as in ComfyUI core and Evolved) leaves frames "
                                f"{missing[:8]} uncovered, which they turn into NaN; use stride=1 or the "
                                f"looped_uniform schedule")


# ---------------------------------------------------------------------------------------------------------------
# Fuse weights and fusion
# ---------------------------------------------------------------------------------------------------------------

def fuse_weights(method: str, length: int, *, overlap: int = 0, window: Sequence[int] | None = None,
                 num_frames: int | None = None) -> torch.Tensor:
    """Per-position weights of one window's output, as the references use them.

    - ``flat``: all 1.
    - ``pyramid``: distance to the nearer window edge, ``min(p + 1, length - p)``: [1, 2, 2, 1], [1, 2, 3, 2, 1].
    - ``overlap-linear``: 1, except linear ramps over the first/last ``overlap`` positions, on the sides where the
      window does not touch the clip's first/last frame (needs ``window`` and ``num_frames``). With overlap 0
      the references crash on a shape mismatch; here there is nothing to ramp, so the weights are flat.
    - ``relative``: the bias ``max(0.01, 1 - |i - centre| / half_width)`` of each frame index ``i`` in ``window``
      (centre and half width from its first and last index, so wrapped windows get biases above 1, as in the
      references). It weights an incremental average; see ``WindowFuser``. Returned in float64.
    """
    if method not in FUSE_METHODS:
        raise InvalidInputError(f"unknown fuse method {method!r}; choose one of {', '.join(FUSE_METHODS)}")
    if not isinstance(length, int) or length < 1:
        raise InvalidInputError(f"window length must be a positive integer, got {length!r}")
    if method == "flat":
        return torch.ones(length)
    if method == "pyramid":
        return torch.tensor([float(min(p + 1, length - p)) for p in range(length)])
    if window is None or (method == "overlap-linear" and num_frames is None):
        raise InvalidInputError(f"fuse method {method!r} needs the window's frame indices"
                                + (" and num_frames" if method == "overlap-linear" else ""))
    if len(window) != length:
        raise InvalidInputError(f"window has {len(window)} indices but length is {length}")
    if method == "relative":
        return torch.tensor(_relative_biases(window), dtype=torch.float64)
    return _overlap_linear(length, overlap, window, num_frames)


def _overlap_linear(length, overlap, window, num_frames) -> torch.Tensor:
    weights = torch.ones(length)
    ramp_in, ramp_out = min(window) > 0, max(window) < num_frames - 1
    if overlap == 0 or not (ramp_in or ramp_out):
        return weights
    if overlap > length:
        raise InvalidInputError(f"overlap-linear fusing needs overlap <= window length, but window "
                                f"{list(window)[:4]}... has {length} frames and overlap is {overlap} (the batched "
                                f"schedule's last window can be short); lower the overlap or use another fuse method")
    if ramp_in:
        weights[:overlap] = torch.linspace(_RAMP_FLOOR, 1.0, overlap)
    if ramp_out:  # applied second: wins where the two ramps meet, as in the references
        weights[length - overlap:] = torch.linspace(1.0, _RAMP_FLOOR, overlap)
    return weights


def _relative_biases(window: Sequence[int]) -> list[float]:
    first, last = window[0], window[-1]
    centre, half_width = (first + last) / 2, (last - first + 1e-2) / 2
    return [max(1e-2, 1 - abs(i - centre) / half_width) for i in window]


class WindowFuser:
    """Accumulates per-window outputs into one full-clip tensor, exactly as core's context handler does.

    For ``flat``/``pyramid``/``overlap-linear`` each frame gets ``sum(w * out) / sum(w)`` over the windows that
    contain it. For ``relative`` each frame keeps a running average that a new window's output joins with weight
    ``bias / (bias_so_far + bias)``, so the result is the bias-weighted mean. Add windows in schedule order: the
    float rounding (and the outcome for repeated indices inside one window) then matches the references.
    """

    def __init__(self, num_frames: int, method: str, *, overlap: int = 0):
        if method not in FUSE_METHODS:
            raise InvalidInputError(f"unknown fuse method {method!r}; choose one of {', '.join(FUSE_METHODS)}")
        self.num_frames, self.method, self.overlap = num_frames, method, overlap
        self._total: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None  # per-frame weight sum, float32 like the references
        # relative's per-frame bias sums stay in float64 on the CPU: the references keep them as Python floats
        # (and MPS has no float64)
        self._bias_sum = torch.zeros(num_frames, dtype=torch.float64)
        self._seen = torch.zeros(num_frames, dtype=torch.bool)

    def add(self, window: Sequence[int], out: torch.Tensor) -> None:
        window = list(window)
        if not window:
            raise InvalidInputError("a window needs at least one frame index")
        if out.shape[0] != len(window):
            raise InvalidInputError(f"window output has {out.shape[0]} frames but the window has {len(window)} "
                                    f"indices")
        if any(i < 0 or i >= self.num_frames for i in window):
            raise InvalidInputError(f"window {window[:4]}... has indices outside 0..{self.num_frames - 1}")
        if self._total is None:
            self._total = torch.zeros((self.num_frames, *out.shape[1:]), dtype=out.dtype, device=out.device)
            shape = (self.num_frames,) + (1,) * (out.dim() - 1)
            self._weight = torch.zeros(shape, dtype=torch.float32, device=out.device)
        self._seen[window] = True
        if self.method == "relative":
            self._add_relative(window, out)
            return
        weights = fuse_weights(self.method, len(window), overlap=self.overlap, window=window,
                               num_frames=self.num_frames).to(out.device)
        weights = weights.view((-1,) + (1,) * (out.dim() - 1))
        index = torch.tensor(window, device=out.device)
        # Gather-add-scatter rather than index_add_: for an index repeated inside one window (strided looped
        # windows on short clips) only one contribution lands, as in the references.
        self._total[index] += out * weights
        self._weight[index] += weights

    def _add_relative(self, window: list[int], out: torch.Tensor) -> None:
        biases = torch.tensor(_relative_biases(window), dtype=torch.float64)
        # The references update position by position; positions sharing a frame index must therefore be applied
        # in order, so process the first occurrence of every index, then the second, and so on.
        occurrence, rounds = {}, []
        for pos, idx in enumerate(window):
            k = occurrence.get(idx, 0)
            occurrence[idx] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(pos)
        shape = (-1,) + (1,) * (out.dim() - 1)
        for positions in rounds:
            pos_t = torch.tensor(positions)
            index = torch.tensor([window[p] for p in positions])
            so_far = self._bias_sum[index]
            new_total = so_far + biases[pos_t]
            # float32 factors: the references multiply float32 tensors by these Python floats
            keep = (so_far / new_total).to(torch.float32).to(out.device).view(shape)
            take = (biases[pos_t] / new_total).to(torch.float32).to(out.device).view(shape)
            index_d, pos_d = index.to(out.device), pos_t.to(out.device)
            self._total[index_d] = self._total[index_d] * keep + out[pos_d] * take
            self._bias_sum[index] = new_total

    def result(self) -> torch.Tensor:
        """The fused clip. Every frame must have been covered by some window."""
        if self._total is None or not bool(self._seen.all()):
            missing = torch.nonzero(~self._seen).flatten().tolist()
            raise InvalidInputError(f"frames {missing[:8]} were not covered by any window; nothing to fuse there")
        if self.method == "relative":
            return self._total.clone()
        return self._total / self._weight


# ---------------------------------------------------------------------------------------------------------------
# Batching windows into model calls
# ---------------------------------------------------------------------------------------------------------------

def plan_batches(window_lists: Sequence[Sequence[int]], *, frame_bytes: int | None = None,
                 memory_budget: int | None = None, max_windows_per_call: int | None = None) -> list[list[int]]:
    """Group windows (by position in ``window_lists``) into model calls, each at most ``max_windows_per_call``
    windows and at most ``memory_budget`` bytes at ``frame_bytes`` per frame.

    Only consecutive windows of equal length share a call: a call is one tensor of shape [windows, frames, ...]
    and the motion module reads one video length per call. Keeping schedule order lets the results be fused in
    the same order as one-window-at-a-time evaluation, so the fused clip is identical. Calls within a run are
    balanced (sizes differ by at most one): the same number of calls as greedy packing, with a lower peak. A
    window larger than the budget on its own still gets a call of its own (sequential evaluation needs as much).
    With no limit given, each run of equal-length windows is one call.
    """
    if max_windows_per_call is not None and (not isinstance(max_windows_per_call, int) or max_windows_per_call < 1):
        raise InvalidInputError(f"max_windows_per_call must be a positive integer or None, got "
                                f"{max_windows_per_call!r}")
    if memory_budget is not None and (frame_bytes is None or frame_bytes <= 0):
        raise InvalidInputError("a memory_budget needs frame_bytes > 0 (the model's peak memory per frame in one "
                                "call)")
    runs: list[list[int]] = []
    for k, window in enumerate(window_lists):
        if runs and len(window_lists[runs[-1][0]]) == len(window):
            runs[-1].append(k)
        else:
            runs.append([k])
    batches = []
    for run in runs:
        per_call = len(run)
        if max_windows_per_call is not None:
            per_call = min(per_call, max_windows_per_call)
        if memory_budget is not None:
            per_call = min(per_call, max(1, int(memory_budget // (frame_bytes * len(window_lists[run[0]])))))
        calls = -(-len(run) // per_call)
        base, extra = divmod(len(run), calls)
        start = 0
        for c in range(calls):
            size = base + (1 if c < extra else 0)
            batches.append(run[start:start + size])
            start += size
    return batches


def _as_output_list(out: Outputs) -> tuple[list[torch.Tensor], bool]:
    if isinstance(out, torch.Tensor):
        return [out], True
    return list(out), False


def evaluate_windows(model_fn: ModelFn, x: torch.Tensor, window_lists: Sequence[Sequence[int]], *,
                     fuse_method: str = "pyramid", overlap: int = 0,
                     batches: Sequence[Sequence[int]] | None = None) -> Outputs:
    """Run ``model_fn`` over the windows of ``x`` (frames in dim 0) in the given batches and fuse the results.

    ``model_fn(x_windows, windows)`` gets ``x_windows`` of shape [B, L, *x.shape[1:]] (the B windows' frames, in
    window order) and the B index lists, so it can slice whatever else is per-frame (timesteps, conds, control
    hints). It returns a tensor of shape [B, L, ...] or a sequence of them (one per cond), and the fused result
    has the same structure (a tuple for several) with the window dimension gone. ``batches`` comes from
    ``plan_batches``; the default is one window per call, like core and Evolved. A single window holding every
    frame in order is returned unfused, so a clip within ``context_length`` gives the plain model output bit for
    bit.
    """
    window_lists = [list(w) for w in window_lists]
    num_frames = x.shape[0]
    if not window_lists:
        raise InvalidInputError("no windows to evaluate")
    if len(window_lists) == 1 and window_lists[0] == list(range(num_frames)):
        outs, single = _as_output_list(model_fn(x.unsqueeze(0), window_lists))
        outs = [o[0] for o in outs]
        return outs[0] if single else tuple(outs)
    batches = [[k] for k in range(len(window_lists))] if batches is None else [list(b) for b in batches]
    _check_batches(batches, window_lists)
    fusers, single = None, True
    for batch in batches:
        index = torch.tensor([window_lists[k] for k in batch], device=x.device)
        outs, single = _as_output_list(model_fn(x[index], [window_lists[k] for k in batch]))
        if fusers is None:
            fusers = [WindowFuser(num_frames, fuse_method, overlap=overlap) for _ in outs]
        if len(outs) != len(fusers):
            raise InvalidInputError(f"model_fn returned {len(outs)} outputs for one batch and {len(fusers)} for "
                                    f"another")
        for o, fuser in zip(outs, fusers):
            if o.shape[:2] != index.shape:
                raise InvalidInputError(f"model_fn returned shape {tuple(o.shape)} for windows of shape "
                                        f"{tuple(index.shape)} (expected [windows, frames, ...])")
            for b, k in enumerate(batch):
                fuser.add(window_lists[k], o[b])
    results = [f.result() for f in fusers]
    return results[0] if single else tuple(results)


def _check_batches(batches: list[list[int]], window_lists: list[list[int]]) -> None:
    flat = [k for batch in batches for k in batch]
    if flat != list(range(len(window_lists))):
        raise InvalidInputError("batches must list every window index exactly once, in schedule order "
                                f"(use plan_batches); got {batches[:4]}...")
    for batch in batches:
        if len({len(window_lists[k]) for k in batch}) > 1:
            raise InvalidInputError(f"batch {batch} mixes windows of different lengths; they cannot share a model "
                                    f"call")


# ---------------------------------------------------------------------------------------------------------------
# FreeNoise
# ---------------------------------------------------------------------------------------------------------------

def freenoise(noise: torch.Tensor, context_length: int = 16, overlap: int = 4, seed: int | None = 0, *,
              generator: torch.Generator | None = None, dim: int = 0) -> torch.Tensor:
    """FreeNoise initial noise (Qiu et al. 2023): later frames reuse shuffled noise of earlier frames, so
    neighbouring windows start from correlated noise and agree better where they overlap.

    Walking windows every ``context_length - overlap`` frames, the frames right after window ``[s, s + L)``
    receive a seeded random permutation of frames ``[s, s + L - overlap)`` (fewer at the clip's end). Copies are
    made in order on the progressively rewritten tensor, so later sources may themselves be shuffled copies.
    This is Evolved's ``FreeNoise`` noise type (and core's later port): with the same seed and noise the output
    is identical. Frames ``0..L-1`` are never changed; the input tensor is not modified.
    """
    if not isinstance(context_length, int) or context_length < 1:
        raise InvalidInputError(f"context_length must be a positive integer, got {context_length!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < context_length:
        raise InvalidInputError(f"FreeNoise needs 0 <= overlap < context_length ({context_length}), got "
                                f"{overlap!r}")
    if not -noise.dim() <= dim < noise.dim():
        raise InvalidInputError(f"dim {dim} is out of range for noise of shape {tuple(noise.shape)}")
    if generator is None:
        if seed is None:
            raise InvalidInputError("freenoise needs a seed or a generator")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = noise.clone()
    frames = out.movedim(dim, 0)  # a view: writes land in ``out``
    n, advance = frames.shape[0], context_length - overlap
    for start in range(0, n - context_length, advance):
        target = start + context_length
        count = min(advance, n - target)
        order = torch.randperm(count, generator=generator, device="cpu") + start
        frames[target:target + count] = frames[order.to(frames.device)]
    return out
