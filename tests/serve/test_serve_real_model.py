"""api_server over the real SmolLM2 (PyTorch engine, CPU): the `openai` client end to end, and the
reliability list — every bad input, each followed by a normal request that must succeed."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_util import ThreadServer

SESSION_LEN = 256
MODEL = "smollm2"
KEY = "sk-real"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_server(smollm2_dir):
    from lmkit.engines import build_async_engine
    from lmkit.messages import PytorchEngineConfig
    from lmkit.serve.openai.api_server import ServerConfig, build_app

    # The AsyncEngine binds to the event loop of each request, so it can be built here and served there.
    engine = build_async_engine(
        str(smollm2_dir),
        "pytorch",
        PytorchEngineConfig(session_len=SESSION_LEN, device="cpu", cache_max_entry_count=0.1),
        MODEL,
    )
    try:
        with ThreadServer(build_app(engine, MODEL, ServerConfig(api_keys=[KEY]))) as server:
            server.engine = engine
            yield server
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def oai(real_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture()
def http(real_server):
    with httpx.Client(base_url=real_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def ok(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": Q, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_openai_chat_stream_equals_full(oai):
    full = oai.chat.completions.create(model=MODEL, messages=Q, max_tokens=16, temperature=0)
    assert "Paris" in full.choices[0].message.content
    assert full.usage.completion_tokens <= 16 and full.usage.prompt_tokens > 0
    pieces, finish = [], None
    for chunk in oai.chat.completions.create(model=MODEL, messages=Q, max_tokens=16, temperature=0, stream=True):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_openai_completions_stream_equals_full(oai):
    prompt = "The three primary colours are"
    full = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        if c.choices
    )
    assert text == full.choices[0].text and text
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_openai_logprobs_and_n(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=Q, max_tokens=4, logprobs=True, top_logprobs=3, n=2, temperature=1.0, seed=1
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert len(choice.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    c = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3


def test_logprob_bytes_rebuild_cjk_text(oai):
    msgs = [{"role": "user", "content": "Translate to Chinese: hello, friend."}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    content = r.choices[0].message.content
    raw = b"".join(bytes(t.bytes) for t in r.choices[0].logprobs.content)
    assert raw.decode("utf-8", errors="ignore") == content.replace("\ufffd", "")


@pytest.mark.parametrize("delta,status", [(-1, 200), (0, 400), (1, 400), (9 * SESSION_LEN, 400)])
def test_prompt_at_context_limit(real_server, http, delta, status):
    ids = real_server.engine.encode("hello " * (SESSION_LEN * 10))
    prompt = ids[: SESSION_LEN + delta]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert r.status_code == status, r.text[:300]
    if status == 400:
        assert f"maximum context length is {SESSION_LEN}" in r.json()["error"]["message"]
    text_prompt = real_server.engine.tokenizer.decode(prompt) if delta > 0 else None
    if text_prompt:
        r = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": text_prompt}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    ok(http)


BAD = [
    {"messages": []},
    {"messages": [{"role": "user", "content": ""}]},
    {"max_tokens": 0},
    {"max_tokens": -1},
    {"max_tokens": 2**31},
    {"max_tokens": 2.5},
    {"max_tokens": "7"},
    {"n": 0},
    {"n": 100},
    {"logprobs": True, "top_logprobs": 99},
    {"temperature": [1]},
    {"stop": {"a": 1}},
    {"model": "gpt-4o"},
]


@pytest.mark.parametrize("fields", BAD, ids=[json.dumps(b)[:40] for b in BAD])
def test_bad_inputs_then_ok(http, fields):
    body = {"model": MODEL, "messages": Q, "max_tokens": 3, **fields}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == (404 if fields.get("model") else 400), r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if fields.get("model"):
        assert MODEL in err["message"]
    ok(http)


def test_max_tokens_null_uses_the_rest_of_the_context(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": Q, "max_tokens": None, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    ok(http)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "smollm2", "messages": [{"role"',
        b"\xc3\x28\xa0\xa1",
        b"nonsense",
        b'{"model": "smollm2", "messages": 5}',
    ],
)
def test_broken_bodies_then_ok(http, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    ok(http)


def test_50mb_body_then_ok(http):
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * (50 << 20) + b'"}')
    assert r.status_code == 413
    ok(http)


def test_auth_then_ok(real_server, http):
    url = real_server.url + "/v1/chat/completions"
    assert httpx.post(url, json={"model": MODEL, "messages": Q}).status_code == 401
    assert (
        httpx.post(url, json={"model": MODEL, "messages": Q}, headers={"Authorization": "Bearer x"}).status_code == 401
    )
    ok(http)


def test_stop_strings(http):
    base = {"model": MODEL, "messages": Q, "max_tokens": 16, "temperature": 0}
    answer = http.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    assert answer.startswith("The capital of France is")
    # first token, spanning " capital of", overlapping candidates: the earliest match wins, never leaked
    for stop, expect in [
        ("The", ""),
        ("capital of", "The "),
        (["France is", "of Fr"], "The capital "),
        (["ce is P", "is"], "The capital of France "),
    ]:
        for stream in (False, True):
            text = _chat_text(http, {**base, "stop": stop, "stream": stream})
            assert text == expect, (stop, stream, text)
    ok(http)


def _chat_text(http, body: dict) -> str:
    if not body.get("stream"):
        r = http.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        return r["choices"][0]["message"]["content"]
    parts = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    parts.append(c["delta"].get("content") or "")
    return "".join(parts)


def test_emoji_cjk_never_broken(http):
    """Short budgets end mid-character often (a CJK char or an emoji is 2-4 byte tokens): no chunk may hold
    U+FFFD, including the last one of a stream cut by max_tokens."""
    prompts = ["请用中文和表情符号回答：你好吗？🙂🎉", "Write three emojis 🎉🙂🚀 and the word 你好."]
    broken = []
    for i, content in enumerate(prompts * 2):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 5 + i,
            "temperature": 0.9,
            "seed": i,
            "n": 4,
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        if "\ufffd" in (c["delta"].get("content") or ""):
                            broken.append((content, c))
    assert not broken, broken[:3]
    ok(http)
