"""A decode step's GEMMs on CPU: MKL (`F.linear`) against oneDNN with packed weights (what both engines use).

SmolLM2-135M shapes by default: 30 layers of qkv / o / gate_up / down with distinct weights (so they stream
from memory as in the model), plus the LM head.

    python benchmark/kernels/bench_cpu_gemm.py --rows 1,8,32,2048
    python benchmark/kernels/bench_cpu_gemm.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import lmkit  # noqa: F401  (first: it sets OpenMP's spin policy, which torch reads when it loads)

# isort: split
import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,32,256,2048")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--qkv", type=int, default=960, help="(heads + 2 kv heads) * head_dim")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    h, i = args.hidden, args.intermediate
    shapes = [(args.qkv, h), (h, h), (2 * i, h), (h, i)]
    weights = [[(torch.randn(n, k) * 0.02).to(dtype) for n, k in shapes] for _ in range(args.layers)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in layer] for layer in weights]
    head = (torch.randn(args.vocab, h) * 0.02).to(dtype)
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head, 64)
    big = torch.ones(2**26)  # 256 MiB: what streaming from memory costs here, for the bandwidth-bound rows
    read_gb_s = big.nbytes / timed(big.sum, 3) / 1e6
    weight_mb = sum(w.nbytes for layer in weights for w in layer) / 1e6 + head.nbytes / 1e6
    print(f"{args.layers} layers, {args.dtype}, {torch.get_num_threads()} threads; {weight_mb:.0f} MB of weights")
    print(f"memory read bandwidth (sum of 256 MiB): {read_gb_s:.1f} GB/s")
    print("| rows | layers MKL (ms) | layers oneDNN packed (ms) | LM head MKL (ms) | LM head oneDNN packed (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for rows in map(int, args.rows.split(",")):
        xs = {k: torch.randn(rows, k).to(dtype) for k in (h, i)}
        reps = max(1, min(10, 64 // rows))

        def mkl(xs=xs):
            for layer in weights:
                for w in layer:
                    F.linear(xs[w.shape[1]], w)

        def onednn(xs=xs):
            for layer, lp in zip(weights, packed):
                for w, wp in zip(layer, lp):
                    torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], wp, None, "none", [], "")

        head_mkl = timed(lambda x=xs[h]: F.linear(x, head), reps)
        head_dnn = timed(lambda x=xs[h]: torch.ops.mkldnn._linear_pointwise(x, head_packed, None, "none", [], ""), reps)
        print(f"| {rows} | {timed(mkl, reps):.1f} | {timed(onednn, reps):.1f} | {head_mkl:.1f} | {head_dnn:.1f} |")


if __name__ == "__main__":
    main()
