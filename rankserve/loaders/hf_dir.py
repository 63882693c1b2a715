"""Hugging Face model directories: config.json + safetensors (single or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import torch

from rankserve.config import ConfigError, ModelConfig
from rankserve.importers.state_dict import read_weight_files
from rankserve.io.hf_files import read_config, weight_files


def sanitize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that HF checkpoints carry but the model recomputes (RoPE inverse frequencies)."""
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def read_hf_dir(directory: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        cfg = ModelConfig.from_hf(read_config(directory))
    except ConfigError as e:
        message = str(e)
        raise ConfigError(
            message if directory in message else f"{directory}/config.json: {message}"
        ) from None
    return cfg, sanitize(read_weight_files(weight_files(directory)))
