"""The native decode kernels against an fp64 reference, their input checks, and torch.compile tracing.

Every vector path this CPU runs (AVX-512, AVX2, scalar) is built and tested; a path it cannot run is compiled
only. With a C++ compiler present a failed build fails these tests; only a machine without one skips them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rankserve.runtime.native as native_module
from rankserve.errors import InputError
from rankserve.runtime.native import (
    ISAS,
    NativeBuildError,
    NativeKernels,
    compile_variant,
    compiler,
    cpu_runs,
    load_build,
    namespace,
)

DTYPES = [torch.float32, torch.bfloat16]
BATCHES = [1, 2, 3, 5]
RUNNABLE = [isa for isa in ISAS if cpu_runs(isa)]
COMPILE_ONLY = [isa for isa in ISAS if not cpu_runs(isa)]


def require_compiler() -> None:
    if compiler() is None:
        pytest.skip(
            "no C++ compiler on PATH ($CXX, default c++): the native kernels cannot be built or tested"
        )


@pytest.fixture(scope="module", params=RUNNABLE)
def kernels(request) -> NativeKernels:
    require_compiler()
    return NativeKernels.load(request.param, strict=True)  # a failed build raises: the tests fail, not skip


def test_each_variant_compiles_its_own_path(kernels):
    # avx512 may add "+bf16"; "avx2" must not silently be the scalar path or the reverse
    assert kernels.isa.split("+")[0] == kernels.variant


@pytest.mark.parametrize(
    "isa", COMPILE_ONLY or [pytest.param("none", marks=pytest.mark.skip("CPU runs all"))]
)
def test_paths_this_cpu_cannot_run_still_compile(isa):
    require_compiler()
    obj = compile_variant(isa)
    assert obj.stat().st_size > 0
    if isa == "avx512" and shutil.which("objdump"):  # it was built for this path: it uses 512-bit registers
        disasm = subprocess.run(
            ["objdump", "-d", str(obj)], capture_output=True, text=True, check=True
        ).stdout
        assert "%zmm" in disasm


def test_failed_build_raises_with_strict(tmp_path, monkeypatch):
    # `false` as the compiler and an empty build cache: every build fails. Strict loads raise; lenient ones fall
    # back (None). In a subprocess, because a process keeps the outcome of its first load of a variant.
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("RANKSERVE_CACHE", str(tmp_path))
    code = (
        "from rankserve.runtime.native import NativeKernels, NativeBuildError\n"
        "assert NativeKernels.load('scalar') is None\n"
        "try:\n    NativeKernels.load('scalar', strict=True)\nexcept NativeBuildError:\n    print('raised')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "raised", r.stderr
    with pytest.raises(NativeBuildError, match="compiling the scalar variant failed"):
        compile_variant("scalar")


@pytest.mark.parametrize("tag", ["not an identifier", "1x"])
def test_load_build_rejects_bad_tags(tag):
    with pytest.raises(InputError, match="must be an identifier"):
        load_build(("RANKSERVE_PF=0",), tag, "scalar")


def test_load_build_refuses_the_variants_own_namespace():
    # an A/B build under the runtime's namespace would replace the kernels every other caller uses
    tag = namespace("scalar").removeprefix("rankserve_")
    with pytest.raises(InputError, match="other than the variant's own name"):
        load_build((), tag, "scalar")


def test_load_build_compiles_the_source_it_is_given(tmp_path):
    """An A/B against older kernels builds that version's files (benchmarks/kernel_ab.py --a-source): a copy of
    the sources that cannot compile fails with its own message, and a directory without kernels.cpp is named."""
    require_compiler()
    with pytest.raises(InputError, match="kernel source .*kernels.cpp not found"):
        load_build((), "no_source", "scalar", source=tmp_path)
    src = Path(native_module.__file__).parent / "csrc"
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    (copy / "kernels.cpp").write_text("#error built from the copy\n" + (copy / "kernels.cpp").read_text())
    with pytest.raises(RuntimeError, match="built from the copy"):
        load_build((), "from_copy", "scalar", source=copy)


def rand(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def assert_close(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: error <= 1e-5 of the magnitude sum |x||w|. bf16: plus one rounding of the output to bf16."""
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.double() - ref).abs()
    bound = 1e-5 * scale
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * ref.abs()  # half an ulp of bf16's 8-bit significand
    worst = (err - bound).max().item()
    assert worst <= 0, f"max abs err {err.max().item():.3g} exceeds the bound by {worst:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize(
    "out_f,in_f", [(191, 577), (101, 250), (48, 17), (37, 384), (8, 16), (33, 100), (6, 40), (1, 1)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_reference(kernels, dtype, B, out_f, in_f, with_bias):
    gen = torch.Generator().manual_seed(B * 1000 + out_f)
    x, W = rand(B, in_f, dtype=dtype, gen=gen), rand(out_f, in_f, dtype=dtype, gen=gen)
    b = rand(out_f, dtype=dtype, gen=gen) if with_bias else None
    ref = x.double() @ W.double().T + (b.double() if b is not None else 0)
    scale = x.double().abs() @ W.double().abs().T
    assert_close(kernels.gemv(x, W, b), ref, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("rank", [1, 13, 17, 63, 250])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowrank_gemv_matches_reference(kernels, dtype, B, rank, with_bias):
    out_f, in_f = 191, 577
    gen = torch.Generator().manual_seed(B * 1000 + rank)
    x = rand(B, in_f, dtype=dtype, gen=gen)
    V, U = rand(rank, in_f, dtype=dtype, gen=gen), rand(out_f, rank, dtype=dtype, gen=gen)
    b = rand(out_f, dtype=dtype, gen=gen) if with_bias else None
    t = x.double() @ V.double().T
    ref = t @ U.double().T + (b.double() if b is not None else 0)
    scale = (x.double().abs() @ V.double().abs().T) @ U.double().abs().T
    assert_close(kernels.lowrank_gemv(x, V, U, b), ref, scale, dtype)


def test_large_rows_use_all_threads_and_agree(kernels):
    # Big enough to take the parallel path (>= 64 KB of weights) with an odd row count.
    gen = torch.Generator().manual_seed(0)
    x, W = rand(3, 1031, dtype=torch.float32, gen=gen), rand(2051, 1031, dtype=torch.float32, gen=gen)
    V, U = rand(250, 1031, dtype=torch.float32, gen=gen), rand(2051, 250, dtype=torch.float32, gen=gen)
    assert_close(
        kernels.gemv(x, W), x.double() @ W.double().T, x.double().abs() @ W.double().abs().T, torch.float32
    )
    ref = (x.double() @ V.double().T) @ U.double().T
    scale = (x.double().abs() @ V.double().abs().T) @ U.double().abs().T
    assert_close(kernels.lowrank_gemv(x, V, U), ref, scale, torch.float32)


def test_empty_batch_and_zero_width(kernels):
    assert kernels.gemv(torch.empty(0, 8), torch.ones(4, 8)).shape == (0, 4)
    y = kernels.gemv(torch.empty(2, 0), torch.empty(4, 0), torch.arange(4.0))
    assert torch.equal(y, torch.arange(4.0).expand(2, 4))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda k: k.gemv(torch.ones(1, 8), torch.ones(4, 9)), r"W must be \[out, in\]"),
        (lambda k: k.gemv(torch.ones(8), torch.ones(4, 8)), r"x must be 2-D"),
        (lambda k: k.gemv(torch.ones(1, 8, dtype=torch.float64), torch.ones(4, 8)), r"float32 or bfloat16"),
        (
            lambda k: k.gemv(torch.ones(1, 8), torch.ones(4, 8, dtype=torch.bfloat16)),
            r"W has dtype .*share one",
        ),
        (lambda k: k.gemv(torch.ones(1, 8), torch.ones(8, 4).T), r"W must be contiguous"),
        (lambda k: k.gemv(torch.ones(1, 8), torch.ones(4, 8), torch.ones(5)), r"bias has 5 elements"),
        (
            lambda k: k.lowrank_gemv(torch.ones(1, 8), torch.ones(3, 8), torch.ones(4, 2)),
            r"U must be \[out, r\]",
        ),
        (
            lambda k: k.lowrank_gemv(torch.ones(1, 8), torch.ones(3, 7), torch.ones(4, 3)),
            r"V must be \[r, in\]",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kernels, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(kernels)


class _TinyDecoder(nn.Module):
    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops
        gen = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(48, 40, generator=gen), requires_grad=False)
        self.V = nn.Parameter(torch.randn(7, 48, generator=gen), requires_grad=False)
        self.U = nn.Parameter(torch.randn(40, 7, generator=gen), requires_grad=False)
        self.b = nn.Parameter(torch.randn(40, generator=gen), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.ops.gemv(x, self.W))  # [B, 48]
        return self.ops.lowrank_gemv(h, self.V, self.U, self.b) + x  # [B, 40]


def test_torch_compile_fullgraph(kernels):
    torch._dynamo.reset()
    model = _TinyDecoder(kernels.ops)
    x = torch.randn(2, 40)
    eager = model(x)
    # fullgraph=True raises on any graph break; aot_eager runs the fake kernels through AOTAutograd tracing.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_stale_build_lock_is_removed(tmp_path):
    # A build killed mid-way leaves cpp_extension's `lock` file behind; later loads must not wait on it forever.
    from rankserve.runtime.native import _exclusive_build

    (tmp_path / "lock").write_text("")
    with _exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()


@pytest.mark.parametrize("n", [0, 1, 7, 1001, 100_003])
def test_stream_read_sums_every_element(kernels, n):
    # 100_003 floats (> 64 KB) take the multi-thread path with a ragged end; the sum proves every element was read
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs_()
    got = kernels.stream_read(x)
    assert abs(got - x.double().sum().item()) <= 1e-5 * max(1.0, x.double().sum().item())
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.stream_read(x.double())


# (out, in, group): per channel (None) and grouped; odd out; in a multiple of 32 and not; a group that is not a
# whole number of vectors (20); big enough for the parallel path (2051 x 1031)
INT8_SHAPES = [
    (37, 64, None),
    (37, 64, 32),
    (191, 577, None),
    (101, 100, 20),
    (8, 96, 32),
    (48, 256, 64),
    (1, 1, None),
    (2051, 1031, None),
    (24, 48, 16),  # groups of 16: the compile-time group loop (the first factors' default)
    (13, 80, 16),
    (9, 251, None),  # a lift-like short row whose tail reads back into the row
]


def int8_case(B, out_f, in_f, group, dtype, with_bias, seed):
    from rankserve.quant import quantize_int8

    gen = torch.Generator().manual_seed(seed)
    x = rand(B, in_f, dtype=dtype, gen=gen)
    q, scale = quantize_int8(torch.randn(out_f, in_f, generator=gen), group)
    b = rand(out_f, dtype=dtype, gen=gen) if with_bias else None
    return x, q, scale, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("out_f,in_f,group", INT8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_gemv_dequantizing_matches_reference(kernels, dtype, B, out_f, in_f, group, with_bias):
    from rankserve.quant import dequantize_int8

    x, q, scale, b = int8_case(B, out_f, in_f, group, dtype, with_bias, seed=B * 1000 + out_f)
    W = dequantize_int8(q, scale, torch.float64)
    ref = torch.nn.functional.linear(x.double(), W, None if b is None else b.double())
    assert_close(kernels.int8_gemv(x, q, scale, b), ref, x.double().abs() @ W.abs().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("out_f,in_f,group", INT8_SHAPES)
def test_int8_gemv_int8_activations(kernels, dtype, B, out_f, in_f, group):
    """Against its own definition (x quantized per row, exact integer dot products per group), and within the
    quantization error of x from the dequantizing reference."""
    from rankserve.quant import dequantize_int8, quantize_int8

    x, q, scale, b = int8_case(B, out_f, in_f, group, dtype, True, seed=B * 7 + out_f)
    got = kernels.int8_gemv(x, q, scale, b, int8_act=True)
    xq, xs = quantize_int8(x.float())  # per row: xs [B, 1]
    G = in_f // scale.shape[1]
    # exact integer dot products of each group: (B, out, groups)
    idot = torch.einsum("bgk,ngk->bng", xq.double().view(B, -1, G), q.double().view(out_f, -1, G))
    ref = xs.double() * (idot * scale.double()).sum(-1) + b.double()
    mag = xs.double() * (
        torch.einsum("bgk,ngk->bng", xq.double().abs().view(B, -1, G), q.double().abs().view(out_f, -1, G))
        * scale.double()
    ).sum(-1)
    assert_close(got, ref, mag, dtype)
    # |x - xq * xs| <= xs / 2 per element, so the result moves by at most xs / 2 * sum |W| per output
    W = dequantize_int8(q, scale, torch.float64)
    exact = x.double() @ W.T + b.double()
    bound = xs.double() / 2 * W.abs().sum(-1) + 1e-5 * (x.double().abs() @ W.abs().T)
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * exact.abs()
    assert ((got.double() - exact).abs() <= bound).all()


def test_int8_gemv_bad_inputs(kernels):
    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1)
    with pytest.raises(RuntimeError, match="int8 weights with float32 scales"):
        kernels.int8_gemv(torch.ones(1, 8), q.float(), s)
    with pytest.raises(RuntimeError, match="groups dividing in"):
        kernels.int8_gemv(torch.ones(1, 8), q, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match=r"W must be \[out, in\]"):
        kernels.int8_gemv(torch.ones(1, 9), q, s)


def test_builds_take_the_prefetch_distances_of_their_cpu_maker(monkeypatch):
    """An Intel build prefetches weight rows 2 KB ahead (fp32, int8, bf16); other makers keep the source's
    defaults."""
    monkeypatch.setattr(native_module, "cpu_vendor", lambda: "GenuineIntel")
    flags = native_module._flags("scalar")
    assert {"-DRANKSERVE_PF=2048", "-DRANKSERVE_PF_F32=2048", "-DRANKSERVE_PF_BF16=2048"} <= set(flags)
    monkeypatch.setattr(native_module, "cpu_vendor", lambda: "AuthenticAMD")
    assert not any(f.startswith("-DRANKSERVE_PF") for f in native_module._flags("scalar"))
