"""The distillation loop: one stage of progressive adversarial distillation, readable top to bottom.

What one iteration does (:func:`train_iteration`; AnimateDiff-Lightning §3, SDXL-Lightning §3):

1. per lane (one frozen base and its data; the base is moved onto the device if bases are swapped), per
   micro-batch: draw clean clips, a start timestep per clip, noise them, and let the teacher take its n
   Euler steps under ``no_grad`` (:func:`lightning.distill.draw_pair`);
2. **MSE phase**: the student's one jump, ``|x̂ - x|^2`` against the teacher's, backward; **adversarial
   phase**: first the discriminator's loss on (teacher jump = real, detached student jump = fake) for every
   lane, one discriminator step; then the student's non-saturating loss through the *updated*
   discriminator on the same pairs (the student's jump is recomputed, so no lane's graph has to stay alive
   while the others run), one student step;
3. every loss is scaled by ``micro-batch / clips / total_bases``, so the accumulated gradient is the mean
   over every clip of every base: the update of the paper's one-base-per-GPU data parallelism, whatever
   the micro-batching, the base swapping or (later) the number of ranks;
4. before each optimiser step: ``sync_gradients`` (the DDP all-reduce; a no-op in one process), gradient
   clipping, then Adam (per phase, per trainable model, with the paper's settings from
   :mod:`lightning.distill`).

The math (pairs, jumps, losses) is :mod:`lightning.distill`; this module only decides where and how often
it runs. One iteration does no host read-back (no ``.item()``, no ``bool(tensor)``): its figures come back
as 0-dim tensors, so the memory plan can trace it on fake tensors. :class:`Trainer` runs the phases of a
stage over iterations with logging, validation, checkpoints, resume and hooks; :func:`run_stage` and
:func:`run_stages` run stages in memory (the toy demo, tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from ._core import core
distill = core("distill")
Lane = core("distill").Lane
Phase = core("distill").Phase
Stage = core("distill").Stage
InvalidInputError = core("errors").InvalidInputError
TemporalTransformer = core("motion_module").TemporalTransformer

from .config import Config
from .placement import Placement, resolve_device

log = logging.getLogger(__name__)

Hook = Callable[[str, dict, "Trainer"], None]
SyncGradients = Callable[[Sequence[torch.Tensor], int], None]


@dataclasses.dataclass
class Setup:
    """Everything a run trains and trains on, built from a config (``training.toy_setup``, ``training.sd15_setup``)."""

    lanes: list[Lane]  # one per base, lane.index == position
    student: nn.Module  # trainable motion module set (float32 master weights)
    teacher: nn.Module | None  # frozen teacher motion module (None: frozen copy of the student)
    make_discriminator: Callable[[bool], nn.Module] | None  # conditional -> fresh FlowDiscriminator
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # latents [F,4,h,w] -> frames [F,H,W,3] in 0..1
    validation_conds: list[tuple[Any, Any]] | None  # per lane: (cond, uncond) of the validation prompts


# --- stages from a config -------------------------------------------------------------------------------

def stage_from_config(config: Config) -> Stage:
    """The config's stage as :class:`lightning.distill.Stage` (paper settings unless ``stage.lr`` is set).

    ``128->32`` is the MSE stage with the teacher at CFG 7.5; every other stage runs a conditional-D phase
    and then an unconditional-D' phase of ``stage.iterations`` each. ``mse_only`` (the ablation) runs one MSE
    phase of both phases' length instead, at the MSE learning rate.
    """
    teacher_steps, student_steps = (int(v) for v in config.stage.name.split("->"))
    lr = config.stage.lr or None
    iterations = config.stage.iterations
    extra = distill.EXTRA_TIMESTEPS.get(student_steps, ())
    if teacher_steps == 128:
        return Stage(128, 32, (distill.mse_phase(iterations, lr or distill.PAPER_MSE_LR),), cfg=distill.PAPER_CFG)
    if config.stage.mse_only:
        return Stage(teacher_steps, student_steps, (distill.mse_phase(2 * iterations, lr or distill.PAPER_MSE_LR),),
                     extra_timesteps=extra)
    return distill.adversarial_stage(teacher_steps, student_steps, (iterations, iterations),
                                     lr or distill.PAPER_ADVERSARIAL_LR)


# --- gradient checkpointing and discriminator trainability -----------------------------------------------

def _checkpointed_forward(self, x, video_length, *, scale=1.0):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x, video_length, scale=scale)
    return torch_checkpoint.checkpoint(type(self).forward, self, x, video_length, scale=scale, use_reentrant=False)


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Recompute every temporal transformer's activations in backward instead of keeping them.

    Non-reentrant ``torch.utils.checkpoint`` per module (what diffusers uses): same gradients, activation
    memory of one module at a time. Returns how many modules were changed.
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, TemporalTransformer):
            if enabled:
                sub.forward = types.MethodType(_checkpointed_forward, sub)
            else:
                sub.__dict__.pop("forward", None)
            count += 1
    return count


LIGHT_TRAINABLE = ("head.", "base_embedding.", "motion", "time")


def set_discriminator_trainable(discriminator: nn.Module, mode: str) -> None:
    """``full``: every weight trains (the paper). ``light``: only the head, the base-index embedding, the
    motion modules and the time embedding train; a backbone may define ``set_trainable(mode)`` instead."""
    if mode not in ("full", "light"):
        raise InvalidInputError(f"discriminator.trainable must be full or light, got {mode!r}")
    backbone = getattr(discriminator, "backbone", None)
    discriminator.requires_grad_(True)
    if mode == "full":
        return
    if backbone is not None and hasattr(backbone, "set_trainable"):
        backbone.set_trainable(mode)
        return
    for name, parameter in discriminator.named_parameters():
        parameter.requires_grad_(any(p in name for p in LIGHT_TRAINABLE))


def make_optimizer(params: Sequence[torch.Tensor], phase: Phase, kind: str = "adam") -> torch.optim.Optimizer:
    """Adam with the phase's lr and betas; ``adam8bit`` uses bitsandbytes' 8-bit state (only if installed)."""
    params = list(params)
    if kind == "adam":
        # foreach=False: one implementation on every device, the one the CPU reference runs
        return torch.optim.Adam(params, lr=phase.lr, betas=phase.betas, foreach=False)
    if kind == "adam8bit":
        return _bitsandbytes().optim.Adam8bit(params, lr=phase.lr, betas=phase.betas)
    raise InvalidInputError(f"stage.optimizer must be adam or adam8bit, got {kind!r}")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise InvalidInputError("stage.optimizer = \"adam8bit\" (the node's optimizer input) needs the "
                                "bitsandbytes package (pip install bitsandbytes, in the Python that trains); or "
                                "use \"adam\"") from None
    return bitsandbytes


def require_optimizer(config) -> None:
    """Raise now, before any weight is loaded, when the configured optimizer's library is missing."""
    if config.stage.optimizer == "adam8bit":
        _bitsandbytes()


# --- one iteration --------------------------------------------------------------------------------------

def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _optimizer_step(optimizer, params, *, grad_clip, scaler, sync_gradients, bases_here) -> torch.Tensor:
    """All-reduce hook, unscale (fp16), clip, step. Returns the gradient norm before clipping (0-dim)."""
    if sync_gradients is not None:
        sync_gradients(params, bases_here)
    if scaler is not None:
        scaler.unscale_(optimizer)
    with_grad = [p for p in params if p.grad is not None]
    if grad_clip > 0 and with_grad:
        norm = torch.nn.utils.clip_grad_norm_(with_grad, grad_clip, foreach=False)
    elif with_grad:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
    else:
        norm = torch.zeros(())
    if scaler is not None:
        scaler.step(optimizer)  # reads the found-inf flag back: the one host sync, fp16 only
    else:
        optimizer.step()
    return norm.detach()


def micro_batches(clips: int, micro_batch: int | None) -> list[int]:
    micro = micro_batch or clips
    if clips < 1 or micro < 1 or clips % micro:
        raise InvalidInputError(f"micro_batch {micro} must divide clips {clips} (both positive)")
    return [micro] * (clips // micro)


def train_iteration(stage: Stage, phase: Phase, lanes: Sequence[Lane], student: nn.Module,
                    teacher: nn.Module | None, optimizer: torch.optim.Optimizer, *,
                    generator: torch.Generator | Mapping[int, torch.Generator],
                    clips: int, micro_batch: int | None = None, discriminator: nn.Module | None = None,
                    disc_optimizer: torch.optim.Optimizer | None = None, placement: Placement | None = None,
                    total_bases: int | None = None, grad_clip: float = 0.0, scaler=None,
                    sync_gradients: SyncGradients | None = None) -> dict[str, torch.Tensor]:
    """One iteration of ``phase`` over ``lanes``; updates ``student`` (and the discriminator) in place.

    ``clips`` per lane, in micro-batches of ``micro_batch``; ``total_bases`` is the number of bases over all
    ranks (default: ``len(lanes)``). ``generator`` is one generator for every lane, or one per lane index
    (``{lane.index: generator}``: each lane's draws then do not depend on which other lanes run here, which
    is what lets ranks split the lanes of one run; see ``training.distributed``). Returns 0-dim tensors: ``mse`` and ``grad_norm``, or ``d``, ``g``,
    ``accuracy``, ``preference``, ``d_grad_norm`` and ``grad_norm`` (loss figures are means over all clips of
    the lanes here, in units of one base's loss times ``len(lanes) / total_bases``).
    """
    placement = placement or Placement()
    total = total_bases or len(lanes)
    sizes = micro_batches(clips, micro_batch)
    device = placement.device
    step = dict(grad_clip=grad_clip, scaler=scaler, sync_gradients=sync_gradients, bases_here=len(lanes))

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def draw(lane, n):
        lane_generator = generator[lane.index] if isinstance(generator, Mapping) else generator
        with placement.autocast():
            return distill.draw_pair(stage, lane, teacher, n, lane_generator, device=device)

    if not phase.adversarial:
        optimizer.zero_grad(set_to_none=True)
        mse = torch.zeros((), device=device)
        for lane in lanes:
            with placement.lane(lane.base):
                for n in sizes:
                    pair = draw(lane, n)
                    with placement.autocast():
                        pair.student = distill.student_jump(lane.base, student, pair)
                    loss = distill.mse_loss(pair.student.float(), pair.teacher.float()) * (n / clips / total)
                    backward(loss)
                    mse = mse + loss.detach()
        norm = _optimizer_step(optimizer, _trainable(student), **step)
        return {"mse": mse, "grad_norm": norm}

    if discriminator is None or disc_optimizer is None:
        raise InvalidInputError(f"phase {phase.kind!r} is adversarial: pass discriminator= and disc_optimizer=")
    conditional = phase.kind == distill.CONDITIONAL

    # 1) the discriminator: teacher jumps are real, (detached) student jumps fake, over every lane
    disc_optimizer.zero_grad(set_to_none=True)
    d_loss = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.float64)
    prefers = torch.zeros((), device=device, dtype=torch.float64)
    pairs: list[tuple[Lane, list[distill.Pair]]] = []
    for lane in lanes:
        drawn = []
        with placement.lane(lane.base):
            for n in sizes:
                pair = draw(lane, n)
                with placement.autocast():
                    with torch.no_grad():  # D's fake sample: no graph is kept for it (the G pass builds its own)
                        fake = distill.student_jump(lane.base, student, pair)
                    real_logits = distill.discriminate(discriminator, pair, pair.teacher, conditional)
                    fake_logits = distill.discriminate(discriminator, pair, fake, conditional)
                loss = distill.discriminator_loss(real_logits.float(), fake_logits.float()) * (n / clips / total)
                backward(loss)
                d_loss = d_loss + loss.detach()
                weight = n / clips / len(lanes)
                hits = hits + distill.accuracy(real_logits.detach(), fake_logits.detach()) * weight
                prefers = prefers + distill.preference(real_logits.detach(), fake_logits.detach()) * weight
                drawn.append(pair)
        pairs.append((lane, drawn))
    d_norm = _optimizer_step(disc_optimizer, _trainable(discriminator), **step)
    disc_optimizer.zero_grad(set_to_none=True)  # D's gradients are spent: free them before the student's pass

    # 2) the student: fool the updated discriminator on the same pairs (D's weights get no gradient here)
    optimizer.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    g_loss = torch.zeros((), device=device)
    try:
        for lane, drawn in pairs:
            with placement.lane(lane.base):
                for pair in drawn:
                    n = pair.start.shape[0]
                    with placement.autocast():
                        pair.student = distill.student_jump(lane.base, student, pair)
                        logits = distill.discriminate(discriminator, pair, pair.student, conditional)
                    loss = distill.generator_loss(logits.float()) * (n / clips / total)
                    backward(loss)
                    g_loss = g_loss + loss.detach()
    finally:
        for parameter, flag in zip(discriminator.parameters(), flags):
            parameter.requires_grad_(flag)
    g_norm = _optimizer_step(optimizer, _trainable(student), **step)
    return {"d": d_loss, "g": g_loss, "accuracy": hits, "preference": prefers, "d_grad_norm": d_norm,
            "grad_norm": g_norm}


# --- a stage over iterations ------------------------------------------------------------------------------

class Interrupted(Exception):
    """The run stopped on a signal after saving its state; ``resume`` continues it."""


def capture_rng(generator: torch.Generator) -> dict:
    """Every random state an iteration may read: the data generator, torch (CPU, CUDA), Python, numpy."""
    state = {"data": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(legacy=False)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs one stage of a :class:`Setup`: its phases, with logging, validation, checkpoints and hooks.

    ``trainer.student``, ``trainer.discriminator`` (the current phase's, or None), ``trainer.phase`` and
    ``trainer.run_dir`` are what hooks read. ``sync_gradients(params, bases_here)`` is called before every
    optimiser step (a no-op here; torchrun replaces it with the all-reduce). With ``world_size > 1`` this
    rank trains lanes ``rank, rank + world_size, ...`` and only rank 0 writes files.
    """

    def __init__(self, setup: Setup, config: Config, *, stage: Stage | None = None, run_dir=None,
                 hooks: Sequence[Hook] = (), generator: torch.Generator | None = None,
                 placement: Placement | None = None, rank: int = 0, world_size: int = 1,
                 keep_discriminators: bool = False):
        if not setup.lanes:
            raise InvalidInputError("a run needs at least one lane (a frozen base and its data)")
        indices = [lane.index for lane in setup.lanes]
        if len(set(indices)) != len(indices):
            raise InvalidInputError(f"two lanes share a base index: {indices}; each base needs its own index")
        self.config = config
        self.setup = setup
        self.stage = stage if stage is not None else stage_from_config(config)
        if self.stage.has_adversarial and setup.make_discriminator is None:
            raise InvalidInputError(f"stage {self.stage.name} has adversarial phases; the setup has no "
                                    "make_discriminator")
        self.placement = placement or Placement(resolve_device(config.run.device), config.run.precision,
                                                config.model.resident_bases)
        self.rank, self.world_size = rank, world_size
        self.lanes = list(setup.lanes[rank::world_size])
        self.total_bases = len(setup.lanes)
        self.student = setup.student
        self.owns_teacher = setup.teacher is None
        self.teacher = distill.frozen_copy(self.student) if self.owns_teacher else setup.teacher
        self.generator = generator if generator is not None else torch.Generator().manual_seed(config.run.seed)
        self.run_dir = run_dir if rank == 0 else None
        self.hooks = list(hooks)
        self.phase_index = 0
        self.step = 0  # iterations completed in the current phase
        self.iteration = 0  # iterations completed in the stage
        self.discriminator: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        self.scaler = None
        # Each phase's discriminator is dropped when the next phase starts (on SD1.5 one is GBs with its Adam
        # state); in-memory runs that inspect them afterwards (the toy demo, tests) ask to keep them.
        self.keep_discriminators = keep_discriminators
        self.discriminators: dict[str, nn.Module] = {}
        self.history: list[dict] = []
        self.stop_requested = False
        self._prepared = False
        self._in_iteration = False

    # -- pieces hooks and the run folder read ----------------------------------------------------------

    @property
    def phase(self) -> Phase | None:
        return self.stage.phases[self.phase_index] if self.phase_index < len(self.stage.phases) else None

    @property
    def finished(self) -> bool:
        return self.phase is None

    def clips_for(self, phase: Phase) -> int:
        return phase.clips or self.config.stage.clips

    def data_generators(self) -> torch.Generator | Mapping[int, torch.Generator]:
        """What :func:`train_iteration` draws from: one generator here; per lane in ``training.distributed``."""
        return self.generator

    def sync_gradients(self, params: Sequence[torch.Tensor], bases_here: int) -> None:
        """The data-parallel all-reduce of the trainables' gradients; one process has nothing to do."""

    def _emit(self, event: str, record: dict) -> None:
        for hook in self.hooks:
            hook(event, record, self)

    # -- setting up --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Place the models and start the current phase (idempotent)."""
        if self._prepared:
            return
        self.placement.prepare([lane.base for lane in self.setup.lanes], [self.student, self.teacher])
        self.student.train()
        set_gradient_checkpointing(self.student, self.config.model.gradient_checkpointing)
        self._prepared = True
        if not self.finished:
            self.begin_phase()

    def begin_phase(self) -> None:
        """Fresh optimiser(s) and, for an adversarial phase, a fresh discriminator (paper: new D every phase)."""
        phase = self.phase
        kind = self.config.stage.optimizer
        # the previous phase's optimisers and discriminator go before the new ones are built, not after
        self.optimizer = self.discriminator = self.disc_optimizer = None
        self.optimizer = make_optimizer(_trainable(self.student), phase, kind)
        self.scaler = self.placement.grad_scaler()
        if phase.adversarial:
            disc = self.setup.make_discriminator(phase.kind == distill.CONDITIONAL)
            set_discriminator_trainable(disc, self.config.discriminator.trainable)
            backbone = getattr(disc, "backbone", None)
            if backbone is not None and hasattr(backbone, "gradient_checkpointing"):
                backbone.gradient_checkpointing = bool(self.config.discriminator.gradient_checkpointing)
            self.placement.prepare([], [disc])
            disc.train()
            self.discriminator = disc
            self.disc_optimizer = make_optimizer(_trainable(disc), phase, kind)
            if self.keep_discriminators:
                self.discriminators[phase.kind] = disc

    # -- running -----------------------------------------------------------------------------------------

    def run_iteration(self) -> dict:
        """One iteration of the current phase; returns its log record (plain floats)."""
        phase = self.phase
        started = time.perf_counter()
        figures = train_iteration(
            self.stage, phase, self.lanes, self.student, self.teacher, self.optimizer,
            generator=self.data_generators(),
            clips=self.clips_for(phase), micro_batch=min(self.config.stage.micro_batch, self.clips_for(phase)),
            discriminator=self.discriminator, disc_optimizer=self.disc_optimizer, placement=self.placement,
            total_bases=self.total_bases, grad_clip=self.config.stage.grad_clip, scaler=self.scaler,
            sync_gradients=self.sync_gradients)
        if self.scaler is not None:
            self.scaler.update()
        # spent gradients would otherwise sit beside the weights until the next iteration's zero_grad
        for optimizer in (self.optimizer, self.disc_optimizer):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.iteration += 1
        record = {"stage": self.stage.name, "phase": phase.kind, "step": self.step - 1,
                  "iteration": self.iteration, **{k: float(v) for k, v in figures.items()},
                  "lr": phase.lr, "seconds": round(time.perf_counter() - started, 4),
                  "clips_drawn": self.iteration * self.clips_for(phase)}
        self.history.append(record)
        return record

    def end_phase(self) -> None:
        record = {"stage": self.stage.name, "phase": self.phase.kind, "iterations": self.step,
                  "iteration": self.iteration}
        self._emit("phase_end", record)
        self.phase_index += 1
        self.step = 0
        if not self.finished:
            self.begin_phase()

    def run(self, *, progress: Callable[[dict], None] | None = None) -> None:
        """Run (or continue) the stage to its end; saves state on a signal, an error and at the end."""
        self.prepare()
        snapshot, steps_before = None, 0.0
        try:
            while not self.finished:
                phase = self.phase
                while self.step < phase.iterations:
                    snapshot, steps_before = capture_rng(self.generator), self._optimizer_steps()
                    self._in_iteration = True
                    record = self.run_iteration()
                    self._in_iteration = False
                    self._after_iteration(record, progress)
                    if self.stop_requested:
                        self.save("signal")
                        raise Interrupted(f"stopped after iteration {self.iteration}; state saved")
                self.end_phase()
        except Interrupted:
            raise
        except BaseException as error:
            self._save_after_error(error, snapshot, steps_before)
            raise
        finally:
            set_gradient_checkpointing(self.student, False)
        self.student.eval()
        self.save("end")

    def _after_iteration(self, record: dict, progress) -> None:
        if self.run_dir is not None:
            self.run_dir.log(record)
        self._emit("iteration", record)
        if progress is not None:
            progress(record)
        every = self.config.validation.every
        if every and self.iteration % every == 0 and self.run_dir is not None:
            from .validation import validate

            result = validate(self)
            if result is not None:
                self._emit("validation", result)
        every = self.config.checkpoint.every
        if every and self.iteration % every == 0:
            self.save("every")

    def _optimizer_steps(self) -> float:
        """Adam steps taken so far by this phase's optimisers (tells whether an iteration changed weights)."""
        return sum(float(state["step"]) for o in (self.optimizer, self.disc_optimizer) if o is not None
                   for state in o.state.values() if "step" in state)

    def _save_after_error(self, error: BaseException, snapshot: dict | None, steps_before: float) -> None:
        """Save what is consistent when an error stops the run (out of memory, a failing hook, Ctrl-C twice).

        Between iterations the state is whole. Inside one, if no optimiser has stepped yet, the weights are
        still those after the last whole iteration: the random states are put back to where that iteration
        began and the state is saved as if it had never started. After a step (D updated, the student not
        yet) nothing consistent exists; the last checkpoint stays.
        """
        if self.run_dir is None:
            return
        if self._in_iteration:
            if self._optimizer_steps() != steps_before:
                log.error("the error came after an optimiser step of iteration %d; not saving half an iteration "
                          "(the last checkpoint stays)", self.iteration + 1)
                return
            restore_rng(snapshot, self.generator)
        try:
            path = self.save("error")
            log.error("saved the state after iteration %d to %s before stopping on the error", self.iteration, path)
        except Exception as save_error:  # the original error matters more
            log.error("could not save the state after the error: %s", save_error)

    def save(self, reason: str):
        if self.run_dir is None:
            return None
        path = self.run_dir.save_state(self)
        self.run_dir.save_student(self)
        self._emit("checkpoint", {"iteration": self.iteration, "reason": reason, "path": str(path)})
        return path


# --- in-memory stages (the toy demo, tests) ----------------------------------------------------------------

@dataclasses.dataclass
class StageResult:
    stage: Stage
    teacher: nn.Module  # frozen copy of the student at the start of the stage
    discriminators: dict[str, nn.Module]  # by phase kind, the last one of each kind
    history: list[dict]


def run_stage(stage: Stage, lanes: Sequence[Lane], student: nn.Module, *,
              make_discriminator: Callable[[bool], nn.Module] | None = None, clips: int = 16,
              generator: torch.Generator | None = None, teacher: nn.Module | None = None,
              callback: Callable[[dict], None] | None = None, config: Config | None = None) -> StageResult:
    """Train ``student`` in place over ``stage`` on every lane, in memory (no run folder), on the CPU.

    ``clips`` per lane per iteration unless the phase sets its own; no gradient clipping unless ``config``
    says so. ``callback`` gets each iteration's record (stage, phase, step, and ``mse`` or ``d``, ``g``,
    ``accuracy``, ``preference``).
    """
    if config is None:
        config = Config()
        config.run.device = "cpu"
        config.stage.grad_clip = 0.0
        config.stage.clips = clips
        config.stage.micro_batch = clips
        config.checkpoint.every = config.validation.every = 0
    setup = Setup(list(lanes), student, teacher, make_discriminator, None, None)
    trainer = Trainer(setup, config, stage=stage,
                      generator=generator if generator is not None else torch.Generator().manual_seed(0),
                      keep_discriminators=True)
    trainer.run(progress=callback)
    return StageResult(stage, trainer.teacher, trainer.discriminators, trainer.history)


def run_stages(stages: Sequence[Stage], lanes: Sequence[Lane], student: nn.Module, *,
               make_discriminator: Callable[[bool], nn.Module] | None = None, clips: int = 16,
               generator: torch.Generator | None = None,
               after_stage: Callable[[StageResult, nn.Module], None] | None = None,
               callback: Callable[[dict], None] | None = None) -> list[StageResult]:
    """Run ``stages`` in order; the student leaving a stage is (a frozen copy of) the next stage's teacher.

    ``after_stage(result, student)`` is the place to save a checkpoint.
    """
    distill.check_chain(stages)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    results = []
    for stage in stages:
        result = run_stage(stage, lanes, student, make_discriminator=make_discriminator, clips=clips,
                           generator=generator, callback=callback)
        results.append(result)
        if after_stage is not None:
            after_stage(result, student)
    return results


@contextlib.contextmanager
def pinned_threads(threads: int):
    """``torch.set_num_threads`` for the block (0: leave it); CPU results are bit-exact only at one count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
