"""Readers for the public SVD-compression checkpoint layouts, without running any of their code.

Each reader turns one layout into an :class:`ImportedModel`: a neutral, fully validated description (base HF
config, dense tensors, low-rank factors ``W ≈ U @ V``, shared bases) that
:func:`rankserve.loaders.convert.import_checkpoint` writes out as a rankserve checkpoint. One module per layout:

- ``svd_llm``: a whole pickled model (``torch.save({'model': m, 'tokenizer': t})``), read with the restricted
  unpickler (:mod:`~rankserve.importers.unpickler`, bounded by :mod:`~rankserve.importers.pickle_scan`);
- ``asvd``: an HF directory with ``{name}.ALinear`` / ``{name}.BLinear`` and ``truncation_ranks`` (remote code is
  never imported);
- ``basis_sharing``: ``pytorch_model.bin`` with one basis per group of layers and per-layer coefficients;
- ``uv``: lowrankarena's "u/v wrapped" export, ``{name}.u_proj`` / ``{name}.v_proj``.

:mod:`~rankserve.importers.detect` tells the layouts apart. Every tensor shape is checked against the config
before anything is returned: a reader either returns a complete model or raises :class:`CheckpointImportError`
naming the tensor, the expected and the found shape.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

from rankserve.importers.asvd import read_asvd
from rankserve.importers.basis_sharing import read_basis_sharing
from rankserve.importers.detect import detect_format
from rankserve.importers.errors import CheckpointImportError, UnsafePickleError
from rankserve.importers.model import ImportedModel, SharedGroup
from rankserve.importers.svd_llm import read_svd_llm
from rankserve.importers.uv import read_uv

__all__ = [
    "FAMILIES",
    "CheckpointImportError",
    "ImportedModel",
    "SharedGroup",
    "UnsafePickleError",
    "detect_format",
    "read_asvd",
    "read_basis_sharing",
    "read_checkpoint",
    "read_svd_llm",
    "read_uv",
]

_READERS: dict[str, Callable[..., ImportedModel]] = {
    "svd-llm": read_svd_llm,
    "asvd": read_asvd,
    "basis-sharing": read_basis_sharing,
    "uv": read_uv,
}
FAMILIES = tuple(_READERS)


def read_checkpoint(fmt: str, src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """Read ``src`` in format ``fmt`` (one of :data:`FAMILIES`, or ``"auto"`` to detect it).

    ``tokenizer`` (a directory or file) overrides whatever tokenizer the source has. Every failure is a
    :class:`CheckpointImportError` with a message naming the file or tensor at fault; nothing is returned
    half-read.
    """
    if fmt == "auto":
        fmt = detect_format(src)
    reader = _READERS.get(fmt)
    if reader is None:
        raise CheckpointImportError(
            f"unknown checkpoint format {fmt!r}; choose from {', '.join(FAMILIES)} or auto"
        )
    if not Path(src).exists():
        raise CheckpointImportError(f"{src} does not exist")
    try:
        return reader(src, tokenizer)
    except CheckpointImportError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointImportError(f"cannot import {src} as {fmt}: {type(e).__name__}: {e}") from None
