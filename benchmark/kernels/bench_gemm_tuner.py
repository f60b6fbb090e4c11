"""cuBLASLt's heuristic candidates against turbo's default GEMM path, on Llama-3-8B's shapes, bf16: what the GEMM
tuner (TURBO_GEMM_TUNE=1) can gain at each row count.

    python benchmark/kernels/bench_gemm_tuner.py [--rows 64,256,512,1024] [--candidates 12]

For each shape and row count, one pass of y = x w^T over ~2 GB of weight copies (no pass is served from L2), timed
with CUDA events by the extension (lmkit._turbo.time_gemm_candidates): the default path (kernels::linear, i.e.
cuBLAS as ATen calls it), cuBLASLt's first candidate, and the fastest candidate. The step line sums a decode
step's GEMMs: 32 layers of each shape and the LM head once.
"""

from __future__ import annotations

import argparse

import torch
from gpu_timing import LLAMA3_8B_LINEARS

from lmkit import _turbo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="64,128,256,384,512,640,768,896,1024,8192")
    p.add_argument("--candidates", type=int, default=12)
    a = p.parse_args()
    print("| rows | layer | default (us) | TFLOP/s | Lt first | Lt best (index) | best / default |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in a.rows.split(",")]:
        step_default = step_best = 0.0
        for name, (n, k) in LLAMA3_8B_LINEARS.items():
            copies = max(1, min(32, int(2e9 // (n * k * 2))))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ms = _turbo.time_gemm_candidates(x, ws, a.candidates)
            del ws
            per = [1e3 * t / copies for t in ms]  # us per GEMM
            best = min(range(1, len(per)), key=per.__getitem__) if len(per) > 1 else 0
            reps = 1 if name == "lm_head" else 32
            step_default += reps * per[0]
            step_best += reps * min(per[0], per[best])
            tf = 2 * rows * n * k / per[0] / 1e6
            first = f"{per[1]:.1f}" if len(per) > 1 else "-"
            print(f"| {rows} | {name} | {per[0]:.1f} | {tf:.0f} | {first} | {per[best]:.1f} ({best - 1}) "
                  f"| {per[best] / per[0]:.3f} |")  # fmt: skip
        print(f"rows {rows}: one step's GEMMs: default {step_default / 1e3:.2f} ms, tuned {step_best / 1e3:.2f} ms "
              f"({step_best / step_default:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
