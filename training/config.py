"""A distillation run's configuration: TOML sections as dataclasses, ``--set`` overrides, the resume check.

A run is fully described by one :class:`Config`. It is read from TOML (:func:`load`), adjusted on the command
line with ``section.key=value`` (:func:`apply_overrides`, values in TOML syntax, bare words taken as strings),
checked (:meth:`Config.validate`) and written into the run folder (:func:`dumps`) so that ``resume`` needs
nothing else. :func:`resume_conflicts` names the fields whose change would make a resumed run differ from one
that never stopped (the stage, the bases, the seed, the batch, the precision, ...); iteration counts may grow
and the checkpoint and validation intervals may change freely.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from ._core import core
InvalidInputError = core("errors").InvalidInputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

STAGES = ("128->32", "32->8", "8->4", "4->2", "2->1")
PRECISIONS = ("fp32", "bf16", "fp16")
KINDS = ("toy", "sd15")
RESIDENT = ("auto", "all", "one")
OPTIMIZERS = ("adam", "adam8bit")
TRAINABLE = ("full", "light")


class ConfigError(InvalidInputError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


@dataclasses.dataclass
class RunConfig:
    name: str = "my_run"
    runs_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0


@dataclasses.dataclass
class ModelConfig:
    kind: str = "toy"
    teacher: str = ""
    bases: list = dataclasses.field(default_factory=list)  # sd15: checkpoint files; toy: style ids
    resident_bases: str = "auto"
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class StageConfig:
    name: str = "8->4"
    iterations: int = 100
    mse_only: bool = False
    lr: float = 0.0
    clips: int = 1
    micro_batch: int = 1
    grad_clip: float = 1.0
    optimizer: str = "adam"


@dataclasses.dataclass
class DiscriminatorConfig:
    trainable: str = "full"
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class DataConfig:
    dataset: str = ""
    flip: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3


@dataclasses.dataclass
class ValidationConfig:
    every: int = 100
    prompts: list = dataclasses.field(default_factory=lambda: ["a cat walking"])
    seeds: list = dataclasses.field(default_factory=lambda: [0])


@dataclasses.dataclass
class DistributedConfig:
    """Only read under torchrun (training.distributed); one process ignores it."""

    shard_optimizer: bool = False  # ZeroRedundancyOptimizer: Adam state split over ranks (small GPUs)
    timeout_s: float = 600.0  # a collective waiting longer means a rank is gone or hung: stop the job
    bucket_mb: float = 64.0  # gradient all-reduce bucket size (bounds the flat copy of the gradients)


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    stage: StageConfig = dataclasses.field(default_factory=StageConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    # -- checks -------------------------------------------------------------------------------------------

    def validate(self) -> "Config":
        """Refuse values outside their allowed sets, with the key in the message. Returns self."""
        def one_of(key, value, allowed):
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}")

        one_of("run.precision", self.run.precision, PRECISIONS)
        one_of("model.kind", self.model.kind, KINDS)
        one_of("model.resident_bases", self.model.resident_bases, RESIDENT)
        one_of("stage.name", self.stage.name, STAGES)
        one_of("stage.optimizer", self.stage.optimizer, OPTIMIZERS)
        one_of("discriminator.trainable", self.discriminator.trainable, TRAINABLE)
        device = self.run.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError(f"run.device = {device!r}: use auto, cpu, cuda or cuda:N")
        for key in ("stage.iterations", "checkpoint.every", "validation.every", "run.threads"):
            if _get(self, key) < 0:
                raise ConfigError(f"{key} = {_get(self, key)} must not be negative")
        for key in ("stage.clips", "stage.micro_batch", "checkpoint.keep"):
            if _get(self, key) < 1:
                raise ConfigError(f"{key} = {_get(self, key)} must be at least 1")
        if self.stage.clips % self.stage.micro_batch:
            raise ConfigError(f"stage.micro_batch = {self.stage.micro_batch} must divide stage.clips = "
                              f"{self.stage.clips} (every micro-batch has the same size)")
        for key in ("distributed.timeout_s", "distributed.bucket_mb"):
            if not _get(self, key) > 0:
                raise ConfigError(f"{key} = {_get(self, key)!r} must be positive")
        for key in ("stage.lr", "stage.grad_clip"):
            value = _get(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key} = {value!r} must be a finite number >= 0 (0: {_ZERO_MEANS[key]})")
        if not self.run.name or any(c in self.run.name for c in "/\\:"):
            raise ConfigError(f"run.name = {self.run.name!r} must be a non-empty file-name-safe word")
        if self.model.kind == "toy":
            if any(not isinstance(b, int) or isinstance(b, bool) for b in self.model.bases):
                raise ConfigError(f"model.bases = {self.model.bases!r}: the toy world's bases are style ids "
                                  "(integers), e.g. [0, 1, 2]")
        elif any(not isinstance(b, str) for b in self.model.bases):
            raise ConfigError(f"model.bases = {self.model.bases!r}: sd15 bases are checkpoint file paths")
        if len(set(map(str, self.model.bases))) != len(self.model.bases):
            raise ConfigError(f"model.bases = {self.model.bases!r} lists a base twice")
        if len(self.validation.seeds) == 0:
            raise ConfigError("validation.seeds is empty; give at least one seed, or set validation.every = 0")
        if any(not isinstance(s, int) or isinstance(s, bool) for s in self.validation.seeds):
            raise ConfigError(f"validation.seeds = {self.validation.seeds!r} must be integers")
        if any(not isinstance(p, str) for p in self.validation.prompts):
            raise ConfigError(f"validation.prompts = {self.validation.prompts!r} must be strings")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "Config":
        """Build from nested dicts (missing keys keep their defaults); unknown or mistyped keys are refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
        config = cls()
        for section, values in data.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{source}: unknown section [{section}]; sections are "
                                  f"{', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value, source)
        return config.validate()


_ZERO_MEANS = {"stage.lr": "the paper's learning rate", "stage.grad_clip": "no clipping"}
_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in (
    ("run", RunConfig), ("model", ModelConfig), ("stage", StageConfig), ("discriminator", DiscriminatorConfig),
    ("data", DataConfig), ("checkpoint", CheckpointConfig), ("validation", ValidationConfig),
    ("distributed", DistributedConfig))}


def keys() -> list[str]:
    """Every ``section.key`` of the schema, in order."""
    return [f"{s}.{k}" for s, hints in _HINTS.items() for k in hints]


def _get(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def _checked(key: str, value: Any, expected: type, source: str) -> Any:
    def bad(what):
        return ConfigError(f"{source}: {key} = {value!r} {what}")

    if expected is bool:
        if not isinstance(value, bool):
            raise bad("must be true or false")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        value = float(value)
    elif expected is str:
        if not isinstance(value, str):
            raise bad("must be a string (quote it in TOML)")
    elif expected is list:
        if not isinstance(value, list):
            raise bad("must be a list, e.g. [0, 1]")
        if any(isinstance(v, (list, dict)) for v in value):
            raise bad("must be a flat list of strings or numbers")
    return value


def _set(config: Config, key: str, value: Any, source: str = "--set") -> None:
    section, _, name = key.partition(".")
    if section not in _HINTS or name not in _HINTS[section]:
        close = [k for k in keys() if k.split(".")[-1] == name]
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; known keys: {', '.join(keys())}"
        raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    setattr(getattr(config, section), name, _checked(key, value, _HINTS[section][name], source))


def _need_toml() -> None:
    if tomllib is None:
        raise ConfigError("reading TOML configs needs Python 3.11 or newer (tomllib), or `pip install tomli`")


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (``3``, ``1e-5``, ``true``, ``[0, 1]``, ``"x"``), else the bare string."""
    _need_toml()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order (a copy is returned), then validate."""
    config = Config.from_dict(config.to_dict())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. stage.iterations=200")
        _set(config, key.strip(), parse_value(text.strip()), f"--set {item!r}")
    return config.validate()


def load(path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (missing keys take their defaults) and apply ``overrides``."""
    _need_toml()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {error}") from None
    return apply_overrides(Config.from_dict(data, source=str(path)), overrides or [])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def dumps(config: Config) -> str:
    """The config as TOML (every key written, so the file alone describes the run)."""
    lines = ["# written by python -m training; `python -m training resume <run folder>` reads it back", ""]
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


# -- resume ----------------------------------------------------------------------------------------------

#: Fields a resumed run may change without changing what it computes (intervals, where files go, how the
#: same math is placed on the device). Everything else must match the checkpoint.
RESUME_FREE = {"run.name", "run.runs_dir", "run.device", "run.threads", "model.resident_bases",
               "model.gradient_checkpointing", "discriminator.gradient_checkpointing", "checkpoint.every",
               "checkpoint.keep", "validation.every", "validation.prompts", "validation.seeds",
               # the same update on any number of ranks; the state is saved whole either way
               "distributed.shard_optimizer", "distributed.timeout_s", "distributed.bucket_mb"}


def resume_conflicts(saved: Config, new: Config, *, completed_iterations: int = 0) -> list[str]:
    """Lines naming each field whose change breaks an exact resume (empty when the run may continue).

    ``stage.iterations`` may grow, but not below the iterations the checkpoint already completed in its phase.
    """
    problems = []
    old, cur = saved.to_dict(), new.to_dict()
    for key in keys():
        section, name = key.split(".")
        a, b = old[section][name], cur[section][name]
        if a == b or key in RESUME_FREE:
            continue
        if key == "stage.iterations":
            if b >= completed_iterations:
                continue
            problems.append(f"stage.iterations = {b} is below the {completed_iterations} iterations this "
                            f"checkpoint already completed in its phase")
            continue
        problems.append(f"{key} changed from {a!r} to {b!r}; it decides what the run computes, so resuming would "
                        f"not continue the same run (set it back, or start a new run)")
    return problems

