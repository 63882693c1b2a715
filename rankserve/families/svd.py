"""``svd``: plain truncated SVD of each weight (Eckart-Young optimal in the Frobenius norm). Needs no data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from rankserve.families.base import (
    FamilyConfig,
    Slot,
    SlotData,
    SlotResult,
    Transform,
    dense_weight,
    low_rank,
    register,
)
from rankserve.layers import Projection
from rankserve.linalg import Expansion, svd_expansion, svd_spectrum, truncated_svd


@dataclass
class SVDConfig(FamilyConfig):
    name: ClassVar[str] = "svd"


class SVDTransform(Transform):
    def spectrum(self, cfg: SVDConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        return svd_spectrum(weights[0])

    def expansion(self, cfg: SVDConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> list[Expansion]:
        return [svd_expansion(weights[0])]

    def factorize(
        self, cfg: SVDConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        U, V = truncated_svd(dense_weight(modules[0]), rank)
        return SlotResult([low_rank(modules[0], U, V)])


register(SVDConfig, SVDTransform())
