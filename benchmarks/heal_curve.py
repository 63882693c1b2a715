"""docs/HEALING.md: perplexity of SmolLM2-135M compressed by SVD-LLM, then healed by distillation.

Perplexity uses the SVD papers' protocol (``rankserve.eval.perplexity``: non-overlapping windows of 512 tokens,
the first 8) on two texts that are never used for calibration or healing: WikiText-2 raw test, and the Lee
background corpus (ABC news prose; ``gensim/test/test_data/lee_background.cor`` in the gensim==4.4.0 wheel).

Experiments (each rewrites its record in ``--results`` as it goes; ``--report-only`` rewrites the report):

* ``curve``: compress at ``--ratio`` calibrated on ``--arm`` data (default: self-generated), then heal with
  ``rankserve.heal.heal_``'s defaults unless given, and score both texts every ``--eval-tokens`` healing tokens.
  ``--speed`` first times a few training steps in fp32, and with bf16 autocast where the CPU has native bf16
  (``rankserve.distill.cpu_has_native_bf16``; elsewhere bf16 is emulated and cannot pay).
* ``data``: each arm (self-generated text, WikiText-2 validation, half of each) is used both to calibrate the
  compression and to heal; both texts are scored after compressing and after a short heal.
* ``lr``: one compression (``--arm`` data), then one whole heal of ``--tokens`` per peak learning rate in
  ``--lrs``, each from the same compressed model: which lr a run of that length wants.

Self-generated rows (the teacher's prose and chat answers, ``rankserve.calibration.self_generated_rows``) are generated
once per run and shared by calibration and healing.

    python benchmarks/heal_curve.py data --ratio 0.2 --tokens 8192
    python benchmarks/heal_curve.py curve --ratio 0.2 --tokens 65536 --eval-tokens 16384
    python benchmarks/heal_curve.py lr --arm wikitext-valid --ranks sensitivity --tokens 12288 --lrs 2e-4,5e-5
    python benchmarks/heal_curve.py --report-only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
from corpora import WIKI_TEST, WIKI_VALID, fetch, require  # benchmarks/corpora.py, next to this file

from rankserve.families.base import RANK_MODES
from rankserve.heal import SCHEDULES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ("wikitext2-test", "lee-background")  # the two evaluation texts, in table order
SEQ_LEN, MAX_WINDOWS = 512, 8
ARMS = ("self-generated", "wikitext-valid", "mix")  # calibration and healing data of the `data` experiment


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", choices=["curve", "data", "lr"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--family", default="svd-llm", help="compression family (svd-llm, basis-sharing, ...)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of linear-layer parameters REMOVED")
    p.add_argument("--ranks", choices=RANK_MODES, default="uniform", help="rank allocation")
    p.add_argument("--tokens", type=int, default=131072, help="healing tokens")
    p.add_argument("--eval-tokens", type=int, default=8192, help="score the texts every N healing tokens")
    p.add_argument(
        "--compare-tokens", type=int, default=8192, help="data: healing tokens at which the arms are compared"
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lrs", default="2e-4,1e-4,5e-5,2e-5", help="lr: the peak learning rates compared")
    p.add_argument("--seq-len", type=int, default=None, help="healing rows' length")
    p.add_argument("--batch", type=int, default=None, help="healing rows per step")
    p.add_argument("--pool-tokens", type=int, default=None, help="distinct self-generated healing tokens")
    p.add_argument("--arm", choices=ARMS, default=ARMS[0], help="curve: calibration and healing data")
    p.add_argument(
        "--heal-self-share",
        type=float,
        default=None,
        help="heal with this self-generated fraction (the rest WikiText-2 validation) whatever the arm's "
        "calibration: `--arm mix --heal-self-share 0` is the README's recipe",
    )
    p.add_argument("--arms", default=",".join(ARMS), help="data: the arms compared, comma-separated")
    p.add_argument(
        "--calib-seq-len",
        type=int,
        default=None,
        help="calibration rows' length (default: the healing length)",
    )
    p.add_argument("--calib-samples", type=int, default=32, help="calibration rows (of the healing length)")
    p.add_argument(
        "--speed", action="store_true", help="curve: probe training tokens/s first (quiet machine)"
    )
    p.add_argument("--train-norms", action="store_true", help="also train the RMSNorm weights")
    p.add_argument("--train-dense", action="store_true", help="also train the projections kept dense")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="lr after the warm-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--save", default=None, help="curve: write the healed model here as a checkpoint (new dir)"
    )
    p.add_argument("--results", default=os.path.join(REPO, "docs", "healing.json"))
    p.add_argument("--report", default=os.path.join(REPO, "docs", "HEALING.md"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def load_texts() -> dict[str, str]:
    out = {}
    for name, path in zip(TEXTS, (WIKI_TEST, fetch()), strict=True):
        with open(path, encoding="utf-8") as f:
            out[name] = f.read()
    return out


def score(model, tok, texts) -> dict[str, float]:
    from rankserve.eval import perplexity

    return {
        n: round(perplexity(model, tok, t, SEQ_LEN, MAX_WINDOWS, progress=False)["perplexity"], 3)
        for n, t in texts.items()
    }


def append(path: str, rec: dict) -> None:
    """Add ``rec`` to the results, replacing an earlier version of the same run (same date and command)."""
    recs = json.load(open(path)) if os.path.exists(path) else []
    recs = [r for r in recs if (r["date"], r["command"]) != (rec["date"], rec["command"])] + [rec]
    with open(path, "w") as f:
        json.dump(recs, f, indent=1)


def compress(lm, family: str, ratio: float, ranks: str, calib):
    """A compressed copy of the dense model, its family config and the compression report."""
    from rankserve.compress import compress_
    from rankserve.families import config_class

    model, cfg = copy.deepcopy(lm.model), config_class(family)(ratio=ratio, ranks=ranks)
    return model, cfg, compress_(model, cfg, calib, progress=False)


def save(path: str, lm, student, cfg, comp, healing) -> None:
    """The healed student as an ordinary rankserve checkpoint (written atomically), e.g. for pareto's --extra."""
    from rankserve.checkpoint import save_checkpoint
    from rankserve.compress import compression_manifest
    from rankserve.heal import healed_manifest

    manifest = healed_manifest(compression_manifest(student, cfg, comp, lm.source), healing, lm.source)
    save_checkpoint(student, path, tokenizer=lm.tokenizer, manifest=manifest)


def heal_config(args, **over):
    from rankserve.heal import HealConfig

    fields = {"tokens": args.tokens}
    if args.lr is not None:
        fields["lr"] = args.lr
    if args.seq_len is not None:
        fields["seq_len"] = args.seq_len
    if args.batch is not None:
        fields["batch"] = args.batch
    if args.pool_tokens is not None:
        fields["pool_tokens"] = args.pool_tokens
    fields.update(train_norms=args.train_norms, train_dense=args.train_dense, schedule=args.schedule)
    fields.update(over)
    return HealConfig(**fields).validate()


def generate(args, lm, n_rows: int, seq_len: int):
    """``n_rows`` self-generated rows of ``seq_len`` tokens (prose and chat answers), shared by calibration
    and healing: generating text is the expensive part on a CPU, so it is done once per run."""
    from rankserve.calibration import self_generated_rows

    return self_generated_rows(lm.model, lm.tokenizer, n_rows, seq_len, 0, progress=True)


def calibration(args, lm, arm: str, generated):
    """The arm's calibration rows: self-generated, WikiText-2 validation windows, or half of each."""
    from rankserve.calibration import Calibration, mixed_calibration, text_calibration

    n, L = args.calib_samples, args.calib_seq_len or args.seq_len or 256
    # a self-generated row's first L tokens are a self-generated row of length L
    if arm == "self-generated":
        return Calibration(generated[0][:n, :L], "self", 0)
    if arm == "wikitext-valid":
        return text_calibration(WIKI_VALID, lm.tokenizer, n, L, 0)
    own = (generated[0][: n // 2, :L], {**generated[1], "samples": n // 2, "seq_len": L})
    return mixed_calibration(own, text_calibration(WIKI_VALID, lm.tokenizer, n - n // 2, L, 0))


def arm_heal(args, arm: str, **over):
    """The arm's healing config: self-generated pool, WikiText-2 validation windows, or half of each."""
    data = {"self-generated": {}, "wikitext-valid": {"data": [WIKI_VALID], "self_share": 0.0}}
    data = data.get(arm, {"data": [WIKI_VALID], "self_share": 0.5})
    if args.heal_self_share is not None:
        data = {"data": [WIKI_VALID], "self_share": args.heal_self_share}
    return heal_config(args, **data, **over)


def speed_probe(args, lm, student, generated) -> dict[str, float]:
    """Training tokens/s over 3 steps of 4x256, fp32 and (only where it can pay) bf16 autocast."""
    from rankserve.distill import cpu_has_native_bf16
    from rankserve.heal import heal_

    speed = {}
    for amp in ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",):
        probe = copy.deepcopy(student)
        cfg = heal_config(args, tokens=3 * 4 * 256, seq_len=256, pool_tokens=1024, eval_rows=1, autocast=amp)
        speed[amp] = heal_(
            probe, lm.model, lm.tokenizer, cfg, progress=False, generated=generated
        ).tokens_per_s
        del probe
    return speed


class _Enough(Exception):
    """Raised from the evaluation callback to stop an arm at ``--compare-tokens``."""


def run_arm(
    args, lm, texts, rec: dict, arm: str, generated, stop_at: int | None, compressed=None, lr=None
) -> None:
    """Compress calibrated on ``arm``'s data, heal on it, and score both texts at every evaluation point.

    Every arm is planned for ``--tokens`` (same schedule); ``stop_at`` ends an arm after that many tokens, so
    arms compared at a small token count saw exactly the same learning rates. ``compressed``: ``(student,
    config, report, seconds)`` of a compression already made, healed on a copy; ``lr`` overrides ``--lr``.
    """
    from rankserve.heal import heal_

    over = {} if lr is None else {"lr": lr}
    cfg = arm_heal(args, arm, **over)
    cfg = dataclasses.replace(cfg, eval_every=max(args.eval_tokens // (cfg.batch * cfg.seq_len), 1))
    t0 = time.perf_counter()
    if compressed is None:
        student, fam, comp = compress(
            lm, args.family, args.ratio, args.ranks, calibration(args, lm, arm, generated)
        )
        compress_s = time.perf_counter() - t0
    else:
        student, fam, comp, compress_s = copy.deepcopy(compressed[0]), *compressed[1:]
    label = arm if lr is None else f"{arm}, lr {lr:g}"
    dense_slots = sum(slot.rank is None for slot in comp.slots)
    row = {"arm": label, "compress_s": round(compress_s, 1), "dense_slots": dense_slots, "points": []}
    row["heal"] = {"config": cfg.to_dict(), "finished": False}
    rec["rows"].append(row)
    t1 = time.perf_counter()

    def on_eval(pt):  # the record is rewritten at every point, so a stopped run keeps its curve
        row["points"].append({**pt, "ppl_texts": score(student, lm.tokenizer, texts)})
        row["heal_total_s"] = round(time.perf_counter() - t1, 1)
        rec["load_now"] = os.getloadavg()[0]
        append(args.results, rec)
        print(arm, json.dumps(row["points"][-1]), file=sys.stderr, flush=True)
        if stop_at is not None and pt["tokens"] >= stop_at:
            raise _Enough

    try:
        report = heal_(
            student, lm.model, lm.tokenizer, cfg, progress=True, on_eval=on_eval, generated=generated
        )
        row["heal"] = {**{k: v for k, v in report.to_dict().items() if k != "curve"}, "finished": True}
        if args.save and stop_at is None and lr is None:
            save(args.save, lm, student, fam, comp, report)
            row["saved"] = args.save
    except _Enough:
        row["heal"]["stopped_at"] = row["points"][-1]["tokens"]
    row["heal_total_s"] = round(time.perf_counter() - t1, 1)
    append(args.results, rec)


def lrs(args) -> list[float]:
    """``--lrs`` as numbers; a bad list is one line, before any work."""
    try:
        out = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        sys.exit(f"heal_curve.py: --lrs must be comma-separated numbers, got {args.lrs!r}")
    if not out or not all(math.isfinite(x) and x > 0 for x in out):
        sys.exit(f"heal_curve.py: --lrs must be positive numbers, got {args.lrs!r}")
    return out


def run(args, lm, texts, base) -> None:
    """``curve``: one arm healed for ``--tokens``. ``data``: every arm to ``--compare-tokens``, then the
    first arm (``--arm``) on to ``--tokens`` as the curve."""
    from rankserve.heal import heal_rows

    arms = args.arms.split(",") if args.experiment == "data" else [args.arm]
    # self-generated rows the arms use (none for WikiText alone): the most any one arm's pool takes
    need = max(heal_rows(arm_heal(args, a))[1] for a in arms)
    # rows of the healing length when healing takes any, else only the calibration's rows at its length
    # (a row's first L tokens are a row of length L): 32 rows of 512 cost ~9 min on 2 cores, of 256 a quarter
    length = (args.seq_len or 256) if need else (args.calib_seq_len or args.seq_len or 256)
    if any(a != "wikitext-valid" for a in arms):  # their calibration takes self-generated rows too
        need = max(need, args.calib_samples)
    t0 = time.perf_counter()
    generated = generate(args, lm, need, length) if need else None
    rec = {
        **base,
        "experiment": args.experiment,
        "family": args.family,
        "ratio": args.ratio,
        "ranks": args.ranks,
        "calibration_rows": f"{args.calib_samples}x{args.calib_seq_len or args.seq_len or 256}",
        "generate_s": round(time.perf_counter() - t0, 1),
        "dense": score(lm.model, lm.tokenizer, texts),
        "rows": [],
    }
    if args.speed:
        student = compress(
            lm, args.family, args.ratio, args.ranks, calibration(args, lm, arms[0], generated)
        )[0]
        rec["train_tokens_per_s"] = speed_probe(args, lm, student, generated)
        del student
    if args.experiment == "lr":
        t0 = time.perf_counter()
        compressed = compress(
            lm, args.family, args.ratio, args.ranks, calibration(args, lm, args.arm, generated)
        )
        compressed = (*compressed, time.perf_counter() - t0)
        for lr in lrs(args):
            run_arm(args, lm, texts, rec, args.arm, generated, None, compressed, lr)
        return
    # the curve's arm last, so the comparison is complete before the long run
    for arm in sorted(arms, key=lambda a: a == args.arm):
        last = arm == args.arm
        run_arm(args, lm, texts, rec, arm, generated, None if last else args.compare_tokens)


def _pool(c: dict) -> str:
    files = ", ".join(os.path.basename(p) for p in c["data"])
    if not c["data"]:
        return "self-generated"
    return f"{c['self_share']:g} self-generated, the rest from {files}"


def _ranks(rec: dict) -> str:
    """' (sensitivity ranks)' for a run with non-uniform ranks; '' for uniform (and records older than --ranks)."""
    mode = rec.get("ranks", "uniform")
    return "" if mode == "uniform" else f" ({mode} ranks)"


def ratio_of(ppl: dict, dense: dict) -> str:
    return " / ".join(f"{ppl[k]:.1f} ({ppl[k] / dense[k]:.2f}x)" for k in TEXTS)


def _trained(c: dict) -> str:
    extra = [
        w for k, w in (("train_dense", "the projections kept dense"), ("train_norms", "norms")) if c.get(k)
    ]
    items = ["factors", *extra]
    return ", ".join(items[:-1]) + " and " + items[-1] if extra else "factors only"


def _config_line(c: dict) -> str:
    return (
        f"{c['tokens']:,} tokens planned, lr {c['lr']:g} {c['schedule']} (warm-up {c['warmup']:g} of the steps, "
        f"at least 10), {c['batch']}x{c['seq_len']} tokens per step, "
        f"{_trained(c)}, autocast {c['autocast']}, "
        f"pool of {c['pool_tokens']:,} tokens ({_pool(c)})"
    )


TARGETS = {0.2: 1.5, 0.4: 2.5}  # issue 11: perplexity at most this x dense on both texts, with <= 1M tokens
BUDGET = 1 << 20


def gap(rec: dict, row: dict) -> list[str]:
    """Lines on the distance to #11's target at the last point, and a power-law extrapolation of the curve
    (log(ppl / dense) linear in log(tokens), fitted to the last two healed points) to 1M tokens."""
    target = TARGETS.get(rec["ratio"])
    pts = [p for p in row["points"] if p["tokens"] > 0]
    if target is None or not pts:
        return []
    d, last = rec["dense"], pts[-1]
    out = []
    for text in TEXTS:
        x = last["ppl_texts"][text] / d[text]
        line = f"- {text}: {x:.2f}x dense after {last['tokens']:,} tokens, target {target}x ({x / target:.1f}x off)"
        if len(pts) >= 2:
            (t0, y0), (t1, y1) = [(p["tokens"], math.log(p["ppl_texts"][text] / d[text])) for p in pts[-2:]]
            slope = (y1 - y0) / (math.log(t1) - math.log(t0))
            at_budget = math.exp(y1 + slope * (math.log(BUDGET) - math.log(t1)))
            line += (
                f"; the last two points fall by {1 - math.exp(slope * math.log(2)):.1%} per doubling of the tokens, "
                f"which would give {at_budget:.2f}x at 1M tokens if the power law held"
            )
            if at_budget < 1:
                line += " (below dense, so it cannot hold that far: points inside one cosine schedule overstate it)"
        else:
            line += "; one healed point: too few to extrapolate"
        out.append(line)
    return out


def _ranks_label(rec: dict, row: dict) -> str:
    """The rank mode of a row. Records from before --ranks are uniform; sensitivity rows from before the
    allocator could keep a matrix dense (they lack ``dense_slots``) are marked, since their ranks differ."""
    mode = rec.get("ranks", "uniform")
    if mode == "sensitivity" and "dense_slots" not in row:
        return "sensitivity (before the dense option)"
    return mode


def _arm_label(row: dict) -> str:
    """The row's data arm, with what its healing changed from the library defaults (rows per step, what
    trained), so rows that differ only there are told apart."""
    from rankserve.heal import HealConfig

    cfg, d = row["heal"].get("config", {}), HealConfig()
    label = [row["arm"]]
    if row["arm"].startswith("mix") and cfg.get("self_share", 0.5) != 0.5:  # --heal-self-share
        label.append(f"healed on {cfg['self_share']:g} self-generated")
    if (cfg.get("batch", d.batch), cfg.get("seq_len", d.seq_len)) != (d.batch, d.seq_len):
        label.append(f"{cfg['batch']}x{cfg['seq_len']} per step")
    label += [
        f"{name} trained too"
        for key, name in (("train_dense", "dense projections"), ("train_norms", "norms"))
        if cfg.get(key)
    ]
    return ", ".join(label)


def healed_rows(results: str) -> list[dict]:
    """One row per (record, arm): the last measured point, for docs/RESULTS.md and the report."""
    recs = json.load(open(results)) if os.path.exists(results) else []
    out = []
    for r in recs:
        for row in r["rows"]:
            if row["points"]:
                first, last = row["points"][0], row["points"][-1]
                h = row["heal"]
                out.append(
                    {
                        "family": r["family"],
                        "ratio": r["ratio"],
                        "ranks": _ranks_label(r, row),
                        "arm": _arm_label(row),
                        "dense": r["dense"],
                        "compressed": first["ppl_texts"],
                        "healed": last["ppl_texts"],
                        "tokens": last["tokens"],
                        "heal_s": row.get("heal_total_s"),
                        "tokens_per_s": h.get("tokens_per_s"),
                        "load": r.get("load_now", r["load"]),
                        "command": r["command"],
                        "cpu": r["cpu"],
                    }
                )
    return out


def _per_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"  # '-': an arm stopped early has no end-of-run rate


def healed_table(results: str) -> list[str]:
    """Markdown lines: the healed rows (for docs/RESULTS.md, which calls this)."""
    rows = healed_rows(results)
    if not rows:
        return []
    lines = [
        "| family | ratio | ranks | calibration and healing data | healing tokens | compressed | healed | "
        "training tok/s | heal wall s (load avg) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        lines.append(
            f"| {h['family']} | {h['ratio']:g} | {h['ranks']} | {h['arm']} | {h['tokens']:,} | "
            f"{ratio_of(h['compressed'], h['dense'])} | {ratio_of(h['healed'], h['dense'])} | "
            f"{_per_s(h['tokens_per_s'])} | {h['heal_s']:.0f} ({h['load']:.1f}) |"
        )
    return lines


def plot(results: str, path: str) -> None:
    """Perplexity (x dense) against healing tokens, one panel per text, a line per run and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from results_report import finish_panel, save_figure  # benchmarks/results_report.py, next to this file

    recs = json.load(open(results)) if os.path.exists(results) else []
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(6 * len(TEXTS), 4.5), squeeze=False)
    for ax, text in zip(axes[0], TEXTS, strict=True):
        for r in recs:
            for row in r["rows"]:
                pts = [(p["tokens"], p["ppl_texts"][text] / r["dense"][text]) for p in row["points"]]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    label = f"{r['family']} {r['ratio']:g}{_ranks(r)}, {row['arm']}"
                    ax.plot(xs, ys, marker="o", label=label)
        for target, style in ((1.5, "--"), (2.5, ":")):
            ax.axhline(target, color="gray", lw=0.8, ls=style, label=f"#11 target {target}x")
        finish_panel(
            ax,
            "healing tokens",
            "perplexity / dense perplexity (log)",
            f"{text}, first {MAX_WINDOWS} windows of {SEQ_LEN}",
        )
    save_figure(fig, path, "SmolLM2-135M compressed, then healed by distillation")


def report(results: str, out: str) -> None:
    recs = json.load(open(results)) if os.path.exists(results) else []
    lines = [
        "# Healing by distillation: measured",
        "",
        "Generated by `benchmarks/heal_curve.py` from `docs/healing.json`; every figure with its command.",
        f"Perplexity: first {MAX_WINDOWS} windows of {SEQ_LEN} tokens; cells are "
        "`WikiText-2 test / Lee background` perplexity (and x dense). Neither text is used for calibration or "
        "healing. SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32). Wall times and tokens/s are speed "
        "measurements only where the load average shown is near 1 (2 cores). The extrapolations assume the last "
        "two points' power law holds over a longer run of the same kind; a longer schedule changes the learning "
        "rates, and a ratio cannot fall below 1, so read them as optimistic.",
        "",
        "![perplexity vs healing tokens](heal_curve.png)",
        "",
    ]
    for r in recs:
        lines += [f"## {r['experiment']}: {r['family']}{_ranks(r)} at ratio {r['ratio']} ({r['date']})", ""]
        lines += [f"CPU: {r['cpu']}; threads {r['threads']}; `uptime` at start: {r['uptime']}", ""]
        lines += [f"    {r['command']}", ""]
        if r.get("note"):  # what the record's own fields cannot say, e.g. that the run was paused
            lines += [f"Note: {r['note']}", ""]
        d = r["dense"]
        lines.append(f"dense: {ratio_of(d, d)}")
        lines.append("")
        wrote = f"; self-generated rows took {r['generate_s']:.0f} s to write" if r.get("generate_s") else ""
        lines.append(f"calibration: {r['calibration_rows']} tokens of each arm's data{wrote}.")
        if r.get("train_tokens_per_s"):
            speed = ", ".join(f"{k} {v:.0f}" for k, v in r["train_tokens_per_s"].items())
            lines.append(f"training tokens/s over 3 steps of 4x256: {speed}.")
        for row in r["rows"]:
            h, c = row["heal"], row["heal"]["config"]
            state = (
                f"{h['tokens_per_s']:.0f} training tokens/s"
                if h["finished"]
                else f"stopped after {row['points'][-1]['tokens']:,} tokens"
                if row["points"]
                else "no point yet"
            )
            lines += [
                "",
                f"### {row['arm']}: compress {row['compress_s']:.0f} s; healing {_config_line(c)}; {state}, "
                f"{row.get('heal_total_s', 0):.0f} s with evaluations",
                "",
                "| healing tokens | held-back KL | WikiText-2 test / Lee background |",
                "|---|---|---|",
            ]
            for p in row["points"]:
                lines.append(f"| {p['tokens']:,} | {p['kl']:.4f} | {ratio_of(p['ppl_texts'], d)} |")
            lines += ["", *gap(r, row)]
        lines.append("")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    plot(results, os.path.join(os.path.dirname(out), "heal_curve.png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        if args.experiment is None:
            sys.exit("choose an experiment: curve, data or lr (or --report-only)")
        if args.experiment == "lr":
            lrs(args)
            if args.save:  # one checkpoint per lr would be a guess at which one the user wanted
                sys.exit(
                    "heal_curve.py: --save keeps the healed model of `curve` or `data`, not of `lr`; "
                    "rerun `curve --lr X --save DIR` with the lr you chose"
                )
        sys.path.insert(0, REPO)
        from results_report import cpu_model  # benchmarks/results_report.py, next to this file

        require("heal_curve.py", WIKI_TEST, WIKI_VALID)
        if args.save and os.path.exists(args.save):
            sys.exit(f"heal_curve.py: --save {args.save} already exists; choose a new directory")

        from rankserve.loaders.source import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        base = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0],
            "command": "python benchmarks/heal_curve.py " + " ".join(sys.argv[1:]),
            "model": args.model,
        }
        lm = load_model(args.model)
        texts = load_texts()
        run(args, lm, texts, base)
    report(args.results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
