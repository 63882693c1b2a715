"""ASVD's HF export: factor pairs ``ALinear``/``BLinear`` and a ``truncation_ranks`` table (remote code is never
imported)."""

from __future__ import annotations

from pathlib import Path

from rankserve.importers.common import read_factored_directory
from rankserve.importers.model import ImportedModel


def read_asvd(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """ASVD's HF export: ``{name}.BLinear.weight`` [r, in], ``{name}.ALinear.weight`` [out, r] (+ bias).

    Ranks in ``truncation_ranks`` must match the shapes; projections absent from it must be dense;
    ``lm_head`` may be factorized.
    """

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        return f"{module}.ALinear.weight", f"{module}.BLinear.weight", (f"{module}.ALinear.bias",)

    return read_factored_directory(
        src, tokenizer, "asvd", factor_keys, lambda raw: (raw.get("truncation_ranks"), "truncation_ranks")
    )
