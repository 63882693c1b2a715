"""2 MiB pages under the weights the fast decode streams (Linux), so that reading them misses the TLB less.

Two ways in: :class:`Arena`, one 2 MiB-aligned buffer advised for huge pages before its first touch, which the
packing copies every layer's weights into (rankserve.runtime.packing); and :func:`collapse`, which rebacks pages
of tensors already written (the head, or where the arena's pages came back small).

The decode GEMV reads every weight once per token in several row streams per thread, and with 4 KiB pages each
stream crosses a page every 4 KiB; in a VM a TLB miss walks two page tables. This machine's THP mode is
"madvise", so PyTorch's tensors get none by default. Measured on AMD EPYC (Zen 4, a VM, 2 threads), one process,
the same model packed twice, 10 alternating rounds of 128 tokens (2026-12-04; ``python benchmarks/kernel_ab.py
MODEL --small-pages A [--dtype bf16]``), decode with the arena over without: int8 dense SmolLM2 1.061 (10 of 10
rounds), bf16 SVD-LLM 0.4 1.049 (10/10), fp32 SVD-LLM 0.4 1.029 (8/10), int8 SVD-LLM 0.4 1.014 (8/10), bf16 dense
1.012 (6/10). The read probe itself (one sequential stream per thread) gained 2%: the gain is the GEMV's many
streams. The cost is at packing: faulting in 240 MB of huge pages took 0.6-0.75 s against 0.05 s for small pages
(the kernel compacts memory to find them).

``MADV_COLLAPSE`` (Linux 6.1+) rebacks written memory in place, whatever the sysfs THP mode short of "never".
Only 2 MiB pages mostly covered by weights are collapsed (``MIN_COVER``), so the resident set grows by at most
a quarter of a page per collapsed page; a page that crosses the end of its mapping cannot be collapsed and is
skipped. Elsewhere (other kernels and systems, CUDA tensors) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import math
import sys
from collections.abc import Iterable

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # linux/mman.h
ALIGN = 64  # bytes: each arena tensor starts on a cache line
MIN_COVER = 0.75  # collapse a 2 MiB page only if weights fill at least this fraction of it


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where there is no Linux libc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def weight_pages(tensors: Iterable[torch.Tensor | None]) -> list[int]:
    """The 2 MiB-aligned addresses of the pages that the bytes of CPU ``tensors`` fill to at least ``MIN_COVER``
    (overlapping tensors, such as a view and its base, counted once)."""
    spans = []
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            continue
        n = (
            t.numel()
            if t.is_contiguous()
            else t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
        )
        spans.append((t.data_ptr(), t.data_ptr() + n * t.element_size()))
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    cover: dict[int, int] = {}
    for start, end in merged:
        page = start // HUGE_PAGE * HUGE_PAGE
        while page < end:
            cover[page] = cover.get(page, 0) + min(end, page + HUGE_PAGE) - max(start, page)
            page += HUGE_PAGE
    return sorted(p for p, c in cover.items() if c >= MIN_COVER * HUGE_PAGE)


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Back the pages of :func:`weight_pages` with huge pages; the bytes that now are (0 where unsupported)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    return sum(HUGE_PAGE for page in weight_pages(tensors) if madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0)


class Arena:
    """Tensors bump-allocated in one buffer of ``nbytes`` (plus alignment), whose 2 MiB-aligned part is advised
    for huge pages before anything touches it, so that the kernel backs it with huge pages as it faults in."""

    def __init__(self, nbytes: int):
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        raw = torch.empty(
            size + HUGE_PAGE, dtype=torch.uint8
        )  # untouched: malloc maps fresh pages this large
        start = -raw.data_ptr() % HUGE_PAGE
        self.buffer = raw[start : start + size]
        self.used = 0
        madvise = _madvise()
        if madvise is not None:
            madvise(self.buffer.data_ptr(), size, MADV_HUGEPAGE)

    def holds(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if self.used + n > self.buffer.numel():  # a repack that makes a new tensor (a regrouped scale): spill
            return torch.empty(shape, dtype=dtype)
        out = self.buffer[self.used : self.used + n].view(dtype).view(shape)
        self.used += -(-n // ALIGN) * ALIGN
        return out

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return self.empty(tuple(t.shape), t.dtype).copy_(t)


def model_arena(model, nbytes: int) -> Arena:
    """The arena ``model``'s packed weights live in: the one an earlier runner made while it still holds them
    (then a second runner copies nothing), else a new one of ``nbytes``, kept on the model for the next."""
    arena = vars(model).get("_rankserve_arena")
    if arena is None or not any(arena.holds(t) for t in itertools.chain(model.parameters(), model.buffers())):
        arena = vars(model)["_rankserve_arena"] = Arena(nbytes)
    return arena
