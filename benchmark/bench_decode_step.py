"""One turbo decode step replayed from its CUDA graph: one batch against two nano-batches (each half's attention on
a second stream, beside the other half's GEMMs), over batch sizes and context lengths.

    python benchmark/bench_decode_step.py --model benchmark/configs/llama-3-8b --load-format dummy \\
        --batch 256 512 1024 --context 256 512

Every sequence sits at the same context; the block tables walk through one shared pool of blocks far larger than
L2, so the attention reads its keys and values from memory as in a real run. Prints the median step time of each
mode, and the time that reading the weights and the KV cache once takes at the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmkit import _turbo  # noqa: E402
from lmkit.model.loader import load_model, resolve_model_path  # noqa: E402
from lmkit.turbo.engine import model_config  # noqa: E402
from lmkit.turbo.weights import turbo_weights  # noqa: E402

BLOCK = 16


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of 20."""
    a, b = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def step_ms(model, batch: int, context: int, num_blocks: int, max_bs: int, width: int, reps: int) -> float:
    """Median ms of forward_graph over a decode batch at `context` tokens each (graph captured on first use)."""
    per_seq = (context + BLOCK - 1) // BLOCK
    table = (torch.arange(batch * per_seq, dtype=torch.int64) % num_blocks).view(batch, per_seq)
    last = table[:, (context - 1) // BLOCK] * BLOCK + (context - 1) % BLOCK
    inputs = (
        torch.randint(3, 1000, (batch,), device="cuda"),
        torch.full((batch,), context - 1, dtype=torch.int64, device="cuda"),
        last.cuda(),
        table.to(torch.int32).cuda(),
        torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        torch.arange(batch, device="cuda"),
    )
    for _ in range(3):
        model.forward_graph(*inputs, max_bs, width)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.forward_graph(*inputs, max_bs, width)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmark/configs/llama-3-8b")
    p.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--context", type=int, nargs="+", default=[256, 512])
    p.add_argument("--kv-gib", type=float, default=24.0, help="KV pool of each model")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--same-priority",
        action="store_true",
        help="also nano-batches with the side stream at the current one's priority (TURBO_NANO_PRIORITY=0)",
    )
    p.add_argument(
        "--sm-carveout",
        type=int,
        nargs="*",
        default=[],
        help="also nano-batches whose GEMMs leave this many SMs to the attention (TURBO_NANO_SM_CARVEOUT)",
    )
    a = p.parse_args()  # fmt: skip
    loaded = load_model(resolve_model_path(a.model), dtype=torch.bfloat16, load_format=a.load_format, device="cuda")
    spec = loaded.spec
    weights = turbo_weights(spec, loaded.weights, max(a.context) + 1, "cuda", torch.bfloat16)
    weight_bytes = sum(w.numel() * w.element_size() for k, w in weights.items() if k != "embed")
    kv_token_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    num_blocks = int(a.kv_gib * 2**30 // (kv_token_bytes * BLOCK))
    max_bs, width = max(a.batch), (max(a.context) + BLOCK - 1) // BLOCK
    # mode -> (nano_batch_rows, environment read when a bucket's graph is captured)
    modes = {"one batch": (0, {}), "two nano-batches": (2, {})}
    if a.same_priority:
        modes["same priority"] = (2, {"TURBO_NANO_PRIORITY": "0"})
    for c in a.sm_carveout:
        modes[f"carveout {c}"] = (2, {"TURBO_NANO_SM_CARVEOUT": str(c)})
    models = {
        name: _turbo.Model(model_config(spec), weights, num_blocks, BLOCK, nano_batch_rows=rows)
        for name, (rows, _) in modes.items()
    }
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; KV pool {num_blocks} blocks")
    extra = list(modes)[2:]
    print("| batch | context | one batch (ms) | two nano-batches (ms) | change | weights + KV at copy bandwidth (ms) |"
          + "".join(f" {name} (ms) |" for name in extra))  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra))
    for context in a.context:
        for batch in a.batch:
            t = {}
            for name, m in models.items():
                env = modes[name][1]
                os.environ.update(env)
                t[name] = step_ms(m, batch, context, num_blocks, max_bs, width, a.reps)
                for k in env:
                    del os.environ[k]
            one, two = t["one batch"], t["two nano-batches"]
            floor = (weight_bytes + batch * context * kv_token_bytes) / bw * 1e3
            cells = "".join(f" {t[name]:.2f} |" for name in extra)
            print(
                f"| {batch} | {context} | {one:.2f} | {two:.2f} | {100 * (two / one - 1):+.1f}% | {floor:.2f} |{cells}"
            )


if __name__ == "__main__":
    main()
