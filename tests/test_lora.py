"""Motion LoRA: the merge equation, stacking, exact unmerge, and files that are not motion LoRAs."""

import logging

import pytest
import torch

from lightning.checkpoints import motion_module_from_state_dict
from lightning.errors import InvalidInputError, MotionLoraFileError
from lightning.lora import (applied_loras, load_motion_lora, lora_deltas, merge_motion_lora,
                            motion_lora_from_state_dict, unmerge_motion_lora)
from lightning.testing import motion as fixtures

ATTN = "temporal_transformer.transformer_blocks.0.attention_blocks"


def module_set(version="v2", dtype=torch.float16):
    return motion_module_from_state_dict(fixtures.motion_state_dict(version=version, dtype=dtype))


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def lora_file(tmp_path, name="v2_lora_ZoomIn.ckpt", **kwargs):
    return load_motion_lora(fixtures.write_motion_lora(tmp_path / name, **kwargs))


def test_merge_is_up_at_down_times_strength_default_0_8(tmp_path):
    target = module_set(dtype=torch.float32)
    before = snapshot(target)
    raw = fixtures.motion_lora_state_dict(dtype=torch.float32, seed=3)
    lora = motion_lora_from_state_dict(raw)
    merge_motion_lora(target, lora)
    after = target.state_dict()
    prefix = f"up_blocks.1.motion_modules.2.{ATTN}.1"
    for proj, weight in [("to_q", "to_q.weight"), ("to_out", "to_out.0.weight")]:
        down = raw[f"{prefix}.processor.{proj}_lora.down.weight"]
        up = raw[f"{prefix}.processor.{proj}_lora.up.weight"]
        expected = before[f"{prefix}.{weight}"] + 0.8 * (up @ down)
        assert torch.allclose(after[f"{prefix}.{weight}"], expected, atol=1e-6)
    untouched = "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"
    assert torch.equal(after[untouched], before[untouched])
    assert len(lora.pairs) == 21 * 2 * 4 and lora.rank == 4


def test_loras_stack_and_unmerge_exactly_in_fp16(tmp_path):
    target = module_set(dtype=torch.float16)
    original = snapshot(target)
    first = lora_file(tmp_path, "a.ckpt", seed=1)
    second = lora_file(tmp_path, "b.safetensors", seed=2)
    merge_motion_lora(target, first, 0.7)
    merge_motion_lora(target, second, 1.3)
    key = f"mid_block.motion_modules.0.{ATTN}.0.to_v.weight"
    expected = (original[key].float() + 0.7 * first.delta(key) + 1.3 * second.delta(key)).half()
    assert torch.equal(target.state_dict()[key], expected)
    assert [s for _, s in applied_loras(target)] == [0.7, 1.3]

    unmerge_motion_lora(target, first)
    only_second = module_set(dtype=torch.float16)
    merge_motion_lora(only_second, second, 1.3)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), only_second.state_dict().values()))

    unmerge_motion_lora(target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in original.items())
    assert applied_loras(target) == []


def test_merged_module_changes_the_output(tmp_path):
    target = module_set(dtype=torch.float32)
    mod = target.modules_in_unet_order()[0]
    x = torch.randn(8, mod.channels, 2, 2)
    with torch.no_grad():
        plain = mod(x, 8)
        merge_motion_lora(target, lora_file(tmp_path), 1.0)
        patched = mod(x, 8)
        unmerge_motion_lora(target)
        assert not torch.allclose(plain, patched)
        assert torch.equal(mod(x, 8), plain)


def test_mid_block_weights_are_skipped_with_a_warning_for_v3(tmp_path, caplog):
    target = module_set(version="v3", dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        merge_motion_lora(target, lora_file(tmp_path))
    assert "skipping 8 mid-block weights" in caplog.text


def test_an_sd_lora_contains_no_temporal_keys(tmp_path):
    path = fixtures.write_wrong_file(tmp_path / "v3_sd15_adapter.safetensors", "sd_lora")
    with pytest.raises(MotionLoraFileError, match="contains no temporal keys") as caught:
        load_motion_lora(path)
    assert caught.value.problem == "wrong_kind" and "LoraLoader" in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_motion_module_given_as_lora_points_to_the_module_loader(tmp_path):
    path = fixtures.write_motion_module(tmp_path / "mm_sd_v15_v2.safetensors")
    with pytest.raises(MotionLoraFileError, match="is a motion module, not a motion LoRA"):
        load_motion_lora(path)


def test_lora_for_other_widths_is_refused(tmp_path):
    lora = lora_file(tmp_path, channels=(32, 64, 64, 96))
    with pytest.raises(MotionLoraFileError, match="shapes disagree"):
        merge_motion_lora(module_set(), lora)


def test_damaged_lora_files(tmp_path):
    raw = fixtures.motion_lora_state_dict()
    key = sorted(k for k in raw if k.endswith("down.weight"))[0]
    broken = dict(raw)
    del broken[key]
    with pytest.raises(MotionLoraFileError, match="pairs incomplete"):
        motion_lora_from_state_dict(broken)
    poisoned = dict(raw)
    poisoned[key] = raw[key].clone()
    poisoned[key][0, 0] = float("nan")
    with pytest.raises(MotionLoraFileError, match="NaN/Inf"):
        motion_lora_from_state_dict(poisoned)
    truncated = tmp_path / "lora.safetensors"
    truncated.write_bytes(fixtures.write_motion_lora(tmp_path / "ok.safetensors").read_bytes()[:500])
    with pytest.raises(MotionLoraFileError, match="truncated or corrupt"):
        load_motion_lora(truncated)


def test_alpha_scales_by_alpha_over_rank():
    raw = fixtures.motion_lora_state_dict(dtype=torch.float32)
    key = sorted(k for k in raw if k.endswith("to_k_lora.down.weight"))[0]
    raw[key.replace("down.weight", "alpha")] = torch.tensor(2.0)
    lora = motion_lora_from_state_dict(raw)
    weight = key.replace(".processor.to_k_lora.down.weight", ".to_k.weight")
    up = raw[key.replace("down.weight", "up.weight")]
    assert torch.allclose(lora.delta(weight), (up @ raw[key]) * 2.0 / 4)


def test_merging_the_same_lora_twice_or_a_foreign_one_is_refused(tmp_path):
    target = module_set()
    lora = lora_file(tmp_path)
    merge_motion_lora(target, lora)
    with pytest.raises(InvalidInputError, match="already merged"):
        merge_motion_lora(target, lora)
    with pytest.raises(InvalidInputError, match="not merged"):
        unmerge_motion_lora(target, lora_file(tmp_path, "other.ckpt"))
    with pytest.raises(InvalidInputError, match="finite"):
        merge_motion_lora(target, lora_file(tmp_path, "third.ckpt"), float("nan"))


def test_deltas_for_external_patching_match_the_merge(tmp_path):
    lora = lora_file(tmp_path, seed=4)
    v3 = module_set(version="v3", dtype=torch.float32)
    deltas = lora_deltas(lora, v3)
    assert len(deltas) == 20 * 2 * 4 and not any(k.startswith("mid_block.") for k in deltas)
    before = snapshot(v3)
    merge_motion_lora(v3, lora, 0.5)
    after = v3.state_dict()
    for key, delta in deltas.items():
        assert delta.dtype == torch.float32 and torch.allclose(after[key], before[key] + 0.5 * delta, atol=1e-6)
