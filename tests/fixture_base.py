"""What every importer fixture shares: the tiny base config, projection names and shapes, the Fixture record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

BASE_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def tiny_config(**overrides: Any) -> dict:
    """A tiny random-model config: 2 layers, hidden 64, intermediate 128, 4 heads, 2 kv heads, vocab 128."""
    config = dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    config.update(overrides)
    config["architectures"] = [BASE_ARCH.get(config["model_type"], "UnknownForCausalLM")]
    return config


def module_name(layer: int, kind: str) -> str:
    parent = "self_attn" if kind in ATTN else "mlp"
    return f"model.layers.{layer}.{parent}.{kind}_proj"


def proj_shape(config: dict, kind: str) -> tuple[int, int]:
    """(out, in) of a projection kind."""
    h, i = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return {
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, q),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }[kind]


def has_qkv_bias(config: dict) -> bool:
    return config["model_type"] == "qwen2"


@dataclass
class Fixture:
    path: Path  # what to hand to the importer (a file for svd-llm, else a directory)
    family: str
    config: dict  # the base config the importer should return
    weights: dict[str, Tensor]  # module -> dense-equivalent W [out, in] (fp32) of every projection
    ranks: dict[str, int]  # factorized module -> rank (shared-basis members included)
    biases: dict[str, Tensor] = field(default_factory=dict)  # module -> bias
    groups: dict[str, list[str]] = field(default_factory=dict)  # basis-sharing: "q_proj.g0" -> member modules
    dense: dict[str, Tensor] = field(default_factory=dict)  # embeddings, norms, dense lm_head, as stored


class _Factory:
    """Seeded random tensors with sensible scales (activations stay O(1) through the tiny model)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def factors(self, out: int, inn: int, rank: int) -> tuple[Tensor, Tensor]:
        """(U [out, r], V [r, in]) whose product has roughly unit-variance outputs for unit inputs."""
        return self.randn(out, rank, scale=rank**-0.5), self.randn(rank, inn, scale=inn**-0.5)

    def dense(self, out: int, inn: int) -> Tensor:
        return self.randn(out, inn, scale=inn**-0.5)

    def norm(self, n: int) -> Tensor:
        return 1.0 + self.randn(n, scale=0.1)


def _base_tensors(config: dict, f: _Factory) -> dict[str, Tensor]:
    h = config["hidden_size"]
    out = {"model.embed_tokens.weight": f.randn(config["vocab_size"], h)}
    for layer in range(config["num_hidden_layers"]):
        out[f"model.layers.{layer}.input_layernorm.weight"] = f.norm(h)
        out[f"model.layers.{layer}.post_attention_layernorm.weight"] = f.norm(h)
    out["model.norm.weight"] = f.norm(h)
    return out


def svd_llm_rank(out: int, inn: int, keep: float) -> int:
    """SVD-LLM's uniform rank: ``int(out * in * keep / (out + in))``."""
    return int(out * inn * keep / (out + inn))
