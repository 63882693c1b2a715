"""Projection modules: every linear in a model is one of these.

The model builds :class:`DenseLinear` everywhere; compression swaps individual projections for
:class:`LowRankLinear` (``y = U (V x) + b``) or :class:`SharedBasisLinear` (``y = C (B x) + b`` with ``B``
shared by a group of layers) without touching the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Module):
    """Base class of every linear layer. Subclasses keep ``in_features``/``out_features`` and ``bias``."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    kind = "abstract"

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight [out, in] (materialised; for tests and analysis)."""
        raise NotImplementedError

    def param_count(self, count_shared: bool = True) -> int:
        """Weight parameters (bias excluded), the quantity a compression ratio is measured on."""
        raise NotImplementedError

    def rank(self) -> int | None:
        return None

    def extra_repr(self) -> str:
        r = self.rank()
        rank = f", rank={r}" if r is not None else ""
        return f"in={self.in_features}, out={self.out_features}{rank}, bias={self.bias is not None}"


def _bias(out_features: int, bias: bool, device, dtype) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None


class DenseLinear(Projection):
    """y = x Wᵀ + b with W [out, in]."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = _bias(out_features, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def param_count(self, count_shared: bool = True) -> int:
        return self.weight.numel()


class LowRankLinear(Projection):
    """y = U (V x) + b with U [out, r] and V [r, in]; √Σ is folded into both factors."""

    kind = "lowrank"

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.U = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.bias = _bias(out_features, bias, device, dtype)

    @classmethod
    def from_factors(
        cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"factor shapes do not chain: U {tuple(U.shape)}, V {tuple(V.shape)}")
        m = cls.__new__(cls)
        Projection.__init__(m)
        m.in_features, m.out_features = V.shape[1], U.shape[0]
        m.U, m.V = (
            nn.Parameter(U.contiguous(), requires_grad=False),
            nn.Parameter(V.contiguous(), requires_grad=False),
        )
        m.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V

    def param_count(self, count_shared: bool = True) -> int:
        return self.U.numel() + self.V.numel()

    def rank(self) -> int:
        return self.V.shape[0]


class SharedBasisLinear(Projection):
    """y = C (B x) + b where the basis B [r, in] is one Parameter object shared by a group of layers
    and C [out, r] is this layer's own coefficient matrix."""

    kind = "shared"

    def __init__(
        self, basis: nn.Parameter, coeff: torch.Tensor, bias: torch.Tensor | None = None, group: str = ""
    ):
        super().__init__()
        if coeff.shape[1] != basis.shape[0]:
            raise ValueError(f"coefficient {tuple(coeff.shape)} does not match basis {tuple(basis.shape)}")
        self.in_features, self.out_features = basis.shape[1], coeff.shape[0]
        self.basis = basis if isinstance(basis, nn.Parameter) else nn.Parameter(basis, requires_grad=False)
        self.coeff = coeff if isinstance(coeff, nn.Parameter) else nn.Parameter(coeff, requires_grad=False)
        self.bias = (
            None
            if bias is None
            else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False))
        )
        self.group = group  # name of the basis group, e.g. "q_proj.g0"; used by the checkpoint writer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis), self.coeff, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.coeff @ self.basis

    def param_count(self, count_shared: bool = True) -> int:
        return self.coeff.numel() + (self.basis.numel() if count_shared else 0)

    def rank(self) -> int:
        return self.basis.shape[0]


def projections(model: nn.Module) -> dict[str, Projection]:
    """All projections of a model by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Projection)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
