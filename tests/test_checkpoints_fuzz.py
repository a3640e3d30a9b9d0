"""Property: damaged motion-module files either load or raise MotionModuleFileError — never anything else."""

import functools
import io
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lightning.checkpoints import load_motion_module
from lightning.errors import MotionModuleFileError
from lightning.motion_module import MotionModuleSet
from lightning.testing import motion as fixtures

SMALL = (32, 32, 32, 32)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def source(kind: str) -> tuple[bytes, str]:
    """Valid file bytes: (content, suffix)."""
    if kind in ("safetensors", "diffusers"):
        return save(valid_tensors(kind)), ".safetensors"
    buffer = io.BytesIO()
    torch.save(fixtures.motion_state_dict(channels=SMALL, version="v1"), buffer)
    return buffer.getvalue(), ".ckpt"


def load_bytes(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        try:
            result = load_motion_module(path)
        except MotionModuleFileError as error:
            assert str(path) in str(error) and error.problem
            return error
        assert isinstance(result, MotionModuleSet)
        return result


@functools.lru_cache(maxsize=None)
def valid_tensors(kind: str) -> dict:
    layout = "diffusers" if kind == "diffusers" else "original"
    return fixtures.motion_state_dict(channels=SMALL, layout=layout, version="v3" if kind == "diffusers" else "v2")


kinds = st.sampled_from(["safetensors", "diffusers", "ckpt"])


@SETTINGS
@given(kind=kinds, fraction=st.floats(min_value=0.0, max_value=0.999))
def test_truncated_files_raise_our_error(kind, fraction):
    data, suffix = source(kind)
    outcome = load_bytes(data[: int(len(data) * fraction)], suffix)
    assert isinstance(outcome, MotionModuleFileError)


@SETTINGS
@given(kind=kinds, flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 7), st.booleans()),
                                  min_size=1, max_size=4))
def test_bit_flipped_files_load_or_raise_our_error(kind, flips):
    data, suffix = source(kind)
    mutated = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little") if suffix == ".safetensors" else 2048
    for where, bit, in_header in flips:
        # Half the flips land in the header/pickle, where structure lives; the rest anywhere.
        span = min(header_end, len(data)) if in_header else len(data)
        position = min(int(where * span), len(data) - 1)
        mutated[position] ^= 1 << bit
    load_bytes(bytes(mutated), suffix)


mangles = st.sampled_from(["slice_rows", "slice_cols", "flatten", "unsqueeze", "to_int", "drop", "rename",
                           "scalar", "transpose", "empty"])


@SETTINGS
@given(kind=st.sampled_from(["safetensors", "diffusers"]), choice=st.integers(0, 10_000),
       operations=st.lists(mangles, min_size=1, max_size=3))
def test_shape_mangled_files_raise_our_error(kind, choice, operations):
    tensors = dict(valid_tensors(kind))
    keys = sorted(tensors)
    changed = False
    for step, operation in enumerate(operations):
        key = keys[(choice + 7919 * step) % len(keys)]
        if key not in tensors:
            continue
        t = tensors[key]
        if operation == "slice_rows" and t.shape[0] > 1:
            tensors[key] = t[:-1].contiguous()
        elif operation == "slice_cols" and t.dim() > 1 and t.shape[-1] > 1:
            tensors[key] = t[..., :-1].contiguous()
        elif operation == "flatten" and t.dim() > 1:
            tensors[key] = t.flatten().contiguous()
        elif operation == "unsqueeze":
            tensors[key] = t.unsqueeze(0).contiguous()
        elif operation == "to_int":
            tensors[key] = t.to(torch.int16)
        elif operation == "drop":
            del tensors[key]
        elif operation == "rename":
            tensors[key.replace("motion_modules.", "motion_modules.9")] = tensors.pop(key)
        elif operation == "scalar":
            tensors[key] = t.reshape(-1)[:1].reshape(()).contiguous()
        elif operation == "transpose" and t.dim() == 2 and t.shape[0] != t.shape[1]:
            tensors[key] = t.t().contiguous()
        elif operation == "empty":
            tensors[key] = t.reshape(-1)[:0].contiguous()
        else:
            continue
        changed = True
    outcome = load_bytes(save(tensors), ".safetensors")
    if changed:
        assert isinstance(outcome, MotionModuleFileError)
