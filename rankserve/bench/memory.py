"""Memory of one backend, measured in a fresh process (``python -m rankserve.bench memory BACKEND SPEC``).

Its resident set before loading (the baseline), its true peak (the kernel's high-water mark, VmHWM) after
loading, setting up and generating once, the model's weight bytes and its KV cache bytes. A fast runner packs
the weights in place, so its peak over the baseline should stay near weights + KV cache.
"""

from __future__ import annotations

import resource

from rankserve.bench.backends import setup_backend
from rankserve.bench.spec import LLAMA_CPP_BACKENDS, BenchSpec

# Backends whose memory a fresh worker measures: rankserve's, and llama.cpp's (the rival a user would pick
# instead; its GGUF is memory-mapped, so the pages it touches count). HF's is other programs' memory.
MEMORY_BACKENDS = ("fast", "fast-dense", "eager", *LLAMA_CPP_BACKENDS)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set now (``VmRSS``) or its peak so far (``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the peak: all that non-Linux offers


def measure_memory(spec: BenchSpec, backend: str) -> dict:
    """In a fresh process: baseline RSS, then load, set up and generate once; the peak RSS over all of it.

    The baseline is taken after importing the libraries a backend uses (the loaders, the runtime, Dynamo and
    Inductor) and loading the native kernels: it holds the interpreter and library code but no model. What a
    compile generates (graphs, kernels) is counted. The caller sets the thread count (the worker's entry point).
    """
    # Imported for their memory, before the baseline: library code is not the model's memory.
    import torch._inductor.compile_fx  # noqa: F401

    import rankserve.analysis  # noqa: F401
    import rankserve.loaders.source  # noqa: F401
    import rankserve.runtime.fast  # noqa: F401
    from rankserve.runtime.native import NativeKernels

    NativeKernels.load()
    if backend in LLAMA_CPP_BACKENDS:
        import llama_cpp  # noqa: F401  (its shared libraries are library code too)
    base = rss_mb()
    res, _ = setup_backend(spec, backend, {})
    if not res.ok:
        raise RuntimeError(res.note)
    fields = ("rss_base_mb", "rss_peak_mb", "weight_mb", "kv_mb")
    return dict(zip(fields, (base, rss_mb("VmHWM"), res.weight_mb, res.kv_mb), strict=True))
