"""Model accounting: parameter counts and weight bytes read per decoded token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rankserve.layers import projections


@dataclass
class ModelStats:
    params_total: int  # unique parameters (shared bases and tied embeddings counted once)
    params_linear: int  # decoder-layer projections only: what a compression ratio is measured on
    bytes_per_token: int  # weight bytes read by one decode step (batch 1), KV cache excluded
    lm_head_bytes: int


def model_stats(model: nn.Module) -> ModelStats:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields shared tensors once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    linear, read, bases = 0, 0, set()
    head = 0
    for name, proj in projections(model).items():
        n = 0
        for pname, p in proj.named_parameters():
            if (
                pname == "basis"
            ):  # a shared basis is one tensor; it is read once per token per layer that uses it
                if id(p) not in bases:
                    bases.add(id(p))
                    if name != "lm_head":
                        linear += p.numel()
                n += p.numel()
            else:
                n += p.numel()
                if name != "lm_head" and pname != "bias":
                    linear += p.numel()
        nbytes = n * next(proj.parameters()).element_size()
        read += nbytes
        if name == "lm_head":
            head = nbytes
    # Non-projection weights read per token: norms, and one embedding row.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            read += p.numel() * p.element_size()
    emb = model.model.embed_tokens.weight
    read += emb.shape[1] * emb.element_size()
    return ModelStats(params_total=total, params_linear=linear, bytes_per_token=read, lm_head_bytes=head)
