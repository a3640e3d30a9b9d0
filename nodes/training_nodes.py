"""Training nodes: bases, the latent clip cache, one distillation stage with live curves.

The work happens in ``training/`` (the stage loop, run folders, datasets, SD1.5 lanes on ComfyUI's UNet) and
``lightning/`` (the math); these nodes turn node inputs into a run config, feed ComfyUI's progress bar, Cancel
and websocket, and hand the student back as a MOTION_MODULE.

ComfyUI facts this relies on (0.3.x):
- every node runs under ``torch.inference_mode()``; training runs inside ``torch.inference_mode(False)`` so
  its tensors can take part in backward;
- Cancel raises ``InterruptProcessingException`` from a ``ProgressBar`` update (our per-iteration cancel
  point): the node saves the full training state, then lets the exception through, so ComfyUI reports the
  interruption and a later ``resume = latest`` continues exactly;
- ``fingerprint_inputs`` returning a fresh ``float("nan")`` makes ComfyUI run the node on every queue: a
  finished run is never answered from the output cache with a stale student;
- ``PromptServer.instance.send_sync`` queues a JSON websocket message from the worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from . import folders, training_runs as runs, training_specs as tspecs
from ._core import core
from ._training_imports import training
from .comfy_schema import build_schema
from .motion_patch import MotionModuleHandle, motion_patcher

checkpoints_io = core("checkpoints")
errors = core("errors")
files = core("files")

log = logging.getLogger(__name__)

RUNS_FOLDER = "adlightning_runs"
DATASETS_FOLDER = "adlightning_datasets"
EVENT = "adl.training"


# --- folders ---------------------------------------------------------------------------------------------

def runs_root() -> Path:
    return Path(folder_paths.models_dir) / RUNS_FOLDER


def datasets_root() -> Path:
    return Path(folder_paths.models_dir) / DATASETS_FOLDER


def run_folders() -> list[str]:
    return runs.run_folders(runs_root())


def run_path(folder: str) -> Path:
    return runs.run_path(folder, runs_root())


def resolve_options(key: str) -> list[str]:
    if key == tspecs.OPTIONS_CHECKPOINTS:
        return folder_paths.get_filename_list("checkpoints")
    if key == tspecs.OPTIONS_RESUME:
        return ["new", "latest", *run_folders()]
    if key == tspecs.OPTIONS_RUNS_WITH_D:
        return [name for name in run_folders() if runs.has_discriminator(runs_root() / name)]
    raise KeyError(key)


MULTILINE = ("prompts", "validation_prompts")


def _schema(spec) -> io.Schema:
    schema = build_schema(spec, resolve_options)
    for item in schema.inputs:
        if getattr(item, "id", None) in MULTILINE and hasattr(item, "multiline"):
            item.multiline = True  # one prompt per line
    return schema


# --- bases -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingBase:
    name: str  # file name in models/checkpoints
    path: str


@dataclasses.dataclass(frozen=True)
class BasesChain:
    bases: tuple[TrainingBase, ...]

    @property
    def paths(self) -> list[str]:
        return [b.path for b in self.bases]


class TrainingBases(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(tspecs.TRAINING_BASES)

    @classmethod
    def execute(cls, ckpt_name, bases=None):
        comfy_backend = training("comfy_backend")
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise FileNotFoundError(f"Training Bases: no checkpoint named {ckpt_name!r} in models/checkpoints")
        try:
            comfy_backend.check_sd15_checkpoint(path)  # the header only; weights are read by the run
        except errors.LightningError as error:
            raise errors.InvalidInputError(f"Training Bases: {ckpt_name} cannot be a training base: {error}") from None
        chain = tuple(bases.bases) if bases is not None else ()
        if any(b.path == path for b in chain):
            raise errors.InvalidInputError(f"Training Bases: {ckpt_name} is already in the chain; give each base once")
        return io.NodeOutput(BasesChain(chain + (TrainingBase(ckpt_name, path),)))


# --- dataset ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetRef:
    path: str
    frames: int
    width: int  # pixels
    height: int
    clips: int
    base_hashes: tuple[str, ...]


def _dataset_bases(chain: BasesChain):
    dataset = training("dataset")
    return [dataset.Base(Path(b.name).stem, dataset.fingerprint_file(b.path)) for b in chain.bases]


_check_name = runs.check_name


def _cancel_point() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


class TrainingDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(tspecs.TRAINING_DATASET)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # the cache on disk is part of the result: a deleted or extended folder must be looked at again
        name = kwargs.get("name")
        if isinstance(name, str) and runs.RUN_NAME.match(name.strip() or "-"):
            manifest = datasets_root() / name.strip() / "manifest.json"
            with contextlib.suppress(OSError):
                stat = manifest.stat()
                return f"{stat.st_mtime_ns}:{stat.st_size}"
        return float("nan")

    @classmethod
    def execute(cls, bases, source, prompts, video_folder, clips_per_base, frames, width, height, seed, name,
                teacher=None, stride=1, clips_per_video=1, teacher_steps=0):
        dataset = training("dataset")
        comfy_backend = training("comfy_backend")
        name = _check_name(name, "Training Dataset: name")
        path = datasets_root() / name
        kwargs = dict(frames=int(frames), width=int(width), height=int(height))
        pbar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int) -> None:
            pbar.update_absolute(done, max(total, 1))  # also ComfyUI's Cancel point

        device = _device_name()
        with torch.inference_mode(False):
            if source == "teacher":
                if teacher is None:
                    raise errors.InvalidInputError("Training Dataset: source 'teacher' needs the teacher input "
                                                   "(Load Motion Module) connected")
                prompt_list = training("dataset_teacher").read_prompts(prompts)
                if not prompt_list:
                    raise errors.InvalidInputError("Training Dataset: no prompts (one per line) for teacher clips")
                ckpts = comfy_backend.open_checkpoints(bases.paths, device=device)
                sampler_args = {"teacher_path": teacher.path}
                if teacher_steps:
                    sampler_args["steps"] = int(teacher_steps)
                try:
                    report = dataset.build_from_teacher(
                        path, prompt_list, bases=_dataset_bases(bases),
                        sample=comfy_backend.teacher_sampler(ckpts, teacher.module_set, **sampler_args),
                        encode_text=comfy_backend.text_encoder(ckpts), clips_per_base=int(clips_per_base),
                        seed=int(seed), progress=progress, check_cancel=_cancel_point, **kwargs)
                finally:
                    for ckpt in ckpts:
                        ckpt.release()
            elif source == "videos":
                folder = _input_subfolder(video_folder)
                training("dataset_video").scan_folder(folder, frames=int(frames), stride=int(stride))
                ckpts = comfy_backend.open_checkpoints(bases.paths, device=device)
                try:
                    report = dataset.build_from_videos(
                        path, folder, bases=_dataset_bases(bases), encode_images=comfy_backend.image_encoder(ckpts),
                        encode_text=comfy_backend.text_encoder(ckpts), stride=int(stride),
                        clips_per_video=int(clips_per_video), progress=progress, check_cancel=_cancel_point,
                        **kwargs)
                finally:
                    for ckpt in ckpts:
                        ckpt.release()
            else:
                raise errors.InvalidInputError(f"Training Dataset: source must be teacher or videos, got {source!r}")
        opened = dataset.LatentDataset(path)
        log.info("[AnimateDiff-Lightning] dataset %s: added %d clips, %d already cached, %d in all", path,
                 report.added, report.skipped, report.clips)
        ref = DatasetRef(str(path), opened.frames, opened.width * 8, opened.height * 8, len(opened),
                         tuple(b.hash for b in _dataset_bases(bases)))
        return io.NodeOutput(ref)


def _input_subfolder(name: str) -> Path:
    root = Path(folder_paths.get_input_directory()).resolve()
    name = (name or "").strip()
    path = (root / name).resolve()
    if not name or (path != root and root not in path.parents):
        raise errors.InvalidInputError(f"Training Dataset: video_folder {name!r} must be a sub-folder of ComfyUI's "
                                       f"input folder {root}")
    if not path.is_dir():
        raise errors.InvalidInputError(f"Training Dataset: video_folder {name!r} does not exist in {root}; put your "
                                       "videos and their same-name .txt captions there")
    return path


def _device_name() -> str:
    device = comfy.model_management.get_torch_device()
    return "cpu" if device.type == "cpu" else str(device) if device.index is not None else device.type


# --- the stage -------------------------------------------------------------------------------------------

def _precision(choice: str, device: str) -> str:
    if choice != "auto":
        return choice
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_config(*, teacher_path: str, bases: BasesChain, dataset: DatasetRef, stage: str, iterations: int,
                 run_name: str, seed: int, learning_rate: float, clips: int, precision: str,
                 gradient_checkpointing: bool, discriminator: str, resident_bases: str, save_every: int,
                 validate_every: int, validation_prompts: str, device: str, mse_only: bool = False,
                 optimizer: str = "adam"):
    config_module = training("config")
    config = config_module.Config()
    config.run.name = run_name
    config.run.runs_dir = str(runs_root())
    config.run.seed = int(seed)
    config.run.device = device
    config.run.precision = "fp32" if device == "cpu" else _precision(precision, device)
    config.model.kind = "sd15"
    config.model.teacher = teacher_path
    config.model.bases = list(bases.paths)
    config.model.resident_bases = resident_bases
    config.model.gradient_checkpointing = bool(gradient_checkpointing)
    config.stage.name = tspecs.stage_name(stage)
    config.stage.iterations = int(iterations)
    config.stage.lr = float(learning_rate)
    config.stage.clips = int(clips)
    config.stage.micro_batch = 1
    config.stage.mse_only = bool(mse_only)
    config.stage.optimizer = optimizer
    config.discriminator.trainable = discriminator
    config.discriminator.gradient_checkpointing = bool(gradient_checkpointing)
    config.data.dataset = dataset.path
    config.checkpoint.every = int(save_every)
    config.validation.every = int(validate_every)
    prompts = [p.strip() for p in (validation_prompts or "").splitlines() if p.strip()]
    config.validation.prompts = prompts or ["a cat walking on a wall"]
    config.validation.seeds = [0]
    return config.validate()


def _memory_check(config, budget_gb: float, device: str) -> str | None:
    """The traced memory plan (``training.memory``) against the free memory; raises when it does not fit.
    Returns the plan's table for the log, or None when the plan is not available in this install."""
    try:
        memory = training("memory")
    except ImportError as error:
        log.warning("[AnimateDiff-Lightning] no memory plan (training.memory: %s); training without one", error)
        return None
    if budget_gb > 0:
        free = int(budget_gb * 2**30)
    else:
        free = int(comfy.model_management.get_free_memory(comfy.model_management.get_torch_device()))
    opened = training("dataset").LatentDataset(config.data.dataset)
    plan = memory.estimate(config, free_bytes=free, geometry=memory.Geometry(opened.frames, opened.height, opened.width))
    table = plan.table()
    if not plan.fits:
        options = "\n  ".join(map(str, plan.options_that_fit)) or "(none: lower the clip size or frames of the dataset)"
        raise MemoryPlanRefused(
            f"Distill Stage: this run needs about {plan.peak_bytes / 2**30:.1f} GB but {free / 2**30:.1f} GB are "
            f"free{' (memory_budget_gb)' if budget_gb > 0 else ''}; nothing was loaded. Settings that fit "
            f"(node inputs: precision, gradient_checkpointing, discriminator, resident_bases, clips, optimizer):\n  {options}"
            f"\n\n{table}")
    return table


class MemoryPlanRefused(errors.InvalidInputError):
    """The memory plan says the run does not fit; nothing was loaded."""


def _new_run_dir(config):
    run_dir_module = training("run_dir")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(config.run.runs_dir)
    path = root / f"{config.run.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{config.run.name}-{stamp}-{n}"
    return run_dir_module.RunDir.create(config, path)


def _pick_run(resume: str, run_name: str) -> Path | None:
    if resume == "new":
        return None
    if resume == "latest":
        for folder in run_folders():
            match = runs.RUN_FOLDER.match(folder)
            if match["name"] == run_name and any((runs_root() / folder / "state").glob("iter-*.safetensors")):
                return runs_root() / folder
        log.info("[AnimateDiff-Lightning] resume = latest: no saved run named %s yet; starting a new one", run_name)
        return None
    return run_path(resume)


def _teacher_module(handle: MotionModuleHandle, config, comfy_backend):
    """The frozen teacher for the trainer. On the CPU, the module Load Motion Module already holds when it is
    exactly what reading the file gives (float32, per-frame GroupNorm; its LoRA patches were undone when the
    inference models were freed): a second copy would cost as much RAM as the teacher itself."""
    module = handle.module_set
    same_file = Path(handle.path).resolve() == Path(config.model.teacher).resolve()
    if (config.run.device == "cpu" and same_file and module.norm_mode == "per_frame"
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())):
        return module
    return comfy_backend.load_teacher(config.model.teacher)


def _free_inference_models() -> None:
    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models_gc()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception as error:  # no server (scripts): nothing to tell
        log.debug("send_sync %s failed: %s", event, error)


def _jpeg_preview(image: np.ndarray | None):
    if image is None:
        return None
    return ("JPEG", Image.fromarray(image), 512)


def _read_png(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError:
        return None


def latest_validation(run_dir) -> np.ndarray | None:
    grids = sorted(Path(run_dir.validation_dir).glob("iter-*/grid.png"))
    return _read_png(grids[-1]) if grids else None


def _as_image_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None]


def _advice(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return ("out of memory. Lower clips, set precision bf16, turn gradient_checkpointing on, set discriminator "
                "to light or resident_bases to one; the memory plan printed in the console shows what fits.")
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28 or "no space left" in str(error).lower():
        return ("the disk is full. A training state of an SD1.5 run holds the student, its Adam moments and the "
                "discriminator (several GB each; the last 3 are kept in the run's state/ folder): free space, "
                "delete old runs in models/adlightning_runs, then queue again with resume = latest.")
    return "see the message above; fix the input it names and queue again with resume = latest."


class DistillStage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        schema = _schema(tspecs.DISTILL_STAGE)
        schema.hidden = [io.Hidden.unique_id, io.Hidden.prompt]
        return schema

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a new object each call: ComfyUI always runs a training node (never a stale student)

    @classmethod
    def execute(cls, teacher, bases, dataset, stage, iterations, run_name, resume, seed, learning_rate=0.0, clips=1,
                precision="auto", gradient_checkpointing=True, discriminator="full", resident_bases="auto",
                save_every=50, validate_every=100, validation_prompts="a cat walking on a wall",
                mse_only=False, memory_budget_gb=0.0, optimizer="adam"):
        node_id = str(cls.hidden.unique_id) if cls.hidden is not None else None
        run_name = _check_name(run_name, "Distill Stage: run_name")
        if not isinstance(teacher, MotionModuleHandle):
            raise errors.InvalidInputError("Distill Stage: teacher must come from Load Motion Module")
        device = _device_name()
        with torch.inference_mode(False):
            result = _run_stage(node_id, teacher, bases, dataset, dict(
                stage=stage, iterations=iterations, run_name=run_name, seed=seed, learning_rate=learning_rate,
                clips=clips, precision=precision, gradient_checkpointing=gradient_checkpointing,
                discriminator=discriminator, resident_bases=resident_bases, save_every=save_every,
                validate_every=validate_every, validation_prompts=validation_prompts, device=device,
                mse_only=mse_only, optimizer=optimizer),
                resume, float(memory_budget_gb))
        student_path, run_dir = result
        dtype = comfy.model_management.unet_dtype()
        module_set = checkpoints_io.load_motion_module(student_path, device=comfy.model_management.unet_offload_device(),
                                                       dtype=dtype)
        module_set.requires_grad_(False)
        handle = MotionModuleHandle(motion_patcher(module_set), module_set.info, str(student_path))
        validation = latest_validation(run_dir)
        validation = validation if validation is not None else runs.no_validation_image()
        curves = runs.curves_image(run_dir.records())
        return io.NodeOutput(handle, _as_image_tensor(validation), _as_image_tensor(curves),
                             ui={"adl_run": [run_dir.path.name], "adl_student": [Path(student_path).name]})


def _run_stage(node_id, teacher: MotionModuleHandle, bases: BasesChain, dataset: DatasetRef, settings: dict,
               resume: str, budget_gb: float):
    config_module = training("config")
    run_dir_module = training("run_dir")
    loop = training("loop")
    sd15_setup = training("sd15_setup")
    comfy_backend = training("comfy_backend")
    dataset_module = training("dataset")

    config = build_config(teacher_path=teacher.path, bases=bases, dataset=dataset, **settings)
    opened = dataset_module.LatentDataset(config.data.dataset)
    hashes = [b.hash for b in _dataset_bases(bases)]
    for i, digest in enumerate(hashes):
        try:
            if opened.base_index(digest) != i:
                raise KeyError(digest)
        except (KeyError, errors.LightningError):
            raise errors.InvalidInputError(
                f"Distill Stage: base {i} ({bases.bases[i].name}) is not base {i} of the dataset {opened.path}; "
                "connect the same Training Bases chain to the dataset and to this node") from None
    if opened.num_bases != len(hashes):
        raise errors.InvalidInputError(f"Distill Stage: the dataset holds {opened.num_bases} bases, the chain "
                                       f"{len(hashes)}; connect the same chain to both nodes")

    existing = _pick_run(resume, config.run.name)
    state = None
    if existing is not None:
        run_dir = run_dir_module.RunDir.open(existing)
        state = run_dir.latest_state()
        if state is None:
            raise errors.InvalidInputError(f"Distill Stage: run {existing.name} has no saved state yet; queue with "
                                           "resume = new")
        _, meta = run_dir_module.read_state(state)
        saved = config_module.Config.from_dict(meta["config"], source=str(state))
        config.run.name = saved.run.name
        config.run.runs_dir = saved.run.runs_dir
        problems = config_module.resume_conflicts(saved, config, completed_iterations=meta["step"])
        if problems:
            raise errors.InvalidInputError(f"Distill Stage: cannot resume {existing.name}: " + "; ".join(problems)
                                           + ". Set the inputs back, or queue with resume = new.")

    training("validation").require_writers(config)  # before anything is loaded or a run folder is made
    loop.require_optimizer(config)
    _free_inference_models()  # before the plan: the memory they held is free for training
    table = _memory_check(config, budget_gb, settings["device"])
    if table:
        log.info("[AnimateDiff-Lightning] memory plan:\n%s", table)

    if existing is None:
        run_dir = _new_run_dir(config)
    else:
        run_dir.write_config(config)
    log.info("[AnimateDiff-Lightning] training run %s", run_dir.path)

    total = 0
    pbar = None
    preview = {"image": latest_validation(run_dir)}
    setup = trainer = None
    ckpts = []

    def hook(event: str, record: dict, trainer) -> None:
        if event == "validation":
            preview["image"] = latest_validation(run_dir)
            _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "validation", "record": record})
        elif event in ("checkpoint", "phase_end"):
            _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": event, "record": record})

    def progress(record: dict) -> None:
        _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "iteration", "record": record,
                      "total": total})
        # also ComfyUI's Cancel point: raises InterruptProcessingException after this whole iteration
        pbar.update_absolute(record["iteration"], total, _jpeg_preview(preview["image"]))

    with loop.pinned_threads(config.run.threads):
        torch.manual_seed(config.run.seed)
        random.seed(config.run.seed)
        np.random.seed(config.run.seed % 2**32)
        try:
            ckpts = comfy_backend.open_checkpoints(config.model.bases, device=config.run.device)
            teacher_module = _teacher_module(teacher, config, comfy_backend)
            lane_data = [opened.lane_data(i, flip=config.data.flip) for i in range(len(ckpts))]
            setup = sd15_setup.setup_from_parts(
                ckpts, teacher_module, lane_data, frames=opened.frames, latent_height=opened.height,
                latent_width=opened.width, trainable=config.discriminator.trainable,
                validation_prompts=list(config.validation.prompts) if config.validation.every else None)
            trainer = loop.Trainer(setup, config, run_dir=run_dir, hooks=[hook])
            if state is not None:
                meta = run_dir_module.restore_state(trainer, state)
                run_dir.truncate_log(meta["iteration"])
                log.info("[AnimateDiff-Lightning] resuming %s at iteration %d", run_dir.path.name, meta["iteration"])
            total = sum(p.iterations for p in trainer.stage.phases)
            pbar = comfy.utils.ProgressBar(total, node_id=node_id)
            pbar.update_absolute(trainer.iteration, total, _jpeg_preview(preview["image"]))
            _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "start", "total": total,
                          "records": run_dir.records()})
            trainer.run(progress=progress)
        except comfy.model_management.InterruptProcessingException:
            if trainer is not None and trainer._prepared:
                # the trainer saves a state when anything stops it between iterations; save only if it did not
                path = trainer.run_dir.latest_state()
                if path is None or path.name != f"iter-{trainer.iteration:08d}.safetensors":
                    path = trainer.save("cancel")
                log.warning("[AnimateDiff-Lightning] cancelled after iteration %d; state saved to %s; queue again "
                            "with resume = latest to continue", trainer.iteration, path)
                _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "cancelled",
                              "record": {"iteration": trainer.iteration, "path": str(path)}})
            raise
        except Exception as error:
            saved = trainer.run_dir.latest_state() if trainer is not None else None
            where = (f"the state after the last whole iteration is in {saved}; queue with resume = latest to continue"
                     if saved is not None else "no state was saved yet")
            _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "failed",
                          "record": {"message": str(error)}})
            raise RuntimeError(f"Distill Stage failed in run {run_dir.path.name}: {error}\n{_advice(error)}\n({where})") \
                from error
        finally:
            if setup is not None:
                for lane in setup.lanes:
                    with contextlib.suppress(Exception):
                        lane.base.unload()
            for ckpt in ckpts:
                with contextlib.suppress(Exception):
                    ckpt.release()
            setup = None
            trainer_ref = trainer
            trainer = None
            del trainer_ref
            gc.collect()
            comfy.model_management.soft_empty_cache()

    stage_steps = tspecs.stage_name(settings["stage"]).split("->")[1]
    inside = run_dir.students_dir / f"{config.run.name}_{stage_steps}step.safetensors"
    if not inside.is_file():
        raise RuntimeError(f"Distill Stage: the run ended but {inside} was not written")
    target = Path(folders.download_dir(folder_paths)) / inside.name
    with files.atomic_output(target) as temporary:
        shutil.copyfile(inside, temporary)
    folder_paths.filename_list_cache.pop(folders.MOTION_MODULES, None)
    _send(EVENT, {"node": node_id, "run": run_dir.path.name, "event": "done",
                  "record": {"student": target.name}})
    log.info("[AnimateDiff-Lightning] student saved to %s", target)
    return target, run_dir


# --- the log route for the widget ----------------------------------------------------------------------------

def register_routes() -> None:
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    routes = PromptServer.instance.routes

    @routes.get("/adlightning/training/log")
    async def training_log(request):
        try:
            payload = runs.log_payload(request.query.get("run"), request.query.get("run_name"), runs_root())
        except errors.InvalidInputError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(payload)


_ROUTES = []


def _register_once() -> None:
    if not _ROUTES:
        _ROUTES.append(True)
        register_routes()


_register_once()

NODES = [TrainingBases, TrainingDataset, DistillStage]
