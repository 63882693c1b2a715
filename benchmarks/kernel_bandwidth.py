"""Microbenchmark: weight bytes streamed per second by one-token linears, PyTorch vs the native kernels.

Every measurement cycles through many distinct weight matrices (``--working-set-mb``, default 1024 MB, far above
the L3) so that each call reads its weights from memory, as in decode. A cell is the median (or, with
``--stat best``, the fastest) of ``--runs`` passes; on a machine shared with other work the best is the
better estimate of the uncontended speed.

Columns (GB/s of weights read; higher is better):
- ``F.linear``: ``torch.nn.functional.linear(x, W)``;
- ``gemv``: ``torch.ops.rankserve_<isa>.gemv(x, W)``;
- ``lr torch``: ``F.linear(F.linear(x, V), U)``, the factorized layer in eager PyTorch;
- ``lr native``: ``torch.ops.rankserve_<isa>.lowrank_gemv(x, V, U)``;
- ``i8 act``: int8 rows only, ``int8_gemv(..., int8_act=True)`` (activations quantized per row, integer dots);
- ``gemv/read``: the ``gemv`` column over the read bandwidth of ``stream_read`` (the bench's probe).
For the low-rank columns V [r, in] and U [out, r] keep 60% of the dense parameters (r rounded down to 16).
Rows of dtype ``int8`` have int8 weights with fp32 per-channel scales (``rankserve.quant``; the bytes counted are
q and scales) and fp32 activations: ``F.linear`` is then PyTorch's ``torch._weight_int8pack_mm``, ``gemv``
``int8_gemv`` dequantizing in registers, and the low-rank columns chain two of those.

    python benchmarks/kernel_bandwidth.py --threads 2 [--batch 1] [--dtypes fp32 bf16 int8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rankserve.runtime.native import NativeKernels

# (name, out, in): SmolLM2-135M projections and LM head, then Llama-3.2-1B-like shapes.
SHAPES = [
    ("smol attn q/o", 576, 576),
    ("smol attn k/v", 192, 576),
    ("smol mlp up/gate", 1536, 576),
    ("smol mlp down", 576, 1536),
    ("smol lm head", 49152, 576),
    ("1b attn q/o", 2048, 2048),
    ("1b mlp up/gate", 8192, 2048),
    ("1b mlp down", 2048, 8192),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def lowrank_rank(out: int, inp: int, keep: float = 0.6) -> int:
    """Rank whose U and V hold ``keep`` of the dense parameters, rounded down to a multiple of 16."""
    return max(16, int(keep * out * inp / (out + inp)) // 16 * 16)


def make_set(shapes: list[tuple[int, ...]], dtype: torch.dtype, working_set: int) -> list[list[torch.Tensor]]:
    """Enough independent copies of a group of tensors to fill ``working_set`` bytes (at least 4). int8: each
    matrix becomes q and its fp32 per-channel scales [out, 1]."""
    if dtype == torch.int8:
        shapes = [t for s in shapes for t in (s, (s[0], 1))]
        dtypes = [torch.int8, torch.float32] * (len(shapes) // 2)
    else:
        dtypes = [dtype] * len(shapes)
    group_bytes = sum(
        torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
        for s, d in zip(shapes, dtypes, strict=True)
    )
    copies = max(4, -(-working_set // group_bytes))
    # The values do not change the speed (no denormals), so a constant fill is enough and fast.
    return [
        [
            torch.empty(s, dtype=d).fill_(1 if d == torch.int8 else 0.01)
            for s, d in zip(shapes, dtypes, strict=True)
        ]
        for _ in range(copies)
    ]


def stream_rates(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, sets: list[list[torch.Tensor]], runs: int
) -> dict[str, float]:
    """GB/s of weight bytes over ``runs`` passes, each calling ``fn(x, *group)`` once per group: median and best."""
    nbytes = sum(t.numel() * t.element_size() for group in sets for t in group)
    for group in sets:  # warm-up: page in, build oneDNN primitives, spin up the thread pools
        fn(x, *group)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for group in sets:
            fn(x, *group)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {"median": statistics.median(rates), "best": max(rates)}


def read_bandwidth(kernels: NativeKernels, working_set: int, runs: int) -> dict[str, float]:
    """GB/s of the native ``stream_read`` over one fp32 tensor of ``working_set`` bytes: the streaming ceiling on
    this machine now, read as the GEMV reads (the bench's read probe, ``rankserve.bench.harness``)."""
    big = torch.empty(working_set // 4).fill_(0.01)
    return stream_rates(lambda x, t: kernels.stream_read(t), big, [[big]], runs)


def columns(kernels: NativeKernels, dname: str) -> dict[str, Callable[..., torch.Tensor]]:
    """The timed calls of one dtype's row: name -> fn(x, *group) for the dense or low-rank set of ``make_set``."""
    if dname != "int8":
        return {
            "F.linear": lambda x, W: F.linear(x, W),
            "gemv": lambda x, W: kernels.gemv(x, W),
            "lr torch": lambda x, V, U: F.linear(F.linear(x, V), U),
            "lr native": lambda x, V, U: kernels.lowrank_gemv(x, V, U),
        }

    def torch_i8(x, q, s):  # PyTorch's int8-weight matmul takes the per-channel scales as a vector
        return torch._weight_int8pack_mm(x, q, s.view(-1))

    return {
        "F.linear": torch_i8,
        "gemv": lambda x, q, s: kernels.int8_gemv(x, q, s),
        "lr torch": lambda x, Vq, Vs, Uq, Us: torch_i8(torch_i8(x, Vq, Vs), Uq, Us),
        "lr native": lambda x, Vq, Vs, Uq, Us: kernels.int8_gemv(kernels.int8_gemv(x, Vq, Vs), Uq, Us),
        "i8 act": lambda x, q, s: kernels.int8_gemv(x, q, s, int8_act=True),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="activation rows B (default 1)")
    parser.add_argument("--runs", type=int, default=7, help="timed passes per cell; the median is reported")
    parser.add_argument("--working-set-mb", type=int, default=1024, help="weight bytes cycled per pass (MB)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=None, help="substrings selecting shape names")
    parser.add_argument(
        "--stat",
        choices=["median", "best"],
        default="median",
        help="statistic shown in the table (JSON has both)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)  # also the OpenMP team size the native kernels use
    kernels = NativeKernels.load()
    if kernels is None:
        raise SystemExit("native kernels unavailable (see the warning above)")
    working_set = args.working_set_mb * 2**20
    shapes = [s for s in SHAPES if args.shapes is None or any(p in s[0] for p in args.shapes)]

    rows = []
    with torch.inference_mode():
        read = read_bandwidth(kernels, working_set, args.runs)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            cols = columns(kernels, dname)
            for name, out, inp in shapes:
                x = torch.randn(args.batch, inp).to(torch.float32 if dname == "int8" else dtype)
                r = lowrank_rank(out, inp)
                row = {"dtype": dname, "shape": name, "out": out, "in": inp, "rank": r, "batch": args.batch}
                dense = make_set([(out, inp)], dtype, working_set)
                for c in ("F.linear", "gemv", "i8 act"):
                    if c in cols:
                        row[c] = stream_rates(cols[c], x, dense, args.runs)
                del dense
                factors = make_set([(r, inp), (out, r)], dtype, working_set)
                row["lr torch"] = stream_rates(cols["lr torch"], x, factors, args.runs)
                row["lr native"] = stream_rates(cols["lr native"], x, factors, args.runs)
                del factors
                row["gemv/read"] = {k: row["gemv"][k] / read[k] for k in ("median", "best")}
                rows.append(row)

    meta = {
        "threads": args.threads,
        "batch": args.batch,
        "working_set_mb": args.working_set_mb,
        "runs": args.runs,
        "isa": kernels.isa,
        "read_gbps": read,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    print(
        f"GB/s of weights streamed ({args.stat} of {args.runs}), B={args.batch}, {args.threads} threads, "
        f"working set {args.working_set_mb} MB, native isa {kernels.isa}; "
        f"stream_read over {args.working_set_mb} MB of fp32 reads at {read[args.stat]:.1f} GB/s"
    )
    names = ["F.linear", "gemv", "lr torch", "lr native", "i8 act", "gemv/read"]
    header = f"{'dtype':5} {'shape':17} {'out x in':>11} {'rank':>5} " + " ".join(f"{c:>9}" for c in names)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = " ".join(f"{row[c][args.stat]:9.2f}" if c in row else f"{'-':>9}" for c in names)
        print(f"{row['dtype']:5} {row['shape']:17} {row['out']:>5}x{row['in']:<5} {row['rank']:5} {cells}")


if __name__ == "__main__":
    main()
