"""Which public layout a file or directory holds, following FORMATS.md's dispatch order."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from rankserve.importers.common import as_directory, read_config, weight_files, weight_keys
from rankserve.importers.errors import CheckpointImportError

_UV_KEY = re.compile(r"_proj\.(u|v)_proj\.weight$")


def _detect_directory(directory: Path, files: list[Path] | None, source: str) -> str:
    config = read_config(directory)
    if "low_rank_schema" in config or "low_rank_modules" in config:
        raise CheckpointImportError(
            f"not supported: {source} is a lowrankarena ABLinear export (low_rank_schema)"
        )
    if "low_rank_config" in config:
        return "uv"
    if "dobi_target_modules" in config or (directory / "remapping_weight.pt").exists():
        raise CheckpointImportError(f"not supported: {source} is a Dobi-SVD export")
    if "truncation_ranks" in config:
        return "asvd"
    if any(key.startswith("num_basis_") for key in config):
        return "basis-sharing"
    keys = weight_keys(files or weight_files(directory))
    if any(_UV_KEY.search(k) for k in keys):
        return "uv"
    if any(k.endswith((".ALinear.weight", ".BLinear.weight")) for k in keys):
        return "asvd"  # no rank table: ranks come from shapes, factors are oriented by shape
    if any(re.search(r"(^|\.)(q|k|v|o|gate|up|down)_basis\.", k) for k in keys):
        return "basis-sharing"
    raise CheckpointImportError(f"cannot tell the checkpoint format of {source}: pass the format explicitly")


def detect_format(src: str | Path) -> str:
    """One of :data:`FAMILIES`, following FORMATS.md's dispatch order; raises for unknown or unsupported layouts.

    A torch zip archive is ``svd-llm``. A directory (or a weight file in one) is decided by its config:
    ``low_rank_schema``/``low_rank_modules`` (unsupported) → ``low_rank_config`` (uv) → ``dobi_target_modules``
    (unsupported) → ``truncation_ranks`` (asvd) → ``num_basis_*`` (basis-sharing); else by tensor names.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointImportError(f"{src} does not exist")
    try:
        if path.is_file() and path.suffix not in (".safetensors", ".bin"):
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    if any(n.endswith("/data.pkl") for n in archive.namelist()):
                        return "svd-llm"
            raise CheckpointImportError(f"{src}: not a torch zip archive nor a checkpoint directory")
        if path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.pt")):
            return "svd-llm"
        directory, files = as_directory(path)
        return _detect_directory(directory, files, str(src))
    except CheckpointImportError:
        raise
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
        raise CheckpointImportError(f"cannot read {src}: {type(e).__name__}: {e}") from None
