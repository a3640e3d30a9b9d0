"""Memory-plan table: traced peak of one training iteration on the full-size model, per option and clip size.

Full-size model: SD1.5 UNet (859.5M, the shape-identical stand-in of ``training.sd15_standin`` unless run
with ComfyUI's UNet through ``python -m training estimate``), AnimateDiff v2 motion module (453.2M) as
student (fp32 masters) and frozen teacher, and in adversarial phases the flow-conditional D (UNet encoder +
middle block + down/mid motion modules + head). One resident base (``model.resident_bases=one``), one clip
per iteration, Adam, CUDA plan (context and allocator margin added by hand). Verdicts against 12/16/24/48/80
GB cards (GB = 10^9 bytes, as cards are sold).

The peer measurement: the same iteration at a small size is also run for real on the CPU (allocator events
from the profiler) and the ratio estimate / real peak printed.

    python benchmarks/bench_memory_plan.py [--sizes 256,384,512] [--frames 16]
    COMFYUI_PATH=... <ComfyUI python> benchmarks/bench_memory_plan.py --checkpoint SD15.safetensors \
        --motion-module MM.safetensors      # ComfyUI's own UNet, the teacher's header, the run's D
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import compute, memory  # noqa: E402

CARDS_GB = (12, 16, 24, 48, 80)
BASE = memory.PlanSettings(kind="sd15", bases=2, resident_bases="one", device="cuda", precision="bf16",
                           stage="8->4", clips=1, micro_batch=1)
# (label, phase kind traced, changes to BASE)
OPTIONS = [
    ("MSE 128->32 (CFG 7.5), bf16", "mse", {"stage": "128->32"}),
    ("MSE 128->32, bf16, student ckpt", "mse", {"stage": "128->32", "checkpointing": True}),
    ("adv. 8->4 cond. D full, bf16", "conditional", {}),
    ("adv. cond. D full, ckpt student+D", "conditional", {"checkpointing": True, "d_checkpointing": True}),
    ("adv. cond. D light, ckpt student+D", "conditional",
     {"checkpointing": True, "d_checkpointing": True, "d_trainable": "light"}),
    # what brings a stage towards 12-16 GB cards: 8-bit Adam (bitsandbytes) on top of the smallest options
    ("MSE 128->32, bf16, student ckpt, 8-bit Adam", "mse",
     {"stage": "128->32", "checkpointing": True, "optimizer": "adam8bit"}),
    ("adv. cond. D light, ckpt student+D, 8-bit Adam", "conditional",
     {"checkpointing": True, "d_checkpointing": True, "d_trainable": "light", "optimizer": "adam8bit"}),
]


def peer_ratio() -> tuple[float, int, int]:
    """Estimate / real CPU peak for the adversarial iteration at a small width and size."""
    spec = memory.StandIn(model_channels=32, channel_mult=(1, 2), heads=2, groups=8, context_dim=32, tokens=8,
                          motion_heads=2, attention_levels=(0,))
    settings = dataclasses.replace(BASE, device="cpu", precision="fp32")
    geometry = memory.Geometry(4, 16, 16)
    traced = memory.trace_iteration(*memory.plan_pieces(settings, geometry, "conditional", "cpu", spec))
    real = memory.measure_real_peak(*memory.plan_pieces(settings, geometry, "conditional", "cpu", spec))
    return traced.peak_bytes / real, traced.peak_bytes, real


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,384,512")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", help="an SD1.5 checkpoint: trace ComfyUI's UNet built from its header "
                        "(run in ComfyUI's Python with COMFYUI_PATH set); default the stand-in")
    parser.add_argument("--motion-module", help="the teacher (.safetensors) to trace with --checkpoint")
    parser.add_argument("--options", help="only the options whose label contains this text")
    parser.add_argument("--flops", action="store_true",
                        help="also count each option's FLOPs per iteration and estimate seconds on the cards of "
                             "training.compute.CARDS (an estimate from spec sheets, not a measurement)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = None
    if args.checkpoint:
        unet = memory.ComfyModels([args.checkpoint, args.checkpoint], args.motion_module)
    print("UNet traced:", "ComfyUI's, from " + args.checkpoint if unet else "the stand-in", flush=True)

    ratio, traced, real = peer_ratio()
    print(f"peer: adversarial iteration, stand-in at width 32, 4x128x128 on CPU: estimate {traced / 2**20:.1f} MiB, "
          f"real allocator peak {real / 2**20:.1f} MiB, ratio {ratio:.3f}", flush=True)

    header = "| option | size | traced GiB | + by hand GiB | peak GiB | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |"
    rows = [header, "|" + "---|" * (5 + len(CARDS_GB))]
    flop_rows: list[str] = []
    for size in (int(s) for s in args.sizes.split(",")):
        geometry = memory.Geometry.from_pixels(args.frames, size, size)
        for label, kind, changes in OPTIONS:
            if args.options and args.options not in label:
                continue
            settings = dataclasses.replace(BASE, **changes)
            start = time.perf_counter()
            plan = memory._plan(settings, geometry, free_bytes=None, device="cuda", unet=unet,
                                free_measured=False, phases=[kind])
            verdicts = " | ".join("fits" if plan.peak_bytes <= c * 1e9 else "–" for c in CARDS_GB)
            row = (f"| {label} | {geometry.label()} | {plan.traced_bytes / 2**30:.1f} | "
                   f"{(plan.peak_bytes - plan.traced_bytes) / 2**30:.1f} | {plan.peak_bytes / 2**30:.1f} | {verdicts} |")
            rows.append(row)
            print(row, f"  ({time.perf_counter() - start:.0f} s;",
                  ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan.breakdown.items()) + ")", flush=True)
            if args.flops:
                flops = memory.iteration_flops(settings, geometry, kind, "cuda", unet)
                seconds = " | ".join(f"{compute.seconds_on(flops, card):.1f}" for card in compute.CARDS)
                flop_rows.append(f"| {label} | {geometry.label()} | {flops / 1e12:.1f} | {seconds} |")
                print(flop_rows[-1], flush=True)
    print()
    print("\n".join(rows))
    if args.flops:
        print(f"\nestimated seconds per iteration at {compute.UTILIZATION:.0%} of the spec-sheet bf16 throughput "
              "(2 bases: each runs every iteration)")
        print("| option | size | TFLOP per iteration | " + " | ".join(
            f"{c.name} ({c.memory_gb} GB) s" for c in compute.CARDS) + " |")
        print("|" + "---|" * (3 + len(compute.CARDS)))
        print("\n".join(flop_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
