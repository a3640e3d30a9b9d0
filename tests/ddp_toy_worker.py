"""A tiny toy-world distillation driven through ``training.distributed``, for the DDP tests.

Run it alone (one process running every lane) or under ``torch.distributed.run`` (lanes spread over ranks);
it follows the trainer's contract: each lane's loss divided by the total lane passes over all ranks, the
trainables' gradients summed across ranks before every optimizer step, rank 0's initial trainables broadcast.
It writes, per rank, the final student and discriminator and a hash of every frozen base it holds.

    python tests/ddp_toy_worker.py OUT_DIR [--phases mse,conditional] [--iterations 3] [--bases 2] [--zero]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import distributed  # noqa: E402
from training._core import core  # noqa: E402

distill = core("distill")
world_mod = core("toy.world")
models = core("toy.models")
critic = core("toy.critic")
demo = core("toy.demo")


def tensor_hash(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_phase(args, phase: str, world, out: Path) -> dict:
    """Train a fresh student for ``args.iterations`` iterations of one phase; write it (and D) under ``out``."""
    wcfg = world_mod.WorldConfig(frames=4, size=4, motions=4, styles=max(2, args.bases))
    toy = world_mod.ToyWorld(wcfg)
    bases = models.make_bases(toy, range(args.bases), width=8, seed=args.seed)
    lanes = [distill.Lane(b, demo.data_source(toy, b.index), wcfg.frames) for b in bases]
    assignment = distributed.assign(len(lanes), world.world_size, world.rank)
    mine = distributed.select(lanes, assignment)
    generators = {lane.index: torch.Generator().manual_seed(distributed.lane_seed(args.seed, lane.index,
                                                                                   assignment.replica))
                  for lane in mine}

    # Different on every rank on purpose: the broadcast must make them equal.
    torch.manual_seed(args.seed + 1000 * world.rank)
    student = models.make_motion_module(8, heads=2)
    for p in student.parameters():  # the zero-initialised output would hide a missing broadcast
        p.data.add_(0.01 * torch.randn_like(p))
    distributed.broadcast_module(student, world)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in student.state_dict().items()}, out / f"initial_rank{world.rank}.pt")
    teacher = distill.frozen_copy(student)
    stage = distill.Stage(8, 4, (distill.Phase(phase, args.iterations, 1e-2, (0.9, 0.999)),))
    sync = distributed.GradientSync(world, assignment)
    params = distributed.trainable_parameters([student])
    opt = distributed.make_optimizer(params, torch.optim.Adam, world, shard_state=args.zero, lr=1e-2)
    disc = disc_opt = None
    adversarial = phase != distill.MSE
    conditional = phase == distill.CONDITIONAL
    if adversarial:
        disc = critic.toy_discriminator(conditional, base=bases[0], num_bases=len(lanes))
        distributed.broadcast_module(disc, world)
        disc_opt = distributed.make_optimizer(distributed.trainable_parameters([disc]), torch.optim.Adam, world,
                                              shard_state=args.zero, lr=1e-2, betas=(0.0, 0.99))
    scale = assignment.scale
    student_bytes = []
    started = time.perf_counter()
    for _ in range(args.iterations):
        pairs = [distill.draw_pair(stage, lane, teacher, args.clips, generators[lane.index]) for lane in mine]
        for pair, lane in zip(pairs, mine):
            pair.student = distill.student_jump(lane.base, student, pair)
        if adversarial:
            disc_opt.zero_grad(set_to_none=True)
            for pair in pairs:
                real = distill.discriminate(disc, pair, pair.teacher, conditional)
                fake = distill.discriminate(disc, pair, pair.student.detach(), conditional)
                (distill.discriminator_loss(real, fake) * scale).backward()
            sync(distributed.trainable_parameters([disc]), len(mine))
            disc_opt.step()
        opt.zero_grad(set_to_none=True)
        if adversarial:
            disc.requires_grad_(False)
        for pair in pairs:
            if adversarial:
                loss = distill.generator_loss(distill.discriminate(disc, pair, pair.student, conditional))
            else:
                loss = distill.mse_loss(pair.student, pair.teacher)
            (loss * scale).backward()
        if adversarial:
            disc.requires_grad_(True)
        sync(params, len(mine))
        if not student_bytes:  # the first update's summed gradient, before Adam
            torch.save({name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None},
                       out / f"grads_rank{world.rank}.pt")
        student_bytes.append(sync.bytes_last)
        opt.step()
    seconds = time.perf_counter() - started

    torch.save({k: v.clone() for k, v in student.state_dict().items()}, out / f"student_rank{world.rank}.pt")
    if disc is not None:
        torch.save({k: v.clone() for k, v in disc.state_dict().items()}, out / f"disc_rank{world.rank}.pt")
    fresh = models.make_bases(toy, range(args.bases), width=8, seed=args.seed)
    return {"rank": world.rank, "world_size": world.world_size, "bases": list(assignment.bases),
            "replicas_agree": distributed.replicas_agree(student, world), "student_sync_bytes": student_bytes,
            "gradient_bytes": sum(p.numel() * p.element_size() for p in params if p.grad is not None),
            "base_bytes": sum(t.numel() * t.element_size() for b in bases for t in b.state_dict().values()),
            "calls": sync.calls, "seconds": seconds, "iterations": args.iterations,
            "base_hashes": {str(b.index): tensor_hash(b) for b in bases},
            "fresh_hashes": {str(b.index): tensor_hash(b) for b in fresh},
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--phases", default="mse", help="comma-separated: mse, conditional, unconditional, "
                        "each optionally ':zero'; each trains a fresh student")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--bases", type=int, default=2)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    world, _ = distributed.init("cpu", timeout_s=60)
    for spec in args.phases.split(","):
        # "mse:zero" runs the MSE phase with a sharded optimizer state, written under "mse-zero";
        # "mse:bases=3" with three bases (uneven over two ranks), written under "mse-bases=3"
        phase, *options = spec.split(":")
        changes = {"zero": args.zero or "zero" in options}
        changes.update({k: int(v) for k, _, v in (o.partition("=") for o in options) if k == "bases"})
        out = args.out / spec.replace(":", "-")
        report = train_phase(argparse.Namespace(**{**vars(args), **changes}), phase, world, out)
        (out / f"report_rank{world.rank}.json").write_text(json.dumps(report))
    distributed.shutdown(world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
