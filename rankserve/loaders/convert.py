"""Turn an imported foreign checkpoint (:class:`~rankserve.importers.ImportedModel`) into a rankserve model
and write it as a rankserve checkpoint.

:func:`imported_to_model` builds the model on the meta device, swaps every factorized projection for a
:class:`~rankserve.layers.LowRankLinear` or a :class:`~rankserve.layers.SharedBasisLinear` (one basis Parameter
per group, so a shared basis is stored and held once), assigns the dense tensors and ties the embeddings when
the config says so. Every tensor is checked against the shape the config gives it before anything is assigned.

:func:`import_checkpoint` is the whole pipeline behind ``rankserve import``: read (no foreign code is run) →
build → manifest → atomic save. Everything that can be checked is checked before the output directory exists,
so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rankserve.config import ConfigError, ModelConfig
from rankserve.fsutil import owned_tempdir
from rankserve.importers import CheckpointImportError, ImportedModel, read_checkpoint
from rankserve.importers.model import expect, shape_of
from rankserve.io.assign import assign, listed, meta_parameters, new_model
from rankserve.layers import LowRankLinear, SharedBasisLinear, projections, replace_module
from rankserve.loaders.source import SourceError, parse_dtype
from rankserve.loaders.weights import WeightError
from rankserve.loaders.weights import check_finite as check_weights_finite

__all__ = ["imported_to_model", "import_checkpoint", "load_tokenizer_dir"]

log = logging.getLogger(__name__)

# Files a Hugging Face tokenizer may be saved as; only these are copied out of a source directory before loading,
# so transformers never sees the source's config.json (with its auto_map pointing at remote code).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_TEMP_TOKENIZER_NOTE = re.compile(r"^tokenizer written to temporary directory .* \(the caller owns it\)$")

TOKENIZER_HINT = "pass --tokenizer PATH (a directory with the base model's tokenizer files)"


# ---------------------------------------------------------------------------------------------------------------
# ImportedModel -> nn.Module


def _check_bias(module: str, bias: torch.Tensor | None, out: int, wanted: bool, model_type: str) -> None:
    if bias is None and wanted:
        raise CheckpointImportError(f"{module}.bias: missing ({model_type} {module} has a bias)")
    if bias is not None and not wanted:
        raise CheckpointImportError(
            f"{module}.bias: unexpected, the config gives {model_type} {module} no bias"
        )
    if bias is not None:
        expect(f"{module}.bias", bias, (out,))


def _param(t: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.detach().to(device="cpu", dtype=dtype).contiguous(), requires_grad=False)


def imported_to_model(imp: ImportedModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ready rankserve model (eval mode, on CPU, in ``dtype``) equivalent to the imported checkpoint.

    Raises :class:`CheckpointImportError` naming the tensor and both shapes when anything disagrees with the
    config; unknown, missing or leftover tensors are errors too.
    """
    try:
        cfg = ModelConfig.from_hf(dict(imp.config))
    except ConfigError as e:
        raise CheckpointImportError(str(e)) from None
    for key in ("torch_dtype", "dtype"):  # the stored dtype, not the source's
        if key in cfg.extra:
            cfg.extra[key] = str(dtype).removeprefix("torch.")
    model = new_model(cfg)
    have = projections(model)

    for name in list(imp.lowrank) + [m for g in imp.shared.values() for m in g.members]:
        if name not in have:
            raise CheckpointImportError(
                f"{name}: imported as factorized, but it is not a projection of this model"
            )
    if cfg.tie_word_embeddings and (
        "lm_head" in imp.lowrank or any("lm_head" in g.members for g in imp.shared.values())
    ):
        raise CheckpointImportError(
            "the config ties embeddings (tie_word_embeddings) but lm_head is factorized"
        )

    # Shared bases: one Parameter per group, whatever the number of members.
    member_of: dict[str, str] = {}
    bases: dict[str, nn.Parameter] = {}
    for group, sg in imp.shared.items():
        if not sg.members:
            raise CheckpointImportError(f"shared basis {group}: no member projections")
        inn = have[next(iter(sg.members))].in_features
        if sg.basis.dim() != 2 or sg.basis.shape[1] != inn:
            raise CheckpointImportError(
                f"shared basis {group}: expected shape [r, {inn}], found {shape_of(sg.basis)}"
            )
        expect(f"shared basis {group}", sg.basis, tuple(sg.basis.shape))
        for module in sg.members:
            if module in member_of or module in imp.lowrank:
                raise CheckpointImportError(f"{module}: imported twice (shared group {group} and elsewhere)")
            member_of[module] = group
        bases[group] = _param(sg.basis, dtype)

    for name, cur in have.items():
        out, inn, wants_bias = cur.out_features, cur.in_features, cur.bias is not None
        if name in imp.lowrank:
            u, v, bias = imp.lowrank[name]
            for label, t, ok, want in (
                ("U factor", u, u.dim() == 2 and u.shape[0] == out, f"[{out}, r]"),
                ("V factor", v, v.dim() == 2 and v.shape[1] == inn, f"[r, {inn}]"),
            ):
                if not ok:
                    raise CheckpointImportError(f"{name} {label}: expected shape {want}, found {shape_of(t)}")
            expect(f"{name} V factor", v, (u.shape[1], inn))
            expect(f"{name} U factor", u, (out, u.shape[1]))
            _check_bias(name, bias, out, wants_bias, cfg.model_type)
            new = LowRankLinear.from_factors(
                u.to(dtype), v.to(dtype), None if bias is None else bias.to(dtype).contiguous()
            )
        elif name in member_of:
            group = member_of[name]
            basis = bases[group]
            coeff, bias = imp.shared[group].members[name]
            if basis.shape[1] != inn:
                raise CheckpointImportError(
                    f"shared basis {group}: expected shape [{basis.shape[0]}, {inn}] (input of {name}), "
                    f"found {shape_of(basis)}"
                )
            expect(f"{name} coefficient", coeff, (out, basis.shape[0]))
            _check_bias(name, bias, out, wants_bias, cfg.model_type)
            new = SharedBasisLinear(
                basis, _param(coeff, dtype), None if bias is None else _param(bias, dtype), group=group
            )
        else:
            continue
        replace_module(model, name, new)

    # Everything still on meta comes from imp.dense, by HF name.
    tied = cfg.tie_word_embeddings
    dense = dict(imp.dense)
    if tied and "lm_head.weight" in dense:
        head, emb = dense.pop("lm_head.weight"), dense.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise CheckpointImportError(
                "the config ties embeddings (tie_word_embeddings) but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    wanted = meta_parameters(model)
    for key, shape in wanted.items():
        if key not in dense:
            raise CheckpointImportError(f"missing tensor: {key} (expected shape {list(shape)})")
        expect(key, dense[key], shape)
    leftover = sorted(k for k in dense if k not in wanted)
    if leftover:
        raise CheckpointImportError(f"unexpected tensor(s) for this model: {listed(leftover)}")
    return assign(model, {k: dense[k] for k in wanted}, dtype, "cpu", source="imported checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer_dir(directory: str | Path, model_type: str, eos_ids: list[int] | None = None):
    """A :class:`~rankserve.tokenizer.Tokenizer` from the tokenizer files of ``directory``.

    Only tokenizer files are read: they are copied into a private temporary directory (with a config.json that
    holds nothing but ``model_type``), so no ``auto_map`` or remote code of a source directory is ever seen.
    """
    from rankserve.tokenizer import load_hf_tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointImportError(f"tokenizer {directory}: expected a directory with tokenizer files")
    present = [n for n in _TOKENIZER_FILES if (directory / n).is_file()]
    if not any(n in present for n in _TOKENIZER_REQUIRED):
        raise CheckpointImportError(
            f"tokenizer {directory}: no tokenizer files (looked for {', '.join(_TOKENIZER_REQUIRED)}); "
            f"{TOKENIZER_HINT}"
        )
    private = owned_tempdir("rankserve-tokenizer-load-")  # a killed run's copy is swept by the next
    try:
        for name in present:
            shutil.copyfile(directory / name, os.path.join(private, name))
        with open(os.path.join(private, "config.json"), "w") as f:
            json.dump({"model_type": model_type}, f)
        try:
            return load_hf_tokenizer(private, eos_ids=eos_ids)
        except Exception as e:  # noqa: BLE001 - any failure means "this is not a usable tokenizer"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointImportError(
                f"cannot load the tokenizer in {directory} ({type(e).__name__}: {msg}); {TOKENIZER_HINT}"
            ) from None
    finally:
        shutil.rmtree(private, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def _family_config(fmt: str, imp: ImportedModel) -> dict:
    prov = imp.provenance
    out = {
        "imported_from": imp.family,
        "format_requested": fmt,
        "original_architectures": list(prov.get("original_architectures") or []),
        "source_dtypes": list(prov.get("dtypes") or []),
        "source_ratio": prov.get("ratio"),  # as measured by the reader (a factorized lm_head counted)
    }
    for key in ("svd_llm_ratio_attribute", "groups"):
        if key in prov:
            out[key] = prov[key]
    return out


def _provenance(imp: ImportedModel, tokenizer_source: str) -> dict:
    prov = dict(imp.provenance)
    notes = [n for n in prov.get("notes", []) if not _TEMP_TOKENIZER_NOTE.match(str(n))]
    prov["notes"] = notes
    prov["tokenizer"] = tokenizer_source
    return prov


def _require_directory_tokenizer(fmt: str, src: Path) -> None:
    """Fail before any weight is read when an HF-directory source has no tokenizer and none was given."""
    from rankserve.config import SUPPORTED_MODEL_TYPES
    from rankserve.importers.common import read_config
    from rankserve.importers.detect import detect_format

    family = detect_format(src) if fmt == "auto" else fmt
    if family == "svd-llm":
        return  # the tokenizer is inside the pickle, if anywhere
    directory = src if src.is_dir() else src.parent
    try:
        model_type = read_config(directory).get("model_type")
    except (OSError, CheckpointImportError):
        return  # the reader names what is wrong with the config
    if model_type not in SUPPORTED_MODEL_TYPES:
        return  # "not supported" says more than "pass --tokenizer"
    if not any((directory / name).is_file() for name in _TOKENIZER_REQUIRED):
        raise CheckpointImportError(f"{src} carries no tokenizer files; {TOKENIZER_HINT}")


def import_checkpoint(
    fmt: str,
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    check_finite: bool = True,
) -> str:
    """Import the checkpoint ``src`` (format ``fmt``, or ``"auto"``) as a rankserve checkpoint at ``out_dir``.

    ``tokenizer`` is a directory of tokenizer files; it overrides the source's own tokenizer and is required
    when the source has none. The manifest records the family, ``ratio`` = the measured fraction of decoder
    linear-layer parameters removed, every projection's rank, the source's path and sha256, and the reader's
    provenance. Returns the checkpoint path. Nothing is written unless the whole import succeeds.
    ``check_finite`` refuses a source with a NaN or Inf weight.
    """
    from rankserve.checkpoint import CheckpointError, build_manifest, check_out_dir, save_checkpoint

    try:
        torch_dtype = parse_dtype(dtype)
    except SourceError as e:
        raise CheckpointImportError(str(e)) from None
    try:
        out_dir = check_out_dir(out_dir, overwrite)
    except CheckpointError as e:
        raise CheckpointImportError(str(e)) from None
    if tokenizer is not None:
        tokenizer = os.fspath(tokenizer)
        if not os.path.isdir(tokenizer):
            raise CheckpointImportError(
                f"--tokenizer {tokenizer}: expected a directory with tokenizer files (tokenizer.json, ...)"
            )
    elif Path(src).exists():
        _require_directory_tokenizer(fmt, Path(src))

    imp = read_checkpoint(fmt, src, tokenizer=tokenizer)
    # A tokenizer rebuilt from an SVD-LLM pickle lives in a temporary directory that we own from here on.
    temp_tok = imp.tokenizer_dir if tokenizer is None and imp.family == "svd-llm" else None
    try:
        if imp.tokenizer_dir is None:
            raise CheckpointImportError(f"{src} carries no usable tokenizer; {TOKENIZER_HINT}")
        model = imported_to_model(imp, torch_dtype)
        if check_finite:
            try:
                check_weights_finite(model, os.fspath(src))
            except WeightError as e:
                raise CheckpointImportError(str(e)) from None
        cfg = model.config
        tok = load_tokenizer_dir(imp.tokenizer_dir, cfg.model_type, eos_ids=cfg.eos_ids)
        if tokenizer is not None:
            tok_source = f"--tokenizer {os.path.abspath(tokenizer)}"
        elif temp_tok is not None:
            tok_source = "rebuilt from the pickled tokenizer"
        else:
            tok_source = "the source directory's tokenizer files"
        prov = _provenance(imp, tok_source)
        if tok.vocab_size > cfg.vocab_size:
            note = f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
            prov["notes"].append(note)
            log.info("%s: %s", src, note)
        manifest = build_manifest(
            model,
            family=imp.family,
            family_config=_family_config(fmt, imp),
            ratio=None,
            source_path=os.fspath(src),
            calibration=None,
            extra={"provenance": prov},
        )
        # The ratio the checkpoint achieves, in the manifest's own convention (decoder projections only).
        manifest["ratio"] = manifest["ratio_measured"]
        return save_checkpoint(model, out_dir, tokenizer=tok, manifest=manifest, overwrite=overwrite)
    finally:
        if temp_tok is not None:
            shutil.rmtree(temp_tok, ignore_errors=True)


def summary(manifest: Mapping) -> dict:
    """Counts, ranks and parameter totals of a checkpoint manifest (what ``rankserve import`` prints)."""
    projs = manifest["projections"]
    kinds = {k: sum(1 for e in projs.values() if e["kind"] == k) for k in ("lowrank", "shared", "dense")}
    ranks = sorted(e["rank"] for e in projs.values() if e["rank"] is not None)
    median = None
    if ranks:
        mid = len(ranks) // 2
        median = ranks[mid] if len(ranks) % 2 else (ranks[mid - 1] + ranks[mid]) / 2
    return {
        "family": manifest["family"],
        "projections": kinds,
        "shared_bases": len(manifest["shared_bases"]),
        "rank_min": ranks[0] if ranks else None,
        "rank_median": median,
        "rank_max": ranks[-1] if ranks else None,
        "params_linear_dense": manifest["params_linear_dense"],
        "params_linear": manifest["params_linear"],
        "ratio": manifest["ratio"],
        "ratio_convention": manifest["ratio_convention"],
        "dtype": manifest["dtype"],
    }
