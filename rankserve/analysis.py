"""Model accounting: parameter counts and weight bytes read per decoded token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankserve.layers import projections


@dataclass
class ModelStats:
    params_total: int  # unique parameters (shared bases and tied embeddings counted once; int8 matrices too)
    params_linear: int  # decoder-layer projections only: what a compression ratio is measured on
    bytes_per_token: int  # weight bytes read by one decode step (batch 1), KV cache excluded
    lm_head_bytes: int
    weight_bytes: int = 0  # bytes of all weights, each shared tensor once (int8 matrices with their scales)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def model_stats(model: nn.Module) -> ModelStats:
    # Float weights are parameters; int8 matrices and their scales are buffers (rankserve.layers).
    unique: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}  # shared tensors once
    projs = projections(model)
    scales: dict[int, torch.Tensor] = {}
    for proj in projs.values():
        for m in proj.matrices:
            pair = proj.qmat(m)
            if pair is not None:
                unique.setdefault(id(pair[0]), pair[0])
                scales.setdefault(id(pair[1]), pair[1])
    total = sum(t.numel() for t in unique.values())
    weight_bytes = sum(_nbytes(t) for t in (*unique.values(), *scales.values()))
    linear, read, head = 0, 0, 0
    counted: set[int] = set()
    for name, proj in projs.items():
        nbytes = 0 if proj.bias is None else _nbytes(proj.bias)
        for m in proj.matrices:
            t, pair = getattr(proj, m), proj.qmat(m)
            # a shared basis is one tensor, but it is read once per token per layer that uses it
            nbytes += _nbytes(t) + (0 if pair is None else _nbytes(pair[1]))
            if name != "lm_head" and id(t) not in counted:
                counted.add(id(t))
                linear += t.numel()
        read += nbytes
        if name == "lm_head":
            head = nbytes
    # Non-projection weights read per token: norms, and one embedding row.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            read += _nbytes(p)
    emb = model.model.embed_tokens.weight
    read += emb.shape[1] * emb.element_size()
    return ModelStats(
        params_total=total,
        params_linear=linear,
        bytes_per_token=read,
        lm_head_bytes=head,
        weight_bytes=weight_bytes,
    )
