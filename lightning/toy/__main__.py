"""``python -m lightning.toy --seed S --out DIR``: the toy-world distillation demo and its MSE-only ablation (see :mod:`lightning.toy.demo`)."""

from __future__ import annotations

import argparse
import sys

import torch

from .demo import DemoConfig, run_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning.toy", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    parser.add_argument("--out", default="toy_demo", help="output folder (default ./toy_demo)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the toy's many tiny ops gain nothing from more, and a "
                             "second spinning thread slows everything down on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    run_demo(args.out, DemoConfig(seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
