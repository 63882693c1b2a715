"""The checkpoint manifest (``rankserve.json``): its schema, how it is built from a model, and its validation.

The manifest says everything the loader needs besides ``config.json``: format version, family, ratio (in the one
:data:`RATIO_CONVENTION`), every projection's kind/shape/rank, the shared bases, the source model and its hash,
the dtype. Nothing is inferred from file or tensor names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from rankserve import __version__
from rankserve.checkpoint import int8
from rankserve.checkpoint.names import CheckpointError, dtype_name, model_dtype
from rankserve.hashing import source_fingerprint
from rankserve.layers import SharedBasisLinear, projections
from rankserve.quant import SCHEME
from rankserve.quantize import QuantReport

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1, 2)  # 2: int8 weights (rankserve.checkpoint.int8)
MANIFEST_NAME = "rankserve.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RATIO_CONVENTION = (
    "fraction of decoder linear-layer parameters removed (SVD-LLM convention); "
    "embeddings and LM head not counted"
)
KINDS = ("dense", "lowrank", "shared")
REQUIRED_KEYS = (
    "format_version",
    "family",
    "family_config",
    "ratio",
    "ratio_convention",
    "dtype",
    "source",
    "calibration",
    "projections",
    "shared_bases",
    "params_linear_dense",
    "params_linear",
    "created_by",
)


def _is_lm_head(name: str) -> bool:
    return name == "lm_head"


def _describe_projections(model: nn.Module) -> tuple[dict, dict]:
    """(projections, shared_bases) manifest entries, computed from the model's modules."""
    projs, bases = {}, {}
    basis_group: dict[int, str] = {}  # id(basis Parameter) -> group name, to catch two bases under one name
    for name, p in projections(model).items():
        entry = {
            "kind": p.kind,
            "shape": [p.out_features, p.in_features],
            "rank": p.rank(),
            "bias": p.bias is not None,
        }
        if p.kind not in KINDS:
            raise CheckpointError(f"{name}: projection kind {p.kind!r} has no checkpoint form")
        if isinstance(p, SharedBasisLinear):
            group = p.group
            if not group:
                raise CheckpointError(f"{name}: SharedBasisLinear has no group name; set .group")
            seen = basis_group.setdefault(id(p.basis), group)
            if seen != group:
                raise CheckpointError(
                    f"{name}: its basis is shared with group {seen!r} but it says {group!r}"
                )
            if group in bases:
                if bases[group]["_id"] != id(p.basis):
                    raise CheckpointError(f"group {group!r} names two different basis tensors (at {name})")
                bases[group]["members"].append(name)
            else:
                bases[group] = {"shape": list(p.basis.shape), "members": [name], "_id": id(p.basis)}
            entry["group"] = group
        projs[name] = entry
    for b in bases.values():
        del b["_id"]
    return projs, bases


def _param_counts(projs: Mapping, bases: Mapping) -> tuple[int, int]:
    """(dense, actual) weight parameters of the decoder projections; the LM head is not counted."""
    dense = actual = 0
    for name, e in projs.items():
        if _is_lm_head(name):
            continue
        out, inp = e["shape"]
        dense += out * inp
        if e["kind"] == "dense":
            actual += out * inp
        elif e["kind"] == "lowrank":
            actual += e["rank"] * (out + inp)
        else:
            actual += out * e["rank"]  # the coefficients; the basis is counted once below
    for b in bases.values():
        if not all(_is_lm_head(m) for m in b["members"]):
            actual += b["shape"][0] * b["shape"][1]
    return dense, actual


def build_manifest(
    model: nn.Module,
    *,
    family: str = "dense",
    family_config: dict | None = None,
    ratio: float | None = None,
    source_path: str | None = None,
    calibration: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The manifest of ``model``: projections, shared bases and parameter counts are read from the model.

    ``ratio`` is the target fraction of decoder linear-layer parameters *removed*; ``ratio_measured`` is what
    the model actually achieves. ``extra`` keys (notes, wall time, ...) are added as they are, but may not
    replace a standard key.
    """
    projs, bases = _describe_projections(model)
    dense, actual = _param_counts(projs, bases)
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "family_config": dict(family_config or {}),
        "ratio": None if ratio is None else float(ratio),
        "ratio_convention": RATIO_CONVENTION,
        "ratio_measured": round(1.0 - actual / dense, 6) if dense else None,
        "dtype": dtype_name(model_dtype(model)),
        "source": source_fingerprint(source_path)
        if source_path is not None
        else {"path": None, "sha256": None},
        "calibration": calibration,
        "projections": projs,
        "shared_bases": bases,
        "params_linear_dense": dense,
        "params_linear": actual,
        "created_by": f"rankserve {__version__}",
    }
    for k, v in (extra or {}).items():
        if k in manifest:
            raise CheckpointError(f"extra manifest key {k!r} would replace a standard key")
        manifest[k] = v
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"manifest is not JSON-serialisable: {e}") from None
    validate_manifest(manifest)
    return manifest


def validate_manifest(m: object, where: str = "manifest") -> dict:
    """Check a manifest's version, keys, types and internal consistency; return it or raise CheckpointError."""
    if not isinstance(m, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(m).__name__}")
    if "format_version" not in m:
        raise CheckpointError(f"{where}: missing key format_version: not a rankserve manifest")
    v = m["format_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise CheckpointError(
            f"{where}: format_version {v!r} is not supported (this rankserve {__version__} reads version "
            f"{supported}); a newer version needs a newer rankserve"
        )
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")

    def fail(msg: str):
        raise CheckpointError(f"{where}: {msg}")

    if not isinstance(m["family"], str):
        fail(f"family must be a string, found {m['family']!r}")
    if not isinstance(m["family_config"], dict):
        fail("family_config must be an object")
    r = m["ratio"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r)):
        fail(f"ratio must be a number or null, found {r!r}")
    if m["ratio_convention"] != RATIO_CONVENTION:
        fail(f"ratio_convention {m['ratio_convention']!r} is not rankserve's ({RATIO_CONVENTION!r})")
    if not isinstance(m["source"], dict) or not {"path", "sha256"} <= m["source"].keys():
        fail("source must be an object with path and sha256")
    if m["calibration"] is not None and not isinstance(m["calibration"], dict):
        fail("calibration must be an object or null")
    if not isinstance(m["dtype"], str) or not isinstance(getattr(torch, m["dtype"], None), torch.dtype):
        fail(f"dtype {m['dtype']!r} is not a torch dtype name")
    for k in ("params_linear_dense", "params_linear"):
        if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 0:
            fail(f"{k} must be a non-negative integer, found {m[k]!r}")

    def pos_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    projs, bases = m["projections"], m["shared_bases"]
    if not isinstance(projs, dict) or not isinstance(bases, dict):
        fail("projections and shared_bases must be objects")
    for g, b in bases.items():
        if not isinstance(b, dict) or not isinstance(b.get("members"), list) or not b["members"]:
            fail(f"shared basis {g}: members must be a non-empty list")
        shape = b.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(pos_int(s) for s in shape)):
            fail(f"shared basis {g}: shape must be [rank, in] positive integers, found {shape!r}")
    for name, e in projs.items():
        if not isinstance(e, dict):
            fail(f"projection {name}: expected an object")
        kind, shape, rank = e.get("kind"), e.get("shape"), e.get("rank")
        if kind not in KINDS:
            fail(f"projection {name}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(pos_int(s) for s in shape)):
            fail(f"projection {name}: shape must be [out, in] positive integers, found {shape!r}")
        if kind == "dense" and rank is not None:
            fail(f"projection {name}: a dense projection has rank null, found {rank!r}")
        if kind != "dense" and not pos_int(rank):
            fail(f"projection {name}: rank must be a positive integer, found {rank!r}")
        if not isinstance(e.get("bias"), bool):
            fail(f"projection {name}: bias must be true or false")
        if kind == "shared":
            g = e.get("group")
            if not isinstance(g, str) or g not in bases:
                fail(f"projection {name}: group {g!r} is not in shared_bases")
            if name not in bases[g].get("members", []):
                fail(f"projection {name}: not listed as a member of group {g!r}")
            if [rank, shape[1]] != bases[g].get("shape"):
                fail(
                    f"projection {name}: rank {rank} and in {shape[1]} disagree with its group {g!r} basis "
                    f"shape {bases[g].get('shape')}"
                )
    for g, b in bases.items():
        for member in b["members"]:
            e = projs.get(member)
            if not e or e.get("kind") != "shared" or e.get("group") != g:
                fail(f"shared basis {g}: member {member} is not a shared projection of this group")
    if "healing" in m:
        _validate_healing(m["healing"], fail)

    int8.validate_record(m, fail)
    return m


def _validate_healing(h: object, fail) -> None:
    """The optional ``healing`` record written by ``rankserve heal`` (rankserve.heal.healed_manifest)."""
    if not isinstance(h, dict):
        fail("healing must be an object")
    t = h.get("teacher")
    if not isinstance(t, dict) or not isinstance(t.get("sha256"), str) or "path" not in t:
        fail("healing.teacher must be an object with path and sha256")
    data = h.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "source" in d for d in data):
        fail("healing.data must be a non-empty list of objects with a source")
    for k in ("tokens", "steps", "trained_params"):
        v = h.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            fail(f"healing.{k} must be a positive integer, found {v!r}")
    for k in ("lr", "final_kl", "wall_time_s"):
        v = h.get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            fail(f"healing.{k} must be a finite non-negative number, found {v!r}")
    if not isinstance(h.get("schedule"), str):
        fail("healing.schedule must be a string")
    trained = h.get("trained")
    if not isinstance(trained, list) or not trained or not all(isinstance(g, str) for g in trained):
        fail("healing.trained must be a non-empty list of parameter group names")


def read_manifest(path: str) -> dict:
    """The validated manifest of a checkpoint directory (or of a ``rankserve.json`` path)."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}: not a rankserve checkpoint") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    return validate_manifest(m, where=file)


def check_manifest_matches(model: nn.Module, manifest: dict) -> None:
    projs, bases = _describe_projections(model)
    if projs != manifest["projections"] or bases != manifest["shared_bases"]:
        diff = sorted(
            k
            for k in projs.keys() | manifest["projections"].keys()
            if projs.get(k) != manifest["projections"].get(k)
        )
        raise CheckpointError(
            "the manifest does not describe this model (differs at "
            f"{', '.join(diff[:3]) or 'shared_bases'}); build it with build_manifest(model)"
        )

    if int8.groups_of(model) != int8.groups(manifest):
        raise CheckpointError(
            "the manifest's int8 record does not describe this model's int8 weights; "
            "build it with rankserve.checkpoint.with_quantization(manifest, model, report)"
        )


def with_quantization(manifest: dict, model: nn.Module, report: QuantReport) -> dict:
    """``manifest`` (of the model before quantization) with the ``quantization`` record of ``model`` and the
    model's working dtype; format version 2 (:mod:`rankserve.checkpoint.int8`)."""
    out = dict(manifest)
    out["format_version"] = int8.INT8_FORMAT_VERSION
    out["dtype"] = dtype_name(model_dtype(model))
    out[int8.KEY] = {"scheme": SCHEME, "config": dict(report.config), "tensors": int8.groups_of(model)}
    return validate_manifest(out)
