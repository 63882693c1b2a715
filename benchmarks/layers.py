"""Where a fast-path decode step goes: the decoder layers (one native ``decode_layer`` call each, and the one
``LayerStack`` call for all of them that decode uses) and the LM head.

Times the uncompiled step's pieces directly, on a model or a random-weight config, at several KV-cache slots
(attention reads slots [0, slot]): the median over ``--reps`` steps of ``--rounds`` interleaved rounds. With a
random config at a ratio close to 1 (weights almost gone) the per-layer time is the fixed cost of a layer call:
barriers, elementwise stages, attention, dispatch. Each piece's weight bytes over its time is printed as GB/s and
as a fraction of the read probe the bench uses (the native ``stream_read`` over ``--probe-gib`` GiB, timed once
per round; the median of the per-round fractions), which says whether the layers or the head fall short of the
streaming ceiling.

    python benchmarks/layers.py /tmp/smol-svdllm-04 --dtype bf16 --slots 2,128,500
    python benchmarks/layers.py --random-config smollm2-135m --random-ratio 0.95 --dtype bf16

"slot S" rows are the per-layer calls, "stack S" the one call for all layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument(
        "--random-config", default=None, help="random-weight model of a real config (rankserve.bench)"
    )
    p.add_argument("--random-ratio", type=float, default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", default="128", help="comma list of cache slots to decode at")
    p.add_argument("--reps", type=int, default=20, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probe-gib", type=float, default=1.0, help="read probe size (0: no probe)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.model is None) == (args.random_config is None):
        raise SystemExit("layers.py: give a MODEL or --random-config NAME (not both)")
    from rankserve.bench import random_model
    from rankserve.bench.harness import ReadProbe
    from rankserve.loaders.source import load_model, parse_dtype
    from rankserve.runtime.fast import FastRunner, _rms
    from rankserve.runtime.options import RuntimeOptions

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    if args.model:
        model = load_model(args.model, dtype=dtype).model
    else:
        model = random_model(args.random_config, dtype, args.random_ratio, 0)
    slots = [int(s) for s in args.slots.split(",") if s]
    runner = FastRunner(model, 1, max(slots) + 1, RuntimeOptions(backend="fast", compile=False))
    d, kern = runner.decoder, runner.kernels
    if not kern.has_layer:
        raise SystemExit("layers.py: the native kernels are unavailable (see the warning above)")
    tok, vf = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    def layers(slot: int):
        pos, slot_t = torch.full((1,), slot), torch.tensor([slot])
        x = d.embed[tok]
        cos, sin = d.cos[pos], d.sin[pos]
        for i, L in enumerate(d.layers):
            x = kern.ops.decode_layer(x, L.w_in, L.w_post, L.eps, *d._native[i], d.cache.k[i], d.cache.v[i],
                                      cos, sin, slot_t, vf, d.n_heads, d.n_kv, d.scale)  # fmt: skip
        return x

    def stack(slot: int):
        pos, slot_t = torch.full((1,), slot), torch.tensor([slot])
        return d._layer_stack().decode(d.embed[tok], d.cache.k, d.cache.v, d.cos[pos], d.sin[pos], slot_t, vf)

    h = layers(slots[0])

    def head():
        return kern.group(d.head, _rms(h, d.w_norm, d.eps))

    def median_ms(fn) -> float:
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    head_bytes = nbytes(d.head.tensors())
    layer_bytes = nbytes(d.weights()) - head_bytes - nbytes([d.w_norm])
    probe = ReadProbe(args.probe_gib) if args.probe_gib > 0 else None
    with torch.inference_mode():
        res: dict[str, list[float]] = {}
        probes: list[float] = []
        for _ in range(args.rounds):
            if probe is not None:
                probes.append(probe.gbs())
            for s in slots:
                res.setdefault(f"slot {s}", []).append(median_ms(lambda s=s: layers(s)))
                res.setdefault(f"stack {s}", []).append(median_ms(lambda s=s: stack(s)))
            res.setdefault("head", []).append(median_ms(head))
    n = len(d.layers)
    name = args.model or f"random:{args.random_config}@{args.random_ratio}"
    print(
        f"{name}, {args.dtype}, {args.threads} threads, {n} layers; median of {args.rounds} rounds x {args.reps}"
    )
    if probes:
        print(f"  read probe ({args.probe_gib:g} GiB): {', '.join(f'{p:.1f}' for p in probes)} GB/s")
    for key, vals in res.items():
        ms = statistics.median(vals)
        nb = head_bytes if key == "head" else layer_bytes
        what = "LM head" if key == "head" else f"{n} layers at {key}"
        per = "" if key == "head" else f"  ({1000 * ms / n:.1f} us per layer)"
        gbs = nb / (ms / 1e3) / 1e9
        fracs = [nb / (v / 1e3) / 1e9 / p for v, p in zip(vals, probes, strict=True)] if probes else []
        frac = f", {statistics.median(fracs):.0%} of the probe" if fracs else ""
        print(
            f"  {what:24s} {ms:7.2f} ms{per}  {nb / 1e6:.0f} MB, {gbs:.1f} GB/s{frac}"
            f"   rounds: {', '.join(f'{v:.2f}' for v in vals)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
