"""Write a dense model as a GGUF for the llama.cpp baselines, laid out as llama.cpp's converter does.

F32, F16 and Q8_0 are written here with the ``gguf`` package (Q8_0 by ``gguf.quants``, the port of ggml's
quantizer that llama.cpp's own converter uses); Q4_K_M is made from the F32 file by llama.cpp's own
``llama_model_quantize`` (through llama-cpp-python), because its per-tensor type mix is llama.cpp's rule and
``gguf.quants`` cannot quantize Q4_K or Q6_K. :func:`cached_gguf` keeps one file per (source, type).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Iterator

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


# file type -> how its 2-D tensors are written (1-D tensors, norms and biases, stay F32 as llama.cpp keeps them)
WRITTEN_TYPES = ("f32", "f16", "q8_0")
# file type -> llama.cpp's ``llama_ftype`` name: made from the F32 file by llama.cpp's own quantizer
LLAMA_QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
FILE_TYPES = (*WRITTEN_TYPES, *LLAMA_QUANTIZED)


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[str]:
    """A temporary file next to ``path`` to write; it becomes ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tensor_type(ftype: str):
    import gguf

    return {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[ftype]


def _write_2d(w, name: str, arr: np.ndarray, qtype) -> None:
    """One 2-D tensor in ``qtype``; as llama.cpp's converter does, a row that is not a whole number of quant
    blocks (32 for Q8_0) falls back to F16."""
    import gguf

    try:
        data = gguf.quants.quantize(arr, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(arr, qtype)
    w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)


def export_gguf(model, path: str, dtype: str = "f32", tokenizer_from: str | None = None) -> str:
    """Write ``model`` (dense projections only) to ``path`` atomically as F32, F16 or Q8_0 (``dtype``);
    ``tokenizer_from`` is a GGUF whose ``tokenizer.*`` metadata is copied so that llama.cpp can tokenize
    (without it the file says ``no_vocab``: llama.cpp runs token ids only)."""
    import gguf

    if dtype not in WRITTEN_TYPES:
        hint = f" ({dtype} is made by quantize_gguf from the f32 file)" if dtype in LLAMA_QUANTIZED else ""
        raise InputError(f"GGUF export type must be one of {', '.join(WRITTEN_TYPES)}, got {dtype!r}{hint}")
    for n, p in projections(model).items():
        if not isinstance(p, DenseLinear) or p.is_int8():
            what = "int8" if p.is_int8() else type(p).__name__
            raise InputError(f"GGUF export needs a dense float model; {n} is {what}")
    cfg = model.config
    arch = cfg.architecture  # the GGUF arch name and Q/K order llama.cpp's converter would write
    qtype, file_type = _tensor_type(dtype)
    with _atomic(path) as tmp:
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
        w.add_file_type(file_type)
        if not tokenizer_from:
            # no vocabulary to copy: llama.cpp then loads the model with dummy tokens and runs token ids
            w.add_tokenizer_model("no_vocab")
        else:
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
            if arr.ndim == 2:
                _write_2d(w, _gguf_name(name), np.ascontiguousarray(arr), qtype)
            else:  # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type
                w.add_tensor(_gguf_name(name), np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def quantize_gguf(src: str, dst: str, ftype: str = "q4_k_m", threads: int = 0) -> str:
    """llama.cpp's own quantizer (``llama_model_quantize``) from the GGUF ``src`` (F32 for the least loss) to
    ``dst``, atomically: the per-tensor type mix of ``ftype`` is llama.cpp's rule (``llama_tensor_get_type``),
    no imatrix. Needs llama-cpp-python; ``threads`` 0 lets llama.cpp choose."""
    if ftype not in LLAMA_QUANTIZED:
        raise InputError(
            f"llama.cpp quantization type must be one of {', '.join(LLAMA_QUANTIZED)}, got {ftype!r}"
        )
    try:
        import llama_cpp
    except ImportError:
        raise InputError(
            f"GGUF {ftype.upper()} is made by llama.cpp's quantizer: pip install 'rankserve[llamacpp]'"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[ftype])
    params.nthread = threads
    with _atomic(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with code {rc}")
    return dst


def cached_gguf(source: str, ftype: str) -> str:
    """The dense model ``source`` as a GGUF of ``ftype`` (one of :data:`FILE_TYPES`) in rankserve's cache,
    written on first use, keyed by the source's name, size and mtime. A Q4_K_M file is quantized from the
    cached F32 one. The tokenizer metadata is copied when the source is a GGUF."""
    from rankserve.fsutil import cache_dir
    from rankserve.loaders.source import load_model, resolve

    if ftype not in FILE_TYPES:
        raise InputError(f"GGUF type must be one of {', '.join(FILE_TYPES)}, got {ftype!r}")
    kind, path = resolve(source)
    st = os.stat(path)
    # "v2": exports since the per-architecture Q/K order (Qwen2 is no longer permuted, Mistral is a "llama")
    stem = f"{os.path.basename(path.rstrip('/'))}-{st.st_size}-{int(st.st_mtime)}"
    out = cache_dir("gguf", f"{stem}-{ftype}-v2.gguf")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if ftype in LLAMA_QUANTIZED:
        return quantize_gguf(cached_gguf(source, "f32"), out, ftype)
    lm = load_model(source, dtype="fp32")
    if lm.kind == "rankserve" and lm.manifest.get("family") not in (None, "dense"):
        raise InputError(f"{source} is compressed ({lm.manifest['family']}); llama.cpp runs its dense source")
    export_gguf(lm.model, out, ftype, tokenizer_from=path if kind == "gguf" else None)
    return out
