"""The server under bad input, clients that leave, logprobs and shutdown (harness: server_harness.py)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from server_harness import MAX_BODY, MODEL_ID, LiveServer, SlowTokenizer, chat_ids, client, model, server, tok  # noqa: F401 (fixtures)
from tiny import hf_model_from

from rankserve.runtime.generate import complete
from rankserve.runtime.sampling import SamplingParams
from rankserve.server.app import create_app

# ---- bad input never kills the server ----

BAD = [
    ("malformed json", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens < 0", "/v1/chat/completions", {"max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens > context", "/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": "y" * 500, "max_tokens": 1}, 400, "prompt"),
    ("chat too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 500}]}, 400, "messages"),
    ("max_tokens str", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature str", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("temperature < 0", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("stop int", "/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("seed float", "/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("seed huge", "/v1/completions", {"prompt": "x", "seed": 2**70, "temperature": 0.5}, 400, "seed"),
    ("temperature NaN", "/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("temperature inf", "/v1/completions", {"prompt": "x", "temperature": float("inf")}, 400, "temperature"),
    ("top_p > 1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_k < 0", "/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k"),
    ("min_p 1", "/v1/chat/completions", {"min_p": 1}, 400, "min_p"),
    ("penalty -inf", "/v1/completions", {"prompt": "x", "repetition_penalty": float("-inf")}, 400, "repetition_penalty"),
    ("body not UTF-8", "/v1/completions", b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', 400, None),
    ("lone surrogate", "/v1/completions", b'{"model": "tiny-llama", "prompt": "\\ud800"}', 400, None),
    ("logit_bias", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ("best_of", "/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("presence_penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("logprobs > 20", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("tools", "/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tool_choice", "/v1/chat/completions", {"tool_choice": "required"}, 400, "tool_choice"),
    ("functions", "/v1/chat/completions", {"functions": [{"name": "f"}]}, 400, "functions"),
    ("json mode", "/v1/chat/completions", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("frequency_penalty", "/v1/chat/completions", {"frequency_penalty": 1}, 400, "frequency_penalty"),
    ("top_logprobs alone", "/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat logprobs int", "/v1/chat/completions", {"logprobs": 3}, 400, "logprobs"),
    ("stream str", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("n=2", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("n=2 chat", "/v1/chat/completions", {"n": 2}, 400, "n"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_with_error_body(server, name, path, body, status, param):
    if isinstance(body, dict):
        body = {"model": MODEL_ID, **body} if name != "missing model" else body
        if path.endswith("chat/completions"):
            body.setdefault("messages", [{"role": "user", "content": "hi"}])
        body = json.dumps(body).encode()
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_unsupported_fields_are_all_named_and_defaults_pass(server, client):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5},
            "tools": [{"type": "function", "function": {"name": "f"}}]}  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert "logit_bias" in r.json()["error"]["message"] and "tools" in r.json()["error"]["message"]
    # OpenAI's own defaults for those fields ask for nothing rankserve lacks.
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2, n=1, logit_bias={},
        tools=[], presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"},
    )  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


def test_body_limit_is_413(server):
    big = {"model": MODEL_ID, "prompt": "x" * MAX_BODY}
    r = httpx.post(server.url + "/v1/completions", json=big)  # declares its length: refused before reading
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    data = json.dumps(big).encode()

    def chunked():  # no content-length: counted while it streams in
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = httpx.post(server.url + "/v1/completions", content=chunked())
    assert r.status_code == 413, r.text
    small = {"model": MODEL_ID, "prompt": "x" * 50, "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", content=chunked_of(small)).status_code == 200


def chunked_of(body: dict):
    data = json.dumps(body).encode()
    yield data[:10]
    yield data[10:]


def test_tokenizing_does_not_block_the_event_loop(model, tok):
    """/health answers while a prompt is being tokenized: the gate opens only after /health replied."""
    slow = SlowTokenizer(tok)
    srv = LiveServer(create_app(lambda: (model, slow), MODEL_ID, max_batch=1, max_context=64))
    try:
        srv.wait_ready()
        done = {}
        body = {"model": MODEL_ID, "prompt": "a long prompt", "max_tokens": 3, "temperature": 0}
        t = threading.Thread(
            target=lambda: done.setdefault(
                "r", httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            )
        )
        t.start()
        assert slow.entered.wait(20)
        health = httpx.get(srv.url + "/health", timeout=10)  # times out if encode held the event loop
        assert health.status_code == 200
        slow.gate.set()
        t.join(30)
        assert done["r"].status_code == 200
    finally:
        slow.gate.set()
        srv.stop()


def test_queue_bound_is_503_with_retry_after(model, tok):
    """One row and one queue place: a third request in flight is refused at once, the first two are served."""
    srv = LiveServer(create_app(lambda: (model, tok), MODEL_ID, max_batch=1, max_context=64, max_queue=1))
    results = {}
    model.delay = 0.02
    try:
        srv.wait_ready()
        body = {"model": MODEL_ID, "prompt": "queue", "max_tokens": 30, "temperature": 0, "ignore_eos": True}

        def post(i):
            results[i] = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(srv.engine.live) < 2:
            assert time.time() < deadline, "the two requests never reached the engine"
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_overloaded"
        for t in threads:
            t.join(30)
        assert [results[i].status_code for i in range(2)] == [200, 200]
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200  # room again
    finally:
        model.delay = 0.0
        srv.stop()


def test_server_keeps_serving_after_bad_input(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert httpx.get(server.url + "/nowhere").json()["error"]["message"]
    r = client.completions.create(model=MODEL_ID, prompt="still alive", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/health").status_code == 200


# ---- a client that leaves is cancelled ----


def test_disconnect_mid_stream_frees_the_slot(server, model):
    cancelled = server.engine.stats["cancelled"]
    model.delay = 0.01  # 100 tokens would take > 1 s: long enough to leave in the middle
    try:
        body = {"model": MODEL_ID, "prompt": "leave early", "max_tokens": 100, "stream": True,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = (ln for ln in r.iter_lines() if ln)
            for _ in range(3):
                assert next(lines).startswith("data: ")
        deadline = time.time() + 5
        while server.engine.active or server.engine.stats["cancelled"] == cancelled:
            assert time.time() < deadline, "the stream's row was never freed"
            time.sleep(0.02)
    finally:
        model.delay = 0.0
    metrics = httpx.get(server.url + "/metrics").text
    assert "rankserve_batch_size 0.0" in metrics
    assert 'rankserve_request_finish_total{reason="cancelled"}' in metrics


def test_disconnect_without_streaming_frees_the_slot(server, model):
    cancelled, finished = server.engine.stats["cancelled"], server.engine.stats["finished"]
    model.delay = 0.02  # 100 tokens would take > 2 s; the client leaves after 0.3 s
    try:
        body = {"model": MODEL_ID, "prompt": "leave early", "max_tokens": 100, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        deadline = time.time() + 5
        while server.engine.active or server.engine.stats["cancelled"] == cancelled:
            assert time.time() < deadline, "the request's row was never freed"
            time.sleep(0.02)
    finally:
        model.delay = 0.0
    assert server.engine.stats["finished"] == finished  # cancelled, not run to the end


# ---- logprobs ----


def reference_logprobs(model, ids: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each generated position [N, V]: the reference the server must match."""
    hf = hf_model_from(model.inner)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + generated])).logits[0].float()
    return torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(generated)], -1)


def test_completion_logprobs_match_the_model(client, model, tok):
    ids = tok.encode("log probs")
    kw = dict(model=MODEL_ID, prompt="log probs", max_tokens=8, logprobs=3, extra_body={"ignore_eos": True})
    for sampling in (dict(temperature=0), dict(temperature=0.7, top_p=0.9, seed=3)):  # raw, never tempered
        lp = client.completions.create(**kw, **sampling).choices[0].logprobs
        # The tokens, from the same request run alone (the tiny model may pick ids the tokenizer cannot spell).
        gen = complete(model, tok, ids, SamplingParams(max_tokens=8, ignore_eos=True, **sampling)).token_ids
        assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in gen]
        ref = reference_logprobs(model, ids, gen)
        got = torch.tensor(lp.token_logprobs)
        assert torch.allclose(got, ref[torch.arange(8), torch.tensor(gen)], atol=1e-4), (got, ref)
        for i, top in enumerate(lp.top_logprobs):
            # The top 3 and the sampled token, keyed by text (two ids the tokenizer cannot spell share "").
            third, chosen = float(ref[i].topk(3).values[-1]), lp.token_logprobs[i]
            assert lp.tokens[i] in top and abs(max(top.values()) - float(ref[i].max())) < 1e-4
            assert all(v >= third - 1e-4 or abs(v - chosen) < 1e-6 for v in top.values())
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
        if sampling["temperature"] == 0:  # greedy picks the top token
            assert all(lp.tokens[i] == max(top, key=top.get) for i, top in enumerate(lp.top_logprobs))


def test_chat_logprobs_match_the_model_and_stream_the_same(client, model, tok):
    messages = [{"role": "user", "content": "chat logprobs"}]
    ids = chat_ids(tok, "chat logprobs")
    kw = dict(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    gen = complete(model, tok, ids, SamplingParams(max_tokens=10)).token_ids
    gen = gen[:-1] if gen[-1] in tok.eos_ids else gen  # a terminating EOS has no entry
    assert [c.token for c in content] == [tok.decode([t]) for t in gen]
    ref = reference_logprobs(model, ids, gen)
    for i, c in enumerate(content):
        assert abs(c.logprob - float(ref[i, gen[i]])) < 1e-4 and c.bytes == list(c.token.encode())
        assert [t.token for t in c.top_logprobs][0] == c.token  # greedy: the sampled token is the top one
        assert torch.allclose(
            torch.tensor([t.logprob for t in c.top_logprobs]), ref[i].topk(2).values, atol=1e-4
        )
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [
        c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content
    ]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [
        (c.token, round(c.logprob, 5)) for c in content
    ]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


# ---- shutdown ----


def test_sigterm_drain_ends_requests_at_the_deadline(model, tok):
    """Past --shutdown-timeout the running stream ends with finish_reason "abort" and [DONE], the queued
    request gets a 503, and the server exits; before it, nothing is cut."""
    srv = LiveServer(
        create_app(lambda: (model, tok), MODEL_ID, max_batch=1, max_context=128), shutdown_timeout=0.5
    )
    model.delay = 0.05  # 100 tokens would take 5 s
    lines, queued = [], {}
    try:
        srv.wait_ready()
        body = {"model": MODEL_ID, "prompt": "drain", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}

        def stream():
            with httpx.stream("POST", srv.url + "/v1/completions", json=stream_body, timeout=30) as r:
                lines.extend(ln for ln in r.iter_lines() if ln)

        def wait_queued():
            queued["r"] = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)

        threads = [threading.Thread(target=stream), threading.Thread(target=wait_queued)]
        deadline = time.time() + 10
        threads[0].start()
        while srv.engine.active < 1:  # the stream holds the one row...
            assert time.time() < deadline, "the stream never started"
            time.sleep(0.01)
        threads[1].start()
        while len(srv.engine.live) < 2:  # ...and the other request waits for it
            assert time.time() < deadline, "the second request never reached the engine"
            time.sleep(0.01)
        srv.server.handle_exit(signal.SIGTERM, None)
        for t in threads:
            t.join(20)
        srv.thread.join(20)
        assert not srv.thread.is_alive(), "the server did not exit after the deadline"
    finally:
        model.delay = 0.0
        srv.stop()
    assert lines[-1] == "data: [DONE]"
    parsed = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert parsed[-2]["choices"][0]["finish_reason"] == "abort"
    assert 1 <= parsed[-1]["usage"]["completion_tokens"] < 100  # it ran, and was ended before its end
    assert queued["r"].status_code == 503 and "retry-after" in queued["r"].headers
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_served_names():
    from rankserve.cli.serve import served_names

    assert served_names("smollm2-135m") == ("smollm2-135m", [])
    assert served_names("/tmp/ckpt/smol-svdllm-04/") == ("smol-svdllm-04", ["/tmp/ckpt/smol-svdllm-04/"])
    assert served_names("m/SmolLM2.Q4.gguf") == ("SmolLM2.Q4.gguf", ["SmolLM2.Q4", "m/SmolLM2.Q4.gguf"])
