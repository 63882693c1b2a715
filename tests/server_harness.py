"""The server tests' harness: a tiny random model (and a slow one) behind uvicorn on 127.0.0.1, module-scoped
fixtures for it, and the reference every greedy output is checked against: the same request run alone."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from torch import nn

from rankserve.runtime.generate import stream_generate
from rankserve.runtime.sampling import SamplingParams
from rankserve.server.app import DrainingServer, create_app
from rankserve.server.scheduler import Engine

MODEL_ID = "tiny-llama"
CONTEXT = 128
MAX_BATCH = 4  # below the 8 concurrent clients of the batching test, so some of them queue
MAX_BODY = 16_384  # the module server's --max-body-bytes


class SlowModel(nn.Module):
    """The tiny model with an optional pause per forward, so a generation lasts long enough to interrupt."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.delay = 0.0

    def forward(self, *args, **kwargs):
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*args, **kwargs)


class SlowTokenizer:
    """A tokenizer whose ``encode`` waits for a gate: a stand-in for tokenizing a very long prompt."""

    def __init__(self, inner):
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()

    def encode(self, text, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(20), "the gate was never opened"
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class LiveServer:
    """uvicorn in a background thread on a free loopback port (``shutdown_timeout``: the draining server)."""

    def __init__(self, app, shutdown_timeout: float | None = None):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = (
            uvicorn.Server(config) if shutdown_timeout is None else DrainingServer(config, shutdown_timeout)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def engine(self) -> Engine:
        return self.app.state.server.engine

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline, "the model never finished loading"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SlowModel(tiny_model("llama-gqa"))


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(
        lambda: (model, tok),
        MODEL_ID,
        aliases=["tiny-alias"],
        max_batch=MAX_BATCH,
        max_context=CONTEXT,
        max_body_bytes=MAX_BODY,
    )
    srv = LiveServer(app)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def alone(model, tok, ids, **kw) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one request run alone, the reference path."""
    out = list(stream_generate(model, tok, ids, SamplingParams(**kw)))
    return "".join(r.text for r in out), out[-1].finish_reason, out[-1].completion_tokens


def chat_ids(tok, text: str) -> list[int]:
    return tok.chat([{"role": "user", "content": text}])
