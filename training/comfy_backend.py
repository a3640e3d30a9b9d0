"""The one place in ``training/`` that imports ComfyUI (lazily): SD1.5 checkpoints, text and image encoders, the
AnimateDiff teacher sampler and the VAE decoder, as the plain callables the rest of ``training/`` takes.

Which ComfyUI: the one this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``), else ``COMFYUI_PATH``;
inside a running ComfyUI the already imported one. Nothing is imported until a function here needs it, so the
module itself imports fine without ComfyUI (CI tests its errors that way).

Facts this relies on (ComfyUI 0.3.x):
- ComfyUI runs nodes under ``torch.inference_mode()``; tensors made there cannot take part in backward even
  when frozen. Everything here that builds trainable or backward-visible modules runs under
  ``torch.inference_mode(False)``, which makes ordinary tensors whatever the caller's mode.
- ``comfy.model_management`` picks CUDA at import unless ComfyUI's ``--cpu`` option is set; without a GPU
  (or with ``device = "cpu"``) we set that option before the first ComfyUI import.
- Latents: the diffusion model works in the VAE's latent times 0.18215 (``process_latent_in``); the
  dataset and ``decode`` use that space (the "x0 space" of the training code).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import struct
import sys
import types
from pathlib import Path
from typing import Callable, Sequence

import torch

from ._core import pack_module
from .sd15_unet import SD15Base, UNetCalls, UNetEncoderBackbone

errors = pack_module("lightning.errors")
checkpoints_io = pack_module("lightning.checkpoints")
guards = pack_module("nodes.guards")

ENV_VAR = "COMFYUI_PATH"
PACK_ROOT = Path(__file__).resolve().parents[1]
UNET_PREFIX = "model.diffusion_model."

# The AnimateDiff teacher that makes training clips (AnimateDiff-Lightning §3.1): DPM-Solver++ at 32 steps,
# CFG 7.5, no negative prompt.
TEACHER_STEPS = 32
TEACHER_CFG = 7.5
TEACHER_SAMPLER = "dpmpp_2m"
TEACHER_SCHEDULER = "sgm_uniform"  # evenly spaced timesteps from 999, as the trailing grid Lightning trains on


class ComfyUIMissingError(errors.LightningError):
    """No ComfyUI to build SD1.5 lanes with."""


class CheckpointError(errors.ModelFileError):
    """A base model file that is not a usable Stable Diffusion 1.5 checkpoint."""


# --- finding and importing ComfyUI ------------------------------------------------------------------------

def _looks_like_comfyui(path: Path) -> bool:
    return (path / "comfy" / "sd.py").is_file() and (path / "comfy" / "model_management.py").is_file()


def find_comfyui() -> Path:
    """The ComfyUI checkout to import: the one holding this pack in ``custom_nodes``, else ``COMFYUI_PATH``."""
    if PACK_ROOT.parent.name == "custom_nodes" and _looks_like_comfyui(PACK_ROOT.parent.parent):
        return PACK_ROOT.parent.parent
    value = os.environ.get(ENV_VAR)
    if value:
        path = Path(value).expanduser()
        if not _looks_like_comfyui(path):
            raise ComfyUIMissingError(
                f"{ENV_VAR}={value} is not a ComfyUI checkout (no comfy/sd.py there); point it at the folder "
                "that holds ComfyUI's main.py")
        return path
    raise ComfyUIMissingError(
        "SD1.5 training runs on ComfyUI's own UNet, and no ComfyUI was found: this pack is not inside a "
        f"ComfyUI custom_nodes folder ({PACK_ROOT}) and {ENV_VAR} is not set. Install the pack into "
        f"ComfyUI/custom_nodes, or set {ENV_VAR}=/path/to/ComfyUI and run with ComfyUI's Python environment.")


def _wants_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def import_comfy(device: str = "auto") -> types.SimpleNamespace:
    """ComfyUI's modules that training uses, importing ComfyUI on first call (see the module docstring)."""
    if "comfy.model_management" not in sys.modules:
        root = str(find_comfyui())
        if root not in sys.path:
            sys.path.append(root)  # appended: this pack's own top-level packages keep precedence
        try:
            import comfy.cli_args
        except ImportError as exc:
            raise ComfyUIMissingError(
                f"could not import ComfyUI from {root} ({exc}); run with the Python environment ComfyUI is "
                "installed in") from exc
        if _wants_cpu(device):
            comfy.cli_args.args.cpu = True
    try:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.latent_formats
        import comfy.model_detection
        import comfy.utils
        from comfy.ldm.modules.diffusionmodules import openaimodel, util
    except ImportError as exc:
        raise ComfyUIMissingError(f"ComfyUI is incomplete or its dependencies are missing ({exc}); run with "
                                  "the Python environment ComfyUI is installed in") from exc
    motion_patch = pack_module("nodes.motion_patch")
    return types.SimpleNamespace(sd=comfy.sd, sample=comfy.sample, samplers=comfy.samplers, utils=comfy.utils,
                                 latent_formats=comfy.latent_formats, model_detection=comfy.model_detection,
                                 model_management=comfy.model_management, openaimodel=openaimodel, util=util,
                                 motion_patch=motion_patch)


@contextlib.contextmanager
def attention_of_nvidia_gpus():
    """ComfyUI's cross-attention as it is on an NVIDIA GPU (PyTorch's scaled_dot_product_attention, chosen
    at import there) for the duration, whatever this process's ComfyUI chose for its own device.

    The memory plan traces a GPU run on a CPU: imported for the CPU, ComfyUI uses its sub-quadratic attention,
    whose chunks are sized from values and free memory, neither of which a fake tensor has, and whose saved
    activations are not what a GPU run keeps. Inside a ComfyUI on an NVIDIA GPU this changes nothing.
    """
    import_comfy()
    from comfy.ldm.modules import attention

    before = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = before


def unet_calls(device: str = "auto") -> UNetCalls:
    """ComfyUI's UNet stage dispatcher and timestep features, and the Apply node's motion handler."""
    c = import_comfy(device)
    keys = pack_module("nodes.keys")
    return UNetCalls(forward_timestep_embed=c.openaimodel.forward_timestep_embed,
                     timestep_embedding=lambda t, dim: c.util.timestep_embedding(t, dim, repeat_only=False),
                     motion_handler=c.motion_patch.forward_motion, video_length_key=keys.VIDEO_LENGTH,
                     motion_options_key=keys.MOTION_OPTIONS)


# --- checkpoint headers (no ComfyUI, no weights) ----------------------------------------------------------

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """``{key: (dtype, shape)}`` and the metadata of a ``.safetensors`` file, from its header alone."""
    path = Path(path)
    where = errors.describe_source(path)
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist; check [model] bases in the config", path=path,
                              problem=errors.PROBLEM_MISSING_FILE)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is not a readable safetensors file ({exc}); the memory plan reads "
                              "checkpoint headers, so give it .safetensors files", path=path,
                              problem=errors.PROBLEM_UNREADABLE) from exc
    metadata = header.pop("__metadata__", None) or {}
    entries = {k: (_SAFETENSORS_DTYPES.get(v.get("dtype"), torch.float32), tuple(v.get("shape", ())))
               for k, v in header.items()}
    return entries, metadata


def unet_config_from_header(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict | None:
    """The UNet settings ``nodes.guards.check_sd15_unet`` judges, read off key shapes (None: no ldm UNet)."""
    unet = {k[len(UNET_PREFIX):]: shape for k, (_, shape) in entries.items() if k.startswith(UNET_PREFIX)}
    if "input_blocks.0.0.weight" not in unet:
        return None
    model_channels = unet["input_blocks.0.0.weight"][0]
    blocks = sorted({int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")})
    widths = [unet[k][0] for i in blocks if (k := f"input_blocks.{i}.0.out_layers.3.weight") in unet]
    pairs = len(widths) % 2 == 0 and all(a == b for a, b in zip(widths[::2], widths[1::2]))
    mult = [w // model_channels for w in (widths[::2] if pairs else widths)]
    to_k = next((shape for k, shape in unet.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for k, shape in unet.items() if k.endswith(".proj_in.weight")), None)
    adm = unet.get("label_emb.0.0.weight")
    return {"model_channels": model_channels, "channel_mult": mult,
            "num_res_blocks": 2 if pairs else None,
            "context_dim": to_k[1] if to_k else None, "adm_in_channels": adm[1] if adm else None,
            "use_linear_in_transformer": proj_in is not None and len(proj_in) == 2}


def check_sd15_checkpoint(path, entries=None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a full SD1.5 checkpoint (UNet, CLIP, VAE), from the
    header (``.safetensors``); other formats are judged by ComfyUI's detection when loaded."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{errors.describe_source(path)} does not exist; check [model] bases",
                                  path=path, problem=errors.PROBLEM_MISSING_FILE)
        return
    entries = entries if entries is not None else read_header(path)[0]
    config = unet_config_from_header(entries)
    where = errors.describe_source(path)
    if config is None:
        diffusers = any(k.startswith(("down_blocks.", "conv_in.")) for k in entries)
        motion = any(".motion_modules." in k for k in entries)
        what = ("a motion module" if motion else "a diffusers-format UNet" if diffusers
                else "not a Stable Diffusion checkpoint")
        raise CheckpointError(
            f"{where} has no {UNET_PREFIX}* weights: it is {what}. A base must be a single-file SD1.5 "
            "checkpoint (UNet, text encoder and VAE), the kind Load Checkpoint reads.", path=path,
            problem=errors.PROBLEM_WRONG_KIND, kind="not_sd15")
    try:
        guards.check_sd15_unet(config, "checkpoint", node=f"training base {path.name}")
    except guards.ModelFamilyError as exc:
        raise CheckpointError(str(exc), path=path, problem=errors.PROBLEM_WRONG_KIND, kind="not_sd15") from exc


# --- one checkpoint --------------------------------------------------------------------------------------

class Checkpoint:
    """One SD1.5 checkpoint file, read through ComfyUI's loader when a part of it is first needed.

    ``unet()`` is the frozen ``UNetModel`` (the object users sample with); ``patcher()`` its ComfyUI
    ``ModelPatcher``; ``clip()``/``vae()`` the text encoder and VAE, loaded apart from the UNet so a training
    run that only needs conditioning once can drop them (``release_encoders``).
    """

    def __init__(self, path, *, device: str = "auto"):
        self.path = Path(path)
        self.device = device
        check_sd15_checkpoint(self.path)
        self._patcher = None
        self._clip = None
        self._vae = None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def _load(self, *, model: bool, encoders: bool):
        c = import_comfy(self.device)
        with torch.inference_mode(False):
            try:
                out = c.sd.load_checkpoint_guess_config(str(self.path), output_vae=encoders, output_clip=encoders,
                                                        output_model=model)
            except RuntimeError as exc:
                raise CheckpointError(f"ComfyUI could not load {errors.describe_source(self.path)}: {exc}",
                                      path=self.path, problem=errors.PROBLEM_WRONG_KIND) from exc
        return out

    def patcher(self):
        if self._patcher is None:
            patcher = self._load(model=True, encoders=False)[0]
            model_config = patcher.model.model_config
            try:
                guards.check_sd15_unet(getattr(model_config, "unet_config", None), type(model_config).__name__,
                                       node=f"training base {self.path.name}")
            except guards.ModelFamilyError as exc:
                raise CheckpointError(str(exc), path=self.path, problem=errors.PROBLEM_WRONG_KIND,
                                      kind="not_sd15") from exc
            unet = patcher.model.diffusion_model
            unet.requires_grad_(False)
            unet.eval()
            self._patcher = patcher
        return self._patcher

    def unet(self):
        return self.patcher().model.diffusion_model

    def _encoders(self):
        if self._clip is None:
            _, self._clip, self._vae, _ = self._load(model=False, encoders=True)
        return self._clip, self._vae

    def clip(self):
        return self._encoders()[0]

    def vae(self):
        return self._encoders()[1]

    def latent_scale(self, latent: torch.Tensor, direction: str) -> torch.Tensor:
        """VAE latent -> diffusion space (``"in"``) or back (``"out"``), by SD1.5's latent format (x 0.18215)."""
        latent_format = import_comfy(self.device).latent_formats.SD15()
        return latent_format.process_in(latent) if direction == "in" else latent_format.process_out(latent)

    def release_encoders(self) -> None:
        self._clip = self._vae = None
        _collect(self.device)

    def release(self) -> None:
        self._patcher = self._clip = self._vae = None
        _collect(self.device)


def _collect(device: str) -> None:
    c = import_comfy(device)
    c.model_management.unload_all_models()  # ComfyUI's list of loaded models holds references too
    c.model_management.cleanup_models_gc()
    gc.collect()


def open_checkpoints(paths: Sequence, *, device: str = "auto") -> list[Checkpoint]:
    if not paths:
        raise errors.InvalidInputError("[model] bases lists no SD1.5 checkpoint; give at least one file")
    return [Checkpoint(p, device=device) for p in paths]


# --- frozen bases and the discriminator backbone ------------------------------------------------------------

def make_base(index: int, checkpoint: Checkpoint, *, lazy: bool = True) -> SD15Base:
    """The frozen base of lane ``index`` (CONTRACT ``FrozenBase``) on the checkpoint's ComfyUI UNet."""
    calls = unet_calls(checkpoint.device)
    if lazy:
        def load():
            # the checkpoint forgets the UNet once handed over, so a base's unload() really frees it
            unet = checkpoint.unet()
            checkpoint.release()
            return unet
        return SD15Base(index, None, calls, load=load, name=checkpoint.path.name)
    return SD15Base(index, checkpoint.unet(), calls, name=checkpoint.path.name)


def meta_base(index: int, path, *, device: str = "auto") -> SD15Base:
    """A base whose UNet is built by ComfyUI on the ``meta`` device from the checkpoint's header: the shapes
    the memory plan traces, no weight read."""
    entries, metadata = read_header(path)
    check_sd15_checkpoint(path, entries)
    c = import_comfy(device)
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in entries.items()
             if k.startswith(UNET_PREFIX)}
    model_config = c.model_detection.model_config_from_unet(state, UNET_PREFIX, metadata=metadata)
    if model_config is None:
        raise CheckpointError(f"ComfyUI does not recognise the UNet in {errors.describe_source(path)}",
                              path=path, problem=errors.PROBLEM_WRONG_KIND, kind="not_sd15")
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = model_config.get_model(state, UNET_PREFIX, device="meta")
    return SD15Base(index, model.diffusion_model, unet_calls(device), name=Path(path).name)


def make_backbone(base: SD15Base, teacher, *, trainable: str = "full") -> UNetEncoderBackbone:
    """A fresh discriminator backbone from ``base``'s UNet and the teacher's down/mid motion modules."""
    # read_weights: a base that is not loaded stays unloaded (its copy is dropped once the backbone is built),
    # so a rank that never runs base 0, or a CPU run that holds one base at a time, does not keep it
    return UNetEncoderBackbone(base.read_weights(), teacher, base.calls, trainable=trainable)


# --- the dataset builders' callables (CONTRACT 7) ---------------------------------------------------------

def _prompt_cond(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def text_encoder(checkpoints: Sequence[Checkpoint]) -> Callable[[int, list[str]], torch.Tensor]:
    """``encode_text(base_index, prompts) -> [len(prompts), tokens, 768]`` (CPU) with each base's own CLIP."""
    def encode_text(base_index: int, prompts: list[str]) -> torch.Tensor:
        clip = checkpoints[base_index].clip()
        rows = []
        with torch.inference_mode(False), torch.no_grad():
            for prompt in prompts:
                cond = clip.encode_from_tokens(clip.tokenize(prompt))
                rows.append(cond.detach().float().cpu().clone())
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise errors.InvalidInputError(
                f"prompts encode to different token counts {sorted(shapes)} (a prompt over 75 tokens becomes "
                "two chunks); shorten the long prompts to at most 75 CLIP tokens")
        return torch.cat(rows, dim=0) if rows else torch.empty(0, 77, 768)
    return encode_text


def image_encoder(checkpoints: Sequence[Checkpoint]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``encode_images(base_index, frames [F, H, W, 3] in 0..1) -> [F, 4, H/8, W/8]`` in diffusion space."""
    def encode_images(base_index: int, frames: torch.Tensor) -> torch.Tensor:
        ckpt = checkpoints[base_index]
        with torch.inference_mode(False), torch.no_grad():
            raw = ckpt.vae().encode(frames[..., :3])
            return ckpt.latent_scale(raw.float(), "in").cpu().clone()
    return encode_images


def vae_decoder(checkpoint: Checkpoint) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode(latents [F, 4, h, w] in diffusion space) -> frames [F, H, W, 3]`` in 0..1 (for validation)."""
    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            frames = checkpoint.vae().decode(checkpoint.latent_scale(latents.detach().float().cpu(), "out"))
            return frames.reshape(-1, *frames.shape[-3:]).float().cpu().clone()
    return decode


def teacher_sampler(checkpoints: Sequence[Checkpoint], teacher, *, teacher_path: str = "",
                    steps: int | None = None, cfg: float = TEACHER_CFG, sampler_name: str = TEACHER_SAMPLER,
                    scheduler: str = TEACHER_SCHEDULER) -> Callable[..., torch.Tensor]:
    """``sample(base_index, prompt, seed, frames, height, width) -> [frames, 4, height/8, width/8]``: the
    AnimateDiff teacher through the pack's Apply Motion Module patch and ComfyUI's own sampler (what users
    sample), empty negative prompt; ``height``/``width`` in pixels (multiples of 8); latents in diffusion space.

    Only one base's UNet stays loaded: moving to another base releases the previous one. ``steps`` None is
    :data:`TEACHER_STEPS`, read when the sampler is made (a CPU smoke test may lower it).
    """
    steps = int(steps if steps is not None else TEACHER_STEPS)
    c = import_comfy(checkpoints[0].device if checkpoints else "auto")
    mp = c.motion_patch
    handle = mp.MotionModuleHandle(mp.motion_patcher(teacher), teacher.info, str(teacher_path))
    # The patched model of the active base lives as long as that base is active: a clone made per clip would
    # die after each clip while ComfyUI still lists its motion patcher as loaded, which ComfyUI reports as a
    # leak and answers with a full garbage collection before every clip.
    state = {"active": None, "model": None}

    def sample(base_index: int, prompt: str, seed: int, frames: int, height: int, width: int) -> torch.Tensor:
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise errors.InvalidInputError(f"teacher clips need a pixel size in multiples of 8, got {width}x{height}")
        if state["active"] is not None and state["active"] != base_index:
            state["model"] = None
            checkpoints[state["active"]].release()
        state["active"] = base_index
        ckpt = checkpoints[base_index]
        with torch.inference_mode(False), torch.no_grad():
            if state["model"] is None:
                state["model"] = mp.apply_motion_module(ckpt.patcher(), handle)
            model = state["model"]
            clip = ckpt.clip()
            positive, negative = _prompt_cond(clip, prompt), _prompt_cond(clip, "")
            latent = torch.zeros(int(frames), 4, height // 8, width // 8)
            noise = c.sample.prepare_noise(latent, int(seed))
            out = c.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=int(seed))
            return ckpt.latent_scale(out.float().cpu(), "in").clone()
    return sample


def load_teacher(path, *, materialize: bool = True):
    """The teacher motion module (any SD1.5 AnimateDiff format, our loader), or its meta-device skeleton
    from the file's header when ``materialize`` is False."""
    if materialize:
        return checkpoints_io.load_motion_module(path, dtype=torch.float32)
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise errors.InvalidInputError(
            f"the memory plan reads the teacher's header and needs a .safetensors file, got {path.name}")
    entries, metadata = read_header(path)
    # detect() reads names and shapes only; the module is then built empty on meta (no finiteness check
    # of values that do not exist)
    info = checkpoints_io.detect({k: shape for k, (_, shape) in entries.items()}, path=path, metadata=metadata)
    motion_module = pack_module("lightning.motion_module")
    return motion_module.MotionModuleSet(info.channels, has_mid=info.has_mid, pe_length=info.pe_length,
                                         heads=checkpoints_io.HEADS, norm_groups=checkpoints_io.NORM_GROUPS,
                                         info=info, device="meta")
