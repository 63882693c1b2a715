"""Write a dense model as an F32 or F16 GGUF (for llama.cpp baselines), laid out as llama.cpp's converter does."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from rankserve.errors import InputError
from rankserve.layers import DenseLinear, projections

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's interleaved pairs (the inverse of ``gguf_file.unpermute_qk``)."""
    shape = w.shape
    hd = shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, idx, rest = hf_name.split(".", 3)
        stem, _, suffix = rest.rpartition(".")
        return f"blk.{idx}.{_HF_TO_GGUF[stem]}.{suffix}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def export_gguf(model, path: str, dtype: str = "f32", tokenizer_from: str | None = None) -> str:
    """Write ``model`` (dense projections only) to ``path`` atomically; ``tokenizer_from`` is a GGUF whose
    ``tokenizer.*`` metadata is copied so that llama.cpp can tokenize."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise InputError(f"GGUF export dtype must be f32 or f16, got {dtype!r}")
    bad = [n for n, p in projections(model).items() if not isinstance(p, DenseLinear)]
    if bad:
        raise InputError(
            f"GGUF export needs a dense model; {bad[0]} is {type(model.get_submodule(bad[0])).__name__}"
        )
    cfg = model.config
    arch = cfg.architecture  # the GGUF arch name and Q/K order llama.cpp's converter would write
    np_dtype = np.float32 if dtype == "f32" else np.float16
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch.gguf_arch)
        w.add_name("rankserve export")
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_value(f"{arch.gguf_arch}.vocab_size", cfg.vocab_size, gguf.GGUFValueType.UINT32)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        if tokenizer_from:
            reader = gguf.GGUFReader(tokenizer_from)
            for key, field in reader.fields.items():
                if key.startswith("tokenizer."):
                    vtype = field.types[0]
                    sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
                    w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            arr = t.detach().to(torch.float32).cpu().numpy()
            if arch.gguf_qk_permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                arr = permute_qk(arr, cfg.num_attention_heads)
            elif arch.gguf_qk_permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                arr = permute_qk(arr, cfg.num_key_value_heads)
            # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type
            w.add_tensor(
                _gguf_name(name), np.ascontiguousarray(arr.astype(np_dtype if arr.ndim == 2 else np.float32))
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
