"""The floor under an offline throughput run (`profile_throughput.py`): what its steps must cost at the device's
memory bandwidth and matrix rate, summed over the run.

    python benchmark/throughput_floor.py --model benchmark/configs/llama-3-8b --dataset-file sharegpt_1000.json \\
        --max-batch-size 1024 --bandwidth 4.3e12 --matrix-rate 700e12 [--measured-tok-s 15000]

Every prompt is prefilled at the matrix rate (the GEMMs' FLOPs alone). Each decode step of B running sequences
then costs max(weight bytes / bandwidth, B x GEMM FLOPs per token / matrix rate), plus the bytes of their KV caches
/ bandwidth. Requests enter in order as slots free up (the max batch size); a request's first token comes from its
prefill, so an output of n tokens takes n - 1 decode steps. Attention FLOPs, norms, activations and launch gaps
are left out: a real run is slower, and the ratio to the floor says by how much.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class StepCosts:
    weight_bytes: float
    """Bytes of the weights every step reads (the embedding table excepted: a lookup reads a row)."""
    flops_per_token: float
    """GEMM FLOPs per token (2 per weight)."""
    kv_bytes_per_token: float
    """Bytes of K and V per cached token, all layers."""


@dataclass(frozen=True)
class Floor:
    prefill_s: float
    decode_weights_s: float
    """Decode steps' max(weight read, GEMM FLOPs) part."""
    decode_kv_s: float
    decode_steps: int
    output_tokens: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_weights_s + self.decode_kv_s

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.total_s


def model_costs(model_path, elem_bytes: int = 2) -> StepCosts:
    from lmkit.model.dummy import weight_shapes
    from lmkit.model.loader import load_spec

    spec = load_spec(model_path)
    shapes = weight_shapes(spec)
    shapes.pop("model.embed_tokens.weight")
    matrices = sum(s[0] * s[1] for s in shapes.values() if len(s) == 2)
    vectors = sum(s[0] for s in shapes.values() if len(s) == 1)
    kv = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * elem_bytes
    return StepCosts((matrices + vectors) * elem_bytes, 2.0 * matrices, kv)


def floor(
    prompt_lens: list[int],
    output_lens: list[int],
    costs: StepCosts,
    bandwidth: float,
    matrix_rate: float,
    max_batch: int,
) -> Floor:
    if len(prompt_lens) != len(output_lens) or max_batch < 1:
        raise ValueError("one output length per prompt, and a max batch size >= 1")
    prefill = sum(prompt_lens) * costs.flops_per_token / matrix_rate
    weights_s = kv_s = 0.0
    steps = 0
    queue = list(zip(prompt_lens, output_lens))
    running: list[list[int]] = []  # [context tokens, decode steps left]
    nxt = 0
    while nxt < len(queue) or running:
        while nxt < len(queue) and len(running) < max_batch:
            p, n = queue[nxt]
            nxt += 1
            if n > 1:
                running.append([p + 1, n - 1])  # the prefill's token is in the cache at the first decode step
        if not running:
            continue
        weights_s += max(costs.weight_bytes / bandwidth, len(running) * costs.flops_per_token / matrix_rate)
        kv_s += sum(r[0] for r in running) * costs.kv_bytes_per_token / bandwidth
        steps += 1
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    return Floor(prefill, weights_s, kv_s, steps, sum(output_lens))


def main(argv=None) -> None:
    from bench_data import load_tokenized, synthetic

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF folder (config.json is enough)")
    p.add_argument("--dataset-file", default=None, help="from `python benchmark/bench_data.py`; else synthetic")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--bandwidth", type=float, required=True, help="bytes/s (the device's copy bandwidth)")
    p.add_argument("--matrix-rate", type=float, required=True, help="FLOP/s the GEMMs reach")
    p.add_argument("--elem-bytes", type=int, default=2, help="bytes per weight and per cached value")
    p.add_argument("--measured-tok-s", type=float, default=None, help="a run's output tok/s, to compare")
    a = p.parse_args(argv)
    if a.dataset_file:
        reqs = load_tokenized(a.dataset_file, a.num_prompts)
    else:
        reqs = synthetic(a.num_prompts or 1024, a.input_len, a.output_len, vocab_size=1000)
    costs = model_costs(a.model, a.elem_bytes)
    f = floor([r.prompt_len for r in reqs], [r.output_len for r in reqs], costs, a.bandwidth, a.matrix_rate,
              a.max_batch_size)  # fmt: skip
    print(
        f"{len(reqs)} requests, {f.output_tokens} output tokens; weights {costs.weight_bytes / 1e9:.2f} GB a step, "
        f"{costs.flops_per_token / 1e9:.1f} GFLOP a token, KV {costs.kv_bytes_per_token / 1024:.0f} KiB a token"
    )
    print(
        f"floor: prefill {f.prefill_s:.2f} s + {f.decode_steps} decode steps {f.decode_weights_s:.2f} s "
        f"(weights / GEMMs) + {f.decode_kv_s:.2f} s (KV) = {f.total_s:.2f} s, {f.output_tok_s:,.0f} output tok/s"
    )
    if a.measured_tok_s:
        print(f"measured {a.measured_tok_s:,.0f} tok/s: {a.measured_tok_s / f.output_tok_s:.0%} of the floor's rate")


if __name__ == "__main__":
    main()
