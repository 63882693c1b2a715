"""The benchmark harness: decode and prefill speed of one model across backends, side by side in one run.

All backends run in one worker subprocess (``python -m rankserve.bench worker ...``): each is set up and
warmed up once (compile time and the RSS it adds are recorded), then the timed runs go in interleaved rounds
(A, B, C, A, B, C, ...) so that bandwidth drift on a shared machine does not bias the ratios. The median of
``runs`` rounds is reported. Memory is measured apart, one fresh worker per rankserve or llama.cpp backend
(``memory.py``).

Backends (``backends.py``):
- ``fast``: the fast runtime (packed, compiled, native kernels) on MODEL;
- ``fast-dense``: the same runtime on MODEL's dense source (for compressed ÷ dense ratios);
- ``eager``: the rankserve reference path on MODEL;
- ``hf``: HF transformers running the dense source model;
- ``hf-naive``: HF transformers with every factorized projection as two ``nn.Linear`` (FlashSVD's baseline);
- ``llama.cpp``: llama-cpp-python on the dense source written as an F32 (fp32) or F16 (bf16) GGUF;
  ``llama.cpp-f32``, ``-f16``, ``-q8_0``, ``-q4_k_m``: one GGUF type whatever the dtype.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch

from rankserve.bench.backends import setup_backend
from rankserve.bench.memory import MEMORY_BACKENDS, rss_mb
from rankserve.bench.spec import BACKENDS, BackendResult, BenchSpec
from rankserve.errors import InputError

log = logging.getLogger(__name__)


class ReadProbe:
    """The read-bandwidth probe the bench and ``benchmarks/layers.py`` divide by: ``gib`` GiB of fp32 ones read by
    the native ``stream_read`` kernel (every thread, full-width loads, as the GEMV streams); by ``x.sum()`` without
    native kernels, which reads slower than the GEMV does (then "achieved / probe" can exceed 1).

    The buffer is on ordinary pages: in one process a buffer on 4 KiB pages and one collapsed to
    2 MiB pages read alike here (33 or 52 GB/s, switching together with the host's state; AMD EPYC, 2026-12-04),
    unlike the GEMV's many row streams (rankserve.runtime.hugepages)."""

    def __init__(self, gib: float):
        from rankserve.runtime.native import NativeKernels

        kernels = NativeKernels.load()
        self.read = kernels.stream_read if kernels is not None else torch.Tensor.sum
        self.x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
        self.read(self.x)  # first touch

    def gbs(self, repeats: int = 3) -> float:
        """GB/s of the median of ``repeats`` timed reads of the whole buffer."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.read(self.x)
            times.append(time.perf_counter() - t0)
        return self.x.numel() * 4 / statistics.median(times) / 1e9


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def run_worker(spec: BenchSpec, backends: list[str]) -> list[BackendResult]:
    """Set up every backend in this process, then time them in interleaved rounds.

    Interleaving (A, B, C, A, B, C, ...) matters on a shared machine: memory bandwidth drifts by tens of
    percent over minutes, and back-to-back blocks would fold that drift into the ratios. Each backend's
    recompiles are the graphs Dynamo compiled during its own timed runs. The caller sets the thread count.
    """
    import torch._dynamo.utils as dutils

    def graphs() -> int:
        return dutils.counters["stats"]["unique_graphs"]

    # The read-bandwidth probe runs once per round, before the backends: the fraction of it each backend reaches is
    # the median of per-round ratios. This VM's probe moved from 30 to 53 GB/s within minutes (2026-12-04), so a
    # probe taken before the worker, even just before, could be in another state than the timed runs.
    probe = ReadProbe(spec.probe_gib) if spec.probe_gib > 0 else None
    cache: dict = {}
    setups = []
    for b in backends:
        rss0 = rss_mb()
        try:
            res, once = setup_backend(spec, b, cache)
        except Exception as e:  # a failed backend is reported in the table, not fatal to the others
            log.exception("backend %s failed", b)
            res, once = BackendResult(backend=b, ok=False, note=f"{type(e).__name__}: {e}"), None
        res.added_rss_mb = rss_mb() - rss0  # memory this backend added to the worker
        setups.append((res, once))
    runs: dict[str, list] = {b: [] for b in backends}
    probes: list[float] = []
    for _ in range(spec.runs):
        if probe is not None:
            probes.append(probe.gbs())
        for res, once in setups:
            if once is not None and res.ok:
                before = graphs()
                try:
                    runs[res.backend].append(once())
                except Exception as e:
                    log.exception("backend %s failed", res.backend)
                    res.ok, res.note = False, f"{type(e).__name__}: {e}"
                res.recompiles += graphs() - before
    for res, _ in setups:
        rs = runs[res.backend]
        if res.ok and rs:
            res.prefill_tok_s = spec.prompt_len / _median([r.prefill_s for r in rs])
            res.ttft_s = _median([r.ttft_s for r in rs])
            res.decode_runs = [round(r.decode_tok_s, 2) for r in rs]
            res.decode_tok_s = _median([r.decode_tok_s for r in rs])
            res.achieved_gbs = res.decode_tok_s * res.weight_bytes_per_token / 1e9
            if probes:  # rounds line up: a backend that fails stops adding runs
                res.probe_runs, res.probe_gbs = [round(p, 2) for p in probes[: len(rs)]], _median(probes)
                res.bandwidth_fraction = _median(
                    [
                        r.decode_tok_s * res.weight_bytes_per_token / 1e9 / p
                        for r, p in zip(rs, probes, strict=False)
                    ]
                )
    return [res for res, _ in setups]


def _subprocess(command: str, arg: str, spec: BenchSpec):
    """Run ``python -m rankserve.bench COMMAND ARG SPEC``: (its JSON result, None) or (None, why it failed)."""
    cmd = [sys.executable, "-m", "rankserve.bench", command, arg, json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[", "{"))]
    if proc.returncode != 0 or not lines:
        return None, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1]), None


def run_bench(
    spec: BenchSpec, backends: list[str], probe: bool = True, memory: bool = True, probe_gib: float = 1.0
) -> dict:
    """Run all backends in one worker subprocess (interleaved rounds) and collect the results; with ``memory``,
    measure each of ``MEMORY_BACKENDS`` in a fresh worker of its own as well. With ``probe``, the worker reads
    ``probe_gib`` GiB (:class:`ReadProbe`) once per round, and each run's
    ``bandwidth_fraction`` is the median of its per-round achieved / probe; ``bandwidth_gbs`` is the median probe.

    ``rss_over_weights`` in each run is (peak RSS - baseline - KV cache) / weights: 1.0 is one copy of the
    weights and nothing else.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    spec = replace(spec, probe_gib=probe_gib if probe else 0.0)
    runs, failed = _subprocess("worker", ",".join(backends), spec)
    if failed:
        runs = [asdict(BackendResult(backend=b, ok=False, note=f"worker failed: {failed}")) for b in backends]
    for r in runs:
        r["rss_over_weights"] = None
        if memory and r.get("ok") and r["backend"] in MEMORY_BACKENDS:
            mem, failed = _subprocess("memory", r["backend"], spec)
            if failed:
                r["note"] = f"{r['note']}; memory worker failed: {failed}".lstrip("; ")
                continue
            r.update(mem)
            r["rss_over_weights"] = round(
                (r["rss_peak_mb"] - r["rss_base_mb"] - r["kv_mb"]) / r["weight_mb"], 3
            )
    bw = _median([r["probe_gbs"] for r in runs if r.get("probe_gbs")])
    return {"bandwidth_gbs": round(bw, 2), "spec": asdict(spec), "runs": runs}
