"""Runs in ComfyUI's Python (a subprocess of ``test_training_sd15.py``): ``python -m training ...`` with
instruments, results as JSON on the last line of stdout.

    python tests/integration/sd15_training_driver.py cli --work DIR [--teacher-steps 32] -- dataset teacher ...
    python tests/integration/sd15_training_driver.py cli --work DIR -- run CONFIG.toml --run-dir DIR/run

The training CLI runs unchanged (``training.cli.main``); the driver only watches: every time the loop drops a
base (swapped bases on a CPU run) or ends a phase, that base's weights are compared with its checkpoint file,
and the iteration records are collected. ``--teacher-steps`` lowers the dataset teacher's 32 steps when a CPU
run must be short.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from training import comfy_backend  # noqa: E402


def compare_with_file(base, path: str) -> dict:
    """Every UNet weight of the base against the checkpoint file (fp16 -> fp32 -> fp16 is exact)."""
    state = base.unet.state_dict()
    mismatched, checked = [], 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if not key.startswith(comfy_backend.UNET_PREFIX):
                continue
            stored = f.get_tensor(key)
            ours = state[key[len(comfy_backend.UNET_PREFIX):]]
            checked += 1
            if not torch.equal(ours.to(stored.dtype), stored):
                mismatched.append(key)
    grads = sum(p.grad is not None for p in base.unet.parameters())
    return {"checked": checked, "mismatched": len(mismatched), "grads": grads}


def cli(args) -> dict:
    """``python -m training ...`` (training.cli.main) with instruments: the teacher's step count, every base's
    weights compared with its file whenever the loop drops or finishes with them, the iteration records."""
    from training import cli as training_cli
    from training.sd15_unet import SD15Base

    comfy_backend.TEACHER_STEPS = args.teacher_steps
    checks, records = {}, []
    drop = SD15Base.unload

    def checked_unload(self):
        if self.loaded:
            checks[str(self.index)] = compare_with_file(self, self.source)
        drop(self)

    SD15Base.unload = checked_unload
    make_base = comfy_backend.make_base

    def make_base_with_source(index, checkpoint, **kwargs):
        base = make_base(index, checkpoint, **kwargs)
        base.source = str(checkpoint.path)
        return base

    comfy_backend.make_base = make_base_with_source

    def hook(event, record, trainer):
        if event == "iteration":
            records.append(record)
        if event == "phase_end":
            for lane in trainer.setup.lanes:
                if lane.base.loaded:
                    checks[str(lane.index)] = compare_with_file(lane.base, lane.base.source)

    code = training_cli.main(args.rest, handle_signals=False, hooks=[hook])
    students = sorted(str(p) for p in Path(args.work).rglob("students/*.safetensors"))
    return {"exit": code, "records": records, "bases": checks, "students": students,
            "finite": all(math.isfinite(v) for r in records for k, v in r.items()
                          if k in ("mse", "d", "g") and isinstance(v, float))}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "cli" and "--" in argv:  # driver options, "--", the training CLI's arguments
        split = argv.index("--")
        options = argparse.ArgumentParser()
        options.add_argument("--work", required=True)
        options.add_argument("--teacher-steps", type=int, default=comfy_backend.TEACHER_STEPS)
        args = options.parse_args(argv[1:split])
        args.rest = argv[split + 1:]
        print(json.dumps({"result": cli(args)}), flush=True)
        return 0
    raise SystemExit("usage: sd15_training_driver.py cli --work DIR [--teacher-steps N] -- <python -m training args>")


if __name__ == "__main__":
    raise SystemExit(main())
