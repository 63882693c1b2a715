"""Continuous batching: one scheduler thread runs every request's decode step in one shared batch.

The KV cache holds ``max_batch`` rows of ``max_context`` slots and all rows share one slot counter ``s``: each
decode step writes every row's new token at slot ``s``. A request with an L-token prompt admitted into free row
b is prefilled into that row alone at slots [s-L, s) with positions 0..L-1, so its tokens end exactly where the
batch's next write goes; ``valid_from[b] = s - L`` hides the row's older slots (a previous request's keys) from
its queries. Positions are always ``slot - valid_from[b]``, so a row's math is the same as running it alone:
the masks hide other slots exactly (-inf before the softmax). When there is no room (s < L, or the batch would
run off the end of the cache) every row's KV is shifted by the same offset, which keeps that invariant.

Idle rows decode a pad token with ``valid_from = s``: they see only their own slot and their output is ignored.
The scheduler only drives the runner (the model's own, from its :class:`RunnerCache`): ``prefill`` of one
row into a window of the runner's cache, ``decode`` of the whole batch. Text (detokenizing, stop strings) goes
through :class:`~rankserve.runtime.text.TextStream`, as in ``stream_generate``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rankserve.errors import InputError
from rankserve.runtime.options import RuntimeOptions
from rankserve.runtime.runners import runner_cache
from rankserve.runtime.sampling import Sampler, SamplingParams, token_logprobs
from rankserve.runtime.text import TextStream

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine holds as many requests as its batch and queue allow; try again later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the raw logits, and the ``top`` likeliest (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One piece of a request's output, delivered to its sink from the scheduler thread."""

    text: str
    # "stop" | "length" on the last event; "cancelled" (client gone), "abort" (shutdown deadline), "error" too
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens sampled since the last event


class Request:
    """A submitted generation. ``sink`` is called from the scheduler thread with each :class:`Event`.

    ``logprobs``: None, or how many alternatives to report with each sampled token's log-probability. ``id`` is
    given by the engine it is submitted to.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        logprobs: int | None = None,
    ):
        self.id: int | None = None
        self.prompt_ids = list(prompt_ids)
        self.params = params.validate()
        self.sink = sink
        self.logprobs = logprobs
        self.arrival = time.perf_counter()
        self.cancelled = False  # set by any thread; the scheduler frees the row at its next step
        self.finish_reason: str | None = None


@dataclass
class _Row:
    """A request running in one batch row."""

    req: Request
    sampler: Sampler
    text: TextStream
    seen: list[int]  # prompt + generated ids (for the repetition penalty)
    logits: torch.Tensor  # [V] to sample the next token from
    last_token: int = -1
    t_last: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled, not yet sent with an event

    @property
    def remaining(self) -> int:
        """Tokens still to sample."""
        return self.req.params.max_tokens - self.text.n


class Engine:
    """The continuous-batching scheduler over one model; thread-safe ``submit``, ``cancel`` and ``abort``.

    At most ``max_batch + max_queue`` requests are in the engine at once (running or waiting for a row); a
    request beyond that is refused with :class:`QueueFullError` rather than left to wait without bound.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_context: int = 1024,
        options: RuntimeOptions | None = None,
        metrics=None,
        max_queue: int = 64,
    ):
        if max_batch < 1 or max_context < 2 or max_queue < 0:
            raise InputError("max_batch must be >= 1, max_context >= 2 and max_queue >= 0")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.options = (options or RuntimeOptions()).validate()
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        # The model's own runner (packed and compiled once per model), leased while the engine lives.
        self._lease = runner_cache(model).lease(model, max_batch, max_context, self.options)
        self.runner = self._lease.runner
        self.cache = self.runner.cache
        self.device = next(model.parameters()).device
        self._ids = itertools.count()  # request ids, per engine
        self._zero = torch.zeros(
            1, dtype=torch.long, device=self.device
        )  # valid_from of a row prefilled alone
        if hasattr(self.runner, "warmup"):
            self.runner.warmup()  # compile before the first request, not during it
        self.rows: list[_Row | None] = [None] * max_batch
        self.valid_from = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.slot = 0  # the shared next write slot s
        self.pending: deque[Request] = deque()
        self.live: set[Request] = set()  # submitted and not finished (guarded by cond)
        self.cond = threading.Condition()  # an RLock inside: _emit may take it while it is held
        self.stats = dict(admitted=0, finished=0, cancelled=0, compactions=0, steps=0, errors=0)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort: str | None = None  # set once: end every request with this finish reason, take no more

    # ---- the public, thread-safe side ----

    def check(self, n_prompt: int, max_tokens: int) -> None:
        """Raise InputError unless a request of this shape fits the cache (prompt + every generated token)."""
        if n_prompt < 1:
            raise InputError("the prompt is empty")
        if n_prompt >= self.max_context:
            raise InputError(
                f"the prompt has {n_prompt} tokens but the context is {self.max_context}; shorten the prompt"
            )
        if n_prompt + max_tokens > self.max_context:
            raise InputError(
                f"the context is {self.max_context} tokens: {n_prompt} in the prompt leave room for "
                f"{self.max_context - n_prompt} new tokens, but max_tokens is {max_tokens}"
            )

    @property
    def full(self) -> bool:
        """Whether a request submitted now would be refused for lack of room."""
        return len(self.live) >= self.max_batch + self.max_queue

    def submit(self, req: Request) -> Request:
        """Queue a request; InputError if it cannot fit the cache, QueueFullError / EngineClosedError if the
        engine cannot take it now."""
        self.check(len(req.prompt_ids), req.params.max_tokens)
        with self.cond:
            if self._abort is not None or self._stopping:
                raise EngineClosedError("the server is shutting down")
            if self.full:
                raise QueueFullError(
                    f"the server is at capacity ({self.max_batch} running, {len(self.pending)} waiting); "
                    "retry later"
                )
            req.id = next(self._ids)
            self.live.add(req)
            self.pending.append(req)
            self._gauges()
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away); its row is freed before the next decode step."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def abort(self, reason: str = "abort") -> None:
        """End every running and waiting request with ``reason`` at the next step, and refuse new ones."""
        with self.cond:
            self._abort = reason
            self.cond.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="rankserve-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._lease = None  # the model's runner is free for other generations again
        for b, row in enumerate(self.rows):
            if row is not None:
                self._finish(b, "cancelled")
        while self.pending:
            self._emit(self.pending.popleft(), Event("", "cancelled"))

    # ---- the scheduler thread ----

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stopping and not self.pending and not self.active:
                    self.cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("scheduler step failed")
                self.stats["errors"] += 1
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: admit waiting requests into free rows, sample every row once, decode the batch."""
        if self._abort is not None:
            self._end_all(self._abort)
            return
        fresh: set[int] = set()  # rows admitted (and so already sampled) in this step
        self._admit(fresh)
        for b, row in enumerate(self.rows):
            if row is None or b in fresh:
                continue
            if row.req.cancelled:
                self._finish(b, "cancelled")
                continue
            try:
                self._sample(b, row)
            except Exception as e:  # one request's sampling failure ends that request only
                self._fail_row(b, row.req, e)
        self._gauges()
        if self.active:
            self._decode()

    def _admit(self, fresh: set[int]) -> None:
        """Prefill waiting requests into free rows; each samples its first token at once (staggered TTFT)."""
        while True:
            with self.cond:
                while self.pending and self.pending[0].cancelled:
                    self._emit(self.pending.popleft(), Event("", "cancelled"))
                    self.stats["cancelled"] += 1
                free = [b for b, r in enumerate(self.rows) if r is None]
                if not self.pending or not free:
                    return
                req = self.pending[0]
                # First come, first served: a request that must wait for room holds back the ones after it.
                if not self._make_room(len(req.prompt_ids), req.params.max_tokens, fresh):
                    return
                self.pending.popleft()
            b = free[0]
            try:
                self._prefill(b, req)
                fresh.add(b)
                self._sample(b, self.rows[b])
            except Exception as e:  # fail this request alone; the row's KV is rewritten by the next one
                self._fail_row(b, req, e)

    def _make_room(self, L: int, M: int, fresh: set[int] = frozenset()) -> bool:
        """Make slots [s-L, s+M-1) usable for a new row without cutting any running row; False if impossible.

        A row with r tokens left to sample writes up to slot s+r-2, one more if it already sampled this step.
        """
        active = [b for b, r in enumerate(self.rows) if r is not None]
        if not active:
            self.slot = L  # nothing to keep: the new prompt fills slots [0, L)
            return True
        s, lo = self.slot, int(self.valid_from[active].min())
        need = max([M] + [self.rows[b].remaining + (b in fresh) for b in active])  # writes reach s+need-2
        d_min = max(L - s, -lo)  # the prompt must fit below s; no row may move below slot 0
        d_max = self.max_context - (s + need - 1)
        if d_min > d_max:
            return False
        d = 0 if d_min <= 0 <= d_max else d_min  # move as little right / as far left as allowed
        if d:
            self._shift(lo, d, active)
        return True

    def _shift(self, lo: int, d: int, active: list[int]) -> None:
        """Move every row's slots [lo, s) by d: same keys, same positions, so the same attention."""
        s = self.slot
        for t in (self.cache.k, self.cache.v):  # (L, B, K, S, hd)
            t[:, :, :, lo + d : s + d] = t[:, :, :, lo:s].clone()
        self.valid_from[active] += d
        self.slot = s + d
        self.stats["compactions"] += 1
        if self.metrics:
            self.metrics.compactions.inc()

    def _prefill(self, b: int, req: Request) -> None:
        ids, L, s = req.prompt_ids, len(req.prompt_ids), self.slot
        tokens = torch.tensor([ids], device=self.device)  # (1, L)
        positions = torch.arange(L, device=self.device)[None]  # (1, L)
        # Row b from slot s-L on: the prompt lands at window slots [0, L), exactly as in a solo run.
        window = self.cache.window(b, b + 1, s - L)
        logits = self.runner.prefill(tokens, positions, self._zero, cache=window)[0]  # (V,)
        self.valid_from[b] = s - L
        params = req.params
        self.rows[b] = _Row(
            req=req,
            sampler=Sampler(params, self.device),
            text=TextStream(self.tokenizer, params),
            seen=list(ids),
            logits=logits,
        )
        self.stats["admitted"] += 1
        if self.metrics:
            self.metrics.prompt_tokens.inc(L)

    def _sample(self, b: int, row: _Row) -> None:
        penalty = row.req.params.repetition_penalty != 1.0
        seen = torch.tensor(row.seen, device=self.device) if penalty else _EMPTY
        tok = row.sampler(row.logits, seen)
        if row.req.logprobs is not None and not row.text.ends_on(tok):
            row.logprobs.append(TokenLogprob(tok, *token_logprobs(row.logits, tok, row.req.logprobs)))
        row.seen.append(tok)
        row.last_token = tok
        now = time.perf_counter()
        if self.metrics:
            self.metrics.generated_tokens.inc()
            if row.text.n == 0:
                self.metrics.ttft.observe(now - row.req.arrival)
            else:
                self.metrics.itl.observe(now - row.t_last)
        row.t_last = now
        piece, finish = row.text.push(tok)
        if finish is not None:
            self._finish(b, finish, piece)
        elif piece:
            self._emit(row.req, Event(piece, None, len(row.req.prompt_ids), row.text.n, None, row.logprobs))
            row.logprobs = []

    def _decode(self) -> None:
        s = self.slot
        vf = self.valid_from.clone()
        toks = []
        for b, row in enumerate(self.rows):
            if row is None:
                vf[b] = s  # an idle row attends only to its own slot
                toks.append(self.tokenizer.pad_id)
            else:
                toks.append(row.last_token)
        positions = (s - vf)[:, None]  # (B, 1): a row's position is its slot minus where it starts
        tokens = torch.tensor(toks, device=self.device)[:, None]  # (B, 1)
        logits = self.runner.decode(tokens, positions, s, vf)  # (B, V)
        self.slot = s + 1
        self.stats["steps"] += 1
        for b, row in enumerate(self.rows):
            if row is not None:
                row.logits = logits[b]

    def _finish(self, b: int, reason: str, text: str = "") -> None:
        row = self.rows[b]
        self.rows[b] = None
        row.req.finish_reason = reason
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        if self.metrics:
            self.metrics.finished.labels(reason).inc()
        self._emit(row.req, Event(text, reason, len(row.req.prompt_ids), row.text.n, None, row.logprobs))

    def _end_all(self, reason: str) -> None:
        """End every running and waiting request with ``reason`` (what they said so far stays said)."""
        for b, row in enumerate(self.rows):
            if row is not None:
                self._finish(b, reason)
        with self.cond:
            while self.pending:
                req = self.pending.popleft()
                req.finish_reason = reason
                self._emit(req, Event("", reason))
        self._gauges()

    def _fail_row(self, b: int, req: Request, e: Exception) -> None:
        log.exception("request %s failed", req.id)
        if self.rows[b] is not None and self.rows[b].req is req:
            self.rows[b] = None
        req.finish_reason = "error"
        self.stats["errors"] += 1
        self._emit(
            req, Event("", "error", len(req.prompt_ids), 0, f"generation failed: {type(e).__name__}: {e}")
        )

    def _fail_all(self, message: str) -> None:
        for b, row in enumerate(self.rows):
            if row is not None:
                self.rows[b] = None
                self._emit(row.req, Event("", "error", len(row.req.prompt_ids), row.text.n, message))
        with self.cond:
            while self.pending:
                self._emit(self.pending.popleft(), Event("", "error", error=message))
        self.slot = 0
        self._gauges()

    def _emit(self, req: Request, ev: Event) -> None:
        if ev.finish_reason is not None:
            with self.cond:
                self.live.discard(req)
        try:
            req.sink(ev)
        except Exception:  # a broken sink (closed event loop) must not stop the batch
            log.debug("dropping an event for request %s", req.id, exc_info=True)
            req.cancelled = True

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.pending))
            self.metrics.batch_size.set(self.active)


_EMPTY = torch.empty(0, dtype=torch.long)
