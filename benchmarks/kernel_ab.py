"""A/B of two builds of the native kernels, interleaved in one process: decode tok/s of one model.

On a shared 2-core machine the decode rate of the same build drifts by 25% between runs a minute apart, so two
builds timed in separate processes cannot be compared. Here both builds (the kernel source compiled with
different macros, e.g. ``RANKSERVE_PF=0`` against the default) are loaded side by side
(``rankserve.runtime.native.load_build``) and one fast runner (uncompiled step) swaps between them every round,
in alternating order: the median of the per-round ratios B / A is the figure to quote. ``--per-layer A`` (or B)
makes that side call the native ``decode_layer`` once per layer instead of once per step (``LayerStack``).
``--model-b DIR`` runs a second model on side B (e.g. two quantizations of one checkpoint) with the same build
unless ``--b`` is given too: two layouts compared in one process, like two builds. ``--a-source DIR`` builds side A
from another version of the kernel sources (a directory holding its ``kernels.cpp`` and headers), so that a change
can be measured against the code before it.

    python benchmarks/kernel_ab.py MODEL --a RANKSERVE_PF=0 --b RANKSERVE_PF=512 [--rounds 10] [--dtype fp32]
    python benchmarks/kernel_ab.py MODEL --per-layer A
    python benchmarks/kernel_ab.py g16 --model-b smooth      # two checkpoints, one build
    python benchmarks/kernel_ab.py MODEL --small-pages A      # weights on 4 KiB pages (A) against the arena (B)
    git archive REV rankserve/runtime/csrc | tar -x -C /tmp/rev   # the kernels at commit REV, then:
    python benchmarks/kernel_ab.py MODEL --a-source /tmp/rev/rankserve/runtime/csrc
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from results_report import cpu_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model alias, GGUF or checkpoint directory")
    p.add_argument("--a", nargs="*", default=[], help="macros of build A (NAME=VALUE ...; none: the default)")
    p.add_argument("--b", nargs="*", default=[], help="macros of build B")
    p.add_argument("--model-b", default=None, help="side B runs this model instead (default: MODEL)")
    p.add_argument(
        "--a-source", default=None, help="build side A from this directory's kernels.cpp and headers instead"
    )
    p.add_argument(
        "--per-layer", choices=["A", "B"], default=None, help="this side: one native call per layer"
    )
    p.add_argument(
        "--small-pages",
        choices=["A", "B"],
        default=None,
        help="this side packs without the 2 MiB-page arena (RuntimeOptions.hugepages=False)",
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=128, help="decode steps per build per round")
    p.add_argument("--start", type=int, default=64, help="first cache slot (the prompt length it stands for)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    same = args.a == args.b and args.a_source is None
    if same and args.per_layer is None and args.model_b is None and args.small_pages is None:
        raise SystemExit(
            "kernel_ab.py: sides A and B are the same; give --a, --b, --a-source, --per-layer, --model-b or "
            "--small-pages"
        )
    from rankserve.errors import InputError
    from rankserve.loaders.source import load_model, parse_dtype
    from rankserve.runtime.fast import FastRunner
    from rankserve.runtime.native import load_build
    from rankserve.runtime.options import RuntimeOptions

    torch.set_num_threads(args.threads)
    try:
        ops = {
            "A": load_build(tuple(args.a), "ab_a", source=args.a_source),
            "B": load_build(tuple(args.b), "ab_b"),
        }
    except InputError as e:  # a bad tag or --a-source: one line, not a traceback
        raise SystemExit(f"kernel_ab.py: {e}") from None
    models = {"A": args.model, "B": args.model_b or args.model}
    runners = {}
    for name, source in models.items():
        model = load_model(source, dtype=parse_dtype(args.dtype)).model
        opts = RuntimeOptions(backend="fast", compile=False, hugepages=name != args.small_pages)
        runners[name] = FastRunner(model, 1, args.start + args.tokens + 1, opts)
        if not runners[name].kernels.has_layer:
            raise SystemExit("kernel_ab.py: the native kernels are unavailable (see the warning above)")
    tok, valid_from = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    rates: dict[str, list[float]] = {"A": [], "B": []}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                runner = runners[name]
                runner.kernels.ops = ops[name]
                runner.decoder.stacked = name != args.per_layer
                runner.decode(tok, torch.tensor([[0]]), 0, valid_from)  # warm the build's code and caches
                t0 = time.perf_counter()
                for s in range(args.start, args.start + args.tokens):
                    runner.decode(tok, torch.tensor([[s]]), s, valid_from)
                rates[name].append(args.tokens / (time.perf_counter() - t0))
    print(f"{' vs '.join(dict.fromkeys(models.values()))}, {args.dtype}, {args.threads} threads, {cpu_model()}; {args.rounds} rounds x {args.tokens} "
          f"tokens from slot {args.start}, order alternating")  # fmt: skip
    for name, macros in (("A", args.a), ("B", args.b)):
        runs = ", ".join(f"{x:.1f}" for x in rates[name])
        what = (" ".join(macros) or "default") + (", one call per layer" if name == args.per_layer else "")
        what += f", source {args.a_source}" if name == "A" and args.a_source else ""
        what += ", 4 KiB pages" if name == args.small_pages else ""
        what += f", {models[name]}" if args.model_b else ""
        print(f"  {name} ({what}): median {statistics.median(rates[name]):.1f} tok/s  [{runs}]")
    ratios = [b / a for a, b in zip(rates["A"], rates["B"], strict=True)]
    wins = sum(x > 1 for x in ratios)
    print(
        f"  B / A per round: median {statistics.median(ratios):.3f}, B faster in {wins} of {len(ratios)} rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
