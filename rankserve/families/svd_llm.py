"""``svd-llm``: truncation-aware data whitening (Wang et al., ICLR 2025).

With ``X^T X = S S^T`` (Cholesky in float64 of the input Gram from the layer-by-layer pipeline), the truncation
loss ``||(W - U V) X^T||_F`` equals ``||(W - U V) S||_F``, so the SVD of ``W S`` truncated to rank r is optimal
in the data metric; ``V = sqrt(Sigma_r) B_r^T S^{-1}`` by a triangular solve. When ``X^T X`` is not positive
definite (fewer calibration tokens than features, a dead channel), :func:`rankserve.linalg.whitening_factor`
falls back to a small diagonal shift, then to an eigendecomposition; the method used is returned per matrix
(``info["whitening"]``), logged and recorded in the report. ``update_u`` applies the closed-form least-squares
update of U for the fixed V (:func:`rankserve.linalg.lstsq_update_u`). Adaptive ranks use the whitened spectra.
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
from rankserve.linalg import (
    Expansion,
    lstsq_update_u,
    whitened_expansion,
    whitened_spectrum,
    whitened_svd,
    whitening_factor,
)


@dataclass
class SVDLLMConfig(FamilyConfig):
    update_u: bool = False  # closed-form least-squares update of U after whitened truncation

    name: ClassVar[str] = "svd-llm"
    needs_calibration: ClassVar[bool] = True
    stats: ClassVar[frozenset[str]] = frozenset({"xtx"})


class SVDLLMTransform(Transform):
    def spectrum(self, cfg: SVDLLMConfig, slot: Slot, weights: list[Tensor], data: SlotData) -> Tensor:
        S, _ = whitening_factor(need(data, "xtx", cfg.name))
        return whitened_spectrum(weights[0], S)

    def expansion(
        self, cfg: SVDLLMConfig, slot: Slot, weights: list[Tensor], data: SlotData
    ) -> list[Expansion]:
        # update_u changes U after truncation; the allocator weighs the whitened truncation it starts from
        S, _ = whitening_factor(need(data, "xtx", cfg.name))
        return [whitened_expansion(weights[0], S)]

    def factorize(
        self, cfg: SVDLLMConfig, slot: Slot, modules: list[Projection], data: SlotData, rank: int
    ) -> SlotResult:
        xtx = need(data, "xtx", cfg.name)
        W = dense_weight(modules[0])
        S, method = whitening_factor(xtx)
        U, V = whitened_svd(W, S, rank)
        if cfg.update_u:
            U = lstsq_update_u(W, V, xtx)
        return SlotResult([low_rank(modules[0], U, V)], {"whitening": method})


register(SVDLLMConfig, SVDLLMTransform())
