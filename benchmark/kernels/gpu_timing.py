"""Timing shared by the GPU kernel benchmarks in this folder."""

from __future__ import annotations

import torch
import triton.testing


def median_us(run, ws: list[torch.Tensor]) -> float:
    """Median microseconds of run(w), w rotating over ws (copies of a weight, so no run is served from L2)."""
    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        run(ws[state["i"] % len(ws)])

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
