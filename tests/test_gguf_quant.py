"""Quantized GGUF exports for the llama.cpp baselines: Q8_0 written with ``gguf.quants``, Q4_K_M by llama.cpp.

The files must hold what their type promises (read back through rankserve's GGUF reader and compared with the
``gguf`` package's own quantize/dequantize of the original weights), and llama.cpp itself must compute the same
logits from them as rankserve's eager path on the dequantized weights (skipped without llama-cpp-python).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_model

from rankserve.loaders.gguf_export import export_gguf, permute_qk, quantize_gguf
from rankserve.loaders.gguf_file import gguf_weight_bytes, read_gguf, unpermute_qk
from rankserve.loaders.weights import build_model

Q8 = gguf.GGMLQuantizationType.Q8_0
# intermediate 144 is not a whole number of 32-wide Q8_0 blocks: down_proj must fall back to F16 (as the converter)
SHAPE = dict(intermediate_size=144)
TOKENS = [1, 17, 42, 99, 5, 77, 3, 120, 64, 8, 31, 100]


def _gguf_layout(model, name: str, arr: np.ndarray, back: bool = False) -> np.ndarray:
    """The tensor in the GGUF's row order (llama.cpp's interleaved Q/K rows for the archs that permute), or
    with ``back`` from that order to the HF one."""
    cfg = model.config
    if not cfg.architecture.gguf_qk_permuted or not (".q_proj." in name or ".k_proj." in name):
        return arr
    heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
    return unpermute_qk(arr, heads) if back else permute_qk(arr, heads)


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mha", "qwen2-bias"])
def test_q8_0_export_reads_back_as_gguf_dequantizes(variant, tmp_path):
    model = tiny_model(variant, **SHAPE)
    path = export_gguf(model, str(tmp_path / "m.gguf"), "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    cfg, got = read_gguf(path)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = w.numpy()
        if arr.ndim == 1:  # norms and biases stay F32: exact
            assert torch.equal(got[name], w), name
            continue
        wide = arr.shape[1] % 32 == 0
        # the reference: the gguf package's own round trip of the original weights, in the file's row order
        stored = _gguf_layout(model, name, arr)
        rt = (
            gguf.quants.dequantize(gguf.quants.quantize(stored, Q8), Q8)
            if wide
            else stored.astype(np.float16)
        )
        ref = _gguf_layout(model, name, rt.astype(np.float32), back=True)
        assert np.array_equal(got[name].numpy(), ref), name
        # Q8_0's own promise: within half a step (block max / 127 / 2), plus 127 times the fp16 rounding of the step
        if wide:
            blocks = np.abs(arr).reshape(arr.shape[0], -1, 32).max(-1, keepdims=True)
            err = np.abs(got[name].numpy() - arr).reshape(arr.shape[0], -1, 32)
            assert (err <= blocks / 127 * (0.5 + 127 * 2**-11)).all(), name
    kinds = {n.rsplit(".", 1)[0].split(".")[-1]: t for n, t in types.items() if n.endswith("weight")}
    assert kinds["ffn_down"] == gguf.GGMLQuantizationType.F16  # 144 columns: the converter's F16 fallback
    assert kinds["attn_q"] == Q8 and kinds["token_embd"] == Q8
    assert kinds["attn_norm"] == gguf.GGMLQuantizationType.F32


def test_gguf_weight_bytes_counts_the_stored_types(tmp_path):
    model = tiny_model("llama-mha", **SHAPE)  # tied: the embedding is also the LM head
    f32 = export_gguf(model, str(tmp_path / "f32.gguf"), "f32")
    q8 = export_gguf(model, str(tmp_path / "q8.gguf"), "q8_0")
    total32, tok32 = gguf_weight_bytes(f32)
    params = sum(p.numel() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    assert total32 == 4 * params
    assert tok32 == 4 * (
        params + emb.shape[1]
    )  # every weight (the embedding as LM head) plus one embedding row
    total8, tok8 = gguf_weight_bytes(q8)
    assert total8 < 0.5 * total32 and tok8 < 0.5 * tok32  # 34 bytes per 32 weights, F16 and F32 for the rest


def test_export_refuses_what_it_cannot_write(tmp_path):
    from rankserve.errors import InputError

    model = tiny_model("llama-gqa")
    with pytest.raises(InputError, match="quantize_gguf"):
        export_gguf(model, str(tmp_path / "m.gguf"), "q4_k_m")
    with pytest.raises(InputError, match="must be one of"):
        export_gguf(model, str(tmp_path / "m.gguf"), "q3_k")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself on the files

# max |llama.cpp logits - rankserve eager logits on the dequantized weights| / max |rankserve logits|. Both run the
# same stored weights; llama.cpp also rounds activations: its F16 KV cache (all types), to Q8_0 blocks for a Q8_0
# matmul and to Q8_K for a K-quant one. Measured here: F32 6.4e-4, Q8_0 1.0e-2 and 2.2e-2, Q4_K_M 2.8e-2 and 3.1e-2.
LLAMA_BOUNDS = {"f32": 2e-3, "q8_0": 4e-2, "q4_k_m": 6e-2}


def _llama_logits(path: str, tokens: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (rankserve[llamacpp])"
    )
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens)
    return torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float32)


def _compare(path: str, bound: float) -> float:
    ours_model = build_model(*read_gguf(path))  # rankserve's reader: the dequantized weights
    with torch.no_grad():
        ours = ours_model(torch.tensor([TOKENS]))[0]
    ref = _llama_logits(path, TOKENS)
    err = ((ref - ours).abs().max() / ours.abs().max()).item()
    assert err <= bound, f"{path}: llama.cpp vs rankserve relative error {err:.2e} > {bound:.0e}"
    return err


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-mha"])
def test_llama_cpp_q8_0_logits_equal_rankserve_on_the_dequantized_weights(variant, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (rankserve[llamacpp])")
    path = export_gguf(tiny_model(variant, **SHAPE), str(tmp_path / "q8.gguf"), "q8_0")  # no_vocab: token ids
    _compare(path, LLAMA_BOUNDS["q8_0"])


@pytest.mark.parametrize("batch", [None, 1])
def test_bench_reads_llama_cpp_last_logits_whatever_the_batching(batch, tmp_path):
    """The bench's llama.cpp runner picks its greedy tokens from the newest logits, batched prompt or not (one
    token per graph is its fallback where a batched prompt crashes): the same rows as a ``logits_all`` run."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (rankserve[llamacpp])")
    from rankserve.bench.backends import _llama, llama_cpp_last_logits
    from rankserve.bench.spec import BenchSpec

    path = export_gguf(tiny_model("llama-gqa", **SHAPE), str(tmp_path / "f32.gguf"), "f32")
    ref = _llama_logits(path, TOKENS + [TOKENS[0]])
    llm = _llama(path, BenchSpec(model=path, prompt_len=len(TOKENS), new_tokens=4, threads=1), batch)
    llm.eval(TOKENS)
    first = torch.from_numpy(llama_cpp_last_logits(llm).copy())
    llm.eval([TOKENS[0]])  # one decode step
    step = torch.from_numpy(llama_cpp_last_logits(llm).copy())
    for got, want in ((first, ref[len(TOKENS) - 1]), (step, ref[len(TOKENS)])):
        assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert not torch.equal(first, step)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_cpp_q4_k_m_mix(tie, tmp_path):
    """llama.cpp's quantizer through the bindings: K-quants where rows are whole 256-blocks, its Q4_K_M mix
    (Q6_K for the LM head and for some attn_v/ffn_down), and logits that rankserve's reader reproduces."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (rankserve[llamacpp])")
    model = tiny_model("llama-gqa", hidden_size=256, intermediate_size=512, tie_word_embeddings=tie)
    f32 = export_gguf(model, str(tmp_path / "f32.gguf"), "f32")
    q4 = quantize_gguf(f32, str(tmp_path / "q4km.gguf"), "q4_k_m", threads=1)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["token_embd.weight" if tie else "output.weight"] == "Q6_K"
    assert "Q6_K" in {types[f"blk.{i}.ffn_down.weight"] for i in range(2)}
    assert gguf_weight_bytes(q4)[0] < 0.25 * gguf_weight_bytes(f32)[0]
    _compare(f32, LLAMA_BOUNDS["f32"])  # the comparison itself is tight: what Q4_K_M adds is its own
    _compare(q4, LLAMA_BOUNDS["q4_k_m"])
