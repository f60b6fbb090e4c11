"""turbo's decode GEMV (src/turbo/kernels/cuda/gemv.cu) against cuBLAS (torch.mm) on Llama-3-8B's shapes, bf16.

    python benchmark/kernels/bench_turbo_gemv.py [--unroll 4,8,16] [--rows 1,2,4]

Builds gemv.cu alone once per TURBO_GEMV_UNROLL value asked for, and prints, per (rows, layer), the median time
of cuBLAS and of each variant with the bandwidth reached on the weight (bytes of w over time). Weights rotate
over copies totalling ~2 GB, so no run is served from the 50 MB L2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from gpu_timing import LLAMA3_8B_LINEARS, median_us
from torch.utils.cpp_extension import load_inline

REPO = Path(__file__).resolve().parents[2]
SHAPES = LLAMA3_8B_LINEARS
GLUE = """
#include "turbo/kernels/cuda/cuda_kernels.h"
void gemv(at::Tensor y, at::Tensor x, at::Tensor w) { turbo::cuda::gemv(y, x, w, at::Tensor()); }
"""


def build(unroll: int):
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    src = (REPO / "src/turbo/kernels/cuda/gemv.cu").read_text()
    return load_inline(
        name=f"turbo_gemv_u{unroll}",
        cpp_sources=[GLUE],
        cuda_sources=[src],
        functions=["gemv"],
        extra_include_paths=[str(REPO / "src")],
        extra_cuda_cflags=["-O3", "-std=c++17", f"-DTURBO_GEMV_UNROLL={unroll}"],
        build_directory=str(Path("/tmp") / f"turbo_gemv_u{unroll}"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unroll", default="4")
    p.add_argument("--rows", default="1,2,4")
    a = p.parse_args()
    unrolls = [int(u) for u in a.unroll.split(",")]
    for u in unrolls:
        Path(f"/tmp/turbo_gemv_u{u}").mkdir(exist_ok=True)
    mods = {u: build(u) for u in unrolls}
    head = " | ".join(f"gemv u{u} (us) | GB/s" for u in unrolls)
    print(f"| rows | layer | N x K | cuBLAS (us) | GB/s | {head} |\n|---:|---|---|" + "---:|" * (2 + 2 * len(unrolls)))
    totals = {}
    for rows in [int(r) for r in a.rows.split(",")]:
        step = [0.0] * (1 + len(unrolls))
        for name, (n, k) in SHAPES.items():
            ws = [
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, int(2e9 // (n * k * 2))))
            ]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            times = [median_us(lambda w, x=x: torch.mm(x, w.T), ws)]
            times += [median_us(lambda w, x=x, y=y, m=mods[u]: m.gemv(y, x, w), ws) for u in unrolls]
            per_step = 1 if name == "lm_head" else 32
            step = [s + t * per_step for s, t in zip(step, times)]
            cells = " | ".join(f"{t:.1f} | {n * k * 2 / t / 1e3:.0f}" for t in times)
            print(f"| {rows} | {name} | {n} x {k} | {cells} |")
            del ws
        totals[rows] = step
    for rows, step in totals.items():
        gv = ", ".join(f"gemv u{u} {t / 1e3:.2f} ms" for u, t in zip(unrolls, step[1:]))
        print(f"rows {rows}: a decode step's GEMMs (32 layers + lm_head): cuBLAS {step[0] / 1e3:.2f} ms, {gv}")


if __name__ == "__main__":
    main()
