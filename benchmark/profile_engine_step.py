"""Where an engine's time goes: a decode-heavy run under the torch profiler (GPU kernels vs host time).

    python benchmark/profile_engine_step.py --model benchmark/configs/llama-3-8b --load-format dummy \\
        --backend pytorch --batch 256 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from profile_generation import make_engine, run_engine  # noqa: E402

from lmkit.model.loader import resolve_model_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default="pytorch")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="the step's token budget")
    a = p.parse_args()
    args = argparse.Namespace(
        device="cuda",
        dtype="bfloat16",
        batch=[a.batch],
        io=[(a.input_len, a.output_len)],
        cache_max_entry_count=0.5,
        load_format=a.load_format,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )
    engine = make_engine(a.backend, resolve_model_path(a.model), args)
    run_engine(engine, a.backend, a.batch, a.input_len, 4, "cuda", 1)  # warm-up (graphs, kernels)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        cell = run_engine(engine, a.backend, a.batch, a.input_len, a.output_len, "cuda", 2)
    wall = time.perf_counter() - t0
    engine.shutdown()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(
        f"{a.backend}: batch {a.batch}, {a.input_len} in / {a.output_len} out: {cell.output_tok_s:.0f} tok/s, "
        f"decode {cell.decode_ms_per_token:.2f} ms/step; wall {wall:.2f} s, GPU kernels busy {gpu_us / 1e6:.2f} s "
        f"({100 * gpu_us / 1e6 / wall:.0f}% of wall)"
    )
    print(events.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
