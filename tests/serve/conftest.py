"""Fixtures for serving tests: an api_server over a fake engine, run by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeAsyncEngine  # noqa: E402

from lmkit.serve.openai.api_server import ServerConfig, build_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread, with its own event loop."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_engine() -> FakeAsyncEngine:
    return FakeAsyncEngine(session_len=256)


@pytest.fixture(scope="module")
def fake_server(fake_engine):
    app = build_app(fake_engine, "fake-model", ServerConfig(api_keys=["sk-test"], max_body_bytes=1 << 20))
    with ThreadServer(app) as server:
        server.engine = fake_engine
        yield server


@pytest.fixture()
def client(fake_server):
    with httpx.Client(base_url=fake_server.url, headers={"Authorization": "Bearer sk-test"}, timeout=30) as c:
        yield c
