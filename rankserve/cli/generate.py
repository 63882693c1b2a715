"""Generate text from a prompt (streams to stdout; --json prints one object)."""

from __future__ import annotations

import json
import sys

from rankserve.cli.main import CLIError, apply_threads, common_model_args


def add_arguments(p):
    common_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--backend", default="eager", choices=["eager", "fast"], help="execution path")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.chat(msgs)
    return tokenizer.encode(prompt)


def check_utf8(flag: str, text: str | None) -> None:
    """CLIError if an argument is not valid UTF-8 (Python keeps its undecodable bytes as lone surrogates)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"
        raise CLIError(
            f"{flag} is not valid UTF-8 ({what} at character {e.start}); pass UTF-8 text"
        ) from None


def run(args) -> int:
    from rankserve.loaders.source import load_model
    from rankserve.runtime.generate import stream_generate
    from rankserve.runtime.options import RuntimeOptions
    from rankserve.runtime.runners import runner_cache
    from rankserve.runtime.sampling import SamplingParams

    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    for flag, text in [
        ("--prompt", args.prompt),
        ("--system", args.system),
        *(("--stop", s) for s in args.stop),
    ]:
        check_utf8(flag, text)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    ).validate()
    apply_threads(args.threads)
    options = RuntimeOptions(backend=args.backend).validate()
    lm = load_model(args.model, dtype=args.dtype, check_finite=args.check_finite)
    ids = prompt_ids(lm.tokenizer, args.prompt, args.chat, args.system)
    parts, token_ids, last = [], [], None
    for r in stream_generate(lm.model, lm.tokenizer, ids, params, options):
        if r.token is not None:
            token_ids.append(r.token)
        parts.append(r.text)
        if not args.json and r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(parts),
                    "token_ids": token_ids,
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                    "decode_tok_s": round(last.decode_tok_s, 3),
                    "prefill_tok_s": round(last.prompt_tok_s, 3),
                    "finish_reason": last.finish_reason,
                    "model": args.model,
                    "dtype": args.dtype,
                    "backend": args.backend,
                    # which kernels ran: {"native_kernels": bool, "native_isa": "avx2" | ... | None}
                    **runner_cache(lm.model).last.report(),
                }
            )
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{last.completion_tokens} tokens, {last.decode_tok_s:.1f} tok/s decode, "
            f"{last.prompt_tok_s:.1f} tok/s prefill, finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0
