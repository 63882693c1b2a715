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

import copyreg
import io
import json
import math
import pickle
import struct
import types
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
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


# ---------------------------------------------------------------------------------------------------------------
# SVD-LLM: a pickled whole model, written with stand-in classes


class StandIn:
    """Base of the stand-ins: takes any constructor args, stores any pickled state."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._pickled_state = state


_STANDINS: dict[str, type] = {}


def standin(qualified: str) -> type:
    """A class that pickles as ``qualified`` (e.g. ``component.svd_llama.SVD_LlamaAttention``)."""
    if qualified not in _STANDINS:
        module, _, name = qualified.rpartition(".")
        _STANDINS[qualified] = type(name, (StandIn,), {"__module__": module, "__qualname__": name})
    return _STANDINS[qualified]


def new(qualified: str, **attrs: Any) -> StandIn:
    obj = standin(qualified)()
    obj.__dict__.update(attrs)
    return obj


class StandInPickler(pickle._Pickler):
    """Writes stand-in classes as plain GLOBALs; the real classes are never imported."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, StandIn) and obj is not StandIn:
            self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


STANDIN_PICKLE = types.SimpleNamespace(__name__="standin_pickle", Pickler=StandInPickler)


class StandInUnpickler(pickle.Unpickler):
    """Reads a stand-in pickle back for the reference forward (trusted fixture files only)."""

    _REAL = ("torch", "collections", "builtins", "__builtin__", "_codecs", "copyreg")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self._REAL and not module.startswith("torch.nn"):
            return super().find_class(module, name)
        return standin(f"{module}.{name}")


STANDIN_UNPICKLE = types.SimpleNamespace(
    __name__="standin_unpickle", Unpickler=StandInUnpickler, load=pickle.load
)


def _module(
    qualified: str,
    params: dict | None = None,
    buffers: dict | None = None,
    children: dict | None = None,
    non_persistent: set | None = None,
    **attrs: Any,
) -> StandIn:
    """A stand-in with the ``__dict__`` layout of an ``nn.Module`` (what torch pickles for a module)."""
    return new(
        qualified,
        training=False,
        _parameters=OrderedDict(params or {}),
        _buffers=OrderedDict(buffers or {}),
        _non_persistent_buffers_set=set(non_persistent or ()),
        _modules=OrderedDict(children or {}),
        **attrs,
    )


def _linear(weight: Tensor, bias: Tensor | None = None, stale_in: int | None = None) -> StandIn:
    # SVD-LLM swaps weight.data after construction, so in/out_features can be stale: never trusted by the reader.
    return _module(
        "torch.nn.modules.linear.Linear",
        params={"weight": torch.nn.Parameter(weight, requires_grad=False), "bias": bias},
        in_features=stale_in or weight.shape[1],
        out_features=weight.shape[0],
    )


def _rotary(head_dim: int, base: float = 10000.0, positions: int = 16) -> StandIn:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(torch.arange(positions).float(), inv_freq)] * 2, dim=-1)
    return _module(
        "component.svd_llama.LlamaRotaryEmbedding",
        buffers={
            "inv_freq": inv_freq,
            "cos_cached": emb.cos()[None, None],
            "sin_cached": emb.sin()[None, None],
        },
        non_persistent={"cos_cached", "sin_cached"},
        max_seq_len_cached=positions,
    )


SP_TEXT = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234 + 5678 = 6912",
    "low-rank models serve faster than dense ones",
    "rankserve imports public checkpoints safely",
] * 20


def sentencepiece_proto() -> bytes:
    """A tiny Llama-style SentencePiece BPE model (identity normalization, byte fallback)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def fast_tokenizer_json() -> str:
    """A tiny ``tokenizers`` BPE tokenizer (with a BOS post-processor) as its JSON state."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SP_TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def _added_token(content: str) -> StandIn:
    return new(
        "tokenizers.AddedToken",
        content=content,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=True,
    )


class _PickledTokenizer(StandIn):
    """``tokenizers.Tokenizer`` pickles as NEWOBJ(Tokenizer, (model,)) + BUILD(json bytes)."""

    def __init__(self, json_text: str):
        self.json_text = json_text

    def __reduce_ex__(self, protocol: int):
        model = new("tokenizers.models.Model")
        return copyreg.__newobj__, (type(self), model), self.json_text.encode()


_PickledTokenizer.__module__, _PickledTokenizer.__qualname__ = "tokenizers", "Tokenizer"
_STANDINS["tokenizers.Tokenizer"] = _PickledTokenizer


def _pickled_tokenizer(kind: str | None, sp_proto: bytes | None = None) -> Any:
    specials = {
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
    }
    if kind == "slow":
        return new(
            "transformers.models.llama.tokenization_llama.LlamaTokenizer",
            init_kwargs=dict(specials, add_bos_token=True, add_eos_token=False, legacy=True),
            sp_model=None,
            sp_model_proto=sp_proto if sp_proto is not None else sentencepiece_proto(),
            add_bos_token=True,
            add_eos_token=False,
            legacy=True,
            vocab_file="/home/author/llama/tokenizer.model",
            **{f"_{k}": v for k, v in specials.items()},
        )
    if kind == "fast":
        return new(
            "transformers.models.llama.tokenization_llama_fast.LlamaTokenizerFast",
            init_kwargs=dict(specials),
            _tokenizer=_PickledTokenizer(fast_tokenizer_json()),
            **{f"_{k}": v for k, v in specials.items()},
        )
    return None


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


# ---------------------------------------------------------------------------------------------------------------
# Hostile files


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style zip archive around an arbitrary ``data.pkl`` (for crafting hostile files)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def write_raw_zip(path: Path, entries: list[tuple[str, int, bytes, int]]) -> Path:
    """A zip written byte by byte from (name, method, compressed data, declared size) entries.

    For archives zipfile will not write: a data.pkl that inflates to gigabytes from a small file. The CRC of a
    compressed entry is left 0; nothing reads that far.
    """
    out, central = bytearray(), bytearray()
    for name, method, data, size in entries:
        raw = name.encode()
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0, crc, len(data), size)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(raw), 0, 0, 0, 0, 0, len(out)) + raw
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(raw), 0) + raw + data
    eocd = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    path.write_bytes(bytes(out + central) + b"PK\x05\x06" + eocd)
    return path


def deflated_zeros(size: int, chunk: int = 1 << 20) -> bytes:
    """A raw deflate stream of ``size`` zero bytes, built from one flushed chunk repeated (a zip bomb's body)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(bytes(chunk))
    c.flush(zlib.Z_FULL_FLUSH)  # after a full flush the compressor is reset: each chunk compresses the same
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (size // chunk) + c.flush()


def write_compressed_torch_zip(path: Path, data_pkl: bytes, compression: int, corrupt: bool = False) -> Path:
    """A torch zip whose data.pkl is compressed (deflate or LZMA), optionally with its compressed bytes damaged."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl, compress_type=compression)
        z.writestr("archive/version", "3\n")
    if corrupt:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("archive/data.pkl")
        raw = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        for i in range(start + info.compress_size // 3, start + 2 * info.compress_size // 3):
            raw[i] ^= 0x5A
        path.write_bytes(bytes(raw))
    return path


def global_call_pickle(module: str, name: str, *args: Any) -> bytes:
    """Protocol-2 bytes for ``{'model': module.name(*args)}``: GLOBAL + REDUCE, written by hand."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.dump(args)
    body = buf.getvalue()[2:-1]  # the args tuple without PROTO and STOP
    return (
        b"\x80\x02}X\x05\x00\x00\x00model"
        + pickle.GLOBAL
        + f"{module}\n{name}\n".encode()
        + body
        + pickle.REDUCE
        + pickle.SETITEM
        + pickle.STOP
    )


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


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path, monkeypatch):
    """Temporary directories (rebuilt tokenizers, ...) go under tmp_path, so leftovers can be seen.

    Test modules import this fixture, which makes it autouse there."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
