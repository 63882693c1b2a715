"""Task accuracy through lm-evaluation-harness: rankserve's lm-eval model against direct computation, against
lm-eval's own `hf` model on the same weights, and against `rankserve eval --data`; local tasks offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import hf_model_from, tiny_model
from tiny_tok import tiny_tokenizer

from rankserve.checkpoint import build_manifest, save_checkpoint
from rankserve.cli.main import main
from rankserve.loaders.source import LoadedModel

lm_eval = pytest.importorskip("lm_eval", reason="needs the [eval] extra (lm-eval)")
from lm_eval.api.instance import Instance  # noqa: E402

from rankserve.lm_eval_model import RankserveLM  # noqa: E402
from rankserve.tasks import evaluate_tasks, load_tasks  # noqa: E402

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain"]


def write_task(folder, n: int = 24) -> str:
    """A local multiple-choice task (YAML + JSONL, data path relative to the YAML) with n questions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        choices = [a, b, a + b, b[:2]][: 2 + i % 3]  # 2 to 4 choices of different lengths
        rows.append({"question": f"{a} or {b}, item {i}?", "choices": choices, "answer": i % len(choices)})
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML)
    return str(folder)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa"), tiny_tokenizer()


@pytest.fixture(scope="module")
def rlm(tiny):
    model, tok = tiny
    loaded = LoadedModel(model, tok, model.config, "tiny", "hf", torch.float32)
    return RankserveLM(loaded=loaded, batch_size=3)


@pytest.fixture(scope="module")
def ckpt_dir(tiny, tmp_path_factory) -> str:
    model, tok = tiny
    out = tmp_path_factory.mktemp("lmeval") / "tiny"
    return save_checkpoint(model, out, tokenizer=tok, manifest=build_manifest(model))


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihoods_equal_a_direct_log_softmax(tiny, rlm):
    """Packed questions (shared context, 1-4 choices, batches of 3 rows) against one plain forward per pair."""
    model, tok = tiny
    pairs = [("Question: red or blue?\nAnswer:", c) for c in (" red", " blue", " green and more", " x")] + [
        ("The sky is", " blue"),
        ("The sky is", " grey."),
        ("One", " two three four"),
        ("", "alone"),
    ]
    pairs += [("x" * 300, " long")]  # 301 + 5 tokens > 256 positions: left-truncated like lm-eval's hf
    got = rlm.loglikelihood([request("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        if ctx:
            n_ctx = len(tok.encode(ctx))
            ids = tok.encode(ctx + cont)[-257:]
            n_ctx -= len(tok.encode(ctx + cont)) - len(ids)
        else:  # an empty context is conditioned on BOS alone
            ids, n_ctx = tok.encode(cont), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]  # (T-1, V)
        steps = range(n_ctx - 1, len(ids) - 1)
        ref = sum(logp[t, ids[t + 1]].item() for t in steps)
        ref_greedy = all(logp[t].argmax().item() == ids[t + 1] for t in steps)
        assert ll == pytest.approx(ref, abs=1e-4), (ctx[:20], cont)
        assert greedy == ref_greedy


def test_rolling_perplexity_equals_rankserve_eval_data(ckpt_dir, tiny, tmp_path, capsys):
    """lm-eval's rolling loglikelihood scores the windows of `rankserve eval --data`."""
    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog.\n\n" * 3  # 139 tokens with BOS: 6 windows of 23 + 1
    data = tmp_path / "text.txt"
    data.write_text(text)
    assert main(["eval", ckpt_dir, "--data", str(data), "--seq-len", "23", "--json", "--no-progress"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["windows"] == 6 and ref["tokens"] == 6 * 22
    loaded = LoadedModel(model, tok, model.config, "tiny", "hf", torch.float32)
    ours = RankserveLM(loaded=loaded, seq_len=23, batch_size=4)
    (ll,) = ours.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert math.exp(-ll / ref["tokens"]) == pytest.approx(ref["perplexity"], rel=1e-6)
    # A short document (fewer tokens than one window) is scored too, as one shorter window.
    (short,) = ours.loglikelihood_rolling([request("loglikelihood_rolling", "ab")], disable_tqdm=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[1, 72]])).double(), -1)[0]  # BOS a -> predicts a, b
    assert short == pytest.approx(logp[0, 72].item() + logp[1, 73].item(), abs=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(tiny, rlm):
    model, tok = tiny
    prompts = ["Once upon", "The answer is"]
    kwargs = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    got = rlm.generate_until([request("generate_until", p, kwargs) for p in prompts], disable_tqdm=True)
    for prompt, text in zip(prompts, got, strict=True):
        ids = tok.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(12):  # plain greedy decoding with full forwards, no cache
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt in tok.eos_ids:
                    break
                new.append(nxt)
        ref = tok.decode(new)
        assert text == ref.split("e")[0], (prompt, text, ref)


def test_local_task_runs_end_to_end_offline(ckpt_dir, tmp_path, capsys, monkeypatch):
    """The CLI on a task the test writes; run from another folder: data paths resolve against the YAML."""
    tasks = write_task(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    code = main(["eval", ckpt_dir, "--tasks", "tiny_mc", "--include-path", tasks, "--limit", "10", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    r = json.loads(lines[0])
    assert r["task"] == "tiny_mc" and r["samples"] == 10 and r["model"] == ckpt_dir
    assert set(r["metrics"]) == {"acc", "acc_norm"}
    for name, value in r["metrics"].items():
        assert 0.0 <= value <= 1.0 and 0.0 <= r["stderr"][name] <= 0.5


def test_accuracy_equals_lm_eval_hf_model(tiny, tmp_path):
    """The same tiny weights as an HF directory, scored by lm-eval's own `hf` model and by rankserve."""
    model, tok = tiny
    hf_dir = tmp_path / "hf"
    hf_model_from(model).save_pretrained(hf_dir)
    tok.save(str(hf_dir))
    tasks = write_task(tmp_path / "tasks", n=30)

    def run(lm, **kw):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=load_tasks(["tiny_mc"], tasks), bootstrap_iters=0, log_samples=True, **kw
        )
        lls = [float(r[0]) for s in out["samples"]["tiny_mc"] for r in s["filtered_resps"]]
        return out["results"]["tiny_mc"], lls

    hf_args = {"pretrained": str(hf_dir), "dtype": "float32"}
    hf_res, hf_lls = run("hf", model_args=hf_args, batch_size=4, device="cpu")
    ours_res, ours_lls = run(RankserveLM(pretrained=str(hf_dir), batch_size=4))
    assert len(ours_lls) == len(hf_lls) > 60
    assert max(abs(a - b) for a, b in zip(ours_lls, hf_lls, strict=True)) < 1e-4
    assert ours_res["acc,none"] == hf_res["acc,none"] and ours_res["acc_norm,none"] == hf_res["acc_norm,none"]
    assert 0 < ours_res["acc,none"] < 1  # a random model: some right, some wrong, so the check has teeth


def test_evaluate_tasks_rows_have_metrics_and_stderr(rlm, tmp_path):
    rows = evaluate_tasks(rlm, load_tasks(["tiny_mc"], write_task(tmp_path / "t")), limit=6)
    assert [r["task"] for r in rows] == ["tiny_mc"] and rows[0]["samples"] == 6
    assert rows[0]["stderr"]["acc"] == pytest.approx(
        math.sqrt(rows[0]["metrics"]["acc"] * (1 - rows[0]["metrics"]["acc"]) / 5)
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_hub_task_fails_with_one_line(ckpt_dir, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # this machine has no hub: fail fast
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "hub.yaml").write_text(
        TASK_YAML.replace("task: tiny_mc", "task: hub_mc")
        .replace("dataset_path: json", "dataset_path: rankserve-tests/no-such-dataset")
        .replace("dataset_kwargs:\n  data_files:\n    test: tiny_mc.jsonl\n", "")
    )
    assert main(["eval", ckpt_dir, "--tasks", "hub_mc", "--include-path", str(folder)]) == 2
    err = one_error_line(capsys)
    assert "hub_mc" in err and "must be downloaded" in err and "--include-path" in err


def test_local_task_without_its_data_file_fails_with_one_line(ckpt_dir, tmp_path, capsys):
    folder = tmp_path / "t"
    write_task(folder)
    (folder / "tiny_mc.jsonl").unlink()
    assert main(["eval", ckpt_dir, "--tasks", "tiny_mc", "--include-path", str(folder)]) == 2
    err = one_error_line(capsys)
    assert "task tiny_mc: cannot load its data" in err and "tiny_mc.jsonl" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "tiny_mc", "--include-path", "/nonexistent/dir"], "/nonexistent/dir: no such directory"),
        (["--tasks", "tiny_mc", "--data", "x.txt"], "either --data"),
        (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be >= 1"),
        (["--data", "x.txt", "--limit", "3"], "--limit goes with --tasks"),
    ],
)
def test_cli_errors_are_one_line(ckpt_dir, capsys, args, message):
    assert main(["eval", ckpt_dir, *args]) == 2
    assert message in one_error_line(capsys)


def test_missing_extra_names_the_install(ckpt_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", ckpt_dir, "--tasks", "arc_easy"]) == 2
    assert "pip install 'rankserve[eval]'" in one_error_line(capsys)


@pytest.mark.real
def test_smollm2_local_task_end_to_end(smollm2, tmp_path):
    """SmolLM2 on a small hand-written cloze task: it must beat chance (1/3) clearly."""
    folder = tmp_path / "cloze"
    folder.mkdir()
    rows = [
        ("The capital of France is", [" Paris", " banana", " seven"], 0),
        ("Water is made of hydrogen and", [" oxygen", " wood", " music"], 0),
        ("A week has seven", [" days", " cats", " blue"], 0),
        ("The opposite of hot is", [" loud", " cold", " square"], 1),
        ("Cats like to chase", [" clouds", " taxes", " mice"], 2),
        ("One plus one equals", [" two", " purple", " Monday"], 0),
        ("The sun rises in the", [" east", " fridge", " pocket"], 0),
        ("Birds fly with their", [" ears", " wings", " shoes"], 1),
    ]
    (folder / "cloze.jsonl").write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows)
    )
    (folder / "cloze.yaml").write_text(
        TASK_YAML.replace("tiny_mc", "cloze").replace('"Question: {{question}}\\nAnswer:"', '"{{question}}"')
    )
    rows_out = evaluate_tasks(RankserveLM(loaded=smollm2), load_tasks(["cloze"], str(folder)))
    assert rows_out[0]["samples"] == 8
    assert rows_out[0]["metrics"]["acc"] >= 0.75, rows_out
