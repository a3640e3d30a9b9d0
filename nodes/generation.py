"""Generation nodes: load a motion module (and motion LoRAs), apply it to an SD1.5 MODEL, sample in few steps."""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.v0_0_2 import io

from . import folders, guards, loras, specs
from ._core import core
from .comfy_schema import build_schema
from .motion_patch import KEY, MotionModuleHandle, apply_motion_module, motion_patcher

checkpoints = core("checkpoints")
hub = core("hub")
lora = core("lora")
sampling = core("sampling")

log = logging.getLogger(__name__)


def resolve_options(key: str) -> list[str]:
    if key == specs.OPTIONS_MOTION_MODULES:
        on_disk = folder_paths.get_filename_list(folders.MOTION_MODULES)
        return sorted(set(on_disk) | set(hub.KNOWN_FILES), key=str.lower)
    if key == specs.OPTIONS_MOTION_LORAS:
        return folder_paths.get_filename_list(folders.MOTION_LORAS)
    raise KeyError(key)


def _schema(spec: specs.NodeSpec) -> io.Schema:
    return build_schema(spec, resolve_options)


def motion_module_path(name: str) -> str:
    """The file behind a motion-module choice, downloading a released Lightning module on first use."""
    path = folder_paths.get_full_path(folders.MOTION_MODULES, name)
    if path is not None:
        return path
    if name in hub.KNOWN_FILES:
        dest = folders.download_dir(folder_paths)
        bar = comfy.utils.ProgressBar(hub.KNOWN_FILES[name].size)
        path = hub.download(name, dest, progress=lambda done, total: bar.update_absolute(done, total),
                            verify=checkpoints.load_motion_module)
        folder_paths.filename_list_cache.pop(folders.MOTION_MODULES, None)
        return str(path)
    searched = ", ".join(folder_paths.get_folder_paths(folders.MOTION_MODULES))
    raise FileNotFoundError(f"Load Motion Module: no motion module named {name!r} in {searched}. Put the file "
                            "in ComfyUI/models/animatediff_models (or add the folder to extra_model_paths.yaml "
                            "under animatediff_models) and refresh.")


class LoadMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LOAD_MOTION_MODULE)

    @classmethod
    def execute(cls, name, group_norm="per_frame"):
        path = motion_module_path(name)
        dtype = comfy.model_management.unet_dtype()
        module_set = checkpoints.load_motion_module(path, device=comfy.model_management.unet_offload_device(),
                                                    dtype=dtype)
        module_set.set_norm_mode(group_norm)
        module_set.requires_grad_(False)
        log.info("[AnimateDiff-Lightning] loaded %s: %s", os.path.basename(path), module_set.info.label)
        return io.NodeOutput(MotionModuleHandle(motion_patcher(module_set), module_set.info, path))


class LoadMotionLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LOAD_MOTION_LORA)

    @classmethod
    def execute(cls, name, strength, prev_motion_lora=None):
        path = folder_paths.get_full_path(folders.MOTION_LORAS, name)
        if path is None:
            raise FileNotFoundError(f"Load Motion LoRA: no file named {name!r} in "
                                    f"{', '.join(folder_paths.get_folder_paths(folders.MOTION_LORAS))}.")
        lora.load_motion_lora(path)  # refuse image LoRAs and damaged files here, where the user picked them
        return io.NodeOutput(loras.extend(prev_motion_lora, name, strength))


def _lora_patches(handle: MotionModuleHandle, chain) -> dict:
    patches: dict = {}
    for name, strength in loras.entries(chain):
        path = folder_paths.get_full_path(folders.MOTION_LORAS, name)
        if path is None:
            raise FileNotFoundError(f"Apply Motion Module: motion LoRA {name!r} is not in animatediff_motion_lora.")
        for key, delta in lora.lora_deltas(lora.load_motion_lora(path), handle.module_set).items():
            patches.setdefault(key, []).append((strength, delta))
    return patches


class ApplyMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.APPLY_MOTION_MODULE)

    @classmethod
    def execute(cls, model, motion_module, motion_lora=None, scale=1.0):
        summed = {}
        for key, parts in _lora_patches(motion_module, motion_lora).items():
            summed[key] = (sum(s * d for s, d in parts),)
        patched = apply_motion_module(model, motion_module, scale=scale, lora_patches=summed,
                                      loras=loras.entries(motion_lora))
        return io.NodeOutput(patched)


def _steps_for(model, steps: int) -> tuple[int, int | None]:
    attachment = model.get_attachment(KEY)
    module_steps = attachment.lightning_steps if attachment is not None else None
    if steps == 0:
        if module_steps is None:
            what = attachment.info.label if attachment is not None else "no motion module"
            raise ValueError(f"steps 0 means 'the Lightning module's step count', but this MODEL has {what}. "
                             "Set steps explicitly (e.g. 20-25 with cfg 7.5 for non-Lightning modules).")
        steps = module_steps
    message = guards.check_steps(steps, module_steps)
    if message:
        log.warning("[AnimateDiff-Lightning] %s", message)
    return steps, module_steps


class LightningSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LIGHTNING_SAMPLER)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps=0, cfg=1.0, denoise=1.0):
        if denoise <= 0:
            return io.NodeOutput(latent_image)
        steps, _ = _steps_for(model, steps)
        sigmas = sampling.strength_sigmas(steps, denoise)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(
            model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative, latent,
            noise_mask=latent_image.get("noise_mask"), callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)


class LightningSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LIGHTNING_SIGMAS)

    @classmethod
    def execute(cls, model, steps=0, denoise=1.0):
        if denoise <= 0:
            return io.NodeOutput(torch.FloatTensor([]))
        steps, _ = _steps_for(model, steps)
        return io.NodeOutput(sampling.strength_sigmas(steps, denoise))


NODES = [LoadMotionModule, LoadMotionLoRA, ApplyMotionModule, LightningSampler, LightningSigmas]
