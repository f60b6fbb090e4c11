"""One api_server under abuse: 200 clients vanishing mid-stream, then 3 rounds of 200 concurrent streams."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from e2e_util import MODEL_NAME, read_metric

PROMPTS = [
    "Tell me a story about a cat.",
    "What is 2 + 2?",
    "Name three colours.",
    "Write a haiku about rain.",
    "你好！请介绍一下你自己。",
    "Give me an emoji 🙂 and explain it.",
]


BROKEN: list[str] = []


def chat_body(max_tokens: int, stream: bool = True, ignore_eos: bool = False) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": stream,
        "ignore_eos": ignore_eos,
    }


async def stream_chat(client: httpx.AsyncClient, url: str, max_tokens: int, leave_after: int | None = None):
    """Stream one chat; leave after `leave_after` content chunks (a client disconnect). Returns (chunks, finish).

    Chunks holding U+FFFD (broken UTF-8) are counted in BROKEN and asserted on last, so the other checks run.
    """
    chunks, finish = 0, None
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=chat_body(max_tokens, ignore_eos=leave_after is not None)
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                if "\ufffd" in (choice["delta"].get("content") or ""):
                    BROKEN.append(choice["delta"]["content"])
                if choice["delta"].get("content"):
                    chunks += 1
                finish = choice["finish_reason"] or finish
            if leave_after is not None and chunks >= leave_after:
                return chunks, "left"
    return chunks, finish


async def wait_idle(url: str, timeout_s: float = 60) -> tuple[float, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        running = read_metric(url, "lmkit:num_requests_running") + read_metric(url, "lmkit:num_requests_waiting")
        used = read_metric(url, "lmkit:num_blocks_used")
        if (running == 0 and used == 0) or time.monotonic() > deadline:
            return running, used
        await asyncio.sleep(0.25)


def test_client_disconnects_free_everything(server):
    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            sem = asyncio.Semaphore(24)

            async def one(i: int):
                async with sem:
                    if i % 4 == 3:  # normal traffic mixed in
                        return await stream_chat(client, server.url, 8)
                    return await stream_chat(client, server.url, 64, leave_after=1 + i % 3)

            results = await asyncio.gather(*(one(i) for i in range(267)))
            left = sum(1 for _, f in results if f == "left")
            normal = [f for _, f in results if f != "left"]
            assert left >= 200
            assert all(f in ("stop", "length") for f in normal), normal
            running, used = await wait_idle(server.url)
            assert running == 0, "requests still running after every client left"
            assert used == 0, f"{used} KV blocks still in use after every client left"
            chunks, finish = await stream_chat(client, server.url, 8)  # still serving
            assert finish in ("stop", "length")

    BROKEN.clear()
    asyncio.run(run())
    assert not BROKEN, f"{len(BROKEN)} stream chunks held U+FFFD: {BROKEN[:5]}"


def test_200_concurrent_streams_rss_stable(server):

    async def round_():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
            results = await asyncio.gather(
                *(stream_chat(client, server.url, 8) for _ in range(200)), return_exceptions=True
            )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(f in ("stop", "length") for _, f in results), results

    BROKEN.clear()
    rss = []
    for _ in range(3):
        asyncio.run(round_())
        asyncio.run(wait_idle(server.url))
        rss.append(_rss_bytes(server.pid))
    growth = rss[2] - rss[0]
    print(f"server RSS after each round (MiB): {[r >> 20 for r in rss]}")
    assert growth < max(0.05 * rss[0], 30 << 20), f"RSS grew {growth >> 20} MiB over rounds: {rss}"
    assert not BROKEN, f"{len(BROKEN)} stream chunks held U+FFFD: {BROKEN[:5]}"


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
