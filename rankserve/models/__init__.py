"""Model definitions, one file per architecture family, found by the config's ``model_type``."""

from __future__ import annotations

from torch import nn

from rankserve.config import ModelConfig
from rankserve.errors import InputError


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The causal-LM class for a config (Llama, Mistral, Qwen2 and SmolLM share ``llama.py``)."""
    if cfg.family == "llama":
        from rankserve.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    raise InputError(f"not supported: model family {cfg.family!r}")
