"""The errors of importing a foreign checkpoint."""

from __future__ import annotations

from rankserve.errors import InputError


class CheckpointImportError(InputError):
    """A checkpoint cannot be imported: wrong layout, wrong shapes, missing tensors, unsupported model."""


class UnsafePickleError(CheckpointImportError):
    """The pickle asks to call something outside the allowlist; nothing was called."""
