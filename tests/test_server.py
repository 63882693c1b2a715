"""The OpenAI-compatible server: a tiny random model behind uvicorn on 127.0.0.1, driven by the openai client.

The reference for every greedy output is the same request run alone through ``stream_generate``.
"""

from __future__ import annotations

import json
import threading

import httpx
from server_harness import MODEL_ID, LiveServer, alone, chat_ids, client, model, server, tok  # noqa: F401 (fixtures)

from rankserve.runtime.sampling import SamplingParams
from rankserve.server.app import create_app
from rankserve.server.scheduler import Engine, Request

# ---- lifecycle and metrics ----


def test_health_is_503_while_loading_then_200(model, tok):
    gate = threading.Event()

    def load():
        gate.wait(20)
        return model, tok

    srv = LiveServer(create_app(load, MODEL_ID, max_batch=2, max_context=64))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        srv.wait_ready()
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    finally:
        gate.set()
        srv.stop()


def test_models_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    client.completions.create(model=MODEL_ID, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'rankserve_requests_total{endpoint="/v1/completions",status="200"}',
        "rankserve_prompt_tokens_total",
        "rankserve_generation_tokens_total",
        "rankserve_time_to_first_token_seconds_bucket",
        "rankserve_inter_token_latency_seconds_bucket",
        "rankserve_queue_depth",
        "rankserve_batch_size",
        "process_resident_memory_bytes",
    ):
        assert name in text, name


# ---- results equal the request run alone ----


def test_completion_matches_alone(client, model, tok):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    text, finish, n = alone(model, tok, tok.encode(prompt), max_tokens=12)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == n
    assert r.model == MODEL_ID


def test_alias_and_token_prompt(client, model, tok):
    ids = tok.encode("tokens in")
    r = client.completions.create(model="tiny-alias", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == alone(model, tok, ids, max_tokens=5)[0]


def test_chat_matches_alone(client, model, tok):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hello there"}], max_tokens=10, temperature=0
    )
    text, finish, n = alone(model, tok, chat_ids(tok, "hello there"), max_tokens=10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == n


def test_streaming_chunks_done_and_usage(server, client, model, tok):
    text, finish, n = alone(model, tok, chat_ids(tok, "stream me"), max_tokens=15)
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really streamed

    # The raw wire format: SSE data lines ending with [DONE]; completions too.
    body = {"model": MODEL_ID, "prompt": "raw", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    parsed = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert (
        "".join(p["choices"][0]["text"] for p in parsed)
        == alone(model, tok, tok.encode("raw"), max_tokens=6)[0]
    )
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(client, model, tok):
    prompt = "stop here please"
    full, _, _ = alone(model, tok, tok.encode(prompt), max_tokens=30, ignore_eos=True)
    stop = full[4:6]
    expected = full[: full.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        r = client.completions.create(
            model=MODEL_ID,
            prompt=prompt,
            max_tokens=30,
            temperature=0,
            stop=stops,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    # Streaming holds back a partial stop string and never emits the match.
    chunks = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seed_determinism(client):
    kw = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=20, temperature=0.8, top_p=0.95)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=99, **kw).choices[0].text
    assert a == b and len(a) > 0
    assert a != c  # 20 tokens at temperature 0.8 from a near-uniform model: a collision would be a bug


def test_concurrent_streams_match_alone(server, client, model, tok):
    """8 streaming clients with different prompts and lengths share decode steps; each equals its solo run."""
    prompts = [f"client {i}: " + "abcdefgh"[: i + 1] * (i % 3 + 1) for i in range(8)]
    max_tokens = [20 + 7 * i for i in range(8)]
    results: dict[int, tuple[str, str]] = {}
    errors = []
    start = threading.Barrier(8)

    def run(i):
        try:
            start.wait()
            stream = client.completions.create(
                model=MODEL_ID, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0, stream=True
            )
            parts, finish = [], None
            for c in stream:
                parts.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            results[i] = ("".join(parts), finish)
        except Exception as e:  # reported below, with the client index
            errors.append((i, e))

    admitted = server.engine.stats["admitted"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert server.engine.stats["admitted"] - admitted == 8
    for i in range(8):
        text, finish, _ = alone(model, tok, tok.encode(prompts[i]), max_tokens=max_tokens[i])
        assert results[i] == (text, finish), i
    assert server.engine.active == 0


def test_scheduler_admits_into_running_batch_and_compacts(model, tok):
    """Stepping the engine by hand: admission mid-batch, a right shift (s < L) and a left compaction."""
    eng = Engine(model, tok, max_batch=2, max_context=48)
    out: dict[str, list] = {}

    def submit(name, prompt, max_tokens):
        out[name] = []
        ids = tok.encode(prompt)
        eng.submit(Request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), out[name].append))
        return ids

    ids = {"a": submit("a", "short", 30)}
    for _ in range(3):
        eng.step()
    ids["b"] = submit("b", "a much longer prompt", 20)  # L=21 > s: the batch must move right
    for _ in range(12):
        eng.step()
    assert eng.stats["compactions"] == 1 and eng.active == 2
    ids["c"] = submit("c", "third", 18)  # waits for b's row, then fits only if the batch moves left
    while eng.pending:
        eng.step()
    assert eng.stats["compactions"] == 2 and eng.active == 2  # admitted while a still runs
    while eng.active:
        eng.step()
    for name, mt in (("a", 30), ("b", 20), ("c", 18)):
        text, finish, n = alone(model, tok, ids[name], max_tokens=mt, ignore_eos=True)
        assert "".join(e.text for e in out[name]) == text and out[name][-1].finish_reason == finish, name
        assert out[name][-1].completion_tokens == n


def test_scheduler_on_the_fast_runner(model, tok):
    """The non-eager path (whole-batch runner.decode, runner row prefill) gives the same greedy text."""
    from rankserve.runtime.options import RuntimeOptions

    opts = RuntimeOptions(backend="fast", compile=False, native=False)
    eng = Engine(model.inner, tok, max_batch=2, max_context=48, options=opts)
    out = {}
    for name, prompt, mt in (("a", "first one", 20), ("b", "second, longer prompt", 15), ("c", "3rd", 30)):
        out[name] = (tok.encode(prompt), mt, [])
        eng.submit(Request(out[name][0], SamplingParams(max_tokens=mt, ignore_eos=True), out[name][2].append))
        for _ in range(4):
            eng.step()
    while eng.active or eng.pending:
        eng.step()
    for ids, mt, events in out.values():
        assert "".join(e.text for e in events) == alone(model, tok, ids, max_tokens=mt, ignore_eos=True)[0]
