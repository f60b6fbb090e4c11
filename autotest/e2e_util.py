"""End-to-end helpers: real api_server / proxy / gradio processes on 127.0.0.1, random free ports.

Every child is killed in a finally. The servers run SmolLM2-135M on the PyTorch engine; set
LMKIT_AUTOTEST_FAKE=1 to run the same tests over the fake engine of tests/serve (no model needed).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = os.environ.get("LMKIT_AUTOTEST_FAKE") == "1"
MODEL_NAME = "smollm2"
SESSION_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process serving HTTP on 127.0.0.1:port; `wait_ready` polls `path` (bounded)."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.cmd, self.port, self.log_path = cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_path: str = "/health", timeout_s: float = 180) -> Proc:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[:4]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.cmd[:4]} did not become ready in {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


def model_path() -> str:
    if FAKE:
        return "fake"
    if importlib.util.find_spec("lmkit.engines") is None:
        pytest.skip("lmkit.engines (build_async_engine) is not available yet")
    from lmkit.model.loader import resolve_model_path

    return str(resolve_model_path(None))


def api_server(tmp: Path, port: int | None = None, extra: list[str] = ()) -> Proc:
    port = port or free_port()
    launcher = [str(ROOT / "autotest" / "fake_server.py")] if FAKE else ["-m", "lmkit.serve.openai.api_server"]
    cmd = [
        sys.executable,
        *launcher,
        model_path(),
        "--backend",
        "pytorch",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--model-name",
        MODEL_NAME,
        "--session-len",
        str(SESSION_LEN),
        "--cache-max-entry-count",
        "0.25",
        "--device",
        "cpu",
        *extra,
    ]
    return Proc(cmd, port, tmp / f"api_server-{port}.log")


def proxy(tmp: Path, strategy: str, nodes: list[str] = (), extra: list[str] = ()) -> Proc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmkit.serve.proxy.proxy",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--strategy",
        strategy,
        "--health-interval",
        "1",
        *extra,
    ]
    if nodes:
        cmd += ["--nodes", *nodes]
    return Proc(cmd, port, tmp / f"proxy-{strategy}-{port}.log")


def read_metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
