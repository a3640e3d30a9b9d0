"""Runs in ComfyUI's Python (a subprocess of ``test_training_sd15.py``): SD1.5 distillation on real ComfyUI
model code with random full-size checkpoints, one step of the acceptance per call, results as JSON on the
last line of stdout.

    python tests/integration/sd15_training_driver.py dataset --work DIR --bases A B --teacher T [--teacher-steps 32]
    python tests/integration/sd15_training_driver.py train --work DIR --bases A B --start S --stage 128->32 --iterations 2

``dataset``: per base, 2 teacher clips (AnimateDiff teacher through the Apply Motion Module patch and ComfyUI's
dpmpp_2m at CFG 7.5) with their prompt and empty-prompt conditioning. ``train``: the stage's first phase for
``--iterations`` iterations over both lanes, one base in memory at a time (each base's weights are compared
with its file before it is dropped), the student saved in AnimateDiff's layout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning import checkpoints, distill  # noqa: E402
from lightning.files import atomic_output  # noqa: E402
from training import comfy_backend, sd15_setup  # noqa: E402

PROMPTS = ["a cat walking on a wall", "waves breaking on a beach"]
FRAMES = 8
SIZE = 64  # pixels


def dataset(args) -> dict:
    ckpts = comfy_backend.open_checkpoints(args.bases, device="cpu")
    teacher = comfy_backend.load_teacher(args.teacher)
    sample = comfy_backend.teacher_sampler(ckpts, teacher, teacher_path=args.teacher, steps=args.teacher_steps)
    encode = comfy_backend.text_encoder(ckpts)
    out, seconds = {}, []
    for b in range(len(ckpts)):
        clips = []
        for seed, prompt in enumerate(PROMPTS):
            start = time.perf_counter()
            clips.append(sample(b, prompt, seed, FRAMES, SIZE, SIZE))
            seconds.append(time.perf_counter() - start)
        out[f"latents.{b}"] = torch.stack(clips)
        out[f"cond.{b}"] = encode(b, PROMPTS)
        out[f"uncond.{b}"] = encode(b, [""] * len(PROMPTS))
        ckpts[b].release()
    path = Path(args.work) / "clips.safetensors"
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    return {"clips": {k: list(v.shape) for k, v in out.items()}, "finite": all(bool(torch.isfinite(v).all())
                                                                            for v in out.values()),
            "seconds_per_clip": sum(seconds) / len(seconds),
            "bases_differ": bool((out["latents.0"] - out["latents.1"]).abs().max() > 1e-3)}


def lane_data(store: dict, b: int):
    latents, cond, uncond = store[f"latents.{b}"], store[f"cond.{b}"], store[f"uncond.{b}"]

    def data(n: int, generator: torch.Generator):
        idx = torch.randint(latents.shape[0], (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        clips = [latents[i].flip(-1) if f else latents[i] for i, f in zip(idx.tolist(), flip.tolist())]
        return torch.cat(clips), cond[idx], uncond[idx]
    return data


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


def train(args) -> dict:
    torch.manual_seed(0)
    store = load_file(str(Path(args.work) / "clips.safetensors"))
    ckpts = comfy_backend.open_checkpoints(args.bases, device="cpu")
    start = checkpoints.load_motion_module(args.start, dtype=torch.float32)
    data = [lane_data(store, b) for b in range(len(ckpts))]
    setup = sd15_setup.setup_from_parts(ckpts, start, data, frames=FRAMES, latent_height=SIZE // 8,
                                        latent_width=SIZE // 8, trainable=args.trainable)
    teacher_steps, student_steps = (int(v) for v in args.stage.split("->"))
    if teacher_steps == 128:
        stage = distill.Stage(128, 32, (distill.mse_phase(args.iterations),), cfg=distill.PAPER_CFG)
    else:
        stage = distill.adversarial_stage(teacher_steps, student_steps, (args.iterations, 0))
    phase = stage.phases[0]
    student, teacher = setup.student, setup.teacher
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=phase.lr, betas=phase.betas, foreach=False)
    disc = disc_optimizer = None
    conditional = phase.kind == distill.CONDITIONAL
    if phase.adversarial:
        disc = setup.make_discriminator(conditional)
        disc.train()
        disc_params = [p for p in disc.parameters() if p.requires_grad]
        disc_optimizer = torch.optim.Adam(disc_params, lr=phase.lr, betas=phase.betas, foreach=False)
    base_ids = {id(p) for lane in setup.lanes for p in lane.base.parameters()}
    generator = torch.Generator().manual_seed(0)
    lanes = setup.lanes
    records, checks = [], {}
    for it in range(args.iterations):
        started = time.perf_counter()
        record = {"iteration": it}
        optimizer.zero_grad(set_to_none=True)
        if disc_optimizer is not None:
            disc_optimizer.zero_grad(set_to_none=True)
        for lane in lanes:  # one base in memory at a time; gradients accumulate over the lanes
            pair = distill.draw_pair(stage, lane, teacher, 1, generator)
            if not phase.adversarial:
                pair.student = distill.student_jump(lane.base, student, pair)
                loss = distill.mse_loss(pair.student, pair.teacher) / len(lanes)
                loss.backward()
                record.setdefault("mse", []).append(float(loss.detach()) * len(lanes))
            else:
                with torch.no_grad():
                    fake = distill.student_jump(lane.base, student, pair)
                real_logits = distill.discriminate(disc, pair, pair.teacher, conditional)
                fake_logits = distill.discriminate(disc, pair, fake, conditional)
                d_loss = distill.discriminator_loss(real_logits, fake_logits) / len(lanes)
                d_loss.backward()
                record.setdefault("d", []).append(float(d_loss.detach()) * len(lanes))
                record.setdefault("_pairs", []).append(pair)
            if it == args.iterations - 1 and not phase.adversarial:
                checks[lane.index] = compare_with_file(lane.base, args.bases[lane.index])
            lane.base.unload()
        if phase.adversarial:
            disc_optimizer.step()
            disc.requires_grad_(False)
            for lane, pair in zip(lanes, record.pop("_pairs")):
                pair.student = distill.student_jump(lane.base, student, pair)
                g_loss = distill.generator_loss(distill.discriminate(disc, pair, pair.student, conditional))
                (g_loss / len(lanes)).backward()
                record.setdefault("g", []).append(float(g_loss.detach()))
                if it == args.iterations - 1:
                    checks[lane.index] = compare_with_file(lane.base, args.bases[lane.index])
                lane.base.unload()
            for p in disc_params:
                p.requires_grad_(True)
        assert not any(id(p) in base_ids for p in params), "a base weight is in the student's optimizer"
        optimizer.step()
        record["seconds"] = time.perf_counter() - started
        records.append(record)
        print(json.dumps({"progress": record}), flush=True)
    changed = max(float((student.state_dict()[k] - v).abs().max()) for k, v in before.items())
    out_path = Path(args.work) / args.out
    checkpoints.save_motion_module(student, out_path)
    reloaded = checkpoints.load_motion_module(out_path, dtype=torch.float32)
    same = all(torch.equal(reloaded.state_dict()[k], v.detach()) for k, v in student.state_dict().items())
    return {"stage": stage.name, "phase": phase.kind, "records": records, "student_changed_max": changed,
            "bases": {str(k): v for k, v in checks.items()}, "saved": str(out_path),
            "reloaded_equal": same, "reloaded_label": reloaded.info.label,
            "finite": all(math.isfinite(x) for r in records for v in r.values() if isinstance(v, list) for x in v)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["dataset", "train"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--bases", nargs="+", required=True)
    parser.add_argument("--teacher", default="")
    parser.add_argument("--teacher-steps", type=int, default=comfy_backend.TEACHER_STEPS)
    parser.add_argument("--start", default="")
    parser.add_argument("--stage", default="128->32")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--trainable", default="light")
    parser.add_argument("--out", default="student.safetensors")
    args = parser.parse_args(argv)
    result = dataset(args) if args.command == "dataset" else train(args)
    print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
