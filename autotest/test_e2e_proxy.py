"""The proxy in front of three api_server processes: strategies spread load, a SIGKILLed node is survived."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from e2e_util import MODEL_NAME, api_server, proxy, read_metric


def body(max_tokens: int, stream: bool) -> dict:
    # ignore_eos: long streams must still be running when a node is killed
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Count from one to twenty."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": max_tokens > 100,
    }


async def stream_outcome(client: httpx.AsyncClient, url: str, max_tokens: int) -> str:
    """'ok' (finish_reason seen, [DONE]), 'error-event' (an SSE error object), or 'http-<status>'."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body(max_tokens, True)) as r:
        if r.status_code != 200:
            return f"http-{r.status_code}"
        finish, saw_error, saw_done, nonempty = None, False, False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            nonempty = True
            if line == "data: [DONE]":
                saw_done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                saw_error = True
                continue
            for c in event["choices"]:
                finish = c["finish_reason"] or finish
        assert nonempty, "a 200 with an empty body"
        if saw_error:
            return "error-event"
        assert saw_done and finish in ("stop", "length"), (finish, saw_done)
        return "ok"


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.mark.parametrize("strategy", ["random", "min_expected_latency", "min_observed_latency"])
def test_strategy_spreads_load(strategy, servers, logs_dir):
    p = proxy(logs_dir, strategy, nodes=[s.url for s in servers])
    try:
        p.start()
        status = httpx.get(p.url + "/nodes/status").json()
        assert sorted(status) == sorted(s.url for s in servers)

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                sem = asyncio.Semaphore(6)

                async def one(i):
                    async with sem:
                        if i % 2:
                            return await stream_outcome(client, p.url, 4)
                        r = await client.post(p.url + "/v1/chat/completions", json=body(4, False))
                        return "ok" if r.status_code == 200 else f"http-{r.status_code}"

                return await asyncio.gather(*(one(i) for i in range(24)))

        outcomes = asyncio.run(run())
        assert outcomes == ["ok"] * 24
        # A stream's bookkeeping runs just after its last event reaches the client: wait for it to settle.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            nodes = httpx.get(p.url + "/nodes/status").json()
            if all(n["in_flight"] == 0 for n in nodes.values()):
                break
            time.sleep(0.05)
        counts = {u: n["num_requests"] for u, n in nodes.items()}
        print(strategy, counts)
        least = 1 if strategy == "random" else 2  # random: P(a node gets < 1 of 24) ~ 2e-4
        assert len(counts) == 3 and all(c >= least for c in counts.values()), counts
        assert sum(counts.values()) == 24
        # errors pass through untouched
        r = httpx.post(p.url + "/v1/chat/completions", json={**body(4, False), "model": "nope"})
        assert r.status_code == 404 and MODEL_NAME in r.json()["error"]["message"]
        r = httpx.post(p.url + "/v1/chat/completions", json={**body(4, False), "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    finally:
        p.stop()


def test_node_add_validation(main_proxy):
    r = httpx.post(main_proxy.url + "/nodes/add", json={"url": "http://127.0.0.1:1"})
    assert r.status_code == 400 and "does not answer" in r.json()["error"]["message"]
    assert httpx.post(main_proxy.url + "/nodes/add", json={"nope": 1}).status_code == 400
    assert httpx.post(main_proxy.url + "/nodes/remove", json={"url": "http://127.0.0.1:1"}).status_code == 404


def test_client_disconnect_through_proxy_frees_nodes(servers, main_proxy):
    urls = sorted(s.url for s in servers)
    wait_for(lambda: sorted(httpx.get(main_proxy.url + "/nodes/status").json()) == urls, 60, "3 registered nodes")

    async def leave_early(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", main_proxy.url + "/v1/chat/completions", json=body(200, True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content"' in line and '"role"' not in line:
                    return  # the client goes away mid-stream

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(leave_early(client) for _ in range(12)))

    asyncio.run(run())

    def idle() -> bool:
        return all(
            read_metric(s.url, "lmkit:num_requests_running") == 0 and read_metric(s.url, "lmkit:num_blocks_used") == 0
            for s in servers
        )

    wait_for(idle, 30, "every node idle after the clients left the proxy")
    assert all(n["in_flight"] == 0 for n in httpx.get(main_proxy.url + "/nodes/status").json().values())


def test_sigkill_node_mid_run(servers, main_proxy, logs_dir):
    urls = sorted(s.url for s in servers)
    wait_for(lambda: sorted(httpx.get(main_proxy.url + "/nodes/status").json()) == urls, 60, "3 registered nodes")
    victim = servers[2]

    async def run():
        async with httpx.AsyncClient(timeout=180) as client:
            long_streams = [asyncio.create_task(stream_outcome(client, main_proxy.url, 200)) for _ in range(9)]
            # let them start streaming on all nodes, then crash one node
            await asyncio.sleep(3.0)
            victim.kill()
            after = [asyncio.create_task(stream_outcome(client, main_proxy.url, 4)) for _ in range(12)]
            return await asyncio.gather(*long_streams), await asyncio.gather(*after)

    cut, after = asyncio.run(run())
    print("long streams:", cut, "after the kill:", after)
    assert after == ["ok"] * 12, "requests sent after the crash must be retried on live nodes"
    assert set(cut) <= {"ok", "error-event"} and "error-event" in cut
    wait_for(lambda: victim.url not in httpx.get(main_proxy.url + "/nodes/status").json(), 30, "dead node removed")

    # restart on the same port: it registers itself again
    reborn = api_server(logs_dir, port=victim.port, extra=["--proxy-url", main_proxy.url])
    servers[2] = reborn
    reborn.start()
    wait_for(lambda: victim.url in httpx.get(main_proxy.url + "/nodes/status").json(), 60, "node re-registered")
    r = httpx.post(main_proxy.url + "/v1/chat/completions", json=body(4, False), timeout=60)
    assert r.status_code == 200
