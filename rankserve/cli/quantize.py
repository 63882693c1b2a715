"""Quantize a model's weights to int8 and write a rankserve checkpoint (any source: dense, compressed, healed)."""

from __future__ import annotations

import argparse
import json

from rankserve.cli.main import CLIError, apply_threads, common_model_args


def _group(text: str) -> int | str:
    return text if text == "channel" else int(text)


def add_quant_arguments(p, prefix: str = "") -> None:
    """The int8 flags (``compress`` adds them with ``prefix`` "quant-": ``--quant-group-size``, ...). Each
    defaults to None, meaning the default of ``Int8Config``, so there is one place for the defaults."""
    p.add_argument(
        f"--{prefix}group-size",
        type=int,
        default=None,
        help="int8: one scale per this many input columns (default: one per output channel)",
    )
    p.add_argument(
        f"--{prefix}factor-group-size",
        type=_group,
        default=None,
        metavar="N|channel",
        help="int8: one scale per N input columns for the first factor of a low-rank or shared-basis projection "
        "(V, the shared basis; default 16); 'channel': as --group-size",
    )
    p.add_argument(
        f"--{prefix}smooth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8: fold per-column scales into the RMSNorm weights before rounding, so that low-rank first "
        "factors keep their precision with one scale per row (default: no)",
    )
    p.add_argument(
        f"--{prefix}lm-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8: quantize the LM head too (default: yes)",
    )


_FIELDS = ("group_size", "factor_group_size", "smooth", "lm_head")  # Int8Config fields, one flag each


def _given(args, prefix: str) -> dict:
    """Int8Config field -> value of every int8 flag set on the command line."""
    attr = prefix.replace("-", "_")
    return {n: getattr(args, f"{attr}{n}") for n in _FIELDS if getattr(args, f"{attr}{n}") is not None}


def quant_flags_given(args, prefix: str = "") -> list[str]:
    """The int8 flags set on the command line (to refuse them without a quantization)."""
    return [f"--{prefix}{n.replace('_', '-')}" for n in _given(args, prefix)]


def quant_config(args, prefix: str = ""):
    """The Int8Config of the flags (``prefix`` as in :func:`add_quant_arguments`), validated."""
    from rankserve.quantize import Int8Config

    given = _given(args, prefix)
    if given.get("factor_group_size") == "channel":
        given["factor_group_size"] = None
    return Int8Config(**given).validate()


def add_arguments(p):
    common_model_args(p)
    p.add_argument(
        "--int8", action="store_true", help="symmetric int8 weights with fp32 scales (the only format)"
    )
    add_quant_arguments(p)
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args) -> int:
    if not args.int8:
        raise CLIError("choose the format: --int8 (symmetric int8 weights, the only one so far)")
    cfg = quant_config(args)  # bad flags fail before anything is loaded or written
    from rankserve.checkpoint import build_manifest, check_out_dir, with_quantization
    from rankserve.loaders.source import load_model
    from rankserve.quantize import quantize_

    check_out_dir(args.out, args.overwrite)
    apply_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
    if "quantization" in lm.manifest:
        raise CLIError(f"{args.model} already holds int8 weights; quantize the float checkpoint it came from")
    report = quantize_(lm.model, cfg)
    # A rankserve checkpoint keeps its record (family, ranks, calibration, healing); anything else is dense.
    manifest = lm.manifest or build_manifest(lm.model, source_path=lm.source)
    manifest = with_quantization(manifest, lm.model, report)
    return write_checkpoint(lm, manifest, args, [report.table()])


def write_checkpoint(lm, manifest: dict, args, tables: list[str]) -> int:
    """Save ``lm`` at ``args.out`` atomically, then print the manifest (``--json``) or the tables and the path."""
    from rankserve.checkpoint import save_checkpoint

    path = save_checkpoint(
        lm.model, args.out, tokenizer=lm.tokenizer, manifest=manifest, overwrite=args.overwrite
    )
    if args.json:
        print(json.dumps({"checkpoint": path, **manifest}))
    else:
        print("\n".join([*tables, f"checkpoint: {path}"]), flush=True)
    return 0
