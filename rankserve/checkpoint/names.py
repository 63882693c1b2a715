"""The names every part of a checkpoint shares: the shared-basis tensor prefix, the error type, dtype names."""

from __future__ import annotations

import torch
from torch import nn

from rankserve.errors import InputError

BASIS_PREFIX = "shared_bases."


class CheckpointError(InputError):
    """A checkpoint that cannot be written or read, with what is wrong."""


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
