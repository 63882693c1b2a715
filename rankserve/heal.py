"""Healing by distillation: ``heal_(student, teacher, tokenizer, config) -> HealReport``.

A compressed model (the student) is trained to match its dense original (the teacher) with the KL divergence
``KL(p_teacher || p_student)`` of their next-token distributions at temperature 1, averaged over every position.
By default only the factors train: ``LowRankLinear`` U and V, ``SharedBasisLinear`` bases and coefficients (a
shared basis is one Parameter, so it stays shared); optionally also the RMSNorm weights and the projections the
compression kept dense (``train_dense``: no extra bytes, but many more trained parameters). Embeddings and the LM
head stay frozen, so the healed model has exactly the compressed model's shapes and packs as before.

Data (:func:`make_heal_data`): by default text the teacher generates itself, half from the BOS token (plain
prose) and half as chat answers to a fixed list of generic instructions, sampled at temperature 1 with one
seeded sampler per row, so no dataset is needed and the text is not tied to one domain. Text files given in
``HealConfig.data`` are mixed in as seeded random windows. A few rows are held back for the periodic evaluation.

Safety: with a ``state_dir``, the trainable tensors, optimizer, scheduler, step and data are saved every
``checkpoint_every`` steps (atomically, as ``state.pt`` and ``data.pt``; the directory has no manifest, so it
never passes for a checkpoint) and ``resume=True`` continues from them with the same result as an uninterrupted
run: the batch order is a pure function of (seed, step). A non-finite or diverging KL raises
:class:`HealDiverged` and leaves the last saved state alone.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from rankserve.calibration import check_self_share, self_generated_rows
from rankserve.distill import (
    autocast_dtype,
    batch_rows,
    kl_logits,
    lr_factor,
    trainable_groups,
)
from rankserve.errors import InputError
from rankserve.layers import projections
from rankserve.textstyle import detokenizer

STATE_FORMAT = 1
MIN_WARMUP = 10
STATE_NAME, DATA_NAME = "state.pt", "data.pt"
SCHEDULES = ("cosine", "constant")
AUTOCAST = ("auto", "fp32", "bf16")


class HealDiverged(InputError):
    """The loss became non-finite or diverged; the message says where and what is kept."""


@dataclass
class HealConfig:
    """Everything that decides a healing run's result (and is checked on ``--resume``)."""

    tokens: int = 131072  # training tokens; steps = ceil(tokens / (batch * seq_len))
    seq_len: int = 256
    batch: int = 4
    lr: float = 2e-4  # AdamW peak learning rate
    warmup: float = 0.05  # fraction of the steps with a linear warm-up (at least MIN_WARMUP steps; 0: none)
    schedule: str = "cosine"  # "cosine" (to min_lr * lr) or "constant" after the warm-up
    min_lr: float = 0.1  # final learning rate as a fraction of lr (cosine)
    weight_decay: float = 0.0  # decay would pull the factors toward zero, away from the SVD solution
    max_grad_norm: float = 1.0
    train_norms: bool = False
    train_dense: bool = False  # also the projections the compression kept dense (same bytes, more to train)
    data: list[str] = field(default_factory=list)  # text files mixed in
    # rules applied to the ``data`` files before tokenizing (a rankserve.textstyle.DETOKENIZERS name)
    detokenize: str | None = None
    self_share: float = 1.0  # fraction of the pool self-generated (the rest from ``data``)
    pool_tokens: int = 65536  # distinct training tokens; the pool repeats when ``tokens`` is larger
    eval_rows: int = 4  # rows held back for evaluation
    eval_every: int = 0  # steps between evaluations (0: only at the start and the end)
    checkpoint_every: int = 0  # steps between resumable states (0: none)
    seed: int = 0
    autocast: str = "auto"  # "auto", "fp32" or "bf16"
    diverge_factor: float = 4.0  # stop when a step's KL exceeds this times the first step's

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch * self.seq_len))

    def validate(self) -> HealConfig:
        """Raise ValueError naming the first bad field."""

        def pos_int(name: str, low: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"heal {name} must be an integer >= {low}, got {v!r}")

        for name, low in (("tokens", 1), ("seq_len", 2), ("batch", 1), ("pool_tokens", 2), ("eval_rows", 1)):
            pos_int(name, low)
        for name in ("eval_every", "checkpoint_every", "seed"):
            pos_int(name, 0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"heal lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"heal warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"heal schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.min_lr <= 1:
            raise InputError(f"heal min_lr is a fraction of lr in [0, 1], got {self.min_lr!r}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0 or self.diverge_factor <= 1:
            raise InputError("heal weight_decay must be >= 0, max_grad_norm > 0 and diverge_factor > 1")
        if self.autocast not in AUTOCAST:
            raise InputError(f"heal autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        check_self_share(self.self_share, "heal self_share")
        if self.self_share < 1 and not self.data:
            raise InputError("heal self_share < 1 needs text files in data")
        for p in self.data:
            if not os.path.isfile(p):
                raise InputError(f"heal data file not found: {p}")
        if self.detokenize is not None:
            detokenizer(self.detokenize, "heal detokenize")
            if not self.reads_files:
                raise InputError(
                    "heal detokenize rewrites the data files: give text files in data and a self_share below 1"
                )
        return self

    @property
    def reads_files(self) -> bool:
        """Whether the ``data`` files contribute rows: there are some, and not every row is self-generated."""
        return bool(self.data) and self.self_share < 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class HealData:
    """Training rows and held-back rows (token ids [N, L]) and a JSON-able record of where they came from."""

    train: Tensor
    held: Tensor
    sources: list[dict[str, Any]]

    def to_state(self) -> dict[str, Any]:
        return {"train": self.train, "held": self.held, "sources": self.sources}


def heal_rows(config: HealConfig) -> tuple[int, int]:
    """(all rows, self-generated rows) of the pool ``config`` asks for, held-back rows included."""
    rows = max(math.ceil(min(config.tokens, config.pool_tokens) / config.seq_len), 1) + config.eval_rows
    return rows, (round(rows * config.self_share) if config.data else rows)


def make_heal_data(
    teacher: nn.Module,
    tokenizer,
    config: HealConfig,
    progress: bool = False,
    generated: tuple[Tensor, dict[str, Any]] | None = None,
) -> HealData:
    """The training pool and held-back rows for ``config`` (deterministic for its seed).

    ``generated``: rows :func:`self_generated_rows` already wrote for this seed and length (e.g. the ones the
    compression calibrated on), of which the first ones are used instead of generating new ones.
    """
    from rankserve.calibration import text_calibration

    rows, n_self = heal_rows(config)
    parts, sources = [], []
    if n_self:
        if generated is not None and generated[0].shape[0] >= n_self:
            if generated[0].shape[1] != config.seq_len:
                raise ValueError(
                    f"generated rows have {generated[0].shape[1]} tokens, heal seq_len is {config.seq_len}"
                )
            t, rec = generated[0][:n_self], {**generated[1], "samples": n_self}
        else:
            t, rec = self_generated_rows(teacher, tokenizer, n_self, config.seq_len, config.seed, progress)
        parts.append(t)
        sources.append(rec)
    n_files = rows - n_self
    for i, path in enumerate(config.data):
        n = n_files // len(config.data) + (i < n_files % len(config.data))
        if n == 0:
            continue
        c = text_calibration(path, tokenizer, n, config.seq_len, config.seed + i, config.detokenize)
        parts.append(c.tokens)
        src = {"source": c.source, "sha256": c.sha256, "samples": n, "seq_len": config.seq_len}
        sources.append(src | {k: v for k, v in c.details.items() if k == "detokenize"})
    pool = torch.cat(parts)  # (rows, L)
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(config.seed))
    pool = pool[order]
    return HealData(train=pool[config.eval_rows :], held=pool[: config.eval_rows], sources=sources)


# --------------------------------------------------------------------------------------------------
# the flow


@dataclass
class HealReport:
    steps: int
    tokens: int
    final_kl: float  # mean KL on the held-back rows after healing
    initial_kl: float
    wall_time_s: float
    tokens_per_s: float
    lr: float
    schedule: str
    warmup_steps: int
    trained: list[str]  # parameter groups trained
    trained_params: int
    autocast: str
    data: list[dict[str, Any]]
    curve: list[dict[str, float]] = field(default_factory=list)  # step, tokens, kl, ppl on held-back rows
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _evaluate(student, teacher, rows: Tensor, batch: int, device, amp) -> dict[str, float]:
    """Mean KL to the teacher and the student's perplexity on ``rows`` [N, L]."""
    kl = nll = 0.0
    n = 0
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch):
            x = rows[s : s + batch].to(device)  # (b, L)
            with _autocast(device, amp):
                t_logits, s_logits = teacher(x), student(x)
            kl += kl_logits(t_logits, s_logits).item() * x.shape[0]
            ce = F.cross_entropy(s_logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
            nll += ce.item() * x.shape[0]
            n += x.shape[0]
    return {"kl": kl / n, "ppl": math.exp(nll / n)}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _save_atomic(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def heal_(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    config: HealConfig,
    *,
    state_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    generated: tuple[Tensor, dict[str, Any]] | None = None,
) -> HealReport:
    """Distil ``teacher`` into ``student`` in place (see the module docstring); return what was done.

    Both models must share the tokenizer and live on the same device; the student's trainable parameters are
    left with ``requires_grad=False`` afterwards, as loading makes them. ``on_eval`` is called with each
    point of the evaluation curve (step, tokens, held-back KL and perplexity), e.g. to score other texts.
    ``generated``: self-generated rows to reuse (see :func:`make_heal_data`).
    """
    config.validate()
    if student.config.vocab_size != teacher.config.vocab_size:
        raise InputError(
            f"teacher vocabulary {teacher.config.vocab_size} differs from the student's "
            f"{student.config.vocab_size}; heal with the dense model the student was compressed from"
        )
    limit = int(student.config.max_position_embeddings)
    if config.seq_len > limit:
        raise InputError(f"heal seq_len {config.seq_len} exceeds the model context {limit}")
    if any(p.is_int8() for p in projections(student).values()):
        raise InputError(
            "the student holds int8 weights, which healing cannot train; heal its float source, then quantize"
        )
    groups = trainable_groups(student, config.train_norms, config.train_dense)
    params = {n: p for n, (_, p) in groups.items()}
    if not params:
        raise InputError("the student has no low-rank or shared-basis factors to train; compress it first")
    device = next(student.parameters()).device
    amp = autocast_dtype(config.autocast, device)
    steps = config.steps
    # At least MIN_WARMUP steps (or all of a shorter run): Adam's first steps move every factor entry by ~lr at
    # once, and a 3-step probe at full lr 2e-4 took the KL from 0.63 to 5.9 in one step.
    warmup_steps = min(steps, max(math.ceil(steps * config.warmup), MIN_WARMUP)) if config.warmup else 0

    state_path = os.path.join(state_dir, STATE_NAME) if state_dir else None
    data_path = os.path.join(state_dir, DATA_NAME) if state_dir else None
    state = None
    if resume:
        if not state_path or not os.path.isfile(state_path):
            raise InputError(f"nothing to resume: no {STATE_NAME} in {state_dir}")
        state = torch.load(state_path, weights_only=True)
        saved = state["config"]
        for k, v in config.to_dict().items():
            if k not in ("eval_every", "checkpoint_every") and saved.get(k) != v:
                raise InputError(
                    f"cannot resume: the saved run has {k}={saved.get(k)!r}, this one {v!r}; "
                    "resume with the same settings"
                )
        data = HealData(**torch.load(data_path, weights_only=True))
    else:
        data = make_heal_data(teacher, tokenizer, config, progress, generated)

    was_training = student.training, teacher.training
    student.eval(), teacher.eval()  # no dropout in these models; eval() keeps any future one off
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        # A loaded checkpoint's tensors are read-only memory maps: writing them in place segfaults. Own copies
        # (same Parameter objects, so a shared basis stays shared).
        p.data = p.data.clone()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, warmup_steps, config.schedule, config.min_lr)
    )
    start, curve, first_kl, elapsed = 0, [], None, 0.0
    if state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, curve, first_kl, elapsed = state["step"], state["curve"], state["first_kl"], state["elapsed_s"]

    def evaluate(step: int) -> None:
        r = _evaluate(student, teacher, data.held, config.batch, device, amp)
        curve.append({"step": step, "tokens": step * config.batch * config.seq_len, **r})
        if on_eval is not None:
            on_eval(curve[-1])

    def save_state(step: int) -> None:
        if not os.path.isfile(data_path):  # the data once, with the first state
            os.makedirs(state_dir, exist_ok=True)
            _save_atomic(data.to_state(), data_path)
        trainable = {n: p.detach().clone() for n, p in params.items()}
        _save_atomic(
            {
                "format": STATE_FORMAT,
                "step": step,
                "config": config.to_dict(),
                "trainable": trainable,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "curve": curve,
                "first_kl": first_kl,
                "elapsed_s": elapsed + time.perf_counter() - t0,
            },
            state_path,
        )

    if not curve:
        evaluate(0)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc="heal", unit="step", disable=not progress)
    try:
        for step in range(start, steps):
            x = data.train[batch_rows(step, config.batch, data.train.shape[0], config.seed)].to(device)
            with _autocast(device, amp):
                with torch.no_grad():
                    t_logits = teacher(x)  # (B, L, V)
                s_logits = student(x)  # (B, L, V)
            loss = kl_logits(t_logits, s_logits)
            kl = loss.item()
            if first_kl is None:
                first_kl = kl
            if not math.isfinite(kl) or kl > config.diverge_factor * max(first_kl, 1e-3):
                kept = (
                    f"the last good state is kept in {state_dir}"
                    if state_path and os.path.isfile(state_path)
                    else "no state was saved"
                )
                raise HealDiverged(
                    f"healing stopped at step {step}: KL {kl:.4g} "
                    f"({'not finite' if not math.isfinite(kl) else f'{kl / first_kl:.1f}x the first step'}); "
                    f"nothing was written and {kept}; retry with a lower --lr than {config.lr:g}"
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            seen = (done - start) * config.batch * config.seq_len
            bar.set_postfix(kl=f"{kl:.4f}", tok_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
            if config.eval_every and done % config.eval_every == 0 and done < steps:
                evaluate(done)
            if (
                state_path
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < steps
            ):
                save_state(done)
    finally:
        bar.close()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        student.train(was_training[0]), teacher.train(was_training[1])
    run_s = time.perf_counter() - t0
    evaluate(steps)
    trained_tokens = steps * config.batch * config.seq_len
    wall = elapsed + run_s
    return HealReport(
        steps=steps,
        tokens=trained_tokens,
        final_kl=curve[-1]["kl"],
        initial_kl=curve[0]["kl"],
        wall_time_s=round(wall, 3),
        tokens_per_s=round((steps - start) * config.batch * config.seq_len / max(run_s, 1e-9), 2),
        lr=config.lr,
        schedule=config.schedule,
        warmup_steps=warmup_steps,
        trained=sorted({g for g, _ in groups.values()}),
        trained_params=sum(p.numel() for p in params.values()),
        autocast=str(amp).removeprefix("torch.") if amp else "fp32",
        data=data.sources,
        curve=curve,
        config=config.to_dict(),
    )


def healed_manifest(manifest: dict[str, Any], report: HealReport, teacher_path: str) -> dict[str, Any]:
    """``manifest`` with a ``healing`` record: the teacher and its sha256, the data and the run's figures."""
    from rankserve.checkpoint import validate_manifest
    from rankserve.hashing import source_fingerprint

    rec = report.to_dict()
    out = dict(manifest)
    out["healing"] = {"teacher": source_fingerprint(teacher_path), **rec}
    return validate_manifest(out)
