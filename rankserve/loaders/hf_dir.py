"""Hugging Face model directories: config.json + safetensors (single or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import json
import os

import torch

from rankserve.config import ConfigError, ModelConfig
from rankserve.loaders.safe_pickle import load_state_dict
from rankserve.loaders.st_mmap import load_mmap


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def weight_files(directory: str) -> list[str]:
    """The weight files of a directory, safetensors preferred, shards in index order."""
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        ipath = os.path.join(directory, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                if not all(isinstance(s, str) and os.path.basename(s) == s for s in shards):
                    raise ValueError("shard names must be file names in the directory")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise ConfigError(f"{ipath}: not a valid shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise FileNotFoundError(
                    f"{directory}: shard(s) listed in {index} are missing: {', '.join(missing)}"
                )
            return [os.path.join(directory, s) for s in shards]
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise FileNotFoundError(f"{directory} holds no model.safetensors or pytorch_model.bin")


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory: safetensors memory-mapped, .bin files through ``weights_only`` loading."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        if path.endswith(".safetensors"):
            out.update(load_mmap(path))
        else:
            out.update(load_state_dict(path))
    return out


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
    return cfg, sanitize(read_tensors(directory))
