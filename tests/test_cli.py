"""The CLI end to end on a tiny model directory: output shapes and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
from test_loaders import write_hf_dir
from tiny_tok import tiny_tokenizer


def rankserve(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_hf_dir(path, max_position_embeddings=64)
    tiny_tokenizer().save(str(path))
    return str(path)


def assert_one_line_error(r, pattern):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert pattern in lines[0], lines[0]


def test_generate_json(tiny_dir):
    r = rankserve(
        "generate",
        tiny_dir,
        "--prompt",
        "hello",
        "--max-tokens",
        "6",
        "--json",
        "--seed",
        "1",
        "--temperature",
        "0.9",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ["text", "token_ids", "prompt_tokens", "completion_tokens", "decode_tok_s"]:
        assert key in out
    assert out["prompt_tokens"] == 6  # BOS + 5 characters
    assert 1 <= out["completion_tokens"] <= 6


def test_generate_chat_streams_text(tiny_dir):
    r = rankserve("generate", tiny_dir, "--prompt", "hi", "--chat", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr


def test_inspect_json(tiny_dir):
    r = rankserve("inspect", tiny_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["layers"] == 2 and d["kv_heads"] == 2
    assert d["params_linear"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 144)
    assert len(d["projections"]) == 2 * 7 + 1


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["generate", "/nonexistent/model", "--prompt", "x"], "model not found: /nonexistent/model"),
        (
            ["generate", "{tiny}", "--prompt", "x", "--max-tokens", "0"],
            "--max-tokens must be a positive integer",
        ),
        (
            ["generate", "{tiny}", "--prompt", "x", "--max-tokens", "-3"],
            "--max-tokens must be a positive integer",
        ),
        (["generate", "{tiny}", "--prompt", "x" * 80], "prompt has 81 tokens but the model context is 64"),
        (["generate", "{empty}", "--prompt", "x"], "has no config.json"),
        (["generate", "{gpt2}", "--prompt", "x"], "not supported: model_type 'gpt2'"),
        (["inspect", "{tiny}", "--threads", "0"], "--threads must be >= 1"),
        (
            ["compress", "{tiny}", "--family", "svd-llm", "--ratio", "0.4", "--ranks", "sensitivity"]
            + ["--sensitivity-samples", "0", "--out", "{empty}/out"],
            "sensitivity_samples must be an int >= 1",
        ),
    ],
)
def test_bad_input_gives_one_line(tiny_dir, tmp_path, args, pattern):
    empty = tmp_path / "empty"
    empty.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    args = [a.format(tiny=tiny_dir, empty=empty, gpt2=gpt2) for a in args]
    assert_one_line_error(rankserve(*args), pattern)
