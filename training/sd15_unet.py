"""SD1.5 lanes and the discriminator backbone on ComfyUI's own UNet, without importing ComfyUI.

What is trained must be exactly what users sample, so a frozen base here is ComfyUI's ``UNetModel`` (the
object ``CheckpointLoaderSimple`` gives), with the motion module put into it by the pack's own injection
(``nodes.placement.MotionInjection``) and called with the same ``forward_timestep_embed_patch`` handler and
clip-length option the Apply Motion Module node sets. No second UNet implementation exists in this package.

ComfyUI's few functions this module needs (its ``forward_timestep_embed``, ``timestep_embedding`` and our
node's patch handler) come in through :class:`UNetCalls`, which ``training.comfy_backend`` fills from the real
ComfyUI; CI fills it with stand-ins for tiny fake UNets of the same block structure.

The discriminator backbone follows AnimateDiff-Lightning §3.3 (after SDXL-Lightning §3.3): the encoder (time
embedding and input blocks) and middle block of the diffusion UNet, with the motion modules of those blocks,
initialised from the base model and the teacher motion module, and trained. ComfyUI calls the UNet's stages
through ``forward_timestep_embed`` rather than as modules, so hooks on stages never fire; instead the
backbone re-runs the same steps as the UNet's own forward up to the middle block, which reproduces the full
forward's middle-block output exactly (a test checks this on the real UNet).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._core import pack_module

errors = pack_module("lightning.errors")
placement = pack_module("nodes.placement")

TRAINABLE = ("full", "light")


@dataclasses.dataclass(frozen=True)
class UNetCalls:
    """ComfyUI's functions for driving its UNet (see the module docstring)."""

    forward_timestep_embed: Callable  # ComfyUI's per-stage dispatcher (ResBlock, transformer, foreign layers)
    timestep_embedding: Callable  # sinusoidal timestep features, (timesteps, dim) -> [N, dim]
    motion_handler: Callable  # the Apply node's forward_timestep_embed_patch handler for temporal modules
    video_length_key: str  # transformer_options key the handler reads the clip length from
    motion_options_key: str  # transformer_options key of the handler's settings (motion scale)


def motion_options(calls: UNetCalls, module_class: type | None, frames: int) -> dict:
    """The ``transformer_options`` an Apply Motion Module clone gives the UNet for clips of ``frames``."""
    options: dict[str, Any] = {calls.video_length_key: int(frames), calls.motion_options_key: {"scale": 1.0}}
    if module_class is not None:
        options["patches"] = {"forward_timestep_embed_patch": [(module_class, calls.motion_handler)]}
    return options


def expand_cond(cond: torch.Tensor | None, rows: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int]:
    """Per-clip text conditioning ``[clips, tokens, dim]`` -> per-frame context, and the frames per clip."""
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise errors.InvalidInputError(
            "an SD1.5 base needs per-clip text conditioning [clips, tokens, 768]; got "
            f"{type(cond).__name__ if not isinstance(cond, torch.Tensor) else list(cond.shape)}")
    clips = cond.shape[0]
    if clips == 0 or rows % clips:
        raise errors.InvalidInputError(f"{rows} frames do not split into {clips} clips of equal length")
    frames = rows // clips
    return cond.to(device=device, dtype=dtype).repeat_interleave(frames, dim=0), frames


def _module_class(motion_module) -> type | None:
    if motion_module is None:
        return None
    return type(motion_module.modules_in_unet_order()[0])


def _unet_dtype(unet: nn.Module) -> torch.dtype:
    # the weights' dtype, not UNetModel.dtype: that attribute is set once at construction and .to() skips it
    return next(unet.parameters()).dtype


class SD15Base(nn.Module):
    """A frozen base (``lightning.distill.FrozenBase``): ComfyUI's SD1.5 UNet with a motion module plugged in
    for the duration of each call.

    ``forward(x_in, timestep, cond, motion_module) -> eps`` takes the model input already scaled by
    1/sqrt(sigma^2 + 1) and the discrete timestep (what ComfyUI's model wrapper hands its UNet), expands the
    per-clip ``cond`` to frames, and runs the UNet with ``motion_module`` injected at AnimateDiff's places.
    The module is taken out again before returning, so the base never owns it: ``.to(device)`` on a base
    moves only its frozen weights, teacher and student can alternate call by call (putting 21 modules into
    and out of ``nn.Sequential`` stages costs microseconds), and autograd reaches the motion module through
    the saved graph while the frozen UNet weights get no gradient.

    ``load`` (optional) builds the UNet on first use instead of at construction, so a run can hold several
    bases without reading them all before the first iteration.
    """

    def __init__(self, index: int, unet: nn.Module | None, calls: UNetCalls, *,
                 load: Callable[[], nn.Module] | None = None, name: str = ""):
        super().__init__()
        if unet is None and load is None:
            raise errors.InvalidInputError("SD15Base needs a UNet or a loader")
        self.index = int(index)
        self.name = name
        self.calls = calls
        self._load = load
        self._pending: list[Callable] = []  # conversions (.to, .float) asked for before the weights were read
        # With bases swapped on a CPU-only run "parking" a base on the CPU saves nothing; dropping its weights
        # (read again from the page cache when its lane next runs) keeps one base in memory instead of all.
        self.release_when_parked = False
        self.unet = None
        if unet is not None:
            self._set_unet(unet)

    def _set_unet(self, unet: nn.Module) -> None:
        unet.requires_grad_(False)
        unet.eval()
        self.unet = unet

    @property
    def loaded(self) -> bool:
        return self.unet is not None

    def ensure_loaded(self) -> nn.Module:
        if self.unet is None:
            unet = self.read_weights()
            self._pending.clear()
            self._set_unet(unet)
        return self.unet

    def read_weights(self) -> nn.Module:
        """The UNet as this base would hold it, without keeping it: for a one-off copy (the discriminator's
        backbone) from a base that is not loaded - a rank that does not run this lane, or a parked base."""
        if self.unet is not None:
            return self.unet
        unet = self._load()
        for fn in self._pending:
            unet._apply(fn)
        return unet

    def unload(self) -> None:
        """Drop the weights (they are read again on next use); only for a base built with a loader."""
        if self._load is None:
            raise errors.InvalidInputError("this base has no loader to read its weights again; keep it loaded")
        self.unet = None

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if self.release_when_parked and device is not None and device.type == "cpu" and self._load is not None:
            self.unload()
            return self
        return super().to(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # A base that has not read its weights yet remembers the conversion for when it does.
        if self.unet is None:
            self._pending.append(fn)
            return self
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.unet is not None:
            self.unet.eval()  # frozen: dropout and the like stay off whatever the caller asks
        return self

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                motion_module: nn.Module | None) -> torch.Tensor:
        unet = self.ensure_loaded()
        dtype = _unet_dtype(unet)
        context, frames = expand_cond(cond, x_in.shape[0], dtype, x_in.device)
        options = motion_options(self.calls, _module_class(motion_module), frames)
        injection = placement.MotionInjection.for_module_set(motion_module) if motion_module is not None else None
        if injection is not None:
            injection.inject(unet)
        try:
            eps = unet(x_in.to(dtype), timesteps=timestep.to(device=x_in.device, dtype=torch.float32),
                       context=context, transformer_options=options)
        finally:
            if injection is not None:
                injection.eject(unet)
        return eps.to(x_in.dtype)


def encoder_insertions(input_blocks: nn.ModuleList, middle_block: nn.Sequential, motion_module
                       ) -> list[tuple[nn.Sequential, int, nn.Module]]:
    """(stage, index, module) for the down and mid motion modules in an encoder: the Apply node's placement
    rule (``nodes.placement.insertion_index``) applied to the input blocks and the middle block."""
    down = [m for level in motion_module.down for m in level]
    slots = [(stage, idx) for stage in input_blocks
             if (idx := placement.insertion_index(list(stage))) is not None]
    if len(slots) != len(down):
        raise errors.InvalidInputError(
            f"the UNet's input blocks have {len(slots)} places for temporal modules but the motion module "
            f"brings {len(down)}; this UNet does not have the SD1.5 layout")
    plan = [(stage, idx, m) for (stage, idx), m in zip(slots, down)]
    if motion_module.mid is not None:
        idx = placement.insertion_index(list(middle_block))
        if idx is None:
            raise errors.InvalidInputError("the UNet's middle block has no place for the mid motion module")
        plan.append((middle_block, idx, motion_module.mid))
    return plan


class UNetEncoderBackbone(nn.Module):
    """The discriminator backbone (``lightning.discriminator.Backbone``): a trainable copy of a UNet's time
    embedding, input blocks and middle block, with the down and mid motion modules of ``motion_module``.

    ``backbone(x_in, timestep, cond, extra_embedding, video_length)`` returns the middle block's output
    ``[(clips*frames), channels, h/8, w/8]``; ``extra_embedding`` is added to the time embedding where the
    UNet would add a class embedding (the discriminator's base index, §3.3).

    ``trainable``: ``"full"`` trains every weight (the paper); ``"light"`` freezes the copied SD1.5 layers and
    trains only the motion modules and the time embedding (the discriminator's own index embedding and head
    are always trained), for GPUs that cannot hold Adam state for the whole encoder.
    ``gradient_checkpointing`` (attribute, set by the loop) recomputes each block in backward
    (non-reentrant checkpoints), trading compute for activation memory.
    """

    def __init__(self, unet: nn.Module, motion_module, calls: UNetCalls, *, trainable: str = "full"):
        super().__init__()
        self.calls = calls
        self.trainable = trainable
        self.gradient_checkpointing = False
        self.model_channels = int(unet.model_channels)
        # Deep copies made here (outside inference mode) hold ordinary tensors that can be trained.
        with torch.inference_mode(False):
            self.time_embed = copy.deepcopy(unet.time_embed)
            self.input_blocks = copy.deepcopy(unet.input_blocks)
            self.middle_block = copy.deepcopy(unet.middle_block)
            motion = copy.deepcopy(motion_module) if motion_module is not None else None
        self.module_class = _module_class(motion)
        if motion is not None:
            for stage, idx, module in encoder_insertions(self.input_blocks, self.middle_block, motion):
                stage.insert(idx, module)
        self.set_trainable(trainable)
        self.embedding_dim = int(_last_linear(self.time_embed).out_features)
        self.channels = int(_output_channels(self.middle_block))

    def set_trainable(self, mode: str) -> None:
        """``"full"``: every weight trains; ``"light"``: only the motion modules and the time embedding."""
        if mode not in TRAINABLE:
            raise errors.InvalidInputError(f"discriminator trainable must be one of {TRAINABLE}, got {mode!r}")
        self.trainable = mode
        self.requires_grad_(mode == "full")
        if mode == "light":
            self.time_embed.requires_grad_(True)
            for module in self.motion_modules():
                module.requires_grad_(True)

    def motion_modules(self) -> list[nn.Module]:
        if self.module_class is None:
            return []
        return [m for m in self.modules() if isinstance(m, self.module_class)]

    def _run(self, name: str, index: int, stage: nn.Sequential, h, emb, context, options):
        options = dict(options, block=(name, index))
        return self.calls.forward_timestep_embed(stage, h, emb, context, options)

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                extra_embedding: torch.Tensor, video_length: int) -> torch.Tensor:
        weight = next(self.time_embed.parameters())
        dtype = weight.dtype
        context, frames = expand_cond(cond, x_in.shape[0], dtype, x_in.device)
        if frames != int(video_length):
            raise errors.InvalidInputError(
                f"discriminator input holds clips of {frames} frames but video_length is {video_length}")
        options = motion_options(self.calls, self.module_class, frames)
        options.update(original_shape=list(x_in.shape), transformer_index=0)
        h = x_in.to(dtype)
        t_emb = self.calls.timestep_embedding(timestep.to(device=x_in.device, dtype=torch.float32),
                                              self.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + extra_embedding.to(dtype)
        stages = [("input", i, stage) for i, stage in enumerate(self.input_blocks)] + [("middle", 0, self.middle_block)]
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for name, i, stage in stages:
            if use_checkpoint:
                h = checkpoint(self._run, name, i, stage, h, emb, context, options, use_reentrant=False)
            else:
                h = self._run(name, i, stage, h, emb, context, options)
        return h


def _last_linear(module: nn.Module) -> nn.Module:
    linears = [m for m in module.modules() if hasattr(m, "out_features")]
    if not linears:
        raise errors.InvalidInputError("the UNet's time embedding has no linear layer")
    return linears[-1]


def _output_channels(middle_block: nn.Sequential) -> int:
    for layer in reversed(list(middle_block)):
        channels = getattr(layer, "out_channels", None)
        if channels:
            return int(channels)
    raise errors.InvalidInputError("cannot tell the width of the UNet's middle block")


def middle_feature_size(latent_height: int, latent_width: int, frames: int, downsamples: int = 3
                        ) -> tuple[int, int, int]:
    """(frames, h, w) of the middle block's output: each SD1.5 Downsample (3x3, stride 2, padding 1) halves
    an axis rounding up, three times, so a 64x64 latent gives 8x8 and an 8x8 latent 1x1."""
    h, w = int(latent_height), int(latent_width)
    for _ in range(downsamples):
        h, w = (h + 1) // 2, (w + 1) // 2
    return int(frames), h, w
