"""Import a public SVD-compressed checkpoint (SVD-LLM, ASVD, Basis Sharing, u/v) as a rankserve checkpoint.

No code from the checkpoint is run: SVD-LLM pickles are read with a restricted unpickler that refuses to call
anything outside an allowlist, weight files are read as tensors only, and remote code next to an HF export is
never imported. Every tensor is checked against the config; a failed import writes nothing.
"""

from __future__ import annotations

import json
import sys

from rankserve.cli.main import CLIError

FORMATS = ("svd-llm", "asvd", "basis-sharing", "uv", "auto")


def add_arguments(p):
    p.add_argument(
        "format",
        choices=FORMATS,
        metavar="FORMAT",
        help=f"layout of SRC: {', '.join(FORMATS)} (auto detects it)",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint file (.pt for svd-llm) or directory")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="directory with the base model's tokenizer files (needed when SRC carries none)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="stored dtype (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--no-check-finite",
        dest="check_finite",
        action="store_false",
        help="import even if a weight holds NaN or Inf",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def run(args) -> int:
    from rankserve.checkpoint import check_out_dir, read_manifest
    from rankserve.importers import CheckpointImportError
    from rankserve.loaders.convert import import_checkpoint, summary

    check_out_dir(args.out, args.overwrite)  # before reading anything
    try:
        path = import_checkpoint(
            args.format,
            args.src,
            args.out,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            overwrite=args.overwrite,
            check_finite=args.check_finite,
        )
    except CheckpointImportError as e:
        raise CLIError(" ".join(str(e).split("\n"))) from None
    manifest = read_manifest(path)
    s = summary(manifest)
    if args.json:
        print(json.dumps({"checkpoint": path, **s}))
        return 0
    k = s["projections"]
    ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.4f}"
    print(f"imported {args.src} ({s['family']}) -> {path}")
    print(
        f"  projections: {k['lowrank']} low-rank, {k['shared']} shared-basis "
        f"({s['shared_bases']} shared bases), {k['dense']} dense"
    )
    if s["rank_min"] is not None:
        print(f"  ranks: min {s['rank_min']}, median {s['rank_median']:g}, max {s['rank_max']}")
    print(
        f"  decoder projection params: {_fmt_int(s['params_linear_dense'])} dense -> "
        f"{_fmt_int(s['params_linear'])} stored ({s['dtype']})"
    )
    print(f"  ratio {ratio} ({s['ratio_convention']})")
    for note in manifest.get("provenance", {}).get("notes", []):
        print(f"  note: {note}")
    sys.stdout.flush()
    return 0
