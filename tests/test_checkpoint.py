"""The rankserve checkpoint: exact round trips, the basis stored once, atomic saves, clear errors, golden files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

import rankserve.io.safetensors as st
from rankserve import checkpoint as ckpt
from rankserve.checkpoint import (
    FORMAT_VERSION,
    RATIO_CONVENTION,
    CheckpointError,
    build_manifest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from rankserve.io.safetensors import read_header
from rankserve.layers import LowRankLinear, SharedBasisLinear, projections, replace_module

GOLDEN = Path(__file__).parent / "golden"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def lowrank_(model, names: list[str], rank: int):
    """Replace projections by the truncated SVD of their weight, √Σ folded into both factors."""
    for name in names:
        p = projections(model)[name]
        u, s, vh = torch.linalg.svd(p.dense_weight().detach(), full_matrices=False)
        root = s[:rank].sqrt()
        replace_module(
            model,
            name,
            LowRankLinear.from_factors(u[:, :rank] * root, root[:, None] * vh[:rank], p.bias),
        )
    return model


def share_(model, names: list[str], rank: int, group: str):
    """Replace projections by one shared basis B [r, in] (top right singular vectors of the stacked weights)
    and per-layer coefficients C = W Bᵀ."""
    projs = projections(model)
    stacked = torch.cat([projs[n].dense_weight().detach() for n in names])  # (sum out, in)
    basis = torch.nn.Parameter(torch.linalg.svd(stacked, full_matrices=False)[2][:rank].contiguous(), False)
    for n in names:
        p = projs[n]
        replace_module(
            model, n, SharedBasisLinear(basis, p.dense_weight().detach() @ basis.T, p.bias, group=group)
        )
    return model


def layer_names(model, kinds: list[str]) -> list[str]:
    return [n for n in projections(model) if n.rsplit(".", 1)[-1] in kinds]


def make(kind: str):
    if kind == "dense":
        return tiny_model("llama-gqa")
    if kind == "lowrank":
        m = tiny_model("llama-gqa")
        return lowrank_(m, layer_names(m, ATTN + MLP), 8)
    if kind == "mixed":  # biases on q/k/v, some layers low-rank, the rest dense
        m = tiny_model("qwen2-bias")
        return lowrank_(
            m,
            ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
            + layer_names(m, ["up_proj"]),
            12,
        )
    if kind == "shared":  # tied embeddings; one basis for all q_proj, one for all gate/up, low-rank down
        m = tiny_model("llama-mha")
        share_(m, layer_names(m, ["q_proj"]), 16, "q_proj.g0")
        share_(m, layer_names(m, ["gate_proj", "up_proj"]), 24, "gate_up.g0")
        return lowrank_(m, layer_names(m, ["down_proj"]), 10)
    raise ValueError(kind)


TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.inference_mode():
        return model(TOKENS)


def save(model, path, **kw):
    manifest = build_manifest(model, family=kw.pop("family", "test"), ratio=kw.pop("ratio", None), **kw)
    return save_checkpoint(model, path, tokenizer=tiny_tokenizer(), manifest=manifest)


@pytest.mark.parametrize("kind", ["dense", "lowrank", "mixed", "shared"])
def test_round_trip_gives_identical_logits(tmp_path, kind):
    model = make(kind)
    out = save(model, tmp_path / "ck", family=kind, ratio=0.3)
    loaded, manifest = load_checkpoint(out)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-6
    assert {n: p.kind for n, p in projections(loaded).items()} == {
        n: p.kind for n, p in projections(model).items()
    }
    assert manifest["format_version"] == FORMAT_VERSION and manifest["family"] == kind
    assert manifest["ratio"] == 0.3 and manifest["ratio_convention"] == RATIO_CONVENTION
    assert not any(p.requires_grad or p.is_meta for p in loaded.parameters())


def test_manifest_describes_the_model(tmp_path):
    model = make("shared")
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    m = build_manifest(model, family="basis-sharing", source_path=str(src), extra={"wall_time_s": 1.5})
    q0 = m["projections"]["model.layers.0.self_attn.q_proj"]
    assert q0 == {"kind": "shared", "shape": [64, 64], "rank": 16, "bias": False, "group": "q_proj.g0"}
    assert m["projections"]["model.layers.1.mlp.down_proj"]["rank"] == 10
    assert m["projections"]["lm_head"]["kind"] == "dense"
    assert m["shared_bases"]["gate_up.g0"] == {
        "shape": [24, 64],
        "members": [f"model.layers.{i}.mlp.{k}" for i in range(2) for k in ("gate_proj", "up_proj")],
    }
    # Counts: decoder projections only, each basis once; the LM head is not counted.
    decoder = [p for n, p in projections(model).items() if n != "lm_head"]
    assert m["params_linear_dense"] == sum(p.in_features * p.out_features for p in decoder)
    assert m["params_linear"] == sum(p.param_count(count_shared=False) for p in decoder) + 16 * 64 + 24 * 64
    assert m["ratio_measured"] == pytest.approx(1 - m["params_linear"] / m["params_linear_dense"], abs=1e-6)
    assert m["source"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert m["source"]["hashed"] == "file" and m["wall_time_s"] == 1.5
    assert m["dtype"] == "float32" and m["created_by"].startswith("rankserve ")
    with pytest.raises(CheckpointError, match="replace a standard key"):
        build_manifest(model, extra={"ratio": 0.5})


def test_directory_source_hashes_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "README.md").write_text("not hashed")
    m = build_manifest(make("dense"), source_path=str(tmp_path))
    assert "config.json, model.safetensors" in m["source"]["hashed"]
    before = m["source"]["sha256"]
    (tmp_path / "README.md").write_text("changed")
    assert build_manifest(make("dense"), source_path=str(tmp_path))["source"]["sha256"] == before
    (tmp_path / "model.safetensors").write_bytes(b"y" * 10)
    assert build_manifest(make("dense"), source_path=str(tmp_path))["source"]["sha256"] != before


def test_shared_basis_stored_once_and_loaded_as_one_parameter(tmp_path):
    model = make("shared")
    out = save(model, tmp_path / "ck")
    weights = os.path.join(out, "model.safetensors")
    keys = set(load_file(weights))
    assert {"shared_bases.q_proj.g0", "shared_bases.gate_up.g0"} <= keys
    assert not any(k.endswith(".basis") for k in keys)
    assert "lm_head.weight" not in keys  # tied: the embedding is stored once
    # The file holds every unique parameter exactly once: its size is the header plus their bytes.
    unique = sum(p.numel() for p in model.parameters()) * 4
    _, data_start = read_header(weights)
    assert os.path.getsize(weights) == data_start + unique

    loaded, _ = load_checkpoint(out)
    qs = [loaded.get_submodule(f"model.layers.{i}.self_attn.q_proj") for i in range(2)]
    assert qs[0].basis is qs[1].basis
    assert sum(p.numel() for p in loaded.parameters()) * 4 == unique
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_file_is_standard_safetensors(tmp_path):
    model = make("lowrank")
    out = save(model, tmp_path / "ck")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    sd = model.state_dict()
    assert tensors.keys() == sd.keys()
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert json.loads((Path(out) / "config.json").read_text())["hidden_size"] == 64


def test_bf16_checkpoint_loads_in_either_dtype(tmp_path):
    model = make("mixed").to(torch.bfloat16)
    model.init_buffers()  # .to() also cast the fp32 RoPE frequencies; a loaded model recomputes them
    out = save(model, tmp_path / "ck")
    assert read_manifest(out)["dtype"] == "bfloat16"
    bf, _ = load_checkpoint(out, dtype=torch.bfloat16)
    assert torch.equal(logits(bf), logits(model))
    fp, _ = load_checkpoint(out, dtype=torch.float32)
    assert fp.model.embed_tokens.weight.dtype == torch.float32


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    written = []

    def failing_writer(tensors, path, metadata):
        with open(path, "wb") as f:
            for t in tensors.values():
                if len(written) == 3:
                    raise RuntimeError("disk full")
                written.append(t)
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    monkeypatch.setattr(st, "save_file", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        save(make("lowrank"), tmp_path / "ck")
    assert len(written) == 3  # it did fail midway
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary directory


def test_existing_directory_refused_unless_overwrite(tmp_path, monkeypatch):
    out = save(make("dense"), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        save(make("dense"), out)
    # A failed overwrite keeps the old checkpoint.
    monkeypatch.setattr(st, "save_file", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    model = make("lowrank")
    manifest = build_manifest(model)
    with pytest.raises(RuntimeError):
        save_checkpoint(model, out, tokenizer=None, manifest=manifest, overwrite=True)
    assert read_manifest(out)["projections"]["model.layers.0.mlp.up_proj"]["kind"] == "dense"
    monkeypatch.undo()
    save_checkpoint(model, out, tokenizer=tiny_tokenizer(), manifest=manifest, overwrite=True)
    assert read_manifest(out)["projections"]["model.layers.0.mlp.up_proj"]["kind"] == "lowrank"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_manifest_must_match_the_model(tmp_path):
    manifest = build_manifest(make("dense"))
    with pytest.raises(CheckpointError, match="does not describe this model"):
        save_checkpoint(make("lowrank"), tmp_path / "ck", tokenizer=None, manifest=manifest)
    assert not (tmp_path / "ck").exists()


@pytest.fixture
def saved(tmp_path) -> Path:
    return Path(save(make("mixed"), tmp_path / "ck"))


def edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "rankserve.json").read_text())
    fn(m)
    (path / "rankserve.json").write_text(json.dumps(m))


def test_bad_json_manifest(saved):
    (saved / "rankserve.json").write_text('{"format_version": 1,')
    with pytest.raises(CheckpointError, match="rankserve.json: not valid JSON"):
        load_checkpoint(saved)


def test_unknown_format_version(saved):
    edit_manifest(saved, lambda m: m.update(format_version=7))
    with pytest.raises(CheckpointError, match=r"format_version 7 is not supported .*reads version 1"):
        load_checkpoint(saved)


def test_missing_manifest_key(saved):
    edit_manifest(saved, lambda m: m.pop("projections"))
    with pytest.raises(CheckpointError, match="missing key.* projections"):
        read_manifest(saved)


def test_rank_disagreeing_with_tensor(saved):
    name = "model.layers.0.self_attn.q_proj"
    edit_manifest(saved, lambda m: m["projections"][name].update(rank=5))
    with pytest.raises(
        CheckpointError, match=rf"module {name}: manifest rank 5, tensor {name}\.U has shape \[64, 12\]"
    ):
        load_checkpoint(saved)


def rewrite_weights(path: Path, fn) -> None:
    tensors = {k: v.clone() for k, v in load_file(path / "model.safetensors").items()}
    fn(tensors)
    ckpt.write_safetensors(str(path / "model.safetensors"), tensors, {"format": "pt"})


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.V"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.V"):
        load_checkpoint(saved)


def test_unexpected_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.layers.0.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.0\.extra"):
        load_checkpoint(saved)


def test_truncated_weights(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a rankserve checkpoint"):
        read_manifest(tmp_path)


def test_load_model_reads_a_checkpoint_with_its_tokenizer(tmp_path):
    from rankserve.loaders.source import load_model

    model = make("shared")
    out = save(model, tmp_path / "ck", family="basis-sharing")
    lm = load_model(out)
    assert lm.kind == "rankserve" and lm.manifest["family"] == "basis-sharing"
    assert torch.equal(logits(lm.model), logits(model))
    ids = lm.tokenizer.encode("hi there")
    assert ids[0] == 1 and lm.tokenizer.decode(ids) == "hi there"
    assert lm.tokenizer.eos_ids == [2] and lm.tokenizer.has_chat_template


def test_golden_v1_checkpoint_still_loads():
    """Files written by format version 1 must keep loading with the same logits (see golden/make_golden.py)."""
    model, manifest = load_checkpoint(GOLDEN / "v1_tiny")
    assert manifest["format_version"] == 1
    assert {p.kind for p in projections(model).values()} == {"dense", "lowrank", "shared"}
    expected = load_file(GOLDEN / "v1_tiny.expected.safetensors")
    with torch.inference_mode():
        got = model(expected["tokens"])
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-5)
