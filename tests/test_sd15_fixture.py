"""The random SD1.5 checkpoint/ControlNet fixtures: layout checked against diffusers, files checked on disk.

The layout is compared with diffusers' own SD1.5 models (built on the meta device, so nothing is allocated)
after diffusers' own ldm -> diffusers key conversion, i.e. by an implementation that never saw our tables.
Full-size files are never written here; file behaviour is tested on small subsets of the real keys.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning.testing import sd15

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

# Parameter counts of the SD1.5 components (diffusers' models built with SD1.5 configs, counted once).
UNET_PARAMS = 859_520_964
CLIP_TEXT_PARAMS = 123_060_480  # position_ids is an index buffer, not a parameter
VAE_PARAMS = 83_653_863
CONTROLNET_PARAMS = 361_279_120

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
SUBSET = (
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.2.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    POSITION_IDS,
    "first_stage_model.quant_conv.weight",
)


def _subset(keys=SUBSET) -> dict[str, tuple[int, ...]]:
    shapes = sd15.sd15_checkpoint_shapes()
    return {k: shapes[k] for k in keys}


def _sd15_unet_config() -> dict:
    # diffusers' UNet defaults are SD1.x's except the text width.
    return {"cross_attention_dim": 768}


def _diffusers_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**_sd15_unet_config())


def _diffusers_vae(device="meta"):
    with torch.device(device):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def _diffusers_controlnet():
    with torch.device("meta"):
        return ControlNetModel(**_sd15_unet_config())


def _meta(shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shapes_of(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _clip_keys_for(model, converted: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); diffusers strips it the same way.
    if hasattr(model, "text_model"):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _numel(shapes) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith("position_ids"))


# ---------------------------------------------------------------------------------------------------------
# Layout


def test_component_parameter_counts_match_sd15():
    assert _numel(sd15.sd15_unet_shapes()) == UNET_PARAMS
    assert _numel(sd15.sd15_clip_shapes()) == CLIP_TEXT_PARAMS
    assert _numel(sd15.sd15_vae_shapes()) == VAE_PARAMS
    assert _numel(sd15.sd15_controlnet_shapes()) == CONTROLNET_PARAMS
    for model, expected in ((_diffusers_unet(), UNET_PARAMS), (_diffusers_vae(), VAE_PARAMS),
                            (_diffusers_controlnet(), CONTROLNET_PARAMS)):
        assert sum(p.numel() for p in model.parameters()) == expected
    with torch.device("meta"):
        clip = CLIPTextModel(_clip_config())
    assert sum(p.numel() for p in clip.parameters()) == CLIP_TEXT_PARAMS


def test_checkpoint_is_the_three_prefixed_components():
    shapes = sd15.sd15_checkpoint_shapes()
    assert len(shapes) == 686 + 197 + 248
    prefixes = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.")
    assert all(k.startswith(prefixes) for k in shapes)
    assert sum(k.startswith(prefixes[0]) for k in shapes) == 686
    assert sum(k.startswith(prefixes[1]) for k in shapes) == 197
    assert sum(k.startswith(prefixes[2]) for k in shapes) == 248


def test_unet_keys_convert_to_exactly_diffusers_sd15_unet():
    model = _diffusers_unet()
    converted = sfu.convert_ldm_unet_checkpoint(_meta(sd15.sd15_checkpoint_shapes()), model.config)
    assert _shapes_of(converted) == _shapes_of(model.state_dict())


def test_vae_keys_convert_to_exactly_diffusers_kl_f8_vae():
    model = _diffusers_vae()
    converted = sfu.convert_ldm_vae_checkpoint(_meta(sd15.sd15_checkpoint_shapes()), model.config)
    assert _shapes_of(converted) == _shapes_of(model.state_dict())


def test_clip_keys_convert_to_exactly_transformers_clip_text_model():
    with torch.device("meta"):
        model = CLIPTextModel(_clip_config())
    converted = _clip_keys_for(model, sfu.convert_ldm_clip_checkpoint(_meta(sd15.sd15_checkpoint_shapes())))
    # Real SD1.5 files carry the position index buffer; transformers keeps it out of its state dict.
    position_ids = [k for k in converted if k.endswith("embeddings.position_ids")]
    assert len(position_ids) == 1 and tuple(converted.pop(position_ids[0]).shape) == (1, 77)
    assert _shapes_of(converted) == _shapes_of(model.state_dict())


def test_controlnet_keys_convert_to_exactly_diffusers_controlnet():
    model = _diffusers_controlnet()
    shapes = sd15.sd15_controlnet_shapes()
    assert all(k.startswith("control_model.") for k in shapes) and len(shapes) == 340
    converted = sfu.convert_controlnet_checkpoint(_meta(shapes), model.config)
    assert _shapes_of(converted) == _shapes_of(model.state_dict())


def test_diffusers_recognises_the_files_as_sd15_and_controlnet():
    assert sfu.infer_diffusers_model_type(_meta(sd15.sd15_checkpoint_shapes())) == "v1"
    assert sfu.infer_diffusers_model_type(_meta(sd15.sd15_controlnet_shapes())) == "controlnet"


def test_keys_that_comfyui_detection_reads():
    # comfy/model_detection.py: channels from input_blocks.0.0, context width from attn2.to_k, conv (4-D)
    # proj_in means SD1.x rather than SD2/SDXL, no label_emb; SD15.matches() needs 320 / 768 / conv / no adm.
    unet = sd15.sd15_unet_shapes()
    assert unet["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert all(len(s) == 4 for k, s in unet.items() if k.endswith(("proj_in.weight", "proj_out.weight")))
    assert not any(k.startswith("label_emb") for k in unet)
    assert not any(".transformer_blocks.1." in k for k in unet)  # depth 1 everywhere
    # comfy/controlnet.py picks the ldm ControlNet path from this exact key.
    assert sd15.sd15_controlnet_shapes()["control_model.zero_convs.0.0.weight"] == (320, 320, 1, 1)
    assert sd15.sd15_controlnet_shapes()["control_model.input_hint_block.0.weight"] == (16, 3, 3, 3)


# ---------------------------------------------------------------------------------------------------------
# Values


def test_weights_are_scaled_by_fan_in_and_norms_are_near_identity():
    conv = sd15.random_tensor("model.diffusion_model.input_blocks.4.0.in_layers.2.weight", (640, 320, 3, 3),
                              dtype=torch.float32)
    assert conv.std().item() == pytest.approx(1 / math.sqrt(320 * 9), rel=0.02)
    linear = sd15.random_tensor("x.attn2.to_k.weight", (1280, 768), dtype=torch.float32)
    assert linear.std().item() == pytest.approx(1 / math.sqrt(768), rel=0.02)
    gain = sd15.random_tensor("x.norm1.weight", (4096,), dtype=torch.float32)
    assert gain.mean().item() == pytest.approx(1.0, abs=0.005)
    assert 0.01 < gain.std().item() < 0.05  # not exactly 1, so a gain mapped to the wrong key shows
    bias = sd15.random_tensor("x.bias", (4096,), dtype=torch.float32)
    assert abs(bias.mean().item()) < 0.005 and 0.01 < bias.std().item() < 0.05


def test_controlnet_zero_convs_are_not_zero():
    shapes = sd15.sd15_controlnet_shapes()
    for key in ("control_model.zero_convs.0.0.weight", "control_model.zero_convs.11.0.weight",
                "control_model.middle_block_out.0.weight"):
        w = sd15.random_tensor(key, shapes[key], dtype=torch.float32)
        assert w.std().item() == pytest.approx(1 / math.sqrt(shapes[key][1]), rel=0.05)


def test_values_depend_on_seed_and_key_and_survive_dtype_rounding():
    shape = (320, 320, 1, 1)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    a = sd15.random_tensor(key, shape, seed=0, dtype=torch.float32)
    assert torch.equal(a, sd15.random_tensor(key, shape, seed=0, dtype=torch.float32))
    assert not torch.allclose(a, sd15.random_tensor(key, shape, seed=1, dtype=torch.float32))
    assert not torch.allclose(a, sd15.random_tensor(key.replace("proj_in", "proj_out"), shape, dtype=torch.float32))
    for dtype in (torch.float16, torch.bfloat16):
        low = sd15.random_tensor(key, shape, seed=0, dtype=dtype)
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), a, rtol=1e-2, atol=1e-3)


def test_position_ids_are_the_int64_index_buffer():
    ids = sd15.random_tensor(POSITION_IDS, (1, 77), seed=5, dtype=torch.float16)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, torch.arange(77).unsqueeze(0))


@pytest.mark.slow
def test_clip_values_load_strictly_into_transformers_and_give_unit_scale_states():
    shapes = _subset([k for k in sd15.sd15_checkpoint_shapes() if k.startswith(sd15.CLIP_PREFIX)])
    ldm = {k: sd15.random_tensor(k, s, dtype=torch.float32) for k, s in shapes.items()}
    with torch.device("meta"):
        model = CLIPTextModel(_clip_config()).eval()
    converted = _clip_keys_for(model, sfu.convert_ldm_clip_checkpoint(ldm))
    ids_key = next(k for k in converted if k.endswith("position_ids"))
    ids = converted.pop(ids_key)
    model.load_state_dict(converted, strict=True, assign=True)
    # transformers keeps position_ids out of its state dict; the file's copy fills the buffer instead.
    model.get_submodule(ids_key.rsplit(".", 1)[0]).register_buffer("position_ids", ids, persistent=False)
    tokens = torch.full((2, 77), 49407)
    tokens[:, 0] = 49406
    tokens[0, 1:4] = torch.tensor([320, 1125, 539])
    with torch.no_grad():
        hidden = model(input_ids=tokens).last_hidden_state
    assert torch.isfinite(hidden).all()
    assert 0.5 < hidden.std().item() < 2.0  # final LayerNorm with gains ~1
    assert (hidden[0] - hidden[1]).abs().max() > 0.1  # the prompt matters


@pytest.mark.slow
def test_vae_values_load_strictly_into_diffusers_and_decode_finite_images():
    shapes = _subset([k for k in sd15.sd15_checkpoint_shapes() if k.startswith(sd15.VAE_PREFIX)])
    ldm = {k: sd15.random_tensor(k, s, dtype=torch.float32) for k, s in shapes.items()}
    model = _diffusers_vae()
    converted = sfu.convert_ldm_vae_checkpoint(ldm, model.config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.eval()
    latents = torch.randn(2, 4, 8, 8) * 40  # magnitudes a random UNet's samples reach after / 0.18215
    with torch.no_grad():
        image = model.decode(latents).sample
    assert image.shape == (2, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert 0.1 < image.std().item() < 5.0


# ---------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_subset_write_round_trips_through_safetensors(tmp_path, dtype):
    shapes = _subset()
    path = sd15.write_random_weights(tmp_path / "sub.safetensors", shapes, seed=3, dtype=dtype)
    assert path.stat().st_size == sd15.safetensors_size(shapes, dtype=dtype)
    loaded = load_file(path)
    assert _shapes_of(loaded) == shapes
    for key, tensor in loaded.items():
        expected_dtype = torch.int64 if key == POSITION_IDS else dtype
        assert tensor.dtype == expected_dtype, key
        assert torch.equal(tensor, sd15.random_tensor(key, shapes[key], seed=3, dtype=dtype)), key
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert os.listdir(tmp_path) == ["sub.safetensors"]


def test_writes_are_deterministic_and_independent_of_the_other_keys(tmp_path):
    a = sd15.write_random_weights(tmp_path / "a.safetensors", _subset(), seed=7)
    b = sd15.write_random_weights(tmp_path / "b.safetensors", _subset(), seed=7)
    assert a.read_bytes() == b.read_bytes()
    c = load_file(sd15.write_random_weights(tmp_path / "c.safetensors", _subset(), seed=8))
    d = load_file(sd15.write_random_weights(tmp_path / "d.safetensors", _subset(SUBSET[2:5]), seed=7))
    full = load_file(a)
    for key in SUBSET[2:5]:
        assert torch.equal(d[key], full[key])
    assert not torch.equal(c[SUBSET[2]], full[SUBSET[2]])
    assert torch.equal(c[POSITION_IDS], full[POSITION_IDS])


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "sd15.safetensors"
    target.write_bytes(b"previous contents")
    calls = {"n": 0}
    real = sd15.random_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(sd15, "random_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        sd15.write_random_weights(target, _subset())
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["sd15.safetensors"]


def test_bad_dtype_and_shape_are_refused_with_the_offending_value(tmp_path):
    with pytest.raises(ValueError, match="int8"):
        sd15.write_random_weights(tmp_path / "x.safetensors", _subset(), dtype=torch.int8)
    with pytest.raises(ValueError, match="broken.weight"):
        sd15.write_random_weights(tmp_path / "x.safetensors", {"broken.weight": (0, 3)})
    assert not any(tmp_path.iterdir())


def test_cli_writes_both_files_then_skips_them_unless_forced(tmp_path, monkeypatch, capsys):
    small_ckpt, small_cnet = _subset(), {k: sd15.sd15_controlnet_shapes()[k] for k in (
        "control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight")}
    monkeypatch.setattr(sd15, "sd15_checkpoint_shapes", lambda: small_ckpt)
    monkeypatch.setattr(sd15, "sd15_controlnet_shapes", lambda: small_cnet)
    out = tmp_path / "fixtures"
    assert sd15.main(["--out", str(out)]) == 0
    ckpt, cnet = out / sd15.CHECKPOINT_FILENAME, out / sd15.CONTROLNET_FILENAME
    assert _shapes_of(load_file(ckpt)) == small_ckpt and _shapes_of(load_file(cnet)) == small_cnet
    first = ckpt.read_bytes()
    stamp = ckpt.stat().st_mtime_ns
    capsys.readouterr()

    assert sd15.main(["--out", str(out)]) == 0
    assert ckpt.stat().st_mtime_ns == stamp
    assert "already there" in capsys.readouterr().out

    cnet.write_bytes(b"truncated")  # wrong size: rewritten without --force
    assert sd15.main(["--out", str(out)]) == 0
    assert _shapes_of(load_file(cnet)) == small_cnet

    assert sd15.main(["--out", str(out), "--force", "--dtype", "bf16"]) == 0
    assert ckpt.read_bytes() != first
    assert load_file(ckpt)[SUBSET[0]].dtype == torch.bfloat16
