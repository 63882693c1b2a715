"""The fast runtime against the eager reference: packing, decode path, compiled capture, recompiles."""

import pytest
import torch
from tiny import tiny_model

from rankserve.layers import LowRankLinear, SharedBasisLinear, projections, replace_module
from rankserve.linalg import truncated_svd
from rankserve.runtime.eager import EagerRunner, padded_batch
from rankserve.runtime.fast import FastRunner
from rankserve.runtime.hugepages import Arena
from rankserve.runtime.native import ISAS, NativeKernels, compiler, cpu_runs, namespace
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.packing import apply_packed, pack_, packed_bytes


def lowrank_model(variant="llama-gqa", keep=0.5, shared=False, seed=0, **config):
    """A tiny model with every decoder projection factorized (and q_proj sharing one basis, if asked)."""
    model = tiny_model(variant, seed=seed, **config)
    for name, p in projections(model).items():
        if name == "lm_head":
            continue
        r = max(1, int(keep * min(p.in_features, p.out_features)) - 3)  # odd ranks on purpose
        U, V = truncated_svd(p.weight.detach(), r)
        replace_module(model, name, LowRankLinear.from_factors(U, V, p.bias))
    if shared:
        layers = model.model.layers
        basis = torch.nn.Parameter(layers[0].self_attn.q_proj.V.detach().clone(), requires_grad=False)
        for layer in layers:
            q = layer.self_attn.q_proj
            coeff = q.dense_weight() @ torch.linalg.pinv(basis)
            layer.self_attn.q_proj = SharedBasisLinear(basis, coeff, q.bias, group="q_proj.g0")
    return model


@pytest.mark.parametrize("kind", ["dense", "lowrank", "mixed", "shared"])
@pytest.mark.parametrize("in_arena", [False, True])
def test_packing_is_exact(kind, in_arena):
    model = (
        tiny_model("qwen2-bias")
        if kind in ("dense", "mixed")
        else lowrank_model("qwen2-bias", shared=kind == "shared")
    )
    if kind == "mixed":
        p = model.model.layers[0].self_attn.k_proj
        U, V = truncated_svd(p.weight.detach(), 7)
        replace_module(model, "model.layers.0.self_attn.k_proj", LowRankLinear.from_factors(U, V, p.bias))
    at = model.model.layers[0].self_attn
    x = torch.randn(3, 64)
    ref = torch.cat([at.q_proj(x), at.k_proj(x), at.v_proj(x)], -1)
    projs = [at.q_proj, at.k_proj, at.v_proj]
    arena = Arena(packed_bytes(projs)) if in_arena else None
    group = pack_(projs, arena)
    got = apply_packed(group, x)
    assert (got - ref).abs().max().item() <= 1e-5
    # in place: the modules now read the packed buffer, and give the same outputs as before
    after = torch.cat([at.q_proj(x), at.k_proj(x), at.v_proj(x)], -1)
    assert torch.equal(after, ref)
    if kind != "shared":  # a shared basis cannot be a view of one layer's buffer (it is copied)
        q_first = at.q_proj.weight if kind in ("dense", "mixed") else at.q_proj.V
        assert q_first.untyped_storage().data_ptr() == group.first.untyped_storage().data_ptr()
    if (
        in_arena
    ):  # every matrix the GEMV reads is in the arena, the lifts too, and the modules view them there
        lifts = [t for t in group.lifts if t is not None]
        assert all(arena.holds(t) for t in [group.first, *lifts]) and len(lifts) == (kind != "dense") + 2 * (
            kind in ("lowrank", "shared")
        )
        mats = [getattr(p, n) for p in projs for n in p.matrices if not isinstance(p, SharedBasisLinear)]
        assert all(arena.holds(m) for m in mats) and arena.used <= packed_bytes(projs)
    used = arena.used if in_arena else None
    assert (
        pack_(projs, arena).first.data_ptr() == group.first.data_ptr() or kind == "shared"
    )  # a second pack copies nothing (a shared basis is copied into every group that uses it)
    assert not in_arena or arena.used == used or kind == "shared"


def run(runner_cls, model, prompts, steps, options, forced=None):
    """Logits [B, steps+1, V] of greedy decoding; with ``forced`` [B, steps+1] those tokens are fed instead
    (teacher forcing), so two paths are compared on the same inputs even where a near-tie flips an argmax."""
    tokens, positions, vf = padded_batch(prompts, pad_id=0)
    r = runner_cls(model, len(prompts), tokens.shape[1] + steps + 1, options)
    logits = [r.prefill(tokens, positions, vf)]
    pick = (lambda i: logits[-1].argmax(-1)[:, None]) if forced is None else (lambda i: forced[:, i : i + 1])
    nxt, pos, P = pick(0), positions[:, -1:] + 1, tokens.shape[1]
    for s in range(steps):
        logits.append(r.decode(nxt, pos, P + s, vf))
        nxt, pos = pick(s + 1), pos + 1
    return torch.stack(logits, 1)


def assert_fast_decodes_like_eager(model, prompts, steps, **options):
    """The fast runner (uncompiled step, ``options`` on top) against the eager reference: logits within 1e-3 and
    the same greedy picks."""
    ref = run(EagerRunner, model, prompts, steps, RuntimeOptions())
    got = run(FastRunner, model, prompts, steps, RuntimeOptions(backend="fast", compile=False, **options))
    assert (got - ref).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


CASES = [
    ("llama-gqa", False),
    ("qwen2-bias", False),
    ("llama3-rope", False),
    ("llama-gqa", True),
    ("qwen2-bias", True),
]


RUNNABLE = [isa for isa in ISAS if cpu_runs(isa)]


@pytest.mark.parametrize("variant,lowrank", CASES)
@pytest.mark.parametrize("native", [None, *RUNNABLE])
def test_fast_decode_equals_eager(variant, lowrank, native):
    """Every native vector path this CPU runs (and the PyTorch fallback) against the eager reference."""
    if native is not None:
        if compiler() is None:
            pytest.skip("no C++ compiler on PATH: only the PyTorch fallback can be tested here")
        NativeKernels.load(native, strict=True)  # with a compiler, a failed build fails this test
    model = lowrank_model(variant) if lowrank else tiny_model(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ref = run(EagerRunner, model, prompts, 10, RuntimeOptions())
    options = RuntimeOptions(
        backend="fast", compile=False, native=native is not None, native_isa=native or "auto"
    )
    with torch.profiler.profile() as prof:
        got = run(FastRunner, model, prompts, 10, options)
    assert (got - ref).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # the runner says which kernels it uses, and those (and only those) ran
    report = FastRunner(model, 1, 8, options).report()
    ran = {e.name for e in prof.events() if e.name.startswith("rankserve")}
    if native is None:
        assert report == {"native_kernels": False, "native_isa": None} and not ran
    else:
        assert report["native_kernels"] and report["native_isa"].split("+")[0] == native
        assert f"{namespace(native)}::decode_layer" in ran
        assert all(name.startswith(namespace(native) + "::") for name in ran)


def gate_up_model(layout: str):
    """A tiny model whose MLP gate and up differ in form: 'mixed' (gate low-rank, up dense: the native layer runs
    gate's lift in a stage after up's GEMV) or 'ranks' (both low-rank, of different ranks: different tiles)."""
    model = tiny_model("llama-gqa")
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj") if layout == "ranks" else ("gate_proj",):
            p = getattr(mlp, name)
            r = min(p.in_features, p.out_features) // 2 - (3 if name == "up_proj" else 0) - i
            U, V = truncated_svd(p.weight.detach(), r)
            setattr(mlp, name, LowRankLinear.from_factors(U, V, p.bias))
    return model


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
@pytest.mark.parametrize("layout", ["mixed", "ranks"])
@pytest.mark.parametrize("native", RUNNABLE)
def test_fast_decode_equals_eager_whatever_the_gate_up_form(layout, native):
    if compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    NativeKernels.load(native, strict=True)
    model = gate_up_model(layout)
    assert_fast_decodes_like_eager(model, [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 8, native_isa=native)


@pytest.fixture
def team_size():
    """Sets torch's thread count for one test (the native layer sizes its per-thread buffers by it)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "variant,lowrank,rows", [("llama-gqa", True, 1), ("mistral", False, 1), ("llama-gqa", False, 2)]
)
def test_fast_decode_equals_eager_at_every_team_size(team_size, threads, variant, lowrank, rows):
    """Each team size (1 to 4 threads) decodes like eager: the native layer splits every stage's row tiles and
    each row's cache rows (attention partials) over however many threads the region has, and sizes its
    per-thread score and partial buffers by it; one or two rows, low-rank or dense, 2 kv heads (4 or 8 query heads)."""
    team_size(threads)
    model = lowrank_model(variant) if lowrank else tiny_model(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]][:rows]
    assert_fast_decodes_like_eager(model, prompts, 12)


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fast_decode_equals_eager_over_long_contexts_and_many_heads_per_kv_head(team_size, threads):
    """The attention partials over contexts long enough for several key tiles and the vector exp in each thread's
    share (up to 57 cache rows), with more query heads per kv head than one pass takes (6 over 1: passes of 4 and
    2), and rows whose valid prefixes differ (left padding)."""
    team_size(threads)
    model = tiny_model("llama-gqa", num_attention_heads=6, num_key_value_heads=1, hidden_size=96)
    prompts = [list(range(3, 48)), list(range(5, 35))]
    assert_fast_decodes_like_eager(model, prompts, 12)


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("form", ["dense", "lowrank", "mixed"])
def test_fast_decode_equals_eager_at_ragged_widths(team_size, threads, form):
    """Widths that are no multiple of the vector or the tile: hidden 72 (the norms' vector loop and its scalar
    tail, in each thread's slice too) and intermediate 150 (gate and up of 37 full row tiles and a partial one,
    each thread's SiLU rows in runs with ragged ends), with gate and up dense, low-rank, or one of each (then
    the SiLU product is a stage of its own)."""
    team_size(threads)
    shape = dict(hidden_size=72, intermediate_size=150, num_attention_heads=4, num_key_value_heads=2)
    model = lowrank_model("llama-gqa", **shape) if form == "lowrank" else tiny_model("llama-gqa", **shape)
    if form == "mixed":
        for layer in model.model.layers:
            p = layer.mlp.gate_proj
            U, V = truncated_svd(p.weight.detach(), 29)
            layer.mlp.gate_proj = LowRankLinear.from_factors(U, V, p.bias)
    assert_fast_decodes_like_eager(model, [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 10)


def test_shared_basis_model_decodes_like_eager():
    model = lowrank_model("llama-gqa", shared=True)
    ref = run(EagerRunner, model, [[3, 4, 5, 6]], 8, RuntimeOptions())
    got = run(FastRunner, model, [[3, 4, 5, 6]], 8, RuntimeOptions(backend="fast", compile=False))
    assert (got - ref).abs().max().item() <= 1e-3


def test_compiled_step_equals_eager_and_never_recompiles():
    import torch._dynamo.utils as dutils

    torch._dynamo.reset()
    model = lowrank_model("llama-gqa")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ref = run(EagerRunner, model, prompts, 12, RuntimeOptions())
    tokens, positions, vf = padded_batch(prompts, pad_id=0)
    r = FastRunner(model, 2, 32, RuntimeOptions(backend="fast", compile=True))
    logits = [r.prefill(tokens, positions, vf)]
    nxt, pos = logits[-1].argmax(-1)[:, None], positions[:, -1:] + 1
    graphs = None
    for s in range(12):
        logits.append(r.decode(nxt, pos, 5 + s, vf))
        nxt, pos = logits[-1].argmax(-1)[:, None], pos + 1
        if s == 0:
            graphs = dutils.counters["stats"]["unique_graphs"]
    assert dutils.counters["stats"]["unique_graphs"] == graphs  # steady state: no recompiles
    got = torch.stack(logits, 1)
    assert (got - ref).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_hf_naive_matches_rankserve():
    from rankserve.bench import hf_from_rankserve

    model = lowrank_model("qwen2-bias")
    hf = hf_from_rankserve(model)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, torch.nn.Sequential)
    t = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (hf(t).logits - model(t)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("lowrank", [False, True])
def test_fast_bf16_close_to_eager_bf16(lowrank):
    model = (lowrank_model("qwen2-bias") if lowrank else tiny_model("qwen2-bias")).to(torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ref = run(EagerRunner, model, prompts, 6, RuntimeOptions()).float()
    # bf16 rounding differs between the paths, so greedy picks may flip on near-ties: feed both the same tokens
    got = run(
        FastRunner, model, prompts, 6, RuntimeOptions(backend="fast", compile=False), forced=ref.argmax(-1)
    ).float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_step_compiles_only_without_the_native_layer():
    # auto (None): the native decode_layer runs the step uncompiled (measured faster); PyTorch ops get compiled
    from rankserve.runtime.fast import Kernels

    cpu, no_layer = torch.device("cpu"), Kernels(None)
    assert FastRunner.compiles(RuntimeOptions(backend="fast"), no_layer, cpu)
    assert not FastRunner.compiles(RuntimeOptions(backend="fast", compile=False), no_layer, cpu)
    if RUNNABLE:
        native = Kernels(NativeKernels.load(RUNNABLE[0], strict=True))
        assert native.has_layer
        assert not FastRunner.compiles(RuntimeOptions(backend="fast"), native, cpu)
        assert FastRunner.compiles(RuntimeOptions(backend="fast", compile=True), native, cpu)
        assert FastRunner.compiles(RuntimeOptions(backend="fast"), native, torch.device("cuda"))
        r = FastRunner(tiny_model("llama-gqa"), 1, 16, RuntimeOptions(backend="fast"))
        assert r.step is r.decoder and r.artifacts is None  # nothing compiled, nothing cached


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
@pytest.mark.parametrize("lowrank", [False, True])
def test_layer_stack_equals_the_per_layer_calls(lowrank):
    """One native call for the whole step (LayerStack.step: embedding, layers, final norm, head) computes what one
    decode_layer call per layer with the final norm and head in PyTorch does: the layers exactly (each deferred
    residual add rounds as the layer's own would), the final norm up to its order of summation."""
    model = lowrank_model("qwen2-bias") if lowrank else tiny_model("llama-gqa")
    options = RuntimeOptions(backend="fast", compile=False)
    stacked, looped = FastRunner(model, 2, 16, options), FastRunner(model, 2, 16, options)
    looped.decoder.stacked = False
    vf = torch.tensor([0, 2])  # row 1 starts later: its first two slots are padding
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [12, 13, 14, 15, 16, 17]])
    for s in range(tokens.shape[1]):
        step = (tokens[:, s : s + 1], torch.tensor([[s], [max(s - 2, 0)]]), s, vf)
        a, b = stacked.decode(*step), looped.decode(*step)
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), f"step {s}"
    assert list(stacked.decoder._stacks) == [stacked.kernels.ops.name]  # it went through the stack
    assert not looped.decoder._stacks


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
def test_layer_stack_rejects_a_layout_that_does_not_match_its_tensors():
    kern = NativeKernels.load(RUNNABLE[0], strict=True)
    cls = getattr(torch.classes, kern.ops.name).LayerStack
    w = torch.ones(4)
    with pytest.raises(RuntimeError, match="layout asks for more than the 2 tensors"):
        cls([w, w], [1, 4, 0, 0], [1e-5], 1, 1, 1.0)
    with pytest.raises(RuntimeError, match="left over after 0 layers"):
        cls([w], [], [], 1, 1, 1.0)


@pytest.mark.skipif(not RUNNABLE, reason="no native vector path runs on this CPU")
def test_layer_stack_step_names_a_bad_token_position_or_missing_ends():
    model = tiny_model("llama-gqa")
    runner = FastRunner(model, 1, 16, RuntimeOptions(backend="fast", compile=False))
    stack, cache = runner.decoder._layer_stack(), runner.cache
    one, vf = torch.tensor([0]), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="token 128 outside the vocabulary of 128"):
        stack.step(torch.tensor([128]), one, cache.k, cache.v, one, vf)
    P = runner.decoder.cos.shape[0]
    with pytest.raises(RuntimeError, match=f"position {P} outside the RoPE table of {P}"):
        stack.step(one, torch.tensor([P]), cache.k, cache.v, one, vf)
    with pytest.raises(RuntimeError, match="must be int64 \\[B\\] on the CPU"):
        stack.step(one.int(), one, cache.k, cache.v, one, vf)
    bare = getattr(torch.classes, runner.kernels.ops.name).LayerStack([], [], [], 1, 1, 1.0)
    with pytest.raises(RuntimeError, match="set_ends was not called"):
        bare.step(one, one, cache.k, cache.v, one, vf)
