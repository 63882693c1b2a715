"""The TASKS table: zero-shot task accuracy of rankserve models through lm-evaluation-harness.

Runs each task over each model with rankserve's lm-eval model (``rankserve.lm_eval_model``) and writes
``docs/TASKS.md``. The default task, ``rankserve_easy_mc`` in ``benchmarks/tasks/``, is a local, hand-written
multiple-choice set that runs offline; any lm-eval task name works where its data can be had.

    nice -n 10 python benchmarks/tasks.py --models smollm2-135m,/tmp/lmeval-svdllm02 --hf smollm2-135m
    python benchmarks/tasks.py --models "dense=smollm2-135m,SVD-LLM 0.2 healed=/tmp/healed"   # LABEL=MODEL

A model given as ``LABEL=MODEL`` is listed under LABEL (the table's rows otherwise name the path).

``benchmarks/results.py`` can add task columns through :func:`task_rows` (one row per model and task).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_report import cpu_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(REPO, "benchmarks", "tasks")


def task_rows(
    models: list[str],
    tasks: list[str],
    include_path: str | None = TASKS_DIR,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "fp32",
) -> list[dict]:
    """One dict per (model, task): ``model``, ``task``, ``metrics``, ``stderr``, ``samples``."""
    from rankserve.lm_eval_model import RankserveLM
    from rankserve.loaders.source import load_model
    from rankserve.tasks import evaluate_tasks, load_tasks

    rows = []
    for spec in models:
        label, name = split_label(spec)
        lm = RankserveLM(loaded=load_model(name, dtype=dtype), batch_size=batch_size)
        for r in evaluate_tasks(lm, load_tasks(tasks, include_path), limit):
            rows.append({"model": label, "path": name, **r})
        del lm
    return rows


def split_label(spec: str) -> tuple[str, str]:
    """``"LABEL=MODEL"`` -> (LABEL, MODEL); a bare model is its own label."""
    label, sep, name = spec.partition("=")
    return (label.strip(), name.strip()) if sep else (spec, spec)


def hf_rows(
    models: list[str], tasks: list[str], include_path: str | None = TASKS_DIR, limit: int | None = None
) -> list[dict]:
    """The same rows from lm-eval's own ``hf`` model (transformers) on the same weights: the reference that
    rankserve's rows must equal. Takes HF directories, GGUF files and aliases (not factorized checkpoints)."""
    import lm_eval

    from rankserve.loaders.source import resolve
    from rankserve.tasks import evaluate_tasks, load_tasks

    rows = []
    for spec in models:
        label, name = split_label(spec)
        kind, path = resolve(name)
        if kind == "rankserve":
            raise ValueError(f"{name}: lm-eval's hf model cannot load a factorized rankserve checkpoint")
        args = {"pretrained": path, "dtype": "float32"}
        if kind == "gguf":  # transformers dequantizes the GGUF, as rankserve's loader does
            args = {
                "pretrained": os.path.dirname(path),
                "gguf_file": os.path.basename(path),
                "dtype": "float32",
            }
        lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
            args, {"batch_size": 8, "device": "cpu"}
        )
        for r in evaluate_tasks(lm, load_tasks(tasks, include_path), limit):
            rows.append({"model": f"{label} (lm-eval hf)", "path": name, **r})
        del lm
    return rows


def markdown(rows: list[dict], note: str = "") -> str:
    metrics = sorted({m for r in rows for m in r["metrics"]})
    head = "| model | task | n | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            v, e = r["metrics"].get(m), r["stderr"].get(m)
            cells.append("-" if v is None else f"{v:.4f}" + ("" if e is None else f" ± {e:.4f}"))
        lines.append(f"| {r['model']} | {r['task']} | {r['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m", help="comma list: aliases, directories, checkpoints")
    p.add_argument("--tasks", default="rankserve_easy_mc", help="comma list of lm-eval task names")
    p.add_argument("--include-path", default=TASKS_DIR, help="folder of local task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hf", default="", help="comma list of models to score with lm-eval's own hf model too")
    p.add_argument("--md", default=os.path.join(REPO, "docs", "TASKS.md"))
    p.add_argument(
        "--json", default=os.path.join(REPO, "docs", "tasks.json"), help="the rows, for other tools"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unlabeled = [m for m in models if not split_label(m)[1]]
    if unlabeled:
        p.error(f"--models: {', '.join(unlabeled)} names no model after '='")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    import rankserve.lm_eval_model  # noqa: F401  (registers `rankserve`; keeps lm-eval's `hf`)

    rows = task_rows(models, tasks, args.include_path, args.limit, args.batch_size, args.dtype)
    hf = [m.strip() for m in args.hf.split(",") if m.strip()]
    rows += hf_rows(hf, tasks, args.include_path, args.limit)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"Zero-shot, `{args.dtype}`, lm-eval `acc` / `acc_norm` ± standard error; made by `python "
        f"benchmarks/tasks.py --models {shlex.quote(args.models)} --tasks {shlex.quote(args.tasks)}"
        f"{' --hf ' + shlex.quote(args.hf) if hf else ''}` on {stamp}. "
        "Rows marked `(lm-eval hf)` come from lm-eval's own transformers model on the same weights. "
        f"CPU: {cpu_model()}, {torch.get_num_threads()} threads."
    )
    with open(args.md, "w", encoding="utf-8") as f:
        f.write("# Task accuracy (lm-evaluation-harness)\n\n" + markdown(rows, note))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print(markdown(rows), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
