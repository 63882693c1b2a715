"""Every registered compression family on tiny random models: budgets, full-rank identity, robustness, round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_model

from rankserve.analysis import model_stats
from rankserve.calibration import LayerPipeline, projection_names
from rankserve.compress import compress_, plan_ranks
from rankserve.families import (
    RATIO_CONVENTION,
    ASVDConfig,
    BasisSharingConfig,
    FWSVDConfig,
    SlotData,
    SVDConfig,
    SVDLLMConfig,
    config_class,
    config_from_dict,
    family_names,
    transform_for,
)
from rankserve.layers import DenseLinear, LowRankLinear, SharedBasisLinear
from rankserve.ranks import max_useful_rank, rank_for_ratio

FAMILIES = ["svd", "fwsvd", "asvd", "svd-llm", "basis-sharing"]


def calib(n=8, L=32, seed=0, high=128):
    return torch.randint(3, high, (n, L), generator=torch.Generator().manual_seed(seed))


def logits(model, toks):
    with torch.no_grad():
        return model(toks)


def test_registry_knows_every_family():
    assert sorted(family_names()) == sorted(FAMILIES)
    with pytest.raises(ValueError, match="unknown family 'nope'; known families: .*svd-llm"):
        config_class("nope")
    assert not SVDConfig.needs_calibration and all(
        config_class(n).needs_calibration for n in FAMILIES if n != "svd"
    )


@pytest.mark.parametrize(
    "cfg",
    [
        SVDConfig(ratio=0.3, ranks="adaptive"),
        FWSVDConfig(ratio=0.5, rank_overrides={r".*\.k_proj": 8}),
        ASVDConfig(ratio=0.1, alpha=1.0),
        SVDLLMConfig(ratio=0.6, update_u=True),
        BasisSharingConfig(ratio=0.2, group_size=3, shared=("q_proj", "up_proj"), whiten=False),
    ],
    ids=lambda c: c.name,
)
def test_config_json_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["family"] == cfg.name and d["version"] == 1
    assert config_from_dict(d) == cfg


def test_config_from_dict_is_an_allowlist():
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"family": "svd", "ratio": 0.2, "alpha": 0.5})
    with pytest.raises(ValueError, match="expects float"):
        config_from_dict({"family": "asvd", "alpha": "__import__('os').getcwd()"})
    with pytest.raises(ValueError, match="expects bool"):
        config_from_dict({"family": "svd-llm", "update_u": "yes"})
    with pytest.raises(ValueError, match="version"):
        config_from_dict({"family": "svd", "version": 99})
    with pytest.raises(ValueError, match="0 <= ratio < 1"):
        config_from_dict({"family": "svd", "ratio": 1.0})
    with pytest.raises(ValueError, match="ranks must be one of"):
        SVDConfig(ranks="magic").validate()
    with pytest.raises(ValueError, match="shared projection types"):
        BasisSharingConfig(shared=("lm_head",)).validate()


@pytest.mark.parametrize("mode", ["uniform", "adaptive", "sensitivity"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_meets_its_parameter_budget(family, ratio, mode):
    model = tiny_model(num_hidden_layers=3)  # 3 layers: Basis Sharing gets a remainder group of one
    dense = model_stats(model).params_linear
    rep = compress_(model, config_class(family)(ratio=ratio, ranks=mode), calib(4, 16), progress=False)
    # the report's counts are the model's counts
    assert rep.params_before == dense
    assert rep.params_after == model_stats(model).params_linear
    # never more than the budget; short of it by less than one rank of every slot
    assert ratio - 1e-12 <= rep.achieved_ratio < ratio + rep.rank_step
    assert rep.rank_step < 0.05
    if rep.rank_mode == "uniform":
        for s in rep.slots:
            r = rank_for_ratio(s.out, s.inp, ratio)
            assert s.rank == (r if r <= max_useful_rank(s.out, s.inp) else None)
    assert rep.rank_mode == ("uniform" if family == "basis-sharing" and mode == "adaptive" else mode)
    assert torch.isfinite(logits(model, calib(2, 16, seed=9))).all()
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ratio"] == ratio and d["ratio_convention"] == RATIO_CONVENTION
    assert set(d["layers"]) == set(projection_names(model))
    assert "removed" in rep.table() and RATIO_CONVENTION in rep.table()


def test_adaptive_spends_the_uniform_budget_differently():
    toks = calib()
    reps = {m: compress_(tiny_model(), SVDLLMConfig(ratio=0.4, ranks=m), toks, progress=False) for m in RANKS}
    assert reps["uniform"].ranks() != reps["adaptive"].ranks()
    assert reps["adaptive"].params_after <= sum(
        rank_for_ratio(s.out, s.inp, 0.4) * (s.out + s.inp) for s in reps["uniform"].slots
    )


RANKS = ("uniform", "adaptive")


@pytest.mark.parametrize("family", ["svd-llm", "basis-sharing"])
def test_sensitivity_gives_rank_to_a_matrix_the_loss_depends_on(family):
    toks = calib(8, 32)
    name = "model.layers.1.mlp.down_proj"  # the last block's MLP output: scaled up, it dominates the logits

    def run(scale):
        model = tiny_model()
        with torch.no_grad():
            projection_names(model)[name].weight.mul_(scale)
        cfg = config_class(family)(ratio=0.4, ranks="sensitivity", sensitivity_samples=8)
        return compress_(model, cfg, toks, progress=False)

    plain, sensitive = run(1.0), run(8.0)
    slot = next(s for s in sensitive.slots if name in s.members)
    uniform = rank_for_ratio(slot.out, slot.inp, 0.4)

    def rank(rep):  # a slot kept dense (None) counts as its full rank
        r = rep.ranks()[name]
        return min(slot.out, slot.inp) if r is None else r

    assert rank(sensitive) > rank(plain)
    if (
        family == "svd-llm"
    ):  # Basis Sharing spends much of its budget on the shared groups, which serve 2 layers
        assert rank(sensitive) > uniform
    # the same budget as uniform ranks, to within one rank of every slot
    assert 0.4 - 1e-12 <= sensitive.achieved_ratio < 0.4 + sensitive.rank_step
    assert run(8.0).ranks() == sensitive.ranks()  # deterministic
    # the manifest records the allocator, its settings and each slot's estimate
    d = json.loads(json.dumps(sensitive.to_dict()))
    assert d["rank_mode"] == "sensitivity" and d["allocation"]["samples"] == 8
    assert d["allocation"]["est_loss_chosen"] < d["allocation"]["est_loss_uniform"]
    assert all(e["est_loss_increase"] >= 0 for e in d["layers"].values())
    cfg = config_from_dict({"family": family, "ranks": "sensitivity", "sensitivity_samples": 3})
    assert cfg.sensitivity_samples == 3 and cfg.wanted_stats() >= {"xtx", "outgrad"}


def test_sensitivity_needs_calibration_even_for_plain_svd():
    cfg = SVDConfig(ratio=0.3, ranks="sensitivity")
    assert cfg.wanted_stats() and not SVDConfig(ratio=0.3).wanted_stats()
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_(tiny_model(), cfg, None, progress=False)
    with pytest.raises(ValueError, match="sensitivity_samples"):
        SVDConfig(ranks="sensitivity", sensitivity_samples=0).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_reproduces_dense_logits(family):
    model = tiny_model(variant="qwen2-bias")  # biases must survive factorization
    toks = calib(3, 16, seed=5)
    ref = logits(model, toks)
    # ranks capped at min(out, in) of each slot: every factorization is exact
    rep = compress_(
        model, config_class(family)(ratio=0.3, rank_overrides={".*": 10**6}), calib(), progress=False
    )
    assert all(s.rank == min(s.out, s.inp) for s in rep.slots)
    assert not any(isinstance(m, DenseLinear) for m in projection_names(model).values())
    torch.testing.assert_close(logits(model, toks), ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_keeps_every_projection_dense(family):
    model = tiny_model()
    toks = calib(2, 8)
    ref = logits(model, toks)
    rep = compress_(model, config_class(family)(ratio=0.0), None, progress=False)  # no data needed
    assert rep.achieved_ratio == 0.0 and all(s.rank is None for s in rep.slots)
    assert all(isinstance(m, DenseLinear) for m in projection_names(model).values())
    assert torch.equal(logits(model, toks), ref)


def test_asvd_with_a_dead_input_channel_has_no_nan():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = 0.0  # q/k/v input channel 7 is exactly zero
        model.model.layers[1].post_attention_layernorm.weight[:] = 0.0  # gate/up inputs all zero
    rep = compress_(model, ASVDConfig(ratio=0.5), calib(), progress=False)
    for m in projection_names(model).values():
        assert torch.isfinite(m.U).all() and torch.isfinite(m.V).all()
    assert torch.isfinite(logits(model, calib(2, 8))).all()
    # the pure transform on an all-zero activation vector degrades to plain SVD
    W = torch.randn(12, 20, dtype=torch.float64)
    slot = transform_for(ASVDConfig()).slots(
        ASVDConfig(), {"model.layers.0.mlp.up_proj": DenseLinear(20, 12)}, 1
    )[0]
    lin = DenseLinear(20, 12)
    lin.weight.data = W.float()
    res = transform_for(ASVDConfig()).factorize(
        ASVDConfig(), slot, [lin], SlotData(absmean=torch.zeros(20)), 5
    )
    assert torch.isfinite(res.modules[0].dense_weight()).all() and rep.achieved_ratio >= 0.5


@pytest.mark.parametrize("update_u", [False, True])
def test_svd_llm_with_rank_deficient_calibration_has_no_nan(update_u, caplog):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 0.0  # a constant-zero input dimension
    toks = calib(2, 6)  # 12 tokens < hidden size 64 < intermediate 144: every X^T X is singular
    with caplog.at_level("INFO", logger="rankserve.compress"):
        rep = compress_(model, SVDLLMConfig(ratio=0.4, update_u=update_u), toks, progress=False)
    methods = rep.whitening_counts()
    assert sum(methods.values()) == len(rep.slots) and "cholesky" not in methods
    assert all(m.startswith(("cholesky+shift", "eigh")) for m in methods)
    assert "whitening" in caplog.text  # logged per matrix
    for m in projection_names(model).values():
        assert torch.isfinite(m.U).all() and torch.isfinite(m.V).all()
    assert torch.isfinite(logits(model, calib(2, 8))).all()
    assert all("whitening" in e for e in rep.to_dict()["layers"].values())


def _kl_to_dense(dense, model, toks):
    p = torch.log_softmax(logits(dense, toks), -1)
    q = torch.log_softmax(logits(model, toks), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_svd_llm_beats_svd_on_the_calibration_loss():
    # tokens from a small sub-vocabulary: activations live near a low-dimensional subspace, as real ones do
    toks = calib(8, 32, high=24)
    dense = tiny_model()
    errs = {}
    for cfg in (SVDConfig(ratio=0.5), SVDLLMConfig(ratio=0.5), SVDLLMConfig(ratio=0.5, update_u=True)):
        model = tiny_model()
        compress_(model, cfg, toks, progress=False)
        errs[(cfg.name, getattr(cfg, "update_u", False))] = (_kl_to_dense(dense, model, toks), model)
    assert errs[("svd-llm", False)][0] < 0.5 * errs[("svd", False)][0]
    assert errs[("svd-llm", True)][0] < errs[("svd", False)][0]
    # layer 0 sees identical inputs in both: the whitened objective ||(W - UV) X^T||^2 is provably smaller
    xtx = LayerPipeline(dense, toks, {"xtx"}).collect([0])
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        W = projection_names(dense)[name].weight.double()
        G = xtx[name].xtx

        def loss(model, name=name, W=W, G=G):
            E = W - projection_names(model)[name].dense_weight().double()
            return float(torch.trace(E @ G @ E.T))

        assert loss(errs[("svd-llm", False)][1]) < loss(errs[("svd", False)][1])
        assert loss(errs[("svd-llm", True)][1]) <= loss(errs[("svd-llm", False)][1]) * (1 + 1e-6)


def test_basis_sharing_shares_one_basis_per_group():
    model = tiny_model(num_hidden_layers=3)
    rep = compress_(model, BasisSharingConfig(ratio=0.3, group_size=2), calib(), progress=False)
    p = projection_names(model)
    q0, q1, q2 = (p[f"model.layers.{i}.self_attn.q_proj"] for i in range(3))
    assert isinstance(q0, SharedBasisLinear) and q0.basis is q1.basis and q2.basis is not q0.basis
    assert q0.group == q1.group == "q_proj.g0" and q2.group == "q_proj.g1"
    assert isinstance(p["model.layers.0.self_attn.o_proj"], LowRankLinear)  # o, down are per layer
    slot = next(s for s in rep.slots if s.name == "q_proj.g0")
    assert slot.members == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    # the group rank is the uniform rank of the stacked [2*out, in] matrix: basis once + 2 coefficient blocks
    assert slot.rank == rank_for_ratio(2 * 64, 64, 0.3) and (slot.out, slot.inp) == (128, 64)
    assert slot.params_after == slot.rank * (64 + 2 * 64)
    assert next(s for s in rep.slots if s.name == "q_proj.g1").rank == rank_for_ratio(64, 64, 0.3)


def test_rank_overrides_by_exact_name_and_regex():
    model = tiny_model()
    cfg = SVDConfig(ratio=0.3, rank_overrides={"model.layers.0.mlp.down_proj": 5, r".*\.k_proj": 7})
    rep = compress_(model, cfg, progress=False)
    ranks = rep.ranks()
    assert ranks["model.layers.0.mlp.down_proj"] == 5 and ranks["model.layers.1.mlp.down_proj"] != 5
    assert ranks["model.layers.0.self_attn.k_proj"] == ranks["model.layers.1.self_attn.k_proj"] == 7


def test_plan_ranks_keeps_unprofitable_slots_dense():
    from rankserve.families import Slot

    # a [1, 3] matrix: even rank 1 stores 4 > 3 parameters
    slots = [Slot("a", "q_proj", ["a"], [0], 1, 3), Slot("b", "q_proj", ["b"], [0], 64, 64)]
    ranks = plan_ranks(SVDConfig(ratio=0.01), slots)
    assert ranks["a"] is None and ranks["b"] == math.floor(64 * 64 * 0.99 / 128 + 1e-9)


def test_compress_errors():
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_(tiny_model(), SVDLLMConfig(ratio=0.3), None, progress=False)
    model = tiny_model()
    compress_(model, SVDConfig(ratio=0.3), progress=False)
    with pytest.raises(ValueError, match=r"already compressed .*rankserve.layers.densify_\(model\)"):
        compress_(model, SVDConfig(ratio=0.3), progress=False)


@pytest.mark.parametrize("family", ["svd-llm", "basis-sharing"])
def test_densify_multiplies_the_factors_out(family):
    """densify_ turns every factorized projection into the dense product; the logits stay, and the model can be
    compressed again (gradual compression)."""
    from rankserve.layers import DenseLinear, densify_, projections
    from rankserve.quantize import Int8Config, quantize_

    model = tiny_model()
    compress_(model, config_class(family)(ratio=0.3), calib(), progress=False)
    toks = calib(2, 12, seed=3)
    ref = logits(model, toks)
    factored = [n for n, m in projections(model).items() if not isinstance(m, DenseLinear)]
    assert factored and sorted(densify_(model)) == sorted(factored)
    assert all(isinstance(m, DenseLinear) for m in projections(model).values())
    assert (logits(model, toks) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    rep = compress_(model, config_class(family)(ratio=0.6), calib(), progress=False)
    assert rep.achieved_ratio >= 0.6
    quantize_(model, Int8Config())
    with pytest.raises(ValueError, match="holds int8 weights"):
        densify_(model)


def test_fwsvd_leaves_no_gradients_behind():
    model = tiny_model()
    compress_(model, FWSVDConfig(ratio=0.3), calib(2, 8), progress=False)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", ["svd-llm", "basis-sharing"])
def test_compress_save_load_gives_identical_logits(family, tmp_path):
    from rankserve import checkpoint as ckpt

    model = tiny_model()
    cfg = config_class(family)(ratio=0.4)
    rep = compress_(model, cfg, calib(), progress=False)
    manifest = ckpt.build_manifest(
        model,
        family=cfg.name,
        family_config=cfg.to_dict(),
        ratio=cfg.ratio,
        extra={"compression": rep.to_dict()},
    )
    assert manifest["params_linear"] == rep.params_after
    path = ckpt.save_checkpoint(model, str(tmp_path / "ck"), tokenizer=None, manifest=manifest)
    loaded, m = ckpt.load_checkpoint(path, dtype=torch.float32, device="cpu")
    toks = calib(2, 12, seed=3)
    assert torch.equal(logits(loaded, toks), logits(model, toks))
    assert config_from_dict(m["family_config"]) == cfg


# --------------------------------------------------------------------------------------------------
# CLI: bad input is one line on stderr, a non-zero exit, and nothing written


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--family", "svd", "--ratio", "1.0"], "must be in [0, 1)"),
        (["--family", "svd", "--ratio", "-0.1"], "must be in [0, 1)"),
        (["--family", "nope", "--ratio", "0.3"], "known families:"),
        (["--family", "svd-llm", "--ratio", "0.3", "--calib-data", "/no/such/file.txt"], "not found"),
        (["--family", "svd", "--ratio", "0.3", "--alpha", "0.5"], "--alpha does not apply to family svd"),
        (["--family", "svd-llm", "--ratio", "0.3", "--calib-self-share", "0.5"], "give --calib-data PATH"),
        (
            [
                "--family",
                "svd-llm",
                "--ratio",
                "0.3",
                "--calib-data",
                "/no/file",
                "--calib-self-share",
                "nan",
            ],
            "--calib-self-share must be a fraction in [0, 1], got nan",
        ),
    ],
)
def test_cli_bad_input_is_one_line(extra, pattern, tmp_path, capsys):
    from rankserve.cli.main import main

    out = tmp_path / "out"
    code = main(["compress", "/no/model", *extra, "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code != 0 and len(err) == 1 and pattern in err[0], err
    assert not out.exists()


def test_cli_refuses_an_existing_out(tmp_path, capsys):
    from rankserve.cli.main import main

    code = main(["compress", "/no/model", "--family", "svd", "--ratio", "0.3", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "already exists" in err[0]


def test_cli_compresses_a_tiny_model_directory(tmp_path, capsys):
    from test_loaders import write_hf_dir
    from tiny_tok import tiny_tokenizer

    from rankserve.cli.main import main
    from rankserve.loaders.source import load_model

    src = tmp_path / "src"
    write_hf_dir(src, max_position_embeddings=64)
    tiny_tokenizer().save(str(src))
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("the cat sat on the mat. " * 50)
    out = tmp_path / "ck"
    args = ["compress", str(src), "--family", "svd-llm", "--ratio", "0.4", "--calib-data", str(calib_file)]
    args += ["--calib-samples", "4", "--calib-seq-len", "16", "--update-u", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "total" in text and "removed" in text and RATIO_CONVENTION in text
    lm = load_model(str(out))
    m = lm.manifest
    assert m["family"] == "svd-llm" and m["ratio"] == 0.4 and m["family_config"]["update_u"] is True
    c = m["calibration"]
    assert (c["n_samples"], c["seq_len"], c["seed"]) == (4, 16, 0) and len(c["sha256"]) == 64
    comp = m["compression"]
    assert 0.4 <= comp["achieved_ratio"] < 0.4 + comp["rank_step"] and comp["wall_time_s"] > 0
    assert all("whitening" in e and e["rank"] for e in comp["layers"].values())
    assert len(m["source"]["sha256"]) == 64

    # half of the calibration written by the model itself, half the file's windows
    mixed = tmp_path / "mixed"
    args = ["compress", str(src), "--family", "svd-llm", "--ratio", "0.4", "--calib-data", str(calib_file)]
    args += [
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "16",
        "--calib-self-share",
        "0.5",
        "--out",
        str(mixed),
    ]
    assert main(args) == 0
    c = load_model(str(mixed)).manifest["calibration"]
    assert (c["source"], c["n_samples"], c["seq_len"]) == ("mix", 4, 16)
    assert [(p["source"], p.get("samples", p.get("n_samples"))) for p in c["parts"]] == [
        ("self-generated", 2),
        (str(calib_file.resolve()), 2),
    ]
