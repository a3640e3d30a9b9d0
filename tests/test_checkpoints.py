"""Motion-module files: every real layout loads, round trips are lossless, wrong files are refused clearly."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning import checkpoints
from lightning.checkpoints import (detect, diffusers_layout, load_motion_module, original_layout, planned_file_size,
                                   save_motion_module)
from lightning.errors import InvalidInputError, MotionModuleFileError
from lightning.motion_module import MotionModuleSet
from lightning.testing import motion as fixtures
from lightning.testing.motion import randomised

TINY = fixtures.TINY_CHANNELS


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion_fixtures")
    fixtures.write_fixture_set(out, wrong=False)
    return out


# --- every real layout loads ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout,version,pe,mid,steps,count", [
    ("animatediff_lightning_4step_comfyui.safetensors", "original", "v2", 32, True, 4, 588),
    ("animatediff_lightning_4step_diffusers.safetensors", "diffusers", "v2", 32, True, 4, 567),
    ("mm_sd_v15_v2.ckpt", "original", "v2", 32, True, None, 588),
    ("mm_sd_v14.ckpt", "original", "v1", 24, False, None, 560),
    ("v3_sd15_mm.ckpt", "original", "v3", 32, False, None, 560),
    ("AnimateLCM_sd15_t2v.ckpt", "original", "animatelcm", 64, True, None, 21 * 26),
])
def test_release_layouts_load_with_the_right_info(fixture_dir, name, layout, version, pe, mid, steps, count):
    module_set = load_motion_module(fixture_dir / name)
    info = module_set.info
    assert (info.format, info.version, info.pe_length, info.has_mid, info.lightning_steps) == (
        layout, version, pe, mid, steps)
    assert info.channels == TINY and info.tensor_count == count and info.source == os.fspath(fixture_dir / name)
    assert module_set.pe_length == pe and module_set.has_mid == mid
    expected_dtype = torch.float16 if name.endswith(".safetensors") else torch.float32
    assert all(p.dtype == expected_dtype for p in module_set.parameters())
    assert not any(t.is_meta for t in list(module_set.parameters()) + list(module_set.buffers()))


def test_release_key_counts_at_full_size():
    """588 (original) and 567 (diffusers) tensors for v2, as the Lightning release files (lightning/REFERENCE.md)."""
    full = (320, 640, 1280, 1280)
    assert len(original_layout(full, True, 32)) == 588
    assert len(diffusers_layout(full, True, 32)) == 567
    assert len(original_layout(full, False, 24)) == 560


def test_lightning_steps_from_name_and_from_our_metadata(fixture_dir, tmp_path):
    for steps in (1, 2, 8):
        path = tmp_path / f"animatediff_lightning_{steps}step_comfyui.safetensors"
        path.write_bytes((fixture_dir / "animatediff_lightning_4step_comfyui.safetensors").read_bytes())
        assert load_motion_module(path).info.lightning_steps == steps
    module_set = load_motion_module(fixture_dir / "animatediff_lightning_4step_comfyui.safetensors")
    renamed = save_motion_module(module_set, tmp_path / "my_motion.safetensors")
    reloaded = load_motion_module(renamed)
    assert reloaded.info.lightning_steps == 4
    assert reloaded.info.metadata["adlightning.source"] == "animatediff_lightning_4step_comfyui.safetensors"


def test_dtype_argument_casts_everything(fixture_dir):
    module_set = load_motion_module(fixture_dir / "animatediff_lightning_4step_comfyui.safetensors",
                                    dtype=torch.float32)
    assert {t.dtype for t in list(module_set.parameters()) + list(module_set.buffers())} == {torch.float32}


def test_bf16_files_load(tmp_path):
    path = fixtures.write_motion_module(tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    module_set = load_motion_module(path)
    assert module_set.info.dtype == "bfloat16"
    assert next(module_set.parameters()).dtype == torch.bfloat16


# --- diffusers parity --------------------------------------------------------------------------------------

def _random_adapter(channels, *, mid=True, seed=0):
    from diffusers import MotionAdapter

    adapter = MotionAdapter(block_out_channels=channels, motion_norm_num_groups=32, motion_num_attention_heads=8,
                            motion_max_seq_length=32, use_motion_mid_block=mid)
    return randomised(adapter, seed).eval()


def _diffusers_modules(adapter):
    mods = [m for block in adapter.down_blocks for m in block.motion_modules]
    if adapter.mid_block is not None:
        mods += list(adapter.mid_block.motion_modules)
    return mods + [m for block in adapter.up_blocks for m in block.motion_modules]


@pytest.mark.parametrize("mid", [True, False])
def test_diffusers_adapter_loads_and_every_module_matches(tmp_path, mid):
    channels = (32, 32, 64, 64)
    adapter = _random_adapter(channels, mid=mid)
    path = tmp_path / "adapter.safetensors"
    save_file(adapter.state_dict(), path)
    ours = load_motion_module(path, norm_mode="across_frames")
    assert ours.info.format == "diffusers" and ours.info.version == ("v2" if mid else "v3")
    theirs = _diffusers_modules(adapter)
    assert len(theirs) == len(ours.modules_in_unet_order()) == (21 if mid else 20)
    frames, clips = 6, 2
    with torch.no_grad():
        for mine, reference in zip(ours.modules_in_unet_order(), theirs):
            c = mine.channels
            x = torch.randn(clips * frames, c, 3, 4) + torch.linspace(-2, 2, clips * frames).view(-1, 1, 1, 1)
            expected = reference(x, num_frames=frames)
            expected = expected[0] if isinstance(expected, tuple) else expected
            got = mine(x, frames, scale=1.0)
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_our_diffusers_save_loads_strictly_into_motion_adapter(tmp_path):
    adapter = _random_adapter((32, 32, 64, 64), seed=1)
    src = tmp_path / "src.safetensors"
    save_file(adapter.state_dict(), src)
    out = save_motion_module(load_motion_module(src), tmp_path / "out.safetensors", layout="diffusers")
    fresh = type(adapter)(block_out_channels=(32, 32, 64, 64))
    fresh.load_state_dict(load_file(out), strict=True)
    for (k, a), (_, b) in zip(sorted(adapter.state_dict().items()), sorted(fresh.state_dict().items())):
        assert torch.equal(a, b), k


def test_key_mapping_agrees_with_diffusers_converter(fixture_dir):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    original = load_file(fixture_dir / "animatediff_lightning_4step_comfyui.safetensors")
    converted = convert_animatediff_checkpoint_to_diffusers(original)
    ours = load_file(fixture_dir / "animatediff_lightning_4step_diffusers.safetensors")
    # diffusers' converter drops the tables (MotionAdapter regenerates them); everything else must agree.
    assert set(converted) == {k for k in ours if not k.endswith("pos_embed.pe")}
    assert all(torch.equal(converted[k], ours[k]) for k in converted)


def test_full_size_layout_equals_motion_adapter_on_meta():
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter()
    theirs = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert theirs == diffusers_layout((320, 640, 1280, 1280), True, 32)
    assert sum(p.numel() for p in adapter.parameters()) == 453_209_280


# --- round trips and byte sizes ----------------------------------------------------------------------------

def _tensors_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["animatediff_lightning_4step_comfyui.safetensors", "mm_sd_v15_v2.ckpt",
                                  "mm_sd_v14.ckpt", "v3_sd15_mm.ckpt", "AnimateLCM_sd15_t2v.ckpt"])
def test_original_round_trip_is_lossless(fixture_dir, tmp_path, name):
    source = checkpoints.read_state_dict(fixture_dir / name)[0]
    saved = save_motion_module(load_motion_module(fixture_dir / name), tmp_path / "copy.safetensors")
    assert _tensors_equal(load_file(saved), source)


def test_conversions_reproduce_files_that_diffusers_builds_byte_for_byte(fixture_dir, tmp_path):
    """Both directions against a ``_diffusers`` file made without our key mapping: diffusers' own converter
    fills a MotionAdapter from the ``_comfyui`` file, the adapter regenerates its positional tables, and
    safetensors writes its state dict in fp16 without metadata (as the release files are)."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    comfyui = fixture_dir / "animatediff_lightning_4step_comfyui.safetensors"
    converted = convert_animatediff_checkpoint_to_diffusers(load_file(comfyui))
    adapter = MotionAdapter(block_out_channels=TINY, motion_norm_num_groups=32, motion_num_attention_heads=8,
                            motion_max_seq_length=32, use_motion_mid_block=True)
    missing, unexpected = adapter.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    assert not unexpected and missing and all(k.endswith("pos_embed.pe") for k in missing)
    theirs = tmp_path / "diffusers_built.safetensors"
    save_file({k: v.half().contiguous() for k, v in adapter.state_dict().items()}, theirs)

    ours = save_motion_module(load_motion_module(comfyui), tmp_path / "ours.safetensors", layout="diffusers",
                              byte_compatible=True)
    assert ours.read_bytes() == theirs.read_bytes()
    back = save_motion_module(load_motion_module(theirs), tmp_path / "back.safetensors", byte_compatible=True)
    assert back.read_bytes() == comfyui.read_bytes()


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("byte_compatible,dtype,metadata", [(True, None, None), (False, torch.float32, None),
                                                            (False, torch.bfloat16, {"note": "é \"quoted\"\n"})])
def test_planned_size_equals_the_written_size(tmp_path, layout, byte_compatible, dtype, metadata):
    module_set = MotionModuleSet.from_channels((32, 64, 64, 96), has_mid=layout == "original")
    kwargs = dict(layout=layout, dtype=dtype, byte_compatible=byte_compatible, metadata=metadata)
    path = save_motion_module(module_set, tmp_path / "m.safetensors", **kwargs)
    assert planned_file_size(module_set, **kwargs) == path.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("layout,expected", [("original", 908_929_664), ("diffusers", 907_702_248)])
def test_full_size_byte_compatible_sizes_match_the_release_files(layout, expected):
    with torch.device("meta"):
        module_set = MotionModuleSet.from_channels((320, 640, 1280, 1280), has_mid=True, pe_length=32)
    assert planned_file_size(module_set, layout=layout, byte_compatible=True) == expected


def test_byte_compatible_refuses_metadata_and_other_dtypes(tmp_path):
    module_set = MotionModuleSet.from_channels((32, 32, 32, 32))
    with pytest.raises(InvalidInputError, match="no metadata"):
        save_motion_module(module_set, tmp_path / "a.safetensors", byte_compatible=True, metadata={"a": "b"})
    with pytest.raises(InvalidInputError, match="fp16"):
        save_motion_module(module_set, tmp_path / "a.safetensors", byte_compatible=True, dtype=torch.float32)
    with pytest.raises(InvalidInputError, match=".safetensors"):
        save_motion_module(module_set, tmp_path / "a.ckpt")
    with pytest.raises(InvalidInputError, match="layout"):
        save_motion_module(module_set, tmp_path / "a.safetensors", layout="comfy")
    assert not list(tmp_path.iterdir())


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_motion_module(MotionModuleSet.from_channels((32, 32, 32, 32)), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_provenance_metadata_is_written(tmp_path):
    from safetensors import safe_open

    path = save_motion_module(MotionModuleSet.from_channels((32, 32, 32, 32), has_mid=False),
                              tmp_path / "m.safetensors", metadata={"trained_by": "test"})
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    assert meta["adlightning.layout"] == "original" and meta["adlightning.motion_version"] == "v3"
    assert meta["trained_by"] == "test" and meta["format"] == "pt"


# --- wrong and damaged files --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,expected_kind,phrases", [
    ("sdxl_motion_module", "sdxl_motion_module", ["SDXL motion module", "SD1.5"]),
    ("hotshotxl", "sdxl_motion_module", ["HotshotXL", "SD1.5"]),
    ("motion_lora", "motion_lora", ["motion LoRA", "Load Motion LoRA"]),
    ("sd_lora", "sd_lora", ["LoRA for the image model", "LoraLoader"]),
    ("sd_checkpoint", "sd_checkpoint", ["Stable Diffusion checkpoint", "Load Checkpoint"]),
    ("controlnet", "controlnet", ["ControlNet", "Load ControlNet Model"]),
])
def test_wrong_kinds_of_model_are_named(tmp_path, kind, expected_kind, phrases):
    path = fixtures.write_wrong_file(tmp_path / f"{kind}.safetensors", kind)
    with pytest.raises(MotionModuleFileError) as caught:
        load_motion_module(path)
    error = caught.value
    assert error.problem == "wrong_kind" and error.kind == expected_kind and error.path == os.fspath(path)
    assert os.fspath(path) in str(error)
    for phrase in phrases:
        assert phrase in str(error)


@pytest.mark.parametrize("keys,kind", [
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias"], "sd_checkpoint"),
    (["input_blocks.0.0.weight", "middle_block.1.proj_in.weight"], "unet"),
    (["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.attentions.0.proj_in.weight"], "unet"),
    (["control_model.input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight"], "controlnet"),
    (["controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight"], "controlnet"),
    (["controlnet_cond_embedding.conv_in.weight",
      "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"], "controlnet"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "vae"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "text_encoder"),
    (["something.else"], "unknown"),
])
def test_foreign_state_dicts_by_key_pattern(keys, kind):
    with pytest.raises(MotionModuleFileError) as caught:
        detect({k: (4, 4) for k in keys}, path="x.safetensors")
    assert caught.value.kind == kind and "'x.safetensors'" in str(caught.value)


def test_three_level_shapes_are_sdxl_even_without_files():
    shapes = original_layout((320, 640, 1280), False, 32)
    with pytest.raises(MotionModuleFileError, match="SDXL") as caught:
        detect(shapes)
    assert caught.value.kind == "sdxl_motion_module"


@pytest.mark.parametrize("kind,suffix,problem,phrase", [
    ("truncated", ".safetensors", "unreadable", "truncated or corrupt"),
    ("truncated", ".ckpt", "unreadable", "truncated or corrupt"),
    ("corrupt_header", ".safetensors", "unreadable", "download it again"),
    ("corrupt_header", ".ckpt", "unreadable", "download it again"),
    ("unsafe_pickle", ".ckpt", "unreadable", "refuse to unpickle"),
    ("nan", ".safetensors", "non_finite", "proj_in.weight contains NaN"),
    ("inf", ".ckpt", "non_finite", "proj_in.weight contains Inf"),
    ("wrong_shape", ".safetensors", "keys", "wrong shape"),
])
def test_damaged_files_are_refused(tmp_path, kind, suffix, problem, phrase):
    path = fixtures.write_wrong_file(tmp_path / f"bad{suffix}", kind)
    with pytest.raises(MotionModuleFileError) as caught:
        load_motion_module(path)
    assert caught.value.problem == problem and phrase in str(caught.value) and os.fspath(path) in str(caught.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    missing = fixtures.write_wrong_file(tmp_path / "missing.safetensors", "missing_keys")
    with pytest.raises(MotionModuleFileError, match="3 missing tensor") as caught:
        load_motion_module(missing)
    expected = sorted(fixtures.motion_state_dict())[:3]
    assert caught.value.missing == expected and all(k in str(caught.value) for k in expected)

    unexpected = fixtures.write_wrong_file(tmp_path / "unexpected.safetensors", "unexpected_keys")
    with pytest.raises(MotionModuleFileError, match="2 unexpected tensor") as caught:
        load_motion_module(unexpected)
    assert caught.value.unexpected == ["down_blocks.0.motion_modules.0.temporal_transformer.extra.weight",
                                       "down_blocks.0.motion_modules.7.temporal_transformer.norm.weight"]


def test_unreadable_paths(tmp_path):
    with pytest.raises(MotionModuleFileError, match="does not exist") as caught:
        load_motion_module(tmp_path / "nope.safetensors")
    assert caught.value.problem == "missing_file"
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(MotionModuleFileError, match="empty or truncated"):
        load_motion_module(empty)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(MotionModuleFileError, match="extension '.gguf'"):
        load_motion_module(gguf)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint at all")
    with pytest.raises(MotionModuleFileError, match="neither a safetensors file nor a PyTorch checkpoint"):
        load_motion_module(text)


def test_wrapped_checkpoints_and_non_tensor_entries(tmp_path):
    tensors = fixtures.motion_state_dict(version="v3", dtype=torch.float32)
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tensors, "global_step": 12}, path)
    assert load_motion_module(path).info.version == "v3"


def test_mixed_layouts_are_refused():
    original = fixtures.motion_state_dict()
    diffusers = fixtures.motion_state_dict(layout="diffusers")
    mixed = {k: v for k, v in original.items() if k.startswith("down_blocks.0.")}
    mixed.update({k: v for k, v in diffusers.items() if not k.startswith("down_blocks.0.")})
    with pytest.raises(MotionModuleFileError, match="mixes the original and the diffusers"):
        checkpoints.motion_module_from_state_dict(mixed)


# --- the fixture writers ------------------------------------------------------------------------------------

def test_fixtures_are_seeded_and_deterministic(tmp_path):
    first = fixtures.write_motion_module(tmp_path / "a.safetensors", seed=5).read_bytes()
    again = fixtures.write_motion_module(tmp_path / "b.safetensors", seed=5).read_bytes()
    other = fixtures.write_motion_module(tmp_path / "c.safetensors", seed=6).read_bytes()
    assert first == again and first != other


def test_fixture_cli_writes_loadable_files(tmp_path, capsys):
    assert fixtures.main(["--out", str(tmp_path), "--only", "v3_sd15_mm.ckpt", "--only", "wrong/sd_lora.safetensors"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "v3_sd15_mm.ckpt", "wrong/sd_lora.safetensors"]
    assert load_motion_module(tmp_path / "v3_sd15_mm.ckpt").info.version == "v3"
    assert "v3_sd15_mm.ckpt" in capsys.readouterr().out


def test_saved_files_are_published_with_the_usual_mode_and_no_leftovers(tmp_path):
    import stat

    from lightning.files import atomic_output
    from lightning.testing.motion import write_motion_module

    path = write_motion_module(tmp_path / "m.safetensors")
    module = load_motion_module(path)
    out = save_motion_module(module, tmp_path / "saved.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, out):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # safetensors alone would leave 0600
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "saved.safetensors") as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert load_motion_module(out) is not None  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "saved.safetensors"]
