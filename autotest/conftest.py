"""End-to-end fixtures: a proxy and three api_server processes shared by the whole session (see e2e_util)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_util import Proc, api_server, proxy  # noqa: E402


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


@pytest.fixture(scope="session")
def main_proxy(logs_dir):
    """The proxy the shared api_servers register with (--proxy-url)."""
    p = proxy(logs_dir, "min_expected_latency")
    try:
        yield p.start()
    finally:
        p.stop()


@pytest.fixture(scope="session")
def servers(logs_dir, main_proxy):
    """Three api_servers, registered with `main_proxy`; servers[0] also serves the single-server tests."""
    procs = [api_server(logs_dir, extra=["--proxy-url", main_proxy.url]) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def server(servers) -> Proc:
    return servers[0]
