"""Serve a model over an OpenAI-compatible HTTP API with continuous batching."""

from __future__ import annotations

import logging
import os
import sys

from rankserve.cli.main import CLIError, apply_threads, common_model_args


def add_arguments(p):
    common_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="KV slots per request: prompt + max_tokens (default: the model's context, at most 1024)",
    )
    p.add_argument("--backend", default="eager", choices=["eager", "fast"], help="execution path")


def served_names(model: str) -> tuple[str, list[str]]:
    """The id clients use (the argument's basename) and the other names accepted for it."""
    base = os.path.basename(os.path.normpath(model))
    stem = base[: -len(".gguf")] if base.endswith(".gguf") else base
    return base, sorted({model, stem} - {base})


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise CLIError(
            f"serving needs the optional [serve] extra ({e.name} is not installed): pip install 'rankserve[serve]' "
            "(from a clone: pip install -e '.[serve]')"
        ) from None

    from rankserve.loaders.source import load_model
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.server.app import create_app

    if args.max_batch < 1:
        raise CLIError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_context is not None and args.max_context < 2:
        raise CLIError(f"--max-context must be >= 2, got {args.max_context}")
    apply_threads(args.threads)
    options = RuntimeOptions(backend=args.backend).validate()
    model_id, aliases = served_names(args.model)

    def load():
        lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
        return lm.model, lm.tokenizer

    app = create_app(load, model_id, aliases, args.max_batch, args.max_context, options)
    logging.getLogger("rankserve").setLevel(logging.INFO)
    print(
        f"rankserve serve: http://{args.host}:{args.port} as '{model_id}' (loading in the background; "
        f"/health turns 200 when ready)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
