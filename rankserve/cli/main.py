"""``rankserve``: dispatch to one module per subcommand; turn bad input into one line on stderr (exit 2).

Bad input is :class:`~rankserve.errors.InputError` (a bad argument, file content, config or request) and the
OS errors that mean a bad path. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rankserve.errors import InputError

# The errors that mean the user's input is wrong, not the program: a file that is missing, unreadable, a
# directory where a file was expected (or the reverse), or already there.
BAD_INPUT = (
    InputError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

SUBCOMMANDS = [
    "generate",
    "inspect",
    "demo",
    "eval",
    "compress",
    "quantize",
    "heal",
    "bench",
    "serve",
    "import",
]


class CLIError(InputError):
    """A bad command line: printed as one line, exit code 2."""


def common_model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument(
            "model", help="model directory, .gguf file, rankserve checkpoint or alias (smollm2-135m)"
        )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="working dtype (default fp32)")
    if model:
        p.add_argument(
            "--no-check-finite",
            dest="check_finite",
            action="store_false",
            help="load the model even if a weight holds NaN or Inf",
        )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")


def apply_threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise CLIError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _module_name(cmd: str) -> str:
    return f"rankserve.cli.{'import_' if cmd == 'import' else cmd}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankserve", description="Compress LLMs with SVD families; serve them fast."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in SUBCOMMANDS:
        mod = importlib.import_module(_module_name(cmd))  # a missing module is a broken install: fail loudly
        p = sub.add_parser(cmd, help=mod.__doc__.strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_libraries(args.verbose)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("rankserve: interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT as e:
        if args.debug:
            raise
        print(f"rankserve {args.command}: error: {e}", file=sys.stderr)
        return 2


def _quiet_libraries(verbose: bool) -> None:
    """transformers logs progress bars and deprecation notes while loading GGUF tokenizers; the CLI owns stderr.

    Only the HF libraries' own warnings and deprecation notices (addressed to developers, not users) are
    silenced; any other warning, rankserve's and torch's included, still shows.
    """
    import os
    import warnings

    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|tokenizers|gguf)(\.|$)")
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


if __name__ == "__main__":
    sys.exit(main())
