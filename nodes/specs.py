"""What every node of the pack looks like from outside: ids, inputs, outputs, tooltips — as plain data.

Kept free of ComfyUI so that CI can check the interface (every input has a tooltip, example workflows connect
only existing inputs with matching types) without a ComfyUI install; ``nodes.comfy_schema`` turns a spec into
ComfyUI's V3 ``io.Schema``. Node ids and the names of their core inputs are stable: add inputs, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._core import core

_context = core("context")
_hub = core("hub")
_motion_module = core("motion_module")

ROOT = "AnimateDiff-Lightning"
CAT_MOTION = f"{ROOT}/motion"
CAT_SAMPLING = f"{ROOT}/sampling"
CAT_LONG_VIDEO = f"{ROOT}/long video"
CAT_ANALYSIS = f"{ROOT}/analysis"

#: Socket types. MOTION_MODULE is ours (Evolved's is MOTION_MODEL_ADE). MOTION_LORA has the same name as
#: AnimateDiff-Evolved's motion-LoRA chain on purpose: Apply Motion Module accepts a chain from either pack's
#: loader, so graphs that already load motion LoRAs with Evolved's node keep working.
MOTION_MODULE = "MOTION_MODULE"
MOTION_LORA = "MOTION_LORA"

#: Combo inputs whose options are the files of a model folder, resolved when ComfyUI asks for the schema.
OPTIONS_MOTION_MODULES = "@animatediff_models"
OPTIONS_MOTION_LORAS = "@animatediff_motion_lora"
#: The metrics' optical-flow methods: resolved with the schema, because ``lightning.metrics`` needs OpenCV and
#: the other nodes must load without it.
OPTIONS_FLOW_METHODS = "@flow_methods"

NORM_MODES = _motion_module.NORM_MODES
#: ``auto`` reads the step count from the file (our metadata, then a release-style name); the numbers are the
#: released Lightning step counts.
AUTO_STEPS = "auto"
LIGHTNING_STEPS_OPTIONS = (AUTO_STEPS, *(str(n) for n in _hub.RELEASED_STEPS))


@dataclass(frozen=True)
class In:
    id: str
    type: str
    tooltip: str
    default: object = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple | str | None = None
    optional: bool = False
    display_name: str | None = None
    control_after_generate: bool = False


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[In, ...] = field(default_factory=tuple)
    outputs: tuple[Out, ...] = field(default_factory=tuple)
    is_output_node: bool = False
    experimental: bool = False

    def input(self, input_id: str) -> In:
        for i in self.inputs:
            if i.id == input_id:
                return i
        raise KeyError(f"{self.node_id} has no input {input_id!r}")


LOAD_MOTION_MODULE = NodeSpec(
    node_id="ADL_LoadMotionModule",
    display_name="Load Motion Module (Lightning)",
    category=CAT_MOTION,
    description=(
        "Loads an SD1.5 AnimateDiff motion module: AnimateDiff-Lightning 1/2/4/8-step (the _comfyui or _diffusers "
        "file), AnimateDiff v1/v2/v3 or AnimateLCM, in .safetensors or .ckpt. The released Lightning modules are "
        "always listed (marked \"not downloaded\" until they are on disk); one that is not on disk yet is "
        "downloaded from the Hugging Face hub into models/animatediff_models on first use, and fails at once with "
        "the manual download link when offline. Wrong files (SDXL modules, motion LoRAs, SD checkpoints, "
        "ControlNets, damaged files) are refused with a message that says what they are."),
    inputs=(
        In("name", "COMBO", options=OPTIONS_MOTION_MODULES, default="animatediff_lightning_4step_comfyui.safetensors",
           tooltip="Motion module file from models/animatediff_models (or any folder registered for "
                   "animatediff_models in extra_model_paths.yaml). Pick the Lightning module whose step count you "
                   "will sample with; the 4-step one is the best speed/quality balance."),
        In("group_norm", "COMBO", options=NORM_MODES, default="per_frame", optional=True,
           tooltip="How the motion module normalises: per_frame is the original AnimateDiff (and ComfyUI) "
                   "behaviour; across_frames is what diffusers does. Keep per_frame unless you are matching "
                   "diffusers output."),
        In("lightning_steps", "COMBO", options=LIGHTNING_STEPS_OPTIONS, default=AUTO_STEPS, optional=True,
           tooltip="The step count the module was distilled for, which steps 0 on the samplers uses. auto reads "
                   "it from the file: the metadata this pack writes into modules it saves, else a name like "
                   "animatediff_lightning_4step. Set it for a Lightning module saved under another name; a "
                   "non-Lightning module (AnimateDiff v2/v3) stays on auto."),
    ),
    outputs=(Out(MOTION_MODULE, "motion_module",
                 "The motion module with its format, version and Lightning step count; connect it to Apply Motion "
                 "Module."),),
)

LOAD_MOTION_LORA = NodeSpec(
    node_id="ADL_LoadMotionLoRA",
    display_name="Load Motion LoRA (Lightning)",
    category=CAT_MOTION,
    description=(
        "Loads an AnimateDiff motion LoRA (v2_lora_ZoomIn.ckpt and friends) from models/animatediff_motion_lora. "
        "Chain several through prev_motion_lora; they are merged into the motion module when it is applied, and "
        "removed again afterwards. Image LoRAs and the v3 domain adapter are not motion LoRAs and are refused."),
    inputs=(
        In("name", "COMBO", options=OPTIONS_MOTION_LORAS,
           tooltip="Motion LoRA file from models/animatediff_motion_lora."),
        In("strength", "FLOAT", default=0.8, min=-10.0, max=10.0, step=0.01,
           tooltip="How strongly the LoRA's motion is applied. 0.7-0.8 gives stronger motion without the "
                   "watermarks that full strength can bring out (AnimateDiff-Lightning model card)."),
        In("prev_motion_lora", MOTION_LORA, optional=True,
           tooltip="Optional: motion LoRAs loaded earlier in a chain; this one is added to them."),
    ),
    outputs=(Out(MOTION_LORA, "motion_lora", "The chain of motion LoRAs so far; connect it to Apply Motion Module."),),
)

APPLY_MOTION_MODULE = NodeSpec(
    node_id="ADL_ApplyMotionModule",
    display_name="Apply Motion Module (Lightning)",
    category=CAT_MOTION,
    description=(
        "Turns an SD1.5 model into a video model: inserts the motion module at the AnimateDiff places of a copy of "
        "the UNet (the original model is untouched), switches the noise schedule to AnimateDiff's linear betas "
        "(ComfyUI's sqrt_linear) and lets ComfyUI manage the module's memory. Sample 16 frames (up to the "
        "module's limit of 32, or any number with Context Windows) with the Lightning Sampler, or with KSampler "
        "using euler + sgm_uniform."),
    inputs=(
        In("model", "MODEL", tooltip="An SD1.5 checkpoint's MODEL (SDXL and other families are refused)."),
        In("motion_module", MOTION_MODULE, tooltip="From Load Motion Module."),
        In("motion_lora", MOTION_LORA, optional=True, tooltip="Optional motion LoRAs from Load Motion LoRA."),
        In("scale", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
           tooltip="Motion scale: multiplies the temporal attention keys. Above 1 sharpens which frames each frame "
                   "attends to (often more motion), below 1 smooths it; 1 is what the module was trained with."),
    ),
    outputs=(Out("MODEL", "model", "The model with the motion module applied; sample it with the Lightning "
                                   "Sampler or KSampler (euler, sgm_uniform)."),),
)

LIGHTNING_SAMPLER = NodeSpec(
    node_id="ADL_LightningSampler",
    display_name="Lightning Sampler",
    category=CAT_SAMPLING,
    description=(
        "Samples a video in a few steps with the schedule AnimateDiff-Lightning was distilled on (Euler, trailing "
        "timesteps, e.g. 999/749/499/249 for 4 steps) through ComfyUI's own sampler, so previews, the progress bar, "
        "Cancel, ControlNet and other patches all work. Settings left at their defaults are the right ones."),
    inputs=(
        In("model", "MODEL", tooltip="The model from Apply Motion Module."),
        In("positive", "CONDITIONING", tooltip="What the video should show."),
        In("negative", "CONDITIONING",
           tooltip="What to avoid. Only used when cfg is above 1 (at cfg 1 the model is called once per step and the "
                   "negative prompt is ignored)."),
        In("latent_image", "LATENT",
           tooltip="One latent per frame: Empty Latent Image with batch_size 16 for text-to-video, or encoded video "
                   "frames for video-to-video (with denoise below 1)."),
        In("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
           tooltip="Noise seed; the same seed gives the same noise as KSampler."),
        In("steps", "INT", default=0, min=0, max=100,
           tooltip="0 uses the module's own step count (4 for the 4-step module; set on Load Motion Module's "
                   "lightning_steps, or read from the file). Other values work but leave the grid the module was "
                   "distilled on; 3 steps on the 2-step module is a known good choice."),
        In("cfg", "FLOAT", default=1.0, min=0.0, max=30.0, step=0.1,
           tooltip="Classifier-free guidance. 1.0 is what Lightning was distilled for (fastest, negative prompt "
                   "ignored); some base models look better at 1.5-2. Above 2 the pack warns: twice the time and burnt "
                   "colours."),
        In("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01,
           tooltip="1.0 for text-to-video. Below 1 for video-to-video: snapped to the module's grid (0.25 / 0.5 / "
                   "0.75 for the 4-step module); a warning says when it snaps."),
    ),
    outputs=(Out("LATENT", "latent", "The sampled video latents, one per frame; decode with VAE Decode."),),
)

LIGHTNING_SIGMAS = NodeSpec(
    node_id="ADL_LightningSigmas",
    display_name="Lightning Sigmas",
    category=CAT_SAMPLING,
    description=(
        "The noise levels (SIGMAS) AnimateDiff-Lightning was distilled on, for SamplerCustom or "
        "SamplerCustomAdvanced (use the euler sampler with them). denoise below 1 keeps the tail of the schedule, "
        "snapped to the module's grid."),
    inputs=(
        In("model", "MODEL", tooltip="The model from Apply Motion Module (its module tells the step count)."),
        In("steps", "INT", default=0, min=0, max=100,
           tooltip="0 uses the module's own step count; other values leave the distilled grid."),
        In("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01,
           tooltip="1.0 for text-to-video; below 1 keeps the last part of the schedule, snapped to the grid."),
    ),
    outputs=(Out("SIGMAS", "sigmas", "Decreasing noise levels ending at 0, e.g. 25.15, 6.56, 2.28, 0.87, 0."),),
)

GENERATION_NODES = (LOAD_MOTION_MODULE, LOAD_MOTION_LORA, APPLY_MOTION_MODULE, LIGHTNING_SAMPLER, LIGHTNING_SIGMAS)


def all_specs() -> tuple[NodeSpec, ...]:
    """Every node the pack registers."""
    return GENERATION_NODES + LONG_VIDEO_NODES


def spec_by_id() -> dict[str, NodeSpec]:
    return {s.node_id: s for s in all_specs()}


# --- long videos ------------------------------------------------------------------------------------------------

CONTEXT_SCHEDULES = _context.SCHEDULES
FUSE_METHODS = _context.FUSE_METHODS

CONTEXT_WINDOWS = NodeSpec(
    node_id="ADL_ContextWindows",
    display_name="Context Windows (Lightning)",
    category=CAT_LONG_VIDEO,
    description=(
        "Samples videos longer than the motion module's 16-32 frames as overlapping windows that are blended "
        "frame by frame. The windows are exactly those of ComfyUI's Context Windows and AnimateDiff-Evolved for "
        "the same settings, so ported workflows behave the same. Unlike those, each window's ControlNet sees the "
        "hint images of that window's own frames (core ControlNet Apply nodes work as they are), several windows "
        "share one model call when memory allows, and FreeNoise is built in. Put it between Apply Motion Module "
        "and the sampler; clips no longer than context_length are sampled exactly as without it."),
    inputs=(
        In("model", "MODEL", tooltip="The model from Apply Motion Module (the input model is left unchanged)."),
        In("context_length", "INT", default=16, min=1, max=256, step=1,
           tooltip="Frames per window. 16 is what AnimateDiff-Lightning was trained on; at most the module's "
                   "limit (32)."),
        In("context_overlap", "INT", default=4, min=0, max=255, step=1,
           tooltip="Frames shared by neighbouring windows. More overlap blends windows more smoothly (fewer seams) "
                   "at the cost of more windows per step; 4 is the usual choice."),
        In("context_schedule", "COMBO", options=CONTEXT_SCHEDULES, default="standard_static",
           tooltip="standard_static: the same windows every step. standard_uniform / looped_uniform: windows shift "
                   "every step so seams move (looped wraps the end round to the start). batched: no overlap, "
                   "fastest, visible seams."),
        In("context_stride", "INT", default=1, min=1, max=16, step=1,
           tooltip="Uniform schedules only: above 1 adds windows that take every 2nd, 4th, ... frame, for motion "
                   "that spans windows. Keep 1 unless you know you want it."),
        In("closed_loop", "BOOLEAN", default=False,
           tooltip="looped_uniform only: add a window joining the last frames to the first, for seamless loops."),
        In("fuse_method", "COMBO", options=FUSE_METHODS, default="pyramid",
           tooltip="How overlapping windows are blended per frame. pyramid weights a window's middle frames most; "
                   "flat averages; overlap-linear ramps over the overlap; relative weights by distance from the "
                   "window's centre."),
        In("freenoise", "BOOLEAN", default=True, optional=True,
           tooltip="FreeNoise: later windows start from shuffled noise of earlier frames, so neighbouring windows "
                   "agree better. Reproducible with the sampler's seed. Has no effect on clips within one window."),
        In("max_windows_per_call", "INT", default=0, min=0, max=1024, step=1, optional=True,
           tooltip="0 batches as many windows into one model call as free memory allows (fastest on a GPU). 1 runs "
                   "windows one at a time like other packs; any other number caps the batch."),
    ),
    outputs=(Out("MODEL", "model", "The model with context windows; sample it with the Lightning Sampler or "
                                   "KSampler."),),
)

VIDEO_METRICS = NodeSpec(
    node_id="ADL_VideoMetrics",
    display_name="Video Metrics (Lightning)",
    category=CAT_ANALYSIS,
    description=(
        "Temporal-consistency numbers for a video, without any model download: flicker (frame-to-frame change of "
        "mean brightness), optical-flow warping error (how badly each frame follows the motion, occlusions "
        "masked) and the seam score of context windows (jumps where windows hand over, relative to frame steps "
        "inside windows; about 1 means no visible seams). Shows a plot of both per frame. Compare runs of the same "
        "prompt and seed: the values are regression signals, not absolute quality scores."),
    inputs=(
        In("images", "IMAGE", tooltip="The decoded video frames (VAE Decode output)."),
        In("flow_method", "COMBO", options=OPTIONS_FLOW_METHODS, default="dis",
           tooltip="Optical flow for the warping error: dis (OpenCV DIS, fast and robust) or farneback."),
        In("context_length", "INT", default=16, min=0, max=256, step=1,
           tooltip="The Context Windows settings the video was sampled with, for the seam score; 0 skips the seam "
                   "score."),
        In("context_overlap", "INT", default=4, min=0, max=255, step=1,
           tooltip="The context_overlap the video was sampled with (seam score only)."),
        In("context_schedule", "COMBO", options=CONTEXT_SCHEDULES, default="standard_static",
           tooltip="The context_schedule the video was sampled with (seam score only; uniform schedules move "
                   "their windows every step, and the seams of the first step's windows are scored)."),
        In("context_stride", "INT", default=1, min=1, max=16, step=1,
           tooltip="The context_stride the video was sampled with (seam score only)."),
        In("closed_loop", "BOOLEAN", default=False,
           tooltip="The closed_loop setting the video was sampled with (seam score only)."),
    ),
    outputs=(
        Out("FLOAT", "flicker", "Mean absolute change of mean luma between consecutive frames (0..1 scale)."),
        Out("FLOAT", "warp_error", "Mean occlusion-masked optical-flow warping error (0..1 scale); NaN when the "
                                   "frames are too small for optical flow."),
        Out("FLOAT", "seam_score", "Frame-step energy at window borders divided by that inside windows; about 1 "
                                   "means no seams. NaN without windows."),
        Out("STRING", "report", "Every number, per frame and per transition, as JSON."),
        Out("IMAGE", "plot", "Flicker and warping error per frame transition, window borders marked."),
    ),
    is_output_node=True,
)

LOAD_IMAGE_SEQUENCE = NodeSpec(
    node_id="ADL_LoadImageSequence",
    display_name="Load Image Sequence (Lightning)",
    category=CAT_LONG_VIDEO,
    description=(
        "Loads a folder of frames (pose renders, exported video frames) as one image batch in natural name order, "
        "so pose_2.png comes before pose_10.png (ComfyUI's own folder loader keeps the file system's order, which "
        "shuffles frames). Every frame is resized to the first one's size. Reloads when the folder changes."),
    inputs=(
        In("folder", "STRING", default="poses",
           tooltip="A folder of .png/.jpg/.webp frames: absolute, or relative to ComfyUI's input folder "
                   "(e.g. 'poses' for ComfyUI/input/poses)."),
        In("start", "INT", default=0, min=0, max=1_000_000, step=1,
           tooltip="Skip this many frames first (after sorting)."),
        In("count", "INT", default=0, min=0, max=1_000_000, step=1,
           tooltip="Load at most this many frames; 0 loads all. Match the source video's frame count."),
        In("every_nth", "INT", default=1, min=1, max=1000, step=1,
           tooltip="Take every n-th frame, e.g. 2 to halve a 30 fps sequence to 15 fps like the source video."),
    ),
    outputs=(Out("IMAGE", "images", "The frames as one batch, in name order."),
             Out("INT", "count", "How many frames were loaded.")),
)

LONG_VIDEO_NODES = (CONTEXT_WINDOWS, VIDEO_METRICS, LOAD_IMAGE_SEQUENCE)



def resolve_core_options(key: str) -> list[str]:
    """Option lists that live in ``lightning`` modules too heavy to import with the specs."""
    if key == OPTIONS_FLOW_METHODS:
        try:
            return list(core("metrics").FLOW_METHODS)
        except ImportError:  # no OpenCV: the node says so when it runs
            return []
    raise KeyError(key)
