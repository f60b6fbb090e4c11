"""The scripting client and the gradio page's backends, over the fake-engine server (no browser here)."""

from __future__ import annotations

from lmkit.serve.client import APIClient
from lmkit.serve.gradio.app import APIBackend, _text, build_demo


def test_client_chat_and_completions(fake_server):
    client = APIClient(fake_server.url, api_key="sk-test")
    assert client.models() == ["fake-model"] and client.model == "fake-model"
    full = client.chat("hi", max_tokens=8, temperature=0)
    assert full and "".join(client.chat_stream("hi", max_tokens=8, temperature=0)) == full
    text = client.complete("hello", max_tokens=5, temperature=0)
    assert "".join(client.complete_stream("hello", max_tokens=5, temperature=0)) == text


def test_client_closing_a_stream_aborts(fake_server):
    engine = fake_server.engine
    client = APIClient(fake_server.url + "/v1", api_key="sk-test", model="fake-model")
    stream = client.chat_stream("hi", max_tokens=200)
    next(stream)
    stream.close()
    import time

    deadline = time.monotonic() + 10
    while engine.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.live


def test_gradio_backend_and_demo(fake_server):
    backend = APIBackend(fake_server.url, api_key="sk-test")
    pieces = list(backend.stream([{"role": "user", "content": "hi"}], 0.0, 1.0, 6))
    assert "".join(pieces)
    demo = build_demo(backend)
    assert demo is not None
    assert _text([{"type": "text", "text": "a"}, "b"]) == "ab" and _text(None) == ""
