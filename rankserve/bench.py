"""The benchmark harness: decode and prefill speed of one model across backends, side by side in one run.

All backends run in one worker subprocess (``python -m rankserve.bench worker ...``): each is set up and
warmed up once (compile time and the RSS it adds are recorded), then the timed runs go in interleaved rounds
(A, B, C, A, B, C, ...) so that bandwidth drift on a shared machine does not bias the ratios. The median of
``runs`` rounds is reported.

Memory is measured apart, one fresh worker per rankserve backend (``python -m rankserve.bench memory ...``):
its resident set before loading, its true peak (the kernel's high-water mark, VmHWM) after loading, setting
up and generating once, the model's weight bytes and its KV cache bytes. A fast runner packs the weights in
place, so its peak over the baseline should stay near weights + KV cache.

Backends:
- ``fast``: the fast runtime (packed, compiled, native kernels) on MODEL;
- ``fast-dense``: the same runtime on MODEL's dense source (for compressed ÷ dense ratios);
- ``eager``: the rankserve reference path on MODEL;
- ``hf``: HF transformers running the dense source model;
- ``hf-naive``: HF transformers with every factorized projection as two ``nn.Linear`` (FlashSVD's baseline);
- ``llama.cpp``: llama-cpp-python on the dense source written as an F32 (fp32) or F16 (bf16) GGUF.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)

BACKENDS = ["fast", "fast-dense", "eager", "hf", "hf-naive", "llama.cpp"]

# Real configs for random-weight speed work (no downloads). Values from the models' published config.json.
RANDOM_CONFIGS = {
    "llama-1b": dict(  # Llama-3.2-1B
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "tiny": dict(  # for tests of the harness itself
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


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
    compile: bool = True  # fast backends: capture the decode step with torch.compile


@dataclass
class BackendResult:
    backend: str
    ok: bool = True
    note: str = ""
    model: str = ""
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0
    ttft_s: float = 0.0
    weight_bytes_per_token: int = 0
    achieved_gbs: float = 0.0
    added_rss_mb: float = 0.0  # RSS this backend's set-up added to the shared timing worker (not a peak)
    native_kernels: bool = False  # the decode step ran rankserve's C++ kernels
    native_isa: str | None = None  # their vector path (avx512+bf16, avx512, avx2, scalar)
    # from a fresh memory worker (see measure_memory); 0 when not measured
    rss_base_mb: float = 0.0  # resident set before loading anything
    rss_peak_mb: float = 0.0  # peak resident set (VmHWM) through load, set-up and one generation
    weight_mb: float = 0.0  # the model's weights (each shared tensor once)
    kv_mb: float = 0.0  # the runner's KV cache
    load_s: float = 0.0
    compile_s: float = 0.0
    recompiles: int = 0
    decode_runs: list[float] = field(default_factory=list)


def bandwidth_probe(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the median time of ``x.sum()`` over a ``gib`` GiB fp32 tensor."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# model preparation (inside a worker)


def random_model(name: str, dtype: torch.dtype, ratio: float | None, seed: int = 0):
    """A random-weight model of a real config; with ``ratio`` every decoder projection is low-rank at the
    uniform rank for that ratio (random factors: speed work only)."""
    from rankserve.config import ModelConfig
    from rankserve.layers import LowRankLinear, projections, replace_module
    from rankserve.linalg import rank_for_ratio
    from rankserve.loaders.weights import new_model

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random config {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    cfg = ModelConfig.from_hf(RANDOM_CONFIGS[name])
    model = new_model(cfg)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        # Drawn in place: a freed temporary stays in the C heap and would show as the model's resident memory.
        return torch.empty(*shape, dtype=dtype).normal_(0.0, shape[-1] ** -0.5, generator=g)

    if ratio is not None:
        for pname, p in projections(model).items():
            if pname == "lm_head":
                continue
            r = rank_for_ratio(p.out_features, p.in_features, ratio)
            replace_module(
                model, pname, LowRankLinear.from_factors(rnd(p.out_features, r), rnd(r, p.in_features))
            )
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            state[k] = state["model.embed_tokens.weight"]  # one tensor, tied below
        elif v.is_meta:
            state[k] = torch.ones(v.shape, dtype=dtype) if k.endswith("norm.weight") else rnd(*v.shape)
        else:
            state[k] = v.detach()
    model.load_state_dict(state, assign=True, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.init_buffers("cpu")
    return model.eval()


def dense_source(model_arg: str) -> str:
    """The dense model behind MODEL: the manifest's source for a rankserve checkpoint, else MODEL itself."""
    from rankserve.loaders.source import resolve

    kind, path = resolve(model_arg)
    if kind != "rankserve":
        return model_arg
    from rankserve.checkpoint import read_manifest

    src = (read_manifest(path).get("source") or {}).get("path")
    if not src or not os.path.exists(src):
        raise ValueError(f"{path}: the manifest names no readable dense source ({src!r})")
    return src


def _prompt(spec: BenchSpec, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(10, min(vocab, 30000), (spec.prompt_len,), generator=g).tolist()


def _median(xs):
    return statistics.median(xs) if xs else 0.0


# ----------------------------------------------------------------------------------------------------------------
# backends (each returns per-run (prefill_s, ttft_s, decode_tok_s))


def _run_rankserve(model, spec: BenchSpec, backend: str, res: BackendResult):
    from rankserve.runtime.generate import EagerRunner
    from rankserve.runtime.options import RuntimeOptions

    prompt = _prompt(spec, model.config.vocab_size)
    max_len = spec.prompt_len + spec.new_tokens + 1
    if backend.startswith("fast"):
        from rankserve.runtime.fast import FastRunner

        runner = FastRunner(model, 1, max_len, RuntimeOptions(backend="fast", compile=spec.compile))
        res.compile_s = runner.warmup()
    else:
        runner = EagerRunner(model, 1, max_len)
    res.native_kernels, res.native_isa = runner.report()["native_kernels"], runner.report()["native_isa"]
    res.kv_mb = (runner.cache.k.nbytes + runner.cache.v.nbytes) / 2**20
    tokens = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    vf = torch.zeros(1, dtype=torch.long)

    def once():
        t0 = time.perf_counter()
        logits = runner.prefill(tokens, positions, vf)
        nxt = logits.argmax(-1)[:, None]
        t1 = time.perf_counter()
        P = len(prompt)
        for s in range(spec.new_tokens - 1):
            logits = runner.decode(nxt, positions[:, -1:] + 1 + s, P + s, vf)
            nxt = logits.argmax(-1)[:, None]
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, (spec.new_tokens - 1) / (t2 - t1)

    return once


def _hf_model(source: str, dtype: torch.dtype):
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
        raise ValueError(f"hf backend needs a dense HF directory or GGUF, got {kind} {path}")
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


def _run_hf(hf, spec: BenchSpec, vocab: int):
    prompt = torch.tensor([_prompt(spec, vocab)])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def once():
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens, **kw)
            t2 = time.perf_counter()
        ttft = t1 - t0
        return ttft, ttft, (spec.new_tokens - 1) / max(1e-9, (t2 - t1) - ttft)

    return once


def _run_llama_cpp(source: str, spec: BenchSpec, res: BackendResult):
    try:
        import llama_cpp
    except ImportError:
        return None
    from rankserve.loaders.gguf_export import export_gguf
    from rankserve.loaders.source import load_model, resolve
    from rankserve.tokenizer import cache_dir

    kind, path = resolve(source)
    gdtype = "f32" if spec.dtype == "fp32" else "f16"
    st = os.stat(path)
    # "v2": exports since the per-architecture Q/K order (Qwen2 is no longer permuted, Mistral is a "llama")
    out = cache_dir(
        "gguf", f"{os.path.basename(path.rstrip('/'))}-{st.st_size}-{int(st.st_mtime)}-{gdtype}-v2.gguf"
    )
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        lm = load_model(source, dtype="fp32")
        export_gguf(lm.model, out, gdtype, tokenizer_from=path if kind == "gguf" else None)
        del lm
    llm = llama_cpp.Llama(
        model_path=out,
        n_threads=spec.threads,
        n_threads_batch=spec.threads,
        n_ctx=spec.prompt_len + spec.new_tokens + 8,
        verbose=False,
        logits_all=False,
    )
    res.note = f"{gdtype.upper()} GGUF {out}"
    prompt = _prompt(spec, llm.n_vocab())

    def greedy() -> int:
        return int(llm.scores[llm.n_tokens - 1].argmax())  # the last row holds the newest logits

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = greedy()
        t1 = time.perf_counter()
        for _ in range(spec.new_tokens - 1):
            llm.eval([tok])
            tok = greedy()
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, (spec.new_tokens - 1) / (t2 - t1)

    return once


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak so far (``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the peak: all that non-Linux offers


def setup_backend(spec: BenchSpec, backend: str, cache: dict) -> tuple[BackendResult, object]:
    """Load what ``backend`` runs and return (result to fill, a callable doing one timed run).

    ``cache`` shares loaded models between backends of one worker (the dense source is loaded once).
    """
    from rankserve.analysis import model_stats
    from rankserve.loaders.source import load_model, parse_dtype

    dtype = parse_dtype(spec.dtype)
    res = BackendResult(backend=backend)
    rss0, t0 = _rss_mb(), time.perf_counter()

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
    src = dense_src if backend in ("fast-dense", "hf", "llama.cpp") else main_src
    res.model = src
    once = None
    if backend == "llama.cpp":
        if spec.random_config:
            res.ok, res.note = False, "llama.cpp needs a GGUF source, not a random model"
            return res, None
        once = _run_llama_cpp(src, spec, res)
        if once is None:
            res.ok, res.note = False, "llama-cpp-python is not installed (pip install llama-cpp-python)"
            return res, None
        model = get(src)
    else:
        model = get(src)
        if backend == "hf":
            hf = hf_from_rankserve(model) if spec.random_config else _hf_model(src, dtype)
            once = _run_hf(hf, spec, model.config.vocab_size)
        elif backend == "hf-naive":
            once = _run_hf(hf_from_rankserve(model), spec, model.config.vocab_size)
        else:
            once = _run_rankserve(model, spec, backend, res)
    stats = model_stats(model)
    res.weight_bytes_per_token = stats.bytes_per_token
    res.weight_mb = stats.params_total * next(model.parameters()).element_size() / 2**20
    once()  # warm-up: the fast path compiles on its first decode
    res.load_s = time.perf_counter() - t0
    res.added_rss_mb = _rss_mb() - rss0  # memory this backend added to the worker
    return res, once


# Backends whose memory a fresh worker measures (the others are other programs' memory).
MEMORY_BACKENDS = ("fast", "fast-dense", "eager")


def measure_memory(spec: BenchSpec, backend: str) -> dict:
    """In a fresh process: baseline RSS, then load, set up and generate once; the peak RSS over all of it.

    The baseline is taken after importing the libraries a backend uses (the loaders, the runtime, Dynamo and
    Inductor) and loading the native kernels: it holds the interpreter and library code but no model. What a
    compile generates (graphs, kernels) is counted.
    """
    # Imported for their memory, before the baseline: library code is not the model's memory.
    import torch._inductor.compile_fx  # noqa: F401

    import rankserve.analysis  # noqa: F401
    import rankserve.loaders.source  # noqa: F401
    import rankserve.runtime.fast  # noqa: F401
    from rankserve.runtime.native import NativeKernels

    torch.set_num_threads(spec.threads)
    NativeKernels.load()
    base = _rss_mb()
    res, _ = setup_backend(spec, backend, {})
    if not res.ok:
        raise RuntimeError(res.note)
    fields = ("rss_base_mb", "rss_peak_mb", "weight_mb", "kv_mb")
    return dict(zip(fields, (base, _rss_mb("VmHWM"), res.weight_mb, res.kv_mb), strict=True))


def run_worker(spec: BenchSpec, backends: list[str]) -> list[BackendResult]:
    """Set up every backend in this process, then time them in interleaved rounds.

    Interleaving (A, B, C, A, B, C, ...) matters on a shared machine: memory bandwidth drifts by tens of
    percent over minutes, and back-to-back blocks would fold that drift into the ratios.
    """
    import torch._dynamo.utils as dutils

    torch.set_num_threads(spec.threads)
    cache: dict = {}
    setups = []
    for b in backends:
        try:
            setups.append(setup_backend(spec, b, cache))
        except Exception as e:  # a failed backend is reported in the table, not fatal to the others
            log.exception("backend %s failed", b)
            setups.append((BackendResult(backend=b, ok=False, note=f"{type(e).__name__}: {e}"), None))
    graphs = dutils.counters["stats"]["unique_graphs"]
    runs: dict[str, list] = {b: [] for b in backends}
    for _ in range(spec.runs):
        for res, once in setups:
            if once is not None and res.ok:
                try:
                    runs[res.backend].append(once())
                except Exception as e:
                    log.exception("backend %s failed", res.backend)
                    res.ok, res.note = False, f"{type(e).__name__}: {e}"
    recompiles = dutils.counters["stats"]["unique_graphs"] - graphs
    out = []
    for res, _ in setups:
        rs = runs[res.backend]
        if res.ok and rs:
            res.prefill_tok_s = spec.prompt_len / _median([r[0] for r in rs])
            res.ttft_s = _median([r[1] for r in rs])
            res.decode_runs = [round(r[2], 2) for r in rs]
            res.decode_tok_s = _median([r[2] for r in rs])
            res.achieved_gbs = res.decode_tok_s * res.weight_bytes_per_token / 1e9
            res.recompiles = recompiles if res.backend.startswith("fast") else 0
        out.append(res)
    return out


def run_bench(spec: BenchSpec, backends: list[str], probe: bool = True, memory: bool = True) -> dict:
    """Run all backends in one worker subprocess (interleaved rounds) and collect the results; with ``memory``,
    measure each of ``MEMORY_BACKENDS`` in a fresh worker of its own as well.

    ``rss_over_weights`` in each run is (peak RSS - baseline - KV cache) / weights: 1.0 is one copy of the
    weights and nothing else.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    torch.set_num_threads(spec.threads)
    bw = bandwidth_probe() if probe else 0.0
    cmd = [sys.executable, "-m", "rankserve.bench", "worker", ",".join(backends), json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        runs = [asdict(BackendResult(backend=b, ok=False, note=f"worker failed: {tail}")) for b in backends]
    else:
        runs = json.loads(lines[-1])
    for r in runs:
        r["bandwidth_fraction"] = round(r["achieved_gbs"] / bw, 3) if bw and r.get("ok") else None
        r["rss_over_weights"] = None
        if memory and r.get("ok") and r["backend"] in MEMORY_BACKENDS:
            cmd = [sys.executable, "-m", "rankserve.bench", "memory", r["backend"], json.dumps(asdict(spec))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                r["note"] = f"{r['note']}; memory worker failed: {tail}".lstrip("; ")
                continue
            r.update(json.loads(lines[-1]))
            r["rss_over_weights"] = round(
                (r["rss_peak_mb"] - r["rss_base_mb"] - r["kv_mb"]) / r["weight_mb"], 3
            )
    return {"bandwidth_gbs": round(bw, 2), "spec": asdict(spec), "runs": runs}


def _worker_main(command: str, argv: list[str]) -> int:
    spec = BenchSpec(**json.loads(argv[1]))
    if command == "memory":
        print(json.dumps(measure_memory(spec, argv[0])))
    else:
        print(json.dumps([asdict(r) for r in run_worker(spec, argv[0].split(","))]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("worker", "memory"):
        sys.exit("this module runs bench workers; use `rankserve bench`")
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_worker_main(sys.argv[1], sys.argv[2:]))
