"""2 MiB pages under the weights the fast decode streams (Linux), so that reading them misses the TLB less.

The fast runner copies every layer's packed weights into one :class:`Arena` (rankserve.runtime.packing), then
:func:`collapse` turns the pages they fill into huge pages, the head's too where it can.

The decode GEMV reads every weight once per token in several row streams per thread, and with 4 KiB pages each
stream crosses a page every 4 KiB; in a VM a TLB miss walks two page tables. This machine's THP mode is
"madvise", so PyTorch's tensors get none by default. Measured on AMD EPYC (Zen 4, a VM, 2 threads), one process,
the same model packed twice, 10 alternating rounds of 128 tokens (2026-12-04; ``python benchmarks/kernel_ab.py
MODEL --small-pages A [--dtype bf16]``), decode with the arena over without: int8 dense SmolLM2 1.061 (10 of 10
rounds), bf16 SVD-LLM 0.4 1.049 (10/10), fp32 SVD-LLM 0.4 1.029 (8/10), int8 SVD-LLM 0.4 1.014 (8/10), bf16 dense
1.012 (6/10). The read probe itself (one sequential stream per thread) gained 2%: the gain is the GEMV's many
streams.

``MADV_COLLAPSE`` (Linux 6.1+) copies written pages into huge pages at once, whatever the sysfs THP mode short of
"never". Its cost is finding free huge pages: in a process whose memory the load had fragmented it took 1.7 s
for fp32 SmolLM2's 404 MiB arena and 0.6 s for its 106 MiB head (about 4 ms a page; the copy into the arena
0.13 s), and 0.09 s for 400 MB where free huge pages were at hand. That is paid once per model (a second runner
repacks nothing); ``RuntimeOptions(hugepages=False)`` skips it. Only 2 MiB pages mostly covered by weights are
collapsed (``MIN_COVER``), so the resident set grows by at most a quarter of a page per collapsed page; a page
that crosses the end of its mapping cannot be and is skipped. Where ``MADV_COLLAPSE`` is unknown (older kernels)
the pages are advised ``MADV_HUGEPAGE`` for the kernel's background collapse; elsewhere (other systems, CUDA
tensors) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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
def _libc():
    """The C library (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where there is no Linux libc."""
    libc = _libc()
    if libc is None:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def trim_heap() -> None:
    """Give the pages of freed heap memory back to the OS (glibc ``malloc_trim``). Packing frees the loaded
    weights it copied, but glibc keeps freed heap chunks mapped: measured on SmolLM2 fp32, the process held
    1294 MB after packing into the arena (1082 MB without it) and 870 MB after this call in both cases."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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


def collapse(tensors: Iterable[torch.Tensor | None]) -> int:
    """Back the pages of :func:`weight_pages` with huge pages; the bytes that now are (0 where unsupported)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    done = 0
    for page in weight_pages(tensors):
        if madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0:
            done += HUGE_PAGE
        elif ctypes.get_errno() == errno.EINVAL:  # no MADV_COLLAPSE: let the kernel collapse it in time
            madvise(page, HUGE_PAGE, MADV_HUGEPAGE)
    return done


class Arena:
    """Tensors bump-allocated in one 2 MiB-aligned buffer of ``nbytes`` (rounded up to whole huge pages), for
    :func:`collapse` to turn into huge pages once they are written."""

    def __init__(self, nbytes: int):
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % HUGE_PAGE
        self.buffer = raw[start : start + size]
        self.used = 0

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
