"""``rankserve bench``: decode and prefill speed, TTFT and memory of one model across backends.

- ``spec.py``: what a run measures (:class:`BenchSpec`) and what a backend reports (:class:`BackendResult`);
- ``models.py``: random-weight models of real configs;
- ``backends.py``: one set-up function per backend (rankserve fast/eager, HF, HF naive, llama.cpp);
- ``harness.py``: the timing worker (interleaved rounds) and :func:`run_bench`, which drives the workers;
- ``memory.py``: the memory worker (peak RSS of one backend in a fresh process);
- ``__main__.py``: the workers' entry point (``python -m rankserve.bench worker|memory ...``).
"""

from rankserve.bench.backends import hf_from_rankserve
from rankserve.bench.harness import run_bench
from rankserve.bench.models import RANDOM_CONFIGS, random_model
from rankserve.bench.spec import BACKENDS, BackendResult, BenchSpec

__all__ = [
    "BACKENDS",
    "RANDOM_CONFIGS",
    "BackendResult",
    "BenchSpec",
    "hf_from_rankserve",
    "random_model",
    "run_bench",
]
