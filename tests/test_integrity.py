"""Corrupt and interrupted runs: non-finite weights and losses are refused with one line, leftovers of killed
runs are cleaned by the next one, ``--overwrite`` never leaves the name empty, bad ``--out`` fails before work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from importer_fixtures import _private_tempdir, write_svd_llm, write_uv  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file, save_file
from test_checkpoint import make, save
from test_cli import assert_one_line_error, rankserve
from test_loaders import write_hf_dir
from tiny import random_tensors, tiny_hf_config, tiny_model
from tiny_tok import tiny_tokenizer

from rankserve import checkpoint as ckpt
from rankserve import fsutil
from rankserve.checkpoint import CheckpointError, build_manifest, check_out_dir, load_checkpoint
from rankserve.config import ModelConfig
from rankserve.eval import perplexity
from rankserve.importers import CheckpointImportError
from rankserve.loaders.convert import import_checkpoint, load_tokenizer_dir
from rankserve.loaders.gguf_export import export_gguf
from rankserve.loaders.source import load_model
from rankserve.loaders.weights import WeightError, first_nonfinite

DEAD_PID = 4194305  # above the largest pid_max Linux allows (2**22), so never a live process
BAD = "model.layers.1.mlp.down_proj.weight"


def kinds(path: Path) -> dict[str, str]:
    return {n: e["kind"] for n, e in ckpt.read_manifest(path)["projections"].items()}


# ---- non-finite weights ------------------------------------------------------------------------------------------


def nan_hf_dir(path: Path, value: float = float("nan")) -> Path:
    tensors = random_tensors(ModelConfig.from_hf(tiny_hf_config()))
    tensors[BAD][3, 5] = value
    write_hf_dir(path, tensors=tensors, max_position_embeddings=64)
    tiny_tokenizer().save(str(path))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_names_the_first_bad_tensor(value):
    ok = torch.randn(1000)
    bad = torch.randn(64, 64)
    bad[63, 63] = value
    assert first_nonfinite([("a", ok), ("b", bad), ("c", bad.bfloat16())]) == "b"
    assert first_nonfinite([("a", ok), ("i", torch.tensor([2**62])), ("e", torch.empty(0))]) is None


def test_hf_dir_with_nan_is_refused_unless_asked(tmp_path):
    path = nan_hf_dir(tmp_path / "m")
    with pytest.raises(
        WeightError, match=rf"{BAD} contains NaN/Inf: the checkpoint is corrupt; pass --no-check"
    ):
        load_model(str(path))
    lm = load_model(str(path), check_finite=False)
    assert torch.isnan(lm.model.get_parameter(BAD)).any()


def test_gguf_with_inf_is_refused(tmp_path):
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.get_parameter(BAD)[0, 0] = float("inf")
    path = export_gguf(model, str(tmp_path / "m.gguf"), "f32")
    with pytest.raises(WeightError, match=rf"m\.gguf: {BAD} contains NaN/Inf"):
        load_model(path)


def test_rankserve_checkpoint_with_nan_factor_is_refused(tmp_path):
    model = make("lowrank")
    name = "model.layers.0.self_attn.q_proj.U"
    with torch.no_grad():
        model.get_parameter(name)[1, 2] = float("nan")
    out = save(model, tmp_path / "ck")
    with pytest.raises(WeightError, match=rf"{name} contains NaN/Inf"):
        load_model(out)
    assert load_model(out, check_finite=False).kind == "rankserve"


def test_import_with_nan_writes_nothing(tmp_path):
    src = write_uv(tmp_path / "uv")
    state = load_file(str(src.path / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.u_proj.weight"][0, 0] = float("nan")
    save_file(state, str(src.path / "model.safetensors"))
    tok = tmp_path / "tok"
    tiny_tokenizer().save(str(tok))
    with pytest.raises(CheckpointImportError, match=r"model\.layers\.0\.mlp\.up_proj\.U contains NaN/Inf"):
        import_checkpoint("uv", src.path, tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists()
    import_checkpoint("uv", src.path, tmp_path / "out", tokenizer=tok, check_finite=False)
    assert (tmp_path / "out" / "rankserve.json").is_file()


def test_cli_generate_refuses_nan_weights_in_one_line(tmp_path):
    path = nan_hf_dir(tmp_path / "m")
    r = rankserve("generate", str(path), "--prompt", "hi", "--max-tokens", "3")
    assert_one_line_error(r, f"{BAD} contains NaN/Inf")
    assert r.returncode == 2 and r.stdout == ""


# ---- non-finite loss ---------------------------------------------------------------------------------------------


def test_perplexity_raises_on_a_non_finite_loss(tmp_path):
    lm = load_model(str(nan_hf_dir(tmp_path / "m")), check_finite=False)
    with pytest.raises(ValueError, match=r"windows 0\.\.1 give a non-finite loss \(nan\)"):
        perplexity(
            lm.model, lm.tokenizer, "some text to score " * 20, seq_len=16, batch_size=2, progress=False
        )


def test_cli_eval_json_never_prints_nan(tmp_path):
    path = nan_hf_dir(tmp_path / "m")
    data = tmp_path / "text.txt"
    data.write_text("some text to score " * 20)
    r = rankserve(
        "eval",
        str(path),
        "--data",
        str(data),
        "--seq-len",
        "16",
        "--json",
        "--no-check-finite",
        "--no-progress",
    )
    assert_one_line_error(r, "non-finite loss")
    assert r.returncode == 2 and "NaN" not in r.stdout


# ---- --out checked before any work ---------------------------------------------------------------------------------


def test_check_out_dir(tmp_path, monkeypatch):
    assert check_out_dir(tmp_path / "new") == str(tmp_path / "new")
    with pytest.raises(CheckpointError, match="already exists; choose another path or pass --overwrite"):
        check_out_dir(tmp_path)
    assert check_out_dir(tmp_path, overwrite=True) == str(tmp_path)
    with pytest.raises(CheckpointError, match=r"parent directory .*missing does not exist"):
        check_out_dir(tmp_path / "missing" / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file is not a directory"):
        check_out_dir(tmp_path / "file" / "out")
    with pytest.raises(CheckpointError, match="is not a directory"):
        check_out_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "new", target_is_directory=True)
    with pytest.raises(CheckpointError, match="is not a directory"):
        check_out_dir(tmp_path / "link", overwrite=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root can write anywhere; pretend we cannot
    with pytest.raises(CheckpointError, match="is not writable"):
        check_out_dir(tmp_path / "new")


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "/no/model", "--family", "svd", "--ratio", "0.3"],
        ["import", "uv", "/no/source"],
    ],
)
def test_cli_checks_out_before_loading(tmp_path, capsys, argv):
    from rankserve.cli.main import main

    # The model or source does not exist either: the --out error proves --out is checked first.
    assert main([*argv, "--out", str(tmp_path / "missing" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parent directory" in err[0] and "does not exist" in err[0], err


# ---- leftovers of killed runs -------------------------------------------------------------------------------------


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty directory (tmp_path holds the autouse fixture's tmp/)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def leftover(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"partial")
    return d


def test_dead_save_temp_dirs_are_swept_at_the_next_save(work):
    dead = leftover(work, f".other.tmp-{DEAD_PID}-abc123")
    live = leftover(work, f".busy.tmp-{os.getpid()}-def456")  # another save, still running
    unrelated = leftover(work, ".notes.tmp-mine")
    save(make("dense"), work / "ck")
    assert not dead.exists() and live.exists() and unrelated.exists()
    assert sorted(os.listdir(work)) == sorted(["ck", live.name, unrelated.name])


def test_tokenizer_temp_dirs_of_dead_runs_are_swept(tmp_path):
    tmp = tmp_path / "tmp"  # tempfile's directory in these tests (the autouse fixture)
    tok = tmp_path / "tok"
    tiny_tokenizer().save(str(tok))
    dead_load = leftover(tmp, f"rankserve-tokenizer-load-{DEAD_PID}-x1")
    live_load = leftover(tmp, f"rankserve-tokenizer-load-{os.getpid()}-x2")
    load_tokenizer_dir(tok, "llama")
    assert not dead_load.exists() and live_load.exists()
    # The tokenizer an SVD-LLM pickle is rebuilt into.
    dead = leftover(tmp, f"rankserve-tokenizer-{DEAD_PID}-x3")
    fx = write_svd_llm(tmp_path / "svd-llm")
    import_checkpoint("svd-llm", fx.path, tmp_path / "out")
    assert not dead.exists()
    assert sorted(os.listdir(tmp)) == [live_load.name]  # and the import left nothing of its own


def test_tokenizer_cache_temp_dirs_of_dead_runs_are_swept(tmp_path, monkeypatch):
    from rankserve import tokenizer

    monkeypatch.setenv("RANKSERVE_CACHE", str(tmp_path))
    target = tokenizer.cache_dir("tokenizers", "k")
    os.makedirs(os.path.dirname(target))
    dead = leftover(Path(os.path.dirname(target)), f".tmp-{DEAD_PID}-x")
    tokenizer._save_atomically(tiny_tokenizer().hf, target)
    assert not dead.exists() and os.listdir(os.path.dirname(target)) == ["k"]


# ---- --overwrite: an atomic exchange -----------------------------------------------------------------------------


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not fsutil.exchange(str(a), str(b)):
        pytest.skip("this OS or filesystem has no atomic exchange")
    assert os.listdir(a) == ["y"] and os.listdir(b) == ["x"]
    with pytest.raises(FileNotFoundError):
        fsutil.exchange(str(a), str(tmp_path / "missing"))


def test_overwrite_exchanges_and_the_name_never_disappears(work, monkeypatch):
    out = save(make("dense"), work / "ck")
    seen, real = [], fsutil.exchange

    def spy(a, b):
        seen.append(kinds(Path(b))["model.layers.0.mlp.up_proj"])
        done = real(a, b)
        seen.append(kinds(Path(b))["model.layers.0.mlp.up_proj"])
        return done

    monkeypatch.setattr(fsutil, "exchange", spy)
    model = make("lowrank")
    ckpt.save_checkpoint(
        model, out, tokenizer=tiny_tokenizer(), manifest=build_manifest(model), overwrite=True
    )
    assert seen == ["dense", "lowrank"]
    assert os.listdir(work) == ["ck"]


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make
    from rankserve import checkpoint as ckpt, fsutil
    from rankserve.checkpoint import io as ckpt_io

    def die(*args):
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "after-exchange":
        ckpt_io._remove_tree = die  # killed before the old checkpoint (now in the temp dir) is removed
    else:  # no atomic exchange here: killed between the two renames of the fallback
        fsutil.exchange = lambda a, b: False
        real, calls = os.replace, []

        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            real(a, b)

        os.replace = replace
    model = make("lowrank")
    ckpt.save_checkpoint(model, sys.argv[2], tokenizer=None, manifest=ckpt.build_manifest(model), overwrite=True)
    """
)


def killed_overwrite(tmp_path: Path, mode: str) -> tuple[Path, int]:
    """A dense checkpoint at tmp_path/ck, then an overwrite with a low-rank one in a process killed midway."""
    out = Path(save(make("dense"), tmp_path / "ck"))
    code = KILLED_SAVE.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", code, mode, str(out)], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    return out, proc.pid


def test_kill_after_the_exchange_leaves_the_new_checkpoint(work):
    out, pid = killed_overwrite(work, "after-exchange")
    assert kinds(out)["model.layers.0.mlp.up_proj"] == "lowrank"
    load_checkpoint(out)
    (old,) = [p for p in work.iterdir() if p.name.startswith(f".ck.tmp-{pid}-")]
    assert kinds(old)["model.layers.0.mlp.up_proj"] == "dense"  # the old one, not yet removed
    save(make("dense"), work / "other")  # the next save into this directory sweeps it
    assert sorted(os.listdir(work)) == ["ck", "other"]


def test_kill_between_fallback_renames_is_recovered_at_the_next_load(work):
    out, pid = killed_overwrite(work, "fallback")
    assert not out.exists()  # the one moment the fallback leaves the name empty
    names = sorted(p.name for p in work.iterdir())
    assert [n.split("-")[0] for n in names] == [".ck.old", ".ck.tmp"] and all(f"-{pid}-" in n for n in names)
    lm = load_model(str(out))  # puts the old checkpoint back, drops the unfinished new one
    assert lm.manifest["projections"]["model.layers.0.mlp.up_proj"]["kind"] == "dense"
    assert os.listdir(work) == ["ck"]


def test_fallback_swap_without_exchange(work, monkeypatch):
    out = save(make("dense"), work / "ck")
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    model = make("lowrank")
    ckpt.save_checkpoint(model, out, tokenizer=None, manifest=build_manifest(model), overwrite=True)
    assert kinds(Path(out))["model.layers.0.mlp.up_proj"] == "lowrank"
    assert os.listdir(work) == ["ck"]
