"""Readers for the public SVD-compression checkpoint layouts, without running any of their code.

Each reader turns one layout into an :class:`ImportedModel`: a neutral, fully validated description (base HF
config, dense tensors, low-rank factors ``W ≈ U @ V``, shared bases) that a later step writes out as a rankserve
checkpoint. The layouts are described in ``docs/FORMATS.md``:

- ``svd-llm``: a whole pickled model (``torch.save({'model': m, 'tokenizer': t})``), read with
  :func:`~rankserve.loaders.safe_pickle.load_restricted`;
- ``asvd``: an HF directory with ``{name}.ALinear`` / ``{name}.BLinear`` and ``truncation_ranks`` (remote code is
  never imported);
- ``basis-sharing``: ``pytorch_model.bin`` with one basis per group of layers and per-layer coefficients;
- ``uv``: lowrankarena's "u/v wrapped" export, ``{name}.u_proj`` / ``{name}.v_proj``.

Every tensor shape is checked against the config before anything is returned: a reader either returns a
complete model or raises :class:`CheckpointImportError` naming the tensor, the expected and the found shape.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rankserve.config import ConfigError, ModelConfig
from rankserve.fsutil import owned_tempdir
from rankserve.hashing import file_sha256
from rankserve.loaders.hf_dir import weight_files
from rankserve.loaders.safe_pickle import (
    CheckpointImportError,
    Record,
    UnsafePickleError,
    load_restricted,
    load_state_dict,
    module_tensors,
)

__all__ = [
    "FAMILIES",
    "CheckpointImportError",
    "ImportedModel",
    "SharedGroup",
    "UnsafePickleError",
    "detect_format",
    "read_asvd",
    "read_basis_sharing",
    "read_checkpoint",
    "read_svd_llm",
    "read_uv",
]

FAMILIES = ("svd-llm", "asvd", "basis-sharing", "uv")

# model_type -> the base CausalLM class written into the cleaned config.
BASE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

ATTN_KINDS = ("q", "k", "v", "o")
MLP_KINDS = ("gate", "up", "down")
PROJ_KINDS = ATTN_KINDS + MLP_KINDS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Buffers a pickled or exported model may carry that hold no weights (recomputed from the config).
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")

# Config keys that only mean something to one family's code; never written into the base config.
_FAMILY_KEYS = {
    "auto_map",
    "truncation_ranks",
    "low_rank_config",
    "low_rank_modules",
    "low_rank_method",
    "low_rank_schema",
    "low_rank_format_version",
    "dobi_target_modules",
    "transformers_version",
}
_FAMILY_KEY_RE = re.compile(rf"^(({'|'.join(PROJ_KINDS)})_groups|num_basis_({'|'.join(PROJ_KINDS)}))$")

# Attributes every transformers 4.x PretrainedConfig instance carries; a pickled config holds them all, a saved
# config.json only the non-default ones. They describe generation or training, not the model.
_PRETRAINED_RUNTIME_KEYS = {
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "task_specific_params",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sep_token_id",
    "decoder_start_token_id",
}

# Pickled config class name -> model_type (model_type is a class attribute, so it is not in the pickled state).
_CONFIG_CLASSES = {
    "LlamaConfig": "llama",
    "MistralConfig": "mistral",
    "Qwen2Config": "qwen2",
    "OPTConfig": "opt",
    "GPT2Config": "gpt2",
}


@dataclass
class SharedGroup:
    """One basis shared by several projections: ``W_m = coeff_m @ basis`` for every member ``m``."""

    basis: Tensor  # [r, in]
    members: dict[str, tuple[Tensor, Tensor | None]]  # module name -> (coeff [out, r], bias [out] or None)


@dataclass
class ImportedModel:
    """A foreign checkpoint, validated and described in rankserve's terms (HF Llama module names)."""

    family: str
    config: dict
    dense: dict[str, Tensor]
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]]  # module -> (U [out, r], V [r, in], bias)
    shared: dict[str, SharedGroup] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None

    def ranks(self) -> dict[str, int]:
        """Rank of every factorized projection (shared-basis members included), by module name."""
        ranks = {name: u.shape[1] for name, (u, _v, _b) in self.lowrank.items()}
        for group in self.shared.values():
            ranks.update({name: group.basis.shape[0] for name in group.members})
        return ranks

    def weight(self, module: str) -> Tensor:
        """The dense-equivalent weight [out, in] of one projection (materialised; for tests and analysis)."""
        if module in self.lowrank:
            u, v, _ = self.lowrank[module]
            return u.float() @ v.float()
        for group in self.shared.values():
            if module in group.members:
                return group.members[module][0].float() @ group.basis.float()
        return self.dense[f"{module}.weight"]


# ---------------------------------------------------------------------------------------------------------------
# Geometry: what the config says every tensor must look like


@dataclass(frozen=True)
class _Geometry:
    model_type: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    attention_bias: bool  # q/k/v/o carry a bias (Llama's attention_bias)
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: Mapping, source: str) -> _Geometry:
        try:  # the one place config values are validated
            cfg = ModelConfig.from_hf(dict(config))
        except ConfigError as e:
            raise CheckpointImportError(f"{source}: {e}") from None
        return cls(
            model_type=cfg.model_type,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            layers=cfg.num_hidden_layers,
            vocab=cfg.vocab_size,
            tied=cfg.tie_word_embeddings,
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=cfg.mlp_bias,
        )

    def has_bias(self, module: str) -> bool:
        """Whether the config's architecture gives this projection a bias (Qwen2: q, k and v always)."""
        kind = module.rsplit(".", 1)[-1].removesuffix("_proj")
        if self.model_type == "qwen2":
            return kind in ("q", "k", "v")
        return (kind in ATTN_KINDS and self.attention_bias) or (kind in MLP_KINDS and self.mlp_bias)

    def proj_shape(self, kind: str) -> tuple[int, int]:
        """(out, in) of one projection kind."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q": (q, h),
            "k": (kv, h),
            "v": (kv, h),
            "o": (h, q),
            "gate": (i, h),
            "up": (i, h),
            "down": (h, i),
        }[kind]

    def projections(self) -> dict[str, tuple[int, int]]:
        """Every linear layer by HF module name, with (out, in); ``lm_head`` last."""
        out = {
            module_name(layer, kind): self.proj_shape(kind)
            for layer in range(self.layers)
            for kind in PROJ_KINDS
        }
        out["lm_head"] = (self.vocab, self.hidden)
        return out

    def other_dense(self) -> dict[str, tuple[int, ...]]:
        """The tensors that are never factorized: embeddings and norms."""
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for layer in range(self.layers):
            shapes[f"model.layers.{layer}.input_layernorm.weight"] = (self.hidden,)
            shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (self.hidden,)
        shapes["model.norm.weight"] = (self.hidden,)
        return shapes


def module_name(layer: int, kind: str) -> str:
    """HF name of one projection, e.g. ``module_name(0, "q") == "model.layers.0.self_attn.q_proj"``."""
    parent = "self_attn" if kind in ATTN_KINDS else "mlp"
    return f"model.layers.{layer}.{parent}.{kind}_proj"


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_float(key: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise CheckpointImportError(f"{key}: expected a tensor, found {type(t).__name__}")
    if not t.is_floating_point():
        raise CheckpointImportError(f"{key}: expected a floating-point tensor, found {t.dtype}")
    return t


def _expect(key: str, t: Any, shape: tuple[int, ...]) -> Tensor:
    _check_float(key, t)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointImportError(f"{key}: expected shape {list(shape)}, found {_shape(t)}")
    return t


def _orient(
    module: str, u_key: str, u: Tensor, v_key: str, v: Tensor, out: int, inn: int
) -> tuple[Tensor, Tensor, bool]:
    """(U [out, r], V [r, in], swapped): the factor whose second dim is ``in`` is applied first.

    The names are tried first; the swap covers ALinear/BLinear, which mean opposite things in ASVD and Dobi.
    """
    for key, t in ((u_key, u), (v_key, v)):
        _check_float(key, t)
        if t.dim() != 2:
            raise CheckpointImportError(f"{key}: expected a 2-D factor of {module}, found shape {_shape(t)}")
    for first, second, swapped in ((u, v, False), (v, u, True)):
        if first.shape[0] == out and second.shape[1] == inn and first.shape[1] == second.shape[0]:
            return first, second, swapped
    if u.shape[0] != out:
        raise CheckpointImportError(
            f"{u_key}: expected shape [{out}, r] (output side of {module}), found {_shape(u)}"
        )
    if v.shape[1] != inn:
        raise CheckpointImportError(
            f"{v_key}: expected shape [r, {inn}] (input side of {module}), found {_shape(v)}"
        )
    raise CheckpointImportError(
        f"{module}: rank mismatch, {u_key} has shape {_shape(u)} but {v_key} has shape {_shape(v)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Config


def _check_architecture(config: Mapping, source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in BASE_ARCHITECTURES:
        archs = config.get("architectures") or []
        raise CheckpointImportError(
            f"not supported: {source} is model_type {model_type!r} ({', '.join(map(str, archs)) or 'no architectures'}); "
            f"rankserve imports {', '.join(BASE_ARCHITECTURES)} checkpoints"
        )
    return model_type


def _jsonable(value: Any) -> tuple[bool, Any]:
    """(ok, value) with torch dtypes turned into their names; ok is False for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, torch.dtype):
        return True, str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if isinstance(value, Mapping):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return False, None


def _clean_config(raw: Mapping, model_type: str, notes: list[str], drop: set[str] = frozenset()) -> dict:
    """The base HF config: family keys, private keys and ``drop`` removed, architectures set to the base class."""
    config: dict = {}
    for key, value in raw.items():
        if key.startswith("_") or key in _FAMILY_KEYS or _FAMILY_KEY_RE.match(key) or key in drop:
            continue
        ok, clean = _jsonable(value)
        if not ok:
            notes.append(f"config key {key!r} dropped: its value is not plain data")
            continue
        config[key] = clean
    config["model_type"] = model_type
    config["architectures"] = [BASE_ARCHITECTURES[model_type]]
    return config


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointImportError(f"{directory}: no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointImportError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointImportError(f"{path}: expected a JSON object")
    return config


def _normalise_module(name: str) -> str:
    # lowrankarena writes module names with or without the leading "model."
    return name if name.startswith("model.") or name == "lm_head" else f"model.{name}"


def _declared_ranks(table: Any, key: str, source: str, geometry: _Geometry) -> dict[str, int]:
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise CheckpointImportError(
            f"{source}: config {key} must map module names to ranks, found {type(table).__name__}"
        )
    projections = geometry.projections()
    ranks: dict[str, int] = {}
    for name, rank in table.items():
        if isinstance(rank, Mapping):  # {"rank": r}
            rank = rank.get("rank")
        module = _normalise_module(str(name))
        if module not in projections:
            raise CheckpointImportError(
                f"{source}: config {key} names {name!r}, which is not a projection of this model"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise CheckpointImportError(
                f"{source}: config {key}[{name!r}] must be a positive int, found {rank!r}"
            )
        ranks[module] = rank
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# Files


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory (:func:`~rankserve.loaders.hf_dir.weight_files`), as paths."""
    try:
        return [Path(p) for p in weight_files(str(directory))]
    except (OSError, ConfigError) as e:
        raise CheckpointImportError(str(e)) from None


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointImportError(f"{path}: unreadable safetensors file: {e}") from None
    # weights_only, after a bounded scan: a plain state dict needs nothing else, and anything else is refused.
    return load_state_dict(path)


def _load_weights(files: list[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in files:
        for key, tensor in _load_weight_file(path).items():
            if key in state:
                raise CheckpointImportError(f"{path}: tensor {key} also appears in another shard")
            state[key] = tensor
    return state


def _weight_keys(files: list[Path]) -> list[str]:
    """Tensor names without loading the tensors where the format allows it (used by detect_format)."""
    keys: list[str] = []
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys.extend(f.keys())
            except SafetensorError as e:
                raise CheckpointImportError(f"{path}: unreadable safetensors file: {e}") from None
        else:
            keys.extend(_load_weight_file(path))
    return keys


def _as_directory(src: str | Path) -> tuple[Path, list[Path] | None]:
    """(directory, explicit weight files or None): ``src`` is an HF directory or one weight file inside one."""
    path = Path(src)
    if path.is_dir():
        return path, None
    if path.is_file() and (path.suffix in (".safetensors", ".bin")):
        return path.parent, [path]
    raise CheckpointImportError(f"{src}: expected a checkpoint directory or a .safetensors/.bin file in one")


def _tokenizer_dir(directory: Path) -> str | None:
    return str(directory) if any((directory / name).is_file() for name in TOKENIZER_FILES) else None


def _provenance(source: Path, fmt: str, files: list[Path], raw_config: Mapping, notes: list[str]) -> dict:
    base = source if source.is_dir() else source.parent
    return {
        "source": str(source.resolve()),
        "format": fmt,
        "sha256": {str(f.resolve().relative_to(base.resolve())): file_sha256(f) for f in files},
        "original_architectures": list(raw_config.get("architectures") or []),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------------------
# The shared core: projections are dense or a pair of factors


FactorKeys = Callable[[str], tuple[str, str, tuple[str, ...]]]


@dataclass
class _Split:
    dense: dict[str, Tensor]
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]]
    consumed: set[str]


def _take_bias(
    state: Mapping[str, Tensor],
    keys: tuple[str, ...],
    out: int,
    consumed: set[str],
    geometry: _Geometry,
    module: str,
) -> Tensor | None:
    """The projection's bias under the first of ``keys`` present; present exactly when the config says so."""
    key = next((k for k in keys if k in state), None)
    if key is None:
        if geometry.has_bias(module):
            raise CheckpointImportError(
                f"missing tensor: {keys[0]} ({geometry.model_type} {module} has a bias)"
            )
        return None
    if not geometry.has_bias(module):
        raise CheckpointImportError(
            f"{key}: unexpected bias, the config gives {geometry.model_type} {module} no bias"
        )
    consumed.add(key)
    return _expect(key, state[key], (out,))


def _split_projections(
    state: Mapping[str, Tensor],
    geometry: _Geometry,
    factor_keys: FactorKeys,
    declared: Mapping[str, int],
    rank_source: str,
    notes: list[str],
    handled: frozenset[str] = frozenset(),
) -> _Split:
    """Sort every projection into dense or low-rank, checking shapes and declared ranks; take embeddings and norms.

    Modules in ``handled`` were already taken by the caller and are skipped.
    """
    split = _Split({}, {}, set())
    swapped: list[str] = []
    for module, (out, inn) in geometry.projections().items():
        if module in handled:
            continue
        u_key, v_key, bias_keys = factor_keys(module)
        if u_key in state or v_key in state:
            for key in (u_key, v_key):
                if key not in state:
                    partner = v_key if key == u_key else u_key
                    raise CheckpointImportError(f"missing tensor: {key} (its partner {partner} is present)")
            u, v, was_swapped = _orient(module, u_key, state[u_key], v_key, state[v_key], out, inn)
            if was_swapped:
                swapped.append(module)
            rank = u.shape[1]
            if module in declared and declared[module] != rank:
                raise CheckpointImportError(
                    f"{module}: {rank_source} declares rank {declared[module]}, found rank {rank} "
                    f"in {u_key} {_shape(state[u_key])} and {v_key} {_shape(state[v_key])}"
                )
            split.consumed.update((u_key, v_key))
            bias = _take_bias(state, bias_keys or (f"{module}.bias",), out, split.consumed, geometry, module)
            split.lowrank[module] = (u, v, bias)
        elif f"{module}.weight" in state:
            if module in declared:
                raise CheckpointImportError(
                    f"{module}: {rank_source} declares rank {declared[module]}, but the checkpoint holds a dense "
                    f"{module}.weight and no factors {u_key} / {v_key}"
                )
            key = f"{module}.weight"
            split.dense[key] = _expect(key, state[key], (out, inn))
            split.consumed.add(key)
            bias = _take_bias(state, (f"{module}.bias",), out, split.consumed, geometry, module)
            if bias is not None:
                split.dense[f"{module}.bias"] = bias
        elif module == "lm_head" and geometry.tied:
            continue
        else:
            raise CheckpointImportError(
                f"missing tensor: {module}.weight (dense) or {u_key} + {v_key} (factors) for {module}"
            )
    for key, shape in geometry.other_dense().items():
        if key not in state:
            raise CheckpointImportError(f"missing tensor: {key} (expected shape {list(shape)})")
        split.dense[key] = _expect(key, state[key], shape)
        split.consumed.add(key)
    if swapped:
        notes.append(
            f"{len(swapped)} projections store their factors the other way round from their names "
            f"(e.g. {swapped[0]}); oriented by shape"
        )
    return split


def _reject_leftovers(state: Mapping[str, Tensor], consumed: set[str], what: str, source: str) -> None:
    leftover = sorted(k for k in state if k not in consumed and not _IGNORED_KEYS.search(k))
    if leftover:
        more = f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise CheckpointImportError(
            f"{source}: unexpected tensors for a {what} checkpoint: {', '.join(leftover[:5])}{more}"
        )


def _measured_ratio(geometry: _Geometry, split: _Split, shared: Mapping[str, SharedGroup]) -> float:
    """Fraction of projection parameters removed (rankserve's ``ratio``), measured from tensor shapes."""
    dense_params = stored = 0
    for module, (out, inn) in geometry.projections().items():
        if module == "lm_head" and module not in split.lowrank:
            continue  # a dense lm_head is outside what the families compress
        dense_params += out * inn
        if module in split.lowrank:
            u, v, _ = split.lowrank[module]
            stored += u.numel() + v.numel()
        elif f"{module}.weight" in split.dense:
            stored += out * inn
    for group in shared.values():
        stored += group.basis.numel() + sum(c.numel() for c, _ in group.members.values())
    return round(1.0 - stored / dense_params, 6)


def _finish(
    family: str,
    config: dict,
    geometry: _Geometry,
    split: _Split,
    shared: dict[str, SharedGroup],
    provenance: dict,
    tokenizer_dir: str | None,
) -> ImportedModel:
    model = ImportedModel(family, config, split.dense, split.lowrank, shared, provenance, tokenizer_dir)
    provenance["ranks"] = model.ranks()
    provenance["ratio"] = _measured_ratio(geometry, split, shared)
    tensors = [*split.dense.values(), *(t for f in split.lowrank.values() for t in f if t is not None)]
    for group in shared.values():
        tensors.append(group.basis)
        tensors.extend(t for m in group.members.values() for t in m if t is not None)
    provenance["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return model


def _user_tokenizer(tokenizer: str | Path | None) -> str | None:
    if tokenizer is None:
        return None
    if not Path(tokenizer).exists():
        raise CheckpointImportError(f"tokenizer path {tokenizer} does not exist")
    return str(tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# ASVD and lowrankarena "u/v wrapped": HF directories with factor pairs


def _read_factored_directory(
    src: str | Path,
    tokenizer: str | Path | None,
    family: str,
    factor_keys: FactorKeys,
    rank_table: Callable[[dict], tuple[Any, str]],
) -> ImportedModel:
    directory, files = _as_directory(src)
    raw = _read_config(directory)
    model_type = _check_architecture(raw, str(src))
    geometry = _Geometry.from_config(raw, str(src))
    table, rank_source = rank_table(raw)
    declared = _declared_ranks(table, rank_source, str(src), geometry)
    files = files or _weight_files(directory)
    state = _load_weights(files)
    notes: list[str] = []
    split = _split_projections(state, geometry, factor_keys, declared, f"config {rank_source}", notes)
    _reject_leftovers(state, split.consumed, family, str(src))
    remote_code = sorted(p.name for p in directory.glob("*.py"))
    if remote_code:
        notes.append(f"ignored remote code (never imported): {', '.join(remote_code)}")
    config = _clean_config(raw, model_type, notes)
    provenance = _provenance(Path(src), family, [directory / "config.json", *files], raw, notes)
    tok = _user_tokenizer(tokenizer) or _tokenizer_dir(directory)
    return _finish(family, config, geometry, split, {}, provenance, tok)


def read_asvd(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """ASVD's HF export: ``{name}.BLinear.weight`` [r, in], ``{name}.ALinear.weight`` [out, r] (+ bias).

    Ranks in ``truncation_ranks`` must match the shapes; projections absent from it must be dense;
    ``lm_head`` may be factorized.
    """

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        return f"{module}.ALinear.weight", f"{module}.BLinear.weight", (f"{module}.ALinear.bias",)

    return _read_factored_directory(
        src, tokenizer, "asvd", factor_keys, lambda raw: (raw.get("truncation_ranks"), "truncation_ranks")
    )


def read_uv(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """lowrankarena's "u/v wrapped" export: ``{name}.v_proj.weight`` [r, in], ``{name}.u_proj.weight`` [out, r].

    ``low_rank_config.layers`` is optional; when present its ranks must match the shapes. Safetensors or
    ``pytorch_model*.bin`` (read with ``weights_only=True``).
    """

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        return (
            f"{module}.u_proj.weight",
            f"{module}.v_proj.weight",
            (f"{module}.u_proj.bias", f"{module}.bias"),
        )

    def rank_table(raw: dict) -> tuple[Any, str]:
        low_rank = raw.get("low_rank_config")
        return (low_rank.get("layers") if isinstance(low_rank, Mapping) else None), "low_rank_config.layers"

    return _read_factored_directory(src, tokenizer, "uv", factor_keys, rank_table)


# ---------------------------------------------------------------------------------------------------------------
# Basis Sharing


def _basis_groups(raw: Mapping, kind: str, layers: int, source: str) -> tuple[list[list[int]], int]:
    groups, rank = raw.get(f"{kind}_groups"), raw.get(f"num_basis_{kind}")
    if groups is None or rank is None:
        missing = f"{kind}_groups" if groups is None else f"num_basis_{kind}"
        raise CheckpointImportError(f"{source}: config lacks {missing}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CheckpointImportError(
            f"{source}: config num_basis_{kind} must be a positive int, found {rank!r}"
        )
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and g and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
        for g in groups
    ):
        raise CheckpointImportError(
            f"{source}: config {kind}_groups must be a list of non-empty lists of layer indices"
        )
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(layers)):
        raise CheckpointImportError(
            f"{source}: config {kind}_groups {groups} must cover layers 0..{layers - 1} exactly once"
        )
    return groups, rank


def _group_basis(
    state: Mapping[str, Tensor], kind: str, parent: str, group: list[int], shape: tuple[int, int]
) -> tuple[Tensor, list[str]]:
    """(the group's basis, every key it is stored under), after checking that all those copies agree."""
    aliases = [
        key
        for layer in group
        for key in (
            f"model.{kind}_basis.{layer}.weight",
            f"model.layers.{layer}.{parent}.{kind}_basis.weight",
        )
        if key in state
    ]
    if not aliases:
        raise CheckpointImportError(
            f"missing tensor: model.{kind}_basis.{group[0]}.weight (basis of {kind}_proj group {group})"
        )
    basis = _expect(aliases[0], state[aliases[0]], shape)
    for key in aliases[1:]:
        other = state[key]
        if tuple(other.shape) != tuple(basis.shape):
            detail = f"shapes {_shape(basis)} vs {_shape(other)}"
        elif not torch.equal(other, basis):
            detail = f"max |difference| {(other.float() - basis.float()).abs().max().item():.3g}"
        else:
            continue
        raise CheckpointImportError(
            f"{aliases[0]} and {key} should hold the one shared basis of {kind}_proj group {group}, "
            f"but they differ ({detail})"
        )
    return basis, aliases


def read_basis_sharing(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """Basis Sharing's ``save_pretrained``: one basis per group of layers, a coefficient per layer.

    For each projection kind x: ``model.{x}_basis.{i}.weight`` [r_x, in] (and per-layer aliases
    ``model.layers.{i}.{self_attn|mlp}.{x}_basis.weight``) must be identical within a group;
    ``model.layers.{i}...{x}_proj.weight`` is the coefficient [out, r_x]. Groups of several layers become one
    :class:`SharedGroup`; singleton groups are plain low-rank pairs (coefficient = U, basis = V).
    """
    directory, files = _as_directory(src)
    source = str(src)
    raw = _read_config(directory)
    model_type = _check_architecture(raw, source)
    geometry = _Geometry.from_config(raw, source)
    groups = {kind: _basis_groups(raw, kind, geometry.layers, source) for kind in PROJ_KINDS}
    files = files or _weight_files(directory)
    state = _load_weights(files)
    notes: list[str] = []

    # Every projection has a basis, so all are taken here; the shared core then takes lm_head, embeddings and
    # norms from what is left (the coefficients look like dense "_proj.weight" tensors, so they must go first).
    shared: dict[str, SharedGroup] = {}
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    consumed: set[str] = set()
    for kind in PROJ_KINDS:
        out, inn = geometry.proj_shape(kind)
        kind_groups, rank = groups[kind]
        parent = "self_attn" if kind in ATTN_KINDS else "mlp"
        for index, group in enumerate(kind_groups):
            basis, aliases = _group_basis(state, kind, parent, group, (rank, inn))
            consumed.update(aliases)
            members: dict[str, tuple[Tensor, Tensor | None]] = {}
            for layer in group:
                module = module_name(layer, kind)
                key = f"{module}.weight"
                if key not in state:
                    raise CheckpointImportError(
                        f"missing tensor: {key} (coefficient [{out}, {rank}] of {module})"
                    )
                coeff = _expect(key, state[key], (out, rank))
                consumed.add(key)
                members[module] = (
                    coeff,
                    _take_bias(state, (f"{module}.bias",), out, consumed, geometry, module),
                )
            if len(group) > 1:
                shared[f"{kind}_proj.g{index}"] = SharedGroup(basis, members)
            else:
                ((module, (coeff, bias)),) = members.items()
                lowrank[module] = (coeff, basis, bias)

    rest = {k: v for k, v in state.items() if k not in consumed}

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        # Basis Sharing never factorizes lm_head, the only projection left; these names never match.
        return f"{module}.coefficient.weight", f"{module}.basis.weight", ()

    handled = frozenset(module_name(layer, kind) for layer in range(geometry.layers) for kind in PROJ_KINDS)
    split = _split_projections(rest, geometry, factor_keys, {}, "config", notes, handled)
    _reject_leftovers(rest, split.consumed, "basis-sharing", source)
    split.lowrank.update(lowrank)
    config = _clean_config(raw, model_type, notes)
    provenance = _provenance(Path(src), "basis-sharing", [directory / "config.json", *files], raw, notes)
    provenance["groups"] = {kind: groups[kind][0] for kind in PROJ_KINDS}
    tok = _user_tokenizer(tokenizer) or _tokenizer_dir(directory)
    return _finish("basis-sharing", config, geometry, split, shared, provenance, tok)


# ---------------------------------------------------------------------------------------------------------------
# SVD-LLM: a whole pickled model


def _record_config(record: Any, source: str) -> tuple[dict, str]:
    """(raw config dict, model_type) from a pickled ``transformers`` config record."""
    if not isinstance(record, Record) or not isinstance(record.state, Mapping):
        raise CheckpointImportError(f"{source}: the pickled model has no config")
    raw = dict(record.state)
    model_type = _CONFIG_CLASSES.get(record.name) or raw.get("model_type")
    if model_type is None and record.name.endswith("Config"):
        model_type = record.name[: -len("Config")].lower()
    raw["model_type"] = model_type
    return raw, model_type


def _unpack_svd_llm(obj: Any, source: str) -> tuple[Record, Any]:
    if isinstance(obj, Mapping) and "model" in obj:
        model, tok = obj["model"], obj.get("tokenizer")
    else:
        model, tok = obj, None
    if not isinstance(model, Record) or not isinstance(model.state, Mapping) or "_modules" not in model.state:
        hint = (
            " (SVD-LLM *_profiling_*.pt files hold whitening matrices, not models)"
            if "_profiling_" in source
            else ""
        )
        raise CheckpointImportError(
            f"{source}: not an SVD-LLM checkpoint: expected {{'model': <pickled model>, 'tokenizer': ...}}{hint}"
        )
    return model, tok


def _rope_note(tensors: Mapping[str, Tensor], config: Mapping, head_dim: int) -> str | None:
    """SVD-LLM's Llama attention builds its rotary embedding with base 10000 whatever the config says."""
    inv = next((t for k, t in tensors.items() if k.endswith("rotary_emb.inv_freq")), None)
    if inv is None or inv.numel() < 2 or not inv.is_floating_point():
        return None
    base = float(inv[1].double() ** (-head_dim / 2))
    theta = float(config.get("rope_theta", 10000.0))
    if abs(base - theta) > 1e-3 * theta:
        return (
            f"the pickled rotary embedding uses base {base:.6g} but config rope_theta is {theta:.6g}: SVD-LLM's "
            "attention ignores rope_theta, so the authors' runs used the former; the config value is kept"
        )
    return None


def read_svd_llm(src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """SVD-LLM's ``torch.save({'model': model, 'tokenizer': tokenizer})``, read with the restricted unpickler.

    Factors ``{x}_v_proj`` [r, in] and ``{x}_u_proj`` [out, r] of every attention and MLP projection; the
    config comes from the pickled config object, the tokenizer is rebuilt from the pickled one when possible
    (else ``tokenizer_dir`` is None and the caller must supply one).
    """
    path = Path(src)
    if path.is_dir():
        candidates = [
            p for p in sorted(path.glob("*.pt")) if "_profiling_" not in p.name and zipfile.is_zipfile(p)
        ]
        if len(candidates) != 1:
            raise CheckpointImportError(
                f"{src}: expected exactly one SVD-LLM .pt archive, found {len(candidates)}"
            )
        path = candidates[0]
    source = str(path)
    model_rec, tok_rec = _unpack_svd_llm(load_restricted(path), source)
    raw, model_type = _record_config(model_rec.get("config"), source)
    raw.setdefault("architectures", [model_rec.name])
    _check_architecture(raw, source)
    geometry = _Geometry.from_config(raw, source)
    tensors = module_tensors(model_rec)
    notes = [f"pickled model class {model_rec.qualname}"]

    def factor_keys(module: str) -> tuple[str, str, tuple[str, ...]]:
        parent, _, proj = module.rpartition(".")
        kind = proj.removesuffix("_proj")
        prefix = f"{parent}.{kind}" if parent else kind
        return f"{prefix}_u_proj.weight", f"{prefix}_v_proj.weight", (f"{prefix}_u_proj.bias",)

    split = _split_projections(tensors, geometry, factor_keys, {}, "config", notes)
    _reject_leftovers(tensors, split.consumed, "svd-llm", source)
    rope = _rope_note(tensors, raw, geometry.head_dim)
    if rope:
        notes.append(rope)
    config = _clean_config(raw, model_type, notes, drop=_PRETRAINED_RUNTIME_KEYS)
    provenance = _provenance(path, "svd-llm", [path], raw, notes)
    keep = _kept_fractions(model_rec)
    if keep:
        provenance["svd_llm_ratio_attribute"] = keep
    tok = _user_tokenizer(tokenizer)
    if tok is None:
        tok = _recover_tokenizer(tok_rec, notes)
    return _finish("svd-llm", config, geometry, split, {}, provenance, tok)


def _kept_fractions(model_rec: Record) -> list[float]:
    """The distinct ``ratio`` attributes of SVD-LLM's attention/MLP modules (the fraction of parameters kept)."""
    found: set[float] = set()
    stack = [model_rec]
    seen: set[int] = set()
    while stack:
        rec = stack.pop()
        if id(rec) in seen:
            continue
        seen.add(id(rec))
        ratio = rec.get("ratio")
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and rec.name.startswith("SVD"):
            found.add(float(ratio))
        children = rec.get("_modules") or {}
        if isinstance(children, Mapping):
            stack.extend(c for c in children.values() if isinstance(c, Record))
    return sorted(found)


# ---- tokenizer recovery -------------------------------------------------------------------------------------

_TOKENIZER_SAMPLES = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234 + 5678 = 6912",
    "low-rank models serve faster",
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Record):  # tokenizers.AddedToken or transformers' AddedToken
        content = value.get("content")
        return content if isinstance(content, str) else None
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(tok_rec: Record) -> dict[str, str]:
    init_kwargs = tok_rec.get("init_kwargs") or {}
    specials: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        for value in (
            init_kwargs.get(name) if isinstance(init_kwargs, Mapping) else None,
            tok_rec.get(f"_{name}"),
        ):
            text = _token_text(value)
            if text:
                specials[name] = text
                break
    return specials


# The SentencePiece ModelProto is read by hand: sentencepiece is only an optional (test) dependency and its
# generated protobuf module needs protobuf, which rankserve does not install. Three fields are read.
_MAX_PROTO_BYTES = 16 << 20  # Llama's tokenizer.model is 0.5 MB, Gemma's 4 MB
_MAX_PIECE_CHARS = 256  # SentencePiece learns pieces of at most 16 characters by default
_MAX_VARINT_BYTES = 10  # a 64-bit varint; more is corrupt, and an endless one would grow a huge int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        if shift >= 7 * _MAX_VARINT_BYTES:
            raise ValueError("malformed protobuf varint (longer than 10 bytes)")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; enough to read a SentencePiece model."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _sentencepiece_vocab(proto: bytes) -> tuple[dict[str, int], bool]:
    """(piece -> id, add_dummy_prefix) from a serialized SentencePiece ModelProto; BPE models only."""
    if len(proto) > _MAX_PROTO_BYTES:
        raise ValueError(f"sp_model_proto is {len(proto):,} bytes, more than {_MAX_PROTO_BYTES:,}")
    pieces: list[str] = []
    model_type, add_dummy_prefix = 1, True  # proto defaults: UNIGRAM, prefix on
    for number, wire, value in _proto_fields(proto):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces
            piece = next((v for n, w, v in _proto_fields(value) if n == 1 and w == 2), b"").decode("utf-8")
            if len(piece) > _MAX_PIECE_CHARS:
                # Finding a piece's merges tries every split, so its cost grows with the square of its length.
                raise ValueError(
                    f"piece {len(pieces)} has {len(piece):,} characters, more than {_MAX_PIECE_CHARS}"
                )
            pieces.append(piece)
        elif number == 2 and wire == 2:  # TrainerSpec
            model_type = next((v for n, w, v in _proto_fields(value) if n == 3 and w == 0), model_type)
        elif number == 3 and wire == 2:  # NormalizerSpec
            add_dummy_prefix = bool(next((v for n, w, v in _proto_fields(value) if n == 3 and w == 0), 1))
    if model_type != 2:
        raise ValueError(f"SentencePiece model type {model_type} is not BPE")
    return {piece: i for i, piece in enumerate(pieces)}, add_dummy_prefix


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    # A SentencePiece BPE vocab lists merged pieces in merge order, so every split of a piece into two known
    # pieces is a merge ranked by the merged piece's id.
    merges = []
    for piece, pid in vocab.items():
        splits = [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((pid, left, right) for left, right in splits)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
    return [(left, right) for _, left, right in merges]


def _tokenizer_from_sentencepiece(tok_rec: Record, proto: bytes, notes: list[str]):
    from transformers import LlamaTokenizer

    vocab, add_dummy_prefix = _sentencepiece_vocab(proto)
    specials = _special_tokens(tok_rec)
    add_bos = tok_rec.get("add_bos_token", True)
    add_eos = tok_rec.get("add_eos_token", False)
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(vocab),
        legacy=bool(tok_rec.get("legacy", True)),
        add_prefix_space=add_dummy_prefix,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        **{k: v for k, v in specials.items() if k != "pad_token"},
    )
    try:
        import sentencepiece
    except ImportError:
        notes.append(
            "tokenizer rebuilt from sp_model_proto but not verified (sentencepiece is not installed)"
        )
        return tok
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    for text in _TOKENIZER_SAMPLES:
        expected = ([sp.bos_id()] if add_bos else []) + sp.encode(text) + ([sp.eos_id()] if add_eos else [])
        if tok(text).input_ids != expected:
            raise ValueError(f"rebuilt tokenizer disagrees with sentencepiece on {text!r}")
    notes.append("tokenizer rebuilt from the pickled sp_model_proto and checked against sentencepiece")
    return tok


def _tokenizer_from_json(tok_rec: Record, state: bytes | str, notes: list[str]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = state.decode("utf-8") if isinstance(state, bytes) else state
    backend = Tokenizer.from_str(text)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **_special_tokens(tok_rec))
    for sample in _TOKENIZER_SAMPLES:
        if tok(sample).input_ids != backend.encode(sample).ids:
            raise ValueError(f"rebuilt tokenizer disagrees with the pickled one on {sample!r}")
    notes.append("tokenizer rebuilt from the pickled tokenizers.Tokenizer JSON")
    return tok


def _recover_tokenizer(tok_rec: Any, notes: list[str]) -> str | None:
    """Rebuild the pickled tokenizer into a temporary directory; None (with a note) when that is not possible."""
    if not isinstance(tok_rec, Record):
        notes.append("no pickled tokenizer: pass --tokenizer")
        return None
    inner = tok_rec.get("_tokenizer")
    proto = tok_rec.get("sp_model_proto")
    try:
        if isinstance(inner, Record) and isinstance(inner.state, (bytes, str)):
            tok = _tokenizer_from_json(tok_rec, inner.state, notes)
        elif isinstance(proto, bytes):
            tok = _tokenizer_from_sentencepiece(tok_rec, proto, notes)
        else:
            notes.append(f"cannot rebuild the pickled {tok_rec.qualname}: pass --tokenizer")
            return None
    except Exception as e:  # noqa: BLE001 - any failure here only means "ask the user for a tokenizer"
        notes.append(
            f"cannot rebuild the pickled {tok_rec.qualname} ({type(e).__name__}: {e}): pass --tokenizer"
        )
        return None
    directory = owned_tempdir("rankserve-tokenizer-")  # pid-tagged: a killed import's copy is swept
    try:
        tok.save_pretrained(directory)
        if isinstance(proto, bytes):
            Path(directory, "tokenizer.model").write_bytes(proto)
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(directory, ignore_errors=True)
        notes.append(f"cannot write the rebuilt tokenizer ({type(e).__name__}: {e}): pass --tokenizer")
        return None
    notes.append(f"tokenizer written to temporary directory {directory} (the caller owns it)")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Dispatch

_READERS: dict[str, Callable[..., ImportedModel]] = {
    "svd-llm": read_svd_llm,
    "asvd": read_asvd,
    "basis-sharing": read_basis_sharing,
    "uv": read_uv,
}

_UV_KEY = re.compile(r"_proj\.(u|v)_proj\.weight$")


def _detect_directory(directory: Path, files: list[Path] | None, source: str) -> str:
    config = _read_config(directory)
    if "low_rank_schema" in config or "low_rank_modules" in config:
        raise CheckpointImportError(
            f"not supported: {source} is a lowrankarena ABLinear export (low_rank_schema)"
        )
    if "low_rank_config" in config:
        return "uv"
    if "dobi_target_modules" in config or (directory / "remapping_weight.pt").exists():
        raise CheckpointImportError(f"not supported: {source} is a Dobi-SVD export")
    if "truncation_ranks" in config:
        return "asvd"
    if any(key.startswith("num_basis_") for key in config):
        return "basis-sharing"
    keys = _weight_keys(files or _weight_files(directory))
    if any(_UV_KEY.search(k) for k in keys):
        return "uv"
    if any(k.endswith((".ALinear.weight", ".BLinear.weight")) for k in keys):
        return "asvd"  # no rank table: ranks come from shapes, factors are oriented by shape
    if any(re.search(r"(^|\.)(q|k|v|o|gate|up|down)_basis\.", k) for k in keys):
        return "basis-sharing"
    raise CheckpointImportError(f"cannot tell the checkpoint format of {source}: pass the format explicitly")


def detect_format(src: str | Path) -> str:
    """One of :data:`FAMILIES`, following FORMATS.md's dispatch order; raises for unknown or unsupported layouts.

    A torch zip archive is ``svd-llm``. A directory (or a weight file in one) is decided by its config:
    ``low_rank_schema``/``low_rank_modules`` (unsupported) → ``low_rank_config`` (uv) → ``dobi_target_modules``
    (unsupported) → ``truncation_ranks`` (asvd) → ``num_basis_*`` (basis-sharing); else by tensor names.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointImportError(f"{src} does not exist")
    try:
        if path.is_file() and path.suffix not in (".safetensors", ".bin"):
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    if any(n.endswith("/data.pkl") for n in archive.namelist()):
                        return "svd-llm"
            raise CheckpointImportError(f"{src}: not a torch zip archive nor a checkpoint directory")
        if path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.pt")):
            return "svd-llm"
        directory, files = _as_directory(path)
        return _detect_directory(directory, files, str(src))
    except CheckpointImportError:
        raise
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
        raise CheckpointImportError(f"cannot read {src}: {type(e).__name__}: {e}") from None


def read_checkpoint(fmt: str, src: str | Path, tokenizer: str | Path | None = None) -> ImportedModel:
    """Read ``src`` in format ``fmt`` (one of :data:`FAMILIES`, or ``"auto"`` to detect it).

    ``tokenizer`` (a directory or file) overrides whatever tokenizer the source has. Every failure is a
    :class:`CheckpointImportError` with a message naming the file or tensor at fault; nothing is returned
    half-read.
    """
    if fmt == "auto":
        fmt = detect_format(src)
    reader = _READERS.get(fmt)
    if reader is None:
        raise CheckpointImportError(
            f"unknown checkpoint format {fmt!r}; choose from {', '.join(FAMILIES)} or auto"
        )
    if not Path(src).exists():
        raise CheckpointImportError(f"{src} does not exist")
    try:
        return reader(src, tokenizer)
    except CheckpointImportError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointImportError(f"cannot import {src} as {fmt}: {type(e).__name__}: {e}") from None
