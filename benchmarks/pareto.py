"""Speed against quality, every configuration side by side in one run: rankserve and llama.cpp's quantized models.

Configurations: rankserve fp32, bf16 and int8, each dense and SVD-LLM at ``--ratios`` (plus any checkpoint
directory given with ``--extra``, e.g. a healed one), and llama.cpp on the dense model as an F32, F16, Q8_0 and
Q4_K_M GGUF. For each:

- WikiText-2 test perplexity and Lee-corpus perplexity (``rankserve.eval.perplexity``, the first ``--max-windows``
  windows of ``--seq-len``). llama.cpp's files are scored by the same evaluator on their weights, read through
  rankserve's GGUF reader (dequantized): the quantized *weights*, not llama.cpp's activation rounding. One
  cross-check compares that with llama.cpp's own logits on the first window of the Q8_0 file.
- Decode and prefill tok/s, weight bytes per decoded token, peak RSS: ``rankserve.bench.run_bench`` with the same
  prompt and decode lengths for every configuration (``fast`` for rankserve, ``llama.cpp-TYPE`` for llama.cpp).
- The fraction of the read bandwidth: bytes/token x tok/s over the bench's read probe, timed in the same worker
  once per round (the median of per-round ratios).
- For a compressed float checkpoint, its dense source (``fast-dense``) timed in the same worker, interleaved:
  compressed / dense is the median of per-round ratios, free of the drift between workers.

Compressed checkpoints are made by ``rankserve compress --family svd-llm`` calibrated on the WikiText-2
validation split (``--calib-data``), int8 ones by ``rankserve quantize SRC --int8``; both are cached under
``~/.cache/rankserve/pareto`` keyed by their settings, as are the perplexities, so a rerun only re-times.
It writes ``docs/pareto.json``, ``docs/PARETO.md`` and ``docs/pareto.png`` (see ``pareto_report.py``).

    nice -n 5 python benchmarks/pareto.py --threads 2
    python benchmarks/pareto.py --smoke --model TINY_DIR --test-data T --ood-data T --calib-data T --out-dir D

``--smoke`` shrinks every size (a tiny model is given with ``--model``) so a test runs the whole pipeline.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: rankserve and the benchmarks next to this file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpora import WIKI_TEST, WIKI_VALID, require  # noqa: E402  benchmarks/corpora.py, next to this file

GGUF_TYPES = ["f32", "f16", "q8_0", "q4_k_m"]
DTYPES = ["fp32", "bf16", "int8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense model (alias, GGUF or directory)")
    p.add_argument("--ratios", default="0.2,0.4", help="SVD-LLM ratios (fraction of linear params REMOVED)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="rankserve weight types: fp32,bf16,int8")
    p.add_argument("--gguf-types", default=",".join(GGUF_TYPES), help="llama.cpp GGUF types")
    p.add_argument("--extra", action="append", default=[], help="another float checkpoint dir (e.g. healed)")
    p.add_argument("--skip-int8", action="store_true", help="leave the int8 configurations out")
    p.add_argument("--int8-dtype", default="fp32", help="working dtype of int8 models (activations)")
    p.add_argument("--calib-data", default=WIKI_VALID)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-data", default=WIKI_TEST)
    p.add_argument("--ood-data", default=None, help="out-of-domain text (default: the Lee corpus)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median)")
    p.add_argument(
        "--ref",
        default="q8_0",
        help="GGUF type timed in every rankserve configuration's worker, interleaved with it, so that each "
        "ratio to it is measured side by side ('none': only the llama.cpp rows' own worker)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="quality only (valid on a busy machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS workers")
    p.add_argument("--cache", default=None, help="default: ~/.cache/rankserve/pareto")
    p.add_argument("--out-dir", default=os.path.join(REPO, "docs"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a test of the pipeline, not a result")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.max_windows, args.prompt_len, args.new_tokens, args.runs = 32, 2, 8, 6, 1
        args.calib_samples, args.calib_seq_len = 4, 16
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


@dataclass
class Config:
    """One point of the plot: what runs it (engine), in which weights, of which model (variant)."""

    engine: str  # "rankserve" | "llama.cpp"
    weights: str  # fp32, bf16, int8 | F32, F16, Q8_0, Q4_K_M
    variant: str  # "dense", "svd-llm 0.4", or an --extra checkpoint's name
    ratio: float = 0.0
    path: str = ""  # the model the measurements load (filled by prepare)
    dtype: str = "fp32"  # what rankserve loads it as
    error: str = ""
    results: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.engine} {self.weights} {self.variant}"


def plan(args) -> list[Config]:
    dtypes = [d for d in args.dtypes.split(",") if d and not (d == "int8" and args.skip_int8)]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    variants = [("dense", 0.0), *((f"svd-llm {r:g}", r) for r in ratios)]
    variants += [(_extra_name(e), -1.0) for e in args.extra]
    out = [Config("rankserve", d, v, r) for d in dtypes for v, r in variants]
    return out + [Config("llama.cpp", t.upper(), "dense") for t in args.gguf_types.split(",") if t]


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: str) -> dict:
    """What identifies a model file or directory's version: its path, size and mtime."""
    from rankserve.loaders.source import resolve

    _, real = resolve(path)
    st = os.stat(real)
    return {"path": os.path.abspath(real), "size": st.st_size, "mtime": int(st.st_mtime)}


def _cli(args_list: list[str]) -> str | None:
    """Run ``python -m rankserve ARGS``; None when it worked, else its last stderr line."""
    proc = subprocess.run([sys.executable, "-m", "rankserve", *args_list], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1]


def compressed(args, cache: str, ratio: float) -> str:
    """The SVD-LLM checkpoint of ``--model`` at ``ratio``, made once per settings by ``rankserve compress``."""
    from rankserve.hashing import file_sha256

    st = {
        "model": _stamp(args.model),
        "family": "svd-llm",
        "ranks": "uniform",
        "ratio": ratio,
        "calib_sha256": file_sha256(args.calib_data),
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "seed": args.seed,
    }
    out = os.path.join(cache, f"svd-llm-{ratio:g}-{_key(st)}")
    if not os.path.isdir(out):
        print(f"[{_now()}] compressing: svd-llm {ratio:g} -> {out}", flush=True)
        cmd = ["compress", args.model, "--family", "svd-llm", "--ratio", str(ratio), "--out", out]
        cmd += ["--calib-data", args.calib_data, "--calib-samples", str(args.calib_samples)]
        cmd += [
            "--calib-seq-len",
            str(args.calib_seq_len),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
        ]
        err = _cli(cmd)
        if err:
            raise RuntimeError(f"rankserve compress failed: {err}")
    return out


def int8_config() -> dict:
    """The config ``rankserve quantize --int8`` uses (its defaults): part of the cache key and of the report."""
    from rankserve.quantize import Int8Config

    return Int8Config().to_dict()


def quantized(cache: str, src: str, threads: int) -> str:
    """``src`` with int8 weights, made once per source version and default config by ``rankserve quantize SRC
    --int8``."""
    out = os.path.join(cache, f"int8-{_key({'source': _stamp(src), 'int8': int8_config()})}")
    if not os.path.isdir(out):
        print(f"[{_now()}] quantizing: {src} -> {out}", flush=True)
        err = _cli(["quantize", src, "--int8", "--out", out, "--threads", str(threads)])
        if err:
            raise RuntimeError(f"rankserve quantize failed: {err}")
    return out


def int8_available() -> bool:
    return importlib.util.find_spec("rankserve.cli.quantize") is not None


def prepare(args, cache: str, configs: list[Config]) -> None:
    """Fill each config's ``path`` (compressing, quantizing, exporting as needed) or its ``error``."""
    from rankserve.loaders.gguf_export import cached_gguf

    floats: dict[str, str] = {"dense": args.model, **{_extra_name(e): e for e in args.extra}}
    for c in configs:
        try:
            if c.engine == "llama.cpp":
                c.path = cached_gguf(args.model, c.weights.lower())
                continue
            if c.variant not in floats:
                floats[c.variant] = compressed(args, cache, c.ratio)
            src = floats[c.variant]
            c.dtype = args.int8_dtype if c.weights == "int8" else c.weights
            c.path = quantized(cache, src, args.threads) if c.weights == "int8" else src
        except Exception as e:  # one config's failure is a row with its reason, not the end of the run
            c.error = f"{type(e).__name__}: {e}"


def _extra_name(path: str) -> str:
    return f"extra {os.path.basename(os.path.normpath(path))}"


# ---------------------------------------------------------------------------------------------------------------
# quality


def load(c: Config):
    """The model a config scores: a GGUF through rankserve's reader (its weights dequantized), else the
    checkpoint or model as rankserve loads it."""
    from rankserve.loaders.source import load_model, parse_dtype

    if c.engine == "llama.cpp":
        from rankserve.loaders.gguf_file import read_gguf
        from rankserve.loaders.weights import build_model

        return build_model(*read_gguf(c.path), dtype=parse_dtype(c.dtype))
    return load_model(c.path, dtype=c.dtype).model


def quality(args, cache: str, configs: list[Config], texts: dict[str, tuple[str, str]]) -> None:
    """Perplexity of every config on every text (cached by config, model version, protocol and text)."""
    from rankserve.eval import perplexity
    from rankserve.loaders.source import load_model

    db_path = os.path.join(cache, "quality.json")
    db = json.load(open(db_path, encoding="utf-8")) if os.path.isfile(db_path) else {}
    tokenizer = load_model(args.model).tokenizer  # one tokenizer: every row scores the same token ids
    for c in configs:
        if c.error:
            continue
        for corpus, (text, sha) in texts.items():
            key = _key({"model": _stamp(c.path), "dtype": c.dtype, "seq_len": args.seq_len,
                        "windows": args.max_windows, "text": sha})  # fmt: skip
            if key not in db:
                print(f"[{_now()}] perplexity {corpus}: {c.name}", flush=True)
                try:
                    model = load(c)
                    r = perplexity(model, tokenizer, text, args.seq_len, args.max_windows, progress=False)
                    db[key] = {"perplexity": r["perplexity"], "tokens": r["tokens"]}
                except Exception as e:
                    c.error = f"perplexity: {type(e).__name__}: {e}"
                    break
                tmp = db_path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(db, f, indent=1)
                os.replace(tmp, db_path)
            c.results[f"{corpus}_ppl"] = db[key]["perplexity"]
            c.results[f"{corpus}_tokens"] = db[key]["tokens"]


def crosscheck(args, config: Config, text: str) -> dict:
    """llama.cpp's own logits against rankserve's on the dequantized weights of ``config``'s GGUF: the
    perplexity of the first WikiText window from each."""
    import llama_cpp
    import numpy as np
    import torch

    from rankserve.bench.backends import llama_cpp_batching_works
    from rankserve.bench.spec import BenchSpec
    from rankserve.eval import tokenize, window_nll, windows
    from rankserve.loaders.source import load_model

    lm = load_model(args.model)
    ids = windows(tokenize(lm.tokenizer, text), args.seq_len, 1)[0]  # (seq_len,)
    model = load(config)
    with torch.inference_mode():
        ours = window_nll(model, ids[None]).item() / (args.seq_len - 1)
    spec = BenchSpec(model=config.path, prompt_len=args.seq_len, new_tokens=1, threads=args.threads)
    batched, _ = llama_cpp_batching_works(config.path, spec)
    kw = {} if batched else dict(n_batch=1, n_ubatch=1)
    llm = llama_cpp.Llama(model_path=config.path, n_ctx=args.seq_len + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=True, verbose=False, **kw)  # fmt: skip
    llm.eval(ids.tolist())
    logits = torch.tensor(np.array(llm.scores[: args.seq_len - 1]), dtype=torch.float32)  # (T-1, V)
    theirs = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="mean").item()
    return {
        "config": config.name,
        "window_tokens": args.seq_len,
        "rankserve_ppl": float(np.exp(ours)),
        "llama_cpp_ppl": float(np.exp(theirs)),
        "batched": batched,
    }


# ---------------------------------------------------------------------------------------------------------------
# speed


def ref_ratio(ours: list[float], ref: list[float]) -> float | None:
    """The median of the per-round decode ratios ours / ref of one worker's interleaved runs."""
    pairs = [a / b for a, b in zip(ours or [], ref or [], strict=True) if a and b]
    return statistics.median(pairs) if pairs else None


def speed(args, configs: list[Config], gib: float) -> None:
    """One ``run_bench`` per rankserve config (``fast``, interleaved with llama.cpp ``--ref`` when that is one of
    the llama.cpp configs, and with ``fast-dense`` for a compressed float checkpoint), one for all llama.cpp types
    (interleaved). Each worker probes the read bandwidth (``gib`` GiB) once per round, and the fraction reached is
    the median of per-round ratios: this VM's probe moved from 30 to 53 GB/s within minutes (2026-12-04), so a
    probe outside the worker, even just before it, can be in another state than the timed runs."""
    from rankserve.bench import BenchSpec, run_bench

    def spec(model: str, dtype: str) -> BenchSpec:
        return BenchSpec(model=model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=dtype,
                         threads=args.threads, runs=args.runs)  # fmt: skip

    def take(c: Config, r: dict) -> None:
        if not r.get("ok"):
            c.error = r.get("note") or "failed"
            return
        keys = ("decode_tok_s", "prefill_tok_s", "ttft_s", "weight_bytes_per_token", "achieved_gbs", "weight_mb",
                "rss_base_mb", "rss_peak_mb", "kv_mb", "decode_runs", "native_isa", "note", "probe_gbs", "probe_runs",
                "bandwidth_fraction")  # fmt: skip
        c.results.update({k: r.get(k) for k in keys})

    def beside(c: Config, r: dict | None, name: str) -> dict | None:
        """Another backend timed interleaved in ``c``'s worker: its rate and the median per-round ratio."""
        if not (r and r.get("ok")):
            return None
        return {"name": name, "decode_tok_s": r["decode_tok_s"], "decode_runs": r.get("decode_runs"),
                "weight_bytes_per_token": r["weight_bytes_per_token"],
                "ratio": ref_ratio(c.results.get("decode_runs"), r.get("decode_runs"))}  # fmt: skip

    ready = [c for c in configs if not c.error]
    ref = next((c for c in ready if c.engine == "llama.cpp" and c.weights.lower() == args.ref.lower()), None)
    for c in ready:
        if c.engine == "rankserve":
            # the dense source beside a compressed float row (an int8 row's would run in float)
            with_dense = c.variant != "dense" and c.weights != "int8"
            backends = ["fast"] + (["fast-dense"] if with_dense else [])
            backends += [f"llama.cpp-{ref.weights.lower()}"] if ref else []
            print(f"[{_now()}] speed: {c.name} (with {', '.join(backends[1:]) or 'nothing'}, interleaved)",
                  flush=True)  # fmt: skip
            out = run_bench(spec(c.path, c.dtype), backends, memory=not args.no_memory, probe_gib=gib)
            runs = dict(zip(backends, out["runs"], strict=True))
            take(c, runs["fast"])
            if c.error:
                continue
            if ref and (r := beside(c, runs.get(backends[-1]), ref.name)):
                c.results["ref"] = r
            if with_dense and (r := beside(c, runs.get("fast-dense"), f"rankserve {c.weights} dense")):
                c.results["dense"] = r
    llama = [c for c in ready if c.engine == "llama.cpp"]
    if llama:
        print(f"[{_now()}] speed: llama.cpp {', '.join(c.weights for c in llama)} (interleaved)", flush=True)
        backends = [f"llama.cpp-{c.weights.lower()}" for c in llama]
        out = run_bench(spec(args.model, "fp32"), backends, memory=not args.no_memory, probe_gib=gib)
        for c, r in zip(llama, out["runs"], strict=True):
            take(c, r)


def _now() -> str:
    return f"{datetime.datetime.now():%H:%M:%S}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rankserve.fsutil import cache_dir
    from rankserve.hashing import file_sha256

    dtypes = [d for d in args.dtypes.split(",") if d]
    if "int8" in dtypes and not args.skip_int8 and not int8_available():
        sys.exit("pareto: the int8 configurations need `rankserve quantize` (issue #12), which this checkout "
                 "lacks; pass --skip-int8 to measure the others")  # fmt: skip
    bad = [d for d in dtypes if d not in DTYPES] + [
        t for t in args.gguf_types.split(",") if t and t not in GGUF_TYPES
    ]
    if bad:
        sys.exit(f"pareto: unknown dtype or GGUF type: {', '.join(bad)} (choose from {DTYPES}, {GGUF_TYPES})")
    require("pareto.py", args.test_data, args.calib_data)
    for path in args.extra:
        if not os.path.isdir(path):
            sys.exit(f"pareto.py: --extra {path} is not a checkpoint directory")
    torch.set_num_threads(args.threads)
    cache = args.cache or cache_dir("pareto")
    os.makedirs(cache, exist_ok=True)
    if args.ood_data is None:
        from corpora import fetch  # benchmarks/corpora.py: the Lee corpus, fetched into the cache

        args.ood_data = fetch()
    texts = {}
    for corpus, path in (("wikitext", args.test_data), ("lee", args.ood_data)):
        with open(path, encoding="utf-8") as f:
            texts[corpus] = (f.read(), file_sha256(path))
    t0 = time.perf_counter()
    configs = plan(args)
    prepare(args, cache, configs)
    quality(args, cache, configs, texts)
    check = next(
        (c for c in configs if c.engine == "llama.cpp" and c.weights == "Q8_0" and not c.error), None
    )
    cross = None
    if check is not None and importlib.util.find_spec("llama_cpp") is not None:
        print(f"[{_now()}] cross-check: llama.cpp's own logits on {check.name}", flush=True)
        cross = crosscheck(args, check, texts["wikitext"][0])
    if not args.no_speed:
        speed(args, configs, 1 / 16 if args.smoke else 1.0)
    probes = [c.results["probe_gbs"] for c in configs if c.results.get("probe_gbs")]
    from pareto_report import write

    out = {
        "command": "python benchmarks/pareto.py " + " ".join(args.argv),
        "finished": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "argv"},
            "int8_config": int8_config(),
        },
        "bandwidth_gbs": [min(probes), max(probes)] if probes else [],  # the range of the workers' probes
        "crosscheck": cross,
        "configs": [{**asdict(c), "name": c.name} for c in configs],
    }
    write(out, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
