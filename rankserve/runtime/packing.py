"""Packing projections for decode: one first-stage GEMV for q/k/v (and for gate/up), then small lifts.

A projection is, for packing purposes, a first stage ``A`` [r, in] and an optional lift ``L`` [out, r]:
dense ``W`` is (A = W, no lift), low-rank ``U V`` is (A = V, L = U), shared-basis ``C B`` is (A = B, L = C).
Projections reading the same input stack their first stages into one matrix, so the input vector is read
once and the weights stream in one call. Packing is exact (a concatenation) and in place: the projections'
parameters become views of the packed buffers, so a packed model holds one copy of its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankserve.layers import SCALE_SUFFIX, DenseLinear, LowRankLinear, Projection, SharedBasisLinear
from rankserve.quant import dequantize_int8
from rankserve.runtime.hugepages import ALIGN, Arena


@dataclass
class Stage:
    first: torch.Tensor  # [r_or_out, in], int8 when first_scale is set
    lift: torch.Tensor | None  # [out, r] or None (dense), int8 when lift_scale is set
    bias: torch.Tensor | None  # [out]
    first_scale: torch.Tensor | None = None  # fp32 [r_or_out, groups] of an int8 first stage
    lift_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.first.shape[0] if self.lift is None else self.lift.shape[0]


def stage_of(p: Projection) -> Stage:
    if not isinstance(p, (DenseLinear, LowRankLinear, SharedBasisLinear)):
        raise TypeError(f"cannot pack projection type {type(p).__name__}")
    # p.matrices is in the order applied: (weight,), (V, U) or (basis, coeff)
    first, first_scale = _matrix(p, p.matrices[0])
    lift, lift_scale = _matrix(p, p.matrices[1]) if len(p.matrices) > 1 else (None, None)
    return Stage(first, lift, _b(p), first_scale, lift_scale)


def _matrix(p: Projection, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stored matrix as it is: (q int8, scale) when quantized, else (the float tensor, None)."""
    q = p.qmat(name)
    return (q[0], q[1]) if q is not None else (getattr(p, name).detach(), None)


def _b(p: Projection):
    return None if p.bias is None else p.bias.detach()


@dataclass
class PackedGroup:
    """Several projections of one input.

    ``first`` [sum r_i (or out_i for dense members), in] is applied in one GEMV. Then each member's slice of
    the result is lifted by its ``lifts[i]`` (None for dense members, whose slice is already the output).
    Outputs come back in member order, biases added. Any of these matrices may be int8 (``rankserve.quant``
    layout): then ``first_scale`` / ``lift_scales[i]`` hold its fp32 scales, else they are None.
    """

    first: torch.Tensor
    splits: list[int]  # rows of ``first`` per member
    lifts: list[torch.Tensor | None]
    bias: torch.Tensor | None  # concatenated biases of all members ([sum out_i]) or None
    out_features: list[int]
    first_scale: torch.Tensor | None = None
    lift_scales: list[torch.Tensor | None] | None = None  # None: no int8 lift

    @property
    def all_dense(self) -> bool:
        return all(lift is None for lift in self.lifts)

    def lift_scale(self, i: int) -> torch.Tensor | None:
        return None if self.lift_scales is None else self.lift_scales[i]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor one application of the group reads: matrices, scales and bias."""
        out = [self.first, self.first_scale, self.bias, *self.lifts, *(self.lift_scales or [])]
        return [t for t in out if t is not None]


def packed_bytes(projs: list[Projection]) -> int:
    """An upper bound of the arena bytes :func:`pack_` of ``projs`` takes: every matrix and scale, each aligned."""
    n = 0
    for st in map(stage_of, projs):
        for t in (st.first, st.first_scale, st.lift, st.lift_scale):
            n += 0 if t is None else -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return n


def pack_(projs: list[Projection], arena: Arena | None = None) -> PackedGroup:
    """Pack projections that read the same input (e.g. q, k, v), in place: one copy of the weights, not two.

    The first stages are stacked into one new buffer and each projection's own first-stage matrix becomes a
    view of its rows, so the module tree (the eager path) keeps working on the same memory and the old tensors
    are freed. Stages that already lie back to back in one buffer (a second pack, or a single member) are used
    as they are. A shared basis is the exception: one tensor for several layers cannot be a view of each
    layer's buffer, so its rows are copied into every group that uses it. int8 first stages are stacked with
    their scales; the members of a group must then all be int8 (one GEMV reads one weight type).

    With an ``arena`` (rankserve.runtime.hugepages) every matrix and scale is copied into it, lifts too, and the
    projections view the copies: the weights then lie on huge pages, still one copy.
    """
    stages = [stage_of(p) for p in projs]
    quantized = [s.first_scale is not None for s in stages]
    if any(quantized) and not all(quantized):
        names = ", ".join(type(p).__name__ for p in projs)
        raise ValueError(
            f"cannot pack int8 and float first stages into one GEMV ({names}); quantize every projection "
            "of the layer (rankserve quantize) or none"
        )
    first = _stack_([p.matrices[0] for p in projs], projs, [s.first for s in stages], arena)
    first_scale = None
    if all(quantized):
        groups = _common_groups([s.first_scale for s in stages], first.shape[1])
        scales = [_regroup(s.first_scale, groups) for s in stages]
        # views only where the scales keep their grouping (a regrouped scale is a new tensor)
        first_scale = _stack_(
            [p.matrices[0] + SCALE_SUFFIX for p in projs],
            projs,
            scales,
            arena,
            views=[sc is s.first_scale for sc, s in zip(scales, stages, strict=True)],
        )
    lifts = [_place(p, s.lift, arena) for p, s in zip(projs, stages, strict=True)]
    lift_scales = [_place(p, s.lift_scale, arena, SCALE_SUFFIX) for p, s in zip(projs, stages, strict=True)]
    if any(s.bias is not None for s in stages):
        dtype = next(s.bias.dtype for s in stages if s.bias is not None)
        bias = torch.cat(
            [
                s.bias
                if s.bias is not None
                else torch.zeros(s.out_features, dtype=dtype, device=first.device)
                for s in stages
            ]
        )
    else:
        bias = None
    return PackedGroup(
        first,
        [s.first.shape[0] for s in stages],
        lifts,
        bias,
        [s.out_features for s in stages],
        first_scale,
        lift_scales if any(sc is not None for sc in lift_scales) else None,
    )


def _stack_(
    names: list[str],
    projs: list[Projection],
    parts: list[torch.Tensor],
    arena: Arena | None = None,
    views: list[bool] | None = None,
) -> torch.Tensor:
    """``parts`` [r_i, cols] as one [sum r_i, cols] tensor; unless they already lie back to back (in ``arena``,
    when given), a new buffer whose rows each projection's attribute ``names[i]`` then views (where
    ``views[i]``; a shared basis never)."""
    stacked = _stacked(parts)
    if stacked is not None and (arena is None or arena.holds(stacked)):
        return stacked
    rows = sum(t.shape[0] for t in parts)
    out = torch.cat(
        parts, 0, out=None if arena is None else arena.empty((rows, *parts[0].shape[1:]), parts[0].dtype)
    )
    row = 0
    for i, (p, name, part) in enumerate(zip(projs, names, parts, strict=True)):
        view = out[row : row + part.shape[0]]
        row += part.shape[0]
        if not (isinstance(p, SharedBasisLinear) or (views is not None and not views[i])):
            _rebind(p, name, view)
    return out


def _place(
    p: Projection, t: torch.Tensor | None, arena: Arena | None, suffix: str = ""
) -> torch.Tensor | None:
    """``p``'s lift ``t`` (``p.matrices[1]``, or its scale with ``suffix``) as the packed group holds it: copied
    into ``arena`` and viewed by ``p`` from there, or as it is (contiguous) without one."""
    if t is None:
        return None
    if arena is None or arena.holds(t):
        return t.contiguous()
    out = arena.copy(t)
    _rebind(p, p.matrices[1] + suffix, out)
    return out


def _rebind(p: Projection, name: str, t: torch.Tensor) -> None:
    """Make ``p``'s attribute ``name`` the tensor ``t`` (same values), a parameter again if it was one."""
    old = getattr(p, name)
    if isinstance(old, nn.Parameter):
        setattr(p, name, nn.Parameter(t, requires_grad=old.requires_grad))
    else:  # an int8 matrix or its scales: buffers
        setattr(p, name, t)


def _common_groups(scales: list[torch.Tensor], cols: int) -> int:
    """The finest scale grouping that every member's grouping refines to (their lcm); it divides ``cols``."""
    groups = 1
    for sc in scales:
        groups = math.lcm(groups, sc.shape[1])
    if cols % groups:
        raise ValueError(
            f"int8 scale groups {[sc.shape[1] for sc in scales]} have no common grouping of {cols}"
        )
    return groups


def _regroup(scale: torch.Tensor, groups: int) -> torch.Tensor:
    """``scale`` [rows, g] as [rows, groups] (``groups`` a multiple of g): each scale repeated over its sub-groups,
    so ``q * scale`` is unchanged."""
    g = scale.shape[1]
    return scale if g == groups else scale.repeat_interleave(groups // g, dim=1)


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


def float_matrix(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A packed matrix as floats in ``dtype``: dequantized if int8 (``scale`` set), else ``w`` itself."""
    return w if scale is None else dequantize_int8(w, scale, dtype)


def apply_packed(g: PackedGroup, x: torch.Tensor) -> torch.Tensor:
    """Reference (eager PyTorch) application, int8 matrices dequantized: [B, in] -> [B, sum out_i]."""
    t = x @ float_matrix(g.first, g.first_scale, x.dtype).T  # (B, sum r_i)
    outs = [
        part if lift is None else part @ float_matrix(lift, g.lift_scale(i), x.dtype).T
        for i, (part, lift) in enumerate(zip(t.split(g.splits, -1), g.lifts, strict=True))
    ]
    y = torch.cat(outs, -1)
    return y if g.bias is None else y + g.bias
