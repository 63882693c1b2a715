"""Tensors of plain weight files: ``*.safetensors`` memory-mapped, ``pytorch_model*.bin`` state dicts scanned and
bounded before ``torch.load(weights_only=True)``."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from rankserve.importers.errors import CheckpointImportError, UnsafePickleError
from rankserve.importers.pickle_scan import (
    CORRUPT_ENTRY,
    DTYPE_NAMES,
    MAX_PICKLE_BYTES,
    STORAGE_DTYPES,
    archive_prefix,
    check_views,
    open_zip,
    read_entry,
    scan_pickle,
    storage_bytes,
)
from rankserve.io.safetensors import load_mmap

# Every global a state dict written by ``torch.save(model.state_dict())`` names.
_STATE_DICT_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("_codecs", "encode"),
}


# A legacy (pre-zip) torch.save file is five pickles in a row: magic number, protocol, system info, the object,
# the storage keys; the raw storage bytes follow.
_LEGACY_PICKLES = 5


def load_state_dict(path: str | Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A ``pytorch_model*.bin`` state dict: scanned and bounded first, then ``torch.load(weights_only=True)``.

    ``torch.load``'s own unpickler refuses code but not bombs (a deeply nested tuple key crashes it), so the
    stream goes through :func:`scan_pickle` with only state-dict globals allowed, storages must be stored
    uncompressed, and the loaded tensors must pass :func:`check_views`.
    """
    source = str(path)

    def allowed(module: str, name: str) -> None:
        if (module, name) in _STATE_DICT_GLOBALS or (
            module == "torch" and (name in STORAGE_DTYPES or name in DTYPE_NAMES)
        ):
            return
        raise UnsafePickleError(
            f"refusing to load {source}: it holds more than tensors (it references {module}.{name})"
        )

    is_zip = zipfile.is_zipfile(source)
    if is_zip:
        with open_zip(source) as archive:
            prefix = archive_prefix(archive, source)
            scan_pickle(read_entry(archive, f"{prefix}data.pkl", MAX_PICKLE_BYTES, source), source, allowed)
            for info in archive.infolist():
                if info.filename.startswith(f"{prefix}data/"):
                    if info.compress_type != zipfile.ZIP_STORED:
                        storage_bytes(archive, info.filename, info.file_size, source)  # raises: compressed
    else:
        with open(source, "rb") as f:
            for _ in range(_LEGACY_PICKLES):
                scan_pickle(f, source, allowed)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"refusing to load {source}: it holds more than tensors ({e})") from None
    except (RuntimeError, OSError, EOFError, ValueError, TypeError, *CORRUPT_ENTRY) as e:
        raise CheckpointImportError(f"{source}: unreadable torch file: {type(e).__name__}: {e}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointImportError(f"{source}: expected a state dict of name -> tensor")
    check_views(state, source)
    return dict(state)


def read_weight_files(files: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """All tensors of a model's weight files (shards): safetensors memory-mapped, ``.bin`` through
    :func:`load_state_dict`. A tensor name found in two shards is refused."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        loaded = load_mmap(str(path)) if str(path).endswith(".safetensors") else load_state_dict(path)
        for key, tensor in loaded.items():
            if key in out:
                raise CheckpointImportError(f"{path}: tensor {key} also appears in another shard")
            out[key] = tensor
    return out
