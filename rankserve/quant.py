"""Symmetric int8 weight quantization: the pure tensor math (no modules, no files, no flows).

The layout every other part of rankserve uses (modules, checkpoints, the native kernels):

* a weight ``W`` [out, in] (a dense projection, a low-rank factor ``U`` [out, r] or ``V`` [r, in], a shared basis
  or its coefficients) is stored as ``q`` int8 [out, in], row-major, and ``scale`` fp32 [out, in // group];
* ``W[o, i] ~= q[o, i] * scale[o, i // group]``: one scale per output row and group of ``group`` consecutive input
  columns; ``group == in`` (``scale`` [out, 1]) is one scale per output channel;
* symmetric: ``q`` in [-127, 127] (-128 is never written, so ``-q`` is exact), ``scale = max|W over the group| / 127``,
  an all-zero group gets scale 0 and q 0.

The group size is not stored anywhere else: it is ``in // scale.shape[1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX = 127  # symmetric int8: q in [-QMAX, QMAX]
SCHEME = "int8-sym"  # the name written in manifests for this layout


def group_of(in_features: int, group_size: int | None) -> int:
    """The group actually used for a weight with ``in_features`` columns: ``None`` means per output channel.

    A group size that does not divide the columns is an error (a ragged last group would need its own rule).
    """
    if group_size is None:
        return in_features
    if group_size <= 0:
        raise ValueError(f"int8 group size must be positive, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"int8 group size {group_size} does not divide the {in_features} input columns; "
            "choose a divisor or per-channel scales (group size None)"
        )
    return group_size


def quantize_int8(W: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``W`` [out, in] (any float dtype) -> (``q`` int8 [out, in], ``scale`` fp32 [out, in // group])."""
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"int8 quantization takes a 2-D float matrix, got {W.dtype} {tuple(W.shape)}")
    out, inp = W.shape
    g = group_of(inp, group_size)
    w = W.detach().to(torch.float32).reshape(out, inp // g, g)  # (out, groups, g)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a matrix holding NaN or Inf")
    amax = w.abs().amax(dim=-1)  # (out, groups)
    scale = amax / QMAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(w * inv.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.reshape(out, inp).contiguous(), scale.contiguous()


def smoothing_scales(mats: list[Tensor]) -> Tensor:
    """Scales ``s`` [in] for matrices that read one input: ``s_j = 1 / max |M[:, j]|`` over every matrix, scaled to
    geometric mean 1 (columns that are zero everywhere keep 1).

    ``M diag(s)`` applied to the input divided by ``s`` is the same product, so the division can be folded into
    whatever writes the input (an RMSNorm's weight). With one int8 scale per row, small columns round coarsely
    relative to their size; SVD-LLM's whitening (``V = Sigma V^T S^-1``) gives the channels with large activations
    the small columns, so equal column maxima give those channels the precision of the rest.
    """
    colmax = torch.stack([M.detach().abs().to(torch.float32).amax(0) for M in mats]).amax(0)  # (in,)
    used = colmax > 0
    s = torch.ones_like(colmax)
    s[used] = 1.0 / colmax[used]
    return s / s[used].log().mean().exp() if used.any() else s


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The matrix ``q * scale`` [out, in] in ``dtype``: the eager reference every int8 kernel is tested against."""
    check_int8_layout(q, scale)
    out, inp = q.shape
    groups = scale.shape[1]
    w = q.to(torch.float32).reshape(out, groups, inp // groups) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out, inp).to(dtype)


def check_int8_layout(q: Tensor, scale: Tensor, name: str = "weight") -> None:
    """What :func:`dequantize_int8` needs of a pair: dtypes, shapes, a whole number of groups. Cheap (no scan of
    the values), so it runs on every dequantization; the scales' values are checked once, where a pair enters a
    model (:func:`check_int8`)."""
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"{name}: int8 weight must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if scale.dtype != torch.float32 or scale.ndim != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"{name}: int8 scale must be fp32 [{q.shape[0]}, groups], got {scale.dtype} {tuple(scale.shape)}"
        )
    groups = scale.shape[1]
    if groups < 1 or q.shape[1] % groups:
        raise ValueError(f"{name}: {groups} scale groups do not divide the {q.shape[1]} input columns")


def check_int8(q: Tensor, scale: Tensor, name: str = "weight") -> None:
    """Validate one stored (q, scale) pair: its layout, and finite non-negative scales."""
    check_int8_layout(q, scale, name)
    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"{name}: int8 scales must be finite and non-negative")
