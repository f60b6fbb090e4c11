"""Timing and shapes shared by the GPU kernel benchmarks in this folder."""

from __future__ import annotations

import torch
import triton.testing

# Llama-3-8B's linear layers as [out, in]: what a decode step multiplies, 32 times each, then the LM head once.
LLAMA3_8B_LINEARS = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def median_us(run, ws: list[torch.Tensor]) -> float:
    """Median microseconds of run(w), w rotating over ws (copies of a weight, so no run is served from L2)."""
    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        run(ws[state["i"] % len(ws)])

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
