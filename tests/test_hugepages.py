"""The huge-page arena and collapse (rankserve.runtime.hugepages), and the fast runner's use of them."""

import re

import pytest
import torch
from test_fast import lowrank_model

from rankserve.runtime.fast import FastRunner
from rankserve.runtime.hugepages import (
    ALIGN,
    HUGE_PAGE,
    MIN_COVER,
    Arena,
    collapse,
    model_arena,
    weight_pages,
)
from rankserve.runtime.options import RuntimeOptions


def thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except OSError:
        return None


def test_arena_places_aligned_views_of_one_buffer_and_spills_when_full():
    arena = Arena(3 * HUGE_PAGE)
    assert arena.buffer.data_ptr() % HUGE_PAGE == 0 and arena.buffer.numel() == 3 * HUGE_PAGE
    a = arena.copy(torch.arange(10, dtype=torch.float32))
    b = arena.empty((3, 5), torch.bfloat16)
    c = arena.copy(torch.ones(7, dtype=torch.int8))
    assert torch.equal(a, torch.arange(10, dtype=torch.float32)) and b.shape == (3, 5) and c.sum() == 7
    assert all(arena.holds(t) for t in (a, b, c)) and not arena.holds(torch.zeros(3))
    assert [t.data_ptr() - arena.buffer.data_ptr() for t in (a, b, c)] == [0, ALIGN, 2 * ALIGN]
    assert arena.used == 3 * ALIGN
    big = arena.empty((4 * HUGE_PAGE,), torch.uint8)  # more than is left: a plain tensor, not an error
    assert big.numel() == 4 * HUGE_PAGE and not arena.holds(big) and arena.used == 3 * ALIGN


def test_weight_pages_counts_only_pages_mostly_covered():
    arena = Arena(4 * HUGE_PAGE)
    base = arena.buffer.data_ptr()
    whole = arena.empty((HUGE_PAGE + HUGE_PAGE // 2,), torch.uint8)  # page 0 full, page 1 half
    assert weight_pages([whole, whole[:10]]) == [base]  # a view of the same storage counts once
    rest = arena.empty((HUGE_PAGE // 2,), torch.uint8)  # fills page 1 to 3/4 together with ``whole``'s tail
    assert MIN_COVER <= 0.75 and weight_pages([whole, rest]) == [base, base + HUGE_PAGE]
    assert weight_pages([torch.empty(0), None]) == []


def test_collapse_backs_arena_pages_where_the_kernel_can():
    arena = Arena(2 * HUGE_PAGE)
    t = arena.copy(torch.randn(2 * HUGE_PAGE // 4))
    n = collapse([t])
    assert n % HUGE_PAGE == 0 and 0 <= n <= 2 * HUGE_PAGE
    if thp_mode() in (None, "never"):
        assert n == 0
    assert torch.isfinite(t).all()  # contents are kept (collapse copies in place)


def test_fast_runner_packs_into_one_arena_once_per_model():
    model = lowrank_model("llama-gqa")
    x = torch.tensor([[1, 2, 3]])
    ref = FastRunner(lowrank_model("llama-gqa"), 1, 16, RuntimeOptions(backend="fast", hugepages=False))
    r = FastRunner(model, 1, 16, RuntimeOptions(backend="fast"))
    arena = model_arena(model, 0)  # the runner's: it holds the model's weights, so it is returned
    layer = r.decoder.layers[0]
    assert arena.holds(layer.qkv.first) and arena.holds(model.model.layers[0].self_attn.q_proj.V)
    assert r.huge_bytes % HUGE_PAGE == 0
    used = arena.used
    r2 = FastRunner(model, 1, 32, RuntimeOptions(backend="fast"))  # a second runner repacks nothing
    assert arena.used == used and r2.decoder.layers[0].qkv.first.data_ptr() == layer.qkv.first.data_ptr()
    pos, vf = torch.arange(3)[None], torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        got, want = r.prefill(x, pos, vf), ref.prefill(x, pos, vf)
    assert torch.equal(got, want)
    off = FastRunner(lowrank_model("llama-gqa"), 1, 16, RuntimeOptions(backend="fast", hugepages=False))
    assert off.huge_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runner_makes_no_arena():
    model = lowrank_model("llama-gqa").cuda()
    assert FastRunner(model, 1, 16, RuntimeOptions(backend="fast")).huge_bytes == 0
