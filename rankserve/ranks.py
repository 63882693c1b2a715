"""Rank budgets and rank allocation: how many parameters a ratio leaves, and which ranks spend them.

Pure arithmetic over matrix sizes and per-slot curves (spectra, loss estimates); no modules, no I/O. The curves
come from :mod:`rankserve.linalg` (spectra, :func:`rankserve.linalg.kfac_truncation_loss`). ``ratio`` is the
fraction of parameters REMOVED (SVD-LLM convention): ``ratio=0.4`` keeps 60%.
"""

from __future__ import annotations

import heapq
import math
import numbers
import operator
from collections.abc import Sequence

import torch

__all__ = ["rank_for_ratio", "max_useful_rank", "param_budget", "allocate_ranks", "allocate_ranks_by_loss"]


def _dims(out: int, inp: int) -> tuple[int, int]:
    try:
        out, inp = operator.index(out), operator.index(inp)
    except TypeError:
        raise ValueError(f"out and inp must be ints, got out={out!r}, inp={inp!r}") from None
    if out < 1 or inp < 1:
        raise ValueError(f"out and inp must be positive, got out={out}, inp={inp}")
    return out, inp


def rank_for_ratio(out: int, inp: int, ratio: float) -> int:
    """Uniform rank that removes ``ratio`` of the parameters of an ``[out, inp]`` matrix.

    ``r = floor(out * inp * (1 - ratio) / (out + inp))``, at least 1, because a rank-r factorization
    stores ``r * (out + inp)`` parameters against ``out * inp`` dense.
    """
    out, inp = _dims(out, inp)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio is the fraction of parameters removed and must satisfy 0 <= ratio < 1, got {ratio}"
        )
    # 1 - ratio is inexact in binary (1 - 0.9 = 0.09999999999999998): without the +1e-9 an exact
    # quotient such as 200*200*0.1/400 = 10 would floor to 9.
    r = math.floor(out * inp * (1.0 - float(ratio)) / (out + inp) + 1e-9)
    return max(1, r)


def max_useful_rank(out: int, inp: int) -> int:
    """Largest ``r`` with ``r * (out + inp) < out * inp``.

    At or above ``out*inp/(out+inp)`` the factorization stores at least as many parameters as the dense
    matrix (and costs more FLOPs), so the layer should stay dense. May be 0 for tiny matrices.
    """
    out, inp = _dims(out, inp)
    return (out * inp - 1) // (out + inp)


def param_budget(items: Sequence[dict], ratio: float) -> int:
    """Parameters spent by uniform ranks: ``sum_i rank_for_ratio(out_i, inp_i, ratio) * (out_i + inp_i)``.

    ``items`` are dicts with at least ``out`` and ``inp`` (the :func:`allocate_ranks` items).
    """
    return sum(
        rank_for_ratio(int(it["out"]), int(it["inp"]), ratio) * (int(it["out"]) + int(it["inp"]))
        for it in items
    )


# uniform budgets spent unevenly: by spectral energy, or by an estimate of the loss


def _allocation_inputs(items: Sequence[dict], ratio: float, min_rank: int) -> tuple[list[str], int]:
    """The checks every rank allocator makes first; returns the item names and the parameter budget."""
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    names = [str(it["name"]) for it in items]
    if len(set(names)) != len(names):
        raise ValueError("item names must be unique")
    return names, param_budget(items, ratio)


def allocate_ranks(items: Sequence[dict], ratio: float, *, min_rank: int = 1) -> dict[str, int]:
    """Per-matrix ranks with the same parameter budget as uniform ranks at ``ratio``.

    ``items``: dicts with ``name``, ``out``, ``inp`` and ``spectrum`` (singular values, descending; a
    whitened spectrum works too). Budget = :func:`param_budget` (``sum_i r_i^uniform (out_i + inp_i)``);
    the result spends at most that, and less only by less than one item's ``out + inp`` (the leftover
    cannot buy a rank anywhere), unless every matrix hits its cap.

    Greedy by marginal gain: start every matrix at ``min_rank``; repeatedly give one more rank to the
    matrix whose next singular value has the largest ``(sigma_k^2 / sum_j sigma_j^2) / (out + inp)``
    (heap; ties broken by item order, then index, so it is deterministic). Because spectra are sorted,
    per-matrix gains are non-increasing and the greedy is optimal for the relaxed knapsack. A matrix
    whose next rank no longer fits the remaining budget is retired. Ranks are capped at
    :func:`max_useful_rank` (beyond it a factorization saves nothing; we never choose dense here).

    Why normalise each spectrum by its total energy: raw sigma^2 scale with each matrix's weight norm
    (different projections/layers differ by orders of magnitude), so the greedy would pour rank into
    big-norm matrices regardless of how compressible they are. Normalised, the gain is the fraction of
    that matrix's energy recovered per parameter, i.e. we minimise the sum of relative errors.
    Singular values missing from a short spectrum count as gain 0.
    """
    names, budget = _allocation_inputs(items, ratio, min_rank)

    costs: list[int] = []
    caps: list[int] = []
    gains: list[list[float]] = []
    for it in items:
        out, inp = int(it["out"]), int(it["inp"])
        costs.append(out + inp)
        caps.append(max(min_rank, max_useful_rank(out, inp)))
        sig = torch.as_tensor(it["spectrum"]).detach().to("cpu", torch.float64).flatten()
        e = torch.nan_to_num(sig, nan=0.0, posinf=0.0) ** 2
        total = float(e.sum())
        g = (e / total / (out + inp)).tolist() if total > 0 else [0.0] * e.numel()
        gains.append(g)

    ranks = [min_rank] * len(items)
    remaining = budget - sum(min_rank * c for c in costs)
    if remaining < 0:
        raise ValueError(f"min_rank={min_rank} needs {budget - remaining} parameters, budget is {budget}")

    def gain(i: int, k: int) -> float:  # gain of the (k+1)-th singular value (0-based index k)
        g = gains[i]
        return g[k] if k < len(g) else 0.0

    heap = [(-gain(i, ranks[i]), i, ranks[i]) for i in range(len(items)) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i, k = heapq.heappop(heap)
        if costs[i] > remaining:
            continue  # remaining only shrinks: this matrix can never afford another rank
        ranks[i] = k + 1
        remaining -= costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-gain(i, ranks[i]), i, ranks[i]))
    return dict(zip(names, ranks, strict=True))


def _lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the points ``(xs[i], ys[i])`` (``xs`` increasing), left to right."""
    hull: list[int] = []
    for i in range(len(ys)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b unless it lies strictly below the chord from a to i
            if (xs[b] - xs[a]) * (ys[i] - ys[a]) - (ys[b] - ys[a]) * (xs[i] - xs[a]) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate_ranks_by_loss(
    items: Sequence[dict], ratio: float, *, min_rank: int = 1
) -> dict[str, int | None]:
    """Per-matrix ranks that spend uniform ranks' parameter budget where the loss says truncation hurts least.

    ``items``: dicts with ``name``, ``out``, ``inp`` and ``loss`` (``loss[r]`` = the loss increase at rank r,
    ``r = 0..``, measured or estimated; ranks past its end cost ``loss[-1]``). Budget = :func:`param_budget`.
    Each matrix gets a rank in ``[min_rank, max_useful_rank]`` at ``out + inp`` parameters per rank, or ``None``:
    it stays dense, at ``out * inp`` parameters and no loss.

    Why dense is a choice: at :func:`max_useful_rank` a factorization stores nearly as many parameters as the
    dense matrix (at most one rank's worth fewer) and still carries its truncation loss, and serving it costs
    two matrix-vector products instead of one. Keeping that matrix dense costs that last sliver of parameters
    and removes its loss, so a matrix the loss says to keep nearly whole is kept whole, and the parameters come
    from the matrices that compress well.

    A global threshold on loss saved per parameter: every matrix's choices, as points (parameters, loss), are
    replaced by their lower convex hull, whose segments have a constant, per matrix decreasing saving per
    parameter. Segments are bought from the best saving down (ties: item order, then position) until the
    budget is spent; the segment that does not fit is bought rank by rank as far as it goes (never to dense)
    and ends that matrix. That is the exact optimum of the relaxed (fractional) problem, so the result is
    within one segment of the critical matrix of the integer optimum, and the leftover is less than one rank
    of any matrix that could still grow. Deterministic.
    """
    names, budget = _allocation_inputs(items, ratio, min_rank)
    costs = [int(it["out"]) + int(it["inp"]) for it in items]
    ranks: list[int | None] = [min_rank] * len(items)
    remaining = budget - min_rank * sum(costs)
    if remaining < 0:
        raise ValueError(f"min_rank={min_rank} needs {budget - remaining} parameters, budget is {budget}")

    tops = [max(min_rank, max_useful_rank(int(it["out"]), int(it["inp"]))) for it in items]
    choices = []  # per item: (parameters, loss, rank or None for dense) along its lower hull
    segments = []  # (-saving per parameter, item, hull position of the segment's start)
    for i, it in enumerate(items):
        curve = torch.as_tensor(it["loss"]).detach().to("cpu", torch.float64).flatten()
        if curve.numel() == 0 or not bool(torch.isfinite(curve).all()):
            raise ValueError(f"{names[i]}: loss must be a non-empty curve of finite numbers")
        out, inp = int(it["out"]), int(it["inp"])
        pts = [
            (r * costs[i], float(curve[min(r, curve.numel() - 1)]), r) for r in range(min_rank, tops[i] + 1)
        ]
        if out * inp > pts[-1][0]:
            pts.append((out * inp, 0.0, None))
        hull = [pts[h] for h in _lower_hull([p[0] for p in pts], [p[1] for p in pts])]
        choices.append(hull)
        for k, (a, b) in enumerate(zip(hull, hull[1:], strict=False)):
            segments.append((-(a[1] - b[1]) / (b[0] - a[0]), i, k))
    segments.sort()
    stopped = [False] * len(items)
    for _, i, k in segments:
        if stopped[i]:
            continue
        (xa, _, ra), (xb, _, rb) = choices[i][k], choices[i][k + 1]
        if xb - xa <= remaining:
            ranks[i] = rb
            remaining -= xb - xa
            continue
        # the segment does not fit: its ranks one by one, as far as they go (the dense step is never split)
        last = rb if rb is not None else tops[i]
        take = min(last - ra, remaining // costs[i])
        ranks[i] = ra + take
        remaining -= take * costs[i]
        stopped[i] = True
    return dict(zip(names, ranks, strict=True))
