"""Loaders: HF directories, GGUF files, and their error messages."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import random_tensors, tiny_hf_config, tiny_model

from rankserve.config import ConfigError, ModelConfig
from rankserve.io.safetensors import SafetensorsError, load_mmap
from rankserve.loaders.gguf_export import export_gguf
from rankserve.loaders.gguf_file import read_gguf
from rankserve.loaders.hf_dir import read_hf_dir
from rankserve.loaders.source import SourceError, resolve
from rankserve.loaders.weights import WeightError, build_model

TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def write_hf_dir(path, variant="llama-gqa", shards=1, tensors=None, **over):
    os.makedirs(path, exist_ok=True)
    d = tiny_hf_config(variant, **over)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    tensors = tensors if tensors is not None else random_tensors(ModelConfig.from_hf(d))
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, os.path.join(path, fname))
            weight_map.update({k: fname for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    return d, tensors


@pytest.mark.parametrize("variant,shards", [("llama-gqa", 1), ("qwen2-bias", 3), ("llama-mha", 2)])
def test_hf_dir_roundtrip(tmp_path, variant, shards):
    d, tensors = write_hf_dir(tmp_path, variant, shards)
    cfg, loaded = read_hf_dir(str(tmp_path))
    model = build_model(cfg, loaded)
    ref = build_model(ModelConfig.from_hf(d), tensors)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), ref(TOKENS))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_safetensors_are_memory_mapped(tmp_path):
    from rankserve.io.safetensors import read_header

    write_hf_dir(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_mmap(path)
    header, _ = read_header(path)
    a, b = "model.norm.weight", "model.embed_tokens.weight"
    # views of one mapping: addresses differ exactly by the file offsets (a copy would not)
    delta = tensors[a].data_ptr() - tensors[b].data_ptr()
    assert delta == header[a]["data_offsets"][0] - header[b]["data_offsets"][0]


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias", "llama-mha", "mistral"])
def test_gguf_roundtrip(tmp_path, variant):
    model = tiny_model(variant)
    path = export_gguf(model, str(tmp_path / "m.gguf"), "f32")
    cfg, tensors = read_gguf(path)
    again = build_model(cfg, tensors)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    with torch.no_grad():
        assert (again(TOKENS) - model(TOKENS)).abs().max().item() <= 1e-5
    # the file holds llama.cpp's order: q rows differ from HF's for the permuted archs (llama, mistral) only;
    # tests/test_llamacpp_gguf.py checks that order against llama.cpp's own converter
    import gguf

    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    same = torch.equal(torch.from_numpy(raw.data.copy()), model.model.layers[0].self_attn.q_proj.weight)
    assert same == (not model.config.architecture.gguf_qk_permuted)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_config())
    tensors = random_tensors(cfg)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 64)
    with pytest.raises(
        WeightError, match=r"model.layers.1.mlp.up_proj.weight has shape \(10, 64\).*\(144, 64\)"
    ):
        build_model(cfg, tensors)


def test_missing_tensor_is_named():
    cfg = ModelConfig.from_hf(tiny_hf_config())
    tensors = random_tensors(cfg)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(WeightError, match="missing tensor.*model.layers.0.self_attn.k_proj.weight"):
        build_model(cfg, tensors)


def test_missing_lm_head_ties_a_copy_of_the_config():
    cfg = ModelConfig.from_hf(tiny_hf_config())
    assert not cfg.tie_word_embeddings
    tensors = random_tensors(cfg)
    del tensors["lm_head.weight"]
    model = build_model(cfg, tensors)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not cfg.tie_word_embeddings  # the caller's config is not changed


def test_unsupported_architecture():
    with pytest.raises(ConfigError, match="not supported: model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_truncated_safetensors(tmp_path):
    write_hf_dir(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_hf_dir(str(tmp_path))


def test_resolve_errors(tmp_path):
    with pytest.raises(SourceError, match="model not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(SourceError, match="not a GGUF"):
        resolve(str(tmp_path / "x.bin"))


def test_config_roundtrip_through_hf_dict():
    for variant in ["llama-gqa", "qwen2-bias", "llama3-rope", "mistral"]:
        cfg = ModelConfig.from_hf(tiny_hf_config(variant))
        again = ModelConfig.from_hf(cfg.to_hf())
        assert again == cfg
