"""Model configuration: one dataclass for the Llama family, read from and written to HF ``config.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rankserve.errors import InputError


@dataclass(frozen=True)
class Architecture:
    """The rules of one HF ``model_type``: which model file runs it and how its files are laid out."""

    family: str  # model family file; near-identical architectures share one implementation
    hf_class: str  # HF ``architectures[0]``
    gguf_arch: str  # ``general.architecture`` that llama.cpp's converter (convert_hf_to_gguf.py) writes
    # The converter reorders Q/K rows (and biases) into adjacent rotary pairs where llama.cpp's rope is the
    # "normal" (GPT-J) kind: its LlamaModel class does (undo_permute), its Qwen2Model (NeoX rope) does not.
    gguf_qk_permuted: bool


# HF model_type -> its rules. The converter writes HF Mistral as a "llama" GGUF, so "llama" reads back as llama.
SUPPORTED_MODEL_TYPES = {
    "llama": Architecture("llama", "LlamaForCausalLM", gguf_arch="llama", gguf_qk_permuted=True),
    "mistral": Architecture("llama", "MistralForCausalLM", gguf_arch="llama", gguf_qk_permuted=True),
    "qwen2": Architecture("llama", "Qwen2ForCausalLM", gguf_arch="qwen2", gguf_qk_permuted=False),
}


def model_type_for_gguf(gguf_arch: str) -> str | None:
    """The HF ``model_type`` rankserve reads a GGUF ``general.architecture`` as (the first that writes it)."""
    return next((t for t, a in SUPPORTED_MODEL_TYPES.items() if a.gguf_arch == gguf_arch), None)


class ConfigError(InputError):
    """A config that rankserve cannot run, with the reason."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 sets it)
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # every other key of the source config, kept for round trips

    @property
    def architecture(self) -> Architecture:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @property
    def family(self) -> str:
        return self.architecture.family

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Build from an HF ``config.json`` dict; raise :class:`ConfigError` for what we cannot run."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise ConfigError(
                f"not supported: model_type {model_type!r} (architectures {archs}); rankserve runs "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required keys: {', '.join(missing)}")
        n_heads = _int(d, "num_attention_heads")
        n_kv = _int(d, "num_key_value_heads", n_heads, maximum=n_heads)
        hidden = _int(d, "hidden_size")
        head_dim = _int(d, "head_dim", hidden // n_heads)
        if head_dim < 1 or head_dim % 2:
            raise ConfigError(
                f"config head_dim must be a positive even integer (RoPE rotates pairs), found {head_dim} "
                f"(hidden_size {hidden}, num_attention_heads {n_heads})"
            )
        if n_heads % n_kv:
            raise ConfigError(
                f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
            )
        # transformers >= 5 moved rope settings into "rope_parameters"; older files keep rope_theta/rope_scaling.
        rope = _mapping(d, "rope_parameters")
        theta = _positive(d, "rope_theta", _positive(rope, "rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(
                    f"config rope_scaling must be an object or null, found {type(scaling).__name__} {scaling!r}"
                )
            rtype = scaling.get("rope_type") or scaling.get("type")
            if rtype not in (None, "default", "llama3"):
                raise ConfigError(f"not supported: rope scaling type {rtype!r} (supported: default, llama3)")
            if rtype in (None, "default"):
                scaling = None
            else:
                _check_llama3_scaling(scaling)
        known = {f.name for f in dataclasses.fields(cls)} | {
            "rope_parameters",
            "num_key_value_heads",
            "head_dim",
        }
        attention_bias = _bool(d, "attention_bias", model_type == "qwen2")
        return cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=_positive(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=_int(d, "max_position_embeddings", 2048),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            # Qwen2 always has q/k/v bias and no config key for it; Llama says attention_bias (q/k/v/o).
            attention_bias=attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=_bool(d, "mlp_bias", False),
            model_type=model_type,
            bos_token_id=_token_ids(d, "bos_token_id", single=True),
            eos_token_id=_token_ids(d, "eos_token_id", single=False),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers and :meth:`from_hf` both read back to this config."""
        d = dict(self.extra)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            mlp_bias=self.mlp_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
        d.setdefault("architectures", [self.architecture.hf_class])
        return d

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])


# ---- validation of HF config values: one line naming the key, the value found and what is expected ----------

# Upper bounds far above any released model (405B: hidden 16384, 126 layers; Gemma: vocab 262k, head_dim 256),
# low enough that a hostile config cannot make the loader allocate or loop without end.
_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 28,
}
_REQUIRED = object()


def _int(d: dict, key: str, default: Any = _REQUIRED, maximum: int | None = None) -> int:
    """``d[key]`` as a positive int no larger than its limit; a missing or null optional key gives ``default``."""
    value = d.get(key)
    if value is None and default is not _REQUIRED:
        return default
    limit = maximum if maximum is not None else _LIMITS.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (limit and value > limit):
        bound = f" no larger than {limit:,}" if limit else ""
        raise ConfigError(f"config {key} must be a positive integer{bound}, found {value!r}")
    return value


def _positive(d: dict, key: str, default: float) -> float:
    value = d.get(key)
    if value is None:
        return float(default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ConfigError(f"config {key} must be a positive finite number, found {value!r}")
    return float(value)


def _bool(d: dict, key: str, default: bool) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config {key} must be true or false, found {value!r}")
    return value


def _mapping(d: dict, key: str) -> dict:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config {key} must be an object or null, found {type(value).__name__} {value!r}")
    return value


def _token_ids(d: dict, key: str, single: bool) -> int | list[int] | None:
    value = d.get(key)
    ids = value if isinstance(value, list) and not single else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        what = "a token id" if single else "a token id or a list of them"
        raise ConfigError(f"config {key} must be {what} (non-negative integers) or null, found {value!r}")
    return value


def _check_llama3_scaling(scaling: dict) -> None:
    """The numbers Llama-3 RoPE scaling divides by must be positive, and high_freq_factor above low_freq_factor."""
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = scaling.get(key, 1.0 if key != "factor" else None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ConfigError(f"config rope_scaling.{key} must be a positive finite number, found {value!r}")
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    if high <= low:
        raise ConfigError(
            f"config rope_scaling.high_freq_factor ({high}) must be larger than low_freq_factor ({low})"
        )
