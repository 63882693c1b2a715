"""Calibration data and the layer-by-layer statistics pipeline, on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

from rankserve.calibration import (
    LayerPipeline,
    fisher_row_importance,
    make_calibration,
    projection_names,
    self_calibration,
    self_generated_rows,
    text_calibration,
)
from rankserve.errors import InputError
from rankserve.layers import replace_module
from rankserve.models.llama import rope_cos_sin

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def tokens(n=4, L=16, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\ufeff" + TEXT, encoding="utf-8")  # a BOM, like wiki.valid.tokens
    return str(p)


def test_text_calibration_is_seeded_windows_of_the_file(text_file):
    tok = tiny_tokenizer()
    a = text_calibration(text_file, tok, 6, 20, seed=3)
    b = text_calibration(text_file, tok, 6, 20, seed=3)
    c = text_calibration(text_file, tok, 6, 20, seed=4)
    assert a.tokens.shape == (6, 20) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    ids = tok.encode(TEXT, add_special_tokens=False)
    joined = ",".join(map(str, ids))
    for row in a.tokens.tolist():  # every sample is a contiguous window of the tokenized file
        assert ",".join(map(str, row)) in joined
    meta = a.to_dict()
    assert meta["n_samples"] == 6 and meta["seq_len"] == 20 and meta["seed"] == 3
    assert len(meta["sha256"]) == 64 and meta["source"].endswith("calib.txt")


def test_text_calibration_errors(tmp_path, text_file):
    tok = tiny_tokenizer()
    with pytest.raises(FileNotFoundError):
        text_calibration(str(tmp_path / "missing.txt"), tok, 2, 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        text_calibration(text_file, tok, 2, 100_000)
    with pytest.raises(ValueError, match="positive integer"):
        text_calibration(text_file, tok, 0, 8)


def test_mixed_calibration_is_the_models_rows_then_the_files_windows(text_file):
    tok, model = tiny_tokenizer(), tiny_model()
    mix = make_calibration(text_file, model, tok, 5, 40, seed=2, self_share=0.4)
    own, record = self_generated_rows(model, tok, 2, 40, 2)
    text = text_calibration(text_file, tok, 3, 40, 2)
    assert torch.equal(mix.tokens, torch.cat([own, text.tokens]))
    d = mix.to_dict()
    assert (d["source"], d["n_samples"], d["seq_len"], d["seed"]) == ("mix", 5, 40, 2)
    assert d["parts"] == [record, text.to_dict()]
    # the ends of the range are the file alone and the model alone
    assert torch.equal(
        make_calibration(text_file, model, tok, 5, 40, 2, self_share=0).tokens,
        text_calibration(text_file, tok, 5, 40, 2).tokens,
    )
    assert torch.equal(
        make_calibration(text_file, model, tok, 5, 40, 2, self_share=1).tokens,
        self_generated_rows(model, tok, 5, 40, 2)[0],
    )
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(InputError, match="self_share must be a fraction"):
            make_calibration(text_file, model, tok, 5, 40, self_share=bad)


def test_self_calibration_is_deterministic_by_seed():
    model = tiny_model()
    a = self_calibration(model, 3, 12, seed=7, bos_id=1, batch_size=2)
    b = self_calibration(model, 3, 12, seed=7, bos_id=1, batch_size=2)
    c = self_calibration(model, 3, 12, seed=8, bos_id=1, batch_size=2)
    assert a.tokens.shape == (3, 12) and bool((a.tokens[:, 0] == 1).all())
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) == 3  # each sample has its own sampler
    assert a.to_dict()["source"] == "self"
    d = make_calibration(None, model, tiny_tokenizer(), 2, 8, seed=1)
    assert d.tokens.shape == (2, 8) and d.source == "self"


def test_self_calibration_fast_default_samples_what_the_eager_path_samples(monkeypatch):
    # on a CPU the default generator is the fast runtime; in fp32 its logits match the eager reference path's
    # closely enough that the per-row samplers draw the same tokens
    import rankserve.runtime.runners as runners
    from rankserve.runtime.options import RuntimeOptions

    made = []
    real = runners.make_runner
    monkeypatch.setattr(
        runners, "make_runner", lambda m, b, L, o: made.append((b, o.backend)) or real(m, b, L, o)
    )
    model = tiny_model()
    fast = self_calibration(model, 5, 16, seed=3, bos_id=1, batch_size=2)
    assert made == [(2, "fast"), (1, "fast")]  # one runner per batch size: 2 + 2 + 1 rows
    eager = self_calibration(
        model, 5, 16, seed=3, bos_id=1, batch_size=2, options=RuntimeOptions(backend="eager")
    )
    assert torch.equal(fast.tokens, eager.tokens)


def test_self_calibration_prompts_of_different_lengths_fill_every_row():
    # Rows are left-padded to the longest prompt, so the cache must hold more than seq_len; 256 is a whole
    # number of the fast path's cache buckets, where a cache of seq_len slots overflowed (IndexError).
    model = tiny_model(max_position_embeddings=1024)
    prompts = [[1], [1, 5, 6, 7, 8, 9]]
    c = self_calibration(model, 3, 256, seed=2, bos_id=1, batch_size=2, prompts=prompts)
    assert c.tokens.shape == (3, 256)
    assert c.tokens[1, :6].tolist() == prompts[1] and c.tokens[2, 0] == 1
    with pytest.raises(
        InputError, match="context"
    ):  # padded rows would not fit: a clear error, not short rows
        self_calibration(tiny_model(), 2, 256, seed=2, bos_id=1, batch_size=2, prompts=prompts)


def _direct_layer0_xtx(model, toks):
    x = model.model.embed_tokens(toks)  # (N, L, D)
    h = model.model.layers[0].input_layernorm(x).reshape(-1, x.shape[-1]).double()
    return h.T @ h, h.abs().mean(0)


def test_layer0_stats_equal_direct_computation_from_embeddings():
    model = tiny_model()
    toks = tokens()
    pipe = LayerPipeline(model, toks, {"xtx", "absmean"}, batch_size=3)
    stats = pipe.collect([0])
    xtx, absmean = _direct_layer0_xtx(model, toks)
    q = stats["model.layers.0.self_attn.q_proj"]
    assert q.tokens == toks.numel()
    torch.testing.assert_close(q.xtx, xtx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.absmean, absmean, rtol=1e-10, atol=1e-12)
    # q/k/v read one tensor and gate/up another: one statistics object each, never recomputed
    assert stats["model.layers.0.self_attn.k_proj"] is q and stats["model.layers.0.self_attn.v_proj"] is q
    assert stats["model.layers.0.mlp.up_proj"] is stats["model.layers.0.mlp.gate_proj"]
    assert stats["model.layers.0.mlp.down_proj"].xtx.shape == (144, 144)


def test_pipeline_matches_full_forward_hooks_and_feeds_compressed_blocks():
    model = tiny_model(num_hidden_layers=3)
    toks = tokens(n=3, L=10)
    # reference: the inputs of every projection during one ordinary full forward
    seen = {}

    def keep(name):
        def hook(_m, args):  # returns None: a pre-hook that returned a value would replace the input
            seen[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in projection_names(model).items()]
    with torch.no_grad():
        model(toks)
    for h in hooks:
        h.remove()
    pipe = LayerPipeline(model, toks, {"xtx"}, batch_size=2)
    for i in range(3):
        stats = pipe.collect([i])
        for short in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            x = seen[f"model.layers.{i}.{short}"].double()
            # both sides are fp32 forwards, at batch 2 here and 3 there: with 2 threads their blocking differs and
            # the inputs differ by rounding (5.7e-6 relative seen); a wrong input or order is off by O(1)
            torch.testing.assert_close(stats[f"model.layers.{i}.{short}"].xtx, x.T @ x, rtol=2e-5, atol=2e-5)
        pipe.advance([i])

    # advance() runs the blocks as they are NOW: zero layer 0's MLP and layer 1 sees x + attn(x) only
    pipe = LayerPipeline(model, toks, {"xtx"})
    pipe.collect([0])
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight.zero_()
    pipe.advance([0])
    got = pipe.collect([1])["model.layers.1.self_attn.q_proj"].xtx
    with torch.no_grad():
        x = model.model.embed_tokens(toks)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(10)[None], x.dtype)
        x = model.model.layers[0](x, cos, sin)
        h = model.model.layers[1].input_layernorm(x).reshape(-1, 64).double()
    torch.testing.assert_close(got, h.T @ h, rtol=1e-6, atol=1e-6)


def test_pipeline_statistics_are_deterministic():
    toks = tokens()
    runs = []
    for _ in range(2):
        model = tiny_model()
        pipe = LayerPipeline(model, toks, {"xtx", "absmean"})
        s0 = pipe.collect([0])
        pipe.advance([0])
        s1 = pipe.collect([1])
        runs.append({**s0, **s1})
    for name, st in runs[0].items():
        assert torch.equal(st.xtx, runs[1][name].xtx) and torch.equal(st.absmean, runs[1][name].absmean)


def test_pipeline_rejects_out_of_order_units():
    pipe = LayerPipeline(tiny_model(), tokens(), {"xtx"})
    with pytest.raises(ValueError, match="consecutive"):
        pipe.collect([1])
    with pytest.raises(ValueError, match="unknown"):
        LayerPipeline(tiny_model(), tokens(), {"hessian"})


def test_fisher_row_importance_equals_per_sample_squared_gradients():
    model = tiny_model()
    toks = tokens(n=2, L=8)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with torch.no_grad():  # the Fisher pass turns gradients on for itself
        got = fisher_row_importance(model, toks, names)
    ref = {n: torch.zeros(projection_names(model)[n].out_features, dtype=torch.float64) for n in names}
    ws = {n: projection_names(model)[n].weight for n in names}
    for i in range(2):
        for w in ws.values():
            w.requires_grad_(True)
        logits = model(toks[i : i + 1])
        loss = F.cross_entropy(logits[0, :-1], toks[i, 1:])
        grads = torch.autograd.grad(loss, list(ws.values()))
        for n, g in zip(names, grads, strict=True):
            ref[n] += g.double().pow(2).sum(1)
        for w in ws.values():
            w.requires_grad_(False)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-12)
        assert got[n].shape == (projection_names(model)[n].out_features,)
    assert not any(p.requires_grad for p in model.parameters())  # gradients were switched off again
    assert all(p.grad is None for p in model.parameters())


def test_zero_input_channel_has_zero_absmean():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 0.0
    st = LayerPipeline(model, tokens(), {"absmean"}).collect([0])["model.layers.0.self_attn.q_proj"]
    assert float(st.absmean[5]) == 0.0 and st.xtx is None


def test_projection_names_exclude_lm_head():
    model = tiny_model()
    names = projection_names(model)
    assert "lm_head" not in names and len(names) == 7 * 2
    replace_module(model, "lm_head", model.lm_head)  # untouched
