"""Projection modules: every linear in a model is one of these.

The model builds :class:`DenseLinear` everywhere; compression swaps individual projections for
:class:`LowRankLinear` (``y = U (V x) + b``) or :class:`SharedBasisLinear` (``y = C (B x) + b`` with ``B``
shared by a group of layers) without touching the model code.

int8 weights (the layout of :mod:`rankserve.quant`): a quantized matrix keeps its attribute name (``weight``,
``U``/``V``, ``basis``/``coeff``) but is an int8 *buffer*, with its fp32 scales in the sibling buffer
``<name>_scale``. :meth:`Projection.mat` is the float matrix (dequantized in the projection's working dtype),
:meth:`Projection.qmat` the stored pair; ``forward`` goes through ``mat``, so the eager path is the dequantizing
reference every int8 kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankserve.quant import check_int8, dequantize_int8

SCALE_SUFFIX = "_scale"  # buffer (and state-dict key) of a quantized matrix's scales: "V" -> "V_scale"


class Projection(nn.Module):
    """Base class of every linear layer. Subclasses keep ``in_features``/``out_features`` and ``bias``."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    kind = "abstract"
    matrices: tuple[str, ...] = ()  # attribute names of the weight matrices, in the order they are applied
    # dtype that int8 matrices dequantize to (the dtype the projection computes in); set by set_int8
    work_dtype: torch.dtype = torch.float32

    def mat(self, name: str) -> torch.Tensor:
        """Matrix ``name`` as a float tensor in the working dtype: the tensor itself, or dequantized if int8."""
        t = getattr(self, name)
        if t.dtype != torch.int8:
            return t
        return dequantize_int8(t, getattr(self, name + SCALE_SUFFIX), self.work_dtype)

    def qmat(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(q int8 [out, in], scale fp32 [out, groups])`` of an int8 matrix, None for a float one."""
        t = getattr(self, name)
        return (t, getattr(self, name + SCALE_SUFFIX)) if t.dtype == torch.int8 else None

    def is_int8(self) -> bool:
        return any(getattr(self, n).dtype == torch.int8 for n in self.matrices)

    def set_int8(self, name: str, q: torch.Tensor, scale: torch.Tensor, work_dtype: torch.dtype) -> None:
        """Replace matrix ``name`` by the int8 pair (``q``, ``scale``) as buffers; ``work_dtype`` is what
        :meth:`mat` dequantizes to. Passing the same tensors to several modules shares them (a shared basis)."""
        if name not in self.matrices:
            raise ValueError(
                f"{type(self).__name__} has no matrix {name!r} (it has {', '.join(self.matrices)})"
            )
        old = getattr(self, name)
        check_int8(q, scale, name)
        if tuple(q.shape) != tuple(old.shape):
            raise ValueError(f"{name}: int8 matrix {tuple(q.shape)} does not match {tuple(old.shape)}")
        delattr(self, name)  # a Parameter (or an earlier buffer) cannot be re-registered as a buffer in place
        self.register_buffer(name, q)
        self.register_buffer(name + SCALE_SUFFIX, scale)
        self.work_dtype = work_dtype

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
    matrices = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = _bias(out_features, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.mat("weight"), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.mat("weight")

    def param_count(self, count_shared: bool = True) -> int:
        return self.weight.numel()


class LowRankLinear(Projection):
    """y = U (V x) + b with U [out, r] and V [r, in]; √Σ is folded into both factors."""

    kind = "lowrank"
    matrices = ("V", "U")

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
        return F.linear(F.linear(x, self.mat("V")), self.mat("U"), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.mat("U") @ self.mat("V")

    def param_count(self, count_shared: bool = True) -> int:
        return self.U.numel() + self.V.numel()

    def rank(self) -> int:
        return self.V.shape[0]


class SharedBasisLinear(Projection):
    """y = C (B x) + b where the basis B [r, in] is one Parameter object shared by a group of layers
    and C [out, r] is this layer's own coefficient matrix."""

    kind = "shared"
    matrices = ("basis", "coeff")

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
        return F.linear(F.linear(x, self.mat("basis")), self.mat("coeff"), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.mat("coeff") @ self.mat("basis")

    def param_count(self, count_shared: bool = True) -> int:
        return self.coeff.numel() + (self.basis.numel() if count_shared else 0)

    def rank(self) -> int:
        return self.basis.shape[0]


def projections(model: nn.Module) -> dict[str, Projection]:
    """All projections of a model by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Projection)}


def densify_(model: nn.Module) -> list[str]:
    """Replace every factorized float projection by the :class:`DenseLinear` of its product (``U V``, ``C B``),
    in place; return the names replaced. The model computes the same function (up to rounding) and can then be
    compressed again, e.g. at a higher ratio: gradual compression, each stage healed before the next."""
    projs = projections(model)
    int8 = [n for n, m in projs.items() if m.is_int8()]
    if int8:
        raise ValueError(f"{int8[0]} holds int8 weights; multiply out the float factors, not quantized ones")
    done = []
    for name, m in projs.items():
        if isinstance(m, DenseLinear):
            continue
        w = m.dense_weight().detach()
        d = DenseLinear(m.in_features, m.out_features, m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            d.weight.copy_(w)
            if m.bias is not None:
                d.bias.copy_(m.bias)
        replace_module(model, name, d)
        done.append(name)
    return done


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
