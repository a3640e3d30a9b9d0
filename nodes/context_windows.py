"""Context windows inside ComfyUI: long clips sampled as overlapping 16-frame windows, several per model call.

The Context Windows node stores a ``ContextSettings`` under ``model_options["adl_context"]``
(``keys.CONTEXT``) and registers three wrappers under the same key (``install``):

- ``CALC_COND_BATCH``: splits the clip into the schedule's windows for the current step, groups them into model
  calls (``lightning.context.plan_batches``, from free memory or the user's cap), gives every call its slice of
  x, timesteps, per-frame conds and **ControlNet hints**, tells the motion module the window length, and fuses
  the results (``lightning.context.evaluate_windows``);
- ``PREPARE_SAMPLING``: ComfyUI sizes the memory it frees before sampling from the latent shape; with windows a
  call never holds the whole clip, so the estimate uses the frames of one call;
- ``OUTER_SAMPLE``: before any model is loaded, checks every step's windows (a schedule can be unusable at some
  steps only) and the window length against the motion module, then applies FreeNoise to the initial noise.

Why not core's ``context_handler``: in ComfyUI 0.3.64 it fails for frames-in-dim-0 batches (its step lookup
compares the per-frame sigma vector with the sigma list), it does not tell a motion module the window length, it
evaluates windows one at a time, and it hands every window the first frames of a ControlNet hint.

Everything that needs no ComfyUI object (settings, which hint rows a call needs, slicing conds, the window loop)
is plain Python below, tested in CI with stand-ins; ComfyUI modules are imported only inside the wrappers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch

from . import guards, keys
from ._core import core

context = core("context")
errors = core("errors")

log = logging.getLogger(__name__)

#: ComfyUI's own margin when it decides how many conds fit in one call (``samplers._calc_cond_batch``)
MEMORY_MARGIN = 1.5

Call = Callable[[list, torch.Tensor, torch.Tensor, list], Sequence[torch.Tensor]]


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContextSettings:
    """What the Context Windows node chose. Checked on creation, so a bad combination fails at the node."""

    context_length: int = 16
    overlap: int = 4
    stride: int = 1
    closed_loop: bool = False
    schedule: str = "standard_static"
    fuse_method: str = "pyramid"
    freenoise: bool = True
    max_windows_per_call: int = 0  # 0: as many as free memory allows

    def __post_init__(self):
        if self.fuse_method not in context.FUSE_METHODS:
            raise errors.InvalidInputError(f"Context Windows: unknown fuse_method {self.fuse_method!r}; choose one "
                                           f"of {', '.join(context.FUSE_METHODS)}")
        cap = self.max_windows_per_call
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise errors.InvalidInputError(f"Context Windows: max_windows_per_call must be 0 (automatic) or a "
                                           f"positive number of windows, got {cap!r}")
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
            raise errors.InvalidInputError(f"Context Windows: context_stride must be 1 or more, got {self.stride!r}")
        # the rules that hold for any clip (schedule name, overlap < length, ...), on one that needs windows;
        # whether a strided standard_uniform schedule is usable depends on the clip, so it is checked at sampling
        context.windows(self.context_length + 1, self.context_length, self.overlap, 1, self.closed_loop,
                        self.schedule, 0)

    def windows(self, num_frames: int, step: int = 0) -> list[list[int]]:
        return context.windows(num_frames, self.context_length, self.overlap, self.stride, self.closed_loop,
                               self.schedule, step)

    def uses_windows(self, num_frames: int) -> bool:
        """Core and Evolved skip windowing for clips within one window; so do we (bit-identical output)."""
        return num_frames > self.context_length

    def check_clip(self, num_frames: int, num_steps: int) -> None:
        """Raise now, before sampling, if the schedule is unusable at any of the run's steps (0 .. num_steps - 1;
        the model is never evaluated at the final sigma)."""
        if self.uses_windows(num_frames):
            for step in range(max(1, num_steps)):
                self.windows(num_frames, step)

    def frames_per_call(self, num_frames: int) -> int:
        """Frames one model call holds at most when the windows cannot be batched further: what ComfyUI should
        budget memory for before sampling (the automatic plan then fills whatever is still free)."""
        if not self.uses_windows(num_frames):
            return num_frames
        return min(num_frames, self.context_length * max(1, self.max_windows_per_call))


def check_window_length(settings: ContextSettings, num_frames: int, pe_length: int | None) -> None:
    """A motion module cannot see more frames at once than its positional encoding has entries."""
    length = min(num_frames, settings.context_length)
    if pe_length is not None and length > pe_length:
        raise guards.VideoLengthError(
            f"Context Windows: context_length {settings.context_length} gives windows of {length} frames, more than "
            f"this motion module can see at once ({pe_length}). Set context_length to 16 (what AnimateDiff-Lightning "
            f"was trained on) or at most {pe_length}.")


def initial_noise(noise: torch.Tensor, settings: ContextSettings, seed: int | None) -> torch.Tensor:
    """The sampler's starting noise: FreeNoise-shuffled when asked for and the clip needs windows."""
    if not settings.freenoise or not settings.uses_windows(noise.shape[0]):
        return noise
    # batched windows do not overlap (Evolved's batched options have no overlap, so its FreeNoise uses 0 there)
    overlap = 0 if settings.schedule == "batched" else settings.overlap
    return context.freenoise(noise, settings.context_length, overlap, 0 if seed is None else int(seed))


def current_step(timestep: torch.Tensor, sample_sigmas) -> int:
    """The schedule step of a model call, from its sigma. Without the sampler's sigma list (a model call outside
    a sampler) it is step 0; a sigma outside the list (churning samplers) takes the nearest listed step."""
    if sample_sigmas is None:
        return 0
    try:
        return context.step_for_sigma(timestep, sample_sigmas)
    except errors.InvalidInputError:
        sigmas = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
        value = float(torch.as_tensor(timestep, dtype=torch.float64).flatten()[0])
        return int(torch.argmin((sigmas - value).abs()))


def call_plan(window_lists: list[list[int]], settings: ContextSettings, *, frame_bytes: float | None,
              free_memory: float | None) -> list[list[int]]:
    """Which windows share a model call: the user's cap and/or what fits in free memory (with ComfyUI's margin)."""
    cap = settings.max_windows_per_call or None
    if frame_bytes is None or free_memory is None or frame_bytes <= 0:
        return context.plan_batches(window_lists, max_windows_per_call=cap)
    return context.plan_batches(window_lists, frame_bytes=int(frame_bytes),
                                memory_budget=int(free_memory / MEMORY_MARGIN), max_windows_per_call=cap)


# ---------------------------------------------------------------------------------------------------------------
# Slicing what a call needs
# ---------------------------------------------------------------------------------------------------------------

def hint_rows(hint_count: int, frames: Sequence[int]) -> list[int] | None:
    """The rows of a ControlNet hint batch that belong to latent ``frames``; ``None`` for a single hint image.

    Without windows ComfyUI pairs hint row ``f`` with latent frame ``f``, repeating a shorter hint batch from its
    start and ignoring rows past the last frame; so frame ``f`` always sees row ``f % hint_count``.
    """
    if hint_count <= 1:
        return None
    return [int(f) % hint_count for f in frames]


def window_control(control, frames: Sequence[int], memo: dict):
    """A view of a ControlNet (and its ``previous_controlnet`` chain) that sees only the hints of ``frames``.

    A shallow copy: the weights, the strength and what ``pre_run`` set up are shared; only the hint images are
    replaced and the hint prepared from them is dropped, so the ControlNet prepares (scales, encodes) this call's
    rows itself. ``memo`` keeps one view per control within a call, because ComfyUI batches cond and uncond into
    one call only when they share the same control object.
    """
    if control is None:
        return None
    if id(control) in memo:
        return memo[id(control)]
    view = copy.copy(control)
    memo[id(control)] = view
    original = getattr(control, "cond_hint_original", None)
    if isinstance(original, torch.Tensor) and original.dim() > 0:
        rows = hint_rows(original.shape[0], frames)
        if rows is not None:
            index = torch.tensor(rows, device=original.device)
            view.cond_hint_original = original[index]
            # per-frame extra inputs of inpainting-style ControlNets (masks) follow the same rows
            extra = getattr(control, "extra_concat_orig", None)
            if isinstance(extra, list):
                view.extra_concat_orig = [e[index.to(e.device)] if isinstance(e, torch.Tensor) and e.dim() > 0
                                          and e.shape[0] == original.shape[0] else e for e in extra]
    # cached per-call state of the original, prepared for other frames (or none yet): rebuilt by the view
    if hasattr(view, "cond_hint"):
        view.cond_hint = None
    if hasattr(view, "control_input"):  # T2I adapters cache their features of the hint
        view.control_input = None
    previous = getattr(control, "previous_controlnet", None)
    if previous is not None:
        view.previous_controlnet = window_control(previous, frames, memo)
    return view


def _per_frame(value, num_frames: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_frames


def slice_cond(cond: dict, frames: Sequence[int], num_frames: int, memo: dict) -> dict:
    """One cond entry for a call holding ``frames``: per-frame tensors (prompt-per-frame embeddings, masks,
    concat latents, also inside ``model_conds``) keep only those rows, ControlNets see only those hints."""
    out = dict(cond)
    index = torch.tensor(list(frames))
    for key, value in cond.items():
        if key == "control":
            out[key] = window_control(value, frames, memo)
        elif key == "model_conds" and isinstance(value, dict):
            sliced = {}
            for name, item in value.items():
                tensor = getattr(item, "cond", None)
                if _per_frame(tensor, num_frames) and hasattr(item, "_copy_with"):
                    item = item._copy_with(tensor[index.to(tensor.device)])
                sliced[name] = item
            out[key] = sliced
        elif _per_frame(value, num_frames):
            out[key] = value[index.to(value.device)]
    return out


def slice_conds(conds: Sequence, frames: Sequence[int], num_frames: int) -> list:
    """Every cond list of a call (positive, negative, ...; ``None`` stays ``None``), sharing control views."""
    memo: dict = {}
    return [None if c is None else [slice_cond(entry, frames, num_frames, memo) for entry in c] for c in conds]


# ---------------------------------------------------------------------------------------------------------------
# The window loop
# ---------------------------------------------------------------------------------------------------------------

def run_windows(call: Call, conds: Sequence, x: torch.Tensor, timestep: torch.Tensor, settings: ContextSettings,
                step: int, *, frame_bytes: float | None = None, free_memory: float | None = None,
                interrupt: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Evaluate the clip ``x`` (frames in dim 0) window by window, several windows per call, and fuse.

    ``call(sub_conds, sub_x, sub_timestep, windows)`` is one model evaluation of ``sub_x`` (the windows' frames
    concatenated in order, ``len(windows) * L`` rows) returning one tensor of those rows per cond, as ComfyUI's
    ``_calc_cond_batch`` does. ``interrupt`` runs before every call, so Cancel stops between windows.
    """
    num_frames = x.shape[0]
    window_lists = settings.windows(num_frames, step)
    batches = call_plan(window_lists, settings, frame_bytes=frame_bytes, free_memory=free_memory)

    def model_fn(x_windows: torch.Tensor, windows: list) -> tuple:
        if interrupt is not None:
            interrupt()
        frames = [i for window in windows for i in window]
        sub_t = timestep[torch.tensor(frames, device=timestep.device)] if _per_frame(timestep, num_frames) \
            else timestep
        outs = call(slice_conds(conds, frames, num_frames), x_windows.flatten(0, 1), sub_t, windows)
        return tuple(o.reshape(x_windows.shape[:2] + o.shape[1:]) for o in outs)

    fused = context.evaluate_windows(model_fn, x, window_lists, fuse_method=settings.fuse_method,
                                     overlap=settings.overlap, batches=batches)
    return list(fused) if isinstance(fused, tuple) else [fused]


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI wrappers
# ---------------------------------------------------------------------------------------------------------------

def _settings(model_options) -> ContextSettings | None:
    settings = (model_options or {}).get(keys.CONTEXT)
    return settings if isinstance(settings, ContextSettings) else None


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    settings = _settings(model_options)
    if settings is None or not settings.uses_windows(x_in.shape[0]):
        return executor(model, conds, x_in, timestep, model_options)
    import comfy.model_management

    transformer_options = model_options.get("transformer_options", {})
    step = current_step(timestep, transformer_options.get("sample_sigmas"))
    chunks = max(1, sum(c is not None for c in conds))  # cond and uncond rows of one frame
    frame_bytes = model.memory_required([chunks] + list(x_in.shape[1:]))
    free_memory = comfy.model_management.get_free_memory(x_in.device)

    def call(sub_conds, sub_x, sub_t, windows):
        options = dict(model_options)
        options["transformer_options"] = {**transformer_options, keys.VIDEO_LENGTH: len(windows[0]),
                                          keys.CONTEXT_WINDOWS: [list(w) for w in windows]}
        return executor(model, sub_conds, sub_x, sub_t, options)

    return run_windows(call, conds, x_in, timestep, settings, step, frame_bytes=frame_bytes,
                       free_memory=free_memory,
                       interrupt=comfy.model_management.throw_exception_if_processing_interrupted)


def prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    model_options = kwargs.get("model_options", args[1] if len(args) > 1 else None)
    settings = _settings(model_options)
    if settings is not None and len(noise_shape) > 0:
        noise_shape = [settings.frames_per_call(int(noise_shape[0])), *noise_shape[1:]]
    return executor(model, noise_shape, *args, **kwargs)


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None):
    guider = executor.class_obj
    settings = _settings(guider.model_options)
    if settings is not None:
        frames = int(noise.shape[0])
        settings.check_clip(frames, len(sigmas) - 1)
        attachment = guider.model_patcher.get_attachment(keys.MOTION)
        check_window_length(settings, frames, attachment.pe_length if attachment is not None else None)
        noise = initial_noise(noise, settings, seed)
        if settings.uses_windows(frames):
            log.info("[AnimateDiff-Lightning] %d frames in %s windows of %d (overlap %d, fuse %s%s)", frames,
                     settings.schedule, settings.context_length, settings.overlap, settings.fuse_method,
                     ", FreeNoise" if settings.freenoise else "")
    return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)


def install(model_patcher, settings: ContextSettings) -> None:
    """Put ``settings`` and our wrappers on ``model_patcher`` (a clone the caller owns)."""
    import comfy.patcher_extension

    kinds = comfy.patcher_extension.WrappersMP
    if model_patcher.model_options.pop("context_handler", None) is not None:
        log.warning("[AnimateDiff-Lightning] Context Windows replaces ComfyUI's own context windows on this model; "
                    "use one of the two.")
    # the motion module's frame guard reads this entry too: with windows, clips may exceed its 32 frames
    model_patcher.model_options[keys.CONTEXT] = settings
    for kind, wrapper in ((kinds.CALC_COND_BATCH, calc_cond_batch_wrapper),
                          (kinds.PREPARE_SAMPLING, prepare_sampling_wrapper),
                          (kinds.OUTER_SAMPLE, outer_sample_wrapper)):
        model_patcher.remove_wrappers_with_key(kind, keys.CONTEXT)
        model_patcher.add_wrapper_with_key(kind, keys.CONTEXT, wrapper)
