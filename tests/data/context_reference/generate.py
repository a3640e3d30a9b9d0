"""Regenerate ``reference.json.gz``: context windows, fuse weights, fused outputs and FreeNoise, as computed by
ComfyUI core and ComfyUI-AnimateDiff-Evolved themselves.

This script holds none of their code: it imports their modules at run time and records what they return, so
``tests/test_context.py`` can check ``lightning.context`` against the real thing without either project
installed. Run it with ComfyUI's own interpreter (it needs ComfyUI's dependencies)::

    COMFYUI_PATH=/path/to/ComfyUI EVOLVED_PATH=/path/to/ComfyUI-AnimateDiff-Evolved \\
        /path/to/comfy/venv/bin/python tests/data/context_reference/generate.py

The grid is a seeded random sample of the parameter space plus hand-picked edges (see ``window_cases``); every
case is evaluated by both projects and any disagreement between them is recorded, not hidden.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

OUT = Path(__file__).with_name("reference.json.gz")
SCHEDULES = ("standard_static", "standard_uniform", "looped_uniform", "batched")
FUSE_METHODS = ("flat", "pyramid", "overlap-linear", "relative")
RANDOM_SEED = 20250605
RANDOM_CASES = 6000


def _import_references():
    comfy_path = os.environ.get("COMFYUI_PATH")
    evolved_path = os.environ.get("EVOLVED_PATH")
    if not comfy_path or not evolved_path:
        sys.exit("Set COMFYUI_PATH (a ComfyUI checkout) and EVOLVED_PATH (a ComfyUI-AnimateDiff-Evolved checkout).")
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    # comfy.model_management probes for a GPU at import time; this script only needs CPU math.
    comfy.cli_args.args.cpu = True
    import comfy.context_windows as core

    # Evolved's package is imported as top-level ``animatediff``; its absolute imports need ComfyUI on sys.path.
    sys.path.insert(0, evolved_path)
    import animatediff.context as evo_context
    import animatediff.context_extras as evo_extras
    import animatediff.sample_settings as evo_settings
    import animatediff.sampling as evo_sampling

    return comfy_path, evolved_path, core, evo_context, evo_extras, evo_settings, evo_sampling


def _commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _outcome(fn):
    """The value, or ``{"raises": ExceptionName}``: invalid settings are recorded the way the reference treats them."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recording exactly what the reference does is the point
        return {"raises": type(exc).__name__}


def _core_handler(core, length, overlap, stride, closed_loop, schedule, fuse="flat", step=0):
    handler = core.IndexListContextHandler(core.get_matching_context_schedule(schedule),
                                           core.get_matching_fuse_method(fuse), context_length=length,
                                           context_overlap=overlap, context_stride=stride, closed_loop=closed_loop)
    handler._step = step
    return handler


def _evo_options(evo_context, length, overlap, stride, closed_loop, schedule, fuse="flat", step=0):
    opts = evo_context.ContextOptions(context_length=length, context_stride=stride, context_overlap=overlap,
                                      context_schedule=schedule, closed_loop=closed_loop, fuse_method=fuse)
    opts.step = step
    return opts


def window_cases():
    """(schedule, frames, length, overlap, stride, closed_loop, step): random sample + edges, no duplicates."""
    rng = random.Random(RANDOM_SEED)
    cases = []
    for _ in range(RANDOM_CASES):
        cases.append((rng.choice(SCHEDULES), rng.randint(17, 200), rng.randint(8, 32), rng.randint(0, 8),
                      rng.randint(1, 3), rng.random() < 0.5, rng.randint(0, 20)))
    for schedule in SCHEDULES:
        for length in (8, 16, 32):
            # the stride cap changes at frames = length * 2^k; single-window and wrap behaviour near frames = length
            frame_set = {17, 200, length, length + 1, 2 * length - 1, 2 * length, 2 * length + 1, 4 * length,
                         4 * length + 1}
            for frames in sorted(f for f in frame_set if 17 <= f <= 200):
                for overlap in (0, 4, 8):
                    for closed_loop in (False, True):
                        for step in (0, 7):
                            cases.append((schedule, frames, length, overlap, 3, closed_loop, step))
        for closed_loop in (False, True):
            for step in range(21):
                cases.append((schedule, 50, 16, 4, 3, closed_loop, step))
    # frames == length runs the schedule only in Evolved with use_on_equal_length; looped_uniform then shifts.
    for length in range(17, 33):
        for overlap in range(0, 9):
            for closed_loop in (False, True):
                cases.append(("looped_uniform", length, length, overlap, 1, closed_loop, 1 + overlap % 3))
    seen, unique = set(), []
    for case in cases:
        if case not in seen:
            seen.add(case)
            unique.append(case)
    return unique


def generate_windows(core, evo_context):
    records, disagreements = [], []
    for case in window_cases():
        schedule, frames, length, overlap, stride, closed_loop, step = case
        handler = _core_handler(core, length, overlap, stride, closed_loop, schedule, step=step)
        core_out = _outcome(lambda: handler.context_schedule.func(frames, handler, {}))
        opts = _evo_options(evo_context, length, overlap, stride, closed_loop, schedule, step=step)
        evo_out = _outcome(lambda: evo_context.get_context_windows(frames, opts))
        core_out = [[int(i) for i in w] for w in core_out] if isinstance(core_out, list) else core_out
        evo_out = [[int(i) for i in w] for w in evo_out] if isinstance(evo_out, list) else evo_out
        records.append([schedule, frames, length, overlap, stride, int(closed_loop), step, core_out])
        if core_out != evo_out:
            disagreements.append({"case": list(case), "core": core_out, "evolved": evo_out})
    return records, disagreements


def generate_weights(core, evo_context):
    records, disagreements = [], []
    for method in ("flat", "pyramid"):
        for length in range(1, 34):
            core_w = [float(v) for v in core.FUSE_MAPPING[method](length)]
            evo_w = [float(v) for v in evo_context.FUSE_MAPPING[method](length)]
            records.append({"method": method, "length": length, "weights": core_w})
            if core_w != evo_w:
                disagreements.append({"method": method, "length": length, "core": core_w, "evolved": evo_w})
    for length in (4, 7, 8, 16, 17):
        frames = 3 * length
        # (num_frames, window): first, interior and last window of a 3-window clip, and a window that is the clip
        placements = ((frames, list(range(0, length))), (frames, list(range(length, 2 * length))),
                      (frames, list(range(frames - length, frames))), (length, list(range(length))))
        for overlap in (0, 1, 2, 4, length):
            for full, idxs in placements:
                handler = _core_handler(core, length, overlap, 1, False, "standard_static", fuse="overlap-linear")
                opts = _evo_options(evo_context, length, overlap, 1, False, "standard_static", fuse="overlap-linear")
                core_w = _outcome(lambda: [float(v) for v in core.create_weights_overlap_linear(
                    length, full_length=full, idxs=idxs, handler=handler)])
                evo_w = _outcome(lambda: [float(v) for v in evo_context.create_weights_overlap_linear(
                    length, full_length=full, idxs=idxs, ctx_opts=opts)])
                records.append({"method": "overlap-linear", "length": length, "overlap": overlap,
                                "num_frames": full, "window": idxs, "weights": core_w})
                if core_w != evo_w:
                    disagreements.append({"overlap": overlap, "window": idxs, "core": core_w, "evolved": evo_w})
    return records, disagreements


FAKE_MODEL_DOC = (
    "x has shape [N, 2, 1, 1] with x[f, c] = (((7 * f + 3 * c) % 11) - 5) / 4 (exact in float32). "
    "Two conds are fused. The model call for window number k (0-based, in schedule order) with index list w "
    "returns, for cond i in (0, 1) and position p: (1 - 2 * i) * x[w[p]] * (1 + 0.25 * k) + 0.01 * (i + 1) * p, "
    "in float32. 'fused' is core's IndexListContextHandler.execute output per cond, flattened row-major.")


def _fake_x(torch, frames):
    f = torch.arange(frames).view(frames, 1, 1, 1)
    c = torch.arange(2).view(1, 2, 1, 1)
    return ((((7 * f + 3 * c) % 11) - 5).to(torch.float32) / 4)


def _fake_outputs(torch, x_window, k):
    pos = torch.arange(x_window.shape[0], dtype=torch.float32).view(-1, 1, 1, 1)
    return [(1 - 2 * i) * x_window * (1 + 0.25 * k) + 0.01 * (i + 1) * pos for i in range(2)]


def fusion_configs():
    """(schedule, frames, length, overlap, stride, closed_loop, step) chosen to exercise every fuse path:
    clamped last window, wrapping windows, duplicated indices inside a window, a short batched tail."""
    return [
        ("standard_static", 40, 16, 4, 1, False, 0), ("standard_static", 50, 16, 4, 1, False, 0),
        ("standard_static", 23, 8, 3, 1, False, 0), ("standard_static", 33, 16, 0, 1, False, 0),
        ("standard_static", 20, 8, 1, 1, False, 0), ("standard_static", 64, 16, 8, 1, False, 0),
        ("standard_uniform", 50, 16, 4, 1, False, 0), ("standard_uniform", 50, 16, 4, 1, False, 1),
        ("standard_uniform", 50, 16, 4, 1, False, 3), ("standard_uniform", 50, 16, 4, 2, False, 5),
        ("standard_uniform", 18, 16, 4, 2, False, 3), ("standard_uniform", 37, 8, 2, 3, False, 6),
        ("looped_uniform", 48, 16, 4, 1, False, 0), ("looped_uniform", 48, 16, 4, 1, True, 1),
        ("looped_uniform", 48, 16, 4, 1, False, 3), ("looped_uniform", 18, 16, 4, 2, False, 3),
        ("looped_uniform", 40, 8, 4, 3, True, 5), ("looped_uniform", 30, 12, 2, 2, True, 2),
        ("batched", 40, 16, 4, 1, False, 0), ("batched", 35, 16, 4, 1, False, 0), ("batched", 48, 16, 0, 1, False, 0),
    ]


def generate_fusion(torch, core, evo_context, evo_extras, evo_sampling):
    records, disagreements = [], []
    for config in fusion_configs():
        schedule, frames, length, overlap, stride, closed_loop, step = config
        for method in FUSE_METHODS:
            x = _fake_x(torch, frames)
            handler = _core_handler(core, length, overlap, stride, closed_loop, schedule, fuse=method, step=step)
            # set_step would derive the step from sample_sigmas; pin it instead so every step can be recorded.
            handler.set_step = lambda timestep, model_options: None
            calls = []

            def fake_calc_cond_batch(model, conds, sub_x, sub_t, model_options, calls=calls):
                k = len(calls)
                calls.append(list(model_options["transformer_options"]["context_window"].index_list))
                return _fake_outputs(torch, sub_x, k)

            model_options = {"transformer_options": {}}
            timestep = torch.full((frames,), 1.0)
            core_out = _outcome(lambda: handler.execute(fake_calc_cond_batch, None, [[{}], [{}]], x, timestep,
                                                        model_options))
            evo_out = _outcome(lambda: _evolved_fuse(torch, evo_context, evo_extras, evo_sampling, x, config, method))
            core_flat = [[float(v) for v in t.flatten()] for t in core_out] if isinstance(core_out, list) else core_out
            evo_flat = [[float(v) for v in t.flatten()] for t in evo_out] if isinstance(evo_out, list) else evo_out
            records.append({"config": [schedule, frames, length, overlap, stride, int(closed_loop), step],
                            "method": method, "windows": calls, "fused": core_flat})
            if core_flat != evo_flat:
                disagreements.append({"config": list(config), "method": method, "core": core_flat, "evolved": evo_flat})
    return records, disagreements


def _evolved_fuse(torch, evo_context, evo_extras, evo_sampling, x, config, method):
    """Evolved's own combine_context_window_results over the same fake model, for the agreement check."""
    schedule, frames, length, overlap, stride, closed_loop, step = config
    opts = _evo_options(evo_context, length, overlap, stride, closed_loop, schedule, fuse=method, step=step)
    adgs = types.SimpleNamespace(params=types.SimpleNamespace(context_options=opts))
    naive, cref = evo_extras.NaiveReuseHandler(), evo_extras.ContextRefHandler()
    windows = evo_context.get_context_windows(frames, opts)
    finals = [torch.zeros_like(x) for _ in range(2)]
    start = torch.ones if method == "relative" else torch.zeros
    counts = [start((frames, 1, 1, 1)) for _ in range(2)]
    biases = [[0.0] * frames for _ in range(2)]
    for k, window in enumerate(windows):
        outs = _fake_outputs(torch, x[window], k)
        evo_sampling.combine_context_window_results(x, outs, None, window, k, len(windows), torch.ones(frames),
                                                    adgs, naive, cref, finals, counts, biases)
    if method != "relative":
        finals = [f / c for f, c in zip(finals, counts)]
    return finals


def generate_freenoise(torch, evo_context, evo_settings):
    records = []
    for frames in (8, 16, 17, 20, 24, 33, 48, 64, 100):
        for length, overlap in ((16, 4), (16, 0), (8, 2), (8, 7), (16, 15), (32, 8)):
            for seed in (0, 1, 42, 123456789, 2**63 + 7):
                group = evo_context.ContextOptionsGroup()
                group.add(evo_context.ContextOptions(context_length=length, context_overlap=overlap, context_stride=1,
                                                     context_schedule="standard_static"))
                # frame f of the input holds the value f, so the output spells out which frame each one copies
                noise = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1)
                out = evo_settings.SeedNoiseGeneration._convert_to_freenoise(
                    noise=noise.clone(), seed=seed, extra_args={"context_options": group})
                records.append({"frames": frames, "length": length, "overlap": overlap, "seed": seed,
                                "source_frames": [int(v) for v in out.flatten()]})
    return records


def generate_set_step_probe(torch, core):
    """Core's set_step compares sample_sigmas with the whole timestep vector; record what it does for a dim-0 batch."""
    handler = _core_handler(core, 16, 4, 1, False, "standard_static")
    sigmas = torch.tensor([14.6, 4.0, 1.2, 0.3, 0.0])
    out = {}
    for frames in (1, 5, 48):
        out[str(frames)] = _outcome(lambda: (handler.set_step(torch.full((frames,), 1.2),
                                                              {"transformer_options": {"sample_sigmas": sigmas}}),
                                             handler._step)[1])
    return out


def main():
    comfy_path, evolved_path, core, evo_context, evo_extras, evo_settings, evo_sampling = _import_references()
    import torch

    windows, window_disagreements = generate_windows(core, evo_context)
    weights, weight_disagreements = generate_weights(core, evo_context)
    fusion, fusion_disagreements = generate_fusion(torch, core, evo_context, evo_extras, evo_sampling)
    freenoise = generate_freenoise(torch, evo_context, evo_settings)
    data = {
        "header": {
            "what": "Reference values for lightning.context, computed by running ComfyUI core and AnimateDiff-Evolved.",
            "comfyui_commit": _commit(comfy_path),
            "evolved_commit": _commit(evolved_path),
            "torch": torch.__version__,
            "generated_by": "tests/data/context_reference/generate.py (COMFYUI_PATH, EVOLVED_PATH, ComfyUI's venv)",
            "windows": ("Rows [schedule, frames, length, overlap, stride, closed_loop, step, windows]. windows is "
                        "core's comfy.context_windows schedule function output for handler._step = step (the raw "
                        "schedule: core only calls it when frames > length, Evolved also when frames == length and "
                        "use_on_equal_length is on), or {'raises': name}. Grid: seeded random sample "
                        f"(random.Random({RANDOM_SEED}), {RANDOM_CASES} draws, frames 17..200, length 8..32, "
                        "overlap 0..8, stride 1..3, closed loop, step 0..20) plus edges, see window_cases()."),
            "weights": "core's create_weights_* per method (overlap-linear: per window placement), or {'raises'}.",
            "fusion": FAKE_MODEL_DOC,
            "freenoise": ("Evolved's SeedNoiseGeneration._convert_to_freenoise on noise whose frame f holds f; "
                          "source_frames[f] is the frame whose noise lands in frame f."),
            "set_step_probe": ("core IndexListContextHandler.set_step with a [frames]-shaped timestep at sigma 1.2 "
                               "and 5 sample_sigmas: the step it finds, or {'raises'}."),
            "disagreements": {"windows": window_disagreements, "weights": weight_disagreements,
                              "fusion": fusion_disagreements},
        },
        "windows": windows,
        "weights": weights,
        "fusion": fusion,
        "freenoise": freenoise,
        "set_step_probe": generate_set_step_probe(torch, core),
    }
    payload = gzip.compress(json.dumps(data, separators=(",", ":")).encode(), mtime=0)
    with tempfile.NamedTemporaryFile(dir=OUT.parent, prefix=".reference-", delete=False) as tmp:
        tmp.write(payload)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp.name, OUT)
    print(f"wrote {OUT} ({len(payload)} bytes): {len(windows)} window cases, {len(weights)} weight cases, "
          f"{len(fusion)} fusion cases, {len(freenoise)} freenoise cases; disagreements core/Evolved: "
          f"windows {len(window_disagreements)}, weights {len(weight_disagreements)}, "
          f"fusion {len(fusion_disagreements)}")


if __name__ == "__main__":
    main()
