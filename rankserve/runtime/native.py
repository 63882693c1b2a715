"""Native decode kernels (a C++ extension) as real torch ops: ``torch.ops.rankserve.*``.

The extension is compiled on first use, never at import, with ``-O3 -march=native -fopenmp`` and cached under
``$RANKSERVE_CACHE/ext/<hash>`` (default ``~/.cache/rankserve/ext/<hash>``). The hash covers the source, the
torch version and the CPU flags, so a second process only loads the cached ``.so``.

Ops (x is ``[B, in]``; all tensors contiguous, on CPU, one dtype, float32 or bfloat16; fp32 accumulation):

- ``gemv(x, W[out, in], bias=None) -> [B, out]``: ``x @ W.T + bias``;
- ``lowrank_gemv(x, V[r, in], U[out, r], bias=None) -> [B, out]``: ``(x @ V.T) @ U.T + bias`` in one call, with
  ``x @ V.T`` kept in fp32.

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces models that call them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_FLAGS = ("-O3", "-march=native", "-fopenmp")


def _cpu_flags() -> str:
    """The CPU feature flags, which decide what ``-march=native`` compiles to."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir(key: str) -> Path:
    root = os.environ.get("RANKSERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "rankserve"
    return base / "ext" / key


def _build_key() -> str:
    h = hashlib.sha256()
    # Every source and header in csrc/: kernels.cpp includes the headers, so a header edit must rebuild too.
    for path in sorted(_SOURCE.parent.glob("*.[ch]*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (
        torch.__version__.encode(),
        _cpu_flags().encode(),
        " ".join(_FLAGS).encode(),
    ):
        h.update(part)
        h.update(b"\0")
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:16]


def _fake_gemv(x: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    torch._check(x.dim() == 2 and W.dim() == 2, lambda: "rankserve::gemv: x and W must be 2-D")
    torch._check(x.shape[1] == W.shape[1], lambda: f"rankserve::gemv: x is {x.shape} but W is {W.shape}")
    return x.new_empty((x.shape[0], W.shape[0]))


def _fake_lowrank_gemv(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    torch._check(
        x.dim() == 2 and V.dim() == 2 and U.dim() == 2, lambda: "rankserve::lowrank_gemv: inputs must be 2-D"
    )
    torch._check(
        x.shape[1] == V.shape[1], lambda: f"rankserve::lowrank_gemv: x is {x.shape} but V is {V.shape}"
    )
    torch._check(
        U.shape[1] == V.shape[0], lambda: f"rankserve::lowrank_gemv: V is {V.shape} but U is {U.shape}"
    )
    return x.new_empty((x.shape[0], U.shape[0]))


def _fake_decode_layer(x: Tensor, *args, **kwargs) -> Tensor:
    return torch.empty_like(x)


def _build_library(verbose: bool) -> None:
    """Compile the extension (or reuse the cached build) and load it; its TORCH_LIBRARY block registers the ops."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    key = _build_key()
    build_dir = _build_dir(key)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(build_dir):
        cpp_extension.load(
            name=f"rankserve_kernels_{key}",
            sources=[str(_SOURCE)],
            extra_cflags=list(_FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,  # a plain shared library, loaded into torch.ops
            verbose=verbose,
        )


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """One builder per directory at a time, through an OS file lock that is released when its holder dies.

    cpp_extension's own ``lock`` file outlives a killed build, and then every later process waits on it forever.
    While we hold the OS lock no other rankserve process is building here, so a ``lock`` file is stale: remove it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: keep cpp_extension's own locking only
        yield
        return
    with open(build_dir / "rankserve-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def _shared() -> NativeKernels | None:
    """The one process-wide instance: build, load and fake registration happen once per process."""
    try:
        _build_library(verbose=False)
        torch.library.register_fake("rankserve::gemv")(_fake_gemv)
        torch.library.register_fake("rankserve::lowrank_gemv")(_fake_lowrank_gemv)
        torch.library.register_fake("rankserve::decode_layer")(_fake_decode_layer)
        isa = torch.ops.rankserve.native_isa()
    except Exception as exc:  # any build or load failure means "no native kernels", reported once
        logger.warning("rankserve native kernels unavailable, falling back to PyTorch: %s", exc)
        return None
    return NativeKernels(isa)


class NativeKernels:
    """Handle on the loaded ops. Get it with :meth:`load`; it returns None when the extension cannot be built."""

    available: bool = True

    def __init__(self, isa: str) -> None:
        self.isa = isa  # "avx512+bf16", "avx512", "avx2" or "scalar": the vector path compiled in
        # The resolved overloads: calling them skips the packet's overload lookup (~1.5 us of a ~5 us call).
        self._gemv = torch.ops.rankserve.gemv.default
        self._lowrank_gemv = torch.ops.rankserve.lowrank_gemv.default

    @classmethod
    def load(cls, verbose: bool = False) -> NativeKernels | None:
        """Build or load the cached extension (only the first call does work; ``verbose`` shows the compiler)."""
        if verbose and _shared.cache_info().currsize == 0:
            try:
                _build_library(verbose=True)  # the same build, with the compiler output shown
            except Exception:
                pass  # _shared() retries quietly and logs the one warning
        return _shared()

    def gemv(self, x: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x[B, in] @ W[out, in].T + bias`` -> ``[B, out]``."""
        return self._gemv(x, W, bias)

    def lowrank_gemv(self, x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
        """``(x[B, in] @ V[r, in].T) @ U[out, r].T + bias`` -> ``[B, out]``, the middle product kept in fp32."""
        return self._lowrank_gemv(x, V, U, bias)

    def __repr__(self) -> str:
        return f"NativeKernels(isa={self.isa!r})"


def native_available() -> bool:
    """True when the native kernels build (or are cached) and load on this machine."""
    return NativeKernels.load() is not None
