"""API-format graphs for the integration tests, built from small pieces."""

from __future__ import annotations

LIGHTNING_4STEP = "animatediff_lightning_4step_comfyui.safetensors"
MOTION_LORA = "v2_lora_ZoomIn.ckpt"
SDXL_MODULE = "mm_sdxl_v10_beta.safetensors"
SD15 = "sd15_random.safetensors"
CONTROLNET = "controlnet_sd15_random.safetensors"
SD2_UNET = "sd2_tiny_unet.safetensors"

PROMPT = "a girl smiling, wind in her hair, best quality"


def base(frames: int = 16, size: int = 64, ckpt: str = SD15) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size,
                                                                "batch_size": frames}},
    }


def with_motion(graph: dict, module: str = LIGHTNING_4STEP, **apply_inputs) -> dict:
    graph = dict(graph)
    graph["mm"] = {"class_type": "ADL_LoadMotionModule", "inputs": {"name": module}}
    graph["apply"] = {"class_type": "ADL_ApplyMotionModule",
                      "inputs": {"model": ["ckpt", 0], "motion_module": ["mm", 0], **apply_inputs}}
    return graph


def lightning_sampler(graph: dict, model=("apply", 0), seed: int = 42, steps: int = 0, cfg: float = 1.0,
                      denoise: float = 1.0, latent=("latent", 0)) -> dict:
    graph = dict(graph)
    graph["sampler"] = {"class_type": "ADL_LightningSampler", "inputs": {
        "model": list(model), "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent),
        "seed": seed, "steps": steps, "cfg": cfg, "denoise": denoise}}
    return graph


def ksampler(graph: dict, model=("apply", 0), seed: int = 42, steps: int = 4, cfg: float = 1.0,
             sampler_name: str = "euler", scheduler: str = "sgm_uniform") -> dict:
    graph = dict(graph)
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": list(model), "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
        "denoise": 1.0}}
    return graph


def save_latent(graph: dict, prefix: str, source=("sampler", 0)) -> dict:
    graph = dict(graph)
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": list(source), "filename_prefix": prefix}}
    return graph
