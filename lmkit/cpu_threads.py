"""Set engines up in a short-lived thread, so the caller's thread keeps no OpenMP pool.

Every thread that runs a parallel ATen op gets an OpenMP (libgomp) pool of its own, kept until the thread
exits. Once all pools together hold more threads than there are CPUs, libgomp stops spinning between parallel
regions and puts idle workers to sleep, so each GEMM of the engine's loop thread then pays for a wake-up. On
this project's 2-core machine the PyTorch engine's decode step (SmolLM2-135M, bf16, batch 8) took 38 ms after
the caller's thread had loaded the weights, against 26 ms for the same forward with no second pool.
Loading in a thread that then exits takes its pool with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs), run in a new thread that exits when it returns; its exception is re-raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=target, name="lmkit-setup", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
