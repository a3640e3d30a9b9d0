"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` serialises the whole dict at once: for a training state that means a host
copy of every tensor (student, optimiser moments, discriminator) next to the live ones, several GB on an
SD1.5 run, and exactly what pushed a 24 GB CPU run out of memory. The safetensors format is simple enough
to stream: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range in the data section, then the raw little-endian bytes. Here the header is computed from the tensors'
shapes alone and each tensor is copied to the host, written and dropped before the next one, so the extra
memory of a save is the largest single tensor. The files are read back with the ordinary safetensors API.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code

_ALIGN = 8  # the data section starts on an 8-byte boundary (the header is padded with spaces)


def _code(name: str, tensor: torch.Tensor) -> str:
    try:
        return _DTYPES[tensor.dtype]
    except KeyError:
        raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store") from None


def header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length-prefixed, padded JSON header for ``tensors`` laid out in the mapping's order."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _code(name, tensor), "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return len(text).to_bytes(8, "little") + text


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    host = tensor.detach().to("cpu").contiguous()
    raw = host.reshape(-1).view(torch.uint8) if host.numel() else torch.empty(0, dtype=torch.uint8)
    if sys.byteorder != "little" and host.element_size() > 1:  # pragma: no cover - no big-endian CI
        raise OSError("writing safetensors on a big-endian machine is not supported")
    return memoryview(raw.numpy())


def write(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (any device, any layout; views and shared storage are fine) to ``path``.

    The caller makes it atomic (``lightning.files.atomic_output``); nothing here holds more than one
    tensor's host copy at a time.
    """
    names = list(tensors)
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    head = header(tensors, metadata)  # refuses an unstorable dtype before the file exists
    with open(os.fspath(path), "wb") as handle:
        handle.write(head)
        for name in names:
            handle.write(_host_bytes(tensors[name]))
        handle.flush()
        os.fsync(handle.fileno())
