"""Packing projections for decode: one first-stage GEMV for q/k/v (and for gate/up), then small lifts.

A projection is, for packing purposes, a first stage ``A`` [r, in] and an optional lift ``L`` [out, r]:
dense ``W`` is (A = W, no lift), low-rank ``U V`` is (A = V, L = U), shared-basis ``C B`` is (A = B, L = C).
Projections reading the same input stack their first stages into one matrix, so the input vector is read
once and the weights stream in one call. Packing is exact (a concatenation) and in place: the projections'
parameters become views of the packed buffers, so a packed model holds one copy of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankserve.layers import DenseLinear, LowRankLinear, Projection, SharedBasisLinear


@dataclass
class Stage:
    first: torch.Tensor  # [r_or_out, in]
    lift: torch.Tensor | None  # [out, r] or None (dense)
    bias: torch.Tensor | None  # [out]

    @property
    def out_features(self) -> int:
        return self.first.shape[0] if self.lift is None else self.lift.shape[0]


def stage_of(p: Projection) -> Stage:
    if isinstance(p, DenseLinear):
        return Stage(p.weight.detach(), None, _b(p))
    if isinstance(p, LowRankLinear):
        return Stage(p.V.detach(), p.U.detach(), _b(p))
    if isinstance(p, SharedBasisLinear):
        return Stage(p.basis.detach(), p.coeff.detach(), _b(p))
    raise TypeError(f"cannot pack projection type {type(p).__name__}")


def _b(p: Projection):
    return None if p.bias is None else p.bias.detach()


@dataclass
class PackedGroup:
    """Several projections of one input.

    ``first`` [sum r_i (or out_i for dense members), in] is applied in one GEMV. Then each member's slice of
    the result is lifted by its ``lifts[i]`` (None for dense members, whose slice is already the output).
    Outputs come back in member order, biases added.
    """

    first: torch.Tensor
    splits: list[int]  # rows of ``first`` per member
    lifts: list[torch.Tensor | None]
    bias: torch.Tensor | None  # concatenated biases of all members ([sum out_i]) or None
    out_features: list[int]

    @property
    def all_dense(self) -> bool:
        return all(lift is None for lift in self.lifts)


def pack_(projs: list[Projection]) -> PackedGroup:
    """Pack projections that read the same input (e.g. q, k, v), in place: one copy of the weights, not two.

    The first stages are stacked into one new buffer and each projection's own first-stage parameter becomes a
    view of its rows, so the module tree (the eager path) keeps working on the same memory and the old tensors
    are freed. Stages that already lie back to back in one buffer (a second pack, or a single member) are used
    as they are. A shared basis is the exception: one tensor for several layers cannot be a view of each
    layer's buffer, so its rows are copied into every group that uses it.
    """
    stages = [stage_of(p) for p in projs]
    first = _stacked([s.first for s in stages])
    if first is None:
        first = torch.cat([s.first for s in stages], 0)
        row = 0
        for p, s in zip(projs, stages, strict=True):
            view = first[row : row + s.first.shape[0]]
            row += s.first.shape[0]
            if isinstance(p, DenseLinear):
                p.weight = nn.Parameter(view, requires_grad=p.weight.requires_grad)
            elif isinstance(p, LowRankLinear):
                p.V = nn.Parameter(view, requires_grad=p.V.requires_grad)
    lifts = [None if s.lift is None else s.lift.contiguous() for s in stages]
    if any(s.bias is not None for s in stages):
        bias = torch.cat(
            [
                s.bias
                if s.bias is not None
                else torch.zeros(s.out_features, dtype=first.dtype, device=first.device)
                for s in stages
            ]
        )
    else:
        bias = None
    return PackedGroup(
        first, [s.first.shape[0] for s in stages], lifts, bias, [s.out_features for s in stages]
    )


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """``parts`` [r_i, in] as one [sum r_i, in] matrix without a copy if they lie back to back in one buffer."""
    head = parts[0]
    ptr = head.data_ptr()
    for t in parts:
        same_buffer = t.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        if not (t.is_contiguous() and same_buffer and t.dtype == head.dtype and t.data_ptr() == ptr):
            return None
        if t.dim() != 2 or t.shape[1] != head.shape[1]:
            return None
        ptr += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in parts)
    return head.as_strided((rows, head.shape[1]), (head.shape[1], 1))


def apply_packed(g: PackedGroup, x: torch.Tensor) -> torch.Tensor:
    """Reference (eager PyTorch) application: [B, in] -> [B, sum out_i]."""
    t = x @ g.first.T  # (B, sum r_i)
    outs = [
        part if lift is None else part @ lift.T
        for part, lift in zip(t.split(g.splits, -1), g.lifts, strict=True)
    ]
    y = torch.cat(outs, -1)
    return y if g.bias is None else y + g.bias
