"""What a bench run measures (:class:`BenchSpec`) and what one backend reports (:class:`BackendResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from rankserve.loaders.gguf_export import FILE_TYPES

# "llama.cpp" runs an F32 GGUF for fp32 and F16 for bf16; "llama.cpp-TYPE" one GGUF type whatever the dtype.
LLAMA_CPP_BACKENDS = ["llama.cpp", *(f"llama.cpp-{t}" for t in FILE_TYPES)]
BACKENDS = ["fast", "fast-dense", "eager", "hf", "hf-naive", *LLAMA_CPP_BACKENDS]


@dataclass
class BenchSpec:
    model: str
    prompt_len: int = 64
    new_tokens: int = 128
    dtype: str = "fp32"
    threads: int = 2
    runs: int = 3
    random_config: str | None = None
    random_ratio: float | None = (
        None  # random-weight model: low-rank factors keeping (1 - ratio) of the params
    )
    seed: int = 0
    compile: bool | None = None  # fast backends: RuntimeOptions.compile (None: auto)
    probe_gib: float = 0.0  # > 0: the worker times a read of this many GiB once per round (run_bench sets it)


class Timing(NamedTuple):
    """One timed run of one backend."""

    prefill_s: float  # the prompt's forward pass alone (its logits, nothing sampled)
    ttft_s: float  # from the prompt to the first sampled token: prefill, then sampling
    decode_tok_s: float  # the remaining new tokens (one decode step and one sample each) per second


@dataclass
class BackendResult:
    backend: str
    ok: bool = True
    note: str = ""
    model: str = ""
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0  # prompt tokens / the median prefill time (the forward pass alone)
    ttft_s: float = 0.0  # median time to the first sampled token (prefill + sampling), measured on its own
    weight_bytes_per_token: int = 0
    achieved_gbs: float = 0.0
    added_rss_mb: float = 0.0  # RSS this backend's set-up added to the shared timing worker (not a peak)
    native_kernels: bool = False  # the decode step ran rankserve's C++ kernels
    native_isa: str | None = None  # their vector path (avx512+bf16, avx512, avx2, scalar)
    # from a fresh memory worker (see memory.measure_memory); 0 when not measured
    rss_base_mb: float = 0.0  # resident set before loading anything
    rss_peak_mb: float = 0.0  # peak resident set (VmHWM) through load, set-up and one generation
    weight_mb: float = 0.0  # the model's weights (each shared tensor once)
    kv_mb: float = 0.0  # the runner's KV cache
    load_s: float = 0.0  # load, set-up and the warm-up run
    compile_s: float = 0.0
    recompiles: int = 0  # graphs Dynamo compiled during this backend's own timed runs (warm-up excluded)
    decode_runs: list[float] = field(default_factory=list)
    probe_runs: list[float] = field(default_factory=list)  # the worker's read probe (GB/s) before each round
    probe_gbs: float = 0.0  # their median (0: not probed)
    bandwidth_fraction: float | None = None  # the median of per-round decode GB/s over that round's probe
