"""lmkit's CPU threading set-up: loading in a passing thread, and the OpenMP spin default set on import."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from lmkit.cpu_threads import in_passing_thread


def test_in_passing_thread_returns_from_another_thread_that_then_exits():
    seen = {}

    def work(a, b=0):
        seen["thread"] = threading.current_thread()
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_in_passing_thread_reraises_in_the_caller():
    def fail():
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        in_passing_thread(fail)


def _env_after_import(env: dict[str, str]) -> dict[str, str | None]:
    code = "import os, lmkit; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    spin, policy = out.stdout.split()
    return {"GOMP_SPINCOUNT": None if spin == "None" else spin, "OMP_WAIT_POLICY": None if policy == "None" else policy}


def test_import_sets_a_short_openmp_spin_unless_the_user_chose():
    assert _env_after_import({}) == {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None}
    assert _env_after_import({"OMP_WAIT_POLICY": "PASSIVE"}) == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"}
    assert _env_after_import({"GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"
