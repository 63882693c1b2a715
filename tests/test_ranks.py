"""rankserve.ranks: rank budgets and the two allocators, against their definitions and brute force."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rankserve.ranks import (
    allocate_ranks,
    allocate_ranks_by_loss,
    max_useful_rank,
    param_budget,
    rank_for_ratio,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _convex_curve(k: int, seed: int) -> torch.Tensor:
    """loss[r], r = 0..k: decreasing and convex (each rank saves less than the one before)."""
    c = torch.sort(torch.rand(k, generator=gen(seed), dtype=F64) * (seed + 1), descending=True).values
    return torch.cat([c.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=F64)])


# ---------------------------------------------------------------------------------------------- ranks


def test_rank_for_ratio_values():
    assert rank_for_ratio(576, 576, 0.2) == math.floor(576 * 576 * 0.8 / 1152)  # 230
    assert rank_for_ratio(1536, 576, 0.4) == math.floor(1536 * 576 * 0.6 / 2112)
    assert rank_for_ratio(4, 4, 0.0) == 2
    assert rank_for_ratio(2, 2, 0.99) == 1  # at least 1
    assert rank_for_ratio(200, 200, 0.9) == 10  # 1 - 0.9 rounds below 0.1 in binary
    # parameters kept never exceed the (1 - ratio) target
    for out, inp, ratio in [(576, 192, 0.3), (1536, 576, 0.6), (100, 7, 0.25)]:
        r = rank_for_ratio(out, inp, ratio)
        assert r * (out + inp) <= out * inp * (1 - ratio) + 1e-6
        assert (r + 1) * (out + inp) > out * inp * (1 - ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_rank_for_ratio_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(24, 40, ratio)


def test_max_useful_rank():
    for out, inp in [(24, 40), (40, 24), (576, 576), (1536, 576), (2, 2), (1, 1), (3, 6)]:
        r = max_useful_rank(out, inp)
        assert r >= 0
        assert r * (out + inp) < out * inp
        assert (r + 1) * (out + inp) >= out * inp


def test_param_budget():
    items = [{"out": 24, "inp": 40}, {"out": 40, "inp": 24}, {"out": 8, "inp": 8}]
    expect = sum(rank_for_ratio(it["out"], it["inp"], 0.3) * (it["out"] + it["inp"]) for it in items)
    assert param_budget(items, 0.3) == expect
    with pytest.raises(ValueError):
        param_budget(items, 1.0)


# ---------------------------------------------------------------------------------------------- allocation


def _items(specs):
    return [{"name": name, "out": o, "inp": i, "spectrum": s} for name, o, i, s in specs]


def _spent(items, ranks):
    """Parameters of an allocation; a rank of None is the dense matrix."""
    return sum(
        it["out"] * it["inp"] if ranks[it["name"]] is None else ranks[it["name"]] * (it["out"] + it["inp"])
        for it in items
    )


def test_allocate_ranks_budget_and_preference():
    n = 64
    flat = torch.ones(n, dtype=F64)
    decay = 0.5 ** torch.arange(n, dtype=F64)
    items = _items([("flat", n, n, flat), ("decay", n, n, decay)])
    for ratio in (0.1, 0.3, 0.5, 0.8):
        ranks = allocate_ranks(items, ratio)
        budget = param_budget(items, ratio)
        spent = _spent(items, ranks)
        assert budget - max(it["out"] + it["inp"] for it in items) < spent <= budget
        assert ranks["flat"] > ranks["decay"]
        assert all(1 <= ranks[it["name"]] <= max_useful_rank(n, n) for it in items)


def test_allocate_ranks_scale_invariant_and_deterministic_ties():
    n = 48
    spec = torch.linspace(2, 1, n, dtype=F64)
    # identical shapes of spectrum, different weight norms: normalisation makes them equal
    items = _items([("a", n, n, spec), ("b", n, n, 1000 * spec), ("c", n, n, spec)])
    r1 = allocate_ranks(items, 0.37)
    r2 = allocate_ranks(items, 0.37)
    assert r1 == r2
    assert max(r1.values()) - min(r1.values()) <= 1
    assert r1["a"] >= r1["b"] >= r1["c"]  # ties go to the earlier item


def test_allocate_ranks_mixed_shapes_and_min_rank():
    g = gen(7)
    items = []
    for i, (o, inp) in enumerate([(24, 40), (40, 24), (8, 8), (64, 16), (3, 5)]):
        s = torch.sort(torch.rand(min(o, inp), generator=g, dtype=F64) ** (i + 1), descending=True).values
        items.append({"name": f"m{i}", "out": o, "inp": inp, "spectrum": s})
    for ratio in (0.0, 0.2, 0.6):
        ranks = allocate_ranks(items, ratio, min_rank=1)
        assert _spent(items, ranks) <= param_budget(items, ratio)
    ranks = allocate_ranks(items, 0.2, min_rank=2)
    assert min(ranks.values()) >= 2
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks(items, 0.9, min_rank=10)
    with pytest.raises(ValueError, match="ratio"):
        allocate_ranks(items, 1.0)


def test_allocate_ranks_fast_for_a_small_llm():
    # SmolLM2-135M-like: 30 layers x (q, k, v, o, gate, up, down)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    g = gen(9)
    items = []
    for layer in range(30):
        for j, (o, i) in enumerate(shapes):
            k = min(o, i)
            decay = 0.5 + torch.rand((), generator=g, dtype=F64).item() * 5
            s = torch.exp(-decay * torch.arange(k, dtype=F64) / k) + 0.01 * torch.rand(
                k, generator=g, dtype=F64
            )
            items.append(
                {
                    "name": f"l{layer}.p{j}",
                    "out": o,
                    "inp": i,
                    "spectrum": torch.sort(s, descending=True).values,
                }
            )
    assert len(items) == 210
    t0 = time.perf_counter()
    ranks = allocate_ranks(items, 0.2)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    budget = param_budget(items, 0.2)
    spent = _spent(items, ranks)
    assert budget - max(o + i for o, i in shapes) < spent <= budget


def _brute_force(items, ratio):
    """The best ranks by exhaustive search over [1, max_useful_rank] and dense (None) per item within the budget."""
    import itertools

    budget = param_budget(items, ratio)
    ranges = [[*range(1, max_useful_rank(it["out"], it["inp"]) + 1), None] for it in items]
    best = None
    for rs in itertools.product(*ranges):
        ranks = {it["name"]: r for r, it in zip(rs, items, strict=True)}
        if _spent(items, ranks) <= budget:
            loss = _objective(items, ranks)
            best = loss if best is None else min(best, loss)
    return best


def _objective(items, ranks):
    return sum(0.0 if ranks[it["name"]] is None else float(it["loss"][ranks[it["name"]]]) for it in items)


def _slack(items):
    """How far the allocator may sit above the integer optimum: one rank of any item, plus the one step to dense
    that is never split (the loss left at max_useful_rank)."""
    one_rank = max(float(it["loss"][0] - it["loss"][1]) for it in items)
    return one_rank + max(float(it["loss"][max_useful_rank(it["out"], it["inp"])]) for it in items)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_allocate_ranks_by_loss_near_brute_force_for_equal_costs(ratio):
    items = [{"name": f"m{i}", "out": 12, "inp": 16, "loss": _convex_curve(12, i)} for i in range(4)]
    ranks = allocate_ranks_by_loss(items, ratio)
    best = _brute_force(items, ratio)
    assert best - 1e-12 <= _objective(items, ranks) <= best + _slack(items)
    assert param_budget(items, ratio) - 28 < _spent(items, ranks) <= param_budget(items, ratio)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_allocate_ranks_by_loss_near_brute_force_for_mixed_costs(ratio):
    shapes = [(12, 16), (16, 10), (9, 14), (20, 6)]
    items = [
        {"name": f"m{i}", "out": o, "inp": n, "loss": _convex_curve(min(o, n), i)}
        for i, (o, n) in enumerate(shapes)
    ]
    ranks = allocate_ranks_by_loss(items, ratio)
    best = _brute_force(items, ratio)
    assert best - 1e-12 <= _objective(items, ranks) <= best + _slack(items)
    budget = param_budget(items, ratio)
    assert budget - max(o + n for o, n in shapes) < _spent(items, ranks) <= budget
    for it in items:
        r = ranks[it["name"]]
        assert r is None or 1 <= r <= max_useful_rank(it["out"], it["inp"])


def test_allocate_ranks_by_loss_keeps_a_matrix_dense_rather_than_at_break_even():
    """A matrix whose every rank matters (flat curve) next to ones that one rank fixes (steep): at the
    break-even rank the factorization stores almost the dense matrix's parameters and keeps most of its loss,
    so the allocator keeps it dense and pays with the steep ones (the leftover buys them ranks that save
    nothing, as uniform ranks would have spent it); with no budget for that, it stays factorized."""
    k = 32
    flat = torch.linspace(1, 0, k + 1, dtype=F64)
    steep = torch.cat([torch.tensor([1.0], dtype=F64), torch.zeros(k, dtype=F64)])
    items = [{"name": "flat", "out": k, "inp": k, "loss": flat}]
    items += [{"name": f"steep{i}", "out": k, "inp": k, "loss": steep} for i in range(3)]
    ranks = allocate_ranks_by_loss(items, 0.5)
    assert ranks["flat"] is None and all(ranks[f"steep{i}"] >= 1 for i in range(3))
    assert _objective(items, ranks) == 0.0
    assert _spent(items, ranks) <= param_budget(items, 0.5)
    ranks = allocate_ranks_by_loss(items, 0.9)  # budget 4 x 3 ranks: dense (16 ranks' worth) cannot fit
    assert ranks["flat"] is not None and _spent(items, ranks) <= param_budget(items, 0.9)


def test_allocate_ranks_by_loss_follows_the_loss_and_is_deterministic():
    k = 32
    flat = torch.linspace(1, 0, k + 1, dtype=F64)  # every rank saves the same: truncating hurts a lot
    steep = torch.cat([torch.tensor([1.0], dtype=F64), torch.zeros(k, dtype=F64)])  # one rank is enough
    noisy = (flat + 0.05 * torch.rand(k + 1, generator=gen(2), dtype=F64)).clamp_min(0)  # not convex
    items = [
        {"name": n, "out": k, "inp": k, "loss": c}
        for n, c in (("flat", flat), ("steep", steep), ("noisy", noisy))
    ]
    ranks = allocate_ranks_by_loss(items, 0.5)
    assert ranks == allocate_ranks_by_loss(items, 0.5)
    # one of the two that every rank matters to is kept whole (noisy: it loses more), the other gets the rest
    assert ranks["steep"] == 1 and ranks["noisy"] is None and ranks["flat"] > 1
    budget = param_budget(items, 0.5)
    assert budget - 2 * k < _spent(items, ranks) <= budget
    # a short curve: ranks past its end cost its last value
    short = [
        {"name": "a", "out": k, "inp": k, "loss": [1.0, 0.5]},
        {"name": "b", "out": k, "inp": k, "loss": flat},
    ]
    assert allocate_ranks_by_loss(short, 0.5)["a"] == 1
    with pytest.raises(ValueError, match="finite"):
        allocate_ranks_by_loss([{"name": "a", "out": k, "inp": k, "loss": [float("nan")]}], 0.5)
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks_by_loss(items, 0.9, min_rank=20)
