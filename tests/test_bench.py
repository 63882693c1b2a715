"""The benchmark harness on the tiny random config, its CLI errors, and the target arithmetic of targets.py."""

import importlib.util
import json
import os
import statistics

import pytest
from test_cli import assert_one_line_error, rankserve

from rankserve.bench import BenchSpec, run_bench
from rankserve.runtime.native import best_isa, compiler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_random_model_end_to_end():
    spec = BenchSpec(
        model="", random_config="tiny", random_ratio=0.4, prompt_len=8, new_tokens=6, runs=2, threads=1
    )
    out = run_bench(spec, ["fast", "fast-dense", "eager"], probe_gib=1 / 64)
    runs = {r["backend"]: r for r in out["runs"]}
    # the read probe ran in the worker once per round: every run has its median and a fraction of it
    assert out["bandwidth_gbs"] > 0 and {r["probe_gbs"] for r in runs.values()} == {
        out["runs"][0]["probe_gbs"]
    }
    assert out["bandwidth_gbs"] == round(out["runs"][0]["probe_gbs"], 2)
    for r in runs.values():  # each round's decode rate over the probe read just before that round
        per_round = [
            d * r["weight_bytes_per_token"] / 1e9 / p
            for d, p in zip(r["decode_runs"], r["probe_runs"], strict=True)
        ]
        assert len(r["probe_runs"]) == 2 and r["bandwidth_fraction"] == pytest.approx(
            statistics.median(per_round), rel=0.01
        )
    assert set(runs) == {"fast", "fast-dense", "eager"}
    for r in runs.values():
        assert r["ok"], r["note"]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_s"] > 0
        assert len(r["decode_runs"]) == 2
        # TTFT (prompt to first sampled token) holds the prefill it was timed with, plus the sampling
        assert r["ttft_s"] >= 0.999 * spec.prompt_len / r["prefill_tok_s"]
    # the factorized model reads fewer weight bytes per token than its dense source; eager and fast read the same
    assert runs["fast"]["weight_bytes_per_token"] < runs["fast-dense"]["weight_bytes_per_token"]
    assert runs["fast"]["weight_bytes_per_token"] == runs["eager"]["weight_bytes_per_token"]
    assert runs["fast"]["recompiles"] == 0 and runs["fast-dense"]["recompiles"] == 0
    # which kernels ran; with a compiler the native ones must have (a failed build fails here)
    assert runs["eager"]["native_kernels"] is False and runs["eager"]["native_isa"] is None
    if compiler() is not None:
        assert runs["fast"]["native_kernels"] and runs["fast"]["native_isa"].split("+")[0] == best_isa()
    # memory, each backend in a fresh worker: a true peak above the baseline, the weights and the KV cache
    for r in runs.values():
        assert r["rss_peak_mb"] > r["rss_base_mb"] > 0 and r["kv_mb"] > 0
        assert 0 < r["weight_mb"] < 1 and r["rss_over_weights"] is not None
    assert runs["fast"]["weight_mb"] == runs["eager"]["weight_mb"] < runs["fast-dense"]["weight_mb"]


def test_bench_json_cli_and_bad_input():
    r = rankserve("bench", "--random-config", "tiny", "--baselines", "eager", "--new-tokens", "3", "--prompt-len",
                  "4", "--runs", "1", "--threads", "1", "--no-probe", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["runs"][0]["backend"] == "eager" and out["runs"][0]["decode_tok_s"] > 0
    assert out["runs"][0]["native_kernels"] is False and out["runs"][0]["rss_peak_mb"] > 0
    assert out["bandwidth_gbs"] == 0 and out["runs"][0]["bandwidth_fraction"] is None  # --no-probe
    assert_one_line_error(rankserve("bench"), "give a MODEL or --random-config")
    assert_one_line_error(rankserve("bench", "--random-config", "tiny", "--new-tokens", "1"), "--new-tokens")
    assert_one_line_error(
        rankserve("bench", "--random-config", "tiny", "--random-ratio", "1.5"), "--random-ratio"
    )


def _targets_module():
    spec = importlib.util.spec_from_file_location("targets", os.path.join(REPO, "benchmarks", "targets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(backend, decode, prefill=100.0, nbytes=1000, gbs=0.0):
    return {"backend": backend, "ok": True, "decode_tok_s": decode, "prefill_tok_s": prefill,
            "weight_bytes_per_token": nbytes, "achieved_gbs": gbs}  # fmt: skip


def test_targets_arithmetic():
    t = _targets_module()
    results = {
        "fp32": {"runs": [_run("fast", 61.0, nbytes=600), _run("fast-dense", 40.0, nbytes=1000),
                          _run("llama.cpp", 48.0, nbytes=1000), _run("hf-naive", 10.0, nbytes=600)]},
        "prefill-bf16": {"runs": [_run("fast", 1.0, prefill=90.0), _run("fast-dense", 1.0, prefill=100.0)]},
        "1b": {"bandwidth_gbs": 20.0, "runs": [_run("fast", 1.0, gbs=17.0)]},
    }  # fmt: skip
    rows = t.evaluate(results)

    def row(prefix):
        (hit,) = [r for r in rows if r["target"].startswith(prefix)]
        return hit

    llama = row("fp32: fast ÷ llama.cpp dense F32 decode")
    assert llama["value"] == pytest.approx(61 / 48) and llama["met"]
    # compressed/dense decode 61/40 against a byte ratio of 1000/600: 1.525 / 1.667 = 0.915
    dense = row("fp32: (fast ÷ fast-dense")
    assert dense["value"] == pytest.approx(0.915) and dense["met"]
    naive = row("fp32: fast ÷ hf-naive decode")
    assert naive["value"] == pytest.approx(6.1) and naive["met"]
    prefill = row("bf16: 512-token prefill, compressed ÷ dense")
    assert prefill["value"] == pytest.approx(0.9) and prefill["met"] is False
    bw = row("1B shape fp32: fast achieved ÷ probe bandwidth")
    assert bw["value"] == pytest.approx(0.85) and bw["met"]
    assert not any(
        r["target"].startswith("bf16: fast") for r in rows
    )  # no bf16 decode run, no bf16 decode rows
