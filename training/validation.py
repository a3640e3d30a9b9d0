"""Validation clips during a run: what the student samples now, beside what its teacher samples.

Every ``validation.every`` iterations, for every lane (base) and every validation prompt and seed: the
student sampled with our sampler at its target step count (no CFG, as Lightning models are used) and the
stage's teacher at its own step count (with the stage's CFG), both from the same noise, decoded with the
setup's ``decode``. Written under ``validation/iter-<N>/``: an mp4 per clip (OpenCV), one PNG grid (a row per
clip, student | teacher, a few frames each) and the weight-free temporal metrics of
:mod:`lightning.metrics` (flicker, warp error) in ``metrics.json`` and the run's log. Validation draws no
number from the training random states, so it does not change what the run computes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ._core import core
distill = core("distill")
metrics = core("metrics")
opencv = core("opencv")
sampling = core("sampling")
schedule = core("schedule")
atomic_output = core("files").atomic_output

log = logging.getLogger(__name__)

GRID_FRAMES = 4  # frames per clip in the PNG grid


def require_writers(config) -> None:
    """Raise :class:`lightning.opencv.MissingOpenCVError` now when validation is on and ``cv2`` is missing.

    Called before any weight is loaded: without it the first validation, iterations into a run, is where a
    missing OpenCV would surface.
    """
    if config.validation.every > 0:
        opencv.require_cv2("Training validation (validation.every > 0; 0 trains without validation clips)")


def _write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    cv2 = opencv.require_cv2("Training validation")

    h, w = frames.shape[1:3]
    with atomic_output(path) as temporary:
        writer = cv2.VideoWriter(os.fspath(temporary), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write an mp4v video to {os.fspath(temporary)!r}")
        try:
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        finally:
            writer.release()


def _write_png(image: np.ndarray, path: Path) -> None:
    cv2 = opencv.require_cv2("Training validation")

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise OSError(f"OpenCV could not encode {os.fspath(path)!r}")
    with atomic_output(path) as temporary:
        temporary.write_bytes(encoded.tobytes())


def _uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _strip(video: np.ndarray, count: int = GRID_FRAMES) -> np.ndarray:
    picks = np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int)
    return np.concatenate([video[i] for i in picks], axis=1)


def _measure(video: np.ndarray) -> dict:
    out = {"flicker": metrics.flicker_index(video)["mean"]}
    try:
        out["warp_error"] = metrics.warp_error(video)["mean"]
    except metrics.InvalidInputError as error:  # frames too small for optical flow (the toy world)
        out["warp_error"] = None
        out["warp_note"] = str(error)
    return out


def _select(cond, i: int):
    return cond[i:i + 1] if isinstance(cond, torch.Tensor) else cond


def validate(trainer) -> dict | None:
    """Sample, write and measure the validation clips for the trainer's current state; returns the record."""
    setup, config, run_dir = trainer.setup, trainer.config, trainer.run_dir
    if setup.decode is None or run_dir is None:
        return None
    stage = trainer.stage
    device = trainer.placement.device
    out_dir = run_dir.validation_dir / f"iter-{trainer.iteration:08d}"
    conds = setup.validation_conds or [(None, None)] * len(setup.lanes)
    prompts = list(config.validation.prompts) if config.model.kind != "toy" else [""]
    rows, clips = [], []
    was_training = trainer.student.training
    trainer.student.eval()
    try:
        for lane in trainer.lanes:
            latents, _, _ = lane.data(1, torch.Generator().manual_seed(0))  # only its shape is used
            shape = tuple(latents.shape)
            cond_all, uncond_all = conds[setup.lanes.index(lane)]
            with trainer.placement.lane(lane.base), torch.no_grad(), trainer.placement.autocast():
                for p, prompt in enumerate(prompts):
                    cond, uncond = _select(cond_all, p), _select(uncond_all, p)
                    for seed in config.validation.seeds:
                        noise = sampling.make_noise(shape, int(seed), device=device)
                        student = sampling.sample(distill.denoiser_for(lane.base, trainer.student), noise,
                                                  schedule.sigmas(stage.student_steps).to(device), cond=cond,
                                                  noise_scaling="comfyui")
                        teacher_cfg = stage.cfg if uncond is not None else 1.0
                        teacher = sampling.sample(distill.denoiser_for(lane.base, trainer.teacher), noise,
                                                  schedule.sigmas(stage.teacher_steps).to(device), cfg=teacher_cfg,
                                                  cond=cond, uncond=uncond, noise_scaling="comfyui")
                        videos = {who: _uint8(setup.decode(x.float())) for who, x in
                                  (("student", student), ("teacher", teacher))}
                        name = f"base{lane.index}_prompt{p}_seed{seed}"
                        entry = {"base": lane.index, "prompt": prompt, "seed": int(seed)}
                        for who, video in videos.items():
                            _write_mp4(video, out_dir / f"{name}_{who}@{stage.student_steps if who == 'student' else stage.teacher_steps}.mp4")
                            entry[who] = _measure(video)
                        clips.append(entry)
                        rows.append(np.concatenate([_strip(videos["student"]), _strip(videos["teacher"])], axis=1))
    finally:
        trainer.student.train(was_training)
    if rows:
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
        _write_png(grid, out_dir / "grid.png")
    record = {"event": "validation", "iteration": trainer.iteration, "stage": stage.name,
              "student_steps": stage.student_steps, "teacher_steps": stage.teacher_steps,
              "folder": os.fspath(out_dir.relative_to(run_dir.path)), "clips": clips}
    with atomic_output(out_dir / "metrics.json") as temporary:
        temporary.write_text(json.dumps(record, indent=2) + "\n")
    run_dir.log(record)
    return record
