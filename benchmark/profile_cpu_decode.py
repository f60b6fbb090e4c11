"""Where the PyTorch engine's CPU decode step spends its time: one decode forward, timed in the engine's own loop
thread (its OpenMP pool), compiled against eager, and with the GEMMs stubbed out (what is left is attention, the
element-wise ops and the Python around them).

The engine generates until the batch reaches `--context` tokens, then times that step's forward again and again
(re-running it rewrites the same keys and values in the same places). The variants alternate, and each reports
its best of `--rounds`, because this machine's timings drift by several percent from one second to the next.

    python benchmark/profile_cpu_decode.py --batch 8 --dtype bfloat16
    python benchmark/profile_cpu_decode.py --batch 32 --dtype bfloat16 --context 150
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lmkit  # noqa: E402, F401  (first: it sets OpenMP's spin policy, which torch reads when it loads)

# isort: split
import torch  # noqa: E402
from profile_generation import make_engine, run_engine  # noqa: E402

from lmkit.model.loader import resolve_model_path  # noqa: E402
from lmkit.pytorch_engine.models import linear  # noqa: E402


def _time_ms(fn, args, iters: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            fn(*args)
    return (time.perf_counter() - start) / iters * 1e3


def _no_gemms():
    """Stand-ins for the packed GEMMs that return zeros of the right shape."""
    return (
        lambda x, weight, bias: x.new_zeros(x.shape[0], weight.shape[0]),
        lambda x, residual, weight, bias: residual.clone(),
    )


def measure(model, forward, args: tuple, rounds: int, iters: int) -> dict[str, float]:
    paths = (model.decode_path, model.prefill_path)
    compiled, real_gemms = [p.compiled for p in paths], (linear._packed_linear, linear._packed_linear_add)
    variants = {
        "compiled": (compiled, real_gemms),
        "eager": ([None, None], real_gemms),
        "compiled, GEMMs stubbed": (compiled, _no_gemms()),
    }
    best = dict.fromkeys(variants, float("inf"))
    try:
        for _ in range(rounds):
            for name, (fns, gemms) in variants.items():
                for path, f in zip(paths, fns):
                    path.compiled = f
                linear._packed_linear, linear._packed_linear_add = gemms
                best[name] = min(best[name], _time_ms(forward, args, iters))
    finally:
        for path, f in zip(paths, compiled):
            path.compiled = f
        linear._packed_linear, linear._packed_linear_add = real_gemms
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--context", type=int, default=150, help="time the decode step at this many tokens")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=15)
    a = p.parse_args()
    if a.context <= a.input_len:
        p.error("--context must exceed --input-len")
    cfg = argparse.Namespace(
        device="cpu",
        dtype=a.dtype,
        batch=[a.batch],
        io=[(a.input_len, a.context - a.input_len + 8)],
        cache_max_entry_count=0.5,
        load_format="auto",
    )
    engine = make_engine("pytorch", resolve_model_path(a.model), cfg)
    model = engine.runner.model
    if not model.decode_path.on:
        sys.exit("the engine does not compile its decode step here (eager mode, or not on CPU)")
    forward, result, done = model.forward, {}, threading.Event()

    def forward_then_measure(*args):
        out = forward(*args)
        meta = args[2]
        decode_only = meta.num_decode == args[0].shape[0] and meta.decode_window is not None
        if not done.is_set() and decode_only and int(args[1][0]) >= a.context:
            result.update(measure(model, forward, args, a.rounds, a.iters))
            done.set()
        return out

    model.forward = forward_then_measure
    run_engine(engine, "pytorch", a.batch, a.input_len, a.context - a.input_len + 8, "cpu", 1)
    engine.shutdown()
    if not done.is_set():
        sys.exit("no decode-only step reached --context")
    print(f"\nPyTorch engine, CPU, {a.dtype}, batch {a.batch}, {a.context} tokens of context: one decode forward")
    print("| variant | ms |\n|---|---:|")
    for name, ms in result.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
