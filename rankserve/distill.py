"""The pieces of distillation that are not the healing flow: the KL loss, the learning-rate schedule, the
seeded batch order, which parameters train, and whether bf16 autocast pays on this device. Used by
:mod:`rankserve.heal`; no I/O, no model building.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankserve.layers import DenseLinear, LowRankLinear, SharedBasisLinear
from rankserve.models.llama import RMSNorm

# --------------------------------------------------------------------------------------------------
# pure math


def kl_logits(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of ``KL(softmax(t) || softmax(s))`` (temperature 1), in fp32: logits [..., V]."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    # kl_div(input=log q, target=log p, log_target) = p * (log p - log q), summed over the vocabulary
    return F.kl_div(s, t, reduction="none", log_target=True).sum(-1).mean()


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, min_lr: float) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant or cosine to ``min_lr``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(step: int, batch: int, n_rows: int, seed: int) -> Tensor:
    """Row indices of the batch at ``step``: epoch after epoch of seeded permutations of the pool."""
    idx = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in idx.div(n_rows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = idx // n_rows == epoch
        out[sel] = perm[idx[sel] % n_rows]
    return out


# --------------------------------------------------------------------------------------------------
# parameters and devices


def trainable_groups(
    model: nn.Module, train_norms: bool = False, train_dense: bool = False
) -> dict[str, tuple[str, nn.Parameter]]:
    """The parameters healing trains, by name, each with its group for the manifest: the factors ('lowrank U',
    'lowrank V', 'shared basis' once, 'shared coeff'), optionally the projections the compression kept dense
    ('dense projection') and the norm weights ('norm')."""
    head = getattr(model, "lm_head", None)  # a projection too, often tied to the embeddings: never trained
    wanted: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            wanted |= {id(m.U): "lowrank U", id(m.V): "lowrank V"}
        elif isinstance(m, SharedBasisLinear):
            wanted |= {id(m.basis): "shared basis", id(m.coeff): "shared coeff"}
        elif train_dense and isinstance(m, DenseLinear) and m is not head:
            wanted[id(m.weight)] = "dense projection"
        elif train_norms and isinstance(m, RMSNorm):
            wanted[id(m.weight)] = "norm"
    # named_parameters() yields a shared Parameter once, under its first name
    return {n: (wanted[id(p)], p) for n, p in model.named_parameters() if id(p) in wanted}


def trainable_parameters(
    model: nn.Module, train_norms: bool = False, train_dense: bool = False
) -> dict[str, nn.Parameter]:
    """The parameters of :func:`trainable_groups` by name."""
    return {n: p for n, (_, p) in trainable_groups(model, train_norms, train_dense).items()}


# /proc/cpuinfo flags of the instructions that make bf16 matmuls faster than fp32 (Intel AMX, AVX512-BF16).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX): the only CPUs where bf16 autocast pays.

    Elsewhere (e.g. Zen 3: AVX2 only) PyTorch emulates bf16 by converting to fp32 and back, which is slower
    than plain fp32. The one rule behind ``autocast="auto"`` and the benchmark's bf16 speed probe.
    """
    from rankserve.runtime.native import cpu_flags

    return not set(NATIVE_BF16_FLAGS).isdisjoint(cpu_flags().split())


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``choice`` on ``device`` (None = plain fp32).

    ``auto`` picks bf16 on CUDA and where :func:`cpu_has_native_bf16`, fp32 elsewhere.
    """
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else None
