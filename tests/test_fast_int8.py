"""int8 models on the fast runtime against the eager (dequantizing) reference: packing, decode_layer, LM head."""

import pytest
import torch
from test_fast import lowrank_model, run
from tiny import tiny_model

from rankserve.quantize import Int8Config, quantize_
from rankserve.runtime.eager import EagerRunner
from rankserve.runtime.fast import FastRunner
from rankserve.runtime.hugepages import Arena
from rankserve.runtime.native import ISAS, NativeKernels, compiler, cpu_runs, namespace
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.packing import apply_packed, pack_, packed_bytes

RUNNABLE = [isa for isa in ISAS if cpu_runs(isa)]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def int8_model(kind: str, group_size: int | None, lm_head: bool = False, dtype=torch.float32):
    """A tiny model (dense, low-rank with odd ranks, or with a shared q basis), then quantized to int8. Group 16
    divides the hidden and MLP widths but not the odd ranks, whose lifts fall back to per-channel scales."""
    model = (
        tiny_model("qwen2-bias") if kind == "dense" else lowrank_model("qwen2-bias", shared=kind == "shared")
    )
    quantize_(model.to(dtype), Int8Config(group_size=group_size, lm_head=lm_head))
    return model


@pytest.mark.parametrize("kind", ["dense", "lowrank", "shared"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("in_arena", [False, True])
def test_int8_packing_is_exact(kind, group_size, in_arena):
    model = int8_model(kind, group_size)
    at = model.model.layers[0].self_attn
    x = torch.randn(3, 64)
    ref = torch.cat([at.q_proj(x), at.k_proj(x), at.v_proj(x)], -1)
    projs = [at.q_proj, at.k_proj, at.v_proj]
    arena = Arena(packed_bytes(projs)) if in_arena else None
    group = pack_(projs, arena)
    if in_arena:  # the int8 matrices and their scales, first stage and lifts, all in the arena
        scales = [s for s in group.lift_scales or [] if s is not None]
        lifts = [t for t in group.lifts if t is not None]
        assert all(arena.holds(t) for t in [group.first, group.first_scale, *lifts, *scales])
    assert group.first.dtype == torch.int8 and group.first_scale is not None
    assert (apply_packed(group, x) - ref).abs().max().item() <= 1e-5
    assert torch.equal(torch.cat([at.q_proj(x), at.k_proj(x), at.v_proj(x)], -1), ref)  # modules unchanged
    if kind != "shared":  # in place: the int8 matrices now view the packed buffer
        name = at.q_proj.matrices[0]
        assert (
            getattr(at.q_proj, name).untyped_storage().data_ptr() == group.first.untyped_storage().data_ptr()
        )


def test_mixed_int8_and_float_group_is_refused():
    model = int8_model("dense", None)
    at = tiny_model("qwen2-bias").model.layers[0].self_attn
    with pytest.raises(ValueError, match="cannot pack int8 and float"):
        pack_([model.model.layers[0].self_attn.q_proj, at.k_proj])


@pytest.mark.parametrize("kind", ["dense", "lowrank", "shared"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("native", [None, *RUNNABLE])
def test_int8_fast_decode_equals_eager(kind, group_size, native):
    if native is not None:
        if compiler() is None:
            pytest.skip("no C++ compiler on PATH: only the PyTorch fallback can be tested here")
        NativeKernels.load(native, strict=True)
    model = int8_model(kind, group_size, lm_head=kind == "dense")
    ref = run(EagerRunner, model, PROMPTS, 10, RuntimeOptions())
    options = RuntimeOptions(
        backend="fast", compile=False, native=native is not None, native_isa=native or "auto"
    )
    with torch.profiler.profile() as prof:
        got = run(FastRunner, model, PROMPTS, 10, options)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    if native is not None:  # the int8 weights went through the native layer (and head) kernels
        ran = {e.name for e in prof.events() if e.name.startswith("rankserve")}
        assert f"{namespace(native)}::decode_layer" in ran
        assert (f"{namespace(native)}::int8_gemv" in ran) == (kind == "dense")


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_int8_fast_bf16_close_to_eager(kind):
    model = int8_model(kind, 16, dtype=torch.bfloat16)
    ref = run(EagerRunner, model, PROMPTS, 6, RuntimeOptions()).float()
    options = RuntimeOptions(backend="fast", compile=False)
    got = run(FastRunner, model, PROMPTS, 6, options, forced=ref.argmax(-1)).float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_int8_compiled_step_equals_eager():
    torch._dynamo.reset()
    model = int8_model("lowrank", 16, lm_head=True)
    ref = run(EagerRunner, model, PROMPTS, 6, RuntimeOptions())
    got = run(FastRunner, model, PROMPTS, 6, RuntimeOptions(backend="fast", compile=True))
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
