"""Load test for a running ``rankserve serve``: N concurrent streaming clients for D seconds (loopback only).

First one client alone (the single-stream baseline), then N clients together. Each client sends streaming
chat completions back to back until the phase's deadline; requests already sent finish (each is bounded by
--max-tokens), and a hard timeout stops everything regardless. Reports generated tok/s (usage tokens over wall
time), p50/p99 time to first token (first non-empty text) and inter-token latency (gaps between text chunks),
TPOT (a request's mean time per output token), errors, and the server's RSS before and after.

    rankserve serve smollm2-135m --max-batch 32 --max-context 512 &
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 32 --duration 60 --server-pid $!
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import re
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten year old.",
    "List five uses of a paperclip, one per line.",
    "What is the capital of France? Answer and then describe the city.",
    "Translate into French: the weather is lovely today and we will walk by the river.",
    "Give me a recipe for pancakes.",
    "Describe the water cycle in three sentences.",
    "Summarise the plot of a heist film in a paragraph.",
]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"load.py: refusing to load-test non-loopback host {host!r}; use 127.0.0.1")


@dataclass
class PhaseResult:
    clients: int
    wall_s: float = 0.0
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "wall_s": round(self.wall_s, 2),
            "requests": self.requests,
            "errors": self.errors,
            "generated_tokens": self.tokens,
            "tok_s": round(self.tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "ttft_p50_ms": _ms(percentile(self.ttft, 50)),
            "ttft_p99_ms": _ms(percentile(self.ttft, 99)),
            "itl_p50_ms": _ms(percentile(self.itl, 50)),
            "itl_p99_ms": _ms(percentile(self.itl, 99)),
            "tpot_p50_ms": _ms(percentile(self.tpot, 50)),
            "error_samples": self.error_samples[:3],
        }


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def one_request(http: httpx.AsyncClient, path: str, body: dict, res: PhaseResult) -> None:
    t0 = time.perf_counter()
    last, first, usage = None, None, None
    gaps = []
    try:
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and _text(chunk["choices"][0]):
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
    except Exception as e:  # counted and sampled, never fatal to the run
        res.errors += 1
        res.error_samples.append(f"{type(e).__name__}: {e}"[:200])
        return
    res.requests += 1
    res.tokens += usage["completion_tokens"]
    if first is not None:
        res.ttft.append(first)
    res.itl.extend(gaps)
    if first is not None and usage["completion_tokens"] > 1:
        res.tpot.append((last - t0 - first) / (usage["completion_tokens"] - 1))


async def run_phase(url: str, model: str, clients: int, duration: float, args) -> PhaseResult:
    res = PhaseResult(clients)
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(args.request_timeout)

    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"

    async def client(i: int) -> None:
        k = i
        while time.perf_counter() < deadline:
            prompt = PROMPTS[k % len(PROMPTS)]
            body = {
                "model": model,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": k,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": args.ignore_eos,
            }
            if args.endpoint == "chat":
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            await one_request(http, path, body, res)
            k += clients

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        # Self-stopping: whatever still runs this long after the deadline is cancelled.
        done, pending = await asyncio.wait(tasks, timeout=duration + args.request_timeout)
        for t in pending:
            t.cancel()
            res.errors += 1
            res.error_samples.append("cancelled at the hard timeout")
        await asyncio.gather(*pending, return_exceptions=True)
        res.wall_s = time.perf_counter() - t0
    return res


def server_rss(url: str, pid: int | None) -> int | None:
    """Resident set size in bytes: /proc/<pid>/status if a pid is given, else the /metrics process collector."""
    if pid:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
    return int(float(m.group(1))) if m else None


def wait_ready(url: str, timeout: float) -> str:
    """Block until /health is 200; return the served model id."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SystemExit(f"load.py: {url} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the N-client phase")
    p.add_argument(
        "--single-duration", type=float, default=15.0, help="seconds of the 1-client phase (0: skip)"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument(
        "--ignore-eos", action="store_true", help="always generate --max-tokens (rankserve's extension)"
    )
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--server-pid", type=int, default=None, help="read RSS from /proc/<pid>/status")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    url = args.url.rstrip("/")
    require_loopback(url)
    if not (1 <= args.clients <= 256 and 0 < args.duration <= 3600):
        raise SystemExit("load.py: --clients must be in [1, 256] and --duration in (0, 3600]")

    model = wait_ready(url, args.ready_timeout)
    out = {
        "url": url,
        "model": model,
        "max_tokens": args.max_tokens,
        "rss_before": server_rss(url, args.server_pid),
    }
    if args.single_duration > 0:
        out["single"] = asyncio.run(run_phase(url, model, 1, args.single_duration, args)).summary()
        _print("1 client", out["single"])
    out["concurrent"] = asyncio.run(run_phase(url, model, args.clients, args.duration, args)).summary()
    _print(f"{args.clients} clients", out["concurrent"])
    out["rss_after"] = server_rss(url, args.server_pid)
    mb = lambda b: f"{b / 2**20:.0f} MiB" if b else "n/a"  # noqa: E731
    print(f"server RSS: {mb(out['rss_before'])} before, {mb(out['rss_after'])} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _print(name: str, s: dict) -> None:
    print(
        f"{name:>11}: {s['tok_s']:8.1f} tok/s  {s['generated_tokens']:6d} tokens  {s['requests']:4d} requests  "
        f"{s['errors']} errors  TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms  "
        f"ITL p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} ms  TPOT p50 {s['tpot_p50_ms']} ms  ({s['wall_s']} s)"
    )
    for e in s["error_samples"]:
        print(f"             error: {e}")


if __name__ == "__main__":
    sys.exit(main())
