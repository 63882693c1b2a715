"""The RESULTS table: WikiText-2 perplexity of SmolLM2-135M, dense and compressed by every family.

Each row compresses a fresh copy of the dense model in memory (``compress_``) and measures perplexity with
``rankserve.eval.perplexity`` (non-overlapping windows of ``--seq-len`` tokens of the raw test split, the first
``--max-windows`` of them). Calibration windows come from the tokenized VALIDATION split, read by path; the test
split is only ever used for perplexity. Rows are cached in ``--cache`` as they finish, so a run can be stopped
and resumed, and ``--report-only`` rewrites ``docs/RESULTS.md`` and ``docs/ppl_vs_ratio.png`` from the cache.

    nice -n 10 python benchmarks/results.py --threads 1 --max-windows 8
    python benchmarks/results.py --report-only

``ratio`` is the fraction of decoder linear-layer parameters REMOVED (SVD-LLM convention: 0.4 keeps 60%).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext2")
FAMILIES = ["svd", "fwsvd", "asvd", "svd-llm", "basis-sharing"]
RATIOS = [0.2, 0.4, 0.6]
MODES = ["uniform", "adaptive"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated, fraction REMOVED")
    p.add_argument("--ranks", default=",".join(MODES), help="uniform,adaptive or one of them")
    p.add_argument("--calib-data", default=os.path.join(DATA, "valid.tokens.txt"))
    p.add_argument("--test-data", default=os.path.join(DATA, "test.txt"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8, help="perplexity windows (0 = the whole test set)")
    p.add_argument(
        "--cache", default=os.path.join(REPO, "docs", "results.json"), help="JSON file of finished rows"
    )
    p.add_argument("--md", default=os.path.join(REPO, "docs", "RESULTS.md"))
    p.add_argument("--png", default=os.path.join(REPO, "docs", "ppl_vs_ratio.png"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="show progress bars (stderr)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the docs from the cache")
    return p.parse_args(argv)


def settings(args, calib_sha: str, test_sha: str) -> dict:
    """What makes two rows comparable; a cached row is reused only if these match."""
    return {
        "model": args.model,
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "calib_file": os.path.basename(args.calib_data),
        "calib_sha256": calib_sha,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "seed": args.seed,
        "test_file": os.path.basename(args.test_data),
        "test_sha256": test_sha,
    }


def load_cache(path: str) -> dict:
    if not os.path.isfile(path):
        return {"rows": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_cache(path: str, cache: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, path)  # a crash mid-write never loses the finished rows


def row_key(family: str, ratio: float, mode: str) -> str:
    return "dense" if family == "dense" else f"{family}|{ratio:g}|{mode}"


def plan(args) -> list[tuple[str, float, str]]:
    """Rows in the order they run: dense first, then the middle ratio, so a partial run is already useful."""
    fams = [f for f in args.families.split(",") if f]
    ratios = sorted((float(r) for r in args.ratios.split(",") if r), key=lambda r: (r != 0.4, r))
    modes = [m for m in args.ranks.split(",") if m]
    bad = [f for f in fams if f not in FAMILIES] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"results.py: unknown family or rank mode: {', '.join(bad)}")
    return [("dense", 0.0, "-")] + [(f, r, m) for r in ratios for f in fams for m in modes]


def run_rows(args, cache: dict) -> None:
    from rankserve.calibration import file_sha256, text_calibration
    from rankserve.compress import compress_
    from rankserve.eval import perplexity
    from rankserve.families import config_class
    from rankserve.loaders.source import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    calib_sha, test_sha = file_sha256(args.calib_data), file_sha256(args.test_data)
    st = settings(args, calib_sha, test_sha)
    rows = cache.setdefault("rows", {})
    todo = [r for r in plan(args) if rows.get(row_key(*r), {}).get("settings") != st]
    if not todo:
        print("every requested row is cached", flush=True)
        return
    lm = load_model(args.model)
    dense = lm.model
    with open(args.test_data, encoding="utf-8") as f:
        test_text = f.read()
    t0 = time.perf_counter()
    calib = text_calibration(args.calib_data, lm.tokenizer, args.calib_samples, args.calib_seq_len, args.seed)
    calib_s = time.perf_counter() - t0
    for family, ratio, mode in todo:
        key = row_key(family, ratio, mode)
        if rows.get(key, {}).get("settings") == st:
            continue  # filled meanwhile (an adaptive row reused its uniform twin)
        print(f"[{datetime.datetime.now():%H:%M:%S}] {key} ...", flush=True)
        row = {
            "family": family,
            "ratio": ratio,
            "ranks": mode,
            "settings": st,
            "threads": torch.get_num_threads(),
        }
        if family == "dense":
            model = dense
        else:
            cfg = config_class(family)(ratio=ratio, ranks=mode)
            if mode == "adaptive" and not type(cfg).supports_adaptive:
                twin = row_key(family, ratio, "uniform")
                if rows.get(twin, {}).get("settings") == st:
                    rows[key] = {**rows[twin], "ranks": mode, "reused": twin}
                    rows[key]["notes"] = rows[twin].get("notes", []) + [
                        f"{family} has no adaptive mode: same model as the uniform row"
                    ]
                    save_cache(args.cache, cache)
                    continue
            model = copy.deepcopy(dense)
            c0 = time.process_time()
            rep = compress_(model, cfg, calib, progress=args.progress)
            # CPU time too: other jobs on this machine sometimes pause (SIGSTOP) or crowd out this process
            row["compress_cpu_s"] = time.process_time() - c0
            row.update(
                rank_mode=rep.rank_mode,
                achieved_ratio=rep.achieved_ratio,
                params_linear_before=rep.params_before,
                params_linear_after=rep.params_after,
                compress_s=rep.wall_time_s,
                whitening=rep.whitening_counts(),
                notes=rep.notes,
                calibration={**calib.to_dict(), "build_s": round(calib_s, 2)},
                ranks_by_kind=_ranks_by_kind(rep),
            )
        t1 = time.perf_counter()
        ppl = perplexity(
            model,
            lm.tokenizer,
            test_text,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            progress=args.progress,
        )
        row.update(
            perplexity=ppl["perplexity"],
            nll=ppl["nll"],
            windows=ppl["windows"],
            tokens=ppl["tokens"],
            eval_s=time.perf_counter() - t1,
            finished=f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        )
        rows[key] = row
        save_cache(args.cache, cache)
        print(
            f"    ppl {row['perplexity']:.3f}"
            + (
                f", achieved {row['achieved_ratio']:.4f}, compress {row['compress_s']:.0f} s"
                if family != "dense"
                else ""
            )
            + f", eval {row['eval_s']:.0f} s",
            flush=True,
        )
        if model is not dense:
            del model


def _ranks_by_kind(rep) -> dict[str, list[int]]:
    """min/median/max rank per projection kind (None = dense slots are skipped)."""
    out: dict[str, list[int]] = {}
    for kind in dict.fromkeys(s.kind for s in rep.slots):
        ranks = sorted(s.rank for s in rep.slots if s.kind == kind and s.rank is not None)
        if ranks:
            out[kind] = [ranks[0], ranks[len(ranks) // 2], ranks[-1]]
    return out


# --------------------------------------------------------------------------------------------------
# report


def write_report(args, cache: dict) -> None:
    rows = cache.get("rows", {})
    wanted = plan(args)
    have = [(k, rows[k]) for k in (row_key(*r) for r in wanted) if k in rows]
    missing = [row_key(*r) for r in wanted if row_key(*r) not in rows]
    if not have:
        print("no finished rows in the cache; nothing to report", file=sys.stderr)
        return
    st = have[0][1]["settings"]
    dense_ppl = rows.get("dense", {}).get("perplexity")
    from rankserve.families import RANK_RULE, RATIO_CONVENTION

    win = have[0][1]["windows"]
    lines = [
        "# Results: WikiText-2 perplexity of compressed SmolLM2-135M",
        "",
        f'**Ratio convention:** `ratio` = {RATIO_CONVENTION}; {RANK_RULE}. "achieved" is the measured fraction '
        "removed (shared bases counted once).",
        "",
        f"- Model: `{st['model']}` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32), compressed in memory.",
        f"- Perplexity: raw WikiText-2 **test** split (`{st['test_file']}`, sha256 `{st['test_sha256'][:16]}...`), "
        f"non-overlapping windows of {st['seq_len']} tokens, **the first {win} windows only** "
        f"({have[0][1]['tokens']:,} scored tokens) out of the whole test set, to fit the shared 2-core CPU. "
        "Numbers are comparable with each other, not with full-test-set numbers in papers.",
        f"- Calibration (every compressed row, identical tokens): {st['calib_samples']} samples x "
        f"{st['calib_seq_len']} tokens at seeded random offsets (seed {st['seed']}) of the tokenized WikiText-2 "
        f"**validation** split (`{st['calib_file']}`, sha256 `{st['calib_sha256'][:16]}...`), read by path. "
        "`svd` uses no data; `fwsvd` uses the same samples for its gradients.",
        "- Adaptive ranks: one greedy allocation of the uniform parameter budget over whitened spectra (svd-llm), "
        "activation-scaled spectra (asvd) or plain spectra (svd, fwsvd), from a statistics pass over the dense "
        "model. Basis Sharing has no adaptive mode: its adaptive rows are its uniform rows.",
        "- Compress time: wall time of `compress_` (statistics passes + decompositions) with 1 torch thread "
        "(`--threads 1`) unless marked, on 2 CPU cores shared with other jobs; calibration tokenization excluded. "
        "Two threads were much slower while other processes held a core (the FWSVD backward pass: 21 s vs 4.7 s "
        "per sample), and other jobs sometimes paused this one, so wall times are rough; the CPU time of the "
        "process (one thread) is the steadier measure of the work.",
        "",
        "Command:",
        "",
        "```",
        "nice -n 10 python benchmarks/results.py --threads 1 --max-windows "
        f"{st['max_windows']} --calib-samples {st['calib_samples']} --calib-seq-len {st['calib_seq_len']} "
        f"--seed {st['seed']} --seq-len {st['seq_len']}",
        "```",
        "",
        "| family | ranks | ratio (removed) | achieved | linear params kept | perplexity | x dense "
        "| compress wall s | compress CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fam_order = {f: i for i, f in enumerate(["dense", *FAMILIES])}
    have.sort(
        key=lambda kr: (
            kr[1]["ratio"],
            fam_order[kr[1]["family"]],
            MODES.index(kr[1]["ranks"]) if kr[1]["ranks"] in MODES else -1,
        )
    )
    for key, r in have:
        if key == "dense":
            lines.append(f"| dense | - | 0 | 0 | 100% | {r['perplexity']:.2f} | 1.00 | - | - |")
            continue
        kept = r["params_linear_after"] / r["params_linear_before"]
        rel = r["perplexity"] / dense_ppl if dense_ppl else float("nan")
        mode = r["ranks"] + (" (=uniform)" if r.get("reused") else "")
        cpu = f"{r['compress_cpu_s']:.0f}" if "compress_cpu_s" in r else "-"
        lines.append(
            f"| {r['family']} | {mode} | {r['ratio']:g} | {r['achieved_ratio']:.4f} | {kept:.1%} | "
            f"{_fmt(r['perplexity'])} | {_fmt(rel)} | {r['compress_s']:.0f}{_threads_mark(r)} | {cpu} |"
        )
    lines.append("")
    if missing:
        lines.append(f"**Not finished** (not in the table): {', '.join(missing)}.")
        lines.append("")
    lines += _orderings(have)
    whit = {}
    for _, r in have:
        for k, v in (r.get("whitening") or {}).items():
            whit[k] = whit.get(k, 0) + v
    if whit:
        lines.append(
            "Whitening (svd-llm, basis-sharing), matrices by method over all rows: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(whit.items()))
            + "."
        )
        lines.append("")
    lines.append(
        f"Machine: {platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores (shared)."
    )
    lines.append("")
    lines.append("![perplexity vs ratio](ppl_vs_ratio.png)")
    os.makedirs(os.path.dirname(args.md), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(args.png, have, dense_ppl, win, st["seq_len"])
    print(f"wrote {args.md} and {args.png} ({len(have)} rows, {len(missing)} missing)", flush=True)


def _orderings(have) -> list[str]:
    """Families from best to worst perplexity at each ratio (uniform ranks), and where adaptive ranks helped."""
    out = []
    ratios = sorted({r["ratio"] for _, r in have if r["family"] != "dense"})
    for ratio in ratios:
        uni = sorted(
            (r for _, r in have if r["ratio"] == ratio and r["ranks"] == "uniform"),
            key=lambda r: r["perplexity"],
        )
        if uni:
            out.append(
                f"- ratio {ratio:g}, uniform ranks, best to worst: "
                + " < ".join(f"{r['family']} ({_fmt(r['perplexity'])})" for r in uni)
            )
    pairs = {}
    for _, r in have:
        if r["family"] != "dense" and not r.get("reused"):
            pairs.setdefault((r["family"], r["ratio"]), {})[r["ranks"]] = r["perplexity"]
    better = [
        f"{f} {q:g}" for (f, q), d in sorted(pairs.items()) if len(d) == 2 and d["adaptive"] < d["uniform"]
    ]
    worse = [
        f"{f} {q:g}" for (f, q), d in sorted(pairs.items()) if len(d) == 2 and d["adaptive"] >= d["uniform"]
    ]
    if better or worse:
        out.append(
            f"- adaptive ranks lowered perplexity for: {', '.join(better) or 'none'}; "
            f"raised it for: {', '.join(worse) or 'none'}"
        )
    return ["Read from the table:", "", *out, ""] if out else []


def _threads_mark(r: dict) -> str:
    return f" ({r['threads']} threads)" if r.get("threads", 1) != 1 else ""


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _plot(path: str, have, dense_ppl, windows: int, seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key, r in have:
        if key != "dense" and not r.get("reused") and math.isfinite(r["perplexity"]):
            lines.setdefault((r["family"], r["ranks"]), []).append((r["ratio"], r["perplexity"]))
    colors = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (fam, mode), pts in sorted(lines.items(), key=lambda kv: (FAMILIES.index(kv[0][0]), kv[0][1])):
        pts.sort()
        if dense_ppl:
            pts = [(0.0, dense_ppl), *pts]
        xs, ys = zip(*pts, strict=True)
        ax.plot(
            xs,
            ys,
            marker="o",
            color=colors[fam],
            ls="-" if mode == "uniform" else "--",
            label=f"{fam} ({mode})",
        )
    if dense_ppl:
        ax.axhline(dense_ppl, color="gray", lw=0.8, ls=":", label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("ratio = fraction of linear-layer parameters removed")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M, WikiText-2 test, first {windows} windows of {seq_len} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_windows is not None and args.max_windows < 1:
        args.max_windows = None
    cache = load_cache(args.cache)
    if not args.report_only:
        run_rows(args, cache)
    write_report(args, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
