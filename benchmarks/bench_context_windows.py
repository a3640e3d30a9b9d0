"""Context Windows (Lightning) in a real ComfyUI on the random full-size SD1.5 + Lightning module, 64x64 px.

For each frame count: UNet calls per step, server-side wall time and peak resident memory of the ComfyUI process,
with windows batched into as few calls as free memory allows (``max_windows_per_call`` 0) and one window per call
(1, what core's context windows and AnimateDiff-Evolved do: the peer). Then the seam score of each fuse method.

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python [ADL_FIXTURE_DIR=...] \\
        python benchmarks/bench_context_windows.py [--frames 64 128 256] [--steps 1] [--seam-frames 64] \\
        [--fuse pyramid flat overlap-linear relative] [--json out.json]

The UNet calls are counted by the test probe pack of tests/integration/test_long_video.py (an APPLY_MODEL wrapper),
written into the throwaway server directory. Peak memory is the server's VmHWM, reset before each run, minus its
resident size before the run. On a CPU, batching saves Python and kernel-launch overhead only; on a GPU it fills
the device, which is where it matters. The random weights make the seam scores a check of the machinery, not a
quality statement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from comfy_harness import ComfyServer, comfyui_path  # noqa: E402
from fixture_files import fixture_models  # noqa: E402
from graphs import base, lightning_sampler, save_latent, with_motion  # noqa: E402
from test_long_video import SIZE, context_windows, read_log, with_model_probe, write_probe_pack  # noqa: E402

from lightning import context  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_timed(server: ComfyServer, prompt: dict) -> tuple[object, float, float]:
    """(result, seconds the server spent executing, peak RSS growth in MiB during the run over the RSS before)."""
    pid = server.proc.pid
    reset_peak(pid)
    before = status_kb(pid, "VmRSS")
    result = server.run(prompt, timeout=7200)
    peak = status_kb(pid, "VmHWM")
    stamps = {kind: data.get("timestamp") for kind, data in result.messages}
    seconds = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    return result, seconds, (peak - before) / 1024.0


def sampling_graph(frames: int, cap: int, steps: int, log: Path, seed: int = 3, fuse: str = "pyramid") -> dict:
    graph = context_windows(with_motion(base(frames=frames, size=SIZE)), max_windows_per_call=cap, fuse_method=fuse)
    graph = lightning_sampler(graph, model=("cw", 0), seed=seed, denoise=steps / 4)
    return save_latent(with_model_probe(graph, log), f"bench/cw_{frames}_{cap}_{fuse}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=1, choices=[1, 2, 3, 4],
                    help="sampling steps of the 4-step module (denoise steps/4); 1 keeps a CPU run short")
    ap.add_argument("--repeats", type=int, default=1, help="runs per frame count and mode (median reported)")
    ap.add_argument("--seam-frames", type=int, default=64, help="0 skips the seam scores")
    ap.add_argument("--fuse", nargs="+", default=list(context.FUSE_METHODS))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    comfy = comfyui_path()
    if comfy is None:
        ap.error("set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout")

    work = Path(tempfile.mkdtemp(prefix="adl_bench_cw_"))
    write_probe_pack(work / "custom_nodes")
    server = ComfyServer(comfy, work, models=fixture_models()).start()
    figures = {"steps": args.steps, "size": SIZE, "frames": {}, "seams": {}}
    try:
        print(f"ComfyUI {server.get('/system_stats')['system'].get('comfyui_version')}, {os.cpu_count()} CPUs, "
              f"{SIZE}x{SIZE} px, {args.steps} step(s), context 16/4 standard_static")
        run_timed(server, sampling_graph(20, 0, 1, work / "warmup.jsonl"))  # load the models once
        modes = (("sequential", 1), ("batched", 0))
        samples = {(f, m): [] for f in args.frames for m, _ in modes}
        for repeat in range(args.repeats):  # alternating order: the machine's other load hits both modes alike
            for frames in args.frames:
                for mode, cap in (modes if repeat % 2 == 0 else modes[::-1]):
                    log = work / f"calls_{frames}_{mode}_{repeat}.jsonl"
                    _, seconds, peak = run_timed(server, sampling_graph(frames, cap, args.steps, log, seed=repeat))
                    calls = read_log(log, "model")
                    samples[(frames, mode)].append((seconds, peak, len(calls) / args.steps,
                                                    max(r["rows"] for r in calls)))
                    print(f"  run {repeat + 1}/{args.repeats}: {frames} frames {mode}: {seconds:.1f} s", flush=True)
        print(f"\n{'frames':>6} {'windows':>7} | {'mode':>10} {'calls/step':>10} {'rows/call':>9} {'seconds':>8} "
              f"{'peak MiB':>8} | {'batched/sequential time':>23}")
        for frames in args.frames:
            windows = len(context.windows(frames, 16, 4))
            row = {}
            for mode, _ in modes:
                runs = samples[(frames, mode)]
                seconds = statistics.median(r[0] for r in runs)
                peak = max(r[1] for r in runs)
                row[mode] = {"calls_per_step": runs[0][2], "rows_per_call": runs[0][3], "seconds": seconds,
                             "seconds_all": [r[0] for r in runs], "peak_rss_mib": peak}
                ratio = "" if mode == "sequential" else f"{seconds / row['sequential']['seconds']:.3f}"
                print(f"{frames:>6} {windows:>7} | {mode:>10} {runs[0][2]:>10.1f} {runs[0][3]:>9} {seconds:>8.1f} "
                      f"{peak:>8.0f} | {ratio:>23}")
            figures["frames"][frames] = row
        if args.seam_frames:
            print(f"\nseam score at {args.seam_frames} frames (1 = borders like any other frame step)")
            for fuse in args.fuse:
                graph = sampling_graph(args.seam_frames, 0, args.steps, work / f"seam_{fuse}.jsonl", fuse=fuse)
                graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
                graph["metrics"] = {"class_type": "ADL_VideoMetrics", "inputs": {
                    "images": ["decode", 0], "flow_method": "dis", "context_length": 16, "context_overlap": 4,
                    "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False}}
                graph["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["metrics", 3]}}
                result, _, _ = run_timed(server, graph)
                report = json.loads(result.outputs["report"]["text"][0])
                seam, flicker = report["seam"]["score"], report["flicker"]["mean"]
                figures["seams"][fuse] = {"seam_score": seam, "flicker": flicker, "warp": report["warp"]["mean"]}
                print(f"  {fuse:>15}: seam {seam:.3f}  flicker {flicker:.4f}  warp {report['warp']['mean']:.4f}",
                      flush=True)
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"({time.time() - started:.0f} s in all)")
    raise SystemExit(code)
