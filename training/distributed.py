"""A distillation stage across ranks under torchrun: one frozen base per rank, one shared motion module.

AnimateDiff-Lightning (arXiv 2403.12706, §3.2 and Table 1) put a different frozen image base on each of 8 GPU
ranks of a machine, replicated the same assignment on every machine (64 A100s), and let a modified DDP
synchronise only the motion module, so that the frozen bases were never overwritten by rank 0's copy. This
module does the same with ``torch.distributed``:

- **Bases to ranks** (:func:`assign`). With as many ranks as bases, rank ``r`` runs base ``r``. With fewer
  ranks, each rank runs every ``world_size``-th base and accumulates their gradients. With more ranks, the
  assignment repeats (rank ``r`` runs base ``r % num_bases``): each repeat is a *replica* with its own data
  stream, which is what running the same assignment on another machine means.
- **Gradients** (:class:`GradientSync`): a manual all-reduce (SUM) of the trainable parameters' gradients only,
  flattened into buckets. The trainer divides every lane's loss by the number of lane passes over all ranks
  (:attr:`Assignment.total`), so the sum is the mean over all bases: the same update as one process
  accumulating every base. Why not ``DistributedDataParallel`` over the trainables: the student is not called
  as a module but plugged into the frozen base, which calls its blocks from inside its own forward, so a DDP
  wrapper's forward would never run and its reducer would never be armed; the adversarial iteration also runs
  the discriminator several times per backward (real, fake) and backpropagates the generator loss through a
  discriminator whose parameters are switched off, and ranks may run different numbers of lanes. DDP copes
  with some of this only through ``no_sync``, dummy backward passes, ``static_graph`` or private ignore lists.
  A flat all-reduce after backward gives identical numbers (checked against DDP) with none of those rules;
  what it gives up is overlapping communication with the backward pass, a small cost next to a video UNet's
  backward (see the README's scaling notes).
- **Initial weights**: rank 0's copy of a trainable model is broadcast (:func:`broadcast_module`) whenever one
  is created (the student at start, each phase's fresh discriminator). Frozen bases are never registered,
  broadcast or all-reduced: each rank keeps the checkpoint it loaded.
- **State**: rank 0 writes checkpoints; every rank's RNG states and data positions are gathered first
  (:func:`gather`) so that a resume on the same number of ranks is exact. On a different number of ranks the
  bases are reassigned and the data streams regrouped, which is a correct but not bit-exact continuation.
- **Failures**: collectives time out (``timeout_s``), a rank that raises prints its rank before exiting, and
  torchrun's own report names the rank that died; ``--max-restarts`` restarts resume from the run folder.

``python -m training run/resume`` always trains through :func:`make_trainer` (``DistributedTrainer``, a
``training.loop.Trainer`` using the loop's hooks ``data_generators``, ``sync_gradients``, ``extra_state`` /
``restore_extra_state``), in one process as ``World()``: so one GPU and N ranks compute the same updates from
the same config (to float rounding of the summation order).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._core import core

errors = core("errors")

DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this means a peer is gone or hung
DEFAULT_BUCKET_MB = 64.0  # flat all-reduce buckets: bounds the extra copy of the gradients
STATE_KEY = "distributed"  # key of the per-rank states inside a training state


# --- the world ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: rank, number of ranks, the GPU index on its machine, the backend.

    ``World()`` is the single process (no process group); everything in this module is a no-op there.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    restart: int = 0  # torchrun's restart count (``--max-restarts``); > 0: resume from the run folder

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.distributed:
            return "single process"
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}, {self.backend})"


def launched_by_torchrun(environ=None) -> bool:
    """True in a worker started by ``torchrun`` (or ``torch.distributed.run``), which sets these variables."""
    environ = os.environ if environ is None else environ
    return all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _env_int(environ, name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise errors.InvalidInputError(f"torchrun variable {name} is missing; launch with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise errors.InvalidInputError(f"torchrun variable {name}={value!r} is not an integer") from None


def device_for(requested: str, local_rank: int, local_world_size: int) -> str:
    """The device a rank trains on, from the config's ``run.device``.

    ``auto``/``cuda`` pick GPU ``LOCAL_RANK`` (torchrun starts one process per GPU); an explicit ``cuda:N``
    is only allowed with one process per machine, since several ranks on one GPU would fight for its memory.
    """
    requested = (requested or "auto").strip().lower()
    if requested == "cpu":
        return "cpu"
    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise errors.InvalidInputError(
                    f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                    "start at most that many processes per node (torchrun --nproc-per-node)")
            return f"cuda:{local_rank}"
        if requested == "cuda":
            raise errors.InvalidInputError("run.device = 'cuda' but no GPU is visible to this process")
        return "cpu"
    if requested.startswith("cuda:"):
        if local_world_size > 1:
            raise errors.InvalidInputError(
                f"run.device = {requested!r} would put all {local_world_size} ranks of this machine on one GPU; "
                "use 'auto' (rank i uses GPU i) or start one process per node")
        return requested
    raise errors.InvalidInputError(f"run.device must be auto, cpu, cuda or cuda:N, got {requested!r}")


def init(requested_device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S, environ=None
         ) -> tuple[World, str]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); returns the world and this rank's device.

    Outside torchrun it returns the single-process ``World()`` and the requested device unchanged, so the same
    code path runs on one GPU. Idempotent: a second call returns the existing group's world.
    """
    environ = os.environ if environ is None else environ
    if not launched_by_torchrun(environ):
        return World(), requested_device
    rank, world_size = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    local_rank = _env_int(environ, "LOCAL_RANK")
    local_world_size = _env_int(environ, "LOCAL_WORLD_SIZE", world_size)
    restart = _env_int(environ, "TORCHELASTIC_RESTART_COUNT", 0)
    device = device_for(requested_device, local_rank, local_world_size)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s))
        kwargs: dict[str, Any] = {"timeout": timeout}
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
            kwargs["device_id"] = torch.device(device)  # binds the communicator to this rank's GPU up front
        # torchrun keeps one key-value store (same MASTER_PORT) across --max-restarts restarts, so a restarted
        # generation could read the previous one's connection addresses: gloo then connects to a dead rank
        # (seen here as "connection refused" or a hang on every other restart). A per-attempt prefix keeps
        # each generation's keys apart.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        store = dist.PrefixStore(f"adlightning/attempt{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)
    return World(rank, world_size, local_rank, local_world_size, dist.get_backend(), restart), device


def shutdown(world: World) -> None:
    """Leave the process group (after a barrier, so no rank tears down while another still talks to it)."""
    if world.distributed and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort(world: World, exc: BaseException, stream=None) -> None:
    """Report a failure with the rank it happened on; torchrun then stops the other ranks."""
    if not world.distributed:
        return  # one process: the error itself is the report
    stream = sys.stderr if stream is None else stream
    where = world.describe()
    print(f"[{where}] stopped by {type(exc).__name__}: {exc}", file=stream, flush=True)
    print(f"[{where}] the last checkpoint in the run folder resumes this run "
          "(python -m training resume RUN_DIR, under the same torchrun command)", file=stream, flush=True)


# --- bases to ranks --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Assignment:
    """Which lanes (bases) a rank runs, which data replica it draws, and the loss divisor."""

    num_bases: int
    world_size: int
    rank: int
    bases: tuple[int, ...]  # lane indices run on this rank, in order
    replica: int  # 0 on the first copy of the assignment; a rank's data streams differ per replica
    total: int  # lane passes per iteration over all ranks: every lane loss is divided by this

    @property
    def scale(self) -> float:
        return 1.0 / self.total


def _bases_of(rank: int, num_bases: int, world_size: int) -> tuple[tuple[int, ...], int]:
    if world_size <= num_bases:
        return tuple(range(rank, num_bases, world_size)), 0
    return (rank % num_bases,), rank // num_bases


def assign(num_bases: int, world_size: int, rank: int) -> Assignment:
    """The paper's Table 1 generalised: base ``i`` on rank ``i``; fewer ranks accumulate, more ranks replicate.

    With ``world_size <= num_bases`` rank ``r`` runs bases ``r, r + W, r + 2W, ...`` (an uneven split when W
    does not divide the count: the loss divisor keeps every base's weight equal). With more ranks, rank ``r``
    runs base ``r % num_bases`` as replica ``r // num_bases``; when ``world_size`` is not a multiple of the
    base count some bases get one replica more and so weigh more (warned).
    """
    if not isinstance(num_bases, int) or num_bases < 1:
        raise errors.InvalidInputError(f"a distributed run needs at least one base, got {num_bases!r}")
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise errors.InvalidInputError(f"rank {rank!r} of world size {world_size!r} is not a valid rank")
    bases, replica = _bases_of(rank, num_bases, world_size)
    total = max(num_bases, world_size)
    if world_size > num_bases and world_size % num_bases:
        warnings.warn(f"{world_size} ranks over {num_bases} bases: bases 0..{world_size % num_bases - 1} get one "
                      "replica more than the others and so weigh more in each update; use a multiple of "
                      f"{num_bases} ranks for equal weights", stacklevel=2)
    return Assignment(num_bases, world_size, rank, bases, replica, total)


def assignment_table(num_bases: int, world_size: int) -> list[dict]:
    """One row per rank: ``{"rank", "bases", "replica"}`` (printed at start and saved in the run folder)."""
    rows = []
    for r in range(world_size):
        bases, replica = _bases_of(r, num_bases, world_size)
        rows.append({"rank": r, "bases": list(bases), "replica": replica})
    return rows


def lane_seed(seed: int, lane: int, replica: int = 0) -> int:
    """Seed of a lane's data generator: depends on the lane and replica only, never on which rank runs it.

    So one process running every lane draws exactly what the ranks draw between them (replica 0), and each
    replica beyond the first gets a stream of its own.
    """
    # A fixed odd multiplier spreads lanes/replicas apart; the result stays a valid 63-bit seed.
    return (int(seed) + 1_000_003 * int(lane) + 998_244_353 * int(replica)) % (2 ** 63 - 1)


def select(items: Sequence, assignment: Assignment) -> list:
    """The entries of a per-base list (lanes, validation conds) that this rank runs, in lane order."""
    if len(items) != assignment.num_bases:
        raise errors.InvalidInputError(
            f"{len(items)} lanes but the assignment was made for {assignment.num_bases} bases")
    return [items[i] for i in assignment.bases]


# --- trainables only: broadcast and gradient all-reduce -------------------------------------------------

def trainable_parameters(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """Parameters that require gradients, in registration order, without duplicates (shared weights once)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype) into runs of at most ``bucket_bytes`` (or one tensor)."""
    groups: dict[tuple, list[list[int]]] = {}
    sizes: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and sizes.get(key, 0) + nbytes > bucket_bytes:
            runs.append([])
            sizes[key] = 0
        runs[-1].append(i)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [run for runs in groups.values() for run in runs if run]


def _reduce_flat(tensors: list[torch.Tensor], op, bucket_bytes: int) -> int:
    """In-place collective over ``tensors`` through flat buckets; returns the bytes sent into the collective."""
    sent = 0
    for run in _buckets(tensors, bucket_bytes):
        if len(run) == 1 and tensors[run[0]].is_contiguous():
            flat = tensors[run[0]]
            op(flat)
        else:
            flat = torch.cat([tensors[i].reshape(-1) for i in run])
            op(flat)
            offset = 0
            for i in run:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
                offset += n
        sent += flat.numel() * flat.element_size()
    return sent


def broadcast_module(module: nn.Module | None, world: World, *, src: int = 0,
                     bucket_mb: float = DEFAULT_BUCKET_MB) -> int:
    """Give every rank rank ``src``'s copy of a trainable model (student, discriminator); returns bytes sent.

    The whole model, parameters and buffers: with ``discriminator.trainable = "light"`` part of D is frozen,
    and a builder may initialise it from the base it has at hand, which differs per rank; D must still be one
    model. Never called on a frozen base.
    """
    if module is None or not world.distributed or world.world_size == 1:
        return 0
    tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
    return _reduce_flat(tensors, lambda t: dist.broadcast(t, src=src), int(bucket_mb * 2 ** 20))


class GradientSync:
    """``sync(params, bases_here)``: sum the trainables' gradients over ranks, in place.

    The trainer has already divided each lane's loss by :attr:`Assignment.total`, so the SUM is the mean over
    every lane of every rank. A parameter without a gradient on some rank (its lanes never reached it) counts
    as zeros there; one without a gradient on every rank stays ``None``, as it would in one process, so Adam
    skips it the same way. ``bases_here`` (lanes this rank ran since the last step) is summed with those flags
    and checked against the expected total, which catches a trainer that scaled its losses for a different
    split. Counters: ``bytes_last`` (gradient bytes of the last call), ``bytes_total``, ``calls``.
    """

    def __init__(self, world: World, assignment: Assignment | None = None, *,
                 bucket_mb: float = DEFAULT_BUCKET_MB):
        self.world = world
        self.assignment = assignment
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.bytes_last = 0
        self.bytes_total = 0
        self.meta_bytes_last = 0
        self.calls = 0

    def __call__(self, params: Iterable[torch.Tensor], bases_here: int) -> None:
        if not self.world.distributed or self.world.world_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        # flags[i] = 1 if this rank has a gradient for params[i]; the last entry carries bases_here.
        meta = torch.tensor([p.grad is not None for p in params] + [int(bases_here)], dtype=torch.int64,
                            device=_meta_device(self.world))  # NCCL reduces device tensors only
        dist.all_reduce(meta)
        flags, lanes = meta[:-1].tolist(), int(meta[-1])
        self.meta_bytes_last = meta.numel() * meta.element_size()
        if self.assignment is not None and lanes != self.assignment.total:
            raise errors.InvalidInputError(
                f"ranks ran {lanes} lane passes since the last step but the losses were scaled for "
                f"{self.assignment.total}: every rank must run all of its assigned lanes every iteration")
        grads = []
        for p, anywhere in zip(params, flags):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        sent = _reduce_flat(grads, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM), self.bucket_bytes)
        self.bytes_last = sent
        self.bytes_total += sent
        self.calls += 1


def _meta_device(world: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def replicas_agree(module: nn.Module, world: World) -> bool:
    """True when every rank holds bit-identical trainable parameters (a cheap check for tests and debugging)."""
    if not world.distributed:
        return True
    mine = [p.detach().reshape(-1).to(torch.float64) for p in module.parameters() if p.requires_grad]
    if not mine:
        return True
    flat = torch.cat(mine)
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


# --- optimizers -----------------------------------------------------------------------------------------

def make_optimizer(params: list[nn.Parameter], optimizer_class, world: World, *, shard_state: bool = False,
                   **kwargs) -> torch.optim.Optimizer:
    """``optimizer_class(params, **kwargs)``, or with ``shard_state`` a ``ZeroRedundancyOptimizer`` of it.

    ZeRO (stage 1) keeps each parameter's optimizer state on one rank only (Adam: 2x the trainable bytes
    divided over the ranks), at the price of a broadcast of the updated parameters after every step. Its
    update is the same Adam update on the same summed gradients; its checkpoint needs a collective
    (:func:`optimizer_state_dict`).
    """
    if shard_state and world.distributed and world.world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **kwargs)
    return optimizer_class(params, **kwargs)


def optimizer_state_dict(optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """The full optimizer state on rank 0 (None elsewhere). Every rank must call it for a sharded optimizer."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if world.is_main else None
    return optimizer.state_dict()


# --- per-rank state for checkpoints ----------------------------------------------------------------------

def gather(obj: Any, world: World) -> list:
    """Every rank's ``obj`` (picklable; e.g. RNG states as lists of ints), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the run folder chosen by rank 0, for instance)."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def world_record(world: World, assignment: Assignment) -> dict:
    """What a checkpoint records about the world it was saved in (to tell an exact resume from a regrouped one)."""
    return {"world_size": world.world_size, "num_bases": assignment.num_bases,
            "assignment": assignment_table(assignment.num_bases, world.world_size)}


def resume_is_exact(saved: dict | None, world: World, assignment: Assignment) -> bool:
    """True when a state saved with ``saved = world_record(...)`` resumes bit for bit here."""
    if saved is None:
        return not world.distributed or world.world_size == 1
    return saved.get("world_size") == world.world_size and saved.get("num_bases") == assignment.num_bases


def write_world_file(run_dir: Path, world: World, assignment: Assignment) -> None:
    """Rank 0 writes ``distributed.json`` in the run folder: the world and which rank ran which base."""
    if not world.is_main:
        return
    files = core("files")
    record = world_record(world, assignment) | {
        "backend": world.backend, "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "restart": world.restart}
    with files.atomic_output(Path(run_dir) / "distributed.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")


# --- the trainer on one rank ----------------------------------------------------------------------------

def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when ``flag`` is true on at least one (all ranks stop at the same iteration)."""
    if not world.distributed:
        return bool(flag)
    box = torch.tensor([1 if flag else 0], device=_meta_device(world))
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def make_trainer(setup, config, *, world: World | None = None, run_dir=None, hooks=(), placement=None):
    """The stage runner for this rank: ``training.loop.Trainer`` with the lanes, generators, all-reduce and
    checkpoint gathering of :class:`DistributedTrainer` (which is also what one process runs, so the same
    config computes the same thing on one GPU and on many)."""
    return trainer_class()(setup, config, world=world or World(), run_dir=run_dir, hooks=hooks,
                           placement=placement)


def __getattr__(name: str):
    if name == "DistributedTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TRAINER_CLASS = None


def trainer_class():
    """:class:`DistributedTrainer`, defined on first use so that importing this module does not import the
    loop (and with it every model dependency)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        from .loop import Trainer

        _TRAINER_CLASS = _define_trainer(Trainer)
    return _TRAINER_CLASS


def _define_trainer(Trainer):  # noqa: N803 - the base class
    class DistributedTrainer(Trainer):
        """``Trainer`` on one rank of a torchrun job (or alone: ``World()``), through the loop's own hooks.

        - lanes: :func:`assign` (replicas beyond the base count), loss divisor :attr:`Assignment.total`;
        - data: one generator per lane, seeded by :func:`lane_seed` (lane, replica), via ``data_generators``;
        - ``sync_gradients``: :class:`GradientSync` over the trainables the loop passes (student, D);
        - rank 0's student and each fresh discriminator are broadcast when placed; frozen bases are only
          placed, on their own rank;
        - ``save`` gathers every rank's RNG states and data positions first (a collective: every rank calls it),
          then rank 0 writes them through ``extra_state``; ``restore_extra_state`` gives each rank its own back;
        - a stop request (SIGINT/SIGTERM) on any rank stops every rank after the same iteration;
        - after an error no rank saves (a peer may be gone; the collective would hang): the last checkpoint stays.
        """

        def __init__(self, setup, config, *, world: World, run_dir=None, hooks=(), placement=None):
            if placement is None:
                from .placement import Placement, resolve_device

                placement = Placement(resolve_device(config.run.device), config.run.precision,
                                      config.model.resident_bases)
            super().__init__(setup, config, run_dir=run_dir, hooks=hooks, placement=placement, rank=world.rank,
                             world_size=world.world_size)
            self.world = world
            self.assignment = assign(len(setup.lanes), world.world_size, world.rank)
            self.lanes = select(setup.lanes, self.assignment)
            self.total_bases = self.assignment.total
            self.generators = {lane.index: torch.Generator().manual_seed(
                lane_seed(config.run.seed, lane.index, self.assignment.replica)) for lane in self.lanes}
            dist_config = getattr(config, "distributed", None)
            self.shard_optimizer = bool(getattr(dist_config, "shard_optimizer", False))
            self.gradient_sync = GradientSync(world, self.assignment,
                                              bucket_mb=getattr(dist_config, "bucket_mb", DEFAULT_BUCKET_MB))
            self._gathered: list | None = None

        # -- the loop's hooks ----------------------------------------------------------------------------------

        def data_generators(self):
            return self.generators

        def sync_gradients(self, params, bases_here: int) -> None:
            self.gradient_sync(params, bases_here)

        def prepare(self) -> None:
            if self._prepared:
                return
            full = self.setup
            # place only this rank's bases (the others stay where the builder left them, never on this device)
            self.setup = dataclasses.replace(full, lanes=list({id(lane): lane for lane in self.lanes}.values()))
            try:
                super().prepare()
            finally:
                self.setup = full
            if broadcast_module(self.student, self.world) and self.owns_teacher:
                self.teacher.load_state_dict(self.student.state_dict())  # the stage's teacher is rank 0's student too

        def begin_phase(self) -> None:
            super().begin_phase()
            broadcast_module(self.discriminator, self.world)
            if self.shard_optimizer and self.world.distributed:
                from torch.distributed.optim import ZeroRedundancyOptimizer

                def shard(optimizer):
                    if optimizer is None or isinstance(optimizer, ZeroRedundancyOptimizer):
                        return optimizer
                    group = optimizer.param_groups[0]
                    kwargs = {k: v for k, v in group.items() if k != "params"}
                    return ZeroRedundancyOptimizer(group["params"], optimizer_class=type(optimizer), **kwargs)

                self.optimizer = shard(self.optimizer)
                self.disc_optimizer = shard(self.disc_optimizer)

        def run_iteration(self) -> dict:
            # where each lane's stream stood when the iteration began (an error inside it puts them back)
            self._lane_snapshot = {index: g.get_state() for index, g in self.generators.items()}
            sent_before = self.gradient_sync.bytes_total
            record = super().run_iteration()
            if self.world.distributed:
                record["allreduce_bytes"] = self.gradient_sync.bytes_total - sent_before  # gradients only
                # loss figures of this rank's lanes -> over all ranks (the losses are already divided by the total)
                summed = [k for k in ("mse", "d", "g") if k in record]
                averaged = [k for k in ("accuracy", "preference") if k in record]
                weight = len(self.lanes) / self.total_bases
                values = torch.tensor([record[k] for k in summed] + [record[k] * weight for k in averaged],
                                      dtype=torch.float64, device=_meta_device(self.world))
                if values.numel():
                    dist.all_reduce(values)
                    for k, v in zip(summed + averaged, values.tolist()):
                        record[k] = v
            return record

        def _after_iteration(self, record: dict, progress) -> None:
            super()._after_iteration(record, progress)
            self.stop_requested = any_rank(self.stop_requested, self.world)

        def _save_after_error(self, error, snapshot, steps_before) -> None:
            if self.world.distributed:
                return  # a dead or failed peer would hang the gather; the last periodic checkpoint resumes
            if getattr(self, "_in_iteration", False) and getattr(self, "_lane_snapshot", None):
                for index, state in self._lane_snapshot.items():
                    self.generators[index].set_state(state)
            super()._save_after_error(error, snapshot, steps_before)

        def save(self, reason: str):
            self._gathered = gather(self._rank_state(), self.world)
            for optimizer in (self.optimizer, self.disc_optimizer):
                if optimizer is not None and hasattr(optimizer, "consolidate_state_dict"):
                    optimizer.consolidate_state_dict(to=0)  # ZeRO: the whole state on rank 0 for the file
            try:
                return super().save(reason)
            finally:
                self._gathered = None

        # -- state -----------------------------------------------------------------------------------------------

        def _rank_state(self) -> dict:
            from .loop import capture_rng

            rng = capture_rng(self.generator)
            numpy_state = dict(rng["numpy"])
            numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
            return {"rank": self.world.rank, "replica": self.assignment.replica,
                    "torch": rng["torch"], "cuda": list(rng.get("cuda", [])),
                    "python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]], "numpy": numpy_state,
                    "data": {str(index): g.get_state() for index, g in self.generators.items()}}

        def extra_state(self) -> tuple[dict, dict]:
            """Tensors and metadata the run folder adds to a state file (rank 0, after :meth:`save` gathered)."""
            ranks = self._gathered if self._gathered is not None else [self._rank_state()]
            tensors: dict[str, torch.Tensor] = {}
            meta_ranks = []
            for state in ranks:
                r = state["rank"]
                tensors[f"{STATE_KEY}.rank{r}.torch"] = state["torch"]
                for i, cuda in enumerate(state["cuda"]):
                    tensors[f"{STATE_KEY}.rank{r}.cuda.{i}"] = cuda
                for index, data in state["data"].items():
                    tensors[f"{STATE_KEY}.data.{index}.{state['replica']}"] = data
                meta_ranks.append({"rank": r, "python": state["python"], "numpy": state["numpy"]})
            record = world_record(self.world, self.assignment) | {"ranks": meta_ranks}
            return tensors, {STATE_KEY: record}

        def restore_extra_state(self, tensors: dict, meta: dict) -> None:
            import random

            import numpy as np

            saved = meta.get(STATE_KEY)
            if saved is None:
                return  # a state without per-lane streams: the lanes keep their fresh seeds
            exact = resume_is_exact(saved, self.world, self.assignment)
            missing = []
            for index, g in self.generators.items():
                key = f"{STATE_KEY}.data.{index}.{self.assignment.replica}"
                if key in tensors:
                    g.set_state(tensors[key])
                else:
                    missing.append(index)
            if exact:
                r = self.world.rank
                torch.set_rng_state(tensors[f"{STATE_KEY}.rank{r}.torch"])
                cuda = sorted(k for k in tensors if k.startswith(f"{STATE_KEY}.rank{r}.cuda."))
                if cuda and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
                mine = next(s for s in saved["ranks"] if s["rank"] == r)
                py = mine["python"]
                random.setstate((py[0], tuple(py[1]), py[2]))
                numpy_state = dict(mine["numpy"])
                numpy_state["state"] = {**numpy_state["state"],
                                        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
                np.random.set_state(numpy_state)
            elif self.world.is_main:
                warnings.warn(
                    f"resuming a state saved on {saved.get('world_size')} rank(s) on {self.world.world_size}: bases are "
                    "reassigned and data streams regrouped, so the run continues correctly but not bit for bit"
                    + (f"; lanes {missing} start fresh data streams" if missing else ""), stacklevel=2)

    DistributedTrainer.__qualname__ = "DistributedTrainer"
    return DistributedTrainer


# --- the run folder under torchrun ----------------------------------------------------------------------

def agree(world: World, decide):
    """Rank 0 runs ``decide()``; every rank gets its result, or raises the error rank 0 got (no rank hangs)."""
    outcome = None
    if world.is_main:
        try:
            outcome = ("ok", decide())
        except Exception as error:  # shipped to every rank, re-raised there
            outcome = ("error", error)
    kind, value = broadcast_object(outcome, world)
    if kind == "error":
        raise value
    return value


def restarted_run(world: World, config, run_dir_arg) -> Path | None:
    """After a torchrun restart (``--max-restarts``): the run folder this job was writing, or None.

    ``--run-dir`` names it; without it, the newest ``<runs_dir>/<name>-*`` whose ``distributed.json`` has this
    job's ``TORCHELASTIC_RUN_ID`` (torchrun keeps the id across restarts; pass ``--rdzv-id`` to make it unique).
    """
    if world.restart == 0:
        return None
    if run_dir_arg:
        path = Path(run_dir_arg)
        return path if (path / "config.toml").is_file() else None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    candidates = []
    for path in Path(config.run.runs_dir).glob(f"{config.run.name}-*"):
        marker = path / "distributed.json"
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if record.get("run_id") == run_id and (path / "config.toml").is_file():
            candidates.append((marker.stat().st_mtime, path))
    return max(candidates)[1] if candidates else None
