"""Serve a model over an OpenAI-compatible HTTP API with continuous batching."""

from __future__ import annotations

import logging
import math
import os
import socket
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
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="requests that may wait for a batch row; beyond them the server answers 503 + Retry-After "
        "(default 64)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body accepted; larger ones get 413 (default 1 MiB)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="seconds SIGTERM/SIGINT lets running and queued requests finish before ending them with "
        "finish_reason 'abort' (default 20)",
    )


def served_names(model: str) -> tuple[str, list[str]]:
    """The id clients use (the argument's basename) and the other names accepted for it."""
    base = os.path.basename(os.path.normpath(model))
    stem = base[: -len(".gguf")] if base.endswith(".gguf") else base
    return base, sorted({model, stem} - {base})


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise CLIError(
            f"serving needs the optional [serve] extra ({e.name} is not installed): pip install 'rankserve[serve]' "
            "(from a clone: pip install -e '.[serve]')"
        ) from None

    from rankserve.loaders.source import load_model
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.server.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, create_app, serve

    if args.max_batch < 1:
        raise CLIError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_context is not None and args.max_context < 2:
        raise CLIError(f"--max-context must be >= 2, got {args.max_context}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    max_queue = DEFAULT_MAX_QUEUE if args.max_queue is None else args.max_queue
    max_body_bytes = DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
    if max_queue < 0:
        raise CLIError(f"--max-queue must be >= 0, got {args.max_queue}")
    if max_body_bytes < 1:
        raise CLIError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise CLIError(
            f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}"
        )
    apply_threads(args.threads)
    options = RuntimeOptions(backend=args.backend).validate()
    model_id, aliases = served_names(args.model)

    def load():
        lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
        return lm.model, lm.tokenizer

    # Bind first (a taken port fails in a second, not after the load), load next (a bad model fails the
    # process with one line), and only then listen: nobody ever reaches a server without a model.
    sock = bind(args.host, args.port)
    with sock:
        app = create_app(
            load,
            model_id,
            aliases,
            args.max_batch,
            args.max_context,
            options,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            load_now=True,
        )
        logging.getLogger("rankserve").setLevel(logging.INFO)
        host, port = sock.getsockname()[:2]
        print(f"rankserve serve: http://{host}:{port} as '{model_id}'", file=sys.stderr, flush=True)
        serve(app, sock, args.shutdown_timeout)
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; CLIError naming the problem otherwise."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT sockets
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CLIError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or --host)"
        ) from None
    return sock
