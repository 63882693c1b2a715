"""Measure perplexity on a text file (default: WikiText-2 raw test split) with the SVD papers' protocol."""

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
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")


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
