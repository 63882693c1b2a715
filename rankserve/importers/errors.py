"""The errors of importing a foreign checkpoint."""

from __future__ import annotations


class CheckpointImportError(ValueError):
    """A checkpoint cannot be imported: wrong layout, wrong shapes, missing tensors, unsupported model."""


class UnsafePickleError(CheckpointImportError):
    """The pickle asks to call something outside the allowlist; nothing was called."""
