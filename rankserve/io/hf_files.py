"""Hugging Face model directories on disk: ``config.json`` and the weight files (single or sharded)."""

from __future__ import annotations

import json
import os

from rankserve.config import ConfigError


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
