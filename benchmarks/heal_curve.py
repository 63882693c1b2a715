"""docs/HEALING.md: perplexity of SmolLM2-135M compressed by SVD-LLM, then healed by distillation.

Perplexity uses the SVD papers' protocol (``rankserve.eval.perplexity``: non-overlapping windows of 512 tokens,
the first 8) on two texts that are never used for calibration or healing: WikiText-2 raw test, and the Lee
background corpus (ABC news prose; ``gensim/test/test_data/lee_background.cor`` in the gensim==4.4.0 wheel).

Experiments (each appends its record to ``--results`` as it finishes; ``--report-only`` rewrites the report):

* ``curve``: compress at ``--ratio`` with self-generated calibration, then heal (``rankserve.heal.heal_`` with
  its defaults unless given) and score both texts at every ``--eval-tokens`` step of the run. Before healing,
  a few steps with fp32 and with bf16 autocast give each one's training tokens/s on this CPU.
* ``calib``: compress at ``--ratio`` calibrated on self-generated text, on WikiText-2 validation, and on half of
  each; score both texts, then after a short heal.

    python benchmarks/heal_curve.py curve --ratio 0.2 --tokens 131072 --eval-tokens 32768
    python benchmarks/heal_curve.py calib --ratio 0.2 --tokens 16384
    python benchmarks/heal_curve.py --report-only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext2")
TEXTS = {
    "wikitext2-test": os.path.join(WIKI, "test.txt"),
    "lee-background": "/work/corpora/lee_background.txt",
}
CALIB_TEXT = os.path.join(WIKI, "valid.tokens.txt")
SEQ_LEN, MAX_WINDOWS = 512, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", choices=["curve", "calib"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of linear-layer parameters REMOVED")
    p.add_argument("--tokens", type=int, default=131072, help="healing tokens")
    p.add_argument("--eval-tokens", type=int, default=32768, help="score the texts every N healing tokens")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="healing rows' length")
    p.add_argument("--pool-tokens", type=int, default=None, help="distinct self-generated healing tokens")
    p.add_argument("--calib-data", default=None, help="calibration text file (default: self-generated)")
    p.add_argument(
        "--heal-data", action="append", default=[], help="healing text file (repeatable; see --self-share)"
    )
    p.add_argument("--self-share", type=float, default=None, help="self-generated share of the healing pool")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=os.path.join(REPO, "docs", "healing.json"))
    p.add_argument("--report", default=os.path.join(REPO, "docs", "HEALING.md"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def load_texts() -> dict[str, str]:
    out = {}
    for name, path in TEXTS.items():
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


def compress(lm, ratio: float, calib):
    from rankserve.compress import compress_
    from rankserve.families import config_class

    model = copy.deepcopy(lm.model)
    compress_(model, config_class("svd-llm")(ratio=ratio), calib, progress=False)
    return model


def heal_config(args, **over):
    from rankserve.heal import HealConfig

    fields = {"tokens": args.tokens}
    if args.lr is not None:
        fields["lr"] = args.lr
    if args.seq_len is not None:
        fields["seq_len"] = args.seq_len
    if args.pool_tokens is not None:
        fields["pool_tokens"] = args.pool_tokens
    if args.heal_data:
        fields["data"] = args.heal_data
        fields["self_share"] = 0.5 if args.self_share is None else args.self_share
    fields.update(over)
    return HealConfig(**fields).validate()


def run_curve(args, lm, texts, base) -> None:
    from rankserve.calibration import make_calibration
    from rankserve.heal import heal_

    t0 = time.perf_counter()
    calib = make_calibration(
        args.calib_data, lm.model, lm.tokenizer, args.calib_samples, args.calib_seq_len, 0
    )
    student = compress(lm, args.ratio, calib)
    compress_s = time.perf_counter() - t0
    dense = score(lm.model, lm.tokenizer, texts)
    speed = {}
    for amp in ("fp32", "bf16"):  # a few steps each: training tokens/s with and without autocast
        probe = copy.deepcopy(student)
        cfg = heal_config(args, tokens=3 * 4 * 256, seq_len=256, pool_tokens=1024, eval_rows=1, autocast=amp)
        speed[amp] = heal_(probe, lm.model, lm.tokenizer, cfg, progress=False).tokens_per_s
        del probe
    cfg = heal_config(args, eval_every=max(args.eval_tokens // (4 * (args.seq_len or 256)), 1))
    rec = {
        **base,
        "experiment": "curve",
        "ratio": args.ratio,
        "calibration": f"{args.calib_data or 'self-generated'} {args.calib_samples}x{args.calib_seq_len}",
        "compress_s": round(compress_s, 1),
        "dense": dense,
        "train_tokens_per_s": speed,
        "points": [],
        "heal": {"config": cfg.to_dict(), "finished": False},
    }

    def on_eval(pt):  # the record is rewritten at every point, so a stopped run keeps its curve
        rec["points"].append({**pt, "ppl_texts": score(student, lm.tokenizer, texts)})
        rec["heal_total_s"] = round(time.perf_counter() - t1, 1)
        append(args.results, rec)
        print(json.dumps(rec["points"][-1]), file=sys.stderr, flush=True)

    t1 = time.perf_counter()
    report = heal_(student, lm.model, lm.tokenizer, cfg, progress=True, on_eval=on_eval)
    rec["heal"] = {**{k: v for k, v in report.to_dict().items() if k != "curve"}, "finished": True}
    rec["heal_total_s"] = round(time.perf_counter() - t1, 1)
    append(args.results, rec)


def run_calib(args, lm, texts, base) -> None:
    from rankserve.calibration import Calibration, make_calibration
    from rankserve.heal import heal_

    n, L = args.calib_samples, args.calib_seq_len
    own = make_calibration(None, lm.model, lm.tokenizer, n, L, 0)
    wiki = make_calibration(CALIB_TEXT, lm.model, lm.tokenizer, n, L, 0)
    half = n // 2
    mix = Calibration(torch.cat([own.tokens[:half], wiki.tokens[: n - half]]), "mix", 0)
    dense = score(lm.model, lm.tokenizer, texts)
    rows = []
    for name, calib in (("self-generated", own), ("wikitext-valid", wiki), ("mix", mix)):
        student = compress(lm, args.ratio, calib)
        row = {"calibration": name, "compressed": score(student, lm.tokenizer, texts)}
        r = heal_(student, lm.model, lm.tokenizer, heal_config(args), progress=True)
        row.update(healed=score(student, lm.tokenizer, texts), heal_tokens=r.tokens, final_kl=r.final_kl)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del student
    append(
        args.results,
        {
            **base,
            "experiment": "calib",
            "ratio": args.ratio,
            "samples": f"{n}x{L}",
            "dense": dense,
            "rows": rows,
        },
    )


def _pool(c: dict) -> str:
    files = ", ".join(os.path.basename(p) for p in c["data"])
    if not c["data"]:
        return "self-generated"
    return f"{c['self_share']:g} self-generated, the rest from {files}"


def ratio_of(ppl: dict, dense: dict) -> str:
    return " / ".join(f"{ppl[k]:.1f} ({ppl[k] / dense[k]:.2f}x)" for k in TEXTS)


def report(results: str, out: str) -> None:
    recs = json.load(open(results)) if os.path.exists(results) else []
    lines = [
        "# Healing by distillation: measured",
        "",
        "Generated by `benchmarks/heal_curve.py` from `docs/healing.json`; every figure with its command.",
        f"Perplexity: first {MAX_WINDOWS} windows of {SEQ_LEN} tokens; cells are "
        "`WikiText-2 test / Lee background` perplexity (and × dense). Neither text is used for calibration or",
        "healing. SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32).",
        "",
    ]
    for r in recs:
        lines += [f"## {r['experiment']} at ratio {r['ratio']} ({r['date']})", ""]
        lines += [f"CPU: {r['cpu']}; threads {r['threads']}; load average at start {r['load']}", ""]
        lines += [f"    {r['command']}", ""]
        d = r["dense"]
        lines.append(f"dense: {ratio_of(d, d)}")
        lines.append("")
        if r["experiment"] == "curve":
            h, c = r["heal"], r["heal"]["config"]
            lines.append(
                f"compression ({r['calibration']} calibration): {r['compress_s']:.0f} s. Training tokens/s "
                f"over 3 steps of 4x256: fp32 {r['train_tokens_per_s']['fp32']:.0f}, "
                f"bf16 autocast {r['train_tokens_per_s']['bf16']:.0f}."
            )
            lines.append(
                f"healing: {c['tokens']:,} tokens planned, lr {c['lr']:g} {c['schedule']} (warm-up "
                f"{c['warmup']:g} of the steps), {c['batch']}x{c['seq_len']} tokens per step, "
                f"{'factors and norms' if c['train_norms'] else 'factors only'}, autocast {c['autocast']}, "
                f"pool of {c['pool_tokens']:,} tokens ({_pool(c)}); "
                + (
                    f"{h['tokens_per_s']:.0f} training tokens/s, {r['heal_total_s']:.0f} s in all "
                    "(data generation and evaluations included)."
                    if h["finished"]
                    else f"STOPPED after {r['points'][-1]['tokens']:,} tokens ({r['heal_total_s']:.0f} s)."
                )
            )
            lines += [
                "",
                "| healing tokens | held-back KL | WikiText-2 test / Lee background |",
                "|---|---|---|",
            ]
            for p in r["points"]:
                lines.append(f"| {p['tokens']:,} | {p['kl']:.4f} | {ratio_of(p['ppl_texts'], d)} |")
        else:
            lines += ["| calibration | compressed | after healing |", "|---|---|---|"]
            for row in r["rows"]:
                lines.append(
                    f"| {row['calibration']} ({r['samples']}) | {ratio_of(row['compressed'], d)} | "
                    f"{ratio_of(row['healed'], d)} ({row['heal_tokens']:,} tokens) |"
                )
        lines.append("")
    with open(out, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        if args.experiment is None:
            sys.exit("choose an experiment: curve or calib (or --report-only)")
        sys.path.insert(0, REPO)
        from rankserve.loaders.source import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        base = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0],
            "command": "python benchmarks/heal_curve.py " + " ".join(sys.argv[1:]),
            "model": args.model,
        }
        lm = load_model(args.model)
        texts = load_texts()
        (run_curve if args.experiment == "curve" else run_calib)(args, lm, texts, base)
    report(args.results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
