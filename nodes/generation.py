"""Generation nodes: load a motion module (and motion LoRAs), apply it to an SD1.5 MODEL, sample in few steps."""

from __future__ import annotations

import dataclasses
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

from . import folders, guards, keys, loras, notify, specs
from ._core import core
from .comfy_schema import build_schema
from .motion_patch import MotionModuleHandle, apply_motion_module, motion_patcher

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


def _schema(spec: specs.NodeSpec, extras: dict | None = None) -> io.Schema:
    return build_schema(spec, resolve_options, extras)


def loader_rules() -> dict:
    """The frontend's data (``guards.frontend_rules``) with what is on disk now: which released modules are not
    downloaded yet, and the step counts our metadata gives (header reads only; metadata wins over a name, as on
    the server)."""
    on_disk = set(folder_paths.get_filename_list(folders.MOTION_MODULES))
    steps = {}
    for name in on_disk:
        path = folder_paths.get_full_path(folders.MOTION_MODULES, name)
        found, _ = checkpoints.lightning_steps_origin(None, checkpoints.read_metadata(path) if path else {})
        if found is not None:
            steps[name] = found
    return guards.frontend_rules(not_downloaded=[n for n in hub.KNOWN_FILES if n not in on_disk],
                                 steps_in_metadata=steps)


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


def module_steps(info, path: str, lightning_steps: str) -> tuple[object, str | None]:
    """The module's info with the step count the user chose (``lightning_steps`` other than auto) or the file
    gives, and where that count came from."""
    if lightning_steps != specs.AUTO_STEPS:
        return dataclasses.replace(info, lightning_steps=int(lightning_steps)), guards.FROM_INPUT
    steps, origin = checkpoints.lightning_steps_origin(path, info.metadata)
    return dataclasses.replace(info, lightning_steps=steps), origin


class LoadMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LOAD_MOTION_MODULE, {"name": {"adl_rules": loader_rules()}})

    @classmethod
    def execute(cls, name, group_norm="per_frame", lightning_steps=specs.AUTO_STEPS):
        path = motion_module_path(name)
        dtype = comfy.model_management.unet_dtype()
        module_set = checkpoints.load_motion_module(path, device=comfy.model_management.unet_offload_device(),
                                                    dtype=dtype)
        module_set.set_norm_mode(group_norm)
        module_set.requires_grad_(False)
        info, origin = module_steps(module_set.info, path, lightning_steps)
        where = f", step count {guards.steps_origin_text(origin)}" if origin else ""
        log.info("[AnimateDiff-Lightning] loaded %s: %s%s", os.path.basename(path), info.label, where)
        return io.NodeOutput(MotionModuleHandle(motion_patcher(module_set), info, path, origin))


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


def _steps_for(model, steps: int, node: str) -> int:
    """The step count to sample: ``steps``, or the module's own for 0; warns (once per run) off the grid."""
    attachment = model.get_attachment(keys.MOTION)
    module_steps = attachment.lightning_steps if attachment is not None else None
    origin = attachment.steps_origin if attachment is not None else None
    if steps == 0:
        if attachment is None:
            raise ValueError(guards.no_module_message(node))
        if module_steps is None:
            raise ValueError(guards.missing_steps_message(node, attachment.info.label))
        steps = module_steps
    message = guards.check_steps(steps, module_steps, origin)
    if message:
        notify.warn(message)
    return steps


def _sigmas(steps: int, denoise: float) -> torch.Tensor:
    message = guards.check_denoise(steps, denoise)
    if message:
        notify.warn(message)
    return sampling.strength_sigmas(steps, denoise)


class LightningSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(specs.LIGHTNING_SAMPLER)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps=0, cfg=1.0, denoise=1.0):
        if denoise <= 0:
            return io.NodeOutput(latent_image)
        sigmas = _sigmas(_steps_for(model, steps, "Lightning Sampler"), denoise)
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
        return io.NodeOutput(_sigmas(_steps_for(model, steps, "Lightning Sigmas"), denoise))


NODES = [LoadMotionModule, LoadMotionLoRA, ApplyMotionModule, LightningSampler, LightningSigmas]
