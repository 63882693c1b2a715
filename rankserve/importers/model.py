"""What every reader returns: :class:`ImportedModel`, and the checks of one tensor against the shape the model
built from the config expects (:class:`Layout`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rankserve.config import ConfigError, ModelConfig
from rankserve.importers.errors import CheckpointImportError
from rankserve.io.assign import new_model
from rankserve.layers import projections

ATTN_KINDS = ("q", "k", "v", "o")


MLP_KINDS = ("gate", "up", "down")


PROJ_KINDS = ATTN_KINDS + MLP_KINDS


@dataclass
class SharedGroup:
    """One basis shared by several projections: ``W_m = coeff_m @ basis`` for every member ``m``."""

    basis: Tensor  # [r, in]
    members: dict[str, tuple[Tensor, Tensor | None]]  # module name -> (coeff [out, r], bias [out] or None)


@dataclass
class ImportedModel:
    """A foreign checkpoint, validated and described in rankserve's terms (HF Llama module names)."""

    family: str
    config: dict
    dense: dict[str, Tensor]
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]]  # module -> (U [out, r], V [r, in], bias)
    shared: dict[str, SharedGroup] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None

    def ranks(self) -> dict[str, int]:
        """Rank of every factorized projection (shared-basis members included), by module name."""
        ranks = {name: u.shape[1] for name, (u, _v, _b) in self.lowrank.items()}
        for group in self.shared.values():
            ranks.update({name: group.basis.shape[0] for name in group.members})
        return ranks

    def weight(self, module: str) -> Tensor:
        """The dense-equivalent weight [out, in] of one projection (materialised; for tests and analysis)."""
        if module in self.lowrank:
            u, v, _ = self.lowrank[module]
            return u.float() @ v.float()
        for group in self.shared.values():
            if module in group.members:
                return group.members[module][0].float() @ group.basis.float()
        return self.dense[f"{module}.weight"]


@dataclass(frozen=True)
class Layout:
    """What the model built from a config expects, read from its meta-device skeleton (never re-derived here):
    every projection's (out, in) and bias, and the tensors that are never factorized (embeddings, norms)."""

    config: ModelConfig
    projections: dict[str, tuple[int, int]]  # HF module name -> (out, in), in model order, lm_head last
    biased: frozenset[str]  # projections that carry a bias
    other_dense: dict[str, tuple[int, ...]]  # embeddings and norms

    @classmethod
    def from_config(cls, config: Mapping, source: str) -> Layout:
        try:  # the one place config values are validated
            cfg = ModelConfig.from_hf(dict(config))
        except ConfigError as e:
            raise CheckpointImportError(f"{source}: {e}") from None
        model = new_model(cfg)
        projs = projections(model)
        owned = {f"{name}.{leaf}" for name in projs for leaf in ("weight", "bias")}
        return cls(
            config=cfg,
            projections={name: (p.out_features, p.in_features) for name, p in projs.items()},
            biased=frozenset(name for name, p in projs.items() if p.bias is not None),
            other_dense={
                k: tuple(t.shape) for k, t in model.named_parameters(remove_duplicate=False) if k not in owned
            },
        )

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        return self.config.tie_word_embeddings

    def has_bias(self, module: str) -> bool:
        """Whether the config's architecture gives this projection a bias (the rule lives in ModelConfig)."""
        return module in self.biased

    def proj_shape(self, kind: str) -> tuple[int, int]:
        """(out, in) of one projection kind (``"q"``, ..., ``"down"``); every layer has the same."""
        return self.projections[module_name(0, kind)]


def module_name(layer: int, kind: str) -> str:
    """HF name of one projection, e.g. ``module_name(0, "q") == "model.layers.0.self_attn.q_proj"``."""
    parent = "self_attn" if kind in ATTN_KINDS else "mlp"
    return f"model.layers.{layer}.{parent}.{kind}_proj"


def shape_of(t: Tensor) -> list[int]:
    return list(t.shape)


def check_float(key: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise CheckpointImportError(f"{key}: expected a tensor, found {type(t).__name__}")
    if not t.is_floating_point():
        raise CheckpointImportError(f"{key}: expected a floating-point tensor, found {t.dtype}")
    return t


def expect(key: str, t: Any, shape: tuple[int, ...]) -> Tensor:
    check_float(key, t)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointImportError(f"{key}: expected shape {list(shape)}, found {shape_of(t)}")
    return t


def orient(
    module: str, u_key: str, u: Tensor, v_key: str, v: Tensor, out: int, inn: int
) -> tuple[Tensor, Tensor, bool]:
    """(U [out, r], V [r, in], swapped): the factor whose second dim is ``in`` is applied first.

    The names are tried first; the swap covers ALinear/BLinear, which mean opposite things in ASVD and Dobi.
    """
    for key, t in ((u_key, u), (v_key, v)):
        check_float(key, t)
        if t.dim() != 2:
            raise CheckpointImportError(
                f"{key}: expected a 2-D factor of {module}, found shape {shape_of(t)}"
            )
    for first, second, swapped in ((u, v, False), (v, u, True)):
        if first.shape[0] == out and second.shape[1] == inn and first.shape[1] == second.shape[0]:
            return first, second, swapped
    if u.shape[0] != out:
        raise CheckpointImportError(
            f"{u_key}: expected shape [{out}, r] (output side of {module}), found {shape_of(u)}"
        )
    if v.shape[1] != inn:
        raise CheckpointImportError(
            f"{v_key}: expected shape [r, {inn}] (input side of {module}), found {shape_of(v)}"
        )
    raise CheckpointImportError(
        f"{module}: rank mismatch, {u_key} has shape {shape_of(u)} but {v_key} has shape {shape_of(v)}"
    )
