"""int8 checkpoints (format 2) and the quantize CLI: exact round trips, the manifest record, hostile files, golden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import edit_manifest, logits, make, rewrite_weights
from test_hostile_files import cli_fails
from test_loaders import write_hf_dir
from tiny_tok import tiny_tokenizer

from rankserve.checkpoint import (
    CheckpointError,
    build_manifest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    with_quantization,
)
from rankserve.cli.main import main
from rankserve.layers import projections
from rankserve.loaders.source import load_model
from rankserve.quantize import Int8Config, quantize_

GOLDEN = Path(__file__).parent / "golden"


def save_int8(model, path, cfg: Int8Config):
    manifest = build_manifest(model, family="test")
    report = quantize_(model, cfg)
    return save_checkpoint(
        model, path, tokenizer=tiny_tokenizer(), manifest=with_quantization(manifest, model, report)
    )


@pytest.mark.parametrize("kind", ["dense", "mixed", "shared"])
@pytest.mark.parametrize("cfg", [Int8Config(), Int8Config(group_size=16, lm_head=True)])
def test_round_trip_is_exact(tmp_path, kind, cfg):
    model = make(kind)
    path = save_int8(model, tmp_path / "c", cfg)
    loaded, manifest = load_checkpoint(path)
    assert torch.equal(logits(loaded), logits(model))
    assert manifest["format_version"] == 2
    q = manifest["quantization"]
    assert q["scheme"] == "int8-sym" and q["config"] == cfg.to_dict()
    stored = load_file(Path(path) / "model.safetensors")
    int8 = {k for k, t in stored.items() if t.dtype == torch.int8}
    assert int8 == set(q["tensors"])
    assert all(stored[k + "_scale"].dtype == torch.float32 for k in int8)
    assert ("lm_head.weight" in int8) == cfg.lm_head


def test_shared_basis_stored_once_and_tied_head_apart(tmp_path):
    model = make("shared")  # tied embeddings
    path = save_int8(model, tmp_path / "c", Int8Config(lm_head=True))
    stored = load_file(Path(path) / "model.safetensors")
    assert stored["shared_bases.q_proj.g0"].dtype == torch.int8
    assert stored["shared_bases.q_proj.g0_scale"].shape == (16, 64 // 16)  # the first factor: groups of 16
    assert not any(k.endswith(("q_proj.basis", "q_proj.basis_scale")) for k in stored)
    loaded, _ = load_checkpoint(path)
    a, b = loaded.model.layers[0].self_attn.q_proj, loaded.model.layers[1].self_attn.q_proj
    assert a.basis is b.basis and a.basis_scale is b.basis_scale
    assert loaded.lm_head.weight.dtype == torch.int8
    assert loaded.model.embed_tokens.weight.dtype == torch.float32


def test_bf16_load_keeps_int8_and_fp32_scales(tmp_path):
    path = save_int8(make("mixed"), tmp_path / "c", Int8Config())
    loaded, _ = load_checkpoint(path, dtype=torch.bfloat16)
    p = loaded.model.layers[0].self_attn.q_proj
    assert p.V.dtype == torch.int8 and p.V_scale.dtype == torch.float32 and p.mat("V").dtype == torch.bfloat16
    assert logits(loaded).dtype == torch.bfloat16


def test_save_refuses_a_manifest_without_the_record(tmp_path):
    model = make("dense")
    quantize_(model, Int8Config())
    with pytest.raises(CheckpointError, match="int8 record does not describe"):
        save_checkpoint(model, tmp_path / "c", tokenizer=None, manifest=build_manifest(model))
    assert not (tmp_path / "c").exists()


# ---- hostile files: one clear line each ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return Path(save_int8(make("lowrank"), tmp_path / "c", Int8Config(group_size=16)))


def test_unknown_scheme(saved):
    edit_manifest(saved, lambda m: m["quantization"].update(scheme="int4-asym"))
    with pytest.raises(CheckpointError, match="scheme 'int4-asym' is not known"):
        load_checkpoint(saved)


def test_record_needs_format_2_and_format_2_needs_a_record(saved):
    edit_manifest(saved, lambda m: m.update(format_version=1))
    with pytest.raises(CheckpointError, match="needs format_version 2"):
        load_checkpoint(saved)
    edit_manifest(saved, lambda m: (m.update(format_version=2), m.pop("quantization")))
    with pytest.raises(CheckpointError, match="no quantization record"):
        load_checkpoint(saved)


def test_group_disagreeing_with_the_config(saved):
    def bump(m):
        m["quantization"]["tensors"]["model.layers.0.mlp.up_proj.V"] = 32

    edit_manifest(saved, bump)
    with pytest.raises(CheckpointError, match="up_proj.V has group 32, but its config .* gives 16"):
        load_checkpoint(saved)


def test_negative_scale_and_float_weight(saved):
    def negate(t):
        t["model.layers.1.self_attn.o_proj.U_scale"] = -t["model.layers.1.self_attn.o_proj.U_scale"]

    rewrite_weights(saved, negate)
    with pytest.raises(CheckpointError, match="o_proj.U: int8 scales must be finite and non-negative"):
        load_checkpoint(saved)


def test_int8_tensor_stored_as_float(tmp_path):
    path = Path(save_int8(make("dense"), tmp_path / "c", Int8Config(lm_head=False)))
    rewrite_weights(path, lambda t: t.update({"lm_head.weight_scale": torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_checkpoint(path)
    key = "model.layers.0.mlp.down_proj.weight"
    rewrite_weights(path, lambda t: (t.pop("lm_head.weight_scale"), t.update({key: t[key].float()})))
    with pytest.raises(CheckpointError, match=f"{key} has dtype torch.float32, but the manifest says int8"):
        load_checkpoint(path)


def test_golden_v2_int8_checkpoint_still_loads():
    """Files written by format version 2 (int8) keep loading with the same logits (golden/make_golden.py)."""
    model, manifest = load_checkpoint(GOLDEN / "v2_int8_tiny")
    assert manifest["format_version"] == 2 and manifest["quantization"]["config"]["group_size"] == 8
    assert all(p.is_int8() for p in projections(model).values())
    expected = load_file(GOLDEN / "v2_int8_tiny.expected.safetensors")
    with torch.inference_mode():
        got = model(expected["tokens"])
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-5)


# ---- CLI ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    d = tmp_path / "hf"
    write_hf_dir(d, max_position_embeddings=64)
    tiny_tokenizer().save(str(d))
    return d


def test_cli_quantizes_dense_and_compressed_and_the_result_runs(hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(["quantize", str(hf_dir), "--int8", "--group-size", "16", "--lm-head", "--out", str(out)]) == 0
    )
    assert "SQNR min" in capsys.readouterr().out
    m = read_manifest(out)
    assert m["family"] == "dense" and m["quantization"]["config"] == Int8Config(16, True).to_dict()
    ref, lm = load_model(str(hf_dir)), load_model(str(out))
    rel = (logits(lm.model) - logits(ref.model)).norm() / logits(ref.model).norm()
    assert 0 < rel < 0.05
    assert main(["generate", str(out), "--prompt", "hi", "--max-tokens", "3"]) == 0
    plain = tmp_path / "plain"
    argv = [
        "quantize",
        str(hf_dir),
        "--int8",
        "--no-lm-head",
        "--factor-group-size",
        "channel",
        "--out",
        str(plain),
    ]
    assert main(argv) == 0
    assert read_manifest(plain)["quantization"]["config"] == Int8Config(None, False, None).to_dict()
    assert main(["inspect", str(out)]) == 0
    assert "quantized: int8-sym, groups of 16, LM head int8" in capsys.readouterr().out
    # compress and quantize in one step keeps the compression record
    both = tmp_path / "both"
    argv = [
        "compress",
        str(hf_dir),
        "--family",
        "svd",
        "--ratio",
        "0.3",
        "--quant",
        "int8",
        "--quant-smooth",
        "--calib-seq-len",
        "32",
        "--out",
        str(both),
    ]
    assert main(argv) == 0
    m = read_manifest(both)
    assert m["family"] == "svd" and m["quantization"]["config"]["group_size"] is None
    assert m["quantization"]["config"]["smooth"] is True
    # svd at 0.3 factorizes every projection of the tiny model: both norm groups of its 2 layers
    printed = capsys.readouterr().out
    assert (
        "int8 (per channel, first factors in groups of 16, 4 norm groups smoothed, with the LM head)"
        in printed
    )
    assert main(["generate", str(both), "--prompt", "hi", "--max-tokens", "3"]) == 0


def test_cli_bad_input_is_one_line_and_writes_nothing(hf_dir, tmp_path, capsys):
    out = ["--out", tmp_path / "X"]  # cli_fails checks that nothing appears there
    cli_fails(
        tmp_path, ["quantize", hf_dir, "--int8", "--group-size", "7", *out], "divides none", "(64, 144)"
    )
    cli_fails(tmp_path, ["quantize", hf_dir, "--int8", "--group-size", "0", *out], "positive integer")
    cli_fails(tmp_path, ["quantize", hf_dir, *out], "--int8")
    argv = ["compress", hf_dir, "--family", "svd", "--ratio", "0.2", "--quant-lm-head", *out]
    cli_fails(tmp_path, argv, "--quant-lm-head need --quant int8")
    argv = ["compress", hf_dir, "--family", "svd", "--ratio", "0.2", "--quant-factor-group-size", "8", *out]
    cli_fails(tmp_path, argv, "--quant-factor-group-size need --quant int8")
    argv = ["quantize", hf_dir, "--int8", "--factor-group-size", "0", *out]
    cli_fails(tmp_path, argv, "factor_group_size must be a positive integer")
    done = tmp_path / "done"
    assert main(["quantize", str(hf_dir), "--int8", "--out", str(done)]) == 0
    cli_fails(tmp_path, ["quantize", done, "--int8", *out], "already holds int8 weights")
    cli_fails(tmp_path, ["compress", done, "--family", "svd", "--ratio", "0.2", *out], "holds int8 weights")
    # the fast backend runs int8 (decode_layer dequantizes in registers) and agrees with the eager reference
    outs = []
    for backend in ("eager", "fast"):
        argv = ["generate", str(done), "--prompt", "a b", "--max-tokens", "6", "--backend", backend, "--json"]
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert outs[0] == outs[1]
    # the record lists every tensor with its group: per channel here, so the full widths
    rec = json.loads((done / "rankserve.json").read_text())["quantization"]
    assert set(rec["tensors"].values()) == {64, 144}
