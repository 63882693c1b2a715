"""Public SVD checkpoints -> rankserve checkpoints: same logits, ranks and shared bases kept, failures write nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostile_zips import global_call_pickle, write_torch_zip
from importer_fixtures import (  # noqa: F401 (_private_tempdir is an autouse fixture)
    _private_tempdir,
    tiny_config,
    write_asvd,
    write_basis_sharing,
    write_svd_llm,
    write_uv,
)
from importer_reference import reference_logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_tok import tiny_tokenizer

from rankserve.checkpoint import RATIO_CONVENTION
from rankserve.importers import CheckpointImportError, read_checkpoint
from rankserve.layers import SharedBasisLinear, projections
from rankserve.loaders.convert import import_checkpoint, imported_to_model
from rankserve.loaders.source import load_model

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save(str(d))
    return d


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "svd-llm": write_svd_llm(root / "svd-llm"),  # tokenizer rebuilt from the pickle
        "asvd": write_asvd(root / "asvd", shards=2),  # tokenizer files in the directory
        "basis-sharing": write_basis_sharing(root / "basis-sharing"),
        "uv": write_uv(root / "uv"),
        "asvd-qwen2": write_asvd(root / "asvd-qwen2", config=tiny_config(model_type="qwen2")),
        "uv-qwen2": write_uv(root / "uv-qwen2", config=tiny_config(model_type="qwen2"), file_format="bin"),
    }


# layouts whose fixture carries no tokenizer: the tiny one is passed
NEEDS_TOKENIZER = {"basis-sharing", "uv", "uv-qwen2"}


def _import(fx, name, tok_dir, out, **kw):
    tokenizer = tok_dir if name in NEEDS_TOKENIZER else None
    return import_checkpoint(fx.family, fx.path, out, tokenizer=tokenizer, **kw)


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(TOKENS).float()


def _copy(fx, tmp_path: Path) -> Path:
    dst = tmp_path / "src" / fx.path.name
    dst.parent.mkdir(exist_ok=True)
    (shutil.copytree if fx.path.is_dir() else shutil.copy)(fx.path, dst)
    return dst


# ---- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svd-llm", "asvd", "basis-sharing", "uv", "asvd-qwen2", "uv-qwen2"])
def test_import_reproduces_the_reference_logits(fixtures, tok_dir, tmp_path, name):
    fx = fixtures[name]
    out = _import(fx, name, tok_dir, tmp_path / "out")
    assert out == str(tmp_path / "out")
    lm = load_model(out)
    diff = (_logits(lm) - reference_logits(fx, TOKENS)).abs().max().item()
    assert diff <= 1e-5, diff

    m = lm.manifest
    assert m["family"] == fx.family and m["family_config"]["imported_from"] == fx.family
    assert {n: e["rank"] for n, e in m["projections"].items() if e["rank"] is not None} == fx.ranks
    assert m["ratio"] == m["ratio_measured"] and 0 < m["ratio"] < 1
    assert m["ratio_convention"] == RATIO_CONVENTION
    assert m["source"]["path"] == str(fx.path.resolve()) and len(m["source"]["sha256"]) == 64
    assert m["provenance"]["format"] == fx.family and m["provenance"]["ranks"] == fx.ranks
    assert lm.config.model_type == fx.config["model_type"]
    for module, bias in fx.biases.items():
        torch.testing.assert_close(lm.model.get_submodule(module).bias.float(), bias)
    assert lm.tokenizer.encode("Hi")  # a working tokenizer was saved with it
    leftovers = [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("rankserve-")]
    assert not leftovers, "a temporary tokenizer directory was left behind"
    assert not (fx.path.parent / "REMOTE_CODE_WAS_IMPORTED").exists()


def test_tied_embeddings(fixtures, tok_dir, tmp_path):
    src = _copy(fixtures["uv"], tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    out = import_checkpoint("uv", src, tmp_path / "out", tokenizer=tok_dir)
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    lm = load_model(out)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    # tied random embeddings give logits ~20x larger than the other fixtures: fp32 noise scales with them
    torch.testing.assert_close(_logits(lm), reference_logits(src, TOKENS), rtol=1e-5, atol=1e-5)


def test_bf16_import(fixtures, tok_dir, tmp_path):
    fx = fixtures["asvd"]
    out = _import(fx, "asvd", tok_dir, tmp_path / "out", dtype="bf16")
    lm = load_model(out, dtype="bf16")
    assert lm.manifest["dtype"] == "bfloat16"
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    torch.testing.assert_close(_logits(lm), reference_logits(fx, TOKENS), rtol=0.1, atol=0.15)


def test_basis_sharing_keeps_bases_shared(fixtures, tok_dir, tmp_path):
    fx = fixtures["basis-sharing"]
    out = _import(fx, "basis-sharing", tok_dir, tmp_path / "out")
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sorted(k for k in keys if k.startswith("shared_bases.")) == sorted(
        f"shared_bases.{g}" for g in fx.groups
    )
    assert not [k for k in keys if k.endswith(".basis")]  # never one copy per member
    lm = load_model(out)
    assert {g: sorted(b["members"]) for g, b in lm.manifest["shared_bases"].items()} == {
        g: sorted(m) for g, m in fx.groups.items()
    }
    projs = projections(lm.model)
    for group, members in fx.groups.items():
        mods = [projs[m] for m in members]
        assert all(isinstance(p, SharedBasisLinear) and p.group == group for p in mods)
        assert all(p.basis is mods[0].basis for p in mods), group
    n_params = sum(p.numel() for p in lm.model.parameters())  # a shared basis counted once
    assert n_params == sum(t.numel() for t in load_file(str(Path(out) / "model.safetensors")).values())


def test_output_directory_is_protected(fixtures, tok_dir, tmp_path):
    fx = fixtures["uv"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(CheckpointImportError, match="already exists"):
        _import(fx, "uv", tok_dir, out)
    assert (out / "keep").read_text() == "mine"
    _import(fx, "uv", tok_dir, out, overwrite=True)
    assert not (out / "keep").exists() and (out / "rankserve.json").is_file()


def test_missing_tokenizer_fails_before_anything_is_written(fixtures, tok_dir, tmp_path, monkeypatch):
    fx = fixtures["uv"]  # an HF directory without tokenizer files: refused before its weights are read
    monkeypatch.setattr(
        "rankserve.loaders.convert.read_checkpoint", lambda *a, **k: pytest.fail("weights were read")
    )
    with pytest.raises(CheckpointImportError, match=r"carries no tokenizer files; pass --tokenizer PATH"):
        import_checkpoint("auto", fx.path, tmp_path / "out")
    with pytest.raises(CheckpointImportError, match="expected a directory with tokenizer files"):
        import_checkpoint("uv", fx.path, tmp_path / "out", tokenizer=tok_dir / "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_imported_to_model_names_bad_shapes(fixtures):
    imp = read_checkpoint("uv", fixtures["uv"].path)
    module = "model.layers.0.mlp.down_proj"
    u, v, b = imp.lowrank[module]
    imp.lowrank[module] = (u, torch.zeros(v.shape[0], 100), b)
    with pytest.raises(
        CheckpointImportError,
        match=rf"^{module} V factor: expected shape \[r, 128\], found \[{v.shape[0]}, 100\]$",
    ):
        imported_to_model(imp)
    imp.lowrank[module] = (u, v, b)
    imp.dense["model.norm.weight"] = torch.ones(65)
    with pytest.raises(
        CheckpointImportError, match=r"^model.norm.weight: expected shape \[64\], found \[65\]$"
    ):
        imported_to_model(imp)


# ---- through the CLI ---------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rankserve", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_import_then_inspect(fixtures, tok_dir, tmp_path, capsys):
    from rankserve.cli.main import main

    fx = fixtures["basis-sharing"]
    out = tmp_path / "out"
    assert main(["import", "auto", str(fx.path), "--out", str(out), "--tokenizer", str(tok_dir)]) == 0
    printed = capsys.readouterr().out
    assert "basis-sharing" in printed and "10 shared-basis (5 shared bases)" in printed
    assert "ranks: min 16, median 30, max 40" in printed and str(out) in printed
    assert "decoder linear-layer parameters removed" in printed

    r = _cli("inspect", out, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "basis-sharing" and info["ratio_convention"] == RATIO_CONVENTION
    assert {p["name"]: p["rank"] for p in info["projections"] if p["rank"] is not None} == fx.ranks
    assert {p["name"]: p["kind"] for p in info["projections"]}["lm_head"] == "dense"


def _assert_clean_failure(r: subprocess.CompletedProcess, out: Path, *needles: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp siblings
    return lines[0]


def test_cli_refuses_a_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = write_torch_zip(tmp_path / "evil.pt", global_call_pickle("os", "system", f"touch {marker}"))
    r = _cli("import", "svd-llm", evil, "--out", tmp_path / "X", cwd=tmp_path)
    _assert_clean_failure(r, tmp_path / "X", "refusing to call os.system")
    assert not marker.exists()


def _bad_shape(fixtures, tmp_path, tok_dir):
    src = _copy(fixtures["uv"], tmp_path)
    key = "model.layers.0.self_attn.k_proj.u_proj.weight"  # [32, r]
    state = load_file(str(src / "model.safetensors"))
    rank = state[key].shape[1]
    state[key] = torch.zeros(48, rank, dtype=torch.float16)
    save_file(state, str(src / "model.safetensors"))
    return ["uv", src, "--tokenizer", tok_dir], [key, "[32, r]", f"[48, {rank}]"]


def _unsupported(fixtures, tmp_path, tok_dir):
    src = _copy(fixtures["asvd"], tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps(dict(config, model_type="opt", architectures=["OPTForCausalLM"]))
    )
    return ["auto", src], ["not supported: ", "'opt'"]


def _no_tokenizer(fixtures, tmp_path, tok_dir):
    fx = write_svd_llm(tmp_path / "src", tokenizer=None)
    return ["svd-llm", fx.path], ["--tokenizer PATH"]


@pytest.mark.parametrize("case", [_bad_shape, _unsupported, _no_tokenizer], ids=lambda f: f.__name__[1:])
def test_cli_errors_are_one_line_and_write_nothing(fixtures, tok_dir, tmp_path, case):
    args, needles = case(fixtures, tmp_path, tok_dir)
    out = tmp_path / "X"
    r = _cli("import", *args, "--out", out, cwd=tmp_path)
    _assert_clean_failure(r, out, "rankserve import: error: ", *needles)
