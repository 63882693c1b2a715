"""Basis Sharing's ``save_pretrained``: one basis per group of layers, a coefficient per layer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rankserve.importers.common import (
    as_directory,
    check_architecture,
    clean_config,
    finish,
    read_config,
    read_weight_files,
    reject_leftovers,
    source_provenance,
    split_projections,
    take_bias,
    tokenizer_dir,
    user_tokenizer,
    weight_files,
)
from rankserve.importers.errors import CheckpointImportError
from rankserve.importers.model import (
    ATTN_KINDS,
    PROJ_KINDS,
    ImportedModel,
    Layout,
    SharedGroup,
    expect,
    module_name,
    shape_of,
)


def _basis_groups(raw: Mapping, kind: str, layers: int, source: str) -> tuple[list[list[int]], int]:
    groups, rank = raw.get(f"{kind}_groups"), raw.get(f"num_basis_{kind}")
    if groups is None or rank is None:
        missing = f"{kind}_groups" if groups is None else f"num_basis_{kind}"
        raise CheckpointImportError(f"{source}: config lacks {missing}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CheckpointImportError(
            f"{source}: config num_basis_{kind} must be a positive int, found {rank!r}"
        )
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and g and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
        for g in groups
    ):
        raise CheckpointImportError(
            f"{source}: config {kind}_groups must be a list of non-empty lists of layer indices"
        )
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(layers)):
        raise CheckpointImportError(
            f"{source}: config {kind}_groups {groups} must cover layers 0..{layers - 1} exactly once"
        )
    return groups, rank


def _group_basis(
    state: Mapping[str, Tensor], kind: str, parent: str, group: list[int], shape: tuple[int, int]
) -> tuple[Tensor, list[str]]:
    """(the group's basis, every key it is stored under), after checking that all those copies agree."""
    aliases = [
        key
        for layer in group
        for key in (
            f"model.{kind}_basis.{layer}.weight",
            f"model.layers.{layer}.{parent}.{kind}_basis.weight",
        )
        if key in state
    ]
    if not aliases:
        raise CheckpointImportError(
            f"missing tensor: model.{kind}_basis.{group[0]}.weight (basis of {kind}_proj group {group})"
        )
    basis = expect(aliases[0], state[aliases[0]], shape)
    for key in aliases[1:]:
        other = state[key]
        if tuple(other.shape) != tuple(basis.shape):
            detail = f"shapes {shape_of(basis)} vs {shape_of(other)}"
        elif not torch.equal(other, basis):
            detail = f"max |difference| {(other.float() - basis.float()).abs().max().item():.3g}"
        else:
            continue
        raise CheckpointImportError(
            f"{aliases[0]} and {key} should hold the one shared basis of {kind}_proj group {group}, "
            f"but they differ ({detail})"
        )
    return basis, aliases


def read_basis_sharing(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """Basis Sharing's ``save_pretrained``: one basis per group of layers, a coefficient per layer.

    For each projection kind x: ``model.{x}_basis.{i}.weight`` [r_x, in] (and per-layer aliases
    ``model.layers.{i}.{self_attn|mlp}.{x}_basis.weight``) must be identical within a group;
    ``model.layers.{i}...{x}_proj.weight`` is the coefficient [out, r_x]. Groups of several layers become one
    :class:`SharedGroup`; singleton groups are plain low-rank pairs (coefficient = U, basis = V).
    """
    directory, files = as_directory(src)
    source = str(src)
    raw = read_config(directory)
    model_type = check_architecture(raw, source)
    geometry = Layout.from_config(raw, source)
    groups = {kind: _basis_groups(raw, kind, geometry.layers, source) for kind in PROJ_KINDS}
    files = files or weight_files(directory)
    state = read_weight_files(files)
    notes: list[str] = []

    # Every projection has a basis, so all are taken here; the shared core then takes lm_head, embeddings and
    # norms from what is left (the coefficients look like dense "_proj.weight" tensors, so they must go first).
    shared: dict[str, SharedGroup] = {}
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    consumed: set[str] = set()
    for kind in PROJ_KINDS:
        out, inn = geometry.proj_shape(kind)
        kind_groups, rank = groups[kind]
        parent = "self_attn" if kind in ATTN_KINDS else "mlp"
        for index, group in enumerate(kind_groups):
            basis, aliases = _group_basis(state, kind, parent, group, (rank, inn))
            consumed.update(aliases)
            members: dict[str, tuple[Tensor, Tensor | None]] = {}
            for layer in group:
                module = module_name(layer, kind)
                key = f"{module}.weight"
                if key not in state:
                    raise CheckpointImportError(
                        f"missing tensor: {key} (coefficient [{out}, {rank}] of {module})"
                    )
                coeff = expect(key, state[key], (out, rank))
                consumed.add(key)
                members[module] = (
                    coeff,
                    take_bias(state, (f"{module}.bias",), out, consumed, geometry, module),
                )
            if len(group) > 1:
                shared[f"{kind}_proj.g{index}"] = SharedGroup(basis, members)
            else:
                ((module, (coeff, bias)),) = members.items()
                lowrank[module] = (coeff, basis, bias)

    rest = {k: v for k, v in state.items() if k not in consumed}

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        # Basis Sharing never factorizes lm_head, the only projection left; these names never match.
        return f"{module}.coefficient.weight", f"{module}.basis.weight", ()

    handled = frozenset(module_name(layer, kind) for layer in range(geometry.layers) for kind in PROJ_KINDS)
    split = split_projections(rest, geometry, factor_keys, {}, "config", notes, handled)
    reject_leftovers(rest, split.consumed, "basis-sharing", source)
    split.lowrank.update(lowrank)
    config = clean_config(raw, model_type, notes)
    provenance = source_provenance(
        Path(src), "basis-sharing", [directory / "config.json", *files], raw, notes
    )
    provenance["groups"] = {kind: groups[kind][0] for kind in PROJ_KINDS}
    tok = user_tokenizer(tokenizer) or tokenizer_dir(directory)
    return finish("basis-sharing", config, geometry, split, shared, provenance, tok)
