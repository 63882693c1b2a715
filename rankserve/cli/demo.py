"""Run the default model end to end: load, answer a chat prompt, report speed."""

from __future__ import annotations

import sys

from rankserve.cli.main import apply_threads


def add_arguments(p):
    p.add_argument("--model", default=None, help="model to use (default: smollm2-135m)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=48)


def run(args) -> int:
    from rankserve.loaders.source import DEFAULT_MODEL, load_model
    from rankserve.runtime.generate import complete
    from rankserve.runtime.sampling import SamplingParams

    apply_threads(args.threads)
    name = args.model or DEFAULT_MODEL
    print(f"loading {name} ...", file=sys.stderr)
    lm = load_model(name)
    for q in ["What is the capital of France?", "Give me one tip for writing clear code."]:
        ids = lm.tokenizer.chat([{"role": "user", "content": q}])
        c = complete(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=args.max_tokens))
        print(f"> {q}\n{c.text.strip()}\n  [{c.completion_tokens} tokens, {c.decode_tok_s:.1f} tok/s]\n")
    return 0
