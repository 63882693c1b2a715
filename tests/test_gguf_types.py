"""Every GGUF tensor type the ``gguf`` package can dequantize loads, alone or mixed in one file; others fail in
one line that names the tensor and the type."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny import tiny_model

from rankserve.loaders.gguf_export import export_gguf, permute_qk
from rankserve.loaders.gguf_file import GGUFError, read_gguf
from rankserve.loaders.weights import build_model

# Rows of 256 fit every block size (the K and IQ quants pack 256 weights per block).
SHAPE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _dequantizable(t: Q) -> bool:
    block, size = GGML_QUANT_SIZES[t]
    try:
        dequantize(np.zeros((1, 256 // block * size), np.uint8), t)
    except NotImplementedError:
        return False
    return True


DEQUANTIZABLE = [t for t in Q if _dequantizable(t)]


def encode(a: np.ndarray, t: Q, rng: np.random.Generator) -> np.ndarray:
    """``a`` [rows, n] stored as type ``t``: the gguf package's quantizer where it has one, otherwise random
    valid blocks. Bytes below 0x3C keep every fp16/fp8 scale a block holds (little-endian, so its high byte is
    one of them) finite and below 1, whatever the block layout."""
    try:
        return quantize(a, t)
    except NotImplementedError:
        block, size = GGML_QUANT_SIZES[t]
        return rng.integers(0, 0x3C, size=(a.shape[0], a.shape[1] // block * size), dtype=np.uint8)


def requantize(src: str, dst: str, type_of) -> None:
    """Copy the GGUF ``src`` to ``dst`` with each 2-D tensor stored as ``type_of(name)`` (1-D stay F32, as in
    llama.cpp's files): what llama-quantize does, with random blocks for types the gguf package cannot encode."""
    reader = GGUFReader(src)
    w = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        a = np.array(t.data, dtype=np.float32)
        qtype = type_of(t.name) if a.ndim == 2 else Q.F32
        data = encode(a, qtype, rng)
        w.add_tensor(t.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_weights_equal_dequantize(path: str, model) -> None:
    """Each loaded weight equals ``gguf.quants.dequantize`` of the file's bytes, in llama.cpp's Q/K order."""
    cfg = model.config
    state = model.state_dict()
    hf = {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(cfg.num_hidden_layers) for g, h in _NAMES}
    hf.update(token_embd="model.embed_tokens", output_norm="model.norm", output="lm_head")
    for t in GGUFReader(path).tensors:
        stem, _, suffix = t.name.rpartition(".")
        ref = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        ours = state[f"{hf[stem]}.{suffix}"].numpy()
        if cfg.architecture.gguf_qk_permuted and stem.endswith(("attn_q", "attn_k")):
            ours = permute_qk(
                ours, cfg.num_attention_heads if stem.endswith("q") else cfg.num_key_value_heads
            )
        assert np.isfinite(ref).all(), t.name
        assert np.array_equal(ours, ref), f"{t.name} ({t.tensor_type.name})"


_NAMES = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
]


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-types")
    return {
        v: export_gguf(tiny_model(v, **SHAPE), str(root / f"{v}.gguf"), "f32")
        for v in ("llama-gqa", "qwen2-bias")
    }


def load_and_run(path: str):
    cfg, tensors = read_gguf(path)
    model = build_model(cfg, tensors)
    with torch.no_grad():
        logits = model(TOKENS)
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_every_dequantizable_type_loads(f32_files, tmp_path, qtype):
    path = str(tmp_path / f"{qtype.name}.gguf")
    requantize(f32_files["qwen2-bias"], path, lambda name: qtype)
    check_weights_equal_dequantize(path, load_and_run(path))


def test_mixed_types_in_one_file(f32_files, tmp_path):
    """A Q4_K_M-like mix (llama.cpp's usual choice: Q6_K for the output and ffn_down, Q4_K elsewhere) with Q5_0,
    Q8_0 and F16 tensors beside, in the permuted (llama) Q/K order."""
    types = {"output": Q.Q6_K, "token_embd": Q.Q8_0, "attn_v": Q.Q5_0, "ffn_down": Q.Q6_K, "attn_k": Q.F16}
    seen = set()

    def type_of(name):
        seen.add(t := types.get(name.rsplit(".", 2)[-2], Q.Q4_K))
        return t

    path = str(tmp_path / "mixed.gguf")
    requantize(f32_files["llama-gqa"], path, type_of)
    assert {Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.F16} <= seen
    check_weights_equal_dequantize(path, load_and_run(path))


UNSUPPORTED = [t for t in Q if not _dequantizable(t) and t.name.startswith("Q")][:2]  # e.g. Q8_1, Q8_K


@pytest.mark.parametrize("qtype", UNSUPPORTED, ids=lambda t: t.name)
def test_type_gguf_cannot_dequantize_is_one_line(f32_files, tmp_path, qtype):
    path = str(tmp_path / "bad.gguf")
    requantize(f32_files["llama-gqa"], path, lambda name: qtype if "blk.1.ffn_up" in name else Q.F32)
    with pytest.raises(GGUFError, match=rf"'blk.1.ffn_up.weight' has type {qtype.name}, which"):
        read_gguf(path)


def test_type_unknown_to_gguf_is_one_line(f32_files, tmp_path):
    """A type id newer than the installed gguf package: the reader itself refuses the file."""
    data = bytearray(open(f32_files["llama-gqa"], "rb").read())
    name = b"blk.0.attn_v.weight"
    at = data.index(name) + len(name) + 4 + 8 * 2  # after the name: n_dims (u32), 2 dims (u64), then the type
    assert int.from_bytes(data[at : at + 4], "little") == Q.F32
    data[at : at + 4] = (250).to_bytes(4, "little")
    path = tmp_path / "future.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"not a readable GGUF file .*250") as e:
        read_gguf(str(path))
    assert "\n" not in str(e.value)
