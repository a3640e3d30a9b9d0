"""One motion module forward: ours vs diffusers' AnimateDiffTransformer3D, same weights, same input.

Default case: C=320, 16 frames, 32x32, fp32, CPU, no autograd. Ours runs in
``across_frames`` GroupNorm mode so both compute the same function (checked before timing); the
``per_frame`` time is printed too. Runs alternate between the two (ABBA) to share machine noise; the
headline is the median over repeats of ours/diffusers for back-to-back pairs (target <= 0.9), printed with
the ratio of medians and of minima. On a shared machine use ``--threads 1`` for steadier numbers.

    python benchmarks/bench_motion_module.py [--channels 320] [--frames 16] [--size 32] [--clips 1]
                                             [--repeats 15] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning.checkpoints import original_key  # noqa: E402
from lightning.motion_module import TemporalTransformer  # noqa: E402


def build_pair(channels: int, seed: int = 0):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    torch.manual_seed(seed)
    theirs = AnimateDiffTransformer3D(num_attention_heads=8, attention_head_dim=channels // 8, in_channels=channels,
                                      norm_num_groups=32, activation_fn="geglu", attention_bias=False,
                                      double_self_attention=True, positional_embeddings="sinusoidal",
                                      num_positional_embeddings=32)
    with torch.no_grad():  # diffusers' default init is fine except that it is the same for every norm
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = TemporalTransformer(channels, norm_mode="across_frames", zero_init=False)
    weights = {original_key(k): v for k, v in theirs.state_dict().items() if not k.endswith("pos_embed.pe")}
    ours.load_state_dict(weights, strict=True)
    return ours.eval(), theirs.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--clips", type=int, default=1, help="clips per call (2 = cond and uncond)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ours, theirs = build_pair(args.channels)
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randn(args.clips * args.frames, args.channels, args.size, args.size, device=device)
    x += torch.linspace(-1, 1, x.shape[0], device=device).view(-1, 1, 1, 1)  # frames differ in mean

    runs = {
        "ours (across_frames)": lambda: ours(x, args.frames),
        "diffusers": lambda: theirs(x, num_frames=args.frames),
    }
    with torch.no_grad():
        reference = theirs(x, num_frames=args.frames)
        error = ((ours(x, args.frames) - reference).abs().max() / reference.abs().max()).item()
        times = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up
            run(), run()
        names = list(runs)
        for repeat in range(args.repeats):
            # ABBA order: neither side always runs first, so slow drifts of a shared machine cancel.
            for name in (names if repeat % 2 == 0 else names[::-1]):
                sync(device)
                start = time.perf_counter()
                runs[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
        ours.norm_mode = "per_frame"
        per_frame = []
        for _ in range(max(3, args.repeats // 3)):
            sync(device)
            start = time.perf_counter()
            ours(x, args.frames)
            sync(device)
            per_frame.append(time.perf_counter() - start)

    medians = {name: statistics.median(t) for name, t in times.items()}
    pair_ratios = [a / b for a, b in zip(times["ours (across_frames)"], times["diffusers"])]
    print(f"motion module forward, C={args.channels}, {args.frames} frames x {args.clips} clip(s), "
          f"{args.size}x{args.size}, fp32, {device}, threads={torch.get_num_threads()}, repeats={args.repeats}")
    print(f"max relative difference ours vs diffusers: {error:.2e}")
    for name, median in medians.items():
        print(f"  {name:24s} median {median * 1e3:9.1f} ms   (min {min(times[name]) * 1e3:.1f})")
    print(f"  {'ours (per_frame)':24s} median {statistics.median(per_frame) * 1e3:9.1f} ms")
    ratio = medians["ours (across_frames)"] / medians["diffusers"]
    best = min(times["ours (across_frames)"]) / min(times["diffusers"])
    print(f"ratio ours/diffusers: median of paired ratios {statistics.median(pair_ratios):.3f}   "
          f"ratio of medians {ratio:.3f}   ratio of minima {best:.3f}   (target <= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
