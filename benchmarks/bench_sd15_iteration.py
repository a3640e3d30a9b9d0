"""Seconds per training iteration on SD1.5 lanes (ComfyUI's UNet), per phase kind, with every base resident
against one base at a time (``model.resident_bases = "one"``): what swapping bases costs.

Run by hand in ComfyUI's Python (SD1.5 lanes are built from ComfyUI's model code), with two SD1.5 checkpoints
and a motion module (random-weight fixtures are fine: time does not depend on the values)::

    OMP_NUM_THREADS=1 COMFYUI_PATH=... <ComfyUI python> benchmarks/bench_sd15_iteration.py \\
        --checkpoint a.safetensors --checkpoint b.safetensors --motion-module mm.safetensors

Defaults: 64x64 pixels, 8 frames, 1 clip per base, light discriminator, CPU, one untimed warm-up iteration per
phase then ``--iterations`` timed ones. Each (residency, stage) runs in its own process so that its peak RSS
is its own. The data are random latents and conditioning of the dataset's shapes (a synthetic latent cache).
On a CPU a "swapped" base is dropped and read again from the page cache for every lane, so the ratio is the
price of reading the weights; on a GPU it is the host-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = {"128->32": ("mse",), "8->4": ("conditional", "unconditional")}


def synthetic_dataset(folder: Path, checkpoints: list[str], *, frames: int, size: int, clips: int) -> None:
    import torch

    from training.dataset import CacheWriter, fingerprint_file

    bases = [(Path(c).name, fingerprint_file(c)) for c in checkpoints]
    g = torch.Generator().manual_seed(0)
    with CacheWriter(folder, frames=frames, width=size, height=size, bases=bases) as writer:
        for b in range(len(bases)):
            writer.set_uncond(b, torch.randn(77, 768, generator=g))
            for i in range(clips):
                writer.add_clip({"kind": "teacher", "base": b, "prompt": f"synthetic clip {i}", "seed": i}, b,
                                torch.randn(frames, 4, size // 8, size // 8, generator=g),
                                {b: torch.randn(77, 768, generator=g)})


def one(args) -> dict:
    """One (residency, stage) in this process: seconds of each timed iteration per phase, peak RSS."""
    from training import config as config_module
    from training import loop, sd15_setup

    config = config_module.Config()
    config.run.device = args.device
    config.run.threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    config.model.kind = "sd15"
    config.model.teacher = args.motion_module
    config.model.bases = list(args.checkpoint)
    config.model.resident_bases = args.resident
    config.stage.name = args.stage
    config.stage.iterations = args.iterations + 1
    config.stage.clips = config.stage.micro_batch = 1
    config.discriminator.trainable = args.discriminator
    config.data.dataset = args.dataset
    config.checkpoint.every = config.validation.every = 0
    started = time.perf_counter()
    setup = sd15_setup.build(config)
    trainer = loop.Trainer(setup, config)
    times: dict[str, list[float]] = {}
    with loop.pinned_threads(config.run.threads):
        trainer.prepare()
        while not trainer.finished:
            while trainer.step < trainer.phase.iterations:
                record = trainer.run_iteration()
                if record["step"] > 0:  # the first iteration of a phase reads weights and builds D: untimed
                    times.setdefault(record["phase"], []).append(record["seconds"])
            trainer.end_phase()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"resident": args.resident, "stage": args.stage, "seconds": times, "peak_rss_bytes": peak,
            "loads": trainer.placement.moves, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="an SD1.5 checkpoint (give two)")
    parser.add_argument("--motion-module", required=True)
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations per phase")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--discriminator", default="light", choices=("light", "full"))
    parser.add_argument("--stages", default="128->32,8->4")
    parser.add_argument("--dataset", help="a latent cache for these checkpoints (default: a synthetic one)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resident", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="128->32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if not args.dataset:
            args.dataset = str(Path(tmp) / "dataset")
            synthetic_dataset(Path(args.dataset), args.checkpoint, frames=args.frames, size=args.size, clips=2)
        results = {}
        for stage in args.stages.split(","):
            for resident in ("all", "one"):
                command = [sys.executable, __file__, "--one", "--resident", resident, "--stage", stage,
                           "--motion-module", args.motion_module, "--iterations", str(args.iterations),
                           "--device", args.device, "--discriminator", args.discriminator,
                           "--dataset", args.dataset, *[a for c in args.checkpoint for a in ("--checkpoint", c)]]
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{stage} resident={resident} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                results[(stage, resident)] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(results[(stage, resident)]), flush=True)
    print(f"\n{len(args.checkpoint)} bases, {args.size}x{args.size}x{args.frames}, 1 clip per base, "
          f"{args.device}, discriminator {args.discriminator}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'stage':8} {'phase':14} {'resident s/it':>14} {'swapped s/it':>13} {'swapped/resident':>17} "
          f"{'peak RSS all / one (GB)':>24}")
    for stage in args.stages.split(","):
        both, swapped = results[(stage, "all")], results[(stage, "one")]
        for phase in STAGES[stage]:
            a = sum(both["seconds"][phase]) / len(both["seconds"][phase])
            s = sum(swapped["seconds"][phase]) / len(swapped["seconds"][phase])
            print(f"{stage:8} {phase:14} {a:14.1f} {s:13.1f} {s / a:17.2f} "
                  f"{both['peak_rss_bytes'] / 1e9:11.1f} / {swapped['peak_rss_bytes'] / 1e9:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
