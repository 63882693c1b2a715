"""Heal a compressed checkpoint by distillation from its dense teacher; write a new checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import sys

from rankserve.cli.main import CLIError, apply_threads

STATE_SUFFIX = ".heal-state"  # beside --out; it holds no manifest, so it never loads as a checkpoint
STYLE_PROBE_CHARS = 1 << 20  # the style note reads this much of each --data file, not a whole large corpus


def add_heal_arguments(p, prefix: str = "") -> None:
    """The training flags shared by ``heal`` and ``compress --heal-tokens`` (there prefixed ``heal-``)."""
    from rankserve.heal import HealConfig
    from rankserve.textstyle import DETOKENIZERS

    d = HealConfig()
    p.add_argument(
        f"--{prefix}lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr:g})"
    )
    p.add_argument(
        f"--{prefix}seq-len", type=int, default=d.seq_len, help=f"tokens per row (default {d.seq_len})"
    )
    p.add_argument(f"--{prefix}batch", type=int, default=d.batch, help=f"rows per step (default {d.batch})")
    p.add_argument(
        f"--{prefix}data",
        action="append",
        default=[],
        metavar="PATH",
        help="text file mixed into the self-generated data (repeatable; never an evaluation text)",
    )
    p.add_argument(
        f"--{prefix}detokenize",
        choices=sorted(DETOKENIZERS),
        default=None,
        help="rewrite the --data files' tokenized style as plain prose first (wikitext: ' @-@ ', ' , ', <unk>)",
    )
    p.add_argument(
        f"--{prefix}train-norms",
        action="store_true",
        help="also train the RMSNorm weights (default: factors)",
    )
    p.add_argument(
        f"--{prefix}train-dense",
        action="store_true",
        help="also train the projections the compression kept dense (no extra bytes; default: factors)",
    )


def heal_config(args, tokens: int, prefix: str = ""):
    """The HealConfig from parsed flags; bad values raise CLIError naming the flag. Prints :func:`style_notes` to
    stderr."""
    from rankserve.heal import HealConfig

    def get(name: str):
        return getattr(args, (prefix + name).replace("-", "_"))

    data = get("data")
    fields = dict(
        tokens=tokens,
        lr=get("lr"),
        seq_len=get("seq-len"),
        batch=get("batch"),
        data=data,
        detokenize=get("detokenize"),
        train_norms=get("train-norms"),
        train_dense=get("train-dense"),
        self_share=0.5 if data else 1.0,
    )
    for name in ("warmup", "schedule", "pool_tokens", "eval_every", "checkpoint_every", "seed", "self_share"):
        if getattr(args, name, None) is not None and not prefix:
            fields[name] = getattr(args, name)
    if getattr(args, "autocast", None):
        fields["autocast"] = args.autocast
    try:
        cfg = HealConfig(**fields).validate()
    except ValueError as e:
        raise CLIError(f"{e} (flags: --{prefix}...)" if prefix else str(e)) from None
    for note in style_notes(cfg, prefix):
        print(note, file=sys.stderr)
    return cfg


def style_notes(cfg, prefix: str = "") -> list[str]:
    """One line per --data file written in WikiText's tokenized style when it is not being detokenized: healing on
    that style measured worse on other prose (rankserve.textstyle)."""
    from rankserve.textstyle import WIKITEXT_MIN_MARKS, wikitext_marks

    if cfg.detokenize is not None or not cfg.reads_files:
        return []
    notes = []
    for path in cfg.data:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            marks = wikitext_marks(f.read(STYLE_PROBE_CHARS))
        if marks >= WIKITEXT_MIN_MARKS:
            notes.append(
                f"note: {path} is in WikiText's tokenized style ({marks:,} ' @-@ ' / '<unk>' marks in its first "
                f"{STYLE_PROBE_CHARS:,} characters); the student "
                f"learns that style too. --{prefix}detokenize wikitext heals on it as plain prose, which measured "
                "better on other prose (README)"
            )
    return notes


def add_arguments(p):
    from rankserve.heal import AUTOCAST, SCHEDULES, HealConfig

    d = HealConfig()
    p.add_argument("checkpoint", help="compressed rankserve checkpoint to heal")
    p.add_argument("--teacher", required=True, help="the dense model it was compressed from (path or alias)")
    p.add_argument("--out", required=True, help="healed checkpoint directory to create (must not exist)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"training tokens (default {d.tokens})")
    add_heal_arguments(p)
    p.add_argument("--warmup", type=float, default=None, help=f"warm-up fraction of steps ({d.warmup})")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help=f"after warm-up ({d.schedule})")
    p.add_argument(
        "--pool-tokens", type=int, default=None, help=f"distinct training tokens, repeated ({d.pool_tokens})"
    )
    p.add_argument(
        "--self-share", type=float, default=None, help="self-generated fraction with --data (default 0.5)"
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-back evaluations")
    p.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between resumable states (default 50)"
    )
    p.add_argument("--seed", type=int, default=None, help="data and order seed (default 0)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT{STATE_SUFFIX}")
    p.add_argument(
        "--dtype",
        dest="autocast",
        choices=AUTOCAST,
        default="auto",
        help="autocast dtype: auto = bf16 on CUDA and CPUs with native bf16, else fp32",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--json", action="store_true", help="print the healing record as JSON")


def run(args) -> int:
    # Every check that needs no model comes first, so bad input costs nothing and writes nothing.
    from rankserve.checkpoint import CheckpointError, check_out_dir, read_manifest
    from rankserve.loaders.source import resolve

    cfg = heal_config(args, args.tokens)
    try:
        check_out_dir(args.out)
    except CheckpointError as e:
        raise CLIError(f"--out {e}") from None
    state_dir = os.path.abspath(args.out) + STATE_SUFFIX
    if args.resume and not os.path.isdir(state_dir):
        raise CLIError(f"--resume: no saved state at {state_dir}")
    if not args.resume and os.path.exists(state_dir):
        raise CLIError(f"a previous run's state is at {state_dir}; pass --resume to continue it or delete it")
    kind, _ = resolve(args.checkpoint)
    try:
        manifest = read_manifest(args.checkpoint) if kind == "rankserve" else None
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    if manifest is None or manifest["family"] == "dense":
        raise CLIError(f"{args.checkpoint} is not a compressed rankserve checkpoint; compress it first")
    resolve(args.teacher)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise CLIError(f"--device must be cpu or cuda, got {args.device!r}")
    apply_threads(args.threads)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    from rankserve.checkpoint import save_checkpoint
    from rankserve.heal import heal_, healed_manifest
    from rankserve.loaders.source import load_model, parse_dtype

    student = load_model(args.checkpoint, dtype="fp32", device=args.device)  # fp32 master weights
    teacher = load_model(args.teacher, dtype="fp32", device=args.device)
    if teacher.kind == "rankserve" and teacher.manifest.get("family") not in (None, "dense"):
        raise CLIError(f"--teacher {args.teacher} is compressed; the teacher is the dense model")
    report = heal_(
        student.model,
        teacher.model,
        student.tokenizer,
        cfg,
        state_dir=state_dir,
        resume=args.resume,
        progress=not args.no_progress,
    )
    del teacher
    new_manifest = healed_manifest(student.manifest, report, resolve(args.teacher)[1])
    student.model.to(parse_dtype(getattr(torch, new_manifest["dtype"])))  # back to the stored dtype
    path = save_checkpoint(student.model, args.out, tokenizer=student.tokenizer, manifest=new_manifest)
    shutil.rmtree(state_dir, ignore_errors=True)  # the checkpoint is complete: the state is no longer needed
    if args.json:
        print(json.dumps({"checkpoint": path, "healing": new_manifest["healing"]}))
    else:
        print(healing_summary(new_manifest["healing"]))
        print(f"checkpoint: {path}")
        sys.stdout.flush()
    return 0


def healing_summary(h: dict) -> str:
    """Plain-text lines: the eval curve and the run's figures."""
    lines = [f"{'step':>6} {'tokens':>9} {'KL':>9} {'ppl (held-back)':>16}"]
    lines += [f"{c['step']:>6} {c['tokens']:>9,} {c['kl']:>9.4f} {c['ppl']:>16.3f}" for c in h["curve"]]
    lines.append(
        f"healed {h['tokens']:,} tokens in {h['steps']} steps ({', '.join(h['trained'])}; lr {h['lr']:g} "
        f"{h['schedule']}, {h['autocast']}): KL {h['initial_kl']:.4f} -> {h['final_kl']:.4f}, "
        f"{h['wall_time_s']:.0f} s, {h['tokens_per_s']:.0f} tokens/s"
    )
    return "\n".join(lines)
