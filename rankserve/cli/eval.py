"""Measure perplexity on a text file (default: WikiText-2 raw test split) with the SVD papers' protocol,
or zero-shot task accuracy through lm-evaluation-harness with --tasks."""

from __future__ import annotations

import json
import os

from rankserve.cli.main import CLIError, apply_threads, common_model_args


def add_arguments(p):
    common_model_args(p)
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="text file to score (default: WikiText-2 raw test through the `datasets` package)",
    )
    p.add_argument(
        "--seq-len", type=int, default=2048, help="tokens per window (default 2048, as the papers)"
    )
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default 1); with --tasks, questions per forward pass (default 8)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    tasks = p.add_argument_group("task accuracy (lm-evaluation-harness, the [eval] extra)")
    tasks.add_argument(
        "--tasks", default=None, metavar="T1,T2", help="comma list of lm-eval tasks, scored zero-shot"
    )
    tasks.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    tasks.add_argument(
        "--include-path", default=None, metavar="DIR", help="folder of local task YAMLs (and their data)"
    )
    tasks.add_argument(
        "--backend", default="eager", choices=["eager", "fast"], help="execution path of generative tasks"
    )


def read_text(path: str | None) -> tuple[str, str]:
    """(text, description) from a file, or WikiText-2 raw test from the `datasets` hub."""
    if path is not None:
        if not os.path.isfile(path):
            raise CLIError(f"--data {path}: no such file")
        # Universal newlines: a CRLF copy of a file scores the same as the LF original.
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    try:
        import datasets
    except ImportError:
        raise CLIError(
            "no --data given and the `datasets` package is not installed; pass --data PATH (a text file)"
        ) from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:  # offline, hub errors: the fix is the same either way
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIError(f"cannot load wikitext-2-raw-v1 ({reason}); pass --data PATH (a text file)") from None
    return "\n\n".join(rows), "wikitext-2-raw-v1 test"  # joined as the SVD-LLM / GPTQ scripts do


def run(args) -> int:
    if args.tasks is not None:
        return run_tasks(args)
    for flag in ("limit", "include_path"):
        if getattr(args, flag) is not None:
            raise CLIError(f"--{flag.replace('_', '-')} goes with --tasks")
    if args.batch_size is None:
        args.batch_size = 1
    from rankserve.eval import perplexity
    from rankserve.loaders.source import load_model

    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    if args.max_windows is not None and args.max_windows < 1:
        raise CLIError(f"--max-windows must be >= 1, got {args.max_windows}")
    text, data = read_text(args.data)  # before loading the model: a bad path fails fast
    apply_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
    r = perplexity(
        lm.model,
        lm.tokenizer,
        text,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "perplexity": r["perplexity"],
                    "windows": r["windows"],
                    "tokens": r["tokens"],
                    "seq_len": r["seq_len"],
                    "model": args.model,
                    "nll": r["nll"],
                    "text_tokens": r["text_tokens"],
                    "data": data,
                    "dtype": args.dtype,
                },
                allow_nan=False,  # NaN is not JSON; perplexity() raises on a non-finite loss instead
            )
        )
    else:
        print(
            f"perplexity {r['perplexity']:.4f}  ({r['windows']} windows of {r['seq_len']} tokens, "
            f"{r['tokens']:,} tokens scored; {args.model} in {args.dtype} on {data})"
        )
    return 0


def run_tasks(args) -> int:
    """``--tasks``: zero-shot accuracy through lm-evaluation-harness; a table, or one JSON object per task."""
    from rankserve.tasks import require_lm_eval

    if args.data is not None:
        raise CLIError("pass either --data (perplexity) or --tasks (task accuracy), not both")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise CLIError("--tasks needs at least one task name")
    if args.max_windows is not None:
        raise CLIError("--max-windows goes with --data, not --tasks")
    if args.batch_size is None:
        args.batch_size = 8
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    require_lm_eval()  # before loading the model: a missing extra fails fast
    from rankserve.lm_eval_model import RankserveLM
    from rankserve.loaders.source import load_model
    from rankserve.tasks import evaluate_tasks, load_tasks

    tasks = load_tasks(names, args.include_path)  # a bad task or missing data fails before the model loads
    apply_threads(args.threads)
    lm = RankserveLM(
        loaded=load_model(args.model, dtype=args.dtype),
        backend=args.backend,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    rows = evaluate_tasks(lm, tasks, args.limit)
    if args.json:
        for r in rows:
            print(json.dumps({**r, "model": args.model, "dtype": args.dtype}))
        return 0
    print(f"{'task':24s} {'metric':16s} {'value':>8s} {'stderr':>8s} {'n':>6s}")
    for r in rows:
        for name, value in r["metrics"].items():
            err = r["stderr"].get(name)
            print(
                f"{r['task']:24s} {name:16s} {value:8.4f} {'-' if err is None else f'{err:.4f}':>8s} "
                f"{r['samples'] if r['samples'] is not None else '-':>6}"
            )
    print(f"({args.model} in {args.dtype}, zero-shot)")
    return 0
