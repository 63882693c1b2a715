"""``fwsvd``: Fisher-weighted SVD (Hsu et al., ICLR 2022).

Each output row of a weight gets importance ``I_i = sum_j sum_samples (dL/dW_ij)^2``, the row sums of the
empirical Fisher of the LM loss on the calibration data (collected once on the dense model by
:func:`rankserve.calibration.fisher_row_importance`, one backward pass per sample). The SVD then runs on
``diag(sqrt(I)) W`` and the weighting is divided back out of U (:func:`rankserve.linalg.fisher_weighted_svd`).
Adaptive ranks use the plain spectra (the issue's choice: the Fisher weights only steer which directions survive).
"""

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
    need,
    register,
)
from rankserve.layers import Projection
from rankserve.linalg import Expansion, fisher_expansion, fisher_weighted_svd, svd_spectrum


@dataclass
class FWSVDConfig(FamilyConfig):
    name: ClassVar[str] = "fwsvd"
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset({"fisher"})


class FWSVDTransform(Transform):
    def spectrum(self, cfg: FWSVDConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        return svd_spectrum(weights[0])

    def expansion(
        self, cfg: FWSVDConfig, slot: Slot, weights: list[Tensor], data: SlotData
    ) -> list[Expansion]:
        return [fisher_expansion(weights[0], need(data, "fisher", cfg.name)[0])]

    def factorize(
        self, cfg: FWSVDConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        imp = need(data, "fisher", cfg.name)[0]
        U, V = fisher_weighted_svd(dense_weight(modules[0]), imp, rank)
        return SlotResult([low_rank(modules[0], U, V)])


register(FWSVDConfig, FWSVDTransform())
