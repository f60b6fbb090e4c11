"""cuBLAS at decode batch sizes on Llama-3-8B's layer shapes, bf16: torch.mm(x, w.T) as turbo calls it, against
split-K through a strided batched GEMM plus a sum, and against a transposed ([in, out]) weight.

    python benchmark/kernels/bench_decode_gemm.py [--rows 64,128,256,512]

Weights rotate over copies totalling ~2 GB, so no run is served from L2. Prints the median time and TFLOP/s.
"""

from __future__ import annotations

import argparse

import torch
from gpu_timing import LLAMA3_8B_LINEARS, median_us

SHAPES = {k: v for k, v in LLAMA3_8B_LINEARS.items() if k != "lm_head"}  # the 32 layers


def split_k(x: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    xs = x.view(m, s, k // s).transpose(0, 1)  # [s, m, k/s]
    ws = w.view(n, s, k // s).permute(1, 2, 0)  # [s, k/s, n]
    return torch.bmm(xs, ws).sum(0, dtype=torch.float32).to(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="64,128,256,512")
    a = p.parse_args()
    print("| rows | layer | mm (us) | TFLOP/s | split-K 2 | split-K 4 | mm, w [in, out] |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in a.rows.split(",")]:
        step = [0.0] * 4
        for name, (n, k) in SHAPES.items():
            copies = max(2, int(2e9 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.mm(x, ws[0].T)
            err = (split_k(x, ws[0], 4).float() - ref.float()).norm() / ref.float().norm()
            assert err < 1e-2, err
            t = [
                median_us(lambda w, x=x: torch.mm(x, w.T), ws),
                median_us(lambda w, x=x: split_k(x, w, 2), ws),
                median_us(lambda w, x=x: split_k(x, w, 4), ws),
            ]
            wts = [w.T.contiguous() for w in ws]
            del ws
            t.append(median_us(lambda w, x=x: torch.mm(x, w), wts))
            del wts
            step = [s + 32 * v for s, v in zip(step, t)]
            tf = 2 * rows * n * k / t[0] / 1e6
            print(f"| {rows} | {name} | {t[0]:.1f} | {tf:.0f} | {t[1]:.1f} | {t[2]:.1f} | {t[3]:.1f} |")
        print(f"rows {rows}: 32 layers: mm {step[0] / 1e3:.2f} ms, split-K 2 {step[1] / 1e3:.2f}, "
              f"split-K 4 {step[2] / 1e3:.2f}, [in, out] {step[3] / 1e3:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
