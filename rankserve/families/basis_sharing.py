"""``basis-sharing``: one basis per projection type shared by groups of adjacent layers (Wang et al., ICLR 2025).

Layers ``[k*g, (k+1)*g)`` form group k (the last group may be shorter). For each shared projection type (q, k, v,
gate, up by default) the group's weights are stacked vertically, ``W_cat = [W_i; W_i+1; ...]`` ``[g*out, in]``,
and one whitened SVD of ``W_cat S`` (``S S^T`` = the sum of the group's input Grams) gives a shared basis
``[r, in]`` and per-layer coefficients ``[out, r]`` (:func:`rankserve.linalg.shared_basis_svd`). Unshared types
(o, down by default) get a per-layer whitened SVD, as SVD-LLM does.

Parameter budget: a group stores its basis once and g coefficient matrices, ``r * (in + g*out)`` parameters
against ``g * out * in`` dense: exactly the cost of a rank-r factorization of the stacked ``[g*out, in]`` matrix.
So the group rank is the uniform rank of that stacked matrix, ``r = floor(g*out*in*(1-ratio)/(g*out+in))``,
which removes ``ratio`` of the group's parameters up to one rank step, like every other family. Adaptive ranks
are not implemented for this family (ranks stay uniform; the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from rankserve.errors import InputError
from rankserve.families.base import (
    FamilyConfig,
    Slot,
    SlotData,
    SlotResult,
    Transform,
    dense_weight,
    layer_index,
    low_rank,
    need,
    register,
    short_name,
)
from rankserve.layers import Projection, SharedBasisLinear
from rankserve.linalg import (
    Expansion,
    shared_basis_expansion,
    shared_basis_svd,
    svd_expansion,
    truncated_svd,
    whitened_expansion,
    whitened_svd,
    whitening_factor,
)

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BasisSharingConfig(FamilyConfig):
    group_size: int = 2  # adjacent layers sharing one basis
    shared: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    whiten: bool = True  # whitened SVD (the paper); False = plain SVD of the stacked weights

    name: ClassVar[str] = "basis-sharing"
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset({"xtx"})
    supports_adaptive: ClassVar[bool] = False

    def validate(self) -> BasisSharingConfig:
        super().validate()
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise InputError(f"group_size must be an int >= 1, got {self.group_size!r}")
        bad = [k for k in self.shared if k not in KINDS]
        if bad:
            raise InputError(
                f"shared projection types must be among {', '.join(KINDS)}, got {', '.join(bad)}"
            )
        self.shared = tuple(self.shared)
        return self

    def own_stats(self) -> frozenset[str]:
        return self.stats if self.whiten else frozenset()


class BasisSharingTransform(Transform):
    def units(self, cfg: BasisSharingConfig, n_layers: int) -> list[list[int]]:
        g = cfg.group_size
        return [list(range(s, min(s + g, n_layers))) for s in range(0, n_layers, g)]

    def slots(self, cfg: BasisSharingConfig, projs: dict[str, Projection], n_layers: int) -> list[Slot]:
        by_layer: dict[int, list[str]] = {}
        for name in projs:
            by_layer.setdefault(layer_index(name), []).append(name)
        slots = []
        for k, unit in enumerate(self.units(cfg, n_layers)):
            kinds_done = set()
            for i in unit:
                for name in by_layer.get(i, []):
                    kind = short_name(name)
                    if kind not in cfg.shared:
                        p = projs[name]
                        slots.append(Slot(name, kind, [name], [i], p.out_features, p.in_features))
                    elif kind not in kinds_done:
                        kinds_done.add(kind)
                        members = [n for j in unit for n in by_layer.get(j, []) if short_name(n) == kind]
                        ins = {projs[n].in_features for n in members}
                        if len(ins) != 1:
                            raise ValueError(f"{kind} group {k}: members have different input sizes {ins}")
                        out = sum(projs[n].out_features for n in members)
                        slots.append(
                            Slot(
                                f"{kind}.g{k}",
                                kind,
                                members,
                                [layer_index(n) for n in members],
                                out,
                                ins.pop(),
                            )
                        )
        return slots

    def factorize(
        self, cfg: BasisSharingConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        weights = [dense_weight(m) for m in modules]
        info = {}
        S = None
        if cfg.whiten:
            S, info["whitening"] = whitening_factor(need(data, "xtx", cfg.name))
        if slot.kind not in cfg.shared:  # a private projection: per-layer (whitened) SVD
            U, V = truncated_svd(weights[0], rank) if S is None else whitened_svd(weights[0], S, rank)
            return SlotResult([low_rank(modules[0], U, V)], info)
        basis, coeffs = shared_basis_svd(weights, S, rank)
        w = modules[0].weight
        shared = nn.Parameter(basis.to(w.device, w.dtype), requires_grad=False)  # ONE object for the group
        new = []
        for m, c in zip(modules, coeffs, strict=True):
            bias = None if m.bias is None else m.bias.detach().clone()
            new.append(SharedBasisLinear(shared, c.to(w.device, w.dtype).contiguous(), bias, group=slot.name))
        return SlotResult(new, info)

    def spectrum(self, cfg: BasisSharingConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        raise NotImplementedError("basis-sharing keeps uniform ranks")

    def expansion(
        self, cfg: BasisSharingConfig, slot: Slot, weights: list[Tensor], data: SlotData
    ) -> list[Expansion]:
        # A shared basis is truncated for its whole group at once: one expansion, its rows split by member.
        S = whitening_factor(need(data, "xtx", cfg.name))[0] if cfg.whiten else None
        if slot.kind in cfg.shared:
            return shared_basis_expansion(weights, S)
        return [svd_expansion(weights[0]) if S is None else whitened_expansion(weights[0], S)]


register(BasisSharingConfig, BasisSharingTransform())
