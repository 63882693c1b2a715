"""int8 weights in a checkpoint: the manifest's ``quantization`` record, how tensors are named, how a file is checked.

A quantized checkpoint is format version 2 (:data:`INT8_FORMAT_VERSION`), so a rankserve that predates int8 says
it needs a newer version instead of failing on the first int8 tensor. Its manifest holds::

    "quantization": {"scheme": "int8-sym",                          # rankserve.quant.SCHEME
                     "config": {"method": "int8", "version": 1, "group_size": null,
                                "lm_head": true, "factor_group_size": 16},
                     "tensors": {"model.layers.0.self_attn.q_proj.V": 576, "shared_bases.q_proj.g0": 64, ...}}

``tensors`` maps every int8 tensor (checkpoint name; a shared basis once, under ``shared_bases.<group>``) to its
group, the input columns per scale. Its scales are the fp32 tensor of the same name plus ``_scale``
(``rankserve.layers.SCALE_SUFFIX``). The record must list exactly the matrices the config quantizes, each with
the group ``Int8Config.group`` gives it, and every pair must pass ``rankserve.quant.check_int8``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from rankserve.checkpoint.names import BASIS_PREFIX, CheckpointError
from rankserve.errors import InputError
from rankserve.layers import (
    SCALE_SUFFIX,
    DenseLinear,
    LowRankLinear,
    Projection,
    SharedBasisLinear,
    projections,
)
from rankserve.quant import SCHEME, check_int8
from rankserve.quantize import Int8Config, config_from_dict

INT8_FORMAT_VERSION = 2
KEY = "quantization"
_CLASSES = {c.kind: c for c in (DenseLinear, LowRankLinear, SharedBasisLinear)}


def tensor_name(name: str, p: Projection, matrix: str) -> str:
    """Checkpoint name of matrix ``matrix`` of projection ``name``: a shared basis is stored once per group."""
    return BASIS_PREFIX + p.group if matrix == "basis" else f"{name}.{matrix}"


def int8_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Checkpoint name -> (q, scale) of every int8 matrix of ``model`` (a shared basis once)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, p in projections(model).items():
        for m in p.matrices:
            pair = p.qmat(m)
            if pair is not None:
                out.setdefault(tensor_name(name, p, m), pair)
    return out


def groups_of(model: nn.Module) -> dict[str, int]:
    """Checkpoint name -> group (input columns per scale) of every int8 matrix of ``model``."""
    return {k: q.shape[1] // s.shape[1] for k, (q, s) in int8_pairs(model).items()}


def _expected(m: dict, cfg: Int8Config) -> dict[str, int]:
    """Checkpoint name -> group of every int8 matrix a manifest's projections imply under ``cfg``."""
    out = {}
    for name, e in m["projections"].items():
        if name == "lm_head" and not cfg.lm_head:
            continue
        # The first matrix reads the input (in columns), a lift reads the rank.
        matrices = _CLASSES[e["kind"]].matrices
        for i, matrix in enumerate(matrices):
            cols = e["shape"][1] if i == 0 else e["rank"]
            key = BASIS_PREFIX + e["group"] if matrix == "basis" else f"{name}.{matrix}"
            out[key] = cfg.group(cols, matrices, i)
    return out


def validate_record(m: dict, fail: Callable[[str], None]) -> None:
    """Check a manifest's ``quantization`` record against its version and projections (called by
    ``validate_manifest`` once the projections are known to be well formed)."""
    q, version = m.get(KEY), m["format_version"]
    if q is None:
        if version >= INT8_FORMAT_VERSION:
            fail(f"format_version {version} is the int8 format, but there is no {KEY} record")
        return
    if version < INT8_FORMAT_VERSION:
        fail(f"a {KEY} record needs format_version {INT8_FORMAT_VERSION}, found {version}")
    if not isinstance(q, dict) or not {"scheme", "config", "tensors"} <= q.keys():
        fail(f"{KEY} must be an object with scheme, config and tensors")
    if q["scheme"] != SCHEME:
        fail(f"{KEY} scheme {q['scheme']!r} is not known (this rankserve reads {SCHEME!r})")
    try:
        cfg = config_from_dict(q["config"]) if isinstance(q["config"], dict) else None
    except InputError as e:
        fail(f"{KEY}.config: {e}")
    if not isinstance(cfg, Int8Config):
        fail(f"{KEY}.config must be an int8 config, found {q['config']!r}")
    tensors = q["tensors"]
    ok = isinstance(tensors, dict) and all(
        isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in tensors.values()
    )
    if not ok:
        fail(f"{KEY}.tensors must map tensor names to positive group sizes")
    want = _expected(m, cfg)
    for k in sorted(want.keys() | tensors.keys()):
        if k not in tensors:
            fail(f"{KEY}.tensors lacks {k}, which its config quantizes")
        if k not in want:
            fail(f"{KEY}.tensors lists {k}, which its config does not quantize")
        if tensors[k] != want[k]:
            fail(
                f"{KEY}.tensors: {k} has group {tensors[k]}, but its config ({cfg.to_dict()}) gives {want[k]}"
            )


def groups(manifest: dict) -> dict[str, int]:
    """Checkpoint name -> group of every int8 tensor a (validated) manifest declares; empty for float files."""
    return dict(manifest.get(KEY, {}).get("tensors", {}))


def expected_scales(shapes: Mapping[str, tuple[int, ...]], manifest: dict) -> dict[str, tuple[int, int]]:
    """Scale tensor name -> shape, for the int8 tensors of ``manifest`` whose shapes are in ``shapes``."""
    return {k + SCALE_SUFFIX: (shapes[k][0], shapes[k][1] // g) for k, g in groups(manifest).items()}


def check_pairs(tensors: Mapping[str, torch.Tensor], manifest: dict, where: str) -> None:
    """Every int8 pair a manifest declares passes ``check_int8`` (dtypes, shapes, finite non-negative scales)."""
    for k in groups(manifest):
        try:
            check_int8(tensors[k], tensors[k + SCALE_SUFFIX], k)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
