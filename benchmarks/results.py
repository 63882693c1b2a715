"""The RESULTS tables: perplexity of SmolLM2-135M, dense and compressed by every family and rank allocator.

Each row compresses a fresh copy of the dense model in memory (``compress_``) and measures perplexity with
``rankserve.eval.perplexity`` (non-overlapping windows of ``--seq-len`` tokens, the first ``--max-windows`` of
them) on the raw WikiText-2 test split and on an out-of-domain corpus (``--ood-data``; by default the Lee
background corpus, fetched by ``benchmarks/corpora.py``; ``none`` skips it). Calibration windows come from the
tokenized WikiText-2 VALIDATION split, read by path; neither evaluation text is ever used for calibration.
Rows are cached in ``--cache`` as they finish, keyed by row and protocol (seq-len x windows), so a run can be
stopped and resumed and two protocols live side by side; ``--report-only`` rewrites ``docs/RESULTS.md`` and
``docs/ppl_vs_ratio.png`` from the cache.

    nice -n 10 python benchmarks/results.py --threads 1 --max-windows 8
    nice -n 5 python benchmarks/results.py --threads 2 --seq-len 512 --max-windows 8 \
        --families svd-llm,basis-sharing --ratios 0.2,0.4 --ranks uniform,adaptive,sensitivity
    python benchmarks/results.py --report-only

``ratio`` is the fraction of decoder linear-layer parameters REMOVED (SVD-LLM convention: 0.4 keeps 60%).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch
from corpora import WIKI_TEST, WIKI_VALID, require  # noqa: E402  benchmarks/corpora.py, next to this file
from results_report import (  # noqa: E402
    FAMILIES,
    MODES,
    RATIOS,
    cpu_model,
    row_key,
    write_report,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated, fraction REMOVED")
    p.add_argument("--ranks", default=",".join(MODES), help="uniform,adaptive or one of them")
    p.add_argument("--calib-data", default=WIKI_VALID)
    p.add_argument("--test-data", default=WIKI_TEST)
    p.add_argument(
        "--ood-data",
        default=None,
        help="out-of-domain text (default: the Lee background corpus via benchmarks/corpora.py; 'none' skips)",
    )
    p.add_argument("--sensitivity-samples", type=int, default=4, help="ranks=sensitivity: gradient samples")
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
    p.add_argument(
        "--healing",
        default=os.path.join(REPO, "docs", "healing.json"),
        help="healed rows measured by benchmarks/heal_curve.py (their own protocol: 8 windows of 512)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="show progress bars (stderr)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the docs from the cache")
    p.add_argument(
        "--no-dense", action="store_true", help="skip the dense row (e.g. another run measures it)"
    )
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        help="another cache file (e.g. of a run in parallel): its rows that --cache lacks are added first",
    )
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


def plan(args) -> list[tuple[str, float, str]]:
    """Rows in the order they run: dense first, then the middle ratio, so a partial run is already useful."""
    fams = [f for f in args.families.split(",") if f]
    ratios = sorted((float(r) for r in args.ratios.split(",") if r), key=lambda r: (r != 0.4, r))
    modes = [m for m in args.ranks.split(",") if m]
    bad = [f for f in fams if f not in FAMILIES] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"results.py: unknown family or rank mode: {', '.join(bad)}")
    dense = [] if getattr(args, "no_dense", False) else [("dense", 0.0, "-")]
    return dense + [(f, r, m) for r in ratios for f in fams for m in modes]


def ood_path(args) -> str | None:
    """The out-of-domain text: ``--ood-data`` as given, none, or the Lee corpus fetched into the cache."""
    if args.ood_data == "none":
        return None
    if args.ood_data:
        return args.ood_data
    from corpora import fetch  # benchmarks/corpora.py, next to this file

    return fetch()


def _done(row: dict | None, st: dict, ood: dict | None) -> bool:
    """A cached row counts when its settings match and, if an OOD corpus is asked for, it measured that one."""
    if not row or row.get("settings") != st:
        return False
    return ood is None or (row.get("ood") or {}).get("sha256") == ood["sha256"]


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
    path = ood_path(args)
    ood = None if path is None else {"file": os.path.basename(path), "sha256": file_sha256(path)}
    rows = cache.setdefault("rows", {})

    def key(r: tuple[str, float, str]) -> str:
        return row_key(*r, args.seq_len, args.max_windows)

    todo = [r for r in plan(args) if not _done(rows.get(key(r)), st, ood)]
    if not todo:
        print("every requested row is cached", flush=True)
        return
    lm = load_model(args.model)
    dense = lm.model
    texts = {}
    with open(args.test_data, encoding="utf-8") as f:
        texts["wikitext"] = f.read()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            texts["ood"] = f.read()
    t0 = time.perf_counter()
    calib = text_calibration(args.calib_data, lm.tokenizer, args.calib_samples, args.calib_seq_len, args.seed)
    calib_s = time.perf_counter() - t0
    for family, ratio, mode in todo:
        k = key((family, ratio, mode))
        if _done(rows.get(k), st, ood):
            continue  # filled meanwhile (an adaptive row reused its uniform twin)
        print(f"[{datetime.datetime.now():%H:%M:%S}] {k} ...", flush=True)
        row = {
            "family": family,
            "ratio": ratio,
            "ranks": mode,
            "settings": st,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
        }
        if family == "dense":
            model = dense
        else:
            fields = {"ratio": ratio, "ranks": mode}
            if mode == "sensitivity":
                fields["sensitivity_samples"] = args.sensitivity_samples
            cfg = config_class(family)(**fields)
            if mode == "adaptive" and not type(cfg).supports_adaptive:
                twin = key((family, ratio, "uniform"))
                if _done(rows.get(twin), st, ood):
                    rows[k] = {**rows[twin], "ranks": mode, "reused": twin}
                    rows[k]["notes"] = rows[twin].get("notes", []) + [
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
                allocation=rep.allocation,
            )
        for corpus, text in texts.items():
            t1 = time.perf_counter()
            ppl = perplexity(
                model,
                lm.tokenizer,
                text,
                seq_len=args.seq_len,
                max_windows=args.max_windows,
                progress=args.progress,
            )
            measured = {
                "perplexity": ppl["perplexity"],
                "nll": ppl["nll"],
                "windows": ppl["windows"],
                "tokens": ppl["tokens"],
                "eval_s": time.perf_counter() - t1,
            }
            if corpus == "wikitext":
                row.update(measured)
            else:
                row["ood"] = {**ood, **measured}
        row["finished"] = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
        rows[k] = row
        save_cache(args.cache, cache)
        print(
            f"    ppl {row['perplexity']:.3f}"
            + (f", ood ppl {row['ood']['perplexity']:.3f}" if "ood" in row else "")
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
    """min/median/max rank per projection kind over its factorized slots, then how many slots stay dense."""
    from rankserve.compress import factorized_ranks

    out: dict[str, list[int]] = {}
    for kind, slots in rep.slots_by_kind().items():
        ranks, dense = factorized_ranks(slots)
        spread = [ranks[0], ranks[len(ranks) // 2], ranks[-1]] if ranks else []
        out[kind] = [*spread, dense]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    require("results.py", args.test_data, args.calib_data)
    if args.max_windows is not None and args.max_windows < 1:
        args.max_windows = None
    cache = load_cache(args.cache)
    for other in args.merge:
        rows = cache.setdefault("rows", {})
        added = {k: r for k, r in load_cache(other).get("rows", {}).items() if k not in rows}
        rows.update(added)
        save_cache(args.cache, cache)
        print(f"merged {len(added)} rows from {other}", flush=True)
    if not args.report_only:
        run_rows(args, cache)
    write_report(args, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
