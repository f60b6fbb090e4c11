"""turbo's CPU paged attention (decode) through the bindings: time per layer call.

python benchmark/kernels/bench_turbo_cpu_attention.py
"""

from __future__ import annotations

import argparse
import math
import time

import lmkit  # noqa: F401  (first: it sets OpenMP's spin policy, which torch reads when it loads)

# isort: split
import torch

from lmkit import _turbo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cases", default="1x130,8x130,32x130,32x1000", help="sequences x context length")
    args = p.parse_args()
    H, KVH, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    torch.manual_seed(0)
    print("| sequences | context | us per layer |\n|---:|---:|---:|")
    for case in args.cases.split(","):
        S, ctx = map(int, case.split("x"))
        nb = math.ceil(ctx / bs)
        kc, vc = torch.randn(S * nb, bs, KVH, D), torch.randn(S * nb, bs, KVH, D)
        tables = torch.randperm(S * nb).to(torch.int32).view(S, nb)
        q = torch.randn(S, (H + 2 * KVH) * D)[:, : H * D].view(S, H, D)  # a view of a fused qkv, as in the model
        cu = torch.arange(S + 1, dtype=torch.int32)
        lens = torch.full((S,), ctx, dtype=torch.int32)
        for _ in range(3):
            _turbo.paged_attention(q, kc, vc, tables, cu, lens, D**-0.5)
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            _turbo.paged_attention(q, kc, vc, tables, cu, lens, D**-0.5)
        print(f"| {S} | {ctx} | {(time.perf_counter() - t0) / reps * 1e6:.0f} |")


if __name__ == "__main__":
    main()
