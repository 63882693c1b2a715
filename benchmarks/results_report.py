"""The RESULTS tables' keys, markdown and plot (``benchmarks/results.py`` measures the rows); the plot style and the
CPU-model line that the other benchmark reports share."""

from __future__ import annotations

import math
import os
import platform
import sys

import torch

from rankserve.families.base import RANK_MODES

FAMILIES = ["svd", "fwsvd", "asvd", "svd-llm", "basis-sharing"]
RATIOS = [0.2, 0.4, 0.6]
MODES = list(RANK_MODES)  # uniform first: the others are compared with it
# The protocol of the first table (its rows are keyed without a protocol suffix in the cache).
FIRST_PROTOCOL = (2048, 8)
# Rows the second protocol exists for (issue 11): in-domain vs out-of-domain for the two usable families.
OOD_ROWS = [(f, r, m) for f in ("svd-llm", "basis-sharing") for r in (0.2, 0.4) for m in MODES]


def _kind_ranks(v: list[int]) -> str:
    """A ``ranks_by_kind`` entry: [min, median, max] (older rows) or [min, median, max, dense] or [dense]."""
    if len(v) == 3:
        return "/".join(map(str, v))
    spread, dense = v[:-1], v[-1]
    if not spread:
        return f"all {dense} dense"
    return "/".join(map(str, spread)) + (f" + {dense} dense" if dense else "")


def protocol(seq_len: int, max_windows: int | None) -> str:
    return f"{seq_len}x{max_windows or 'all'}"


def row_key(family: str, ratio: float, mode: str, seq_len: int = 2048, max_windows: int | None = 8) -> str:
    base = "dense" if family == "dense" else f"{family}|{ratio:g}|{mode}"
    first = (seq_len, max_windows) == FIRST_PROTOCOL
    return base if first else f"{base}@{protocol(seq_len, max_windows)}"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------
# report


def _protocol_of(r: dict) -> tuple[int, int | None]:
    return r["settings"]["seq_len"], r["settings"]["max_windows"]


def write_report(args, cache: dict) -> None:
    rows = cache.get("rows", {})
    if not rows:
        print("no finished rows in the cache; nothing to report", file=sys.stderr)
        return
    from rankserve.families import RANK_RULE, RATIO_CONVENTION

    # one table per protocol, the cheaper (newer) one with both corpora first
    tables: dict[tuple[int, int | None], list[tuple[str, dict]]] = {}
    for k, r in rows.items():
        tables.setdefault(_protocol_of(r), []).append((k, r))
    order = sorted(tables, key=lambda p: (p == FIRST_PROTOCOL, p[0]))
    st = tables[order[0]][0][1]["settings"]
    lines = [
        "# Results: perplexity of compressed SmolLM2-135M, in domain (WikiText-2) and out of domain (Lee corpus)",
        "",
        f'**Ratio convention:** `ratio` = {RATIO_CONVENTION}; {RANK_RULE}. "achieved" is the measured fraction '
        "removed (shared bases counted once).",
        "",
        f"- Model: `{st['model']}` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32), compressed in memory.",
        "- Two perplexity protocols, each its own table, never mixed: non-overlapping windows of the raw text, the "
        "first N windows only, to fit the shared 2-core CPU (numbers compare within a table, not with papers' "
        "full-test-set numbers). The first table is the newer, cheaper one (512-token windows) and has both "
        "corpora; the second is the original 2048-token table, WikiText only.",
        f"- WikiText-2: the raw **test** split (`{st['test_file']}`, sha256 `{st['test_sha256'][:16]}...`).",
        "- Out of domain: the **Lee background corpus** (300 ABC news articles, 360 kB of prose; "
        "`gensim/test/test_data/lee_background.cor` inside the PyPI wheel `gensim==4.4.0`), fetched at benchmark "
        "time by `benchmarks/corpora.py` into `~/.cache/rankserve/corpora/` and checked by sha256; never committed "
        "and **never used for calibration**. *not measured* marks rows measured before this column existed.",
        f"- Calibration (every compressed row, identical tokens): {st['calib_samples']} samples x "
        f"{st['calib_seq_len']} tokens at seeded random offsets (seed {st['seed']}) of the tokenized WikiText-2 "
        f"**validation** split (`{st['calib_file']}`, sha256 `{st['calib_sha256'][:16]}...`), read by path. "
        "`svd` uses no data; `fwsvd` uses the same samples for its gradients.",
        "- Rank allocators, all with the uniform ranks' parameter budget: `uniform`; `adaptive` (one greedy "
        "allocation over whitened spectra (svd-llm), activation-scaled spectra (asvd) or plain spectra (svd, "
        "fwsvd), from a statistics pass over the dense model; Basis Sharing has none, its adaptive rows are its "
        "uniform rows); `sensitivity` (by the calibration loss: the K-FAC second-order estimate of the NLL increase "
        "of truncating each slot alone at every rank, from one backward pass per sample over the first calibration "
        "samples and the family's own factorization, then one global threshold on loss per parameter, where "
        "keeping a slot dense is one of the choices; see `rankserve/compress.py`. Rows measured since "
        "2026-12-02 20:00 UTC; before, a slot could not stay dense and the 512-token rows had 6-80% higher perplexity).",
        "- Compress time: wall time of `compress_` (statistics passes + decompositions) on 2 CPU cores shared with "
        "other jobs (load average 15-19 during the 512-token runs: each run got about a tenth of a core), calibration tokenization excluded, so wall "
        "times are rough; the CPU time of the process is the steadier measure of the work.",
        "",
    ]
    for proto in order:
        lines += _table(tables[proto], proto, rows.get(row_key("dense", 0, "-", *proto)))
    lines += _healed(args.healing)
    lines.append(
        f"Machine: {cpu_model()}, {os.cpu_count()} cores shared with other jobs, {platform.machine()}, "
        f"torch {torch.__version__}."
    )
    lines.append("")
    lines.append("![perplexity vs ratio](ppl_vs_ratio.png)")
    os.makedirs(os.path.dirname(args.md), exist_ok=True)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(args.png, [(p, tables[p], rows.get(row_key("dense", 0, "-", *p))) for p in order])
    print(f"wrote {args.md} and {args.png} ({len(rows)} rows)", flush=True)


def _healed(path: str) -> list[str]:
    """The healed rows section, from benchmarks/heal_curve.py's results (empty when none were measured)."""
    from heal_curve import healed_table  # benchmarks/heal_curve.py, next to this file

    table = healed_table(path)
    if not table:
        return []
    return [
        "## Healed by distillation (`rankserve heal`)",
        "",
        "Perplexity `WikiText-2 test / Lee` (x dense) with 512-token windows, the first 8, after compressing and "
        "after healing; the exact commands, CPU and load are in [HEALING.md](HEALING.md) and the curve in "
        "[heal_curve.png](heal_curve.png). Wall times ran on the shared machine under the load average shown.",
        "",
        *table,
        "",
    ]


def _table(have: list[tuple[str, dict]], proto: tuple[int, int | None], dense: dict | None) -> list[str]:
    seq_len, windows = proto
    r0 = have[0][1]
    st = r0["settings"]
    dense_ppl = dense["perplexity"] if dense else None
    dense_ood = (dense or {}).get("ood", {}).get("perplexity")
    threads = sorted({r.get("threads", 1) for _, r in have})
    lines = [
        f"## Protocol: windows of {seq_len} tokens, the first {windows or 'all'} "
        f"({r0['tokens']:,} scored WikiText tokens per row)",
        "",
        "Command:",
        "",
        "```",
        f"nice -n {5 if proto != FIRST_PROTOCOL else 10} python benchmarks/results.py --threads "
        f"{','.join(map(str, threads))} --max-windows {st['max_windows']} --seq-len {st['seq_len']} "
        f"--calib-samples {st['calib_samples']} --calib-seq-len {st['calib_seq_len']} --seed {st['seed']}"
        + (
            " --families svd-llm,basis-sharing --ratios 0.2,0.4 --ranks uniform,adaptive,sensitivity"
            if proto != FIRST_PROTOCOL
            else " --ood-data none --ranks uniform,adaptive"
        ),
        "```",
        "",
        "| family | ranks | ratio (removed) | achieved | linear params kept | WikiText ppl | x dense "
        "| Lee ppl | x dense | compress wall s | compress CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fam_order = {f: i for i, f in enumerate(["dense", *FAMILIES])}
    have = sorted(
        have,
        key=lambda kr: (
            kr[1]["ratio"],
            fam_order[kr[1]["family"]],
            MODES.index(kr[1]["ranks"]) if kr[1]["ranks"] in MODES else -1,
        ),
    )
    for _, r in have:
        ood = r.get("ood", {}).get("perplexity")
        ood_cells = (
            f"{_fmt(ood)} | {_fmt(ood / dense_ood) if dense_ood else '-'}"
            if ood is not None
            else "*not measured* | -"
        )
        if r["family"] == "dense":
            lines.append(
                f"| dense | - | 0 | 0 | 100% | {_fmt(r['perplexity'])} | 1.00 | {ood_cells} | - | - |"
            )
            continue
        kept = r["params_linear_after"] / r["params_linear_before"]
        rel = r["perplexity"] / dense_ppl if dense_ppl else float("nan")
        mode = r["ranks"] + (" (=uniform)" if r.get("reused") else "")
        cpu = f"{r['compress_cpu_s']:.0f}" if "compress_cpu_s" in r else "-"
        lines.append(
            f"| {r['family']} | {mode} | {r['ratio']:g} | {r['achieved_ratio']:.4f} | {kept:.1%} | "
            f"{_fmt(r['perplexity'])} | {_fmt(rel)} | {ood_cells} | {r['compress_s']:.0f}{_threads_mark(r)} "
            f"| {cpu} |"
        )
    lines.append("")
    if proto != FIRST_PROTOCOL:
        keys = {k for k, _ in have}
        missing = [
            row_key(*r, *proto).split("@")[0]
            for r in OOD_ROWS
            if row_key(*r, *proto) not in keys and not (r[0] == "basis-sharing" and r[2] == "adaptive")
        ]
        if missing:
            lines += [
                f"**Not measured in this protocol** (no time left on the shared CPU): {', '.join(missing)}.",
                "",
            ]
    lines += _orderings(have)
    spread = [
        f"- {r['family']} {r['ratio']:g} {r['ranks']}: "
        + ", ".join(f"{kind} {_kind_ranks(v)}" for kind, v in r["ranks_by_kind"].items())
        for _, r in have
        if r["ranks"] in MODES[1:] and not r.get("reused") and r.get("ranks_by_kind")
    ]
    if spread:
        lines += [
            "Ranks chosen per projection kind (min/median/max of the factorized ones, + how many stay dense) "
            "where they are not uniform:",
            "",
            *spread,
            "",
        ]
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
    return lines


def _orderings(have) -> list[str]:
    """Families from best to worst at each ratio (uniform ranks), and how each allocator did against uniform."""
    out = []
    ratios = sorted({r["ratio"] for _, r in have if r["family"] != "dense"})
    for ratio in ratios:
        uni = sorted(
            (r for _, r in have if r["ratio"] == ratio and r["ranks"] == "uniform"),
            key=lambda r: r["perplexity"],
        )
        if len(uni) > 1:
            out.append(
                f"- ratio {ratio:g}, uniform ranks, best to worst: "
                + " < ".join(f"{r['family']} ({_fmt(r['perplexity'])})" for r in uni)
            )
    pairs: dict[tuple[str, float], dict[str, dict]] = {}
    for _, r in have:
        if r["family"] != "dense" and not r.get("reused"):
            pairs.setdefault((r["family"], r["ratio"]), {})[r["ranks"]] = r
    for mode in MODES[1:]:
        cmp = []
        for (f, q), d in sorted(pairs.items()):
            if mode in d and "uniform" in d:
                change = d[mode]["perplexity"] / d["uniform"]["perplexity"] - 1
                text = f"{f} {q:g}: WikiText {change:+.1%}"
                if "ood" in d[mode] and "ood" in d["uniform"]:
                    text += (
                        f", Lee {d[mode]['ood']['perplexity'] / d['uniform']['ood']['perplexity'] - 1:+.1%}"
                    )
                cmp.append(text)
        if cmp:
            out.append(
                f"- `{mode}` ranks vs uniform (perplexity change, negative = better): " + "; ".join(cmp)
            )
    return ["Read from the table:", "", *out, ""] if out else []


def _threads_mark(r: dict) -> str:
    return f" ({r['threads']} threads)" if r.get("threads", 1) != 1 else ""


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _plot(path: str, tables) -> None:
    """One panel per (protocol, corpus) with data: perplexity against ratio, a line per family and allocator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for proto, have, dense in tables:
        panels.append(
            (proto, "WikiText-2 test", have, dense and dense["perplexity"], lambda r: r["perplexity"])
        )
        if any("ood" in r for _, r in have):
            panels.append(
                (
                    proto,
                    "Lee corpus (out of domain)",
                    [(k, r) for k, r in have if "ood" in r],
                    dense and dense.get("ood", {}).get("perplexity"),
                    lambda r: r["ood"]["perplexity"],
                )
            )
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    colors = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    styles = {"uniform": "-", "adaptive": "--", "sensitivity": ":"}
    for ax, (proto, corpus, have, dense_ppl, value) in zip(axes[0], panels, strict=True):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _, r in have:
            if r["family"] != "dense" and not r.get("reused") and math.isfinite(value(r)):
                lines.setdefault((r["family"], r["ranks"]), []).append((r["ratio"], value(r)))
        for (fam, mode), pts in sorted(lines.items(), key=lambda kv: (FAMILIES.index(kv[0][0]), kv[0][1])):
            pts.sort()
            if dense_ppl:
                pts = [(0.0, dense_ppl), *pts]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", color=colors[fam], ls=styles[mode], label=f"{fam} ({mode})")
        if dense_ppl:
            ax.axhline(dense_ppl, color="gray", lw=0.8, ls=":", label=f"dense ({dense_ppl:.1f})")
        finish_panel(
            ax,
            "ratio = fraction of linear-layer parameters removed",
            "perplexity (log scale)",
            f"{corpus}, first {proto[1] or 'all'} windows of {proto[0]}",
        )
    save_figure(fig, path, "SmolLM2-135M compressed")


def finish_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The docs' plot style: log y, labels, a small title, grid and legend."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
