"""SVD-LLM's whole pickled model (``torch.save({'model': m, 'tokenizer': t})``), read with the restricted
unpickler: nothing from the file is imported or called."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from rankserve.importers.common import (
    PRETRAINED_RUNTIME_KEYS,
    check_architecture,
    clean_config,
    finish,
    reject_leftovers,
    source_provenance,
    split_projections,
    user_tokenizer,
)
from rankserve.importers.errors import CheckpointImportError
from rankserve.importers.model import ImportedModel, Layout
from rankserve.importers.tokenizer_rebuild import recover_tokenizer
from rankserve.importers.unpickler import Record, load_restricted, module_tensors


def _record_config(record: Any, source: str) -> tuple[dict, str]:
    """(raw config dict, model_type) from a pickled ``transformers`` config record."""
    if not isinstance(record, Record) or not isinstance(record.state, Mapping):
        raise CheckpointImportError(f"{source}: the pickled model has no config")
    raw = dict(record.state)
    # model_type is a class attribute, so the pickled state lacks it: LlamaConfig -> "llama", Qwen2Config -> ...
    model_type = raw.get("model_type")
    if model_type is None and record.name.endswith("Config"):
        model_type = record.name[: -len("Config")].lower()
    raw["model_type"] = model_type
    return raw, model_type


def _unpack_svd_llm(obj: Any, source: str) -> tuple[Record, Any]:
    if isinstance(obj, Mapping) and "model" in obj:
        model, tok = obj["model"], obj.get("tokenizer")
    else:
        model, tok = obj, None
    if not isinstance(model, Record) or not isinstance(model.state, Mapping) or "_modules" not in model.state:
        hint = (
            " (SVD-LLM *_profiling_*.pt files hold whitening matrices, not models)"
            if "_profiling_" in source
            else ""
        )
        raise CheckpointImportError(
            f"{source}: not an SVD-LLM checkpoint: expected {{'model': <pickled model>, 'tokenizer': ...}}{hint}"
        )
    return model, tok


def _rope_note(tensors: Mapping[str, Tensor], config: Mapping, head_dim: int) -> str | None:
    """SVD-LLM's Llama attention builds its rotary embedding with base 10000 whatever the config says."""
    inv = next((t for k, t in tensors.items() if k.endswith("rotary_emb.inv_freq")), None)
    if inv is None or inv.numel() < 2 or not inv.is_floating_point():
        return None
    base = float(inv[1].double() ** (-head_dim / 2))
    theta = float(config.get("rope_theta", 10000.0))
    if abs(base - theta) > 1e-3 * theta:
        return (
            f"the pickled rotary embedding uses base {base:.6g} but config rope_theta is {theta:.6g}: SVD-LLM's "
            "attention ignores rope_theta, so the authors' runs used the former; the config value is kept"
        )
    return None


def read_svd_llm(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """SVD-LLM's ``torch.save({'model': model, 'tokenizer': tokenizer})``, read with the restricted unpickler.

    Factors ``{x}_v_proj`` [r, in] and ``{x}_u_proj`` [out, r] of every attention and MLP projection; the
    config comes from the pickled config object, the tokenizer is rebuilt from the pickled one when possible
    (else ``tokenizer_dir`` is None and the caller must supply one).
    """
    path = Path(src)
    if path.is_dir():
        candidates = [
            p for p in sorted(path.glob("*.pt")) if "_profiling_" not in p.name and zipfile.is_zipfile(p)
        ]
        if len(candidates) != 1:
            raise CheckpointImportError(
                f"{src}: expected exactly one SVD-LLM .pt archive, found {len(candidates)}"
            )
        path = candidates[0]
    source = str(path)
    model_rec, tok_rec = _unpack_svd_llm(load_restricted(path), source)
    raw, model_type = _record_config(model_rec.get("config"), source)
    raw.setdefault("architectures", [model_rec.name])
    check_architecture(raw, source)
    geometry = Layout.from_config(raw, source)
    tensors = module_tensors(model_rec)
    notes = [f"pickled model class {model_rec.qualname}"]

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        parent, _, proj = module.rpartition(".")
        kind = proj.removesuffix("_proj")
        prefix = f"{parent}.{kind}" if parent else kind
        return f"{prefix}_u_proj.weight", f"{prefix}_v_proj.weight", (f"{prefix}_u_proj.bias",)

    split = split_projections(tensors, geometry, factor_keys, {}, "config", notes)
    reject_leftovers(tensors, split.consumed, "svd-llm", source)
    rope = _rope_note(tensors, raw, geometry.config.head_dim)
    if rope:
        notes.append(rope)
    config = clean_config(raw, model_type, notes, drop=PRETRAINED_RUNTIME_KEYS)
    provenance = source_provenance(path, "svd-llm", [path], raw, notes)
    keep = _kept_fractions(model_rec)
    if keep:
        provenance["svd_llm_ratio_attribute"] = keep
    tok = user_tokenizer(tokenizer)
    if tok is None:
        tok = recover_tokenizer(tok_rec, notes)
    return finish("svd-llm", config, geometry, split, {}, provenance, tok)


def _kept_fractions(model_rec: Record) -> list[float]:
    """The distinct ``ratio`` attributes of SVD-LLM's attention/MLP modules (the fraction of parameters kept)."""
    found: set[float] = set()
    stack = [model_rec]
    seen: set[int] = set()
    while stack:
        rec = stack.pop()
        if id(rec) in seen:
            continue
        seen.add(id(rec))
        ratio = rec.get("ratio")
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and rec.name.startswith("SVD"):
            found.add(float(ratio))
        children = rec.get("_modules") or {}
        if isinstance(children, Mapping):
            stack.extend(c for c in children.values() if isinstance(c, Record))
    return sorted(found)
