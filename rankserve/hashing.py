"""File fingerprints shared by manifests, calibration records and importer provenance."""

from __future__ import annotations

import hashlib


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
