"""Fixtures for serving tests: an api_server over a fake engine, run by uvicorn in a thread."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeAsyncEngine  # noqa: E402
from serve_util import ThreadServer  # noqa: E402

from lmkit.serve.openai.api_server import ServerConfig, build_app  # noqa: E402


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
