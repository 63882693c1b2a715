"""benchmarks/pareto.py end to end on a tiny random model (``--smoke``): every stage runs and the report is
written; no timing is asserted."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from tiny import hf_model_from, tiny_model
from tiny_tok import tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

TEXT = ("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 12).strip()


@pytest.mark.slow
def test_pareto_smoke(tmp_path, monkeypatch):
    import pareto

    monkeypatch.setenv("RANKSERVE_CACHE", str(tmp_path / "cache"))  # the GGUF exports (workers inherit it)
    model = str(tmp_path / "dense")  # an HF directory, as a user's dense model would be
    hf_model_from(tiny_model("llama-mha", vocab_size=128)).save_pretrained(model)
    tiny_tokenizer().hf.save_pretrained(model)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    argv = ["--smoke", "--model", model, "--ratios", "0.4", "--gguf-types", "f32,q8_0", "--threads", "1"]
    argv += ["--test-data", str(text), "--ood-data", str(text), "--calib-data", str(text)]
    argv += ["--cache", str(tmp_path / "pareto"), "--out-dir", str(tmp_path / "docs")]
    if not pareto.int8_available():  # then int8 rows fail up front with one line, unless skipped
        with pytest.raises(SystemExit, match="--skip-int8"):
            pareto.main(argv)
        argv.append("--skip-int8")
    argv += ["--dtypes", "fp32,int8" if "--skip-int8" not in argv else "fp32"]
    assert pareto.main(argv) == 0
    run = json.loads((tmp_path / "docs" / "pareto.json").read_text())
    rows = {c["name"]: c for c in run["configs"]}
    assert "rankserve fp32 dense" in rows and "rankserve fp32 svd-llm 0.4" in rows
    for name in ("rankserve fp32 dense", "rankserve fp32 svd-llm 0.4"):
        r = rows[name]["results"]
        assert not rows[name]["error"], rows[name]["error"]
        assert (
            math.isfinite(r["wikitext_ppl"]) and r["wikitext_ppl"] > 1 and r["lee_ppl"] == r["wikitext_ppl"]
        )
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["rss_peak_mb"] > 0
        assert 0 < r["bandwidth_fraction"]
    dense, svd = rows["rankserve fp32 dense"]["results"], rows["rankserve fp32 svd-llm 0.4"]["results"]
    assert svd["weight_bytes_per_token"] < dense["weight_bytes_per_token"]
    q8 = rows["llama.cpp Q8_0 dense"]
    # the GGUF's weights are scored by rankserve's evaluator whether or not llama.cpp itself can run
    assert abs(q8["results"]["wikitext_ppl"] / dense["wikitext_ppl"] - 1) < 0.05
    try:
        import llama_cpp  # noqa: F401

        assert not q8["error"] and q8["results"]["decode_tok_s"] > 0, q8["error"]
        assert run["crosscheck"]["config"] == "llama.cpp Q8_0 dense"
    except ImportError:
        assert "llama-cpp-python" in q8["error"]
    md = (tmp_path / "docs" / "PARETO.md").read_text()
    assert run["command"] in md and "| rankserve fp32 svd-llm 0.4 |" in md
    assert (tmp_path / "docs" / "pareto.png").stat().st_size > 0
    # a rerun reuses the compressed checkpoint and the perplexities (nothing new in the cache)
    before = sorted(os.listdir(tmp_path / "pareto"))
    assert pareto.main([*argv, "--no-speed"]) == 0
    assert sorted(os.listdir(tmp_path / "pareto")) == before
