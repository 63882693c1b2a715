"""The pareto report: ``docs/pareto.json``, ``docs/PARETO.md`` and ``docs/pareto.png`` from one pareto run.

Every sentence that compares configurations is computed here from the run's numbers; nothing is pre-written.

    python benchmarks/pareto_report.py docs/pareto.json     # rewrite PARETO.md and the PNG from the JSON
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_report import cpu_model  # noqa: E402  (benchmarks/results_report.py)

# The targets (#12, "Done means"): (rankserve config, llama.cpp config, minimum decode ratio)
SPEED_TARGETS = [
    ("rankserve int8 dense", "llama.cpp Q8_0 dense", 1.1),
    ("rankserve int8 svd-llm 0.4", "llama.cpp Q8_0 dense", 1.5),
]


def _f(x, digits: int = 1, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x * scale:.{digits}f}"


def _int8_desc(st: dict) -> str:
    cfg = st.get("int8_config") or {
        "group_size": None,
        "lm_head": False,
    }  # runs before the config was recorded
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("method", "version"))


def _ok(c: dict) -> bool:
    return not c["error"]


def same_worker(r: dict, ref_name: str | None = None) -> float | None:
    """This row's decode rate over the reference's, both timed interleaved in its worker (median of per-round
    ratios); None when the run had no reference there (or another than ``ref_name``)."""
    ref = r.get("ref") or {}
    return ref.get("ratio") if ref and (ref_name is None or ref.get("name") == ref_name) else None


def table(configs: list[dict]) -> list[str]:
    lines = [
        "| configuration | WikiText ppl | Lee ppl | decode tok/s | prefill tok/s | MB/token | weights MB "
        "| peak RSS MB | GB/s | probe GB/s | % of read bw | ÷ ref, same worker | ÷ dense, same worker | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in configs:
        r = c["results"]
        if not _ok(c) and not r:
            lines.append(
                f"| {c['name']} | - | - | - | - | - | - | - | - | - | - | - | - | **failed:** {c['error']} |"
            )
            continue
        frac = r.get("bandwidth_fraction")
        note = (f"**failed:** {c['error']}" if c["error"] else "") or (r.get("note") or "").split(" GGUF ")[0]
        lines.append(
            f"| {c['name']} | {_f(r.get('wikitext_ppl'), 2)} | {_f(r.get('lee_ppl'), 2)} "
            f"| {_f(r.get('decode_tok_s'))} | {_f(r.get('prefill_tok_s'))} "
            f"| {_f(r.get('weight_bytes_per_token'), 1, 1e-6)} | {_f(r.get('weight_mb'), 0)} "
            f"| {_f(r.get('rss_peak_mb') or None, 0)} | {_f(r.get('achieved_gbs'))} | {_f(r.get('probe_gbs'))} "
            f"| {_f(frac, 0, 100)} "
            f"| {_f(same_worker(r), 2)} | {_f((r.get('dense') or {}).get('ratio'), 2)} | {note} |"
        )
    return lines


def findings(configs: list[dict]) -> list[str]:
    """Where rankserve loses, and the issue's targets, computed from the numbers."""
    by = {c["name"]: c["results"] for c in configs if _ok(c)}
    timed = {n: r for n, r in by.items() if r.get("decode_tok_s") and r.get("wikitext_ppl")}
    ours = {n: r for n, r in timed.items() if n.startswith("rankserve")}
    theirs = {n: r for n, r in timed.items() if n.startswith("llama.cpp")}
    out = []
    for n, r in sorted(ours.items(), key=lambda kv: -kv[1]["decode_tok_s"]):
        beaters = [
            m
            for m, q in theirs.items()
            if q["wikitext_ppl"] <= r["wikitext_ppl"] and q["decode_tok_s"] >= r["decode_tok_s"]
        ]
        if beaters:
            best = max(beaters, key=lambda m: theirs[m]["decode_tok_s"])
            q = theirs[best]
            out.append(
                f"- **{n}** is dominated: {best} decodes {q['decode_tok_s'] / r['decode_tok_s']:.2f}x as fast "
                f"at WikiText perplexity {q['wikitext_ppl']:.2f} against {r['wikitext_ppl']:.2f}."
            )
    if ours and theirs:
        fo, ft = (
            max(ours, key=lambda n: ours[n]["decode_tok_s"]),
            max(theirs, key=lambda n: theirs[n]["decode_tok_s"]),
        )
        out.append(
            f"- Fastest: {fo} {ours[fo]['decode_tok_s']:.1f} tok/s (perplexity {ours[fo]['wikitext_ppl']:.2f}); "
            f"{ft} {theirs[ft]['decode_tok_s']:.1f} tok/s (perplexity {theirs[ft]['wikitext_ppl']:.2f})."
        )
        pf = [(n, r) for n, r in timed.items() if r.get("prefill_tok_s")]
        if pf:
            n, r = max(pf, key=lambda nr: nr[1]["prefill_tok_s"])
            out.append(f"- Fastest prefill: {n}, {r['prefill_tok_s']:.0f} tok/s.")
    if not out:
        out.append("- Not enough timed rows to compare.")
    out += ["", "The issue's targets (#12):", ""]
    for a, b, need in SPEED_TARGETS:
        x = same_worker(timed[a], b) if a in timed else None
        how = "interleaved in one worker"
        if x is None and a in timed and b in timed:
            x, how = timed[a]["decode_tok_s"] / timed[b]["decode_tok_s"], "separate workers"
        if x is None:
            out.append(f"- {a} / {b} decode: not measured in this run.")
        else:
            out.append(
                f"- {a} / {b} decode = {x:.3f}, {how} (target >= {need}): {'met' if x >= need else 'NOT met'}."
            )
    for dt in ("bf16", "fp32", "int8"):
        d, s = timed.get(f"rankserve {dt} dense"), timed.get(f"rankserve {dt} svd-llm 0.4")
        if not s:
            continue
        pair = s.get("dense") or {}
        if pair.get("ratio"):  # the dense source timed interleaved in the compressed row's own worker
            speedup, dense_bytes, how = (
                pair["ratio"],
                pair["weight_bytes_per_token"],
                "interleaved in one worker",
            )
        elif d:
            # each against the reference timed in its own worker: the drift between workers cancels only in part
            rd, rs = same_worker(d), same_worker(s)
            same_ref = rd and rs and d["ref"]["name"] == s["ref"]["name"]
            speedup = rs / rd if same_ref else s["decode_tok_s"] / d["decode_tok_s"]
            how = f"each over {d['ref']['name']} in its worker" if same_ref else "separate workers"
            dense_bytes = d["weight_bytes_per_token"]
        else:
            continue
        bytes_ratio = dense_bytes / s["weight_bytes_per_token"]
        verdict = "met" if speedup >= 0.9 * bytes_ratio else "NOT met"
        out.append(
            f"- {dt} svd-llm 0.4 / dense decode = {speedup:.2f} ({how}) against a byte ratio of "
            f"{bytes_ratio:.2f}: {speedup / bytes_ratio:.3f} of it"
            + (f" (target >= 0.9: {verdict})." if dt == "bf16" else ".")
        )
    s = timed.get("rankserve fp32 svd-llm 0.4")
    if s and s.get("bandwidth_fraction"):
        f = s["bandwidth_fraction"]
        out.append(f"- fp32 svd-llm 0.4 streams {f:.1%} of the measured read bandwidth (target >= 90%): "
                   f"{'met' if f >= 0.9 else 'NOT met'}.")  # fmt: skip
    return out


def markdown(run: dict) -> str:
    st, configs, bw = run["settings"], run["configs"], run["bandwidth_gbs"]
    # the reference actually timed in the rankserve workers (none if --ref none, or its GGUF type failed)
    ref = next((c["results"]["ref"]["name"] for c in configs if c["results"].get("ref")), None)
    failed = [c for c in configs if c["error"]]
    cross = run.get("crosscheck")
    lines = [
        "# Speed against quality: rankserve and llama.cpp's quantized models",
        "",
        f"Machine: **{cpu_model()}**, {os.cpu_count()} cores, {platform.machine()}; {st['threads']} threads. "
        + (
            f"Read bandwidth (the bench's native `stream_read` probe, timed once per round inside each "
            f"worker): the workers' medians ranged {bw[0]:.1f}-{bw[-1]:.1f} GB/s."
            if bw
            else "Speed not measured in this run (`--no-speed`)."
        ),
        "",
        "Command (finished " + run["finished"] + f", {run['wall_s'] / 60:.0f} min):",
        "",
        "```",
        run["command"],
        "```",
        "",
        "- Model: `"
        + st["model"]
        + "`; SVD-LLM (uniform ranks) at ratio = fraction of linear-layer parameters "
        f"REMOVED, calibrated on {st['calib_samples']} x {st['calib_seq_len']} tokens of "
        f"`{os.path.basename(st['calib_data'])}` (seed {st['seed']}); int8 = `rankserve quantize --int8` "
        f"(symmetric, its default config `{_int8_desc(st)}`) of each float checkpoint, run with "
        f"{st['int8_dtype']} activations.",
        f"- Perplexity: `rankserve.eval.perplexity`, the first {st['max_windows']} windows of {st['seq_len']} "
        "tokens of the WikiText-2 test split and of the Lee background corpus (out of domain, never calibrated on). "
        "llama.cpp rows are scored on their GGUF's weights read through rankserve's GGUF reader (dequantized): "
        "this scores the quantized weights, not llama.cpp's rounding of activations.",
        f"- Speed: `rankserve.bench.run_bench`, prompt {st['prompt_len']} tokens, {st['new_tokens']} new tokens, "
        f"median of {st['runs']} runs; rankserve runs the `fast` backend, one worker per configuration, "
        + (
            f"each interleaved with {ref} in its worker ('÷ ref, same worker': the median of the per-round "
            "decode ratios; this machine's speed drifts by tens of percent between workers, so the targets use "
            "these ratios); "
            if ref
            else ""
        )
        + "the llama.cpp types run in one worker, interleaved. llama.cpp's decode rate is the difference of a 1-token "
        "and a full run of the same prompt. Peak RSS from the bench's fresh memory worker (llama.cpp's GGUF is "
        "memory-mapped; '-' where this run skipped it, `--no-memory`). % of read bw: the median over rounds of "
        "MB/token x that round's tok/s / the probe read just before it in the same worker (column 'probe GB/s': "
        "their median). '÷ dense, same worker': a compressed float row's decode over its dense source's, both "
        "timed interleaved in that row's worker (median of per-round ratios); the bf16 target uses it.",
        "",
        *table(configs),
        "",
    ]
    if cross:
        lines += [
            f"Cross-check on the first WikiText window ({cross['window_tokens']} tokens) of {cross['config']}: "
            f"perplexity {cross['llama_cpp_ppl']:.3f} from llama.cpp's own logits, {cross['rankserve_ppl']:.3f} "
            "from rankserve's evaluator on the dequantized weights "
            f"({cross['llama_cpp_ppl'] / cross['rankserve_ppl'] - 1:+.2%}).",
            "",
        ]
    lines += ["## Where rankserve loses (computed from the table)", "", *findings(configs), ""]
    if failed:
        lines += ["Failed configurations:", "", *(f"- {c['name']}: {c['error']}" for c in failed), ""]
    lines += ["![perplexity against decode speed](pareto.png)", ""]
    return "\n".join(lines)


def plot(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = {"rankserve": "tab:blue", "llama.cpp": "tab:orange"}
    for c in run["configs"]:
        r = c["results"]
        if not (r.get("decode_tok_s") and r.get("wikitext_ppl")):
            continue
        ax.scatter(r["decode_tok_s"], r["wikitext_ppl"], color=colors[c["engine"]])
        ax.annotate(c["name"], (r["decode_tok_s"], r["wikitext_ppl"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    for engine, color in colors.items():
        ax.scatter([], [], color=color, label=engine)
    if ax.collections and any(len(col.get_offsets()) for col in ax.collections):
        ax.set_yscale(
            "log"
        )  # (an empty log axis is an error: a run without timed rows still gets its figure)
    ax.set_xlabel("decode tok/s (batch 1)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(f"{run['settings']['model']}: perplexity against decode speed ({cpu_model()})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write(run: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "pareto.json"), json.dumps(run, indent=1))
    _atomic_write(os.path.join(out_dir, "PARETO.md"), markdown(run))
    plot(run, os.path.join(out_dir, "pareto.png"))
    print(f"wrote {out_dir}/PARETO.md, pareto.json and pareto.png", flush=True)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        write(json.load(f), os.path.dirname(os.path.abspath(sys.argv[1])))
