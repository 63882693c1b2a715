"""lowrankarena's "u/v wrapped" export: factor pairs ``u_proj``/``v_proj``, an optional ``low_rank_config``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankserve.importers.common import read_factored_directory
from rankserve.importers.model import ImportedModel


def read_uv(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """lowrankarena's "u/v wrapped" export: ``{name}.v_proj.weight`` [r, in], ``{name}.u_proj.weight`` [out, r].

    ``low_rank_config.layers`` is optional; when present its ranks must match the shapes. Safetensors or
    ``pytorch_model*.bin`` (read with ``weights_only=True``).
    """

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        return (
            f"{module}.u_proj.weight",
            f"{module}.v_proj.weight",
            (f"{module}.u_proj.bias", f"{module}.bias"),
        )

    def rank_table(raw: dict) -> tuple[Any, str]:
        low_rank = raw.get("low_rank_config")
        return (low_rank.get("layers") if isinstance(low_rank, Mapping) else None), "low_rank_config.layers"

    return read_factored_directory(src, tokenizer, "uv", factor_keys, rank_table)
