"""Generation, layered: a token generator -> a streaming response -> a plain string.

The CLI, the server and the benchmark all consume :func:`generate_tokens` or :func:`stream_generate`.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rankserve.models.llama import KVCache
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.sampling import Sampler, SamplingParams
from rankserve.runtime.text import TextStream


class PromptTooLongError(ValueError):
    pass


def padded_batch(prompts: list[list[int]], pad_id: int, device="cpu"):
    """Left-pad prompts: tokens [B, P], positions [B, P], pad lengths [B]."""
    P = max(len(p) for p in prompts)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    positions = (torch.arange(P, device=device)[None] - pads[:, None]).clamp(min=0)  # (B, P)
    return tokens, positions, pads


def attention_mask(valid_from: torch.Tensor, start: int, T: int) -> torch.Tensor | None:
    """Bool mask [B, 1, T, start+T] for queries at slots [start, start+T): causal, and each row's slots before
    ``valid_from[b]`` (left padding, or another request's stale keys) hidden.

    A padded query would see nothing and SDPA would return NaN, so it is allowed its own slot; its output is
    never read. Returns None when every row starts at slot 0 (plain causal attention is then exact and cheaper).
    """
    if not bool(valid_from.any()):
        return None
    q = torch.arange(start, start + T, device=valid_from.device)[None, :, None]  # (1, T, 1)
    kv = torch.arange(start + T, device=valid_from.device)[None, None, :]  # (1, 1, S)
    valid = (kv <= q) & (kv >= valid_from[:, None, None])  # (B, T, S)
    valid |= kv == q
    return valid[:, None]


class EagerRunner:
    """The reference execution path: the model's own forward over a preallocated dense KV cache."""

    def __init__(self, model, batch: int, max_len: int, options: RuntimeOptions | None = None):
        self.model = model
        self.options = options or RuntimeOptions()
        p = next(model.parameters())
        self.cache = KVCache(model.config, batch, max_len, device=p.device, dtype=p.dtype)

    @torch.inference_mode()
    def prefill(self, tokens, positions, pads) -> torch.Tensor:
        """Logits [B, V] of the last prompt token; k/v of all prompt tokens land in slots [0, P)."""
        P, chunk = tokens.shape[1], self.options.prefill_chunk
        for s in range(0, P, chunk):
            e = min(P, s + chunk)
            logits = self.model(
                tokens[:, s:e],
                positions[:, s:e],
                self.cache,
                s,
                attention_mask(pads, s, e - s),
                last_only=True,
            )
        return logits[:, -1]

    @torch.inference_mode()
    def decode(self, tokens, positions, slot: int, pads) -> torch.Tensor:
        """Logits [B, V] for one new token per row [B, 1] written at ``slot``."""
        return self.model(tokens, positions, self.cache, slot, attention_mask(pads, slot, 1))[:, -1]

    def report(self) -> dict:
        """Which kernels ran: the eager path is PyTorch's own."""
        return {"native_kernels": False, "native_isa": None}


def make_runner(model, batch: int, max_len: int, options: RuntimeOptions):
    if options.backend == "fast":
        from rankserve.runtime.fast import FastRunner

        return FastRunner(model, batch, max_len, options)
    return EagerRunner(model, batch, max_len, options)


class RunnerCache:
    """The runner a model last generated with, kept for the next call: the fast path packs and compiles once.

    Owned by the model (:func:`runner_cache`); it holds one runner, so at most one KV cache stays allocated. A
    runner is reused when batch, options and cache length match and the model's weights are the same tensors,
    unchanged. It serves one generation at a time: the generation holds a :class:`Lease`, and while that lease
    is alive (its generator not yet finished or collected) another generation gets a new, uncached runner.
    """

    def __init__(self):
        self._key = None
        self._runner = None
        self._lease = None  # weakref to the live Lease of the cached runner
        self.last = None  # the runner of the latest generation (for reports: which kernels ran)

    def __reduce__(self):  # a copied or pickled model starts with an empty cache
        return (RunnerCache, ())

    def lease(self, model, batch: int, max_len: int, options: RuntimeOptions) -> Lease:
        key = (batch, _cache_len(model, max_len, options), dataclasses.replace(options, max_len=None))
        busy = self._lease is not None and self._lease() is not None
        if busy:
            runner = make_runner(model, batch, max_len, options)
        else:
            if self._key != (key, _weights_key(model)):
                self._runner = None  # free the old KV cache before allocating the new one
                self._runner = make_runner(model, batch, max_len, options)
                self._key = (key, _weights_key(model))  # after the runner: packing moves the weights
            runner = self._runner
        self.last = runner
        lease = Lease(runner)
        if not busy:
            self._lease = weakref.ref(lease)
        return lease


@dataclass
class Lease:
    runner: object


def runner_cache(model) -> RunnerCache:
    """The model's own :class:`RunnerCache` (created on first use)."""
    return vars(model).setdefault("_rankserve_runners", RunnerCache())


def _cache_len(model, max_len: int, options: RuntimeOptions) -> int:
    """KV cache slots the runner for ``max_len`` allocates (the fast path rounds up to share compiled steps)."""
    if options.backend != "fast":
        return max_len
    from rankserve.runtime.fast import bucketed_len

    return bucketed_len(max_len, context_limit(model))


def _weights_key(model) -> tuple:
    """Identity and version of every weight: a replaced or modified weight makes a cached runner stale."""
    return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in model.parameters())


@dataclass
class StepOutput:
    """One decode step of a batch: the sampled token per row and which rows are still running."""

    tokens: list[int]
    active: list[bool]  # rows whose token in ``tokens`` is real (a row's last real token is its stop token)
    prefill_s: float  # wall time of the prompt pass


def context_limit(model) -> int:
    return int(model.config.max_position_embeddings)


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
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    limit = context_limit(model)
    max_new = max(p.max_tokens for p in plist)
    if P >= limit:
        raise PromptTooLongError(
            f"prompt has {P} tokens but the model context is {limit}; shorten the prompt"
        )
    max_len = options.max_len or min(limit, P + max_new)
    max_new = min(max_new, max_len - P)
    if max_new < 1:
        raise PromptTooLongError(f"prompt has {P} tokens and the cache holds {max_len}; no room to generate")
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
