"""Rotary micro-benchmark of the turbo CUDA kernel: q and k of a fused QKV projection (Llama-3-8B: 32 + 8 heads of
128, bf16), rotated in place. Rows on 16-byte boundaries take the 16-byte kernel; rows one element off take the
scalar one, which is what every row took before. GB/s counts q and k read and written once. The last two columns
time what the model runs between the QKV projection and attention: rotary and then write_kv (k and v into a paged
cache at random slots), against rotary_write_kv, which does both in one kernel.

    python benchmark/kernels/bench_turbo_cuda_rotary.py [--tokens 1024 8192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))
import cuda_harness  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    ops = cuda_harness.load()
    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    pos_cache = torch.randn(8192, d, device="cuda", dtype=torch.float32)
    head = f"{'tokens':>7} {'16-byte us':>11} {'GB/s':>6} {'scalar us':>10} {'GB/s':>6}"
    print(f"{head} {'+ write_kv us':>14} {'fused us':>9}")
    for t in args.tokens:
        moved = 2 * t * (hq + hk) * d * 2  # q and k, read and written
        pos = torch.randint(0, 8192, (t,), device="cuda")
        vec_us, scalar_us = (time_us(ops, t, hq, hk, d, pad, pos, pos_cache) for pad in (0, 1))
        two_us, fused_us = (time_with_cache_us(ops, t, hq, hk, d, pos, pos_cache, fused) for fused in (False, True))
        print(
            f"{t:>7} {vec_us:>11.1f} {moved / vec_us / 1e3:>6.0f} {scalar_us:>10.1f} {moved / scalar_us / 1e3:>6.0f}"
            f" {two_us:>14.1f} {fused_us:>9.1f}"
        )


def time_us(ops, t: int, hq: int, hk: int, d: int, pad: int, pos, pos_cache) -> float:
    """Median us of one rotary call; pad elements before each head row (1: rows off 16 bytes)."""
    qkv = torch.randn(t, hq + 2 * hk, d + pad, device="cuda", dtype=torch.bfloat16)[..., pad:]
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    return triton.testing.do_bench(lambda: ops.rotary(q, k, pos, pos_cache), return_mode="median") * 1e3


def time_with_cache_us(ops, t: int, hq: int, hk: int, d: int, pos, pos_cache, fused: bool) -> float:
    """Median us of rotary + write_kv (two kernels) or rotary_write_kv (one), block size 64."""
    qkv = torch.randn(t, hq + 2 * hk, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    num_blocks = max(64, 4 * t // 64)
    k_cache = torch.empty(num_blocks, 64, hk, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(num_blocks * 64, device="cuda")[:t]
    if fused:
        return (
            triton.testing.do_bench(
                lambda: ops.rotary_write_kv(q, k, v, pos, pos_cache, k_cache, v_cache, slots), return_mode="median"
            )
            * 1e3
        )

    def two():
        ops.rotary(q, k, pos, pos_cache)
        ops.write_kv(k, v, k_cache, v_cache, slots)

    return triton.testing.do_bench(two, return_mode="median") * 1e3


if __name__ == "__main__":
    main()
