"""Tiny checkpoints in each public SVD layout, and a plain-torch reference forward that reads each layout directly.

Every ``write_*`` builder takes a target directory and returns a :class:`Fixture`: the path to hand to the
importer, the base config, the dense-equivalent weight of every projection (the factor products) and the ranks.
The SVD-LLM pickle is written without the authors' classes: stand-in classes whose ``__module__``/``__qualname__``
name the real ones (``component.svd_llama.SVD_LlamaAttention``, ``torch.nn.modules.linear.Linear``, ...) are
pickled by name, exactly as ``torch.save`` would pickle the real objects.

:func:`reference_logits` runs a Llama forward (RMSNorm, RoPE in HF's rotate_half convention, GQA, SwiGLU) straight
from a fixture's files, using each layout's own tensors and conventions; it never goes through the importer, so
it is an independent check of what the importer produces.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from fixture_base import (
    ATTN,
    MLP,
    Fixture,
    _base_tensors,
    _Factory,
    has_qkv_bias,
    module_name,
    proj_shape,
    svd_llm_rank,
    tiny_config,
)
from safetensors.torch import save_file
from standins import (
    STANDIN_PICKLE,
    STANDIN_UNPICKLE,
    StandIn,
    _linear,
    _module,
    _pickled_tokenizer,
    _rotary,
    fast_tokenizer_json,
    new,
)
from torch import Tensor


def write_svd_llm(
    directory: Path,
    config: dict | None = None,
    keep: float = 0.8,
    seed: int = 0,
    tokenizer: str | None = "slow",
    config_class: str = "transformers.models.llama.configuration_llama.LlamaConfig",
    rope_base: float = 10000.0,
    tensor_attrs: dict | None = None,
    sp_proto: bytes | None = None,
) -> Fixture:
    """``torch.save({'model': model, 'tokenizer': tokenizer})`` as SVD-LLM's whitening step writes it.

    Factors fp32, embeddings/norms/lm_head fp16 (mixed, as the public SVD-LLM pickles). ``tensor_attrs`` are
    set as Python attributes on every parameter and buffer (as transformers sets ``_is_hf_initialized``), which
    makes torch pickle them through ``_rebuild_from_type_v2`` / ``_rebuild_parameter_with_state``. ``sp_proto``
    replaces the slow tokenizer's SentencePiece model.
    """
    config = dict(config or tiny_config())
    f = _Factory(seed)
    base = {k: v.half() for k, v in _base_tensors(config, f).items()}
    lm_head = f.dense(config["vocab_size"], config["hidden_size"]).half()
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    weights, ranks = {}, {}
    attrs = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    hf_config = new(config_class, **attrs, _name_or_path="meta-llama/Llama-tiny", torch_dtype=torch.float16)
    layers = OrderedDict()
    for layer in range(config["num_hidden_layers"]):
        parts = {}
        for kind in ATTN + MLP:
            out, inn = proj_shape(config, kind)
            rank = svd_llm_rank(out, inn, keep)
            u, v = f.factors(out, inn, rank)
            weights[module_name(layer, kind)] = u @ v
            ranks[module_name(layer, kind)] = rank
            # MHA-sized stale in_features, as SVD-LLM's Llama path declares them.
            parts[f"{kind}_u_proj"] = _linear(u, stale_in=config["hidden_size"])
            parts[f"{kind}_v_proj"] = _linear(v)
        attn = _module(
            "component.svd_llama.SVD_LlamaAttention",
            children={
                **{n: m for n, m in parts.items() if n[0] in "qkvo"},
                "rotary_emb": _rotary(hd, rope_base),
            },
            config=hf_config,
            hidden_size=config["hidden_size"],
            num_heads=config["num_attention_heads"],
            head_dim=hd,
            max_position_embeddings=config["max_position_embeddings"],
            ratio=keep,
        )
        mlp = _module(
            "component.svd_llama.SVD_LlamaMLP",
            children={
                **{n: m for n, m in parts.items() if n[0] not in "qkvo"},
                "act_fn": _module("transformers.activations.SiLUActivation"),
            },
            ratio=keep,
        )
        p = f"model.layers.{layer}."
        norm = "transformers.models.llama.modeling_llama.LlamaRMSNorm"
        layers[str(layer)] = _module(
            "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
            children={
                "self_attn": attn,
                "mlp": mlp,
                "input_layernorm": _module(
                    norm,
                    params={"weight": base[p + "input_layernorm.weight"]},
                    variance_epsilon=config["rms_norm_eps"],
                ),
                "post_attention_layernorm": _module(
                    norm,
                    params={"weight": base[p + "post_attention_layernorm.weight"]},
                    variance_epsilon=config["rms_norm_eps"],
                ),
            },
            hidden_size=config["hidden_size"],
        )
    inner = _module(
        "transformers.models.llama.modeling_llama.LlamaModel",
        children={
            "embed_tokens": _module(
                "torch.nn.modules.sparse.Embedding",
                params={"weight": base["model.embed_tokens.weight"]},
                padding_idx=None,
            ),
            "layers": _module("torch.nn.modules.container.ModuleList", children=layers),
            "norm": _module(
                "transformers.models.llama.modeling_llama.LlamaRMSNorm",
                params={"weight": base["model.norm.weight"]},
            ),
        },
        config=hf_config,
    )
    model = _module(
        "transformers.models.llama.modeling_llama.LlamaForCausalLM",
        children={"model": inner, "lm_head": _linear(lm_head)},
        config=hf_config,
        name_or_path="meta-llama/Llama-tiny",
        generation_config=new("transformers.generation.configuration_utils.GenerationConfig", max_length=20),
        seqlen=2048,
    )
    if tensor_attrs:
        _set_tensor_attrs(model, tensor_attrs)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"meta_llama_Llama_tiny_whitening_only_{keep}.pt"
    torch.save(
        {"model": model, "tokenizer": _pickled_tokenizer(tokenizer, sp_proto)},
        path,
        pickle_module=STANDIN_PICKLE,
    )
    weights["lm_head"] = lm_head.float()
    dense = dict(base, **{"lm_head.weight": lm_head})
    config["torch_dtype"] = "float16"  # what the pickled config says
    return Fixture(path, "svd-llm", config, weights, ranks, dense=dense)


def _set_tensor_attrs(module: StandIn, attrs: dict) -> None:
    for slot in ("_parameters", "_buffers"):
        for tensor in getattr(module, slot, {}).values():
            if tensor is not None:
                for key, value in attrs.items():
                    setattr(tensor, key, value)
    for child in getattr(module, "_modules", {}).values():
        _set_tensor_attrs(child, attrs)


def load_svd_llm_standins(path: Path) -> Any:
    """The fixture pickle read back into stand-ins (the reference forward's view; trusted files only)."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STANDIN_UNPICKLE)


# ---------------------------------------------------------------------------------------------------------------
# HF-directory layouts


def _write_config(directory: Path, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _write_tokenizer_files(directory: Path) -> None:
    (directory / "tokenizer.json").write_text(fast_tokenizer_json())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )


def _save_state(directory: Path, state: dict[str, Tensor], kind: str, shards: int) -> None:
    """``model.safetensors`` / ``pytorch_model.bin``, or ``shards`` files plus the HF index."""
    stem, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")

    def save(tensors: dict[str, Tensor], name: str) -> None:
        if kind == "safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))
        else:
            torch.save(tensors, directory / name)

    if shards <= 1:
        save(state, f"{stem}.{ext}")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = keys[i::shards]
        save({k: state[k] for k in part}, name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


REMOTE_CODE = """# Stand-in for ASVD's remote code: importing it would leave a marker file.
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_WAS_IMPORTED").write_text("imported")
"""


def write_asvd(
    directory: Path,
    config: dict | None = None,
    seed: int = 1,
    shards: int = 1,
    dtype: torch.dtype = torch.float16,
) -> Fixture:
    """ASVD's HF export: ALinear [out, r] (+bias) / BLinear [r, in], ``truncation_ranks``, remote code.

    Layer 1's o_proj and down_proj stay dense; lm_head is factorized; ranks differ per projection.
    """
    config = dict(config or tiny_config())
    f = _Factory(seed)
    state = {k: v.to(dtype) for k, v in _base_tensors(config, f).items()}
    weights, ranks, biases = {}, {}, {}
    modules = [
        (module_name(layer, kind), kind)
        for layer in range(config["num_hidden_layers"])
        for kind in ATTN + MLP
    ]
    dense_modules = {module_name(1, "o"), module_name(1, "down")}
    for i, (module, kind) in enumerate(modules + [("lm_head", None)]):
        out, inn = proj_shape(config, kind) if kind else (config["vocab_size"], config["hidden_size"])
        bias = f.randn(out, scale=0.1).to(dtype) if kind in ("q", "k", "v") and has_qkv_bias(config) else None
        if module in dense_modules:
            w = f.dense(out, inn).to(dtype)
            state[f"{module}.weight"] = w
            weights[module] = w.float()
        else:
            rank = 6 + 3 * (i % 5)
            a, b = (t.to(dtype) for t in f.factors(out, inn, rank))
            state[f"{module}.ALinear.weight"], state[f"{module}.BLinear.weight"] = a, b
            weights[module] = a.float() @ b.float()
            ranks[module] = rank
        if bias is not None:
            state[f"{module}.ALinear.bias" if module in ranks else f"{module}.bias"] = bias
            biases[module] = bias.float()
    raw = dict(
        config,
        architectures=["ASVDLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_asvd_llama.ASVDLlamaConfig",
            "AutoModelForCausalLM": "modeling_asvd_llama.ASVDLlamaForCausalLM",
        },
        truncation_ranks=dict(ranks),
        torch_dtype="float16",
    )
    _write_config(directory, raw)
    _save_state(directory, state, "safetensors", shards)
    (directory / "modeling_asvd_llama.py").write_text(REMOTE_CODE)
    (directory / "configuration_asvd_llama.py").write_text(REMOTE_CODE)
    _write_tokenizer_files(directory)
    dense = {k: v for k, v in state.items() if not k.endswith(("ALinear.weight", "BLinear.weight", ".bias"))}
    return Fixture(
        directory, "asvd", dict(config, torch_dtype="float16"), weights, ranks, biases, dense=dense
    )


BASIS_GROUPS = {
    "q": [[0, 1]],
    "k": [[0, 1]],
    "v": [[0, 1]],
    "o": [[0], [1]],
    "gate": [[0, 1]],
    "up": [[0, 1]],
    "down": [[0], [1]],
}
BASIS_RANKS = {"q": 24, "k": 40, "v": 20, "o": 16, "gate": 40, "up": 36, "down": 30}  # k: r > out is legal


def write_basis_sharing(
    directory: Path,
    config: dict | None = None,
    seed: int = 2,
    aliases: bool = True,
    shards: int = 1,
) -> Fixture:
    """Basis Sharing's ``save_pretrained(safe_serialization=False)``: shared bases, per-layer coefficients.

    Each group's basis is one tensor registered under ``model.{x}_basis.{i}`` for every layer i of the group
    (and, with ``aliases``, under ``model.layers.{i}.{self_attn|mlp}.{x}_basis``), so torch.save stores it once.
    """
    config = dict(config or tiny_config())
    f = _Factory(seed)
    state = _base_tensors(config, f)
    state["lm_head.weight"] = f.dense(config["vocab_size"], config["hidden_size"])
    weights, ranks, groups = {}, {}, {}
    for kind in ATTN + MLP:
        out, inn = proj_shape(config, kind)
        rank = BASIS_RANKS[kind]
        parent = "self_attn" if kind in ATTN else "mlp"
        for index, group in enumerate(BASIS_GROUPS[kind]):
            basis = f.randn(rank, inn, scale=inn**-0.5)
            if len(group) > 1:
                groups[f"{kind}_proj.g{index}"] = [module_name(layer, kind) for layer in group]
            for layer in group:
                state[f"model.{kind}_basis.{layer}.weight"] = basis
                if aliases:
                    state[f"model.layers.{layer}.{parent}.{kind}_basis.weight"] = basis
                coeff = f.randn(out, rank, scale=rank**-0.5)
                state[f"{module_name(layer, kind)}.weight"] = coeff
                weights[module_name(layer, kind)] = coeff @ basis
                ranks[module_name(layer, kind)] = rank
    raw = dict(config, architectures=["ShareLlamaForCausalLM"])
    for kind in ATTN + MLP:
        raw[f"{kind}_groups"] = BASIS_GROUPS[kind]
        raw[f"num_basis_{kind}"] = BASIS_RANKS[kind]
    _write_config(directory, raw)
    _save_state(directory, state, "bin", shards)
    weights["lm_head"] = state["lm_head.weight"]
    dense = {k: v for k, v in state.items() if "_basis" not in k and "_proj" not in k}
    return Fixture(directory, "basis-sharing", config, weights, ranks, groups=groups, dense=dense)


def write_uv(
    directory: Path,
    config: dict | None = None,
    seed: int = 3,
    file_format: str = "safetensors",
    low_rank_config: bool = True,
) -> Fixture:
    """lowrankarena's "u/v wrapped" export: ``{name}.v_proj.weight`` [r, in], ``{name}.u_proj.weight`` [out, r].

    Layer 1's v_proj stays dense, so ``self_attn.v_proj.weight`` sits next to ``self_attn.q_proj.v_proj.weight``.
    """
    config = dict(config or tiny_config())
    f = _Factory(seed)
    state = {k: v.half() for k, v in _base_tensors(config, f).items()}
    state["lm_head.weight"] = f.dense(config["vocab_size"], config["hidden_size"]).half()
    weights, ranks, biases = {"lm_head": state["lm_head.weight"].float()}, {}, {}
    for layer in range(config["num_hidden_layers"]):
        for i, kind in enumerate(ATTN + MLP):
            module = module_name(layer, kind)
            out, inn = proj_shape(config, kind)
            if module == module_name(1, "v"):
                state[f"{module}.weight"] = f.dense(out, inn).half()
                weights[module] = state[f"{module}.weight"].float()
            else:
                rank = 8 + 2 * i + layer
                u, v = (t.half() for t in f.factors(out, inn, rank))
                state[f"{module}.u_proj.weight"], state[f"{module}.v_proj.weight"] = u, v
                weights[module] = u.float() @ v.float()
                ranks[module] = rank
            if kind in ("q", "k", "v") and has_qkv_bias(config):
                bias = f.randn(out, scale=0.1).half()
                state[f"{module}.u_proj.bias" if module in ranks else f"{module}.bias"] = bias
                biases[module] = bias.float()
    raw = dict(config, torch_dtype="float16")
    if low_rank_config:
        raw["architectures"] = ["LlamaLowRankForCausalLM"]
        raw["low_rank_config"] = {"layers": dict(ranks)}
    _write_config(directory, raw)
    _save_state(directory, state, file_format, 1)
    dense = {k: v for k, v in state.items() if not k.endswith(("u_proj.weight", "v_proj.weight", ".bias"))}
    return Fixture(directory, "uv", dict(config, torch_dtype="float16"), weights, ranks, biases, dense=dense)


WRITERS = {"svd-llm": write_svd_llm, "asvd": write_asvd, "basis-sharing": write_basis_sharing, "uv": write_uv}


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path, monkeypatch):
    """Temporary directories (rebuilt tokenizers, ...) go under tmp_path, so leftovers can be seen.

    Test modules import this fixture, which makes it autouse there."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
