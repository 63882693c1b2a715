"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching :class:`Engine`.

``create_app(load, model_id)`` returns an app whose model is loaded in a background thread when the app starts
(``/health`` answers 503 until the engine runs), or at once with ``load_now`` (the CLI: a bad model then fails
the process, before it listens). Every bad request becomes a 4xx with an OpenAI-style error body; a full
queue or a server shutting down is a 503 with ``Retry-After``. :func:`serve` runs an app on a bound socket and
drains it on SIGINT/SIGTERM within a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankserve.errors import InputError
from rankserve.runtime.options import RuntimeOptions
from rankserve.server import protocol as P
from rankserve.server.metrics import ServerMetrics
from rankserve.server.scheduler import Engine, EngineClosedError, Event, QueueFullError
from rankserve.server.scheduler import Request as GenRequest

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the free context
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 128k-token prompt as text or as token ids still fits
DEFAULT_MAX_QUEUE = 64  # requests waiting for a batch row before the server answers 503
RETRY_AFTER_S = "1"  # what a refused client is told to wait; a row frees every few hundred tokens at most
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerState:
    """What the app serves: loading status, the engine once loaded, the names the model answers to."""

    def __init__(self, load, model_id, aliases, max_batch, max_context, options, metrics, max_queue):
        self.load_fn, self.model_id = load, model_id
        self.names = {model_id, *aliases}
        self.max_batch, self.max_context, self.options = max_batch, max_context, options
        self.max_queue = max_queue
        self.metrics = metrics
        self.status, self.error = "loading", None
        self.engine: Engine | None = None
        self.tokenizer = None
        self.vocab_size = 0

    def load_or_raise(self) -> None:
        """Load the model and start the engine; exceptions propagate."""
        model, tokenizer = self.load_fn()
        ctx = int(model.config.max_position_embeddings)
        ctx = min(ctx, self.max_context) if self.max_context else min(ctx, 1024)
        self.tokenizer, self.vocab_size = tokenizer, int(model.config.vocab_size)
        engine = Engine(model, tokenizer, self.max_batch, ctx, self.options, self.metrics, self.max_queue)
        self.engine = engine.start()
        self.status = "ready"
        log.info(
            "serving %s: batch %d, queue %d, context %d", self.model_id, self.max_batch, self.max_queue, ctx
        )

    def load(self) -> None:
        """Load in the background: the server stays up and says why on /health if this fails."""
        try:
            self.load_or_raise()
        except Exception as e:
            log.exception("loading the model failed")
            self.status, self.error = "error", f"{type(e).__name__}: {e}"

    def abort(self) -> None:
        """The shutdown deadline: end every request still in the engine with finish reason "abort"."""
        if self.engine is not None:
            self.engine.abort("abort")

    def ready_engine(self) -> Engine:
        if self.status != "ready":
            msg = (
                "the model is still loading"
                if self.status == "loading"
                else f"the model failed: {self.error}"
            )
            raise P.APIError(503, msg, None, "model_not_ready")
        return self.engine

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise P.APIError(
                404, f"the model '{name}' does not exist; this server serves '{self.model_id}'", "model",
                "model_not_found",
            )  # fmt: skip


def create_app(
    load: Callable[[], tuple[object, object]],
    model_id: str,
    aliases: tuple[str, ...] | list[str] = (),
    max_batch: int = 8,
    max_context: int | None = None,
    options: RuntimeOptions | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    load_now: bool = False,
) -> FastAPI:
    """The API app. ``load()`` returns (model, tokenizer); it runs in a background thread at startup, or here
    with ``load_now`` (its exceptions then propagate, and nothing serves a model that failed)."""
    metrics = ServerMetrics()
    state = ServerState(load, model_id, aliases, max_batch, max_context, options, metrics, max_queue)
    if load_now:
        state.load_or_raise()

    async def lifespan(app):
        if state.status == "loading":
            threading.Thread(target=state.load, name="rankserve-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="rankserve", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(P.APIError)
    async def _api_error(request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = P.APIError(400, f"invalid request: {e.errors()[0].get('msg')}", None, "invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):  # bad input found below the protocol layer
        err = P.APIError(400, str(e), None, "invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        err = P.APIError(e.status_code, str(e.detail), None, None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")
        err = P.APIError(500, f"internal error: {type(e).__name__}", None, "internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        if state.status != "ready":
            return JSONResponse({"status": state.status, "message": state.error}, status_code=503)
        eng = state.engine
        return {"status": "ok", "model": model_id, "running": eng.active, "waiting": len(eng.pending)}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "rankserve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, P.CompletionRequest, max_body_bytes)
        engine = _ready(state)
        state.check_model(body.model)
        body.check_supported()
        # Tokenizing in a worker thread: a long prompt must not stall /health and the other streams.
        ids = await run_in_threadpool(_prompt_ids, state, body.prompt)
        params = _params(engine, body, ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        return await _respond(request, state, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, P.ChatCompletionRequest, max_body_bytes)
        engine = _ready(state)
        state.check_model(body.model)
        body.check_supported()
        ids = await run_in_threadpool(_chat_ids, state, body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(engine, body, ids, max_tokens, None, "messages")
        return await _respond(request, state, body, ids, params, chat=True)

    return app


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (pure ASGI: streaming stays untouched)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


async def _parse(request: Request, schema, max_bytes: int):
    """The body validated against ``schema``; 413 past ``max_bytes`` (checked before the body is read when it
    declares its length, and while it streams in otherwise)."""
    too_big = P.APIError(
        413,
        f"the request body is larger than {max_bytes} bytes (--max-body-bytes); send a shorter prompt",
        None,
        "request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    try:
        return schema.model_validate_json(b"".join(chunks) or b"null")
    except ValidationError as e:
        raise P.from_validation_error(e) from None


def _busy(message: str) -> P.APIError:
    return P.APIError(503, message, None, "server_overloaded", headers={"Retry-After": RETRY_AFTER_S})


def _ready(state: ServerState) -> Engine:
    """The engine, if it runs and has room (checked again at submit: this only spares a doomed tokenization)."""
    engine = state.ready_engine()
    if engine.full:
        raise _busy(f"the server is at capacity ({engine.max_batch} running, {len(engine.pending)} waiting)")
    return engine


def _prompt_ids(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return state.tokenizer.encode(prompt)
    if not prompt:
        raise P.APIError(400, "the prompt is empty", "prompt", "invalid_value")
    if isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise P.APIError(400, "only one prompt per request is supported", "prompt", "invalid_value")
        return state.tokenizer.encode(prompt[0])
    bad = [t for t in prompt if not 0 <= t < state.vocab_size]
    if bad:
        raise P.APIError(400, f"token id {bad[0]} is outside the vocabulary", "prompt", "invalid_value")
    return list(prompt)


def _chat_ids(state: ServerState, messages) -> list[int]:
    try:
        return state.tokenizer.chat([m.as_template_dict() for m in messages])
    except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
        raise P.APIError(400, f"cannot apply the chat template: {e}", "messages", "invalid_value") from e


def _params(engine: Engine, body, ids: list[int], max_tokens, default: int | None, prompt_param: str):
    """Sampling parameters, with max_tokens checked against the context; 400 naming the parameter otherwise."""
    L, ctx = len(ids), engine.max_context
    if L < 1:
        raise P.APIError(400, "the prompt is empty", prompt_param, "invalid_value")
    if L >= ctx:
        raise P.APIError(
            400,
            f"the prompt has {L} tokens but the context is {ctx} tokens (--max-context); shorten it",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(default, ctx - L) if default else ctx - L
    if max_tokens < 1:
        raise P.APIError(
            400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens", "invalid_value"
        )
    if L + max_tokens > ctx:
        raise P.APIError(
            400,
            f"the context is {ctx} tokens; the prompt has {L}, so max_tokens can be at most {ctx - L}, "
            f"got {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    try:
        return body.sampling_params(max_tokens)
    except InputError as e:
        name = str(e).split()[0]
        raise P.APIError(
            400, str(e), name if name in type(body).model_fields else None, "invalid_value"
        ) from e


async def _respond(request: Request, state: ServerState, body, ids: list[int], params, chat: bool):
    engine, model_id = state.engine, state.model_id
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    req = GenRequest(
        ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), body.top_logprobs_n
    )
    try:
        engine.submit(req)
    except (QueueFullError, EngineClosedError) as e:
        raise _busy(str(e)) from None

    def cancel() -> None:
        if req.finish_reason is None:
            engine.cancel(req)

    fmt = _Formatter(state.tokenizer, chat, req.logprobs)
    if body.stream:
        return _EventStream(_sse(queue, body, model_id, chat, len(ids), fmt), on_close=cancel)
    # A plain handler is not cancelled when its client leaves, so watch for that alongside the generation.
    collect = asyncio.ensure_future(_collect(queue, model_id, chat, len(ids), cancel, fmt))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left (or this handler was cancelled): free the row
            cancel()
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics do
    return collect.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so receive() waits for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Formatter:
    """Token ids to OpenAI's logprobs shapes, for one response (None when the request did not ask)."""

    def __init__(self, tokenizer, chat: bool, logprobs: int | None):
        self.tokenizer, self.chat, self.on = tokenizer, chat, logprobs is not None
        self.offset = 0  # characters of the completion before the next chunk's first token

    def text_of(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def __call__(self, entries) -> dict | None:
        if not self.on:
            return None
        if self.chat:
            return P.chat_logprobs(entries, self.text_of)
        out = P.completion_logprobs(entries, self.text_of, self.offset)
        self.offset = out["text_offset"][-1] + len(out["tokens"][-1]) if entries else self.offset
        return out


async def _events(queue: asyncio.Queue) -> AsyncIterator[Event]:
    while True:
        ev = await queue.get()
        yield ev
        if ev.finish_reason is not None:
            return


async def _collect(queue, model_id: str, chat: bool, n_prompt: int, cancel, fmt: _Formatter) -> JSONResponse:
    parts, logprobs, last = [], [], None
    try:
        async for ev in _events(queue):
            parts.append(ev.text)
            logprobs += ev.logprobs
            last = ev
    finally:
        cancel()  # a no-op unless this handler was cancelled before the request finished
    if last.finish_reason == "error":
        raise P.APIError(500, last.error or "generation failed", None, "generation_failed")
    if last.finish_reason in ("cancelled", "abort"):  # only a server stopping ends a request it still answers
        raise _busy("the server shut down before the request finished")
    u = P.usage(n_prompt, last.completion_tokens)
    make = P.chat_response if chat else P.completion_response
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    return JSONResponse(make(rid, model_id, "".join(parts), last.finish_reason, u, fmt(logprobs)))


async def _sse(queue, body, model_id: str, chat: bool, n_prompt: int, fmt: _Formatter) -> AsyncIterator[str]:
    """OpenAI's chunk stream: one chunk per text delta, the finish chunk, the usage chunk if asked, [DONE].

    Past the shutdown deadline the finish chunk says "abort" (vLLM's name for a request it ended)."""
    rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
    with_usage = body.include_usage

    def chunk(text: str | None, finish: str | None, logprobs=(), first: bool = False) -> str:
        lp = fmt(list(logprobs)) if logprobs else None
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            c = P.chat_chunk(rid, model_id, created, delta, finish, lp)
        else:
            c = P.completion_chunk(rid, model_id, created, text or "", finish, lp)
        if with_usage:
            c["usage"] = None
        return f"data: {json.dumps(c)}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    async for ev in _events(queue):
        if ev.finish_reason == "error":
            err = P.APIError(500, ev.error or "generation failed", None, "generation_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if ev.finish_reason in ("stop", "length", "abort"):
            if chat and (ev.text or ev.logprobs):
                yield chunk(ev.text, None, ev.logprobs)
            yield chunk(None if chat else ev.text, ev.finish_reason, () if chat else ev.logprobs)
            if with_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                u = P.usage(n_prompt, ev.completion_tokens)
                yield f"data: {json.dumps(P.usage_chunk(rid, model_id, created, obj, u))}\n\n"
            break
        if ev.finish_reason is not None:  # cancelled: the client is gone
            break
        if ev.text or ev.logprobs:
            yield chunk(ev.text, None, ev.logprobs)
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A server-sent event stream that notices a client leaving even between tokens, and then cancels."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:

                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()
            await self.body_iterator.aclose()


SHUTDOWN_GRACE_S = 5.0  # past the deadline, how long the ended requests get to send their last bytes


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain deadline: on SIGINT/SIGTERM it stops accepting and lets running and queued
    requests finish for ``shutdown_timeout`` seconds; then the engine ends the rest (finish reason "abort"),
    so each client still gets a well-formed end, and the process exits."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        config.timeout_graceful_shutdown = shutdown_timeout + SHUTDOWN_GRACE_S  # uvicorn's own last resort

    async def shutdown(self, sockets=None) -> None:
        state: ServerState = self.config.app.state.server
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, state.abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(app: FastAPI, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serve ``app`` on a bound socket until SIGINT/SIGTERM, then drain within ``shutdown_timeout`` s."""
    config = uvicorn.Config(app, log_level="warning")
    DrainingServer(config, shutdown_timeout).run(sockets=[sock])
