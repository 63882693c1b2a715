"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching :class:`Engine`.

``create_app(load, model_id)`` returns an app whose model is loaded in a background thread when the app starts:
``/health`` answers 503 until the engine runs. Every bad request becomes a 4xx with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankserve.runtime.options import RuntimeOptions
from rankserve.server import protocol as P
from rankserve.server.metrics import ServerMetrics
from rankserve.server.scheduler import Engine, Event
from rankserve.server.scheduler import Request as GenRequest

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the free context
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerState:
    """What the app serves: loading status, the engine once loaded, the names the model answers to."""

    def __init__(self, load, model_id, aliases, max_batch, max_context, options, metrics):
        self.load_fn, self.model_id = load, model_id
        self.names = {model_id, *aliases}
        self.max_batch, self.max_context, self.options = max_batch, max_context, options
        self.metrics = metrics
        self.status, self.error = "loading", None
        self.engine: Engine | None = None
        self.tokenizer = None
        self.vocab_size = 0

    def load(self) -> None:
        try:
            model, tokenizer = self.load_fn()
            ctx = int(model.config.max_position_embeddings)
            ctx = min(ctx, self.max_context) if self.max_context else min(ctx, 1024)
            self.tokenizer, self.vocab_size = tokenizer, int(model.config.vocab_size)
            self.engine = Engine(model, tokenizer, self.max_batch, ctx, self.options, self.metrics).start()
            self.status = "ready"
            log.info("serving %s: batch %d, context %d", self.model_id, self.max_batch, ctx)
        except Exception as e:  # the server stays up and says why on /health
            log.exception("loading the model failed")
            self.status, self.error = "error", f"{type(e).__name__}: {e}"

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
) -> FastAPI:
    """The API app. ``load()`` returns (model, tokenizer) and runs in a background thread at startup."""
    metrics = ServerMetrics()
    state = ServerState(load, model_id, aliases, max_batch, max_context, options, metrics)

    async def lifespan(app):
        threading.Thread(target=state.load, name="rankserve-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="rankserve", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(P.APIError)
    async def _api_error(request, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = P.APIError(400, f"invalid request: {e.errors()[0].get('msg')}", None, "invalid_value")
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
        body = await _parse(request, P.CompletionRequest)
        engine = state.ready_engine()
        state.check_model(body.model)
        if body.echo:
            raise P.APIError(400, "echo is not supported", "echo", "unsupported_parameter")
        ids = _prompt_ids(state, body.prompt)
        params = _params(engine, body, ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        return await _respond(engine, body, ids, params, model_id, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, P.ChatCompletionRequest)
        engine = state.ready_engine()
        state.check_model(body.model)
        try:
            ids = state.tokenizer.chat([m.as_template_dict() for m in body.messages])
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise P.APIError(400, f"cannot apply the chat template: {e}", "messages", "invalid_value") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(engine, body, ids, max_tokens, None, "messages")
        return await _respond(engine, body, ids, params, model_id, chat=True)

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


async def _parse(request: Request, schema):
    raw = await request.body()
    try:
        return schema.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise P.from_validation_error(e) from None


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


def _params(engine: Engine, body, ids: list[int], max_tokens, default: int | None, prompt_param: str):
    """Sampling parameters, with max_tokens checked against the context; 400 naming the parameter otherwise."""
    if body.n != 1:
        raise P.APIError(400, f"only n=1 is supported, got n={body.n}", "n", "unsupported_parameter")
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
    except ValueError as e:
        name = str(e).split()[0]
        raise P.APIError(
            400, str(e), name if name in type(body).model_fields else None, "invalid_value"
        ) from e


async def _respond(engine: Engine, body, ids: list[int], params, model_id: str, chat: bool):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    req = GenRequest(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    engine.submit(req)

    def cancel() -> None:
        if req.finish_reason is None:
            engine.cancel(req)

    if body.stream:
        return _EventStream(_sse(queue, body, model_id, chat, len(ids)), on_close=cancel)
    return await _collect(queue, model_id, chat, len(ids), cancel)


async def _events(queue: asyncio.Queue) -> AsyncIterator[Event]:
    while True:
        ev = await queue.get()
        yield ev
        if ev.finish_reason is not None:
            return


async def _collect(queue, model_id: str, chat: bool, n_prompt: int, cancel) -> JSONResponse:
    parts, last = [], None
    try:
        async for ev in _events(queue):
            parts.append(ev.text)
            last = ev
    finally:
        cancel()  # a no-op unless this handler was cancelled before the request finished
    if last.finish_reason == "error":
        raise P.APIError(500, last.error or "generation failed", None, "generation_failed")
    if last.finish_reason == "cancelled":  # only the server stopping cancels a request it still answers
        raise P.APIError(503, "the server is shutting down", None, "shutting_down")
    u = P.usage(n_prompt, last.completion_tokens)
    make = P.chat_response if chat else P.completion_response
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    return JSONResponse(make(rid, model_id, "".join(parts), last.finish_reason, u))


async def _sse(queue, body, model_id: str, chat: bool, n_prompt: int) -> AsyncIterator[str]:
    """OpenAI's chunk stream: one chunk per text delta, the finish chunk, the usage chunk if asked, [DONE]."""
    rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
    with_usage = body.include_usage

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            c = P.chat_chunk(rid, model_id, created, delta, finish)
        else:
            c = P.completion_chunk(rid, model_id, created, text or "", finish)
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
        if ev.finish_reason in ("stop", "length"):
            if chat and ev.text:
                yield chunk(ev.text, None)
            yield chunk(None if chat else ev.text, ev.finish_reason)
            if with_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                u = P.usage(n_prompt, ev.completion_tokens)
                yield f"data: {json.dumps(P.usage_chunk(rid, model_id, created, obj, u))}\n\n"
            break
        if ev.finish_reason is not None:  # cancelled: the server is stopping
            break
        if ev.text:
            yield chunk(ev.text, None)
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
