"""Generation, layered: a token generator -> a streaming response -> a plain string.

Who consumes it: ``rankserve generate`` and the Python API (:func:`stream_generate`), ``rankserve demo`` and
lm-eval's adapter (:func:`complete`), the bench and calibration's self-generated data (:func:`generate_tokens`).
The server does not: its scheduler batches requests that join and leave at any step, so it drives a runner's
``prefill``/``decode`` itself, with the same sampler (``sampling.py``) and text layer (``text.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rankserve.errors import InputError
from rankserve.runtime.eager import padded_batch
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.runners import context_limit, runner_cache
from rankserve.runtime.sampling import Sampler, SamplingParams
from rankserve.runtime.text import TextStream


class PromptTooLongError(InputError):
    """The prompt leaves no room to generate in the model's context or the cache."""


@dataclass
class StepOutput:
    """One decode step of a batch: the sampled token per row and which rows are still running."""

    tokens: list[int]
    active: list[bool]  # rows whose token in ``tokens`` is real (a row's last real token is its stop token)
    prefill_s: float  # wall time of the prompt pass


def generation_len(
    model, prompts: list[list[int]], params: list[SamplingParams], options: RuntimeOptions
) -> tuple[int, int, int]:
    """(padded prompt length P, KV-cache length, decode steps) of a batch: prompts are left-padded to the longest,
    and the cache holds P plus the most tokens any row asks for, within the model's context. A runner made for
    this batch (``make_runner(model, B, max_len, options)``) must have this cache length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    limit = context_limit(model)
    max_new = max(p.max_tokens for p in params)
    if P >= limit:
        raise PromptTooLongError(
            f"prompt has {P} tokens but the model context is {limit}; shorten the prompt"
        )
    max_len = options.max_len or min(limit, P + max_new)
    max_new = min(max_new, max_len - P)
    if max_new < 1:
        raise PromptTooLongError(f"prompt has {P} tokens and the cache holds {max_len}; no room to generate")
    return P, max_len, max_new


def generate_tokens(
    model,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    eos_ids: list[int] = (),
    pad_id: int = 0,
    options: RuntimeOptions | None = None,
    runner=None,
) -> Iterator[StepOutput]:
    """Yield one :class:`StepOutput` per generated position, for a batch of tokenized prompts.

    Rows stop on EOS / stop-token ids or their own ``max_tokens``; stop *strings* are the streaming layer's
    job (they need text). Iteration ends when every row has stopped.
    """
    options = (options or RuntimeOptions()).validate()
    B = len(prompts)
    plist = [p.validate() for p in (params if isinstance(params, list) else [params] * B)]
    P, max_len, max_new = generation_len(model, prompts, plist, options)
    device = next(model.parameters()).device
    lease = None if runner else runner_cache(model).lease(model, B, max_len, options)  # held while we run
    runner = runner or lease.runner
    samplers = [Sampler(p, device) for p in plist]
    stop_ids = [set() if p.ignore_eos else set(eos_ids) | set(p.stop_token_ids) for p in plist]
    seen = [torch.tensor(p, device=device) for p in prompts]

    tokens, positions, pads = padded_batch(prompts, pad_id, device)
    t0 = time.perf_counter()
    logits = runner.prefill(tokens, positions, pads)
    prefill_s = time.perf_counter() - t0
    active = [True] * B
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(max_new):
        new = []
        for b in range(B):
            tok = samplers[b](logits[b], seen[b]) if active[b] else pad_id
            new.append(tok)
            if active[b]:
                seen[b] = torch.cat([seen[b], torch.tensor([tok], device=device)])
        was_active = list(active)
        for b in range(B):
            if active[b] and (new[b] in stop_ids[b] or step + 1 >= plist[b].max_tokens):
                active[b] = False
        yield StepOutput(tokens=new, active=was_active, prefill_s=prefill_s)
        if not any(active) or step + 1 >= max_new:
            return
        logits = runner.decode(torch.tensor(new, device=device)[:, None], next_pos, P + step, pads)
        next_pos = next_pos + 1


@dataclass
class GenerationResponse:
    """One streamed piece of a single-prompt generation."""

    text: str  # the new text since the previous response (may be empty while a character is incomplete)
    token: int | None  # the token behind this piece (None on the final flush)
    prompt_tokens: int
    completion_tokens: int
    prompt_tok_s: float
    decode_tok_s: float  # tokens/s over the decode steps so far (first token excluded: it comes from prefill)
    finish_reason: str | None = None  # "stop" | "length" on the last response


def stream_generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    options: RuntimeOptions | None = None,
    runner=None,
) -> Iterator[GenerationResponse]:
    """Stream text deltas for one prompt, honouring stop strings (the matched stop string is not emitted)."""
    params = params.validate()
    text = TextStream(tokenizer, params)
    t_first = None
    stepper = generate_tokens(
        model, [prompt_ids], params, tokenizer.eos_ids, tokenizer.pad_id, options, runner
    )
    for out in stepper:
        tok = out.tokens[0]
        piece, finish = text.push(tok)
        n = text.n
        now = time.perf_counter()
        t_first = t_first or now
        dt = now - t_first
        rates = dict(
            prompt_tok_s=len(prompt_ids) / max(out.prefill_s, 1e-9),
            decode_tok_s=(n - 1) / dt if n > 1 and dt > 0 else 0.0,
        )
        yield GenerationResponse(piece, tok, len(prompt_ids), n, finish_reason=finish, **rates)
        if finish is not None:
            stepper.close()
            return
    # The generator ended without a verdict only if the cache ran out of room.
    yield GenerationResponse(
        text.flush(),
        None,
        len(prompt_ids),
        text.n,
        finish_reason="length",
        prompt_tok_s=0.0,
        decode_tok_s=0.0,
    )


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    decode_tok_s: float
    prompt_tok_s: float
    finish_reason: str


def complete(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    options: RuntimeOptions | None = None,
    runner=None,
) -> Completion:
    """Run :func:`stream_generate` to the end and collect the result."""
    parts, ids, last = [], [], None
    for r in stream_generate(model, tokenizer, prompt_ids, params, options, runner):
        parts.append(r.text)
        if r.token is not None:
            ids.append(r.token)
        last = r
    return Completion(
        "".join(parts),
        ids,
        last.prompt_tokens,
        last.completion_tokens,
        last.decode_tok_s,
        last.prompt_tok_s,
        last.finish_reason,
    )


def generate(
    model, tokenizer, prompt_ids: list[int], params: SamplingParams, options: RuntimeOptions | None = None
) -> str:
    """The generated text as one string."""
    return complete(model, tokenizer, prompt_ids, params, options).text
