"""Serving benchmark: ShareGPT requests at a Poisson rate against a running api_server (or proxy).

Reports TTFT, inter-token latency (ITL) and end-to-end latency p50/p90/p99 and output throughput.

    lmkit serve api_server MODEL --server-port 23333 &
    python benchmark/profile_restful_api.py --url http://127.0.0.1:23333 --request-rate 16 --num-prompts 500

With --dataset-file (token ids + output lengths written by `bench_data.py`, for machines without the
dataset package or for a model without its real tokenizer), prompts are sent as token ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_data import load_tokenized, sample_sharegpt  # noqa: E402


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int], max_tokens: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    res, t0 = Result(), time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.latency, res.ok = time.perf_counter() - t0, True
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] * 1e3 if len(xs) > 1 else float("nan")


async def run(args) -> None:
    from transformers import AutoTokenizer

    # No connection cap: httpx's default of 100 would queue requests in the client and count that as TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        model = args.model or (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        if args.dataset_file:
            reqs = load_tokenized(args.dataset_file, args.num_prompts)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
            if tokenizer is None:
                from lmkit.model.loader import resolve_model_path

                tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
            reqs = sample_sharegpt(tokenizer, args.num_prompts, max_len=args.max_len)
        rng = random.Random(args.seed)
        tasks, t0 = [], time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.create_task(one_request(client, args.url, model, r.prompt, r.output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    print(f"requests: {len(ok)} ok, {len(errors)} failed, {elapsed:.1f} s, rate {args.request_rate}/s")
    if errors:
        print("first error:", errors[0])
    in_tokens = sum(r.prompt_len for r in reqs)
    print(f"prompts: {in_tokens} tokens in, {sum(r.output_len for r in reqs)} tokens out requested")
    print(f"output throughput: {out_tokens / elapsed:.1f} tok/s, {len(ok) / elapsed:.2f} req/s")
    print("| metric (ms) | p50 | p90 | p99 |\n|---|---:|---:|---:|")
    for name, xs in (("TTFT", ttft), ("ITL", itl), ("end-to-end", e2e)):
        print(f"| {name} | {_pct(xs, 50):.1f} | {_pct(xs, 90):.1f} | {_pct(xs, 99):.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:23333")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for output lengths (default model's)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--dataset-file", default=None, help="tokenized requests (bench_data.py); prompts go as ids")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
