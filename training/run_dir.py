"""A run is a folder; everything needed to continue it exactly is in there.

    <runs_dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.toml                       the resolved config (``python -m training resume`` reads it)
        log.jsonl                         one JSON record per iteration (and per validation / checkpoint)
        state/iter-00000040.safetensors   training state, the last ``checkpoint.keep`` of them
        students/<name>_<N>step.safetensors   the student in AnimateDiff's original layout (N = its steps)
        validation/iter-00000040/...      validation clips (mp4, PNG grid) and metrics

A state file holds every tensor in safetensors - the student, the stage's teacher when it is a frozen copy of
the student, the current discriminator, every optimiser's state tensors, the torch and data-generator random
states - and, as JSON in the safetensors metadata, everything else: the position (phase, step, iteration),
the optimisers' ``param_groups``, Python's and numpy's random states and the config the state was saved
under. No pickle is involved. Files appear atomically (written aside, then renamed), so a kill at any moment
leaves the previous state whole; a half-written hidden temporary is removed when the run is resumed.
Exactness: on a CPU with a pinned thread count, a resumed run ends with the same bits as one that never
stopped (all random states are restored; PyTorch's CPU kernels are deterministic at a fixed thread count).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._core import core
METADATA_PREFIX = core("checkpoints").METADATA_PREFIX
save_motion_module = core("checkpoints").save_motion_module
InvalidInputError = core("errors").InvalidInputError
atomic_output = core("files").atomic_output
MotionModuleSet = core("motion_module").MotionModuleSet

from . import config as config_module
from . import state_file
from .config import Config

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_KEY = "adlightning.training_state"


class RunDir:
    """The folder of one run. Only rank 0 makes one (other ranks get ``None`` and write nothing)."""

    def __init__(self, path):
        self.path = Path(path)

    # -- layout ----------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def students_dir(self) -> Path:
        return self.path / "students"

    @property
    def validation_dir(self) -> Path:
        return self.path / "validation"

    @classmethod
    def create(cls, config: Config, path=None) -> "RunDir":
        """A new run folder (``path`` or ``<runs_dir>/<name>-<timestamp>``) with the resolved config in it."""
        if path is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(config.run.runs_dir) / f"{config.run.name}-{stamp}"
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InvalidInputError(f"run folder {os.fspath(path)!r} already exists and is not empty; "
                                    f"continue it with `python -m training resume {os.fspath(path)}` or pick "
                                    "another --run-dir")
        run = cls(path)
        run.write_config(config)
        return run

    @classmethod
    def open(cls, path) -> "RunDir":
        run = cls(path)
        if not run.config_path.is_file():
            raise InvalidInputError(f"{os.fspath(path)!r} is not a run folder (no config.toml in it)")
        run.remove_partial_files()
        return run

    def write_config(self, config: Config) -> None:
        with atomic_output(self.config_path) as temporary:
            temporary.write_text(config_module.dumps(config), encoding="utf-8")

    def remove_partial_files(self) -> list[Path]:
        """Hidden temporaries a killed process left behind (never a file a reader could mistake for whole)."""
        removed = []
        for folder in (self.path, self.state_dir, self.students_dir):
            for leftover in folder.glob(".*.partial*") if folder.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
                    removed.append(leftover)
        return removed

    # -- the log ---------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """Whole records of the log (a line cut by a kill is skipped)."""
        out = []
        if self.log_path.is_file():
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def truncate_log(self, iteration: int) -> None:
        """Keep what the log says about iterations up to ``iteration`` (the resumed run rewrites the rest)."""
        kept = [r for r in self.records() if r.get("iteration", 0) <= iteration]
        with atomic_output(self.log_path) as temporary:
            temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    # -- training state --------------------------------------------------------------------------------

    def state_files(self) -> list[Path]:
        return sorted(self.state_dir.glob("iter-*.safetensors"))

    def latest_state(self) -> Path | None:
        files = self.state_files()
        return files[-1] if files else None

    def save_state(self, trainer) -> Path:
        tensors, meta = capture_state(trainer)
        path = self.state_dir / f"iter-{trainer.iteration:08d}.safetensors"
        with atomic_output(path) as temporary:
            # streamed: one host copy at a time, not a second copy of the whole state (several GB on SD1.5)
            state_file.write(temporary, tensors, metadata={STATE_KEY: json.dumps(meta)})
        for old in self.state_files()[:-trainer.config.checkpoint.keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def save_student(self, trainer) -> Path | None:
        """The student as ``students/<name>_<N>step.safetensors`` (original AnimateDiff layout, our loader's
        step-count metadata), rewritten at every save."""
        student = trainer.student
        if not isinstance(student, MotionModuleSet):
            return None
        config, stage = trainer.config, trainer.stage
        bases = [str(b) for b in config.model.bases] or [str(lane.index) for lane in trainer.setup.lanes]
        meta = {"lightning_steps": str(stage.student_steps),
                f"{METADATA_PREFIX}stage": stage.name,
                f"{METADATA_PREFIX}steps": str(stage.student_steps),
                f"{METADATA_PREFIX}iterations": str(trainer.iteration),
                f"{METADATA_PREFIX}bases": json.dumps(bases),
                f"{METADATA_PREFIX}run": config.run.name}
        info = student.info
        try:
            # the saver writes adlightning.lightning_steps from the module's info: what our loader reads
            student.info = type(info)(**{**info.__dict__, "lightning_steps": stage.student_steps})
            path = self.students_dir / f"{config.run.name}_{stage.student_steps}step.safetensors"
            return save_motion_module(student, path, metadata=meta)
        finally:
            student.info = info


# -- capture / restore -----------------------------------------------------------------------------------

def _stored(tensor: torch.Tensor) -> torch.Tensor:
    # no copy here: the state is written between iterations, while nothing changes the tensors, and
    # ``state_file.write`` copies them to the host one at a time
    return tensor.detach()


def _optimizer_tensors(prefix: str, optimizer, tensors: dict) -> dict:
    state = optimizer.state_dict()
    other: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = _stored(value)
            else:
                other.setdefault(str(index), {})[name] = value
    return {"param_groups": state["param_groups"], "other": other}


def _jsonable_numpy_state(state: dict) -> dict:
    inner = dict(state["state"])
    inner["key"] = inner["key"].tolist()
    return {**state, "state": inner}


def capture_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of everything a resume needs (see the module docstring)."""
    from .loop import capture_rng

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("student", trainer.student), ("teacher", trainer.teacher if trainer.owns_teacher else None),
                           ("discriminator", trainer.discriminator)):
        if module is not None:
            for name, value in module.state_dict().items():
                tensors[f"{prefix}.{name}"] = _stored(value)
    optimizers = {}
    for prefix, optimizer in (("optimizer.student", trainer.optimizer),
                              ("optimizer.discriminator", trainer.disc_optimizer)):
        if optimizer is not None:
            optimizers[prefix] = _optimizer_tensors(prefix, optimizer, tensors)
    rng = capture_rng(trainer.generator)
    tensors["rng.data"] = rng["data"]
    tensors["rng.torch"] = rng["torch"]
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = state
    meta = {"format": STATE_FORMAT, "stage": trainer.stage.name, "phase_index": trainer.phase_index,
            "phase": trainer.phase.kind if trainer.phase is not None else None, "step": trainer.step,
            "iteration": trainer.iteration, "optimizers": optimizers,
            "python_random": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
            "numpy_random": _jsonable_numpy_state(rng["numpy"]),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "config": trainer.config.to_dict()}
    extra = getattr(trainer, "extra_state", None)  # training.distributed: every rank's RNGs, per-lane data
    if extra is not None:
        more_tensors, more_meta = extra()
        tensors.update(more_tensors)
        meta.update(more_meta)
    return tensors, meta


def read_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a state file, with a clear error for anything that is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(os.fspath(path), "pt") as handle:
            raw = (handle.metadata() or {}).get(STATE_KEY)
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as error:
        raise InvalidInputError(f"training state {os.fspath(path)!r} cannot be read ({error}); resume from an "
                                "older file in the same state/ folder, or start the run again") from None
    if raw is None:
        raise InvalidInputError(f"{os.fspath(path)!r} is not a training state (no {STATE_KEY} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"{os.fspath(path)!r} has state format {meta.get('format')!r}; this version "
                                f"reads format {STATE_FORMAT}")
    return tensors, meta


def _load_module(module, prefix: str, tensors: dict, path) -> None:
    mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(mine, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(f"{os.fspath(path)!r}: the {prefix} in the state does not fit the model this "
                                f"config builds ({str(error).splitlines()[0]})") from None


def _load_optimizer(optimizer, prefix: str, saved: dict, tensors: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in saved["other"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def restore_state(trainer, path) -> dict:
    """Load a state file into a trainer built from the same config (positions, weights, optimisers, RNGs)."""
    from .loop import restore_rng

    tensors, meta = read_state(path)
    if meta["stage"] != trainer.stage.name:
        raise InvalidInputError(f"{os.fspath(path)!r} is a state of stage {meta['stage']}, the config runs "
                                f"{trainer.stage.name} (stage.name changed)")
    trainer.phase_index, trainer.step, trainer.iteration = meta["phase_index"], meta["step"], meta["iteration"]
    trainer._prepared = False
    trainer.prepare()  # places the models and builds this phase's discriminator and optimisers
    _load_module(trainer.student, "student", tensors, path)
    if trainer.owns_teacher:
        _load_module(trainer.teacher, "teacher", tensors, path)
    if trainer.discriminator is not None:
        _load_module(trainer.discriminator, "discriminator", tensors, path)
    for prefix, optimizer in (("optimizer.student", trainer.optimizer),
                              ("optimizer.discriminator", trainer.disc_optimizer)):
        if optimizer is not None and prefix in meta["optimizers"]:
            _load_optimizer(optimizer, prefix, meta["optimizers"][prefix], tensors)
    if trainer.scaler is not None and meta.get("scaler"):
        trainer.scaler.load_state_dict(meta["scaler"])
    python = meta["python_random"]
    numpy_state = dict(meta["numpy_random"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    rng = {"data": tensors["rng.data"], "torch": tensors["rng.torch"],
           "python": (python[0], tuple(python[1]), python[2]), "numpy": numpy_state}
    if cuda:
        rng["cuda"] = cuda
    restore_rng(rng, trainer.generator)  # last: building the discriminator above drew from torch's RNG
    extra = getattr(trainer, "restore_extra_state", None)  # training.distributed: this rank's own RNGs
    if extra is not None:
        extra(tensors, meta)
    return meta
