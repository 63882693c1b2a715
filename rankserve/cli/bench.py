"""Benchmark decode/prefill speed across backends, side by side in one run."""

from __future__ import annotations

import json

from rankserve.cli.main import CLIError


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model (omit with --random-config)")
    p.add_argument(
        "--baselines",
        default="fast,eager,hf",
        help="comma list of backends: fast, fast-dense, eager, hf, hf-naive, llama.cpp (F32 for fp32, F16 for "
        "bf16), llama.cpp-f32, llama.cpp-f16, llama.cpp-q8_0, llama.cpp-q4_k_m (default fast,eager,hf)",
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed runs per backend (median reported)")
    p.add_argument(
        "--random-config", default=None, help="random-weight model of a real config: llama-1b, smollm2-135m"
    )
    p.add_argument(
        "--random-ratio",
        type=float,
        default=None,
        help="with --random-config: make every decoder projection low-rank at this ratio (fraction removed)",
    )
    p.add_argument("--no-probe", action="store_true", help="skip the memory bandwidth probe")
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-RSS measurement (one fresh worker per rankserve or llama.cpp backend)",
    )
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from rankserve.bench import BenchSpec, run_bench

    if (args.model is None) == (args.random_config is None):
        raise CLIError("give a MODEL or --random-config NAME (not both)")
    for name in ("prompt_len", "new_tokens", "threads", "runs"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        raise CLIError("--new-tokens must be >= 2 (decode speed needs at least one decode step)")
    if args.random_ratio is not None and not 0 <= args.random_ratio < 1:
        raise CLIError(f"--random-ratio must be in [0, 1), got {args.random_ratio}")
    if args.model is not None:
        from rankserve.loaders.source import resolve

        resolve(args.model)  # fail fast with the loader's one-line error
    spec = BenchSpec(
        model=args.model or "",
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        dtype=args.dtype,
        threads=args.threads,
        runs=args.runs,
        random_config=args.random_config,
        random_ratio=args.random_ratio,
    )
    backends = [b.strip() for b in args.baselines.split(",") if b.strip()]
    out = run_bench(spec, backends, probe=not args.no_probe, memory=not args.no_memory)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"model {args.model or 'random:' + args.random_config}, dtype {args.dtype}, threads {args.threads}, "
        f"prompt {args.prompt_len}, new tokens {args.new_tokens}, median of {args.runs} runs; "
        f"read bandwidth {out['bandwidth_gbs']} GB/s (median of a probe per round, in the timing worker; "
        "% bw is each run's over its round's probe)"
    )
    hdr = (
        f"{'backend':11s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'TTFT ms':>8s} {'MB/token':>9s} "
        f"{'GB/s':>6s} {'% bw':>5s} {'+RSS MB':>7s} {'compile s':>9s} {'recomp':>6s} {'kernels':>8s}  note"
    )
    print(hdr)
    for r in out["runs"]:
        if not r["ok"]:
            print(f"{r['backend']:11s} {'-':>12s}  {r['note']}")
            continue
        frac = f"{100 * r['bandwidth_fraction']:.0f}" if r["bandwidth_fraction"] else "-"
        print(
            f"{r['backend']:11s} {r['decode_tok_s']:12.1f} {r['prefill_tok_s']:13.1f} {1000 * r['ttft_s']:8.1f} "
            f"{r['weight_bytes_per_token'] / 1e6:9.1f} {r['achieved_gbs']:6.1f} {frac:>5s} {r['added_rss_mb']:7.0f} "
            f"{r['compile_s']:9.1f} {r['recompiles']:6d} {r['native_isa'] or 'torch':>8s}  {r['note']}"
        )
    measured = [r for r in out["runs"] if r.get("rss_over_weights") is not None]
    if measured:
        print(
            "\nmemory, one fresh worker per backend (MiB; peak = VmHWM through load, set-up and one generation):"
        )
        print(
            f"{'backend':11s} {'baseline':>9s} {'peak':>9s} {'weights':>9s} {'KV cache':>9s}  (peak-base-KV)/weights"
        )
        for r in measured:
            print(
                f"{r['backend']:11s} {r['rss_base_mb']:9.0f} {r['rss_peak_mb']:9.0f} {r['weight_mb']:9.0f} "
                f"{r['kv_mb']:9.1f}  {r['rss_over_weights']:.3f}"
            )
    return 0
