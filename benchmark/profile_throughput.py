"""Offline throughput: all requests submitted at once; lmkit's engines and HF transformers on the same weights.

ShareGPT mode (vLLM's convention): prompt = first human turn, output length = the first answer's length in
tokens, EOS ignored so every request generates exactly that many tokens. Synthetic mode: fixed lengths.

    python benchmark/profile_throughput.py --dataset sharegpt --num-prompts 200 --backends pytorch,turbo,hf
    python benchmark/profile_throughput.py --dataset synthetic --input-len 128 --output-len 128 --num-prompts 1024
    python benchmark/profile_throughput.py --backends pytorch --cprofile 30   # where the engine thread's time goes
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_data import BenchRequest, load_tokenized, sample_sharegpt, synthetic  # noqa: E402
from profile_generation import copy_bandwidth, free_device_memory, gemm_rate, load_hf, make_engine  # noqa: E402
from throughput_floor import floor, model_costs  # noqa: E402

from lmkit.frontend.protocol import EngineRequest, SamplingParams  # noqa: E402
from lmkit.model.loader import load_spec, resolve_model_path  # noqa: E402


def _token_ids(tokenizer, reqs: list[BenchRequest]) -> list[list[int]]:
    return [r.prompt if isinstance(r.prompt, list) else tokenizer.encode(r.prompt) for r in reqs]


def run_engine(engine, prompts: list[list[int]], reqs: list[BenchRequest]) -> dict:
    t0 = time.perf_counter()
    for i, (ids, r) in enumerate(zip(prompts, reqs)):
        params = SamplingParams(max_new_tokens=r.output_len, temperature=0.0, ignore_eos=True)
        engine.add_request(EngineRequest(f"tp-{i}", ids, params))
    done, generated = 0, 0
    while done < len(reqs):
        for out in engine.get_outputs(timeout=1.0):
            if out.error:
                raise RuntimeError(out.error)
            generated += len(out.new_token_ids)
            done += out.finished
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tokens": generated, "requests": len(reqs)}


def warm_up(engine, prompts: list[list[int]], n: int) -> None:
    """Run n requests shaped like the first n prompts (random tokens: nothing for the prefix cache to reuse), so
    that kernels compiled on first use of a shape (Triton) are compiled before the timed run."""
    g = torch.Generator().manual_seed(1)
    fakes = [torch.randint(0, engine.vocab_size, (len(p),), generator=g).tolist() for p in prompts[:n]]
    run_engine(engine, fakes, [BenchRequest(None, 0, 8)] * len(fakes))


def profile_loop_thread(engine) -> cProfile.Profile:
    """cProfile every step of the PyTorch engine from now on (the profiler itself roughly doubles Python time)."""
    profiler, step = cProfile.Profile(), engine._step

    def profiled_step():
        profiler.enable()
        try:
            return step()
        finally:
            profiler.disable()

    engine._step = profiled_step
    return profiler


def run_hf(model, prompts: list[list[int]], reqs: list[BenchRequest], batch_size: int, device: str) -> dict:
    """Static batches (left-padded), each generating its longest output; only real tokens are counted."""
    t0 = time.perf_counter()
    generated = 0
    for start in range(0, len(prompts), batch_size):
        chunk, rs = prompts[start : start + batch_size], reqs[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        n = max(r.output_len for r in rs)
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        generated += sum(r.output_len for r in rs)
    return {"elapsed_s": time.perf_counter() - t0, "output_tokens": generated, "requests": len(reqs)}


def floor_report(
    model_path, dtype_name: str, reqs, max_batch: int, bandwidth: float, rate: float, tok_s: dict[str, float]
) -> str:
    """The floor under this run (benchmark/throughput_floor.py) at the measured copy bandwidth and matrix rate,
    and each engine's share of its rate."""
    elem = torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()
    f = floor([r.prompt_len for r in reqs], [r.output_len for r in reqs], model_costs(model_path, elem), bandwidth,
              rate, max_batch)  # fmt: skip
    shares = ", ".join(f"{b} at {t / f.output_tok_s:.0%} of it" for b, t in tok_s.items())
    return (
        f"floor at the measured {bandwidth / 1e12:.2f} TB/s copy bandwidth and {rate / 1e12:.0f} TFLOP/s "
        f"({dtype_name} torch.mm, 8192^3), max batch {max_batch}: prefill {f.prefill_s:.2f} s + decode "
        f"{f.decode_weights_s:.2f} s (weights / GEMMs) + {f.decode_kv_s:.2f} s (KV) = {f.total_s:.2f} s, "
        f"{f.output_tok_s:,.0f} output tok/s" + (f"; {shares}" if shares else "")
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backends", default="pytorch,turbo,hf")
    p.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "synthetic", "tokenized"])
    p.add_argument("--dataset-file", default=None, help="tokenized: a file from `python benchmark/bench_data.py`")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--hf-num-prompts", type=int, default=None, help="HF runs on this many of them (it is slow)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=2048, help="ShareGPT: drop pairs longer than this")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of a step (engine default)")
    p.add_argument("--prefill-interval", type=int, default=1, help="PyTorch engine: admit requests every N steps")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--warmup-requests", type=int, default=64, help="untimed requests shaped like the first prompts")
    p.add_argument(
        "--cprofile", type=int, default=0, metavar="N", help="PyTorch engine: cProfile its loop thread, print top N"
    )
    args = p.parse_args(argv)
    args.backends = args.backends.split(",")
    return args


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path)) if args.dataset == "sharegpt" else None
    if args.dataset == "sharegpt":
        reqs = sample_sharegpt(tokenizer, args.num_prompts, max_len=args.max_len)
    elif args.dataset == "tokenized":
        reqs = load_tokenized(args.dataset_file, args.num_prompts)
    else:
        reqs = synthetic(args.num_prompts, args.input_len, args.output_len, load_spec(model_path).vocab_size)
    prompts = _token_ids(tokenizer, reqs)
    args.io = [(max(len(p) for p in prompts), max(r.output_len for r in reqs))]
    args.batch = [args.max_batch_size]
    n_out = sum(r.output_len for r in reqs)
    print(f"{len(reqs)} requests, {sum(map(len, prompts))} prompt tokens, {n_out} output tokens")
    rows = []
    engine_tok_s = {}  # the engines' output tok/s over all the requests (HF may run on fewer)
    for backend in args.backends:
        if backend == "hf":
            k = args.hf_num_prompts or len(reqs)
            res = run_hf(load_hf(model_path, args), prompts[:k], reqs[:k], args.hf_batch_size, args.device)
        else:
            engine = make_engine(backend, model_path, args)
            warm_up(engine, prompts, args.warmup_requests)
            profiler = profile_loop_thread(engine) if args.cprofile and backend == "pytorch" else None
            res = run_engine(engine, prompts, reqs)
            engine.shutdown()
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
            del engine
            free_device_memory()
        tps = res["output_tokens"] / res["elapsed_s"]
        if backend != "hf":
            engine_tok_s[backend] = tps
        rows.append(
            f"| {backend} | {res['requests']} | {res['elapsed_s']:.1f} | {res['output_tokens']} | "
            f"{tps:.1f} | {res['requests'] / res['elapsed_s']:.2f} |"
        )
        print(rows[-1], flush=True)
    print("\n| backend | requests | time (s) | output tokens | output tok/s | req/s |\n|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.device == "cuda":
        dtype_name = "bfloat16" if args.dtype == "auto" else args.dtype
        bandwidth, rate = copy_bandwidth(), gemm_rate(dtype_name)
        print(floor_report(model_path, dtype_name, reqs, args.max_batch_size, bandwidth, rate, engine_tok_s))


if __name__ == "__main__":
    main()
