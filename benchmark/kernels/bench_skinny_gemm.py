"""turbo's tensor-core skinny GEMM (src/turbo/kernels/cuda/skinny_gemm.cu) against cuBLAS (torch.mm(x, w.T), as
turbo calls it) on Llama-3-8B's shapes, bf16, at decode batch sizes.

    python benchmark/kernels/bench_skinny_gemm.py [--rows 1,8,16,32,64] [--splits 0]

Prints, per (rows, layer), the median time of each and the bandwidth reached on the weight (its bytes over the
time), then the 32 layers plus the LM head of one decode step. Weights rotate over copies totalling ~2 GB, so no
run is served from the 50 MB L2. --splits 0 takes the kernel's own split count (skinny_gemm_splits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from gpu_timing import LLAMA3_8B_LINEARS, median_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))
import cuda_harness  # noqa: E402

SHAPES = LLAMA3_8B_LINEARS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--splits", type=int, default=0, help="k splits (0: the kernel's heuristic)")
    a = p.parse_args()
    ops = cuda_harness.load()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| rows | layer | splits | cuBLAS (us) | TB/s | skinny (us) | TB/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in a.rows.split(",")]:
        step = [0.0, 0.0]
        for name, (n, k) in SHAPES.items():
            copies = max(2, int(2e9 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            splits = a.splits or ops.skinny_gemm_splits(rows, n, k, sms)
            ops.skinny_gemm(y, x, ws[0], None, splits)
            ref = torch.mm(x, ws[0].T)
            err = (y.float() - ref.float()).norm() / ref.float().norm()
            assert err < 1e-2, (name, rows, err)
            t_mm = median_us(lambda w, x=x: torch.mm(x, w.T), ws)
            t_sk = median_us(lambda w, x=x, y=y, s=splits: ops.skinny_gemm(y, x, w, None, s), ws)
            times = 1 if name == "lm_head" else 32
            step = [step[0] + times * t_mm, step[1] + times * t_sk]
            tb_s = n * k * 2 / 1e6  # weight bytes / 1e6: over microseconds, TB/s
            print(f"| {rows} | {name} | {splits} | {t_mm:.1f} | {tb_s / t_mm:.2f} | {t_sk:.1f} | "
                  f"{tb_s / t_sk:.2f} |")  # fmt: skip
            del ws
            torch.cuda.empty_cache()
        print(f"rows {rows}: one step (32 layers + LM head): cuBLAS {step[0] / 1e3:.2f} ms, "
              f"skinny {step[1] / 1e3:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
