"""A plain-torch Llama forward that reads each fixture layout straight from its files (never through the
importer): :func:`reference_logits`, the independent check of what the importer produces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fixture_base import Fixture
from importer_fixtures import load_svd_llm_standins
from safetensors.torch import load_file
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# Reference forwards


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_forward(config: dict, tensor, linear, has_lm_head: bool, tokens: Tensor) -> Tensor:
    """A plain Llama/Mistral/Qwen2 forward. ``tensor(key)`` gives dense tensors, ``linear(module, x)`` applies a
    projection in the layout's own way. Returns fp32 logits (B, T, vocab)."""
    h = config["hidden_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    eps = config["rms_norm_eps"]
    bsz, seq = tokens.shape

    inv_freq = 1.0 / (config.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), HF's rotate_half layout
    cos, sin = emb.cos().float(), emb.sin().float()
    mask = torch.full((seq, seq), float("-inf")).triu(1)  # (T, T) causal

    x = tensor("model.embed_tokens.weight").float()[tokens]  # (B, T, H)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = _rms_norm(x, tensor(p + "input_layernorm.weight"), eps)
        q = linear(p + "self_attn.q_proj", a).view(bsz, seq, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = linear(p + "self_attn.k_proj", a).view(bsz, seq, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = linear(p + "self_attn.v_proj", a).view(bsz, seq, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hd): each kv head serves nh/nkv query heads
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask  # (B, nh, T, T)
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, nh * hd)  # (B, T, nh*hd)
        x = x + linear(p + "self_attn.o_proj", o)
        m = _rms_norm(x, tensor(p + "post_attention_layernorm.weight"), eps)
        gated = F.silu(linear(p + "mlp.gate_proj", m)) * linear(p + "mlp.up_proj", m)  # (B, T, I)
        x = x + linear(p + "mlp.down_proj", gated)
    x = _rms_norm(x, tensor("model.norm.weight"), eps)
    if has_lm_head:
        return linear("lm_head", x)
    return x @ tensor("model.embed_tokens.weight").float().T  # tied embeddings


def _lin(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    return F.linear(x, w.float(), None if b is None else b.float())


def _svd_llm_reference(path: Path):
    obj = load_svd_llm_standins(path)
    model = obj["model"]
    config = dict(model.config.__dict__)
    config.setdefault("model_type", "llama")

    def find(dotted: str) -> Any:
        node = model
        for part in dotted.split("."):
            node = node._modules[part]
        return node

    def tensor(key: str) -> Tensor:
        module, _, name = key.rpartition(".")
        return find(module)._parameters[name]

    def linear(module: str, x: Tensor) -> Tensor:
        if module == "lm_head":
            return _lin(x, find("lm_head")._parameters["weight"])
        parent, _, proj = module.rpartition(".")
        kind = proj.removesuffix("_proj")
        v, u = find(f"{parent}.{kind}_v_proj"), find(f"{parent}.{kind}_u_proj")
        return _lin(_lin(x, v._parameters["weight"]), u._parameters["weight"], u._parameters.get("bias"))

    return config, tensor, linear, True


def _load_dir_state(directory: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for name in sorted(p.name for p in directory.iterdir()):
        if name.endswith(".safetensors"):
            state.update(load_file(str(directory / name)))
        elif name.endswith(".bin"):
            state.update(torch.load(directory / name, map_location="cpu", weights_only=True))
    return state


def _dir_reference(directory: Path):
    config = json.loads((directory / "config.json").read_text())
    state = _load_dir_state(directory)

    def bias(key: str) -> Tensor | None:
        return state.get(key)

    if "truncation_ranks" in config:  # ASVD: x -> BLinear -> ALinear

        def linear(module: str, x: Tensor) -> Tensor:
            if f"{module}.ALinear.weight" in state:
                hidden = _lin(x, state[f"{module}.BLinear.weight"])
                return _lin(hidden, state[f"{module}.ALinear.weight"], bias(f"{module}.ALinear.bias"))
            return _lin(x, state[f"{module}.weight"], bias(f"{module}.bias"))

    elif any(k.startswith("num_basis_") for k in config):  # Basis Sharing: x -> basis -> coefficient

        def linear(module: str, x: Tensor) -> Tensor:
            if module == "lm_head":
                return _lin(x, state["lm_head.weight"])
            layer, kind = int(module.split(".")[2]), module.rsplit(".", 1)[1].removesuffix("_proj")
            hidden = _lin(x, state[f"model.{kind}_basis.{layer}.weight"])
            return _lin(hidden, state[f"{module}.weight"], bias(f"{module}.bias"))

    else:  # u/v wrapped: x -> v_proj -> u_proj

        def linear(module: str, x: Tensor) -> Tensor:
            if f"{module}.u_proj.weight" in state:
                hidden = _lin(x, state[f"{module}.v_proj.weight"])
                b = bias(f"{module}.u_proj.bias")
                return _lin(
                    hidden, state[f"{module}.u_proj.weight"], b if b is not None else bias(f"{module}.bias")
                )
            return _lin(x, state[f"{module}.weight"], bias(f"{module}.bias"))

    has_lm_head = any(k.startswith("lm_head.") for k in state)
    return config, state.__getitem__, linear, has_lm_head


@torch.no_grad()
def reference_logits(fixture: str | Path | Fixture, tokens: Tensor) -> Tensor:
    """fp32 logits (B, T, vocab) of a fixture checkpoint, computed straight from its files in its own layout."""
    path = Path(fixture.path if isinstance(fixture, Fixture) else fixture)
    config, tensor, linear, has_lm_head = _svd_llm_reference(path) if path.is_file() else _dir_reference(path)
    return _llama_forward(config, tensor, linear, has_lm_head, tokens)
