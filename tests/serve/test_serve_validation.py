"""api_server over a fake engine: every bad input gets the right 4xx and an OpenAI error object,
and the server still answers a normal request afterwards."""

from __future__ import annotations

import json
import time

import httpx
import pytest

MODEL = "fake-model"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


def comp_body(**kw) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4, **kw}


def assert_error(r: httpx.Response, status: int, param: str | None = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param != "":
        assert err["param"] == param, err
    return err


def assert_healthy(client: httpx.Client) -> None:
    r = client.post(CHAT, json=chat_body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


BAD_JSON = [
    b'{"model": "fake-model", "messages": [',  # truncated
    b"{'model': 'fake-model'}",  # not JSON
    b'{"model": "fake-model", "messages": [], "max_tokens": NaN}',
    b"\xff\xfe\x00garbage",  # not UTF-8
    b'"just a string"',
    b"[1, 2, 3]",
    b"",
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
]


@pytest.mark.parametrize("body", BAD_JSON)
def test_malformed_bodies(client, body):
    assert_error(client.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert_healthy(client)


CHAT_BAD = [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": ""}]), "messages"),
    (dict(messages="hi"), "messages"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), None),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2**31), "max_tokens"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(n=1000), "n"),
    (dict(stop=[""]), "stop"),
    (dict(stop=5), "stop"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(logit_bias={"1": 5}), "logit_bias"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(no_such_param=1), "no_such_param"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), None),
]


@pytest.mark.parametrize("fields,param", CHAT_BAD, ids=[str(i) for i in range(len(CHAT_BAD))])
def test_chat_bad_params(client, fields, param):
    err = assert_error(client.post(CHAT, json=chat_body(**fields)), 400, param if param else "")
    if param == "max_tokens" and fields.get("max_tokens") == 2**31:
        assert "maximum context length is 256 tokens" in err["message"]
    assert_healthy(client)


COMP_BAD = [
    (dict(prompt=""), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[]]), "prompt"),
    (dict(prompt=[-1, 5]), "prompt"),
    (dict(prompt=[100000]), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(max_tokens=None, prompt="x" * 256), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(suffix="x"), "suffix"),
    (dict(best_of=3), "best_of"),
]


@pytest.mark.parametrize("fields,param", COMP_BAD, ids=[str(i) for i in range(len(COMP_BAD))])
def test_completion_bad_params(client, fields, param):
    assert_error(client.post(COMP, json=comp_body(**fields)), 400, param)
    assert_healthy(client)


def test_context_limit(client):
    # fake tokens are bytes; session_len = 256; chat template adds 17 tokens around "hi"
    for n, ok in [(255, True), (256, False), (257, False), (2560, False)]:
        r = client.post(COMP, json=comp_body(prompt="a" * n, max_tokens=1))
        assert (r.status_code == 200) == ok, (n, r.text)
        if not ok:
            assert "maximum context length is 256" in assert_error(r, 400, "prompt")["message"]
    r = client.post(COMP, json=comp_body(prompt="a" * 250, max_tokens=7))
    assert_error(r, 400, "max_tokens")
    assert client.post(COMP, json=comp_body(prompt="a" * 250, max_tokens=6)).status_code == 200
    assert_healthy(client)


def test_unknown_model_lists_names(client):
    err = assert_error(client.post(CHAT, json=chat_body(model="gpt-9")), 404, "model")
    assert MODEL in err["message"]
    assert_healthy(client)


def test_auth(fake_server):
    url = fake_server.url
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}]:
        for method, path in [("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/ready")]:
            kw = {"json": chat_body()} if method == "POST" else {}
            assert_error(httpx.request(method, url + path, headers=headers, **kw), 401)
    assert httpx.get(url + "/health").status_code == 200


def test_body_limits(client):
    big = b'{"model": "fake-model", "prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    assert_error(client.post(COMP, content=big), 413)
    assert_healthy(client)


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get(CHAT), 405)
    assert_healthy(client)


def test_stream_format_and_usage(client):
    body = chat_body(stream=True, n=2, max_tokens=6, stream_options={"include_usage": True})
    with client.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    finishes = {
        c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_strings_never_leak(client):
    # the fake greedy reply starts "Hello there! 你好, ..."
    for stop, expect in [("there", "Hello "), (["lo t", "o th"], "Hel"), ("H", ""), ("你好", "Hello there! ")]:
        full = client.post(COMP, json=comp_body(stop=stop, temperature=0, max_tokens=30)).json()
        assert full["choices"][0]["text"] == expect
        assert full["choices"][0]["finish_reason"] == "stop"
        with client.stream("POST", COMP, json=comp_body(stop=stop, temperature=0, max_tokens=30, stream=True)) as r:
            texts = [json.loads(ln[6:])["choices"][0]["text"] for ln in r.iter_lines() if ln.startswith("data: {")]
        assert "".join(texts) == expect


def test_logprobs_shapes(client):
    r = client.post(CHAT, json=chat_body(logprobs=True, top_logprobs=3)).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    r = client.post(COMP, json=comp_body(logprobs=2)).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 4


def test_batch_prompts_and_n(client):
    r = client.post(COMP, json=comp_body(prompt=["a", "b", "c"], n=2, temperature=1.0, seed=3)).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["usage"]["prompt_tokens"] == 3 and r["usage"]["completion_tokens"] == 24


def test_disconnect_aborts_engine_request(fake_server, client):
    engine = fake_server.engine
    before = len(engine.aborted)
    body = chat_body(stream=True, max_tokens=200)
    for _ in range(5):
        with client.stream("POST", CHAT, json=body) as r:
            for ln in r.iter_lines():
                if '"content"' in ln and '"role"' not in ln:
                    break  # leave mid-stream
    deadline = time.monotonic() + 10
    while (engine.live or len(engine.aborted) < before + 5) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.live and len(engine.aborted) >= before + 5
    assert_healthy(client)


def test_metrics_and_ready(client):
    assert_healthy(client)
    text = client.get("/metrics").text
    for name in [
        "lmkit:num_requests_running",
        "lmkit:generation_tokens_total",
        "lmkit:prompt_tokens_total",
        "lmkit:time_to_first_token_seconds_bucket",
        "lmkit:inter_token_latency_seconds_bucket",
        "lmkit:kv_cache_usage_perc",
        "lmkit:num_blocks_used",
    ]:
        assert name in text, name
    assert client.get("/ready").json()["ready"] is True


def test_ready_fails_when_stalled(fake_engine):
    from serve_util import ThreadServer

    from lmkit.serve.openai.api_server import ServerConfig, build_app

    app = build_app(fake_engine, MODEL, ServerConfig(ready_stall_s=0.5))
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        import threading

        codes = []
        fake_engine.stall = True
        worker = threading.Thread(target=lambda: codes.append(c.post(CHAT, json=chat_body()).status_code))
        try:
            worker.start()
            time.sleep(1.5)
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
        finally:
            fake_engine.stall = False
            worker.join(timeout=30)
        assert codes == [200]
        assert c.get("/ready").status_code == 200


def test_max_concurrent_requests(fake_engine):
    import concurrent.futures as cf

    from serve_util import ThreadServer

    from lmkit.serve.openai.api_server import ServerConfig, build_app

    app = build_app(fake_engine, MODEL, ServerConfig(max_concurrent_requests=2))
    with ThreadServer(app) as server:

        def one(_):
            return httpx.post(server.url + CHAT, json=chat_body(max_tokens=60), timeout=30).status_code

        with cf.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert httpx.post(server.url + CHAT, json=chat_body(), timeout=30).status_code == 200


def test_disconnect_while_waiting_for_a_full_answer_aborts(fake_server):
    """A non-streamed request whose client gives up is cancelled too (the server polls for the disconnect)."""
    engine = fake_server.engine
    engine.stall = True
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                fake_server.url + CHAT,
                json=chat_body(max_tokens=50),
                timeout=0.5,
                headers={"Authorization": "Bearer sk-test"},
            )
        deadline = time.monotonic() + 5
        while engine.live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.live, "the engine request outlived its client"
    finally:
        engine.stall = False
