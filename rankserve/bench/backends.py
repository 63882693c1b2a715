"""One set-up function per backend; each returns a callable doing one timed run (a :class:`Timing`).

Every run measures three things apart: the prompt's forward pass alone (prefill), the time from the prompt to
the first *sampled* token (TTFT: prefill, then sampling) and the decode rate of the remaining tokens.

- ``fast`` / ``fast-dense`` / ``eager``: rankserve's own generator (``generate_tokens``) over a fast or eager
  runner, greedy, EOS ignored: what ``rankserve generate`` runs;
- ``hf`` / ``hf-naive``: HF transformers' ``generate``, greedy;
- ``llama.cpp``, ``llama.cpp-TYPE``: llama-cpp-python's ``eval`` and a greedy pick over its logits, on the dense
  source as a GGUF (F32, F16, Q8_0 or Q4_K_M).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from rankserve.bench.models import random_model
from rankserve.bench.spec import LLAMA_CPP_BACKENDS, BackendResult, BenchSpec, Timing
from rankserve.errors import InputError


def dense_source(model_arg: str) -> str:
    """The dense model behind MODEL: the manifest's source for a rankserve checkpoint, else MODEL itself."""
    from rankserve.loaders.source import resolve

    kind, path = resolve(model_arg)
    if kind != "rankserve":
        return model_arg
    from rankserve.checkpoint import read_manifest

    src = (read_manifest(path).get("source") or {}).get("path")
    if not src or not os.path.exists(src):
        raise InputError(f"{path}: the manifest names no readable dense source ({src!r})")
    return src


def bench_prompt(spec: BenchSpec, vocab: int) -> list[int]:
    """The prompt every backend runs: ``prompt_len`` seeded random ids (the same for every backend)."""
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(10, min(vocab, 30000), (spec.prompt_len,), generator=g).tolist()


def rankserve_backend(model, spec: BenchSpec, backend: str, res: BackendResult):
    """rankserve's generator over a fast runner (``fast``, ``fast-dense``) or the eager reference runner."""
    from rankserve.runtime.eager import EagerRunner
    from rankserve.runtime.generate import generate_tokens
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.runtime.sampling import SamplingParams

    prompt = bench_prompt(spec, model.config.vocab_size)
    max_len = spec.prompt_len + spec.new_tokens + 1
    if backend.startswith("fast"):
        from rankserve.runtime.fast import FastRunner

        runner = FastRunner(model, 1, max_len, RuntimeOptions(backend="fast", compile=spec.compile))
        res.compile_s = runner.warmup()
    else:
        runner = EagerRunner(model, 1, max_len)
    report = runner.report()
    res.native_kernels, res.native_isa = report["native_kernels"], report["native_isa"]
    res.kv_mb = (runner.cache.k.nbytes + runner.cache.v.nbytes) / 2**20
    params = SamplingParams(max_tokens=spec.new_tokens, ignore_eos=True)  # greedy, always new_tokens long

    def once() -> Timing:
        t0 = time.perf_counter()
        steps = generate_tokens(model, [prompt], params, runner=runner)
        first = next(steps)  # prefill, then the first sampled token
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        t2 = time.perf_counter()
        return Timing(first.prefill_s, t1 - t0, n / (t2 - t1))

    return once


def hf_model(source: str, dtype: torch.dtype):
    import transformers

    from rankserve.loaders.source import resolve

    kind, path = resolve(source)
    if kind == "gguf":
        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
        )
    elif kind == "hf":
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        raise InputError(f"hf backend needs a dense HF directory or GGUF, got {kind} {path}")
    return m.eval()


def hf_from_rankserve(model):
    """An HF transformers model with ``model``'s weights; factorized projections become two ``nn.Linear``."""
    import transformers
    from torch import nn

    from rankserve.layers import DenseLinear, projections

    cfg = model.config
    dtype = next(model.parameters()).dtype
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    state = {}
    for name, p in model.state_dict().items():
        state[name] = p
    for name, proj in projections(model).items():
        if isinstance(proj, DenseLinear):
            continue
        first = nn.Linear(proj.in_features, proj.rank(), bias=False, dtype=dtype, device="meta")
        second = nn.Linear(
            proj.rank(), proj.out_features, bias=proj.bias is not None, dtype=dtype, device="meta"
        )
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, nn.Sequential(first, second))
        a, b = (proj.V, proj.U) if hasattr(proj, "V") else (proj.basis, proj.coeff)
        for suffix in ("U", "V", "basis", "coeff", "bias"):
            state.pop(f"{name}.{suffix}", None)
        state[f"{name}.0.weight"] = a
        state[f"{name}.1.weight"] = b
        if proj.bias is not None:
            state[f"{name}.1.bias"] = proj.bias
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    # Rotary embeddings hold computed (non-checkpoint) buffers, still on meta: rebuild those modules on CPU.
    for name, mod in list(hf.named_modules()):
        if getattr(mod, "inv_freq", None) is not None and mod.inv_freq.is_meta:
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent) if parent else hf, child, type(mod)(mod.config))
    return hf.eval()


def hf_backend(hf, spec: BenchSpec, vocab: int):
    """HF transformers' greedy ``generate``: prefill is one forward over the prompt, TTFT one 1-token generate."""
    prompt = torch.tensor([bench_prompt(spec, vocab)])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def once() -> Timing:
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf(prompt)
            t1 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
            t2 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens, **kw)
            t3 = time.perf_counter()
        ttft = t2 - t1
        return Timing(t1 - t0, ttft, (spec.new_tokens - 1) / max(1e-9, (t3 - t2) - ttft))

    return once


def llama_cpp_type(backend: str, spec: BenchSpec) -> str:
    """The GGUF type a llama.cpp backend runs: its suffix, or F32 for fp32 and F16 for bf16 (plain ``llama.cpp``)."""
    if backend == "llama.cpp":
        return "f32" if spec.dtype == "fp32" else "f16"
    return backend.removeprefix("llama.cpp-")


def _llama(path: str, spec: BenchSpec, batch: int | None):
    """llama-cpp-python on ``path`` sized for the bench; ``batch`` 1 forces one token per graph (n_batch and
    n_ubatch), None keeps llama.cpp's default batching."""
    import llama_cpp

    kw = {} if batch is None else dict(n_batch=batch, n_ubatch=batch)
    return llama_cpp.Llama(
        model_path=path,
        n_threads=spec.threads,
        n_threads_batch=spec.threads,
        n_ctx=spec.prompt_len + spec.new_tokens + 8,
        verbose=False,
        logits_all=False,
        **kw,
    )


def llama_cpp_last_logits(llm):
    """The logits [V] of the last token ``llm`` evaluated, read from llama.cpp's context. ``llm.scores`` holds
    them only with ``logits_all=True``: otherwise llama-cpp-python 0.3.36 leaves it uninitialized, with
    n_batch rows, so indexing it by position read garbage, or failed where n_batch is 1 (issue #12)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_prompt_probe(path: str, spec: BenchSpec) -> None:
    """Evaluate the bench prompt once with llama.cpp's default batching (run in a throw-away process: with
    llama-cpp-python 0.3.36 on an AMX CPU, a batched Q8_0 prompt segfaulted, issue #12)."""
    llm = _llama(path, spec, None)
    llm.eval(bench_prompt(spec, llm.n_vocab()))


def llama_cpp_batching_works(path: str, spec: BenchSpec) -> tuple[bool, str]:
    """(whether a batched prompt runs, why not): :func:`llama_cpp_prompt_probe` in a child process, so a
    crash there costs nothing here."""
    cmd = [sys.executable, "-m", "rankserve.bench", "llama-prompt-probe", path, json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, ""
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return False, f"{why}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"


def llama_cpp_backend(source: str, spec: BenchSpec, res: BackendResult, ftype: str):
    """llama-cpp-python on MODEL's dense source as a GGUF of ``ftype`` (cached, see ``cached_gguf``); None when
    llama-cpp-python is not installed.

    The prompt runs batched unless a probe process shows that batching crashes here; then every graph is one
    token (``n_batch=n_ubatch=1``), which makes prefill one decode step per prompt token (the note says so).
    Decode speed is the difference of two runs of the same prompt, one new token and ``new_tokens``:
    (new_tokens - 1) / (t_N - t_1), so no prompt time is counted whatever the batching.
    """
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    import gguf

    from rankserve.loaders.gguf_export import cached_gguf
    from rankserve.loaders.gguf_file import gguf_config, gguf_weight_bytes

    path = cached_gguf(source, ftype)
    batched, why = llama_cpp_batching_works(path, spec)
    llm = _llama(path, spec, None if batched else 1)
    res.note = f"{ftype.upper()} GGUF {path}" + ("" if batched else f"; n_batch=1 (batched prompt: {why})")
    total, res.weight_bytes_per_token = gguf_weight_bytes(path)
    res.weight_mb = total / 2**20
    cfg = gguf_config(gguf.GGUFReader(path))
    # llama.cpp's default KV cache: K and V in F16 for every context slot of every layer
    res.kv_mb = 2 * 2 * llm.n_ctx() * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim / 2**20
    prompt = bench_prompt(spec, llm.n_vocab())

    def greedy() -> int:
        return int(llama_cpp_last_logits(llm).argmax())

    def run(new_tokens: int) -> tuple[float, float, float, float]:
        """(prefill s, first token s, whole run s, decode loop s) of the prompt and ``new_tokens`` greedy
        tokens."""
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = greedy()
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = greedy()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t0, t3 - t0, t3 - t2

    def once() -> Timing:
        prefill, ttft, short, _ = run(1)
        *_, long, loop = run(spec.new_tokens)
        # A difference within timing noise (a tiny model, a few tokens) is no rate: then the loop's own time.
        decode_s = long - short if long > short else loop
        return Timing(prefill, ttft, (spec.new_tokens - 1) / decode_s)

    return once


def setup_backend(spec: BenchSpec, backend: str, cache: dict) -> tuple[BackendResult, object]:
    """Load what ``backend`` runs, warm it up once and return (its result to fill, a callable doing one timed
    run); the callable is None when the backend cannot run here (the result's note says why).

    ``cache`` shares loaded models between backends of one worker (the dense source is loaded once).
    """
    from rankserve.analysis import model_stats
    from rankserve.loaders.source import load_model, parse_dtype

    dtype = parse_dtype(spec.dtype)
    res = BackendResult(backend=backend)
    t0 = time.perf_counter()

    def get(src):
        if src not in cache:
            if src.startswith("random:"):
                ratio = None if src == f"random:{spec.random_config}" else spec.random_ratio
                cache[src] = random_model(spec.random_config, dtype, ratio, spec.seed)
            else:
                cache[src] = load_model(src, dtype=dtype).model
        return cache[src]

    if spec.random_config:
        dense_src = f"random:{spec.random_config}"
        main_src = dense_src if spec.random_ratio is None else f"{dense_src}@{spec.random_ratio}"
    else:
        dense_src, main_src = dense_source(spec.model), spec.model
    src = dense_src if backend in ("fast-dense", "hf", *LLAMA_CPP_BACKENDS) else main_src
    res.model = src
    if backend in LLAMA_CPP_BACKENDS:  # weight bytes and KV cache from the GGUF itself
        if spec.random_config:
            res.ok, res.note = False, "llama.cpp needs a GGUF source, not a random model"
            return res, None
        once = llama_cpp_backend(src, spec, res, llama_cpp_type(backend, spec))
        if once is None:
            res.ok, res.note = False, "llama-cpp-python is not installed (pip install 'rankserve[llamacpp]')"
            return res, None
    else:
        model = get(src)
        if backend == "hf":
            hf = hf_from_rankserve(model) if spec.random_config else hf_model(src, dtype)
            once = hf_backend(hf, spec, model.config.vocab_size)
        elif backend == "hf-naive":
            once = hf_backend(hf_from_rankserve(model), spec, model.config.vocab_size)
        else:
            once = rankserve_backend(model, spec, backend, res)
        stats = model_stats(model)
        res.weight_bytes_per_token = stats.bytes_per_token
        res.weight_mb = stats.weight_bytes / 2**20
    once()  # warm-up: the fast path compiles on its first decode
    res.load_s = time.perf_counter() - t0
    return res, once
