"""``build(config) -> Setup`` for ``model.kind = "sd15"``: lanes on real SD1.5 checkpoints through ComfyUI.

- one lane per ``model.bases`` checkpoint: the frozen base is that checkpoint's ComfyUI UNet with the motion
  module injected the way the Apply Motion Module node does it (``training.sd15_unet.SD15Base``), and its
  data is the lane's share of the latent cache in ``data.dataset`` (``training.dataset``);
- the teacher is ``model.teacher`` (any SD1.5 AnimateDiff format, ``lightning.checkpoints``), the student a
  trainable float32 copy of it;
- discriminators (AnimateDiff-Lightning §3.3) are built on a trainable copy of base 0's encoder and middle
  block with the teacher's down and mid motion modules; the base index is their flow condition;
- ``decode`` is base 0's VAE, ``validation_conds`` each base's own CLIP on the validation prompts.

Bases read their weights on first use, one at a time, so a run with several bases does not hold every
checkpoint before training starts. With ``materialize=False`` every module is built on the ``meta`` device
from the files' headers and no weight is read (the memory plan traces that).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from . import comfy_backend
from ._core import pack_module
from .sd15_unet import SD15Base, middle_feature_size

errors = pack_module("lightning.errors")
discriminator_mod = pack_module("lightning.discriminator")
distill = pack_module("lightning.distill")

HEAD_CHANNELS = discriminator_mod.SD15_HEAD_CHANNELS

try:  # the loop's Setup (training.loop); the same fields until that module is at hand
    from .loop import Setup
except ImportError:  # pragma: no cover - only before training.loop exists
    @dataclasses.dataclass
    class Setup:
        lanes: list
        student: nn.Module
        teacher: nn.Module | None
        make_discriminator: Callable[[bool], nn.Module] | None
        decode: Callable[[torch.Tensor], torch.Tensor] | None
        validation_conds: list[tuple[Any, Any]] | None


def trainable_copy(teacher: nn.Module) -> nn.Module:
    """The student: a float32 copy of the teacher with every weight trainable (made outside inference mode)."""
    with torch.inference_mode(False):
        student = copy.deepcopy(teacher).float()
    student.requires_grad_(True)
    return student.train()


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def discriminator_factory(base: SD15Base, teacher: nn.Module, *, num_bases: int, frames: int,
                          latent_height: int, latent_width: int, trainable: str = "full",
                          head_channels: int = HEAD_CHANNELS) -> Callable[[bool], nn.Module]:
    """``make_discriminator(conditional)``: a fresh FlowDiscriminator on a fresh backbone each call (the paper
    re-initialises D every stage, and D' is a new model)."""
    feature_size = middle_feature_size(latent_height, latent_width, frames)

    def make_discriminator(conditional: bool) -> nn.Module:
        backbone = comfy_backend.make_backbone(base, teacher, trainable=trainable)
        if next(backbone.parameters()).device.type == "meta":
            with torch.device("meta"):
                return discriminator_mod.FlowDiscriminator(backbone, num_bases=num_bases,
                                                           feature_size=feature_size, conditional=conditional,
                                                           head_channels=head_channels)
        return discriminator_mod.FlowDiscriminator(backbone, num_bases=num_bases, feature_size=feature_size,
                                                   conditional=conditional, head_channels=head_channels)
    return make_discriminator


def setup_from_parts(checkpoints: list, teacher: nn.Module, lane_data: list[Callable], *, frames: int,
                     latent_height: int, latent_width: int, trainable: str = "full",
                     validation_prompts: list[str] | None = None, bases: list[SD15Base] | None = None,
                     materialize: bool = True) -> Setup:
    """A Setup from opened checkpoints, a loaded teacher and per-base data callables (CONTRACT 2)."""
    if len(lane_data) != len(checkpoints):
        raise errors.InvalidInputError(f"{len(checkpoints)} bases but data for {len(lane_data)} lanes")
    if bases is None:
        bases = [comfy_backend.make_base(i, ckpt) for i, ckpt in enumerate(checkpoints)]
    teacher = frozen(teacher)
    lanes = [distill.Lane(base, data, frames) for base, data in zip(bases, lane_data)]
    make_discriminator = discriminator_factory(bases[0], teacher, num_bases=len(bases), frames=frames,
                                               latent_height=latent_height, latent_width=latent_width,
                                               trainable=trainable)
    decode = conds = None
    if materialize:
        decode = comfy_backend.vae_decoder(checkpoints[0])
        if validation_prompts:
            encode = comfy_backend.text_encoder(checkpoints)
            conds = []
            for i, ckpt in enumerate(checkpoints):
                conds.append((encode(i, list(validation_prompts)), encode(i, [""] * len(validation_prompts))))
                ckpt.release_encoders()  # the CLIP is needed once; the VAE is read again for validation
    return Setup(lanes=lanes, student=trainable_copy(teacher), teacher=teacher,
                 make_discriminator=make_discriminator, decode=decode, validation_conds=conds)


def build(config, materialize: bool = True) -> Setup:
    """The Setup of an SD1.5 run (CONTRACT 3); ``materialize=False``: meta modules, headers only."""
    model = config.model
    if not model.teacher:
        raise errors.InvalidInputError("model.teacher is empty: give the AnimateDiff motion module file to "
                                       "distil from (e.g. mm_sd_v15_v2.ckpt, or the previous stage's student)")
    if not config.data.dataset:
        raise errors.InvalidInputError("data.dataset is empty: build a latent cache first with "
                                       "`python -m training dataset ...` and give its folder")
    try:
        dataset_mod = pack_module("training.dataset")
    except ImportError as exc:
        raise errors.InvalidInputError(f"training.dataset is not available ({exc})") from exc
    dataset = dataset_mod.LatentDataset(config.data.dataset)
    device = config.run.device
    paths = list(model.bases)
    if dataset.num_bases != len(paths):
        raise errors.InvalidInputError(
            f"data.dataset {config.data.dataset} holds clips for {dataset.num_bases} bases but model.bases lists "
            f"{len(paths)}; the dataset's base i must be model.bases[i]")
    lane_data = [dataset.lane_data(i, flip=config.data.flip) for i in range(len(paths))]
    if materialize:
        checkpoints = comfy_backend.open_checkpoints(paths, device=device)
        teacher = comfy_backend.load_teacher(model.teacher)
        bases = [comfy_backend.make_base(i, ckpt) for i, ckpt in enumerate(checkpoints)]
        if model.resident_bases == "one" and comfy_backend._wants_cpu(device):
            for base in bases:
                base.release_when_parked = True
    else:
        checkpoints = [None] * len(paths)
        teacher = comfy_backend.load_teacher(model.teacher, materialize=False)
        bases = [comfy_backend.meta_base(i, p, device=device) for i, p in enumerate(paths)]
    return setup_from_parts(checkpoints, teacher, lane_data, frames=dataset.frames,
                            latent_height=dataset.height, latent_width=dataset.width,
                            trainable=config.discriminator.trainable,
                            validation_prompts=list(config.validation.prompts) if config.validation.every else None,
                            bases=bases,
                            materialize=materialize)
