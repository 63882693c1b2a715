"""quantize_ with Int8Config: int8 projections and models against fp32, by the half-step error bound and SQNR."""

from __future__ import annotations

import copy

import pytest
import torch
from test_checkpoint import TOKENS, logits, make
from tiny import tiny_model

import rankserve
from rankserve.compress import compress_
from rankserve.errors import InputError
from rankserve.families import SVDConfig
from rankserve.layers import DenseLinear, LowRankLinear, SharedBasisLinear, projections
from rankserve.quantize import (
    Int8Config,
    QuantConfig,
    config_from_dict,
    int8_tensors,
    quantize_,
    smooth_norm_groups_,
)


def half_step(p, name: str) -> torch.Tensor:
    """[out, in]: the largest rounding error each element of an int8 matrix may carry (half its group's step)."""
    q, scale = p.qmat(name)
    return (scale / 2).repeat_interleave(q.shape[1] // scale.shape[1], dim=1)


def quantized(p, group_size=None):
    """(float original, int8 copy) of one projection wrapped in a throwaway module."""
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.model.layers[0].proj = p
    ref = copy.deepcopy(holder)
    quantize_(holder, Int8Config(group_size=group_size))
    return ref.model.layers[0].proj, holder.model.layers[0].proj


SLACK = 1e-5  # fp32 summation order; the bounds below are exact in real arithmetic


@pytest.mark.parametrize("group", [None, 16])
def test_dense_error_within_half_step_bound(group):
    torch.manual_seed(0)
    dense = DenseLinear(64, 48, bias=True)
    torch.nn.init.normal_(dense.weight)
    ref, p = quantized(dense, group)
    assert p.weight.dtype == torch.int8 and p.weight_scale.dtype == torch.float32
    assert "weight" not in dict(p.named_parameters()) and p.qmat("weight") is not None
    x = torch.randn(5, 64)
    with torch.no_grad():
        err = (p(x) - ref(x)).abs()
        bound = x.abs() @ half_step(p, "weight").T  # |sum_i e_oi x_i| <= sum_i step_oi/2 |x_i|
    assert (err <= bound + SLACK).all()
    assert err.max() > 0.01 * bound.max()  # the bound is not vacuous: errors are of its order


def chained_bound(p, first: str, second: str, x: torch.Tensor) -> torch.Tensor:
    """For y = A (B x) with A_q = A + dA, B_q = B + dB: A_q B_q x - A B x = dA (B_q x) + A (dB x), so
    |error| <= E_A |B_q x| + (|A_q| + E_A) E_B |x| with E the elementwise half steps. x is [n, in]."""
    e_a, e_b = half_step(p, second), half_step(p, first)
    return (x @ p.mat(first).T).abs() @ e_a.T + (x.abs() @ e_b.T) @ (p.mat(second).abs() + e_a).T


@pytest.mark.parametrize("group", [None, 8])
def test_lowrank_and_shared_error_within_half_step_bound(group):
    torch.manual_seed(1)
    W = torch.randn(48, 64)
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    lr = LowRankLinear.from_factors(u[:, :16] * s[:16].sqrt(), s[:16].sqrt()[:, None] * vh[:16])
    basis = torch.nn.Parameter(vh[:16].contiguous(), requires_grad=False)
    sh = SharedBasisLinear(basis, W @ basis.T, group="g0")
    x = torch.randn(7, 64)
    for mod, (first, second) in ((lr, ("V", "U")), (sh, ("basis", "coeff"))):
        ref, p = quantized(mod, group)
        with torch.no_grad():
            err = (p(x) - ref(x)).abs()
            bound = chained_bound(p, first, second, x)
        assert (err <= bound + SLACK).all(), type(mod).__name__
        assert torch.allclose(p.dense_weight(), p.mat(second) @ p.mat(first))


@pytest.mark.parametrize("kind", ["dense", "lowrank", "mixed", "shared"])
@pytest.mark.parametrize("group", [None, 16, 8])
def test_model_logits_and_sqnr(kind, group):
    ref = make(kind)
    model = copy.deepcopy(ref)
    report = quantize_(model, Int8Config(group_size=group))
    # int8 Gaussian-like weights: SQNR ~ 6 dB per bit minus the crest factor, about 40 dB; 30 dB is a clear fail
    assert min(report.sqnr_db.values()) > 30
    # The eager forward is exactly the fp32 model run on the dequantized weights (the kernels' reference).
    # (New parameters, not copies into the old ones: a tied LM head is quantized apart from the embedding.)
    deq = copy.deepcopy(ref)
    for name, p in projections(model).items():
        for m in p.matrices:
            setattr(projections(deq)[name], m, torch.nn.Parameter(p.mat(m).clone(), requires_grad=False))
    out, want, ref_out = logits(model), logits(deq), logits(ref)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Against fp32, the relative logit error stays below the sum of the matrices' relative errors (first order:
    # each perturbation enters once; the tiny models' layers have gains near one).
    rel_w = sum(10 ** (-db / 20) for db in report.sqnr_db.values())
    rel = float((out - ref_out).norm() / ref_out.norm())
    assert 0 < rel < rel_w
    assert (out.argmax(-1) == ref_out.argmax(-1)).float().mean() > 0.9


def test_state_dict_contract_and_shared_basis_quantized_once():
    model = make("shared")
    report = quantize_(model, Int8Config(lm_head=False, factor_group_size=None))
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.down_proj.V"].dtype == torch.int8
    assert sd["model.layers.0.mlp.down_proj.V_scale"].dtype == torch.float32
    assert sd["model.layers.0.mlp.down_proj.V_scale"].shape == (10, 1)
    q0 = model.model.layers[0].self_attn.q_proj
    q1 = model.model.layers[1].self_attn.q_proj
    assert q0.basis is q1.basis and q0.basis_scale is q1.basis_scale  # still one object for the group
    bases = [t for t in report.tensors if t.endswith(".basis")]
    assert len(bases) == 2  # q_proj.g0 and gate_up.g0, each once
    assert all(
        p.qmat(m) is not None
        for p in projections(model).values()
        if p is not model.lm_head
        for m in p.matrices
    )
    assert model.lm_head.qmat("weight") is None
    assert set(int8_tensors(model)) == {k for k, v in sd.items() if v.dtype == torch.int8}
    assert [p.param_count() for p in projections(model).values()] == [
        p.param_count() for p in projections(make("shared")).values()
    ]


def test_lm_head_of_a_tied_model_leaves_the_embedding_float():
    model = tiny_model("llama-mha")  # ties embeddings
    ref_logits = logits(model)
    quantize_(model, Int8Config(lm_head=True))
    assert model.lm_head.weight.dtype == torch.int8
    assert model.model.embed_tokens.weight.dtype == torch.float32
    rel = (logits(model) - ref_logits).norm() / ref_logits.norm()
    assert 0 < rel < 0.05


def test_bf16_model_dequantizes_to_bf16():
    model = tiny_model("llama-gqa", dtype=torch.bfloat16)
    quantize_(model, Int8Config(group_size=32))
    p = model.model.layers[0].self_attn.q_proj
    assert p.mat("weight").dtype == torch.bfloat16 and p.weight_scale.dtype == torch.float32
    assert logits(model).dtype == torch.bfloat16


def test_bad_input_changes_nothing():
    model = tiny_model("llama-gqa")  # intermediate 144, hidden 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="divides none of the matrices' column counts \\(64, 144\\)"):
        quantize_(model, Int8Config(group_size=7))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(InputError, match="positive integer"):
        quantize_(model, Int8Config(group_size=0))
    quantize_(model, Int8Config())
    with pytest.raises(InputError, match="already holds int8"):
        quantize_(model, Int8Config())
    with pytest.raises(InputError, match="compress its float source"):
        compress_(model, SVDConfig(ratio=0.2), progress=False)


def test_config_round_trip_and_package_exports():
    cfg = Int8Config(group_size=64, lm_head=True)
    assert config_from_dict(cfg.to_dict()) == cfg
    want = {"method": "int8", "version": 1, "group_size": 64, "lm_head": True, "factor_group_size": 16}
    want["smooth"] = False
    assert cfg.to_dict() == want
    # a record written before factor groups existed: the factors took group_size like every other matrix
    old = {"method": "int8", "version": 1, "group_size": None, "lm_head": False}
    assert config_from_dict(old) == Int8Config(None, False, factor_group_size=None, smooth=False)
    with pytest.raises(InputError, match="smooth must be true or false"):
        Int8Config(smooth="yes").validate()
    with pytest.raises(InputError, match="factor_group_size must be a positive integer"):
        Int8Config(factor_group_size=0).validate()
    with pytest.raises(InputError, match="unknown field"):
        Int8Config.from_dict({"method": "int8", "version": 1, "bits": 4})
    with pytest.raises(InputError, match="unknown quantization method"):
        config_from_dict({"method": "nf4"})
    with pytest.raises(InputError, match="no quantization method"):
        quantize_(tiny_model(), QuantConfig())
    assert rankserve.Int8Config is Int8Config and rankserve.quantize_ is quantize_


def test_group_not_dividing_a_matrix_falls_back_to_per_channel():
    model = make("lowrank")  # rank 8; hidden 64, intermediate 144
    report = quantize_(model, Int8Config(group_size=16))
    q = model.model.layers[0].self_attn.q_proj
    assert q.V_scale.shape == (8, 64 // 16) and q.U_scale.shape == (64, 1)  # 16 does not divide rank 8
    down = model.model.layers[0].mlp.down_proj
    assert down.V_scale.shape == (8, 144 // 16)
    assert "model.layers.0.self_attn.q_proj.U" in report.per_channel
    assert not any(t.endswith(".V") for t in report.per_channel)
    assert "per channel (the group does not divide" in report.table()


def test_defaults_group_the_first_factor_and_quantize_the_head():
    """The defaults (docs/INT8.md): V and shared bases in groups of 16 input columns, lifts and dense matrices
    per output channel, the LM head int8."""
    model = make("shared")  # hidden 64, intermediate 144: both divisible by 16
    report = quantize_(model, Int8Config())
    q = model.model.layers[0].self_attn.q_proj
    assert q.basis_scale.shape == (q.basis.shape[0], 64 // 16) and q.coeff_scale.shape == (64, 1)
    down = model.model.layers[0].mlp.down_proj
    assert down.V_scale.shape == (down.V.shape[0], 144 // 16) and down.U_scale.shape == (64, 1)
    assert model.lm_head.weight.dtype == torch.int8 and model.lm_head.weight_scale.shape[1] == 1
    assert report.per_channel == []
    # groups of 16 on the first factor are at least as accurate as one scale per row
    per_row = quantize_(make("shared"), Int8Config(factor_group_size=None))
    key = "model.layers.0.mlp.down_proj.V"
    assert report.sqnr_db[key] > per_row.sqnr_db[key]


def test_training_free_and_deterministic():
    a, b = make("lowrank"), make("lowrank")
    quantize_(a, Int8Config(group_size=8))
    quantize_(b, Int8Config(group_size=8))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert TOKENS.shape == (2, 12)


@pytest.mark.parametrize("kind, groups", [("dense", 0), ("lowrank", None), ("mixed", 1), ("shared", 0)])
def test_smoothing_folds_exactly_into_the_norms(kind, groups):
    ref = make(kind)
    model = copy.deepcopy(ref)
    L = len(model.model.layers)
    n = smooth_norm_groups_(model)
    # lowrank: both groups of every layer; mixed: layer 0's q/k/v (q, v low-rank) and every gate/up (up
    # low-rank); shared: every group holds a shared basis, dense: no factor, so nothing changes
    assert n == {"lowrank": 2 * L, "mixed": 1 + L}.get(kind, groups)
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-4, atol=1e-4)
    if kind == "lowrank":  # the first matrices reading one norm now have equal column maxima
        a = model.model.layers[0].self_attn
        colmax = torch.stack([p.V.abs().amax(0) for p in (a.q_proj, a.k_proj, a.v_proj)]).amax(0)
        torch.testing.assert_close(colmax, colmax.mean().expand_as(colmax), rtol=1e-5, atol=0)


def test_smoothing_keeps_a_small_column_precise_with_one_scale_per_row():
    """SVD-LLM's whitening leaves channels with large activations small columns in V: an exact rescaling of one
    column by 1e-3 (the norm weight times 1e3) ruins per-row int8 without smoothing, not with it."""
    ref = make("lowrank")
    with torch.no_grad():
        for layer in ref.model.layers:
            a = layer.self_attn
            for p in (a.q_proj, a.k_proj, a.v_proj):
                p.V[:, 3] *= 1e-3
            layer.input_layernorm.weight[3] *= 1e3
    err = {}
    for smooth in (False, True):
        model = copy.deepcopy(ref)
        quantize_(model, Int8Config(factor_group_size=None, lm_head=False, smooth=smooth))
        err[smooth] = float((logits(model) - logits(ref)).norm() / logits(ref).norm())
    assert err[True] < 0.5 * err[False]
