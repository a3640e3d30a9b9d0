"""Sampler overhead: time our few-step sampler spends outside the denoiser, per step.

Reported as a fraction of one step of a small conv denoiser, next to the same figure for diffusers'
EulerDiscreteScheduler loop (the peer) measured in the same run on the same denoiser.

    python benchmarks/bench_sampler_overhead.py [--steps 4] [--frames 16] [--size 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning import sampling, schedule  # noqa: E402


class TimedConvDenoiser(torch.nn.Module):
    """A small conv net standing in for a UNet; it keeps a tally of the time spent inside it."""

    def __init__(self, channels=64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 4, 3, padding=1))
        self.inside = 0.0

    @torch.no_grad()
    def forward(self, x_in, t, cond=None):
        start = time.perf_counter()
        out = self.net(x_in) * (t.reshape(-1, 1, 1, 1).to(x_in.dtype) / 1000.0)
        self.inside += time.perf_counter() - start
        return out


def ours(den, noise, steps):
    sig = schedule.sigmas(steps)
    return sampling.sample(den, noise, sig)


def diffusers_loop(den, noise, steps, sched):
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        eps = den(x_in, t.reshape(1).expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return x


def measure(run, den, steps, repeats):
    overheads, inner = [], []
    for _ in range(repeats):
        den.inside = 0.0
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
        overheads.append((total - den.inside) / steps)
        inner.append(den.inside / steps)
    return statistics.median(overheads), statistics.median(inner)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    den = TimedConvDenoiser()
    noise = torch.randn(args.frames, 4, args.size, args.size)
    rows = [("ours", lambda: ours(den, noise, args.steps))]
    try:
        import diffusers

        sched = diffusers.EulerDiscreteScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="trailing")
        rows.append(("diffusers Euler", lambda: diffusers_loop(den, noise, args.steps, sched)))
    except ImportError:
        print("diffusers not installed: no peer measured")
    for _, run in rows:  # warm up
        run()
    print(f"{args.steps} steps, latent [{args.frames}, 4, {args.size}, {args.size}], "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    results = {}
    for name, run in rows:
        over, step = measure(run, den, args.steps, args.repeats)
        results[name] = over
        print(f"{name:16s} overhead/step {over * 1e6:9.1f} us   denoiser/step {step * 1e3:8.2f} ms   "
              f"overhead fraction {over / step:.4%}")
    if len(results) == 2:
        print(f"ratio ours/diffusers overhead: {results['ours'] / results['diffusers Euler']:.3f}")


if __name__ == "__main__":
    main()
