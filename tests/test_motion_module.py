"""The temporal transformer against the equations, against diffusers, and the module set's structure."""

import math

import pytest
import torch

from lightning.errors import InvalidInputError, LightningError
from lightning.motion_module import MotionModuleSet, TemporalTransformer, sinusoidal_positions
from lightning.testing.motion import randomised




def equations(x, module: TemporalTransformer, frames: int, *, scale=1.0, across_frames=False):
    """The AnimateDiff temporal module written out directly from the paper/code equations (fp64)."""
    p = {k: v.double() for k, v in module.state_dict().items()}
    tt = "temporal_transformer."
    blk = tt + "transformer_blocks.0."
    x = x.double()
    bf, c, hgt, wid = x.shape
    clips, groups, heads = bf // frames, 32, 8
    # GroupNorm statistics: per image, or per clip over all of its frames.
    g = x.reshape(clips, frames, groups, c // groups, hgt * wid)
    dims = (1, 3, 4) if across_frames else (3, 4)
    mean = g.mean(dim=dims, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=dims, keepdim=True)
    xn = ((g - mean) / torch.sqrt(var + 1e-6)).reshape(bf, c, hgt, wid)
    xn = xn * p[tt + "norm.weight"].view(1, c, 1, 1) + p[tt + "norm.bias"].view(1, c, 1, 1)
    # tokens[clip, pixel, frame, channel]
    h = xn.reshape(clips, frames, c, hgt * wid).permute(0, 3, 1, 2)
    h = h @ p[tt + "proj_in.weight"].T + p[tt + "proj_in.bias"]
    pos = torch.arange(frames, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, c, 2, dtype=torch.float64) * (-math.log(10000.0) / c))
    pe = torch.zeros(frames, c, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)

    def layer_norm(t, prefix):
        mu = t.mean(-1, keepdim=True)
        sd = torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        return (t - mu) / sd * p[prefix + ".weight"] + p[prefix + ".bias"]

    for i in range(2):
        a = f"{blk}attention_blocks.{i}."
        y = layer_norm(h, f"{blk}norms.{i}") + pe
        q, k, v = (y @ p[a + n + ".weight"].T for n in ("to_q", "to_k", "to_v"))
        k = k * scale
        d = c // heads
        q, k, v = (t.reshape(*t.shape[:-1], heads, d).transpose(-2, -3) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        o = (w @ v).transpose(-2, -3).reshape(h.shape)
        h = h + o @ p[a + "to_out.0.weight"].T + p[a + "to_out.0.bias"]
    y = layer_norm(h, f"{blk}ff_norm")
    proj = y @ p[blk + "ff.net.0.proj.weight"].T + p[blk + "ff.net.0.proj.bias"]
    value, gate = proj[..., : 4 * c], proj[..., 4 * c:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    h = h + (value * gelu) @ p[blk + "ff.net.2.weight"].T + p[blk + "ff.net.2.bias"]
    h = h @ p[tt + "proj_out.weight"].T + p[tt + "proj_out.bias"]
    out = h.permute(0, 2, 3, 1).reshape(bf, c, hgt, wid)
    return x + out


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("channels,frames,clips,scale", [(32, 6, 1, 1.0), (64, 5, 2, 1.3), (32, 16, 2, 0.7)])
@pytest.mark.parametrize("mode", ["per_frame", "across_frames"])
def test_forward_matches_the_equations(channels, frames, clips, scale, mode):
    module = randomised(TemporalTransformer(channels, norm_mode=mode, zero_init=False))
    # A per-frame drift makes per-frame and across-frames statistics genuinely different.
    x = torch.randn(clips * frames, channels, 4, 3) * 2 + torch.linspace(-3, 3, clips * frames).view(-1, 1, 1, 1)
    expected = equations(x, module, frames, scale=scale, across_frames=mode == "across_frames")
    with torch.no_grad():
        fast = module(x, frames, scale=scale)
    with torch.enable_grad():
        tracked = module(x.clone().requires_grad_(), frames, scale=scale)
    assert max_rel(fast, expected) < 1e-5
    assert max_rel(tracked.detach(), expected) < 1e-5


def test_norm_modes_really_differ():
    module = randomised(TemporalTransformer(32, zero_init=False))
    x = torch.randn(8, 32, 4, 4) + torch.arange(8.0).view(-1, 1, 1, 1)
    with torch.no_grad():
        per_frame = module(x, 8)
        module.norm_mode = "across_frames"
        across = module(x, 8)
    assert max_rel(per_frame, across) > 1e-2


def test_clips_are_independent_and_cond_uncond_concatenate_whole():
    module = randomised(TemporalTransformer(32, zero_init=False, norm_mode="across_frames"))
    cond, uncond = torch.randn(6, 32, 3, 3), torch.randn(6, 32, 3, 3) * 3
    with torch.no_grad():
        both = module(torch.cat([cond, uncond]), 6)
        assert torch.allclose(both[:6], module(cond, 6), atol=1e-5, rtol=1e-5)
        assert torch.allclose(both[6:], module(uncond, 6), atol=1e-5, rtol=1e-5)


def test_fresh_module_is_an_exact_identity():
    module = TemporalTransformer(64)
    x = torch.randn(10, 64, 4, 4)
    with torch.no_grad():
        assert torch.equal(module(x, 5), x)


def test_gradients_match_the_equations():
    module = randomised(TemporalTransformer(32, zero_init=False)).double()
    x = torch.randn(8, 32, 2, 3, dtype=torch.float64)
    weight = torch.randn(8, 32, 2, 3, dtype=torch.float64)
    ours = x.clone().requires_grad_()
    (module(ours, 4, scale=1.2) * weight).sum().backward()
    ref = x.clone().requires_grad_()
    (equations(ref, module, 4, scale=1.2) * weight).sum().backward()
    assert max_rel(ours.grad, ref.grad) < 1e-6  # the fp32 positional table limits agreement
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_bfloat16_runs_close_to_float32():
    module = randomised(TemporalTransformer(32, zero_init=False))
    x = torch.randn(8, 32, 4, 4)
    with torch.no_grad():
        ref = module(x, 8)
        low = module.to(torch.bfloat16)(x.bfloat16(), 8)
    assert low.dtype == torch.bfloat16
    assert max_rel(low.float(), ref) < 5e-2
    with torch.no_grad():
        mixed = module(x, 8)  # fp32 activations into a bf16 module come back as fp32
    assert mixed.dtype == torch.float32 and max_rel(mixed, ref) < 5e-2


def test_positional_table_matches_diffusers():
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    for length, channels in [(24, 320), (32, 1280), (64, 32)]:
        assert torch.equal(sinusoidal_positions(length, channels),
                           SinusoidalPositionalEmbedding(channels, length).pe)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.zeros(33, 32, 2, 2), 33), "positional encoding length 32"),
    (lambda m: m(torch.zeros(10, 32, 2, 2), 4), "whole number of 4-frame clips"),
    (lambda m: m(torch.zeros(4, 64, 2, 2), 4), r"\[\(clips\*frames\), 32, H, W\]"),
    (lambda m: m(torch.zeros(4, 32, 2, 2), 0), "whole number"),
])
def test_bad_calls_are_refused_clearly(call, match):
    module = TemporalTransformer(32)
    with pytest.raises(InvalidInputError, match=match):
        call(module)


def test_bad_construction_is_refused():
    with pytest.raises(InvalidInputError, match="norm_mode"):
        TemporalTransformer(32, norm_mode="batch")
    with pytest.raises(InvalidInputError, match="divisible"):
        TemporalTransformer(40)
    with pytest.raises(LightningError):
        MotionModuleSet.from_channels((32,)).set_norm_mode("nope")


@pytest.mark.parametrize("has_mid,expected", [(True, 453_209_280), (False, 417_137_600)])
def test_full_size_parameter_counts(has_mid, expected):
    with torch.device("meta"):
        full = MotionModuleSet.from_channels((320, 640, 1280, 1280), has_mid=has_mid)
    assert sum(p.numel() for p in full.parameters()) == expected
    # 21 (v2) or 20 modules with 26 weights each; the 2 tables per module are not in the state dict.
    assert len(full.state_dict()) == (21 if has_mid else 20) * 26


def test_parameter_names_are_the_original_checkpoint_keys():
    module_set = MotionModuleSet.from_channels((32, 64, 64, 64))
    names = set(module_set.state_dict())
    # Keys from the table in lightning/REFERENCE.md §1.3, spelled out here rather than derived.
    for key in ["down_blocks.0.motion_modules.1.temporal_transformer.norm.bias",
                "mid_block.motion_modules.0.temporal_transformer.proj_out.weight",
                "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias",
                "up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight",
                "down_blocks.2.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.1.weight",
                "down_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.ff_norm.weight"]:
        assert key in names
    assert module_set.state_dict()["up_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"].shape == (64, 64)
    assert module_set.state_dict()["up_blocks.3.motion_modules.0.temporal_transformer.proj_in.weight"].shape == (32, 32)


def test_unet_order_and_norm_mode_switch():
    module_set = MotionModuleSet.from_channels((32, 64, 64, 96), has_mid=True)
    ordered = module_set.modules_in_unet_order()
    assert [m.channels for m in ordered] == [32, 32, 64, 64, 64, 64, 96, 96, 96, 96, 96, 96, 64, 64, 64, 64, 64, 64,
                                             32, 32, 32]
    assert ordered[8] is module_set.mid
    assert ordered[0] is module_set.down[0][0] and ordered[-1] is module_set.up[-1][2]
    module_set.set_norm_mode("across_frames")
    assert all(m.norm_mode == "across_frames" for m in ordered)
    no_mid = MotionModuleSet.from_channels((32, 32, 32, 32), has_mid=False, pe_length=24)
    assert no_mid.mid is None and len(no_mid.modules_in_unet_order()) == 20
    assert no_mid.info.version == "v1" and no_mid.pe_length == 24
