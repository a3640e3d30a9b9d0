"""Putting a motion module into a ComfyUI MODEL, through ComfyUI's official extension points only.

- the motion module set gets its own ``ModelPatcher``, attached with ``set_additional_models``: ComfyUI's memory
  management loads, offloads and accounts for it like any model, and motion LoRAs are weight patches on it;
- ``set_injections`` puts its temporal modules into the UNet when the clone is loaded for sampling and takes
  them out when it is unloaded (``placement.MotionInjection``), so the shared base model is never left changed;
- ``forward_timestep_embed_patch`` is how the UNet's ``TimestepEmbedSequential`` calls a foreign layer with
  ``transformer_options``, where we read the clip length and the motion scale;
- ``add_object_patch("model_sampling", ...)`` switches the clone to AnimateDiff's linear betas;
- an ``OUTER_SAMPLE`` wrapper checks frames and schedule before sampling starts.
Nothing global is replaced.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension

from . import guards, keys, notify
from ._core import core
from .placement import MotionInjection

schedule = core("schedule")

log = logging.getLogger(__name__)


@dataclass
class MotionModuleHandle:
    """What travels on a MOTION_MODULE socket: the module set in its own ModelPatcher, and what it is."""

    patcher: comfy.model_patcher.ModelPatcher
    info: object  # lightning.motion_module.MotionModuleInfo
    path: str
    steps_origin: str | None = None  # where info.lightning_steps came from (guards.steps_origin_text)

    @property
    def module_set(self):
        return self.patcher.model


@dataclass
class MotionAttachment:
    """Attached to the patched MODEL so samplers and guards can see which module it carries."""

    info: object
    scale: float = 1.0
    loras: list = field(default_factory=list)
    steps_origin: str | None = None

    @property
    def lightning_steps(self) -> int | None:
        return getattr(self.info, "lightning_steps", None)

    @property
    def pe_length(self) -> int:
        return int(getattr(self.info, "pe_length", 32))


def motion_patcher(module_set) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(module_set, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


_SAMPLING_CLASS = None


def animatediff_model_sampling():
    """A ModelSamplingDiscrete (epsilon) on AnimateDiff's linear betas: ComfyUI's "sqrt_linear"."""
    global _SAMPLING_CLASS
    if _SAMPLING_CLASS is None:
        _SAMPLING_CLASS = type("AnimateDiffModelSampling",
                               (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS), {})
    settings = types.SimpleNamespace(sampling_settings={
        "beta_schedule": "sqrt_linear", "linear_start": schedule.BETA_START, "linear_end": schedule.BETA_END,
        "timesteps": schedule.NUM_TRAIN_TIMESTEPS, "zsnr": False})
    return _SAMPLING_CLASS(settings)


def clip_length(x: torch.Tensor, transformer_options: dict) -> int:
    """Frames per clip in this UNet call: set explicitly by our context windows, else the batch divided by
    the number of cond/uncond chunks ComfyUI concatenated (each chunk is one whole clip)."""
    explicit = transformer_options.get(keys.VIDEO_LENGTH)
    if explicit:
        return int(explicit)
    chunks = len(transformer_options.get("cond_or_uncond") or ()) or 1
    if x.shape[0] % chunks:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {chunks} cond/uncond clips")
    return x.shape[0] // chunks


def forward_motion(layer, x, emb, context, transformer_options, *args, **kwargs):
    """The ``forward_timestep_embed_patch`` handler for our temporal modules."""
    frames = clip_length(x, transformer_options)
    scale = float(transformer_options.get(keys.MOTION_OPTIONS, {}).get("scale", 1.0))
    weight = next(layer.parameters())
    out = layer(x.to(device=weight.device, dtype=weight.dtype), frames, scale=scale)
    return out.to(device=x.device, dtype=x.dtype)


def _outer_sample_guard(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    guider = executor.class_obj
    attachment = guider.model_patcher.get_attachment(keys.MOTION)
    if attachment is not None:
        options = guider.model_options
        windows = keys.CONTEXT in options or "context_handler" in options
        sigma_list = sigmas.detach().cpu().tolist()
        steps, origin = attachment.lightning_steps, attachment.steps_origin
        messages = guards.check_frames(int(noise.shape[0]), attachment.pe_length, windows=windows)
        messages += [guards.check_sigmas(sigma_list, steps),
                     guards.check_schedule_steps(sigma_list, steps, origin),
                     guards.check_cfg(getattr(guider, "cfg", None), steps, origin)]
        for message in messages:
            if message:
                notify.warn(message)
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


def apply_motion_module(model, handle: MotionModuleHandle, *, scale: float = 1.0, lora_patches=None,
                        loras=()) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` that samples video with ``handle``'s motion module (the input is left untouched)."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    family = type(getattr(model.model, "model_config", model.model)).__name__
    guards.check_sd15_unet(config, family, module_channels=handle.info.channels)
    if model.get_injections(keys.EVOLVED) or model.get_additional_models_with_key(keys.EVOLVED):
        raise guards.ModelFamilyError(
            "Apply Motion Module: this MODEL already carries an AnimateDiff-Evolved motion module. Two motion "
            "modules in one UNet produce noise: use the MODEL from before Evolved's nodes, or only Evolved's.")

    patched = model.clone()
    module_patcher = handle.patcher.clone()
    if lora_patches:
        module_patcher.add_patches(lora_patches, strength_patch=1.0)
    injection = MotionInjection.for_module_set(handle.module_set)
    # a second Apply on the same MODEL replaces the first rather than stacking two modules
    patched.set_additional_models(keys.MOTION, [module_patcher])
    patched.set_injections(keys.MOTION, [comfy.patcher_extension.PatcherInjection(
        inject=lambda p: injection.inject(p.model.diffusion_model),
        eject=lambda p: injection.eject(p.model.diffusion_model))])
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    existing = transformer_options.get("patches", {}).get("forward_timestep_embed_patch", [])
    if not any(handler is forward_motion for _, handler in existing):
        patched.set_model_forward_timestep_embed_patch((type(injection.down[0]), forward_motion))
    transformer_options[keys.MOTION_OPTIONS] = {"scale": float(scale)}
    patched.add_object_patch("model_sampling", animatediff_model_sampling())
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, keys.MOTION)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, keys.MOTION, _outer_sample_guard)
    patched.set_attachments(keys.MOTION, MotionAttachment(handle.info, float(scale), list(loras),
                                                          handle.steps_origin))
    return patched
