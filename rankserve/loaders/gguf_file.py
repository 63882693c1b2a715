"""GGUF files (llama.cpp): config from metadata, tensors dequantized, Q/K rows in the HF layout."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from rankserve.config import SUPPORTED_MODEL_TYPES, ModelConfig, model_type_for_gguf
from rankserve.errors import InputError

log = logging.getLogger(__name__)

# GGUF tensor name (per block) -> HF name
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(InputError):
    pass


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    """A :class:`ModelConfig` from the GGUF metadata (``<arch>.*`` keys)."""
    arch = _field(reader, "general.architecture")
    model_type = model_type_for_gguf(arch)
    if model_type is None:
        archs = sorted({a.gguf_arch for a in SUPPORTED_MODEL_TYPES.values()})
        raise GGUFError(f"not supported: GGUF architecture {arch!r} (supported: {', '.join(archs)})")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    d = dict(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length") or g("rope.dimension_count") or hidden // n_heads),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    d["attention_bias"] = "blk.0.attn_q.bias" in names
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"not supported: GGUF rope scaling {_field(reader, f'{arch}.rope.scaling.type')!r}")
    return ModelConfig.from_hf(d)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order for the archs whose converter permutes (``gguf_qk_permuted``): GGUF
    interleaves each head's rotary pairs (2i, 2i+1), HF keeps the two halves apart (i, i + hd/2).
    Rows [n_heads * hd, ...] (a bias is a one-column case)."""
    shape = w.shape
    hd = shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors from a GGUF reader, dequantized once each."""
    from gguf.quants import dequantize

    permuted = cfg.architecture.gguf_qk_permuted
    out = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")  # e.g. "blk.3.attn_q", "weight"
        if stem.startswith("blk."):
            _, idx, part = stem.split(".", 2)
            if part not in _BLOCK_NAMES:
                raise GGUFError(f"not supported: GGUF tensor {t.name!r}")
            name = f"model.layers.{idx}.{_BLOCK_NAMES[part]}.{suffix}"
        elif stem in _TOP_NAMES:
            name = f"{_TOP_NAMES[stem]}.{suffix}"
        elif stem == "rope_freqs":  # Llama-3 scaling factors baked in; we rebuild them from config
            raise GGUFError(
                "not supported: GGUF with baked rope_freqs (Llama-3 rope scaling); use the HF directory"
            )
        else:
            raise GGUFError(f"not supported: GGUF tensor {t.name!r}")
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"not supported: GGUF tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                "cannot dequantize; requantize the file to a supported type (e.g. Q8_0, Q4_K, F16)"
            ) from None
        a = np.asarray(a, dtype=np.float32).reshape(
            [int(x) for x in reversed(t.shape)]
        )  # ggml order is reversed
        if permuted and stem.endswith("attn_q"):
            a = unpermute_qk(a, cfg.num_attention_heads)
        elif permuted and stem.endswith("attn_k"):
            a = unpermute_qk(a, cfg.num_key_value_heads)
        # Copy into torch-owned memory: GEMV over numpy's (4 KB-page) allocations measured ~4x slower here than
        # over the same values in torch's allocations (prefetchers and TLB reach stop at page boundaries).
        # Unquantized tensors are read-only views of the file, so they need the copy anyway.
        out[name] = torch.tensor(np.ascontiguousarray(a))
    return out


def read_gguf(path: str):
    """(config, tensors) of a GGUF file."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on a bad file
        raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader)
    return cfg, gguf_tensors(reader, cfg)


def gguf_weight_bytes(path: str) -> tuple[int, int]:
    """(bytes of every tensor, weight bytes read per decoded token) of a GGUF file, stored types as they are.

    Per token, the rule of :func:`rankserve.analysis.model_stats`: every projection, norm and the LM head
    whole, and one row of the embedding (whose whole matrix is the LM head when the file ties them).
    """
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    names = {t.name for t in tensors}
    total = per_token = 0
    for t in tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight":
            rows = int(t.shape[1])  # ggml order: ne[0] is the row length, ne[1] the rows
            per_token += n // rows + (n if "output.weight" not in names else 0)
        else:
            per_token += n
    return total, per_token
