"""Native decode kernels (a C++ extension) as real torch ops: ``torch.ops.rankserve_<isa>.*``.

The extension is compiled on first use, never at import, with ``-O3 -march=native -fopenmp`` and cached under
``$RANKSERVE_CACHE/ext/<hash>`` (default ``~/.cache/rankserve/ext/<hash>``). The hash covers the source, the
torch version, the CPU flags and the build flags, so a second process only loads the cached ``.so``.

One build per vector path (``ISAS``): ``avx512``, ``avx2`` (AVX-512 disabled) and ``scalar`` (AVX2/FMA and
AVX-512 disabled, so the kernels take their plain C++ path). Each registers its ops in its own namespace
(``rankserve_avx2``, ...), so that several can be loaded into one process and tested against each other;
``isa="auto"`` picks the best path this CPU runs. A path the CPU cannot run can still be compiled (not loaded)
with :func:`compile_variant`, so that its code is at least checked by the compiler.

Ops (x is ``[B, in]``; all tensors contiguous, on CPU, one dtype, float32 or bfloat16; fp32 accumulation):

- ``gemv(x, W[out, in], bias=None) -> [B, out]``: ``x @ W.T + bias``;
- ``lowrank_gemv(x, V[r, in], U[out, r], bias=None) -> [B, out]``: ``(x @ V.T) @ U.T + bias`` in one call, with
  ``x @ V.T`` kept in fp32;
- ``int8_gemv(x, q[out, in], scale[out, groups], bias=None, int8_act=False) -> [B, out]``: ``x @ (q * scale).T
  + bias`` for the int8 layout of ``rankserve.quant``; weights dequantized in registers, or with ``int8_act`` the
  activation rows quantized per row to int8 and integer dot products (different numerics);
- ``stream_read(x) -> float``: the sum of a float32 tensor, read by every thread at full width: the read
  bandwidth the GEMV kernels can reach (the bench's read probe times it);
- ``decode_layer(...)``: one decoder layer of one-token decode in one OpenMP region (``csrc/decode_layer.h``);
- ``native_isa() -> str``: the vector path compiled in (``avx512+bf16``, ``avx512``, ``avx2`` or ``scalar``).

Each tensor op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces models that call them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from rankserve.errors import InputError

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_BASE_FLAGS = ("-O3", "-march=native", "-fopenmp")

ISAS = ("avx512", "avx2", "scalar")  # the vector paths of csrc/kernels.cpp, best first
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
# Target flags on top of -march=native that select each path on x86. GCC's -mno-avx512f also turns off every
# AVX-512 extension, and -mno-avx2/-mno-fma leave the kernels without their AVX2+FMA path (plain C++).
_ISA_FLAGS = {"avx512": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}
# For a compile-only check of the AVX-512 path on a CPU without it: every extension the kernels use.
_AVX512_TARGET = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni")
_ISA_NEEDS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma"), "scalar": ()}  # /proc/cpuinfo flags to run it


class NativeBuildError(RuntimeError):
    """The extension did not compile or load (the message ends with the compiler's last lines)."""


def cpu_flags() -> str:
    """The CPU feature flags (``/proc/cpuinfo``), which decide what ``-march=native`` compiles to."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU maker as /proc/cpuinfo names it (``GenuineIntel``, ``AuthenticAMD``), or "" where it does not."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# How far ahead the kernels prefetch weight rows (csrc/kernels.cpp, prefetch_ahead), per CPU maker; the source's
# own defaults (int8 rows 512 bytes, fp32 rows none) were measured best on AMD EPYC (Zen 3, Zen 4). On an Intel
# Xeon (AVX-512, AMX; 2 threads, 2026-12-05, `benchmarks/kernel_ab.py DIR --a ... --b ...`, 8 rounds each, every
# round faster): fp32 SVD-LLM 0.4 none -> 2048 bytes 1.066, 512 -> 2048 1.050, 2048 -> 4096 0.971; int8
# SVD-LLM 0.4 512 -> 1024 1.055, 1024 -> 2048 1.037; with both at 2048, int8 dense 1.198 over int8 at 512 and fp32
# SVD-LLM 0.4 1.072 over fp32 at none. The bf16 x bf16 tiles, which never prefetched: none -> 2048 bytes bf16
# SVD-LLM 0.4 1.153, bf16 dense 1.162 (8 of 8 each); 1024 and 4096 within 1% of 2048.
_PREFETCH = {"GenuineIntel": ("RANKSERVE_PF=2048", "RANKSERVE_PF_F32=2048", "RANKSERVE_PF_BF16=2048")}


def compiler() -> str | None:
    """The C++ compiler's path (``$CXX``, default ``c++``, as torch's extension builder uses), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cpu_runs(isa: str) -> bool:
    """True when this CPU can run the ``isa`` build (it has every instruction set that path uses)."""
    if isa not in ISAS:
        raise InputError(f"unknown native ISA {isa!r}; choose from {', '.join(ISAS)} or 'auto'")
    if not _X86:
        return isa == "scalar"
    flags = set(cpu_flags().split())
    return all(f in flags for f in _ISA_NEEDS[isa])


def best_isa() -> str:
    """The fastest path this CPU runs: what ``isa="auto"`` builds."""
    return next(isa for isa in ISAS if cpu_runs(isa))


def _resolve(isa: str) -> str:
    if isa == "auto":
        return best_isa()
    cpu_runs(isa)  # validates the name
    return isa


def _flags(isa: str, ns: str | None = None) -> list[str]:
    """Compiler flags of one variant: target flags selecting its path, and its op namespace (default
    ``namespace(isa)``)."""
    if _X86:
        target = _ISA_FLAGS[isa] if cpu_runs(isa) or isa != "avx512" else _AVX512_TARGET
    elif isa == "scalar":
        target = ()
    else:
        raise InputError(f"the {isa} path exists only on x86 CPUs; this is {platform.machine()}")
    tuning = [f"-D{d}" for d in _PREFETCH.get(cpu_vendor(), ())]
    return [*_BASE_FLAGS, *target, *tuning, f"-DRANKSERVE_OPS={ns or namespace(isa)}"]


def namespace(isa: str) -> str:
    """The torch op namespace of one variant: ``torch.ops.rankserve_<isa>``."""
    return f"rankserve_{isa}"


def _build_dir(key: str) -> Path:
    root = os.environ.get("RANKSERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "rankserve"
    return base / "ext" / key


def _build_key(flags: list[str], source: Path = _SOURCE) -> str:
    h = hashlib.sha256()
    # Every source and header beside kernels.cpp: it includes the headers, so a header edit must rebuild too.
    for path in sorted(source.parent.glob("*.[ch]*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (
        torch.__version__.encode(),
        cpu_flags().encode(),
        " ".join(flags).encode(),
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


def _fake_int8_gemv(
    x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None, int8_act: bool = False
) -> Tensor:
    torch._check(x.dim() == 2 and q.dim() == 2, lambda: "rankserve::int8_gemv: x and W must be 2-D")
    torch._check(x.shape[1] == q.shape[1], lambda: f"rankserve::int8_gemv: x is {x.shape} but W is {q.shape}")
    return x.new_empty((x.shape[0], q.shape[0]))


def _fake_decode_layer(x: Tensor, *args, **kwargs) -> Tensor:
    return torch.empty_like(x)


def _need_compiler() -> str:
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH)")
    return cxx


def _build_library(
    isa: str, defines: tuple[str, ...] = (), ns: str | None = None, source: Path = _SOURCE
) -> None:
    """Compile the ``isa`` variant (or reuse its cached build) and load it; its TORCH_LIBRARY block registers
    the ops in ``ns`` (default ``namespace(isa)``). ``defines`` (``NAME=VALUE``) are extra macros of the build;
    ``source`` another copy of ``csrc/kernels.cpp`` (with its headers beside it) to build instead."""
    from torch.utils import cpp_extension

    _need_compiler()
    flags = _flags(isa, ns) + [f"-D{d}" for d in defines]
    key = _build_key(flags, source)
    build_dir = _build_dir(key)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(build_dir):
        cpp_extension.load(
            name=f"rankserve_kernels_{key}",
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,  # a plain shared library, loaded into torch.ops
        )


def compile_variant(isa: str) -> Path:
    """Compile the ``isa`` variant to an object file without linking or loading it; returns the object's path.

    For paths this CPU cannot run (e.g. AVX-512 on AVX2-only machines): the compiler still checks their code.
    Cached like a full build, under the variant's own hash. Raises :class:`NativeBuildError` on a compile error.
    """
    from torch.utils import cpp_extension

    cxx = _need_compiler()
    flags = _flags(_resolve(isa))
    build_dir = _build_dir(_build_key(flags) + "-object")
    obj = build_dir / "kernels.o"
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(build_dir):
        if obj.exists():
            return obj
        includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
        # The flags torch.utils.cpp_extension compiles every extension with (see the build.ninja it writes).
        cmd = [
            cxx,
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            *[f"-isystem{p}" for p in includes],
            "-fPIC",
            "-std=c++20",
        ]
        cmd += [*flags, "-c", str(_SOURCE), "-o", str(obj.with_suffix(".tmp.o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise NativeBuildError(f"compiling the {isa} variant failed:\n{tail}")
        obj.with_suffix(".tmp.o").replace(obj)
    return obj


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


def load_build(defines: tuple[str, ...], tag: str, isa: str = "auto", source: str | Path | None = None):
    """A build of the kernels with extra macros (e.g. ``("RANKSERVE_PF=0",)``), loaded under its own op namespace
    ``rankserve_<tag>`` next to the normal one; returns that namespace (``torch.ops.rankserve_<tag>``). ``source``
    is a directory holding another version's ``kernels.cpp`` and headers (e.g. an older commit's
    ``rankserve/runtime/csrc``, extracted with ``git archive``) to build instead of this package's. For A/B
    measurements of two builds in one process (``benchmarks/kernel_ab.py``); not used by the runtime."""
    ns = f"rankserve_{tag}"
    if not tag.isidentifier() or ns == namespace(_resolve(isa)):
        raise InputError(f"build tag {tag!r} must be an identifier other than the variant's own name")
    src = _SOURCE if source is None else Path(source) / _SOURCE.name
    if not src.is_file():
        raise InputError(
            f"kernel source {src} not found: give the directory that holds {_SOURCE.name} and its headers"
        )
    _build_library(_resolve(isa), tuple(defines), ns, src)
    return getattr(torch.ops, ns)


@functools.cache
def _load(isa: str) -> NativeKernels | NativeBuildError:
    """Build (or reuse) and load one variant, once per process; a failure is kept and reported once."""
    ns = namespace(isa)
    try:
        _build_library(isa)
        torch.library.register_fake(f"{ns}::gemv")(_fake_gemv)
        torch.library.register_fake(f"{ns}::lowrank_gemv")(_fake_lowrank_gemv)
        torch.library.register_fake(f"{ns}::decode_layer")(_fake_decode_layer)
        torch.library.register_fake(f"{ns}::int8_gemv")(_fake_int8_gemv)
        compiled = getattr(torch.ops, ns).native_isa()
    except Exception as exc:  # any build or load failure means "no native kernels", reported once
        logger.warning("rankserve native kernels (%s) unavailable, falling back to PyTorch: %s", isa, exc)
        return exc if isinstance(exc, NativeBuildError) else NativeBuildError(f"{type(exc).__name__}: {exc}")
    return NativeKernels(isa, compiled)


class NativeKernels:
    """Handle on one loaded variant's ops. Get it with :meth:`load`."""

    def __init__(self, variant: str, isa: str) -> None:
        self.variant = variant  # the build asked for: "avx512", "avx2" or "scalar"
        self.isa = isa  # the vector path compiled in: "avx512+bf16", "avx512", "avx2" or "scalar"
        self.ops = getattr(torch.ops, namespace(variant))  # the op namespace, for traced callers
        # The resolved overloads: calling them skips the packet's overload lookup (~1.5 us of a ~5 us call).
        self._gemv = self.ops.gemv.default
        self._lowrank_gemv = self.ops.lowrank_gemv.default
        self._int8_gemv = self.ops.int8_gemv.default

    @classmethod
    def load(cls, isa: str = "auto", strict: bool = False) -> NativeKernels | None:
        """Build or load the cached ``isa`` variant (``auto``: the best path this CPU runs); only the first call
        per variant does work. On failure returns None (one warning is logged), or with ``strict`` raises
        :class:`NativeBuildError`, whose message ends with the compiler's output."""
        isa = _resolve(isa)
        if cpu_runs(isa):
            result = _load(isa)
        else:
            needs = ", ".join(_ISA_NEEDS[isa])
            result = NativeBuildError(
                f"this CPU cannot run the {isa} path (it lacks {needs}); compile_variant() "
                "still checks that it compiles"
            )
        if isinstance(result, NativeBuildError):
            if strict:
                raise result
            return None
        return result

    def gemv(self, x: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x[B, in] @ W[out, in].T + bias`` -> ``[B, out]``."""
        return self._gemv(x, W, bias)

    def lowrank_gemv(self, x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
        """``(x[B, in] @ V[r, in].T) @ U[out, r].T + bias`` -> ``[B, out]``, the middle product kept in fp32."""
        return self._lowrank_gemv(x, V, U, bias)

    def int8_gemv(
        self, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None, int8_act: bool = False
    ) -> Tensor:
        """``x[B, in] @ (q[out, in] * scale[out, groups]).T + bias`` -> ``[B, out]``; ``int8_act`` quantizes each row
        of ``x`` to int8 (as ``quantize_int8`` quantizes a weight row) and takes integer dot products."""
        return self._int8_gemv(x, q, scale, bias, int8_act)

    def stream_read(self, x: Tensor) -> float:
        """The sum of a contiguous float32 tensor, read once by every thread at full width."""
        return self.ops.stream_read(x)

    def __repr__(self) -> str:
        return f"NativeKernels(variant={self.variant!r}, isa={self.isa!r})"
