"""The fast runtime's speed targets, measured side by side and written to ``docs/SPEED.md``.

Every row is one ``rankserve bench`` run (``rankserve.bench.run_bench``: all backends of the row set up in one
worker and timed in interleaved rounds, median of ``--runs``), so each ratio compares backends measured minutes
apart on the same machine state. The targets are those of the fast-runtime issue:

- SmolLM2 SVD-LLM ratio 0.4, 2 threads, 128 new tokens: ``fast`` ≥ 1.2 × ``llama.cpp`` dense (F32 for fp32,
  F16 for bf16); ``fast`` ÷ ``fast-dense`` ≥ 0.9 × (dense ÷ compressed weight bytes); ``fast`` ≥ 5 × ``hf-naive``;
- a 512-token prompt: compressed prefill ≥ dense prefill;
- a random-weight Llama-3.2-1B shape: achieved weight bandwidth ≥ 80% of the built-in probe;
- cold start (empty caches: the native extension is built and the step compiled) vs warm start.

    python benchmarks/targets.py                      # makes the compressed model first if it is missing
    python benchmarks/targets.py --model DIR --runs 5 --skip cold

The compressed model is made, if ``--model`` does not exist, with
``rankserve compress smollm2-135m --family svd-llm --ratio 0.4 --calib-data ../shared/data/wikitext2/valid.tokens.txt
--calib-samples 16 --calib-seq-len 256 --out DIR``. Run it on a quiet machine: another busy process on a
2-core box slows two-thread decode by 10x and more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("fp32", "bf16", "prefill", "1b", "cold")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "rankserve-smol-svdllm-04"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--skip", default="", help=f"comma list of sections to skip: {', '.join(SECTIONS)}")
    p.add_argument("--md", default=os.path.join(REPO, "docs", "SPEED.md"))
    p.add_argument("--json-out", default=os.path.join(REPO, "docs", "speed.json"))
    return p.parse_args(argv)


def ensure_model(path: str) -> list[str]:
    from corpora import WIKI_VALID, require  # benchmarks/corpora.py, next to this file

    cmd = [
        sys.executable, "-m", "rankserve", "compress", "smollm2-135m", "--family", "svd-llm", "--ratio", "0.4",
        "--calib-data", WIKI_VALID, "--calib-samples", "16", "--calib-seq-len", "256", "--out", path,
    ]  # fmt: skip
    if not os.path.isdir(path):
        require("targets.py", WIKI_VALID)
        print("making the compressed model:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return cmd


def bench(args, model: str | None, backends: str, **kw) -> dict:
    from dataclasses import asdict

    from rankserve.bench import BenchSpec, run_bench

    spec = BenchSpec(model=model or "", threads=args.threads, runs=args.runs, **kw)
    cmd = "rankserve bench " + (model or f"--random-config {spec.random_config}")
    if spec.random_ratio is not None:
        cmd += f" --random-ratio {spec.random_ratio:g}"
    cmd += (
        f" --baselines {backends} --prompt-len {spec.prompt_len} --new-tokens {spec.new_tokens}"
        f" --dtype {spec.dtype} --threads {spec.threads} --runs {spec.runs}"
    )
    print(f"[{datetime.datetime.now():%H:%M:%S}] {cmd}", flush=True)
    out = run_bench(spec, backends.split(","))
    out["command"] = cmd
    out["spec"] = asdict(spec)
    for r in out["runs"]:
        print(
            f"    {r['backend']:10s} decode {r['decode_tok_s']:.1f} tok/s  prefill {r['prefill_tok_s']:.0f} tok/s"
            f"  {r['achieved_gbs']:.1f} GB/s  load {r['load_s']:.1f} s  {r['note']}",
            flush=True,
        )
    return out


def by(out: dict) -> dict:
    return {r["backend"]: r for r in out["runs"] if r.get("ok")}


def ratio_row(name: str, value: float | None, target: float, how: str) -> dict:
    ok = None if value is None else value >= target
    return {"target": name, "value": value, "needed": target, "met": ok, "how": how}


def evaluate(results: dict) -> list[dict]:
    rows = []
    for dt in ("fp32", "bf16"):
        if dt not in results:
            continue
        b = by(results[dt])
        fast = b.get("fast")
        if fast is None:
            rows.append(ratio_row(f"{dt}: fast runs", None, 1, "fast backend failed"))
            continue
        gguf = "F32" if dt == "fp32" else "F16"
        if "llama.cpp" in b:
            v = fast["decode_tok_s"] / b["llama.cpp"]["decode_tok_s"]
            rows.append(
                ratio_row(f"{dt}: fast ÷ llama.cpp dense {gguf} decode", v, 1.2, "decode tok/s ratio")
            )
        if "fast-dense" in b:
            d = b["fast-dense"]
            bytes_ratio = d["weight_bytes_per_token"] / fast["weight_bytes_per_token"]
            v = (fast["decode_tok_s"] / d["decode_tok_s"]) / bytes_ratio
            rows.append(ratio_row(
                f"{dt}: (fast ÷ fast-dense decode) ÷ (dense ÷ compressed bytes = {bytes_ratio:.3f})", v, 0.9,
                f"decode ratio {fast['decode_tok_s'] / d['decode_tok_s']:.3f}",
            ))  # fmt: skip
        if "hf-naive" in b:
            v = fast["decode_tok_s"] / b["hf-naive"]["decode_tok_s"]
            rows.append(ratio_row(f"{dt}: fast ÷ hf-naive decode", v, 5.0, "decode tok/s ratio"))
    for dt in ("fp32", "bf16"):
        key = f"prefill-{dt}"
        if key in results:
            b = by(results[key])
            if "fast" in b and "fast-dense" in b:
                v = b["fast"]["prefill_tok_s"] / b["fast-dense"]["prefill_tok_s"]
                rows.append(
                    ratio_row(f"{dt}: 512-token prefill, compressed ÷ dense", v, 1.0, "prefill tok/s ratio")
                )
    if "1b" in results:
        b, bw = by(results["1b"]), results["1b"]["bandwidth_gbs"]
        for name in ("fast", "fast-dense"):
            if name in b and bw:  # the worker's per-round fraction; before 2026-12-04 runs only had one probe
                v = b[name].get("bandwidth_fraction") or b[name]["achieved_gbs"] / bw
                rows.append(ratio_row(f"1B shape fp32: {name} achieved ÷ probe bandwidth", v, 0.8,
                                      f"{b[name]['achieved_gbs']:.1f} of {bw:.1f} GB/s"))  # fmt: skip
    return rows


def cold_warm(args) -> dict:
    """The fast backend's set-up time with empty caches (extension build + compile), then again warm."""
    saved = {k: os.environ.get(k) for k in ("RANKSERVE_CACHE", "TORCHINDUCTOR_CACHE_DIR")}
    out = {}
    with tempfile.TemporaryDirectory(prefix="rankserve-cold-") as tmp:
        os.environ["RANKSERVE_CACHE"] = os.path.join(tmp, "rankserve")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        try:
            for phase in ("cold", "warm"):
                out[phase] = bench(args, args.model, "fast", dtype="fp32", new_tokens=8)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def write_md(args, results: dict, rows: list[dict], make_cmd: list[str]) -> None:
    import torch

    lines = [
        "# Speed: the fast runtime against its targets",
        "",
        f"Generated by `python benchmarks/targets.py` on {datetime.datetime.now():%Y-%m-%d %H:%M} "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads). "
        "Each section is one `rankserve bench` run: its backends are set up in one worker and timed in "
        f"interleaved rounds, median of {args.runs}. Ratios compare backends within one run; absolute tok/s "
        "depend on the machine's memory bandwidth at the time (the probe column).",
        "",
        "Compressed model: " + " ".join(["`rankserve", *make_cmd[3:]]) + "`",
        "",
        "| target | measured | needed | met |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['target']} | {v} ({r['how']}) | {r['needed']:g} | {met} |")
    lines += ["", "## Runs", ""]
    for key, out in results.items():
        if key == "cold":
            continue
        lines += [
            f"### {key}",
            "",
            f"`{out['command']}` (bandwidth probe {out['bandwidth_gbs']} GB/s)",
            "",
            "| backend | decode tok/s | prefill tok/s | TTFT ms | MB/token | GB/s | +RSS MB | compile s | recompiles |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in out["runs"]:
            if not r.get("ok"):
                lines.append(f"| {r['backend']} | failed: {r['note']} | | | | | | | |")
                continue
            lines.append(
                f"| {r['backend']} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {1000 * r['ttft_s']:.0f} "
                f"| {r['weight_bytes_per_token'] / 1e6:.0f} | {r['achieved_gbs']:.1f} | {r['added_rss_mb']:.0f} "
                f"| {r['compile_s']:.1f} | {r['recompiles']} |"
            )
        lines.append("")
    if "cold" in results:
        c = {k: by(v).get("fast") for k, v in results["cold"].items()}
        if all(c.values()):
            lines += [
                "### cold and warm start",
                "",
                "The fast backend's set-up (load, native extension, first compiled step) with empty rankserve and "
                "Inductor caches, then again with the caches that run filled "
                f"(`{results['cold']['cold']['command']}` twice, caches in a fresh temporary directory):",
                "",
                f"- cold: set-up {c['cold']['load_s']:.1f} s (first step {c['cold']['compile_s']:.1f} s)",
                f"- warm: set-up {c['warm']['load_s']:.1f} s (first step {c['warm']['compile_s']:.1f} s)",
                "",
            ]
    os.makedirs(os.path.dirname(args.md), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump({"targets": rows, "results": results}, f, indent=1)
    print(f"wrote {args.md} and {args.json_out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    bad = skip - set(SECTIONS)
    if bad:
        raise SystemExit(
            f"targets.py: unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}"
        )
    make_cmd = ensure_model(args.model)
    results: dict = {}
    all_base = "fast,fast-dense,llama.cpp,hf-naive"
    for dt in ("fp32", "bf16"):
        if dt not in skip:
            results[dt] = bench(args, args.model, all_base, dtype=dt, new_tokens=args.new_tokens)
    if "prefill" not in skip:
        for dt in ("fp32", "bf16"):
            results[f"prefill-{dt}"] = bench(args, args.model, "fast,fast-dense", dtype=dt, prompt_len=512,
                                             new_tokens=8)  # fmt: skip
    if "1b" not in skip:
        results["1b"] = bench(args, None, "fast,fast-dense", dtype="fp32", new_tokens=32,
                              random_config="llama-1b", random_ratio=0.4)  # fmt: skip
    if "cold" not in skip:
        results["cold"] = cold_warm(args)
    rows = evaluate(results)
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        print(f"{'MET ' if r['met'] else 'MISS'} {r['target']}: {v} (needed {r['needed']:g})")
    write_md(args, results, rows, make_cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
