"""File fingerprints shared by manifests, calibration records and importer provenance."""

from __future__ import annotations

import hashlib
import os

from rankserve.errors import InputError

# Files hashed when a source model is a directory: its HF config and weights, never tokenizers or READMEs.
_SOURCE_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def update_from_file(h, path) -> None:
    """Feed a file's bytes to the hash object ``h``, streamed in 1 MiB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_sha256(path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    update_from_file(h, path)
    return h.hexdigest()


def source_fingerprint(path: str) -> dict:
    """``{"path", "sha256", "hashed"}`` of a source model: a file's bytes, or for a directory its config and
    weight files streamed in name order (each preceded by its name and size)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"path": os.path.abspath(path), "sha256": file_sha256(path), "hashed": "file"}
    if os.path.isdir(path):
        names = sorted(
            f
            for f in os.listdir(path)
            if os.path.isfile(os.path.join(path, f))
            and (f == "config.json" or f.endswith(_SOURCE_FILE_SUFFIXES))
        )
        if not names:
            raise InputError(f"source {path}: no config.json or weight files to hash")
        h = hashlib.sha256()
        for f in names:
            full = os.path.join(path, f)
            h.update(f"{f}\0{os.path.getsize(full)}\0".encode())
            update_from_file(h, full)
        return {
            "path": os.path.abspath(path),
            "sha256": h.hexdigest(),
            "hashed": "directory: sha256 over (name, size, bytes) of " + ", ".join(names),
        }
    raise InputError(f"source {path}: no such file or directory")
