"""File fingerprints shared by manifests, calibration records and importer provenance."""

from __future__ import annotations

import hashlib


def file_sha256(path) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
