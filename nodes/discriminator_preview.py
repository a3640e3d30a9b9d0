"""The flow-conditioned discriminator preview: at every jump of a Lightning sampling, how likely a trained
discriminator finds the student's jump and the teacher's jump from the same x_t to be the teacher's, and
which parts of which frames its decision comes from (input-gradient saliency).

The discriminator is rebuilt exactly as the run built it (``training.sd15_setup.discriminator_factory`` on a
base of the run and the run's teacher) and its weights are read from the run's newest state. The student is
the motion module carried by the MODEL input; the jumps are taken on the run's base (``base_index``), whose
index is also the discriminator's flow condition, so both see what training saw (AnimateDiff-Lightning §3.3).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io

from . import training_specs as tspecs
from ._core import core
from ._training_imports import training
from .keys import MOTION as KEY
from .training_nodes import _schema, run_path

distill = core("distill")
errors = core("errors")
schedule = core("schedule")


def _student_from_model(model):
    patchers = model.get_additional_models_with_key(KEY)
    if not patchers:
        raise errors.InvalidInputError("Discriminator Preview: the MODEL carries no motion module; connect the MODEL "
                                       "from Apply Motion Module (Lightning) with the student applied")
    return patchers[0].model


def _cond_tensor(positive) -> torch.Tensor:
    try:
        cond = positive[0][0]
    except (IndexError, TypeError):
        raise errors.InvalidInputError("Discriminator Preview: positive must be a CONDITIONING (CLIP Text Encode)") \
            from None
    return cond[:1].detach().float().cpu().clone()


def plot_image(rows: list[dict], width: int = 640, height: int = 300) -> np.ndarray:
    """Bars per jump: D's probability for the student's jump (blue) and the teacher's (orange)."""
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 24, height - 30
    draw.rectangle([left, top, right, bottom], outline=(80, 80, 90))
    draw.text((left, 6), "P(teacher's jump) per jump: student (blue) vs teacher (orange)", fill=(220, 220, 220))
    for v in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * v
        draw.line([left, y, right, y], fill=(60, 60, 70))
        draw.text((6, y - 6), f"{v:.1f}", fill=(160, 160, 160))
    n = max(len(rows), 1)
    slot = (right - left) / n
    for i, row in enumerate(rows):
        x = left + i * slot
        for j, (key, colour) in enumerate((("student", (90, 170, 255)), ("teacher", (255, 170, 60)))):
            value = row[key]
            x0 = x + slot * (0.15 + 0.35 * j)
            draw.rectangle([x0, bottom - (bottom - top) * value, x0 + slot * 0.3, bottom], fill=colour)
        draw.text((x + slot * 0.2, bottom + 6), f"t={row['t']}->{row['t_next']}", fill=(200, 200, 200))
    return np.asarray(image)


def overlay(frames: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Frames [F,H,W,3] in 0..1 with a red heat map of per-frame saliency [F,h,w] (normalised over the clip)."""
    heat = F.interpolate(saliency[:, None].float(), size=frames.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    heat = heat / heat.max().clamp(min=1e-12)
    red = torch.zeros_like(frames)
    red[..., 0] = 1.0
    alpha = (0.6 * heat)[..., None]
    return (frames * (1 - alpha) + red * alpha).clamp(0, 1)


class DiscriminatorPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(tspecs.DISCRIMINATOR_PREVIEW)

    @classmethod
    def execute(cls, run, model, positive, latent_image, seed, steps=0, base_index=0):
        with torch.inference_mode(False):
            rows, frames = _preview(run, model, positive, latent_image, int(seed), int(steps), int(base_index))
        plot = torch.from_numpy(plot_image(rows).astype(np.float32) / 255.0)[None]
        return io.NodeOutput(plot, json.dumps(rows), frames, ui={"adl_preview": rows})


def _preview(run, model, positive, latent_image, seed, steps, base_index):
    config_module = training("config")
    run_dir_module = training("run_dir")
    loop = training("loop")
    sd15_setup = training("sd15_setup")
    comfy_backend = training("comfy_backend")

    path = run_path(run)
    run_dir = run_dir_module.RunDir.open(path)
    config = config_module.load(run_dir.config_path)
    state = run_dir.latest_state()
    if state is None:
        raise errors.InvalidInputError(f"Discriminator Preview: run {run} has no saved state")
    tensors, meta = run_dir_module.read_state(state)
    weights = {k[len("discriminator."):]: v for k, v in tensors.items() if k.startswith("discriminator.")}
    if not weights:
        raise errors.InvalidInputError(f"Discriminator Preview: the state of run {run} holds no discriminator (an MSE "
                                       "stage); pick a run of an adversarial stage")
    stage = loop.stage_from_config(config)
    kind = meta.get("phase") or stage.phases[-1].kind
    conditional = kind == distill.CONDITIONAL
    if steps not in (0, stage.student_steps):
        raise errors.InvalidInputError(f"Discriminator Preview: the run's discriminator judged {stage.name} jumps; "
                                       f"steps must be 0 or {stage.student_steps}")
    bases = list(config.model.bases)
    if not 0 <= base_index < len(bases):
        raise errors.InvalidInputError(f"Discriminator Preview: base_index must be 0..{len(bases) - 1} for run {run}")
    latent = latent_image["samples"]
    frames, height, width = latent.shape[0], latent.shape[-2], latent.shape[-1]

    comfy.model_management.unload_all_models()
    device = "cpu" if comfy.model_management.get_torch_device().type == "cpu" else str(
        comfy.model_management.get_torch_device())
    ckpt = comfy_backend.Checkpoint(bases[base_index], device=device)
    base = comfy_backend.make_base(base_index, ckpt, lazy=False)
    teacher = sd15_setup.frozen(comfy_backend.load_teacher(config.model.teacher))
    student = _student_from_model(model)
    pbar = comfy.utils.ProgressBar(stage.student_steps + 1)
    try:
        make = sd15_setup.discriminator_factory(base, teacher, num_bases=len(bases), frames=frames,
                                                latent_height=height, latent_width=width,
                                                trainable=config.discriminator.trainable)
        disc = make(conditional)
        try:
            disc.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise errors.InvalidInputError(
                f"Discriminator Preview: the run's discriminator does not fit this latent ({frames} frames, "
                f"{width * 8}x{height * 8}); use the run's frame count and size ({str(error).splitlines()[0]})") \
                from None
        disc.eval().requires_grad_(False)
        cond = _cond_tensor(positive)
        grid = schedule.trailing_timesteps(stage.student_steps)
        noise = torch.randn((frames, 4, height, width), generator=torch.Generator().manual_seed(seed))
        x = distill.noisy_latents(torch.zeros_like(noise), noise, [grid[0]], frames)
        rows, maps = [], []
        # the loader's module is ComfyUI's cached object: never convert it in place
        student_module = student if next(student.parameters()).dtype == torch.float32 else copy.deepcopy(student).float()
        for k, t in enumerate(grid):
            t_next = grid[k + 1] if k + 1 < len(grid) else -1
            with torch.no_grad():
                target = distill.teacher_jump(stage, base, teacher, x, [t], cond, None, frames)
                pair = distill.Pair(x, torch.tensor([t]), torch.tensor([t_next]), target, cond, base_index, frames)
                jump = distill.student_jump(base, student_module, pair)
                p_teacher = torch.sigmoid(distill.discriminate(disc, pair, target, conditional)).item()
            moved = jump.detach().clone().requires_grad_(True)
            logit = distill.discriminate(disc, pair, moved, conditional)
            logit.sum().backward()
            maps.append(moved.grad.abs().mean(dim=1))  # [F, h, w]
            rows.append({"jump": k, "t": t, "t_next": t_next, "student": float(torch.sigmoid(logit.detach())),
                         "teacher": float(p_teacher)})
            x = jump.detach()
            pbar.update_absolute(k + 1)
        decoded = comfy_backend.vae_decoder(ckpt)(x)
        saliency = torch.stack(maps).mean(0)
        images = overlay(decoded, saliency)
        pbar.update_absolute(stage.student_steps + 1)
    finally:
        with contextlib.suppress(Exception):
            ckpt.release()
        del base
        gc.collect()
        comfy.model_management.soft_empty_cache()
    return rows, images


NODES = [DiscriminatorPreview]
