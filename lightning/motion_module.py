"""The AnimateDiff temporal transformer and the set of them that rides along an SD1.5 UNet.

Math (notes: lightning-math.md §1, the original ``VanillaTemporalModule``): for a clip of F frames,

    h   = proj_in(GroupNorm(x))                      tokens: one per frame and pixel, C channels
    h  += attn_i(LayerNorm_i(h) + pe[:F])            i = 0, 1; self-attention over the F frames of each pixel
    h  += W2 · (a ⊙ gelu(g)),  [a, g] = W1 · LayerNorm_ff(h)          (GEGLU feed-forward, inner 4C)
    out = x + proj_out(h)

``pe`` is the fixed sinusoidal table, added to the normed input of *each* attention (keys and values see
it too). Motion scale multiplies the keys, i.e. it sharpens or flattens the attention over frames.

Parameter names equal the keys of the original AnimateDiff checkpoints, so loading one is a plain
``load_state_dict``. The positional tables are non-persistent buffers: ``checkpoints`` fills them from
the file when it has them (so a round trip is lossless) and they are regenerated otherwise.

Speed (see ``benchmarks/bench_motion_module.py``): the forward pass works on the frame-major token layout
``(clips, frames, pixels, C)`` that falls out of the input without a copy. GroupNorm's affine is folded into
proj_in, which reads the channel-first input as a transposed GEMM operand; the motion scale goes into SDPA's
softmax scale; SDPA's output is already frame-major; residual adds happen inside the GEMMs (``addmm_``);
proj_out writes the channel-first result straight onto the residual; across-frames statistics come from
the fused GroupNorm kernel. Without autograd, intermediates are overwritten in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

NORM_MODES = ("per_frame", "across_frames")
GROUP_NORM_EPS = 1e-6  # the original motion module's GroupNorm eps (LayerNorms keep torch's 1e-5)
DEFAULT_CHANNELS = (320, 640, 1280, 1280)  # SD1.5 down-block widths
ANIMATELCM_PE_LENGTH = 64  # AnimateLCM hard-codes its table length and does not store it


def sinusoidal_positions(length: int, channels: int) -> torch.Tensor:
    """The AnimateDiff positional table ``[1, length, channels]`` (sin on even, cos on odd channels).

    Always computed on the CPU in float32 with the same operations as the original code, so a table we
    write is bit-identical to the one the original (and diffusers) would have written.
    """
    if channels % 2:
        raise InvalidInputError(f"positional encoding needs an even channel count, got {channels}")
    position = torch.arange(length, device="cpu").unsqueeze(1)
    div_term = torch.exp(torch.arange(0, channels, 2, device="cpu") * (-math.log(10000.0) / channels))
    table = torch.zeros(1, length, channels, device="cpu")
    table[0, :, 0::2] = torch.sin(position * div_term)
    table[0, :, 1::2] = torch.cos(position * div_term)
    return table


def _check_norm_mode(mode: str) -> str:
    if mode not in NORM_MODES:
        raise InvalidInputError(f"norm_mode must be one of {NORM_MODES}, got {mode!r}")
    return mode


# --- containers whose only job is to give parameters their original checkpoint names -------------------

class _PositionalEncoding(nn.Module):
    def __init__(self, channels: int, length: int, device=None):
        super().__init__()
        target = torch.device(device) if device is not None else torch.empty(0).device  # honours torch.device()
        if target.type == "meta":  # shapes only (loaders fill tables in later)
            table = torch.empty(1, length, channels, device="meta")
        else:
            table = sinusoidal_positions(length, channels).to(target)
        self.register_buffer("pe", table, persistent=False)


class _TemporalSelfAttention(nn.Module):
    def __init__(self, channels: int, pe_length: int, factory: dict):
        super().__init__()
        self.to_q = nn.Linear(channels, channels, bias=False, **factory)
        self.to_k = nn.Linear(channels, channels, bias=False, **factory)
        self.to_v = nn.Linear(channels, channels, bias=False, **factory)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, **factory), nn.Identity()])
        self.pos_encoder = _PositionalEncoding(channels, pe_length, factory.get("device"))


class _GegluProjection(nn.Module):
    def __init__(self, channels: int, factory: dict):
        super().__init__()
        self.proj = nn.Linear(channels, 8 * channels, **factory)


class _FeedForward(nn.Module):
    def __init__(self, channels: int, factory: dict):
        super().__init__()
        self.net = nn.ModuleList([_GegluProjection(channels, factory), nn.Identity(),
                                  nn.Linear(4 * channels, channels, **factory)])


class _TemporalBlock(nn.Module):
    def __init__(self, channels: int, pe_length: int, factory: dict):
        super().__init__()
        self.attention_blocks = nn.ModuleList([_TemporalSelfAttention(channels, pe_length, factory)
                                               for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(channels, **factory) for _ in range(2)])
        self.ff = _FeedForward(channels, factory)
        self.ff_norm = nn.LayerNorm(channels, **factory)


class _TemporalTransformerBody(nn.Module):
    def __init__(self, channels: int, pe_length: int, norm_groups: int, factory: dict):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=GROUP_NORM_EPS, **factory)
        self.proj_in = nn.Linear(channels, channels, **factory)
        self.transformer_blocks = nn.ModuleList([_TemporalBlock(channels, pe_length, factory)])
        self.proj_out = nn.Linear(channels, channels, **factory)


# --- the module ----------------------------------------------------------------------------------------

class TemporalTransformer(nn.Module):
    """One AnimateDiff temporal module (the original 'VanillaTemporalModule' math).

    ``norm_mode`` decides what the input GroupNorm averages over: ``"per_frame"`` (the original code,
    ComfyUI and AnimateDiff-Evolved; the default) or ``"across_frames"`` (diffusers'
    ``AnimateDiffTransformer3D``, which normalises the 5-D clip). Same weights, different function.
    """

    def __init__(self, channels: int, *, heads: int = 8, pe_length: int = 32, norm_mode: str = "per_frame",
                 norm_groups: int = 32, zero_init: bool = True, device=None, dtype=None):
        super().__init__()
        if channels <= 0 or channels % heads or channels % norm_groups or channels % 2:
            raise InvalidInputError(
                f"channels={channels} must be positive, even, and divisible by heads={heads} and "
                f"norm_groups={norm_groups}")
        if pe_length < 1:
            raise InvalidInputError(f"pe_length must be at least 1, got {pe_length}")
        self.channels = channels
        self.heads = heads
        self.norm_groups = norm_groups
        self.norm_mode = _check_norm_mode(norm_mode)
        factory = {"device": device, "dtype": dtype}
        self.temporal_transformer = _TemporalTransformerBody(channels, pe_length, norm_groups, factory)
        if zero_init:
            # A fresh module is an exact identity, so inserting it leaves the image model untouched.
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    @property
    def pe_length(self) -> int:
        return self._attentions()[0].pos_encoder.pe.shape[1]

    def _attentions(self) -> Sequence[_TemporalSelfAttention]:
        return self.temporal_transformer.transformer_blocks[0].attention_blocks

    def set_positional_tables(self, tables: Sequence[torch.Tensor] | None = None, *, length: int | None = None):
        """Replace both attentions' tables: with given ``[1, L, C]`` tensors, or regenerated at ``length``."""
        attentions = self._attentions()
        if tables is None:
            if length is None:
                raise InvalidInputError("set_positional_tables needs tables or a length")
            tables = [sinusoidal_positions(length, self.channels)] * len(attentions)
        if len(tables) != len(attentions):
            raise InvalidInputError(f"expected {len(attentions)} positional tables, got {len(tables)}")
        for attention, table in zip(attentions, tables):
            if table.dim() != 3 or table.shape[0] != 1 or table.shape[2] != self.channels:
                raise InvalidInputError(
                    f"positional table must have shape [1, L, {self.channels}], got {list(table.shape)}")
            old = attention.pos_encoder.pe
            attention.pos_encoder.pe = table.detach().to(device=old.device, dtype=old.dtype).clone()

    # -- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, video_length: int, *, scale: float = 1.0) -> torch.Tensor:
        """x: [(batch*frames), C, H, W] with frames contiguous per clip (batch//video_length clips, cond and
        uncond clips concatenated whole). Returns the same shape. norm_mode: "per_frame" | "across_frames"."""
        frames = int(video_length)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise InvalidInputError(
                f"motion module input must be [(clips*frames), {self.channels}, H, W], got {list(x.shape)}")
        batch_frames, channels, height, width = x.shape
        if frames < 1 or batch_frames % frames:
            raise InvalidInputError(
                f"batch of {batch_frames} images is not a whole number of {video_length}-frame clips; "
                "pass the true video_length (cond and uncond clips must be concatenated whole)")
        if frames > self.pe_length:
            raise InvalidInputError(
                f"video_length {frames} exceeds this motion module's positional encoding length "
                f"{self.pe_length}; sample at most {self.pe_length} frames at once (use context windows)")
        clips, pixels = batch_frames // frames, height * width
        body = self.temporal_transformer
        block = body.transformer_blocks[0]
        # In-place tricks save whole passes over memory but would break autograd's saved tensors; under
        # autocast (training in bf16/fp16) the in-place GEMMs would mix the autocast and the weight dtypes.
        inplace = not (torch.is_grad_enabled()
                       and (x.requires_grad or any(p.requires_grad for p in self.parameters()))) \
            and not _autocast_enabled(x.device.type)
        input_dtype = x.dtype
        x = x.to(body.proj_in.weight.dtype)  # e.g. fp32 activations reaching an fp16 module

        x_flat = x.reshape(batch_frames, channels, pixels)
        normed = self._normalise(x_flat, clips, frames, not inplace)  # [(b f), C, hw], no affine yet

        # proj_in(γ ⊙ x̂ + β) = (W diag γ) x̂ + (W β + b): fold the GroupNorm affine into the projection.
        w_in = body.proj_in.weight * body.norm.weight
        b_in = torch.addmv(body.proj_in.bias, body.proj_in.weight, body.norm.bias)
        # normed.mT is the token-major view; BLAS reads it transposed, no copy is made.
        tokens = torch.matmul(normed.mT, w_in.t())
        tokens = tokens.add_(b_in) if inplace else tokens + b_in
        h = tokens.view(clips, frames, pixels, channels)  # frame-major tokens

        for attention, norm in zip(block.attention_blocks, block.norms):
            h = self._attend(h, attention, norm, frames, scale, inplace)
        h = self._feed_forward(h, block, inplace)

        # proj_out written channel-first onto the residual: out = x + b_out + W_out · hᵀ.
        w_out = body.proj_out.weight.expand(batch_frames, channels, channels)
        h_t = h.view(batch_frames, pixels, channels).mT
        out = x_flat + body.proj_out.bias[:, None]
        out = out.baddbmm_(w_out, h_t) if inplace else torch.baddbmm(out, w_out, h_t)
        return out.view(batch_frames, channels, height, width).to(input_dtype)

    def _normalise(self, x_flat: torch.Tensor, clips: int, frames: int, exact_grad: bool) -> torch.Tensor:
        groups = self.norm_groups
        if self.norm_mode == "per_frame":
            return F.group_norm(x_flat, groups, None, None, GROUP_NORM_EPS)
        # Across frames: per-frame group statistics, pooled exactly per clip (total variance = mean of the
        # per-frame variances + variance of the per-frame means), then one normalising pass.
        batch_frames, channels, pixels = x_flat.shape
        grouped = x_flat.view(clips, frames, groups, (channels // groups) * pixels)
        if exact_grad:
            var_f, mean_f = torch.var_mean(grouped, dim=3, keepdim=True, correction=0)
        else:
            # The fused GroupNorm kernel yields per-frame statistics far faster than var_mean; its
            # statistics carry no gradient, hence the var_mean branch above under autograd.
            _, mean_f, rstd_f = torch.native_group_norm(x_flat, None, None, batch_frames, channels, pixels,
                                                        groups, GROUP_NORM_EPS)
            mean_f = mean_f.view(clips, frames, groups, 1)
            var_f = rstd_f.view(clips, frames, groups, 1).float().pow(-2) - GROUP_NORM_EPS
        var_f, mean_f = var_f.float(), mean_f.float()
        mean = mean_f.mean(dim=1, keepdim=True)
        var = var_f.mean(dim=1, keepdim=True) + (mean_f - mean).square().mean(dim=1, keepdim=True)
        rstd = torch.rsqrt(var.clamp_min(0) + GROUP_NORM_EPS)
        normed = torch.addcmul((-mean * rstd).to(x_flat.dtype), grouped, rstd.to(x_flat.dtype))
        return normed.view(batch_frames, channels, pixels)

    def _attend(self, h, attention: _TemporalSelfAttention, norm: nn.LayerNorm, frames: int, scale: float,
                inplace: bool) -> torch.Tensor:
        clips, _, pixels, channels = h.shape
        heads = self.heads
        head_dim = channels // heads
        normed = F.layer_norm(h, (channels,), norm.weight, norm.bias, norm.eps)
        pe = attention.pos_encoder.pe[0, :frames].to(normed.dtype).view(1, frames, 1, channels)
        normed = normed.add_(pe) if inplace else normed + pe

        # Separate q/k/v GEMMs: each output stays small enough for the allocator to recycle, where one
        # fused [tokens, 3C] result would be freshly paged in on every call.
        q_all, k_all, v_all = (F.linear(normed, w).view(clips, frames, pixels, heads, head_dim)
                               for w in (attention.to_q.weight, attention.to_k.weight, attention.to_v.weight))
        # Motion scale multiplies k, which is the same as multiplying SDPA's softmax scale.
        sdpa_scale = float(scale) / math.sqrt(head_dim)
        outs = []
        for clip in range(clips):
            # [pixels, heads, frames, head_dim] views; attention runs over the frames of each pixel.
            q, k, v = (t[clip].permute(1, 2, 0, 3) for t in (q_all, k_all, v_all))
            o = F.scaled_dot_product_attention(q, k, v, scale=sdpa_scale)
            outs.append(o.permute(2, 0, 1, 3).reshape(frames, pixels, channels))
        attended = outs[0].unsqueeze(0) if clips == 1 else torch.stack(outs)

        to_out = attention.to_out[0]
        return _add_linear(h, attended, to_out.weight, to_out.bias, inplace)

    def _feed_forward(self, h, block: _TemporalBlock, inplace: bool) -> torch.Tensor:
        channels = h.shape[-1]
        normed = F.layer_norm(h, (channels,), block.ff_norm.weight, block.ff_norm.bias, block.ff_norm.eps)
        proj, down = block.ff.net[0].proj, block.ff.net[2]
        value, gate = F.linear(normed, proj.weight, proj.bias).chunk(2, dim=-1)
        # GEGLU: value ⊙ gelu(gate); without autograd the product overwrites the gelu output.
        activated = F.gelu(gate).mul_(value) if inplace else value * F.gelu(gate)
        return _add_linear(h, activated, down.weight, down.bias, inplace)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device form
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _add_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                inplace: bool) -> torch.Tensor:
    """``h + x Wᵀ + b``; without autograd the GEMM accumulates straight into ``h`` (no extra passes)."""
    if not inplace:
        return F.linear(x, weight, bias) + h
    flat = h.view(-1, h.shape[-1])
    flat.add_(bias).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return h


# --- the set of modules for one UNet ---------------------------------------------------------------------

@dataclasses.dataclass
class MotionModuleInfo:
    """What a module set is and where it came from.

    ``format``: ``"original"`` (AnimateDiff / ComfyUI key names), ``"diffusers"`` (``MotionAdapter``) or
    ``"new"`` (built in memory). ``version``: ``"v1"``, ``"v2"``, ``"v3"`` or ``"animatelcm"``; every
    Lightning file is ``"v2"`` with ``lightning_steps`` set. ``channels`` are the down-block widths.
    """

    format: str = "new"
    version: str = "v2"
    pe_length: int = 32
    has_mid: bool = True
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    lightning_steps: int | None = None
    source: str | None = None
    dtype: str | None = None
    tensor_count: int | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """One human line, e.g. ``AnimateDiff-Lightning 4-step (v2 layout, original keys, pe 32, with mid block)``."""
        names = {"v1": "AnimateDiff v1", "v2": "AnimateDiff v2", "v3": "AnimateDiff v3", "animatelcm": "AnimateLCM"}
        origin = {"original": "original keys", "diffusers": "diffusers keys"}.get(self.format, "built in memory")
        details = f"{origin}, pe {self.pe_length}, {'with' if self.has_mid else 'no'} mid block"
        if self.lightning_steps:
            return f"AnimateDiff-Lightning {self.lightning_steps}-step ({self.version} layout, {details})"
        return f"{names.get(self.version, self.version)} ({details})"


def version_from_layout(has_mid: bool, pe_length: int | None) -> str:
    """The AnimateDiff generation a layout belongs to (same rules as AnimateDiff-Evolved and diffusers).

    ``pe_length`` None means the file stores no positional tables, which only AnimateLCM does.
    """
    if pe_length is None:
        return "animatelcm"
    if has_mid:
        return "v2"
    return "v1" if pe_length == 24 else "v3"


class _MotionBlock(nn.Module):
    """Holds ``motion_modules`` so that names read ``down_blocks.0.motion_modules.1...`` as in the files."""

    def __init__(self, modules: Sequence[TemporalTransformer]):
        super().__init__()
        self.motion_modules = nn.ModuleList(modules)


class MotionModuleSet(nn.Module):
    """All temporal modules for one SD1.5-shaped UNet: 2 per down level, optional 1 mid, 3 per up level.

    ``state_dict()`` keys are the original AnimateDiff checkpoint keys (without the positional tables,
    which ``lightning.checkpoints`` reads and writes itself).
    """

    LAYERS_PER_DOWN_LEVEL = 2
    LAYERS_PER_UP_LEVEL = 3

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS, *, has_mid: bool = True, pe_length: int = 32,
                 heads: int = 8, norm_mode: str = "per_frame", norm_groups: int = 32, zero_init: bool = True,
                 info: MotionModuleInfo | None = None, device=None, dtype=None):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise InvalidInputError("a motion module set needs at least one level of channels")

        def make(c):
            return TemporalTransformer(c, heads=heads, pe_length=pe_length, norm_mode=norm_mode,
                                       norm_groups=norm_groups, zero_init=zero_init, device=device, dtype=dtype)

        self.down_blocks = nn.ModuleList(
            _MotionBlock([make(c) for _ in range(self.LAYERS_PER_DOWN_LEVEL)]) for c in channels)
        self.mid_block = _MotionBlock([make(channels[-1])]) if has_mid else None
        self.up_blocks = nn.ModuleList(
            _MotionBlock([make(c) for _ in range(self.LAYERS_PER_UP_LEVEL)]) for c in reversed(channels))
        self.info = info if info is not None else MotionModuleInfo(
            format="new", version=version_from_layout(has_mid, pe_length), pe_length=pe_length, has_mid=has_mid,
            channels=channels)

    @classmethod
    def from_channels(cls, channels: Sequence[int] = DEFAULT_CHANNELS, *, has_mid: bool = True,
                      pe_length: int = 32, **kwargs) -> "MotionModuleSet":
        """A fresh set (zero-initialised proj_out, so an identity) for UNet down-block widths ``channels``."""
        return cls(channels, has_mid=has_mid, pe_length=pe_length, **kwargs)

    @property
    def down(self) -> list[nn.ModuleList]:
        return [level.motion_modules for level in self.down_blocks]

    @property
    def mid(self) -> TemporalTransformer | None:
        return self.mid_block.motion_modules[0] if self.mid_block is not None else None

    @property
    def up(self) -> list[nn.ModuleList]:
        return [level.motion_modules for level in self.up_blocks]

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(level[0].channels for level in self.down)

    @property
    def has_mid(self) -> bool:
        return self.mid_block is not None

    @property
    def pe_length(self) -> int:
        return self.modules_in_unet_order()[0].pe_length

    def modules_in_unet_order(self) -> list[TemporalTransformer]:
        """Down modules (input-block order), then mid, then up modules (output-block order)."""
        ordered = [m for level in self.down for m in level]
        if self.mid is not None:
            ordered.append(self.mid)
        ordered.extend(m for level in self.up for m in level)
        return ordered

    def named_modules_in_unet_order(self) -> list[tuple[str, TemporalTransformer]]:
        """Like :meth:`modules_in_unet_order` with each module's key prefix (``down_blocks.0.motion_modules.0``)."""
        names = {id(m): name for name, m in self.named_modules()}
        return [(names[id(m)], m) for m in self.modules_in_unet_order()]

    def set_norm_mode(self, mode: str) -> None:
        _check_norm_mode(mode)
        for module in self.modules_in_unet_order():
            module.norm_mode = mode

    @property
    def norm_mode(self) -> str:
        modes = {m.norm_mode for m in self.modules_in_unet_order()}
        return modes.pop() if len(modes) == 1 else "mixed"
