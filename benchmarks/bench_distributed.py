"""The distillation stage on 1 process vs 2 CPU ranks (gloo), and what travels between the ranks.

Runs ``python -m training run`` on the toy world with two bases (one per rank under torchrun, both in the
single process), the conditional-D phase of the 8->4 stage, and reads each iteration's time and all-reduced
bytes from the run's log. Prints iterations per second for both and their ratio (ideal: 2x when each rank
has a core of its own, since each rank runs half the lanes), and checks that the bytes all-reduced per
iteration equal the gradients of the trainable parameters (the student's and the discriminator's), counted
independently here from one single-process iteration, with nothing of the frozen bases.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--iterations 12] [--clips 4] [--bases 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = """
[run]
name = "bench"
runs_dir = "{runs}"
seed = 0
device = "cpu"
threads = 1
[model]
kind = "toy"
bases = {bases}
[stage]
name = "8->4"
iterations = {iterations}
lr = 5e-4
clips = {clips}
micro_batch = {clips}
grad_clip = 1.0
[checkpoint]
every = 0
[validation]
every = 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: Path, run_dir: Path, ranks: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if ranks == 1:
        cmd = [sys.executable, "-m", "training", "run", str(config), "--run-dir", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "training", "run", str(config),
               "--run-dir", str(run_dir)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("phase") == "conditional" and "seconds" in r]


def expected_bytes(config_path: Path) -> dict:
    """Gradient bytes of one conditional-D iteration, counted in this process from the models themselves."""
    import torch

    from training import config as config_module
    from training.loop import Trainer
    from training.toy_setup import build

    config = config_module.load(config_path)
    torch.manual_seed(0)
    setup = build(config)
    trainer = Trainer(setup, config)
    trainer.prepare()
    trainer.run_iteration()

    def grad_bytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.grad is not None)

    def all_bytes(module):
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    return {"student": grad_bytes(trainer.student), "discriminator": grad_bytes(trainer.discriminator),
            "bases": sum(all_bytes(lane.base) for lane in setup.lanes),
            "base_grads": sum(grad_bytes(lane.base) for lane in setup.lanes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12, help="iterations of the conditional phase")
    parser.add_argument("--clips", type=int, default=4, help="clips per base per iteration")
    parser.add_argument("--bases", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="first iterations left out of the timing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "bench.toml"
        config.write_text(CONFIG.format(runs=tmp.as_posix(), bases=list(range(args.bases)),
                                        iterations=args.iterations, clips=args.clips))
        want = expected_bytes(config)
        single = run(config, tmp / "one", 1)
        double = run(config, tmp / "two", 2)

    def rate(records):
        seconds = [r["seconds"] for r in records[args.warmup:]]
        return 1.0 / statistics.median(seconds)

    one, two = rate(single), rate(double)
    sent = {r["allreduce_bytes"] for r in double}
    gradients = want["student"] + want["discriminator"]
    print(f"toy world, {args.bases} bases, {args.clips} clips per base, conditional-D iterations "
          f"(median of {len(single) - args.warmup})")
    print(f"  1 process : {one:6.2f} it/s")
    print(f"  2 ranks   : {two:6.2f} it/s   ratio {two / one:.2f}x (ideal 2x with a free core per rank)")
    print(f"  all-reduced per iteration: {sorted(sent)} bytes; trainable gradients: student {want['student']} "
          f"+ discriminator {want['discriminator']} = {gradients} bytes; frozen bases hold {want['bases']} bytes "
          f"(their gradients: {want['base_grads']})")
    assert sent == {gradients}, f"all-reduced {sent} bytes per iteration, expected exactly {gradients}"
    assert want["base_grads"] == 0
    print("  check: the all-reduce carries exactly the trainables' gradients, nothing of the bases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
