"""Healing by distillation on tiny random models: what trains, that KL falls, resume, divergence, manifest, CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_one_line_error, rankserve
from test_fast import FastRunner, RuntimeOptions, lowrank_model, run
from test_loaders import write_hf_dir
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

import rankserve.distill as distill
import rankserve.heal as heal_mod
from rankserve.checkpoint import CheckpointError, validate_manifest
from rankserve.distill import kl_logits, lr_factor, trainable_parameters
from rankserve.heal import HealConfig, HealDiverged, heal_
from rankserve.layers import SharedBasisLinear, replace_module
from rankserve.runtime.eager import EagerRunner

SMALL = dict(tokens=6 * 2 * 32, seq_len=32, batch=2, pool_tokens=256, eval_rows=2, lr=5e-3)


def test_kl_logits_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert abs(kl_logits(t, s).item() - ref.item()) <= 1e-6
    assert kl_logits(t, t).abs().item() <= 1e-6


def test_lr_schedule_warms_up_then_decays_to_min():
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, 10, "constant", 0.1) == 1.0


@pytest.mark.parametrize("train_norms,train_dense", [(False, False), (True, False), (False, True)])
def test_only_factors_change(train_norms, train_dense):
    student, teacher = lowrank_model(shared=True), tiny_model()
    # one slot the compression kept dense (as the loss allocator does): it trains only with train_dense
    dense_k = "model.layers.0.self_attn.k_proj"
    replace_module(student, dense_k, copy.deepcopy(teacher.get_submodule(dense_k)))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = HealConfig(**SMALL, train_norms=train_norms, train_dense=train_dense)
    r = heal_(student, teacher, tiny_tokenizer(), cfg, progress=False)
    after = student.state_dict()
    for k, v in before.items():
        leaf = k.rsplit(".", 1)[-1]
        trains = (
            leaf in ("U", "V", "basis", "coeff")
            or (train_norms and "norm" in k)
            or (train_dense and k == dense_k + ".weight")
        )
        changed = not torch.equal(v, after[k])
        assert changed == trains, k
    assert ("dense projection" in r.trained) == train_dense and ("norm" in r.trained) == train_norms
    qs = [layer.self_attn.q_proj for layer in student.model.layers]
    assert all(isinstance(q, SharedBasisLinear) and q.basis is qs[0].basis for q in qs)  # still one basis
    assert not any(p.requires_grad for p in student.parameters())


def test_trainable_parameters_counts_a_shared_basis_once():
    m = lowrank_model(shared=True)
    names = list(trainable_parameters(m))
    assert sum(n.endswith(".basis") for n in names) == 1
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in names)


def test_kl_decreases():
    student, teacher = lowrank_model(keep=0.3), tiny_model()
    cfg = HealConfig(**{**SMALL, "tokens": 30 * 2 * 32, "lr": 1e-2})
    r = heal_(student, teacher, tiny_tokenizer(), cfg, progress=False)
    assert r.steps == 30 and r.tokens == 30 * 2 * 32
    assert r.final_kl < 0.8 * r.initial_kl, (r.initial_kl, r.final_kl)
    assert r.curve[0]["step"] == 0 and r.curve[-1]["step"] == 30
    assert r.trained == ["lowrank U", "lowrank V"] and r.data[0]["source"] == "self-generated"


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = HealConfig(**SMALL, checkpoint_every=3)
    tok, teacher = tiny_tokenizer(), tiny_model()
    whole = lowrank_model()
    r1 = heal_(whole, teacher, tok, cfg, state_dir=str(tmp_path / "a"), progress=False)

    real = heal_mod.batch_rows

    def interrupt_at_4(step, *a):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *a)

    part, state = lowrank_model(), str(tmp_path / "b")
    monkeypatch.setattr(heal_mod, "batch_rows", interrupt_at_4)
    with pytest.raises(KeyboardInterrupt):
        heal_(part, teacher, tok, cfg, state_dir=state, progress=False)
    monkeypatch.setattr(heal_mod, "batch_rows", real)
    assert sorted(os.listdir(state)) == ["data.pt", "state.pt"]
    resumed = lowrank_model()  # a fresh copy: everything must come from the state
    r2 = heal_(resumed, teacher, tok, cfg, state_dir=state, resume=True, progress=False)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert (a - b).abs().max().item() <= 1e-6, k
    assert r2.final_kl == pytest.approx(r1.final_kl, rel=1e-5)
    with pytest.raises(ValueError, match="cannot resume: the saved run has lr"):
        heal_(
            lowrank_model(), teacher, tok, HealConfig(**{**SMALL, "lr": 1e-3}), state_dir=state, resume=True
        )


def test_nan_stops_with_one_clear_error():
    student = lowrank_model()
    with torch.no_grad():
        student.model.layers[1].mlp.down_proj.U[0, 0] = float("nan")
    with pytest.raises(HealDiverged, match="healing stopped at step 0: KL nan .*not finite.*lower --lr"):
        heal_(student, tiny_model(), tiny_tokenizer(), HealConfig(**SMALL), progress=False)


def test_bad_config_is_one_line():
    with pytest.raises(ValueError, match="heal lr must be a positive number"):
        HealConfig(lr=-1).validate()
    with pytest.raises(ValueError, match="heal data file not found: /nope"):
        HealConfig(data=["/nope"], self_share=0.5).validate()
    for share in (True, 1.5, float("nan"), "0.5"):  # one rule with --calib-self-share's (check_self_share)
        with pytest.raises(ValueError, match=r"heal self_share must be a fraction in \[0, 1\]"):
            HealConfig(data=["/nope"], self_share=share).validate()


# --------------------------------------------------------------------------------------------------
# the checkpoint and the CLI


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    dense = str(root / "dense")
    write_hf_dir(dense)  # a context of 256: compress checks its default --calib-seq-len against it
    tiny_tokenizer().save(dense)
    comp = str(root / "comp")
    (root / "a-file").write_text("not a directory")
    r = rankserve("compress", dense, "--family", "svd", "--ratio", "0.5", "--out", comp)
    assert r.returncode == 0, r.stderr
    return root, dense, comp


HEAL_FLAGS = ["--tokens", "256", "--seq-len", "32", "--batch", "2", "--lr", "5e-3", "--pool-tokens", "128"]


def test_cli_heal_writes_an_ordinary_checkpoint(dirs):
    from rankserve.loaders.source import load_model

    root, dense, comp = dirs
    out = str(root / "healed")
    r = rankserve("heal", comp, "--teacher", dense, "--out", out, *HEAL_FLAGS, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    h = json.loads(r.stdout)["healing"]
    assert h["steps"] == 4 and h["tokens"] == 256 and h["final_kl"] < h["initial_kl"]
    assert h["teacher"]["sha256"] and h["data"][0]["source"] == "self-generated"
    assert not os.path.exists(out + ".heal-state")  # removed once the checkpoint is complete
    lm = load_model(out)
    assert lm.manifest["healing"] == h and lm.manifest["family"] == "svd"
    bad = copy.deepcopy(lm.manifest)
    bad["healing"]["final_kl"] = float("nan")
    with pytest.raises(CheckpointError, match="healing.final_kl must be a finite"):
        validate_manifest(bad)
    del bad["healing"]["teacher"]
    with pytest.raises(CheckpointError, match="healing.teacher"):
        validate_manifest(bad)
    # the fast runtime packs it as any checkpoint and matches the eager reference
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ref = run(EagerRunner, lm.model, prompts, 6, RuntimeOptions())
    got = run(FastRunner, lm.model, prompts, 6, RuntimeOptions(backend="fast", compile=False))
    assert (got - ref).abs().max().item() <= 1e-3
    # and its held-back KL is what the manifest says it became: the student really changed
    before = load_model(comp).model
    x = torch.tensor([prompts[0] * 4])
    assert not torch.equal(before(x), lm.model(x))
    r = rankserve("inspect", out, "--json")
    assert r.returncode == 0, r.stderr


def test_cli_divergence_writes_nothing(dirs):
    """A loss that stops being finite ends the run with one line, and nothing is written.

    On a tiny model even lr 1e3 only wobbles the KL (gradients are clipped), so the student is made to overflow
    instead: a final-norm weight near fp32's largest value sends its logits to inf while every weight stays finite.
    """
    from safetensors.torch import load_file, save_file

    root, dense, comp = dirs
    broken = str(root / "overflowing")
    shutil.copytree(comp, broken)
    weights = os.path.join(broken, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 3e38)
    save_file(tensors, weights, metadata={"format": "pt"})
    out = str(root / "never")
    r = rankserve("heal", broken, "--teacher", dense, "--out", out, *HEAL_FLAGS, "--no-progress")
    assert_one_line_error(r, "healing stopped at step 0: KL")
    assert "not finite" in r.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".heal-state")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["{comp}", "--teacher", "{dense}", "--out", "{comp}"], "already exists"),
        (
            ["{dense}", "--teacher", "{dense}", "--out", "{root}/x1"],
            "is not a compressed rankserve checkpoint",
        ),
        (["{comp}", "--teacher", "{dense}", "--out", "{root}/x2", "--resume"], "--resume: no saved state"),
        (["{comp}", "--teacher", "{dense}", "--out", "{root}/x3", "--lr", "0"], "heal lr must be a positive"),
        (["{comp}", "--teacher", "/nope", "--out", "{root}/x4"], "model not found: /nope"),
        (
            ["{comp}", "--teacher", "{dense}", "--out", "{root}/a-file/x5"],
            "a-file is not a directory",
        ),
        (["{comp}", "--teacher", "{dense}", "--out", "{root}/x6", "--data", "/nope"], "data file not found"),
    ],
)
def test_cli_errors_are_one_line(dirs, args, pattern):
    root, dense, comp = dirs
    args = [a.format(root=root, dense=dense, comp=comp) for a in args]
    assert_one_line_error(rankserve("heal", *args), pattern)


def test_compress_heal_tokens_in_one_step(dirs):
    from rankserve.checkpoint import read_manifest

    root, dense, _ = dirs
    out = str(root / "one-step")
    r = rankserve(
        "compress", dense, "--family", "svd", "--ratio", "0.5", "--out", out, "--heal-tokens", "128",
        "--heal-seq-len", "32", "--heal-batch", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    assert m["healing"]["tokens"] == 128 and m["compression"]["params_linear_after"] == m["params_linear"]


def test_compress_a_healed_checkpoint_further(dirs):
    """Gradual compression: a healed svd 0.5 checkpoint compressed again at 0.7 is an ordinary checkpoint whose
    manifest keeps what it came from; a ratio at or under the source's, or --heal-tokens, is one line."""
    from rankserve.checkpoint import read_manifest

    root, dense, comp = dirs
    healed = str(root / "healed-for-further")
    r = rankserve("heal", comp, "--teacher", dense, "--out", healed, *HEAL_FLAGS, "--no-progress")
    assert r.returncode == 0, r.stderr
    before = read_manifest(healed)
    out = str(root / "further")
    r = rankserve("compress", healed, "--family", "svd", "--ratio", "0.7", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "its factors are multiplied out and compressed again at 0.7" in r.stderr
    m = read_manifest(out)
    assert m["family"] == "svd" and 0.7 <= m["ratio_measured"] < 0.75 and "healing" not in m
    prev = m["compression"]["compressed_from"]
    assert prev["ratio_measured"] == before["ratio_measured"] and prev["healing"] == before["healing"]
    assert prev["source"] == before["source"]
    for ratio, flags, pattern in [
        ("0.5", [], "needs a higher --ratio than that, got 0.5"),
        ("0.7", ["--heal-tokens", "64"], "then heal the result with rankserve heal OUT --teacher"),
        # a model check after the source is known to be compressed: still one line, no note printed before it
        ("0.7", ["--calib-seq-len", "1000"], "--calib-seq-len 1000 exceeds the model context"),
    ]:
        bad = str(root / "bad-further")
        r = rankserve("compress", healed, "--family", "svd", "--ratio", ratio, *flags, "--out", bad)
        assert_one_line_error(r, pattern)
        assert not os.path.exists(bad)


def test_self_generated_rows_mix_prose_and_chat():
    from rankserve.calibration import CHAT_PROMPTS, self_generated_rows

    tok = tiny_tokenizer()
    rows, rec = self_generated_rows(tiny_model(), tok, 4, 160, seed=1)  # chat prompts must fit in half a row
    assert rows.shape == (4, 160) and rec["prompts"] == "BOS and chat instructions"
    assert rows[0, 0].item() == 1 and rows[0, 1].item() != 1  # a prose row starts at BOS
    chat = tok.chat([{"role": "user", "content": CHAT_PROMPTS[0]}])
    assert rows[1, : len(chat)].tolist() == chat
    again, _ = self_generated_rows(tiny_model(), tok, 4, 160, seed=1)
    assert torch.equal(rows, again)


def test_student_logits_move_toward_teacher():
    """An independent check of the KL: cross-entropy to the teacher's soft labels falls too."""
    student, teacher = lowrank_model(keep=0.3), tiny_model()
    x = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(5))

    def soft_ce():
        with torch.no_grad():
            return -(teacher(x).softmax(-1) * F.log_softmax(student(x), -1)).sum(-1).mean().item()

    before = soft_ce()
    heal_(student, teacher, tiny_tokenizer(), HealConfig(**{**SMALL, "tokens": 20 * 64}), progress=False)
    assert soft_ce() < before


def test_generated_rows_are_reused_not_regenerated(monkeypatch):
    teacher, tok = tiny_model(), tiny_tokenizer()
    cfg = HealConfig(**SMALL)
    rows, n_self = heal_mod.heal_rows(cfg)
    assert rows == n_self == cfg.pool_tokens // cfg.seq_len + cfg.eval_rows
    gen = torch.randint(0, 50, (n_self + 3, cfg.seq_len))
    monkeypatch.setattr(heal_mod, "self_generated_rows", lambda *a, **k: pytest.fail("generated again"))
    data = heal_mod.make_heal_data(teacher, tok, cfg, generated=(gen, {"source": "self-generated"}))
    pool = torch.cat([data.held, data.train])
    # the first n_self given rows, shuffled: the same multiset of rows
    assert sorted(map(tuple, pool.tolist())) == sorted(map(tuple, gen[:n_self].tolist()))
    assert data.sources[0]["samples"] == n_self
    with pytest.raises(ValueError, match="seq_len"):
        heal_mod.make_heal_data(teacher, tok, cfg, generated=(gen[:, :-1], {}))


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)],
)
def test_bf16_autocast_only_where_the_cpu_has_bf16(monkeypatch, flags, native):
    import rankserve.runtime.native as native_mod

    monkeypatch.setattr(native_mod, "cpu_flags", lambda: flags)
    assert distill.cpu_has_native_bf16() is native
    cpu = torch.device("cpu")
    assert distill.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert distill.autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for explicitly: always
    assert distill.autocast_dtype("fp32", cpu) is None


def test_chat_prompts_do_not_teach_the_demo_question():
    """The demo asks for the capital of France: no healing or calibration prompt may touch it."""
    from rankserve.calibration import CHAT_PROMPTS
    from rankserve.cli.demo import QUESTIONS

    banned = ("france", "paris", "capital", "french")
    assert any(b in QUESTIONS[0].lower() for b in banned)
    assert not [p for p in CHAT_PROMPTS if any(b in p.lower() for b in banned)]
