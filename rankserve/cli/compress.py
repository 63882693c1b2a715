"""Compress a model with an SVD family and write a rankserve checkpoint."""

from __future__ import annotations

import os
import sys
import time

from rankserve.cli.heal import add_heal_arguments, heal_config
from rankserve.cli.main import CLIError, apply_threads, common_model_args
from rankserve.cli.quantize import add_quant_arguments, quant_config, quant_flags_given, write_checkpoint
from rankserve.families.base import RANK_MODES

# CLI flag -> family config field; a flag is passed only when given, so the family's own default applies.
FAMILY_FLAGS = {
    "update_u": "--update-u",
    "alpha": "--alpha",
    "group_size": "--group-size",
    "sensitivity_samples": "--sensitivity-samples",
}


def add_arguments(p):
    common_model_args(p)
    p.add_argument("--family", required=True, help="svd, fwsvd, asvd, svd-llm or basis-sharing")
    p.add_argument(
        "--ratio",
        type=float,
        required=True,
        help="fraction of linear-layer parameters REMOVED (SVD-LLM convention): 0.4 keeps 60%%",
    )
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--calib-data", default=None, help="calibration text file (default: text the model generates itself)"
    )
    p.add_argument(
        "--calib-self-share",
        type=float,
        default=None,
        help="with --calib-data: this fraction of the samples is the model's own prose and chat answers, the "
        "rest the file's windows (default 0; 0.5 measured best with --ranks sensitivity, docs/HEALING.md)",
    )
    p.add_argument("--calib-samples", type=int, default=32, help="calibration samples N (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per sample L (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    p.add_argument(
        "--ranks",
        default="uniform",
        choices=RANK_MODES,
        help="per-layer ranks: uniform, adaptive (by spectra) or sensitivity (by the calibration loss)",
    )
    p.add_argument(
        "--sensitivity-samples",
        type=int,
        default=None,
        help="--ranks sensitivity: calibration samples whose loss gradients weigh the truncations (default 4)",
    )
    p.add_argument("--update-u", action="store_true", default=None, help="svd-llm: least-squares update of U")
    p.add_argument("--alpha", type=float, default=None, help="asvd: activation exponent (default 0.5)")
    p.add_argument("--group-size", type=int, default=None, help="basis-sharing: layers per group (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    p.add_argument(
        "--heal-tokens",
        type=int,
        default=0,
        help="then heal by distillation from the dense model on N tokens (default 0: no healing)",
    )
    add_heal_arguments(p, prefix="heal-")
    p.add_argument(
        "--quant",
        choices=["int8"],
        default=None,
        help="then quantize the weights (as rankserve quantize --int8)",
    )
    add_quant_arguments(p, prefix="quant-")
    p.add_argument("--json", action="store_true", help="print the compression report as JSON")


def family_config(args):
    """The family config from the flags; flags that the family does not have are an error."""
    from rankserve.families import config_class

    cls = config_class(args.family)  # an unknown --family: InputError listing the known ones
    fields = {"ratio": args.ratio, "ranks": args.ranks}
    for field, flag in FAMILY_FLAGS.items():
        v = getattr(args, field)
        if v is not None:
            if field not in cls.__dataclass_fields__:
                raise CLIError(f"{flag} does not apply to family {args.family}")
            fields[field] = v
    return cls(**fields).validate()  # InputError naming the bad field


def further_compression(lm, args) -> dict:
    """Compressing a compressed float checkpoint again (gradual compression: compress, heal, compress further,
    heal): its factors are multiplied out in place, and what it was is returned for the new manifest.

    Measured (README, #11): SVD-LLM 0.2 healed on 393k tokens, then compressed to 0.4 and healed on 655k more,
    reached 2.25x / 2.43x dense (WikiText-2 / Lee) against 2.30x / 2.65x for 0.4 at once healed on all 1M."""
    from rankserve.layers import densify_

    m = lm.manifest
    done = m.get("ratio_measured") or 0.0
    if args.ratio <= done:
        raise CLIError(
            f"{args.model} is already compressed ({m['family']}, ratio {done:.3f}); compressing it further "
            f"needs a higher --ratio than that, got {args.ratio} (or start from the dense model)"
        )
    if args.heal_tokens:
        raise CLIError(
            f"{args.model} is compressed, so it cannot be the teacher --heal-tokens distils from; compress it "
            "further, then heal the result with rankserve heal OUT --teacher DENSE_MODEL"
        )
    densify_(lm.model)
    print(
        f"note: {args.model} is compressed ({m['family']}, ratio {done:.3f}); its factors are multiplied out "
        f"and compressed again at {args.ratio}",
        file=sys.stderr,
    )
    keep = ("family", "family_config", "ratio", "ratio_measured", "source", "healing")
    return {k: m[k] for k in keep if m.get(k) is not None}


def run(args) -> int:
    # Every check that needs no model comes first, so bad input costs nothing and writes nothing.
    if not 0 <= args.ratio < 1:
        raise CLIError(
            f"--ratio is the fraction of parameters removed and must be in [0, 1), got {args.ratio}"
        )
    cfg = family_config(args)
    from rankserve.checkpoint import check_out_dir

    check_out_dir(args.out, args.overwrite)
    if args.calib_self_share is not None:
        if args.calib_data is None:
            raise CLIError(
                "--calib-self-share mixes self-generated rows into --calib-data; give --calib-data PATH"
            )
        from rankserve.calibration import check_self_share

        check_self_share(args.calib_self_share, "--calib-self-share")
    if cfg.wanted_stats() and args.calib_data is not None and not os.path.isfile(args.calib_data):
        raise CLIError(f"calibration file not found: {args.calib_data}")
    if args.calib_samples < 1 or args.calib_seq_len < 2:
        raise CLIError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.heal_tokens < 0:
        raise CLIError(f"--heal-tokens must be >= 0, got {args.heal_tokens}")
    hcfg = heal_config(args, args.heal_tokens, prefix="heal-") if args.heal_tokens else None
    if hcfg is not None and args.dtype != "fp32":
        raise CLIError("--heal-tokens trains fp32 factors; drop --dtype or compress and heal separately")
    qcfg = quant_config(args, "quant-") if args.quant else None
    stray = [] if qcfg is not None else quant_flags_given(args, "quant-")
    if stray:
        raise CLIError(f"{', '.join(stray)} need --quant int8")
    from rankserve.calibration import make_calibration
    from rankserve.compress import compress_, compression_manifest
    from rankserve.loaders.source import load_model

    apply_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
    if "quantization" in lm.manifest:
        raise CLIError(f"{args.model} holds int8 weights; compress the float model, then quantize")
    if args.calib_seq_len > lm.config.max_position_embeddings:
        raise CLIError(
            f"--calib-seq-len {args.calib_seq_len} exceeds the model context {lm.config.max_position_embeddings}"
        )
    previous = None  # after every check on the model: further_compression prints a note, then multiplies out
    if lm.kind == "rankserve" and lm.manifest.get("family") not in (None, "dense"):
        previous = further_compression(lm, args)
    t0 = time.perf_counter()
    calib = None
    if cfg.wanted_stats():
        calib = make_calibration(
            args.calib_data,
            lm.model,
            lm.tokenizer,
            args.calib_samples,
            args.calib_seq_len,
            args.seed,
            progress=True,
            self_share=args.calib_self_share or 0.0,
        )
    calib_s = time.perf_counter() - t0
    report = compress_(lm.model, cfg, calib, batch_size=args.batch_size)
    info = {"calibration_time_s": round(calib_s, 3), "wall_time_total_s": round(time.perf_counter() - t0, 3)}
    if previous is not None:
        info["compressed_from"] = previous
    manifest = compression_manifest(lm.model, cfg, report, lm.source, info)
    if hcfg is not None:
        from rankserve.heal import heal_, healed_manifest

        teacher = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
        healing = heal_(lm.model, teacher.model, lm.tokenizer, hcfg)
        manifest = healed_manifest(manifest, healing, lm.source)
        del teacher
    tables = [report.table()]
    if qcfg is not None:
        from rankserve.checkpoint import with_quantization
        from rankserve.quantize import quantize_

        qreport = quantize_(lm.model, qcfg)
        manifest = with_quantization(manifest, lm.model, qreport)
        tables.append(qreport.table())
    return write_checkpoint(lm, manifest, args, tables)
