"""The toy-world demo: progressive adversarial distillation 32 -> 8 -> 4 -> 2 -> 1 on CPU, measured.

``python -m lightning.toy --seed S --out DIR`` trains one motion module on styles 0, 1, 2 with the real
:mod:`lightning.distill` code (32 -> 8 with MSE, then 8 -> 4, 4 -> 2 and 2 -> 1 each with the conditional
D, then the unconditional D'), and, from the same 8-step student, the ablation that replaces D and D' by
MSE at the same budget ("mse-only"). It samples the exact teacher and both students with the real sampler
and writes into DIR:

- ``metrics.json``: every model of :data:`MODELS` (``"teacher@32"`` ... ``"student@1"``, ``"mse-only@4"`` ...
  ``"mse-only@1"``) -> ``{"distance", "nearest_mode_error", "coverage"}`` averaged over the seen styles,
  ``"per_style"`` with every style (the held-out one included), ``"discriminator"`` (per adversarial stage,
  how well its conditional D told teacher jumps from student jumps on pairs it had not yet trained on, see
  :func:`discriminator_learning`) and ``"run"`` (seed, styles, timings);
- ``samples.mp4``: per style, the models of :data:`VIDEO_COLUMNS` side by side (same noise);
- ``samples.png``: the middle frame of that video; ``losses.png``: the training curves;
- ``student_{8,4,2,1}step.safetensors``: the student after each stage, in the original AnimateDiff layout.

It prints the table and the run time. Learning rates are the paper's scaled by ``lr_scale`` (ratios and
Adam betas kept), because a CPU run has a few hundred iterations, not the paper's many thousands.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import distill, sampling, schedule
from ..errors import InvalidInputError
from ..files import atomic_output
from . import measures
from .critic import toy_discriminator
from .models import make_bases, make_motion_module
from .world import ToyWorld, WorldConfig

log = logging.getLogger(__name__)

MODELS = ("teacher@32", "teacher@4", "teacher@2", "teacher@1", "student@4", "student@2", "student@1",
          "mse-only@4", "mse-only@2", "mse-only@1")
VIDEO_COLUMNS = ("teacher@32", "teacher@2", "student@4", "student@2", "mse-only@2", "student@1", "mse-only@1")
STUDENT = "student"  # the adversarially distilled student
MSE_ONLY = "mse-only"  # the ablation: MSE in place of D and D'


#: The adversarial stages after the 32 -> 8 MSE stage, as (teacher steps, student steps).
ADVERSARIAL_STAGES = ((8, 4), (4, 2), (2, 1))


def _demo_world() -> WorldConfig:
    return WorldConfig(angle_offset=0.5)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    seen_styles: tuple[int, ...] = (0, 1, 2)
    held_out_styles: tuple[int, ...] = (3,)
    width: int = 32  # motion-module channels
    style_perturbation: float = 1.0  # how far each style's frozen lift/read-out is from the shared one
    view_grid: int = 4  # the motion module sees each 8x8 frame pooled to 4x4 (see lightning.toy.models)
    lr_scale: float = 1000.0  # MSE lr 1e-2, adversarial 5e-4 (paper: 1e-5 and 5e-7; ratio and betas kept)
    mse_iterations: int = 150  # 32 -> 8, MSE: the toy's stand-in for the paper's 128 -> 32 MSE stage
    # (conditional D, then unconditional D') iterations of the adversarial stages 8 -> 4, 4 -> 2, 2 -> 1
    adversarial_iterations: tuple[tuple[int, int], ...] = ((100, 100), (100, 100), (100, 100))
    mse_clips: int = 16  # clips per style per iteration
    adversarial_clips: int = 8  # fewer: every adversarial iteration also runs D three times
    eval_samples: int = 1024
    video_samples: int = 3  # clips per cell of the video
    # False: the ablation of the paper's claim - the adversarial stages use MSE against the teacher's jump
    # instead of D and D', with the same iterations, clips and the MSE learning rate
    adversarial: bool = True
    world: WorldConfig = dataclasses.field(default_factory=_demo_world)

    def __post_init__(self):
        if len(self.adversarial_iterations) != len(ADVERSARIAL_STAGES):
            raise InvalidInputError(f"adversarial_iterations needs (conditional, unconditional) for each of the "
                                    f"stages {[f'{t}->{s}' for t, s in ADVERSARIAL_STAGES]}, got "
                                    f"{self.adversarial_iterations!r}")

    def stages(self) -> tuple[distill.Stage, ...]:
        """The paper's plan from 32 steps on: one MSE stage, then adversarial stages (D, then D').

        The toy's exact teacher at 32 steps is already the data, so the MSE stage with its CFG teacher
        (128 -> 32 in the paper) becomes 32 -> 8 here, without guidance (the toy has no prompts).
        """
        mse_lr = distill.PAPER_MSE_LR * self.lr_scale
        adv_lr = distill.PAPER_ADVERSARIAL_LR * self.lr_scale
        first = distill.Stage(32, 8, (distill.mse_phase(self.mse_iterations, mse_lr, self.mse_clips),))

        def adversarial(teacher, student, iterations):
            cond, uncond = iterations
            if not self.adversarial:
                phases = (distill.mse_phase(cond + uncond, mse_lr, self.adversarial_clips),)
            else:
                phases = (distill.adversarial_phase(distill.CONDITIONAL, cond, adv_lr, self.adversarial_clips),
                          distill.adversarial_phase(distill.UNCONDITIONAL, uncond, adv_lr, self.adversarial_clips))
            return distill.Stage(teacher, student, tuple(p for p in phases if p.iterations > 0),
                                 extra_timesteps=distill.EXTRA_TIMESTEPS.get(student, ()))

        return (first, *(adversarial(t, s, i) for (t, s), i in zip(ADVERSARIAL_STAGES, self.adversarial_iterations)))

    def mse_only(self) -> DemoConfig:
        """The ablation of this run: the same plan and budget with MSE in place of D and D'."""
        return dataclasses.replace(self, adversarial=False)


# --- building and training ------------------------------------------------------------------------------

def data_source(world: ToyWorld, style: int):
    """A lane's data: exact draws from the style's mixture, as ``[clips*frames, C, H, W]`` float32 latents."""
    mixture = world.mixture(style)
    cfg = world.config

    def draw(clips: int, generator: torch.Generator):
        videos = mixture.sample(clips, generator).to(torch.float32)
        return videos.reshape(clips * cfg.frames, *cfg.latent_shape), None, None

    return draw


def build(config: DemoConfig):
    """World, frozen bases for every style, the lanes of the seen styles, a fresh student."""
    world = ToyWorld(config.world)
    styles = sorted(set(config.seen_styles) | set(config.held_out_styles))
    bases = {b.index: b for b in make_bases(world, styles, width=config.width, seed=config.seed,
                                            style_perturbation=config.style_perturbation,
                                            view_grid=config.view_grid)}
    lanes = [distill.Lane(bases[s], data_source(world, s), world.config.frames) for s in config.seen_styles]
    torch.manual_seed(config.seed)
    return world, bases, lanes, make_motion_module(config.width)


def discriminator_factory(world: ToyWorld, bases: dict, num_bases: int):
    """Fresh D / D' whose backbone starts from the first base's encoder (the paper starts from SD1.5's)."""
    first = bases[min(bases)]
    return lambda conditional: toy_discriminator(conditional, base=first, num_bases=num_bases)


def train(config: DemoConfig, world, bases, lanes, student, *, out_dir: Path | None = None, callback=None,
          after_stage=None):
    """Run the stage plan on ``student``; save a checkpoint after each stage when ``out_dir`` is given.

    ``after_stage(result, student)`` is called after each stage too (after the checkpoint is written).
    """
    history: list[dict] = []

    def record(entry):
        history.append(entry)
        if callback is not None:
            callback(entry)

    def save(result, module):
        if out_dir is not None:
            from ..checkpoints import save_motion_module
            module.info = dataclasses.replace(module.info, lightning_steps=result.stage.student_steps)
            save_motion_module(module, out_dir / f"student_{result.stage.student_steps}step.safetensors",
                               metadata={"adlightning.toy_stage": result.stage.name,
                                         "adlightning.toy_seed": str(config.seed)})
        if after_stage is not None:
            after_stage(result, module)

    # The demo is the one place in lightning/ that uses training/: it trains through the real loop.
    from training.loop import run_stages

    results = run_stages(config.stages(), lanes, student,
                         make_discriminator=discriminator_factory(world, bases, config.world.styles),
                         clips=config.mse_clips, generator=torch.Generator().manual_seed(config.seed),
                         after_stage=save, callback=record)
    return results, history


def train_mse_only(config: DemoConfig, lanes, eight_step_student, *, callback=None):
    """The ablation's stages after the shared 32 -> 8 one, on a copy of ``eight_step_student``."""
    from training.loop import run_stages

    student = copy.deepcopy(eight_step_student)
    # its own data stream: the same seed would replay the adversarial run's clips, which is no ablation
    run_stages(config.mse_only().stages()[1:], lanes, student, clips=config.mse_clips,
               generator=torch.Generator().manual_seed(config.seed + 1), callback=callback)
    return student


def train_both(config: DemoConfig, world, bases, lanes, student, *, out_dir: Path | None = None, callback=None,
               after_stage=None):
    """The demo's student (in place) and its mse-only ablation from the same 8-step student.

    Returns ``(results, history, students)`` with ``students = {"student": ..., "mse-only": ...}``, both the
    final (1-step) students; "student@4" is that student sampled with 4 steps, as the demo has always
    measured (the files of the earlier stages are saved beside it).
    """
    eight = {}

    def keep_eight(result, module):
        if result.stage.student_steps == 8:
            eight["student"] = copy.deepcopy(module)
        if after_stage is not None:
            after_stage(result, module)

    results, history = train(config, world, bases, lanes, student, out_dir=out_dir, callback=callback,
                             after_stage=keep_eight)
    ablation = train_mse_only(config, lanes, eight["student"])
    return results, history, {STUDENT: student, MSE_ONLY: ablation}


def discriminator_learning(history: list[dict]) -> dict:
    """Per adversarial stage, how its conditional D did over its phase.

    Every iteration scores fresh pairs before D trains on them, so these are held-out figures:
    ``"preference"``, how often D scored the teacher's jump above the student's from the same x_t (0.5 is
    chance); ``"accuracy"`` (teacher's jumps called real, the student's fake); ``"d"``, its loss (ln 4 at
    chance). Means over the whole phase: as D learns, the student learns to fool it, so D's edge is
    largest early and fades towards chance as the student's jumps become the teacher's.
    """
    phases: dict[str, list[dict]] = {}
    for entry in history:
        if entry["phase"] == distill.CONDITIONAL:
            phases.setdefault(entry["stage"], []).append(entry)
    out = {}
    for stage, entries in phases.items():
        out[stage] = {key: sum(e[key] for e in entries) / len(entries) for key in ("preference", "accuracy", "d")}
    return out


# --- evaluation -----------------------------------------------------------------------------------------

def generate(world: ToyWorld, denoiser, steps: int, clips: int, seed: int) -> torch.Tensor:
    """``clips`` videos ``[clips*frames, C, H, W]`` from the real sampler on the trailing grid.

    Pure noise as the first model input, exactly as the student was trained (``noise_scaling="comfyui"``).
    """
    cfg = world.config
    noise = sampling.make_noise((clips * cfg.frames, *cfg.latent_shape), seed)
    with torch.no_grad():
        return sampling.sample(denoiser, noise, schedule.sigmas(steps), noise_scaling="comfyui")


def model_denoiser(world: ToyWorld, base, students, name: str):
    """``"teacher@N"`` is the exact denoiser, ``"student@N"`` / ``"mse-only@N"`` the base with that student.

    ``students``: one module (the ``"student"``) or ``{"student": module, "mse-only": module}``.
    """
    who, steps = name.split("@")
    if who == "teacher":
        return world.exact_denoiser(base.index), int(steps)
    students = students if isinstance(students, dict) else {STUDENT: students}
    if who not in students:
        raise InvalidInputError(f"no {who!r} student to evaluate {name!r}; have {sorted(students)}")
    return distill.denoiser_for(base, students[who]), int(steps)


def evaluate(world: ToyWorld, bases: dict, student, styles, *, samples: int, seed: int, models=MODELS) -> dict:
    """``{style: {model: measures}}``; every model of a style starts from the same noise.

    ``student``: as :func:`model_denoiser` takes it.
    """
    out = {}
    for style in styles:
        reference = measures.Reference.build(world.mixture(style), seed=seed + 7919 * (style + 1))
        out[style] = {}
        for name in models:
            denoiser, steps = model_denoiser(world, bases[style], student, name)
            out[style][name] = measures.measure(generate(world, denoiser, steps, samples, seed + style), reference)
    return out


def metrics_json(per_style: dict, seen_styles, run: dict, discriminator: dict | None = None) -> dict:
    models = next(iter(per_style.values())).keys()
    averaged = {name: measures.average({s: per_style[s][name] for s in seen_styles}) for name in models}
    extra = {} if discriminator is None else {"discriminator": discriminator}
    return {**averaged, "per_style": {str(s): v for s, v in per_style.items()}, **extra, "run": run}


def format_table(metrics: dict, seen_styles, held_out_styles) -> str:
    header = f"{'':12s}| {'seen styles ' + ','.join(map(str, seen_styles)):^34s}"
    for s in held_out_styles:
        header += f"| {'held-out style ' + str(s):^34s}"
    sub = f"{'model':12s}" + f"| {'distance':>10s} {'mode err':>10s} {'coverage':>10s} " * (1 + len(held_out_styles))
    lines = [header, sub, "-" * len(sub)]
    for name in (m for m in MODELS if m in metrics):
        rows = [metrics[name]] + [metrics["per_style"][str(s)][name] for s in held_out_styles]
        lines.append(f"{name:12s}" + "".join(
            f"| {r['distance']:10.4f} {r['nearest_mode_error']:10.4f} {r['coverage']:10.3f} " for r in rows))
    return "\n".join(lines)


# --- pictures -------------------------------------------------------------------------------------------

LATENT_TO_RGB = np.array([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.5]])
PIXELS_PER_LATENT = 6


def to_rgb(videos: torch.Tensor, frames: int) -> np.ndarray:
    """``[clips*frames, 4, s, s]`` latents -> ``[clips, frames, s*6, s*6, 3]`` uint8 (a fixed colour map)."""
    x = videos.detach().to(torch.float64).cpu().numpy()
    x = x.reshape(-1, frames, *x.shape[1:])
    rgb = 0.5 + 1.2 * np.einsum("rc,nfchw->nfhwr", LATENT_TO_RGB[:, : x.shape[2]], x)
    rgb = np.clip(rgb, 0, 1)
    rgb = rgb.repeat(PIXELS_PER_LATENT, axis=2).repeat(PIXELS_PER_LATENT, axis=3)
    return (rgb * 255).round().astype(np.uint8)


def sample_grid(world: ToyWorld, bases: dict, student, styles, *, clips: int, seed: int,
                held_out=()) -> np.ndarray:
    """``[frames, H, W, 3]`` RGB: a row per style, a column per model, ``clips`` clips per cell."""
    import cv2

    cfg = world.config
    label_h, label_w, gap = 18, 96, 6
    cell = cfg.size * PIXELS_PER_LATENT
    col_w = clips * cell + (clips - 1) * 2
    width = label_w + len(VIDEO_COLUMNS) * (col_w + gap)
    height = label_h + len(styles) * (cell + gap)
    canvas = np.full((cfg.frames, height, width, 3), 32, np.uint8)
    for c, name in enumerate(VIDEO_COLUMNS):
        x0 = label_w + c * (col_w + gap)
        for f in range(cfg.frames):
            cv2.putText(canvas[f], name, (x0 + 2, label_h - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1,
                        cv2.LINE_AA)
    for r, style in enumerate(styles):
        y0 = label_h + r * (cell + gap)
        text = f"style {style}" + (" new" if style in held_out else "")
        for f in range(cfg.frames):
            cv2.putText(canvas[f], text, (4, y0 + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (230, 230, 230), 1,
                        cv2.LINE_AA)
        for c, name in enumerate(VIDEO_COLUMNS):
            denoiser, steps = model_denoiser(world, bases[style], student, name)
            rgb = to_rgb(generate(world, denoiser, steps, clips, seed + 100 + style), cfg.frames)
            for i in range(clips):
                x0 = label_w + c * (col_w + gap) + i * (cell + 2)
                canvas[:, y0:y0 + cell, x0:x0 + cell] = rgb[i]
    return canvas


def write_video(frames_rgb: np.ndarray, path: Path, fps: int = 4, loops: int = 3) -> Path:
    """mp4 (MPEG-4 part 2, ``mp4v``): the codec opencv-python's bundled FFmpeg writes headless everywhere."""
    import cv2

    h, w = frames_rgb.shape[1:3]
    with atomic_output(path) as temporary:
        writer = cv2.VideoWriter(str(temporary), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write an mp4v video to {os.fspath(temporary)!r}")
        try:
            for _ in range(loops):
                for frame in frames_rgb:
                    writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        finally:
            writer.release()
    return path


def write_png(image_rgb: np.ndarray, path: Path) -> Path:
    import cv2

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"OpenCV could not encode {os.fspath(path)!r}")
    with atomic_output(path) as temporary:
        temporary.write_bytes(encoded.tobytes())
    return path


def _smooth(values, window: int = 10):
    out, acc = [], []
    for v in values:
        if v is None:
            out.append(None)
            acc = []
            continue
        acc = (acc + [v])[-window:]
        out.append(sum(acc) / len(acc))
    return out


def loss_plot(history: list[dict]) -> np.ndarray:
    """Two stacked OpenCV plots: log10 MSE; D loss, G loss and D's paired preference for the teacher's jump.

    Dashed lines mark every phase change. ``ln 4 = 1.386`` is the D loss of a discriminator at chance;
    the preference (teacher's jump scored above the student's, same x_t) is 0.5 at chance.
    """
    from ..metrics import plot_series

    borders = [i for i in range(1, len(history))
               if (history[i]["stage"], history[i]["phase"]) != (history[i - 1]["stage"], history[i - 1]["phase"])]
    mse = [float(np.log10(h["mse"])) if "mse" in h and h["mse"] > 0 else None for h in history]
    adv = {name: [h.get(key) for h in history] for name, key in
           (("D loss", "d"), ("G loss", "g"), ("D prefers teacher", "preference"))}
    # chance levels drawn across the adversarial phases, so a reader sees D's curves leave them
    adversarial = [h.get("d") is not None for h in history]
    adv["ln 4 (D loss at chance)"] = [math.log(4) if a else None for a in adversarial]
    adv["0.5 (preference at chance)"] = [0.5 if a else None for a in adversarial]
    top = plot_series({"log10 MSE": _smooth(mse)}, "MSE phases", (720, 300), borders)
    stages = ", ".join(dict.fromkeys(h["stage"] for h, a in zip(history, adversarial) if a))
    bottom = plot_series({k: _smooth(v, 20) for k, v in adv.items()},
                         f"adversarial phases ({stages}: D, then D')", (720, 300), borders)
    return np.concatenate([top, bottom], axis=0)


# --- the demo ------------------------------------------------------------------------------------------

def run_demo(out_dir, config: DemoConfig | None = None, *, echo=print) -> dict:
    """Train, evaluate, write the outputs into ``out_dir``; return the metrics dict."""
    config = config or DemoConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {os.fspath(out)!r} exists and is not a folder; pick a folder path")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world, bases, lanes, student = build(config)
    styles = list(config.seen_styles) + list(config.held_out_styles)

    def progress(entry):
        if entry["step"] == 0:
            echo(f"  stage {entry['stage']}: {entry['phase']} phase")

    echo(f"training on styles {list(config.seen_styles)} (seed {config.seed})")
    _, history, students = train_both(config, world, bases, lanes, student, out_dir=out, callback=progress)
    trained = time.perf_counter()
    per_style = evaluate(world, bases, students, styles, samples=config.eval_samples, seed=config.seed)
    discriminator = discriminator_learning(history)
    evaluated = time.perf_counter()
    grid = sample_grid(world, bases, students, styles, clips=config.video_samples, seed=config.seed,
                       held_out=config.held_out_styles)
    write_video(grid, out / "samples.mp4")
    write_png(grid[grid.shape[0] // 2], out / "samples.png")
    write_png(loss_plot(history), out / "losses.png")
    finished = time.perf_counter()
    run = {"seed": config.seed, "seen_styles": list(config.seen_styles),
           "held_out_styles": list(config.held_out_styles), "eval_samples": config.eval_samples,
           "view_grid": config.view_grid,
           **{key: [{"name": st.name, "phases": [[p.kind, p.iterations, p.lr] for p in st.phases]} for st in plan]
              for key, plan in (("stages", config.stages()), ("mse_only_stages", config.mse_only().stages()))},
           "seconds": {"train": round(trained - start, 1), "evaluate": round(evaluated - trained, 1),
                       "outputs": round(finished - evaluated, 1), "total": round(finished - start, 1)}}
    metrics = metrics_json(per_style, config.seen_styles, run, discriminator)
    with atomic_output(out / "metrics.json") as temporary:
        temporary.write_text(json.dumps(metrics, indent=2) + "\n")
    echo(format_table(metrics, config.seen_styles, config.held_out_styles))
    echo("conditional D over its phase, on pairs it had not trained on (chance 0.5, ln 4 = 1.386): "
         + "; ".join(f"{name} prefers the teacher's jump {d['preference']:.2f}, accuracy {d['accuracy']:.2f}, "
                     f"loss {d['d']:.3f}" for name, d in discriminator.items()))
    echo(f"run time {run['seconds']['total']:.0f} s (train {run['seconds']['train']:.0f} s, evaluate "
         f"{run['seconds']['evaluate']:.0f} s, outputs {run['seconds']['outputs']:.0f} s); wrote {os.fspath(out)}")
    return metrics
