"""The streamed safetensors writer of training states: what it writes reads back with safetensors itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training import state_file


def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "weight": base,
        "view.transposed": base.t(),  # strided view of the same storage
        "view.slice": base[2:4],
        "half": torch.randn(3, 7, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "double": torch.randn(2, 2, generator=g).double(),
        "step": torch.tensor(12.0),  # 0-dim (Adam's step)
        "rng": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g),
        "mask": torch.tensor([True, False, True]),
        "ints": torch.arange(-3, 4, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }


def test_written_file_reads_back_equal_with_metadata(tmp_path):
    path = tmp_path / "state.safetensors"
    want = tensors()
    state_file.write(path, want, metadata={"a": json.dumps({"x": [1, 2]})})
    got = load_file(str(path))
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name
    with safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["a"]) == {"x": [1, 2]}
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # data section 8-byte aligned


def test_header_matches_the_bytes_written(tmp_path):
    want = tensors()
    path = tmp_path / "s.safetensors"
    state_file.write(path, want)
    head = state_file.header(want)
    data_bytes = sum(t.numel() * t.element_size() for t in want.values())
    assert path.stat().st_size == len(head) + data_bytes


def test_refuses_what_safetensors_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="'c'.*complex"):
        state_file.write(tmp_path / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
