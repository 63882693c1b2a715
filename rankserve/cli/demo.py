"""Run the main job end to end on the default model: compress with SVD-LLM, heal, save, reload, serve it fast."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
import time

from rankserve.cli.main import CLIError, apply_threads
from rankserve.families.base import RANK_MODES
from rankserve.heal import HealConfig

QUESTIONS = ["What is the capital of France?", "Give me one tip for writing clear code."]
# A short heal that keeps the demo within minutes. The model writes one pool of rows (prose and chat answers)
# that serves as calibration AND as healing data, since generating text costs a CPU about as much per token as
# training on it. Rows of 256 tokens, not 128: calibrated on 16 rows of 128 the SVD-LLM 0.2 model answered the
# capital-of-France question with "the capital of the world", on 16 rows of 256 with "Paris" (also after this
# heal; seeds 0 and 1 of 0-3 did; AMD EPYC, 2026-12-04). 2 x 256 per step: 8 optimizer steps, each pool token
# seen once. lr 5e-5, not the default 2e-4: on heals this short, 2e-4 raised the KL on held-back rows
# (0.94 -> 1.09) where 5e-5 lowered it (0.94 -> 0.79; SmolLM2, SVD-LLM 0.2, loss-driven ranks, 4,096 tokens of
# 128-token rows; issue #11's notes).
DEMO_HEAL = HealConfig(tokens=4096, seq_len=256, batch=2, pool_tokens=4096, lr=5e-5, eval_rows=4)


def add_arguments(p):
    p.add_argument("--model", default=None, help="model to use (default: smollm2-135m)")
    p.add_argument("--family", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of linear-layer parameters removed")
    p.add_argument(
        "--ranks",
        choices=RANK_MODES,
        default="sensitivity",
        help="rank allocation (default: by the loss, see `rankserve compress --help`)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=16,
        help=f"calibration rows of {DEMO_HEAL.seq_len} self-generated tokens, fewer where the model's context is "
        "shorter (shared with healing)",
    )
    p.add_argument(
        "--heal-tokens",
        type=int,
        default=DEMO_HEAL.tokens,
        help=f"distillation tokens after compressing (default {DEMO_HEAL.tokens}; 0 skips healing)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--out", default=None, help="where to keep the compressed checkpoint (default: a temp dir)"
    )


def _answer(lm, backend: str, max_tokens: int) -> list:
    from rankserve.runtime.generate import complete
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.runtime.sampling import SamplingParams

    out = []
    for q in QUESTIONS:
        ids = lm.tokenizer.chat([{"role": "user", "content": q}])
        out.append(
            complete(
                lm.model,
                lm.tokenizer,
                ids,
                SamplingParams(max_tokens=max_tokens),
                RuntimeOptions(backend=backend),
            )
        )
    return out


def run(args) -> int:
    from rankserve.calibration import Calibration
    from rankserve.checkpoint import save_checkpoint
    from rankserve.compress import compress_, compression_manifest
    from rankserve.families import config_class
    from rankserve.loaders.source import DEFAULT_MODEL, load_model

    apply_threads(args.threads)
    if args.out and os.path.exists(args.out):
        raise CLIError(f"--out {args.out} already exists; choose a new directory")
    cfg = config_class(args.family)(ratio=args.ratio, ranks=args.ranks).validate()
    name = args.model or DEFAULT_MODEL

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.heal_tokens < 0:
        raise CLIError(f"--heal-tokens must be >= 0, got {args.heal_tokens}")
    say(f"[1/4] loading {name}")
    start = time.perf_counter()
    stages = {}  # wall seconds per stage, printed at the end
    lm = load_model(name)
    stages["load"] = time.perf_counter() - start
    dense = _answer(lm, "eager", args.max_tokens)
    stages["dense answers"] = time.perf_counter() - start - stages["load"]

    from rankserve.calibration import self_generated_rows
    from rankserve.heal import heal_rows

    # rows of DEMO_HEAL's length, or of the model's whole context where that is shorter
    heal_cfg = dataclasses.replace(
        DEMO_HEAL,
        tokens=max(args.heal_tokens, 1),
        seq_len=min(DEMO_HEAL.seq_len, lm.config.max_position_embeddings),
    )
    say(
        f"[2/4] compressing with {cfg.name}, ratio {cfg.ratio} (fraction of linear-layer parameters removed), "
        f"calibration: {args.calib_samples} x {heal_cfg.seq_len} tokens the model generates itself"
    )
    t0 = time.perf_counter()
    n_calib = args.calib_samples if cfg.wanted_stats() else 0
    n_rows = max(n_calib, heal_rows(heal_cfg)[1] if args.heal_tokens else 0)
    generated = (
        self_generated_rows(lm.model, lm.tokenizer, n_rows, heal_cfg.seq_len, 0, progress=True)
        if n_rows
        else None
    )
    stages["generate"] = time.perf_counter() - t0
    calib = Calibration(generated[0][:n_calib], "self", 0) if n_calib else None
    teacher = copy.deepcopy(lm.model) if args.heal_tokens else None
    report = compress_(lm.model, cfg, calib)
    compress_s = time.perf_counter() - t0
    stages["compress"] = compress_s - stages["generate"]
    healing = None
    if teacher is not None:
        from rankserve.heal import heal_

        say(
            f"      healing: distilling the dense model into the compressed one on {args.heal_tokens:,} tokens"
        )
        healing = heal_(lm.model, teacher, lm.tokenizer, heal_cfg, generated=generated)
        stages["heal"] = healing.wall_time_s
        del teacher

    out = args.out or os.path.join(
        tempfile.mkdtemp(prefix="rankserve-demo-"), f"{name}-{cfg.name}-{cfg.ratio:g}"
    )
    say(f"[3/4] saving the checkpoint to {out}")
    manifest = compression_manifest(lm.model, cfg, report, lm.source, {"wall_time_s": round(compress_s, 2)})
    if healing is not None:
        from rankserve.heal import healed_manifest

        manifest = healed_manifest(manifest, healing, lm.source)
    save_checkpoint(lm.model, out, tokenizer=lm.tokenizer, manifest=manifest)

    say(
        "[4/4] reloading it and answering with the fast runtime (the first call packs it and builds the kernels)"
    )
    t1 = time.perf_counter()
    small = load_model(out)
    _answer(small, "fast", 4)  # pack (and build or compile) once, outside the timings below
    stages["reload and warm-up"] = time.perf_counter() - t1
    fast = _answer(small, "fast", args.max_tokens)
    stages["compressed answers"] = time.perf_counter() - t1 - stages["reload and warm-up"]
    total_s = time.perf_counter() - start

    print(report.table())
    print()
    for q, d, f in zip(QUESTIONS, dense, fast, strict=True):
        print(f"> {q}")
        print(f"  dense (eager):      {d.text.strip()!r}  [{d.decode_tok_s:.1f} tok/s]")
        print(f"  compressed (fast):  {f.text.strip()!r}  [{f.decode_tok_s:.1f} tok/s]")
    if healing is not None:
        print(
            f"healing: KL to the dense model {healing.initial_kl:.3f} -> {healing.final_kl:.3f} on held-back "
            f"text, {healing.tokens:,} tokens in {healing.wall_time_s:.0f} s"
        )
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + f", total {total_s:.0f} s")
    print(
        f"\ncompressed checkpoint: {out} (generating calibration text and compressing took {compress_s:.0f} s)"
    )
    print(
        f"next: rankserve generate {out} --chat --backend fast --prompt '...'   |   rankserve inspect {out}"
    )
    return 0
