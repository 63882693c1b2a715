"""Zero-copy safetensors reading: tensors are views of a memory-mapped file, validated against its size."""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    pass


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, byte offset of the data section); raises SafetensorsError on a malformed file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated file ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise SafetensorsError(
                f"{path}: header length {n} exceeds the file size {size}: truncated or corrupt"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def load_mmap(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as read-only views of one memory map (nothing is copied)."""
    header, base = read_header(path)
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name} has {end - start} bytes for shape {shape} ({nbytes} needed)"
            )
        if base + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name} ends at byte {base + end} past the file end {size}: truncated"
            )
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        import warnings

        with warnings.catch_warnings():  # the map is read-only; we never write through these views
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=base + start)
        out[name] = t.view(shape)
    return out
