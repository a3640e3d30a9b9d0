"""Lightning in a real ComfyUI: our 4-step graph against the classic AnimateDiff graph and against
AnimateDiff-Evolved's 4-step graph, on the same random full-size weights.

    COMFYUI_PATH=... COMFYUI_PYTHON=... [EVOLVED_PATH=...] python benchmarks/bench_comfy_lightning.py \\
        [--size 64] [--frames 16] [--repeats 2] [--classic-steps 25] [--classic-cfg 7.5]

Graphs (each sampled --repeats times with fresh seeds after a one-step warm-up run, so model loading is not timed):
- ours:    Load/Apply Motion Module (Lightning) -> Lightning Sampler (4 steps, cfg 1);
- classic: the same motion module as a v2 module -> KSampler euler/normal, 25 steps, cfg 7.5 (what AnimateDiff
           users ran before Lightning), through Evolved's Gen1 loader when EVOLVED_PATH is set, else ours;
- evolved: Evolved's Gen1 loader (sqrt_linear) -> KSampler euler/sgm_uniform, 4 steps, cfg 1 (the model card's graph).
Wall time is ComfyUI's own execution time (execution_start to execution_success in /history). UNet calls and rows
are counted by a probe node this script writes into the server's custom_nodes at run time: it wraps the MODEL's
diffusion model and logs one line per call. Prints the ratios ours/classic and ours/evolved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from comfy_harness import ComfyServer, comfyui_path  # noqa: E402
from fixture_files import fixture_models  # noqa: E402
from graphs import LIGHTNING_4STEP, base, ksampler, lightning_sampler, save_latent, with_motion  # noqa: E402

PROBE = textwrap.dedent('''
    """Benchmark probe: counts diffusion-model calls of the MODEL passed through it (written by the benchmark)."""
    import logging
    import time
    import comfy.patcher_extension

    def _count(executor, x, *args, **kwargs):
        start = time.perf_counter()
        out = executor(x, *args, **kwargs)
        logging.warning("[adl-bench-probe] unet call rows=%d seconds=%.4f", x.shape[0], time.perf_counter() - start)
        return out

    class CountUNetCalls:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "wrap"
        CATEGORY = "_for_testing"

        def wrap(self, model):
            m = model.clone()
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "adl_bench_probe", _count)
            return (m,)

    NODE_CLASS_MAPPINGS = {"ADLBench_CountUNetCalls": CountUNetCalls}
''')


def probe(graph: dict, model_node: str) -> dict:
    graph = dict(graph)
    graph["probe"] = {"class_type": "ADLBench_CountUNetCalls", "inputs": {"model": [model_node, 0]}}
    graph["sampler"] = dict(graph["sampler"], inputs=dict(graph["sampler"]["inputs"], model=["probe", 0]))
    return graph


def graphs(args, evolved: bool) -> dict[str, callable]:
    def ade(steps, cfg, sampler, scheduler, seed, warm=False):
        g = base(args.frames, args.size)
        g["ade"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
            "model": ["ckpt", 0], "model_name": LIGHTNING_4STEP, "beta_schedule": "sqrt_linear (AnimateDiff)"}}
        return probe(ksampler(g, model=("ade", 0), seed=seed, steps=1 if warm else steps, cfg=cfg,
                              sampler_name=sampler, scheduler=scheduler), "ade")

    def ours(seed, warm=False):
        return probe(lightning_sampler(with_motion(base(args.frames, args.size)), seed=seed, steps=1 if warm else 0),
                     "apply")

    def classic(seed, warm=False):
        if evolved:
            return ade(args.classic_steps, args.classic_cfg, "euler", "normal", seed, warm)
        return probe(ksampler(with_motion(base(args.frames, args.size)), seed=seed,
                              steps=1 if warm else args.classic_steps, cfg=args.classic_cfg, sampler_name="euler",
                              scheduler="normal"), "apply")

    runs = {"ours": ours, "classic": classic}
    if evolved:
        runs["evolved"] = lambda seed, warm=False: ade(4, 1.0, "euler", "sgm_uniform", seed, warm)
    return runs


def execution_seconds(server: ComfyServer, prompt_id: str) -> float:
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="frame size in pixels (latents are size/8)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--classic-steps", type=int, default=25)
    ap.add_argument("--classic-cfg", type=float, default=7.5)
    ap.add_argument("--graphs", nargs="+", default=["ours", "classic", "evolved"],
                    help="which graphs to run (ours is always run; ratios are printed for those present)")
    args = ap.parse_args(argv)
    comfy = comfyui_path()
    if comfy is None:
        ap.error("set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout")
    base_dir = Path(tempfile.mkdtemp(prefix="adl_bench_"))
    probe_dir = base_dir / "probe_pack"
    probe_dir.mkdir()
    (probe_dir / "__init__.py").write_text(PROBE)
    extra = {"adl_bench_probe": probe_dir}
    if os.environ.get("EVOLVED_PATH"):
        extra["ComfyUI-AnimateDiff-Evolved"] = Path(os.environ["EVOLVED_PATH"])
    server = ComfyServer(comfy, base_dir, extra_custom_nodes=extra, models=fixture_models()).start()
    try:
        evolved = "ADE_AnimateDiffLoaderGen1" in server.object_info()
        builders = {name: build for name, build in graphs(args, evolved).items()
                    if name == "ours" or name in args.graphs}
        for name, build in builders.items():
            server.run(save_latent(build(seed=1000, warm=True), f"bench/{name}_warmup"))  # loads the models
        samples = {name: ([], [], [], []) for name in builders}
        for r in range(args.repeats):  # graphs interleaved, so drift in machine load hits all of them alike
            for name, build in builders.items():
                before = server.log().count("[adl-bench-probe] unet call")
                result = server.run(save_latent(build(seed=2000 + r), f"bench/{name}_{r}"))
                lines = [ln for ln in server.log().splitlines() if "[adl-bench-probe] unet call" in ln][before:]
                times, calls, rows, unet = samples[name]
                times.append(execution_seconds(server, result.prompt_id))
                calls.append(len(lines))
                rows.append(sum(int(ln.split("rows=", 1)[1].split()[0]) for ln in lines))
                unet.append(sum(float(ln.rsplit("seconds=", 1)[1]) for ln in lines))
        results = {}
        for name, (times, calls, rows, unet) in samples.items():
            outside = [t - u for t, u in zip(times, unet)]
            results[name] = tuple(statistics.median(v) for v in (times, calls, rows, unet, outside))
            print(f"{name:8s} wall {results[name][0]:8.1f} s   UNet calls {results[name][1]:4.0f}   "
                  f"UNet rows {results[name][2]:6.0f}   in the UNet {results[name][3]:7.1f} s   "
                  f"outside it {results[name][4]:5.2f} s   "
                  f"({args.repeats} runs: {', '.join(f'{t:.1f}' for t in times)})")
        print(f"\n{args.frames} frames at {args.size}x{args.size} px, ComfyUI --cpu, classic = {args.classic_steps} "
              f"steps cfg {args.classic_cfg} via {'Evolved' if evolved else 'our nodes'}")
        o = results["ours"]
        if "classic" in results:
            c = results["classic"]
            print(f"ours / classic: wall {o[0] / c[0]:.3f}   UNet calls {o[1] / c[1]:.3f}   UNet rows {o[2] / c[2]:.3f}")
        if "evolved" in results:
            e = results["evolved"]
            print(f"ours / evolved 4-step: wall {o[0] / e[0]:.3f}   UNet time {o[3] / e[3]:.3f}   UNet calls "
                  f"{o[1] / e[1]:.3f}  (target <= 1.0); outside the UNet ours {o[4]:.2f} s, evolved {e[4]:.2f} s")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
