"""The training nodes from outside: ids, inputs, outputs, tooltips and help, as plain data (no ComfyUI).

Kept apart from ``nodes.specs`` (the generation nodes) so the two sets can change independently; the node ids
and the names of their core inputs are stable: add inputs, never rename.

Times per iteration in the descriptions come from the traced memory plan (``python -m training estimate``) and
the CPU benchmark in ``benchmarks/``; they are the order of magnitude to expect, not a promise.
"""

from __future__ import annotations

from .specs import ROOT, In, NodeSpec, Out

CAT_TRAINING = f"{ROOT}/training"

#: Socket types of the training nodes.
BASES = "ADL_BASES"
DATASET = "ADL_DATASET"
MOTION_MODULE = "MOTION_MODULE"

#: Combo inputs resolved when ComfyUI asks for the schema (see ``training_nodes.resolve_options``).
OPTIONS_CHECKPOINTS = "@checkpoints"
OPTIONS_RESUME = "@adl_runs"
OPTIONS_RUNS_WITH_D = "@adl_runs_with_discriminator"
OPTIONS_VIDEO_FOLDERS = "@input_folders"

STAGES = ("128->32 mse+cfg", "32->8", "8->4", "4->2", "2->1")
SOURCES = ("teacher", "videos")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINABILITY = ("full", "light")
OPTIMIZERS = ("adam", "adam8bit")
RESIDENT = ("auto", "all", "one")

HEALTHY_CURVES = (
    "Healthy curves: in the 128->32 stage the MSE falls quickly and then flattens. In an adversarial stage the "
    "discriminator's accuracy climbs above 0.5 early and then hovers between 0.6 and 0.9 while the student "
    "catches up; D's preference for the teacher's jump stays positive but does not run to 1. Accuracy stuck "
    "at 1.0 with a rising G loss means D has won (lower the learning rate or use discriminator light); accuracy "
    "at 0.5 for the whole phase means D learns nothing (more clips, or check the dataset).")

ITERATION_COST = (
    "Memory and time: before any weight is loaded the node traces one iteration of your exact settings "
    "(resolution, frames, clips, precision, checkpointing, discriminator light/full, resident bases) and prints "
    "the peak-memory breakdown in the console; when it does not fit the free memory it refuses and lists the "
    "settings that do. The README's memory table ('Distill your own') gives that plan for 12 to 80 GB "
    "cards at 256, 384 and 512 pixels x 16 frames: with bf16, gradient checkpointing, discriminator light and "
    "one resident base every stage fits a 24 GB card at 256x256x16; a 16 GB card needs 8-bit Adam "
    "(bitsandbytes) too, and 8 frames for the adversarial stages; full-size SD1.5 does not fit 12 GB. Time "
    "per iteration, estimated from the plan's FLOP count at 40% of spec-sheet bf16 throughput with two bases "
    "(not measured): an 8->4 iteration at 256x256x16 about 3.3 s on an RTX 3090 and 1.4 s on an RTX 4090 (24 "
    "GB), at 256x256x8 about 2.7 s on a 16 GB RTX 4060 Ti; a 128->32 MSE iteration about the same. It grows "
    "with the number of bases (each runs the teacher's and the student's jump every iteration) and is shown "
    "live on the widget and in the log.")

TRAINING_BASES = NodeSpec(
    node_id="ADL_TrainingBases",
    display_name="Training Bases (Lightning)",
    category=CAT_TRAINING,
    description=(
        "Adds one SD1.5 style checkpoint to the list of bases a motion module is distilled on (chain one node per "
        "checkpoint: AnimateDiff-Lightning distils over several bases at once so the student works on all of "
        "them). Only the file's header is read here; the training node loads one base at a time when it needs "
        "it. SDXL, SD2 and other families are refused with a message."),
    inputs=(
        In("ckpt_name", "COMBO", options=OPTIONS_CHECKPOINTS,
           tooltip="An SD1.5 checkpoint from models/checkpoints (a style model such as ToonYou or epiCRealism)."),
        In("bases", BASES, optional=True,
           tooltip="Optional: the bases chained so far; this checkpoint is appended to them."),
    ),
    outputs=(Out(BASES, "bases", "The list of base checkpoints; connect to Training Dataset and Distill Stage."),),
)

TRAINING_DATASET = NodeSpec(
    node_id="ADL_TrainingDataset",
    display_name="Training Dataset (Lightning)",
    category=CAT_TRAINING,
    description=(
        "Builds (or extends) a cache of training clips as latents under models/adlightning_datasets/<name>: "
        "either clips the AnimateDiff teacher generates on every base from your prompts (the paper's way: 32 "
        "DPM++ steps, CFG 7.5, no negative prompt) or clips cut from a folder of your videos with same-name .txt "
        "captions. Queueing again adds only what is missing; Cancel keeps every finished clip. The progress bar "
        "counts clips. Teacher clips cost one 32-step sampling each (about 20-40 s at 256x256x16 on a 12-24 GB "
        "card); video clips one VAE encode each."),
    inputs=(
        In("bases", BASES, tooltip="The base checkpoints (Training Bases chain)."),
        In("source", "COMBO", options=SOURCES, default="teacher",
           tooltip="teacher: clips generated by the teacher motion module on every base from the prompts. videos: "
                   "clips cut from the videos in video_folder (one caption .txt per video)."),
        In("prompts", "STRING", default="a cat walking on a wall\nwaves breaking on a beach\na girl smiling, wind "
                                        "in her hair",
           tooltip="teacher source: one prompt per line; clip k of a base uses prompt k (cycling)."),
        In("video_folder", "STRING", default="training_videos",
           tooltip="videos source: a sub-folder of ComfyUI's input folder holding .mp4/.webm/.mov files (or frame "
                   "folders), each with a same-name .txt caption."),
        In("teacher", MOTION_MODULE, optional=True,
           tooltip="The teacher motion module (Load Motion Module); required for the teacher source."),
        In("clips_per_base", "INT", default=8, min=1, max=100000, step=1,
           tooltip="teacher source: clips per base. Raising it later adds only the new clips."),
        In("frames", "INT", default=16, min=2, max=32, step=1,
           tooltip="Frames per clip; 16 is what AnimateDiff-Lightning was trained on."),
        In("width", "INT", default=256, min=64, max=1024, step=8, tooltip="Clip width in pixels (multiple of 8)."),
        In("height", "INT", default=256, min=64, max=1024, step=8, tooltip="Clip height in pixels (multiple of 8)."),
        In("seed", "INT", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
           tooltip="Dataset seed: each teacher clip's seed is derived from it, its base and its number."),
        In("name", "STRING", default="my_dataset",
           tooltip="Folder name under models/adlightning_datasets; the same name extends the same cache."),
        In("stride", "INT", default=1, min=1, max=16, step=1, optional=True,
           tooltip="videos source: take every n-th frame of the video."),
        In("clips_per_video", "INT", default=1, min=0, max=1000, step=1, optional=True,
           tooltip="videos source: clips cut from each video, spread over its length (0: as many as fit)."),
        In("teacher_steps", "INT", default=0, min=0, max=200, step=1, optional=True,
           tooltip="teacher source: sampling steps of the teacher; 0 is the paper's 32 (DPM++ 2M, CFG 7.5). "
                   "Fewer steps make rougher clips; only for quick trials."),
    ),
    outputs=(Out(DATASET, "dataset", "The dataset folder and its sizes; connect to Distill Stage."),),
)

DISTILL_STAGE = NodeSpec(
    node_id="ADL_DistillStage",
    display_name="Distill Stage (Lightning)",
    category=CAT_TRAINING,
    description=(
        "Runs one stage of progressive adversarial distillation (AnimateDiff-Lightning) of the teacher motion "
        "module over the bases, with a live widget of the loss, discriminator accuracy and preference curves. "
        "Nothing is lost: Cancel saves the full training state before the node stops, an error (out of memory "
        "included) saves it and says what to change, and resume = latest continues exactly. The student is "
        "saved into models/animatediff_models as <run_name>_<N>step.safetensors, ready for Load Motion Module "
        "and AnimateDiff-Evolved, and returned for Apply Motion Module. " + HEALTHY_CURVES + " " + ITERATION_COST),
    inputs=(
        In("teacher", MOTION_MODULE,
           tooltip="The module to distil from: an AnimateDiff motion module for 128->32, or the previous stage's "
                   "student for the next stage."),
        In("bases", BASES, tooltip="The base checkpoints (the same chain as the dataset's)."),
        In("dataset", DATASET, tooltip="The clip cache from Training Dataset."),
        In("stage", "COMBO", options=STAGES, default="8->4",
           tooltip="Which stage: 128->32 (MSE against the teacher at CFG 7.5), then 32->8, 8->4, 4->2, 2->1 "
                   "(adversarial: a conditional discriminator phase, then an unconditional one)."),
        In("iterations", "INT", default=200, min=1, max=1000000, step=1,
           tooltip="Iterations per phase (adversarial stages have two phases)."),
        In("run_name", "STRING", default="my_lightning",
           tooltip="Run name: the run folder is models/adlightning_runs/<run_name>-<time>, the student "
                   "<run_name>_<N>step.safetensors."),
        In("resume", "COMBO", options=OPTIONS_RESUME, default="new",
           tooltip="new: start a new run. latest: continue the newest run of this run_name from its last saved "
                   "state (exactly where it stopped). Or pick a run folder."),
        In("seed", "INT", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
           tooltip="Seed of the run (data order, noise, D init)."),
        In("learning_rate", "FLOAT", default=0.0, min=0.0, max=1.0, step=1e-7, optional=True,
           tooltip="0 uses the paper's: 1e-5 for MSE, 5e-7 for adversarial phases."),
        In("clips", "INT", default=1, min=1, max=64, step=1, optional=True,
           tooltip="Clips per base per iteration (the batch)."),
        In("precision", "COMBO", options=PRECISIONS, default="auto", optional=True,
           tooltip="auto: bf16 on a GPU that has it, else fp32 (the CPU is always fp32). Weights that train keep "
                   "fp32 master copies."),
        In("gradient_checkpointing", "BOOLEAN", default=True, optional=True,
           tooltip="Recompute activations in backward (student and discriminator): much less memory, about 30% "
                   "slower."),
        In("discriminator", "COMBO", options=TRAINABILITY, default="full", optional=True,
           tooltip="full: the whole discriminator trains (paper). light: only its motion modules, time/index "
                   "embeddings and head: about 4 GB less at 256x256x16."),
        In("resident_bases", "COMBO", options=RESIDENT, default="auto", optional=True,
           tooltip="auto: keep every base on the device when they fit, else one at a time. one: swap bases "
                   "through CPU memory (slower, less memory)."),
        In("save_every", "INT", default=50, min=1, max=100000, step=1, optional=True,
           tooltip="Save the training state every N iterations (it is also saved on Cancel, on errors and at "
                   "the end)."),
        In("validate_every", "INT", default=100, min=0, max=100000, step=1, optional=True,
           tooltip="Sample the validation prompts with the student (and the teacher) every N iterations; 0: only "
                   "at the end of the run."),
        In("validation_prompts", "STRING", default="a cat walking on a wall", optional=True,
           tooltip="One prompt per line, sampled on every base at validation."),
        In("mse_only", "BOOLEAN", default=False, optional=True,
           tooltip="Ablation: train adversarial stages with the MSE against the teacher's jump only (no "
                   "discriminator; both phases' iterations as one MSE phase). Cheaper, and blurrier at 2 and 1 "
                   "steps."),
        In("memory_budget_gb", "FLOAT", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
           tooltip="0: the device's free memory. Otherwise the plan must fit in this many GB (to leave room for "
                   "other programs)."),
        In("optimizer", "COMBO", options=OPTIMIZERS, default="adam", optional=True,
           tooltip="adam: PyTorch's Adam, 8 bytes of state per trained weight. adam8bit: bitsandbytes' 8-bit "
                   "Adam, 2 bytes per weight (about 2.5 GB less with discriminator light, what a 16 GB card "
                   "needs); needs bitsandbytes installed in ComfyUI's Python and a CUDA GPU."),
    ),
    outputs=(
        Out(MOTION_MODULE, "student", "The distilled student; connect to Apply Motion Module (it is also saved "
                                      "in models/animatediff_models)."),
        Out("IMAGE", "validation", "The latest validation frames: per base and prompt, student then teacher."),
        Out("IMAGE", "curves", "Loss, discriminator accuracy and preference over the iterations."),
    ),
    is_output_node=True,
    experimental=True,
)

DISCRIMINATOR_PREVIEW = NodeSpec(
    node_id="ADL_DiscriminatorPreview",
    display_name="Discriminator Preview (Lightning)",
    category=CAT_TRAINING,
    description=(
        "The flow-conditioned discriminator preview: samples with the model's motion module in Lightning steps "
        "and, at every jump, asks a trained discriminator how likely the jump is the teacher's, for the student's "
        "jump and for the teacher's own jump from the same noisy latent. A healthy student scores close to the "
        "teacher at every step; a step where the student's probability is far below the teacher's is the step it "
        "still gets wrong. The saliency image shows, per frame, where the discriminator's decision comes from."),
    inputs=(
        In("run", "COMBO", options=OPTIONS_RUNS_WITH_D,
           tooltip="A run folder whose saved state holds a discriminator (adversarial stages)."),
        In("model", "MODEL", tooltip="An SD1.5 MODEL with the student applied (Apply Motion Module)."),
        In("positive", "CONDITIONING", tooltip="The prompt to sample."),
        In("latent_image", "LATENT", tooltip="Empty latents, one per frame (the run's frame count)."),
        In("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
           tooltip="Noise seed of the sampling (the same seed as the Lightning Sampler gives the same start)."),
        In("steps", "INT", default=0, min=0, max=32, step=1,
           tooltip="Lightning steps; 0 uses the run's student step count."),
        In("base_index", "INT", default=0, min=0, max=63, step=1, optional=True,
           tooltip="Which of the run's bases takes the jumps (its index is the discriminator's flow condition)."),
    ),
    outputs=(
        Out("IMAGE", "plot", "Per jump: D's probability for the student's and the teacher's jump."),
        Out("STRING", "numbers", "The probabilities as JSON, one entry per jump."),
        Out("IMAGE", "saliency", "Per frame, input-gradient saliency of D overlaid on the decoded frames."),
    ),
    is_output_node=True,
    experimental=True,
)

TRAINING_NODES = (TRAINING_BASES, TRAINING_DATASET, DISTILL_STAGE, DISCRIMINATOR_PREVIEW)


def stage_name(choice: str) -> str:
    """The config's stage name for a combo choice (``"128->32 mse+cfg"`` -> ``"128->32"``)."""
    return choice.split()[0]
