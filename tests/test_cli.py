"""The CLI end to end on a tiny model directory: output shapes and one-line errors for bad input."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def rankserve(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "rankserve", *args], capture_output=True, text=True, timeout=300, env=env
    )


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
        (["generate", "{tiny}", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite"),
        (["generate", "{tiny}", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (
            ["generate", "{tiny}", "--prompt", b"caf\xe9"],
            "--prompt is not valid UTF-8 (byte 0xe9 at character 3)",
        ),
        (["serve", "/nonexistent/model", "--port", "0"], "model not found: /nonexistent/model"),
        (["serve", "{tiny}", "--port", "70000"], "--port must be in 0..65535"),
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
    args = [a.format(tiny=tiny_dir, empty=empty, gpt2=gpt2) if isinstance(a, str) else a for a in args]
    assert_one_line_error(rankserve(*args), pattern)


def test_demo_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    """The demo's whole flow (generate, compress, heal, save, reload, answer with the fast runtime) on a model whose
    context (64) is shorter than the demo's rows (256): the rows shrink to it instead of failing."""
    from rankserve.loaders.source import load_model

    out = str(tmp_path / "demo")
    r = rankserve("demo", "--model", tiny_dir, "--out", out, "--heal-tokens", "512", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "> What is the capital of France?" in r.stdout and "compressed (fast):" in r.stdout
    assert re.search(r"healing: KL to the dense model [0-9.]+ -> [0-9.]+ on held-back text", r.stdout)
    lm = load_model(out)
    m = lm.manifest
    assert m["family"] == "svd-llm" and abs(m["ratio_measured"] - 0.2) < 0.05
    assert m["calibration"]["seq_len"] == 64 and m["calibration"]["n_samples"] == 16
    assert m["healing"]["tokens"] == 512 and m["healing"]["steps"] == 4  # 2 rows of 64 per step
    assert m["healing"]["final_kl"] >= 0


def test_serve_on_a_taken_port_gives_one_line(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = rankserve("serve", tiny_dir, "--port", str(port))
    assert_one_line_error(r, f"cannot listen on 127.0.0.1:{port}")


def test_serve_answers_then_exits_on_sigterm(tiny_dir, tmp_path):
    """The real process: one line once it listens (with the model loaded), a completion, then SIGTERM exits."""
    log = tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "rankserve", "serve", tiny_dir, "--port", "0", "--shutdown-timeout", "2"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.time() + 120
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        url = m.group(0)
        assert httpx.get(url + "/health").json()["status"] == "ok"  # listening means loaded
        body = {"model": os.path.basename(tiny_dir), "prompt": "hi", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log.read_text()
