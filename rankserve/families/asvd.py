"""``asvd``: activation-aware SVD (Yuan et al., 2023).

Input channel j is scaled by ``s_j = mean|x_j|^alpha`` before the SVD so that truncation errors land on
channels the calibration activations barely use; the inverse scale is folded into V
(:func:`rankserve.linalg.asvd_scaled_svd`). ``mean|x|`` comes from the layer-by-layer pipeline, on inputs produced
by the already-compressed blocks. Adaptive ranks use the spectra of the scaled matrices ``W diag(s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from rankserve.errors import InputError
from rankserve.families.base import (
    FamilyConfig,
    Slot,
    SlotData,
    SlotResult,
    Transform,
    dense_weight,
    f64,
    low_rank,
    need,
    register,
)
from rankserve.layers import Projection
from rankserve.linalg import Expansion, asvd_channel_scale, asvd_expansion, asvd_scaled_svd, svd_spectrum


@dataclass
class ASVDConfig(FamilyConfig):
    alpha: float = 0.5  # exponent of the activation scale mean|x|^alpha (the paper's default 0.5)

    name: ClassVar[str] = "asvd"
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset({"absmean"})

    def validate(self) -> ASVDConfig:
        super().validate()
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise InputError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        return self


class ASVDTransform(Transform):
    def spectrum(self, cfg: ASVDConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        s = asvd_channel_scale(need(data, "absmean", cfg.name), cfg.alpha)
        return svd_spectrum(f64(weights[0]) * s)

    def expansion(
        self, cfg: ASVDConfig, slot: Slot, weights: list[Tensor], data: SlotData
    ) -> list[Expansion]:
        return [asvd_expansion(weights[0], need(data, "absmean", cfg.name), cfg.alpha)]

    def factorize(
        self, cfg: ASVDConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        absmean = need(data, "absmean", cfg.name)
        U, V = asvd_scaled_svd(dense_weight(modules[0]), absmean, rank, cfg.alpha)
        return SlotResult([low_rank(modules[0], U, V)])


register(ASVDConfig, ASVDTransform())
