"""Generation speed over a batch × input × output grid: lmkit's engines and HF transformers, same weights, one run.

Each cell submits `batch` requests of `input_len` random token ids, greedy, exactly `output_len` new tokens
(EOS ignored), and reports time to first token, decode time per output token, and output throughput.

    python benchmark/profile_generation.py --backends pytorch,turbo,hf --batch 1,8,32 --io 64x128
    python benchmark/profile_generation.py --dtype bfloat16 --hf-dtype float32,bfloat16 --batch 1,8,32 --io 64x128
    python benchmark/profile_generation.py --device cuda --dtype bfloat16 --batch 1,16,64,256 \\
        --io 128x128,128x2048,2048x128 --markdown docs/results.md

`--repeat N` runs every backend N times over, in alternation (engine cells, then HF cells, then again), and ends
with the median of each cell and of each engine's ratio to HF, each ratio taken within one round: on a shared
virtual machine the speed of the whole machine drifts by 10-30% over minutes, which a single pass cannot tell
apart from a difference between backends. Each round starts its engines afresh and runs HF in a thread of its
own, so that no backend's OpenMP thread pool outlives it (with a second pool alive, libgomp stops spinning and
every backend slows down).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmkit  # noqa: E402, F401  (first: it sets OpenMP's spin policy, which torch reads when it loads)

# isort: split
import torch  # noqa: E402

from lmkit.cpu_threads import in_passing_thread  # noqa: E402
from lmkit.frontend.protocol import EngineRequest, SamplingParams  # noqa: E402
from lmkit.model.loader import resolve_model_path  # noqa: E402


@dataclass
class Cell:
    backend: str
    batch: int
    input_len: int
    output_len: int
    ttft_ms: float
    decode_ms_per_token: float
    output_tok_s: float
    peak_mem_gib: float


def _peak_mem_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, input_len), generator=g).tolist()


def run_engine(engine, backend: str, batch: int, input_len: int, output_len: int, device: str, seed: int) -> Cell:
    prompts = _prompts(batch, input_len, engine.vocab_size, seed)
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"{backend}-{seed}-{i}", p, params))
    while len(last) < batch:
        for out in engine.get_outputs(timeout=1.0):
            now = time.perf_counter()
            if out.error:
                raise RuntimeError(out.error)
            first.setdefault(out.request_id, now)
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finished:
                last[out.request_id] = now
    total = max(last.values()) - t0
    assert all(c == output_len for c in counts.values()), f"{backend}: wrong token counts {set(counts.values())}"
    ttft = statistics.mean(first.values()) - t0
    decode = statistics.mean((last[r] - first[r]) / max(output_len - 1, 1) for r in last)
    return Cell(
        backend,
        batch,
        input_len,
        output_len,
        ttft * 1e3,
        decode * 1e3,
        batch * output_len / total,
        _peak_mem_gib(device),
    )


def run_hf(model, batch: int, input_len: int, output_len: int, device: str, seed: int) -> Cell:
    ids = torch.tensor(_prompts(batch, input_len, model.config.vocab_size, seed), device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
    total = time.perf_counter() - t0
    assert out.shape[1] == input_len + output_len
    decode = (total - ttft) / max(output_len - 1, 1)
    return Cell(
        "hf", batch, input_len, output_len, ttft * 1e3, decode * 1e3, batch * output_len / total, _peak_mem_gib(device)
    )


def make_engine(backend: str, model_path, args):
    from lmkit.engines import create_engine
    from lmkit.messages import PytorchEngineConfig, TurboEngineConfig

    common = dict(
        device=args.device,
        dtype=args.dtype,
        max_batch_size=max(args.batch),
        session_len=max(i + o for i, o in args.io) + 8,
        load_format=args.load_format,
    )
    if getattr(args, "max_num_batched_tokens", None):  # the step's token budget (profile_throughput's flag)
        common["max_num_batched_tokens"] = args.max_num_batched_tokens
    if backend == "turbo":
        cfg = TurboEngineConfig(**common, cache_max_entry_count=args.cache_max_entry_count)
    else:
        cfg = PytorchEngineConfig(
            **common,
            cache_max_entry_count=args.cache_max_entry_count,
            prefill_interval=getattr(args, "prefill_interval", 1),  # profile_throughput's flag
        )
    engine, _ = create_engine(model_path, backend, cfg)
    return engine


def load_hf(model_path, args, dtype_name: str | None = None):
    from transformers import AutoModelForCausalLM

    dtype_name = dtype_name or args.dtype
    dtype = {"auto": torch.float32 if args.device == "cpu" else torch.bfloat16}.get(dtype_name) or getattr(
        torch, dtype_name
    )
    if args.load_format == "dummy":  # random init in the checkpoint's shapes: speed does not depend on values
        from transformers import AutoConfig

        with torch.device(args.device):
            config = AutoConfig.from_pretrained(str(model_path))
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(args.device).eval()


def _seconds_per_call(fn, reps: int = 10) -> float:
    """GPU time of fn(), after 3 warm-up calls, by CUDA events over `reps` calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth() -> float:
    """The device's measured device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _seconds_per_call(lambda: dst.copy_(src))


def gemm_rate(dtype_name: str, n: int = 8192) -> float:
    """The device's measured matrix rate: FLOP/s of an n x n by n x n torch.mm in this dtype."""
    a = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype_name))
    b = torch.randn_like(a)
    return 2 * n**3 / _seconds_per_call(lambda: torch.mm(a, b))


def roofline(model_path, dtype_name: str) -> str:
    """The device's measured copy bandwidth and the batch-1 decode floor: every weight read once per token."""
    from lmkit.model.dummy import weight_shapes
    from lmkit.model.loader import load_spec

    spec = load_spec(model_path)
    elem = torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()
    shapes = weight_shapes(spec)
    shapes.pop("model.embed_tokens.weight")  # a lookup reads a row, not the table
    weight_bytes = sum(torch.Size(s).numel() for s in shapes.values()) * elem
    bandwidth = copy_bandwidth()
    return (
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per token {weight_bytes / 1e9:.2f} GB; "
        f"batch-1 roofline {weight_bytes / bandwidth * 1e3:.2f} ms per token"
    )


def free_device_memory() -> None:
    """Let the next backend have the GPU memory of the one just measured."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(cells: list[Cell]) -> str:
    head = "| backend | batch | in | out | TTFT (ms) | decode (ms/token) | output tok/s | peak mem (GiB) |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        rows.append(
            f"| {c.backend} | {c.batch} | {c.input_len} | {c.output_len} | {c.ttft_ms:.1f} | "
            f"{c.decode_ms_per_token:.2f} | {c.output_tok_s:.1f} | {c.peak_mem_gib:.2f} |"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backends", default="pytorch,turbo,hf", help="comma list of pytorch, turbo, hf")
    p.add_argument("--batch", default="1,8,32", help="comma list of batch sizes")
    p.add_argument("--io", default="64x128", help="comma list of INPUTxOUTPUT lengths")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--hf-dtype",
        default=None,
        help="comma list of dtypes to run HF transformers in (default: --dtype), e.g. float32,bfloat16",
    )
    p.add_argument("--cache-max-entry-count", type=float, default=0.5)
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights (needs config.json only)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--markdown", default=None, help="append the table to this file")
    p.add_argument("--repeat", type=int, default=1, help="run every backend this many times, in alternation")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.io = [tuple(int(x) for x in s.split("x")) for s in args.io.split(",")]
    args.backends = args.backends.split(",")
    args.hf_dtype = (args.hf_dtype or args.dtype).split(",")
    return args


def run_backend(backend: str, dtype_name: str, label: str, model_path, args) -> list[Cell]:
    """Every (io, batch) cell of one backend, from loading it to shutting it down."""
    cells = []
    runner = load_hf(model_path, args, dtype_name) if backend == "hf" else make_engine(backend, model_path, args)
    for input_len, output_len in args.io:
        for batch in args.batch:
            seed = batch * 7919 + input_len
            if backend == "hf":
                run_hf(runner, 1, 8, 4, args.device, seed)  # warm-up
                cell = run_hf(runner, batch, input_len, output_len, args.device, seed)
            else:
                run_engine(runner, backend, batch, input_len, 4, args.device, seed + 1)  # warm-up, same shapes
                cell = run_engine(runner, backend, batch, input_len, output_len, args.device, seed)
            cell.backend = label
            print(format_table([cell]).splitlines()[-1], flush=True)
            cells.append(cell)
    if backend != "hf":
        runner.shutdown()
    del runner
    free_device_memory()
    return cells


def summary(rounds: list[list[Cell]]) -> str:
    """Median output tok/s of each cell over the rounds, and of each engine's ratio to each HF run, per round."""
    key = lambda c: (c.batch, c.input_len, c.output_len)  # noqa: E731
    labels = list(dict.fromkeys(c.backend for c in rounds[0]))
    hf_labels = [b for b in labels if b.startswith("hf")]
    head = "| backend | batch | in | out | output tok/s, median (min-max) |" + "".join(
        f" vs {h}, median (min-max) |" for h in hf_labels
    )
    rows = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(hf_labels)]

    def spread(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    for label in labels:
        for k in dict.fromkeys(key(c) for c in rounds[0] if c.backend == label):
            per_round = [{c.backend: c for c in r if key(c) == k} for r in rounds]
            tok_s = spread([r[label].output_tok_s for r in per_round], ".1f")
            row = f"| {label} | {k[0]} | {k[1]} | {k[2]} | {tok_s} |"
            for h in hf_labels:
                ratios = [r[label].output_tok_s / r[h].output_tok_s for r in per_round]
                row += " |" if label.startswith("hf") else f" {spread(ratios, '.2f')}x |"
            rows.append(row)
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model_path(args.model)
    if args.device == "cuda":
        dtype_name = "bfloat16" if args.dtype == "auto" else args.dtype
        print(f"{torch.cuda.get_device_name()}: {roofline(model_path, dtype_name)}", flush=True)
    # HF once per asked dtype, labelled with it when it differs from the engines'
    runs = [(b, d) for b in args.backends for d in (args.hf_dtype if b == "hf" else [args.dtype])]
    rounds: list[list[Cell]] = []
    for r in range(args.repeat):
        if args.repeat > 1:
            print(f"round {r + 1} of {args.repeat}", flush=True)
        cells: list[Cell] = []
        for backend, dtype_name in runs:
            label = f"hf ({dtype_name})" if backend == "hf" and args.hf_dtype != [args.dtype] else backend
            if backend == "hf" and args.device == "cpu":
                cells += in_passing_thread(run_backend, backend, dtype_name, label, model_path, args)
            else:
                cells += run_backend(backend, dtype_name, label, model_path, args)
        rounds.append(cells)
    tables = [format_table(cells) for cells in rounds]
    if args.repeat > 1:
        tables = [f"round {i + 1}:\n\n{t}" for i, t in enumerate(tables)]
        tables.append(f"medians over {args.repeat} rounds:\n\n{summary(rounds)}")
    for t in tables:
        print("\n" + t)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
