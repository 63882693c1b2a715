"""Turn a name -> tensor mapping into a model (:func:`build_model`), and refuse weights holding NaN or Inf."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rankserve.config import ModelConfig
from rankserve.io.assign import WeightError, assign, new_model

__all__ = ["NO_CHECK_FLAG", "WeightError", "build_model", "check_finite", "first_nonfinite", "new_model"]

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


def build_model(
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    dtype=torch.float32,
    device="cpu",
    source: str = "checkpoint",
) -> nn.Module:
    """A ready model from a config and HF-named tensors; the weights are never materialised twice.

    A missing ``lm_head.weight`` means tied embeddings: the model gets a copy of ``cfg`` that says so (``cfg``
    itself is not changed; read the model's ``config``).
    """
    if "lm_head.weight" not in tensors and not cfg.tie_word_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    tensors = dict(tensors)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return assign(new_model(cfg), tensors, dtype, device, source)
