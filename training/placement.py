"""Where a run's modules live and in which precision its forward passes run.

- **Trainables** (the student, the discriminator) live on the device in float32: their weights are the
  master weights the optimiser updates, whatever the compute precision.
- **Frozen bases** are either all resident on the device, or (``resident_bases = "one"``) kept in CPU memory
  with only the lane being worked on moved to the device. Gradients still accumulate over every lane
  before the optimiser steps, so the update is the one the paper's one-base-per-GPU data parallelism makes
  (AnimateDiff-Lightning §3.2, cross-model distillation); only time is traded for memory.
- **Compute precision**: ``bf16`` / ``fp16`` run forward passes under autocast on CUDA; on a CPU every
  pass is float32 (CPU autocast is slow and the CPU run is the exact reference).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ._core import core
InvalidInputError = core("errors").InvalidInputError

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"run.device = {name!r} but this PyTorch sees no CUDA device; "
                                "set run.device = \"cpu\" (or auto)")
    return device


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def float32_masters(module: nn.Module) -> nn.Module:
    """Trainable weights in float32 (the optimiser's master weights); frozen parts keep their dtype."""
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
    return module


class Placement:
    """Devices and precision for one run; ``on_move(base, device)`` sees every move of a frozen base.

    ``resident``: ``"all"`` keeps every base on the device; ``"one"`` keeps them on the CPU and moves the
    active one in (:meth:`lane`); ``"auto"`` is ``"all"`` when the bases take under half the device's free
    memory (always on a CPU), else ``"one"``.
    """

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32", resident: str = "all",
                 on_move: Callable[[nn.Module, torch.device], None] | None = None):
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16", "fp16"):
            raise InvalidInputError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        if resident not in ("auto", "all", "one"):
            raise InvalidInputError(f"resident_bases must be auto, all or one, got {resident!r}")
        # A CPU run is the float32 reference (the one resume is bit-exact on).
        self.precision = precision if self.device.type == "cuda" else "fp32"
        self.resident = resident
        self.on_move = on_move
        self.moves = 0

    @property
    def swapped(self) -> bool:
        return self.resident == "one"

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
        return self.precision == "fp16"

    def prepare(self, bases: Sequence[nn.Module], trainables: Sequence[nn.Module | None]) -> None:
        """Put trainables on the device, their trainable weights in float32 (the master weights; a frozen
        part such as a light discriminator's backbone keeps its dtype), and the bases where residency says."""
        for module in trainables:
            if module is not None:
                module.to(device=self.device)
                float32_masters(module)
        if self.resident == "auto":
            self.resident = self._auto(bases)
        home = self.device if self.resident == "all" else torch.device("cpu")
        for base in bases:
            self._move(base, home)

    def _auto(self, bases: Sequence[nn.Module]) -> str:
        if self.device.type != "cuda":
            return "all"
        free, _ = torch.cuda.mem_get_info(self.device)
        need = sum(module_bytes(b) for b in bases)
        choice = "all" if need < free // 2 else "one"
        log.info("resident_bases=auto: bases need %.2f GiB, %.2f GiB free -> %s", need / 2**30, free / 2**30, choice)
        return choice

    def _move(self, base: nn.Module, device: torch.device) -> None:
        if not isinstance(base, nn.Module):
            if self.swapped or device.type != "cpu":
                raise InvalidInputError(f"frozen base {base!r} is not an nn.Module and cannot be moved to {device}")
            return  # a plain callable (tests' analytic bases) already computes wherever its inputs are
        base.to(device)
        self.moves += 1
        if self.on_move is not None:
            self.on_move(base, device)

    @contextlib.contextmanager
    def lane(self, base: nn.Module) -> Iterator[None]:
        """The block runs with ``base`` on the device (moved in and back out when bases are swapped)."""
        if not self.swapped:
            yield
            return
        self._move(base, self.device)
        try:
            yield
        finally:
            self._move(base, torch.device("cpu"))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for forward passes in the run's compute precision (a no-op in float32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])

    def grad_scaler(self):
        """A GradScaler for fp16 (its step reads the found-inf flag back: a host sync), else None."""
        if not self.needs_scaler:
            return None
        if hasattr(torch.amp, "GradScaler"):
            return torch.amp.GradScaler(self.device.type)
        return torch.cuda.amp.GradScaler()  # torch < 2.3
