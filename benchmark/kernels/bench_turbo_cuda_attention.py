"""Decode-attention micro-benchmark of the turbo CUDA kernel (and the Triton one for comparison).

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), paged cache with block size 16,
every sequence at the same context. Reports the median time (CUDA events, do_bench) and the achieved bandwidth
of the KV read (batch * context * kv_heads * head_dim * 2 bytes * 2 for K and V) against the device's ~3 TB/s.

    python benchmark/kernels/bench_turbo_cuda_attention.py [--batch 1 64 256] [--context 1024 4096 32768]

--table-blocks 48 gives the block tables the engine's width (its session length in blocks), so the heuristic's
split count is a decode graph's; --hint also times each shape with the step's split hint (decode_min_split_tokens,
as the engine's graphs pass it); --contexts-from FILE (a bench_data.py file) makes each batch ragged: conversation
i's prompt plus a uniform share of its answer, --context then ignored (--sorted: longest first, the order the
engine's decode graphs give their rows).
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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--splits", type=int, nargs="+", default=[0], help="split counts to time (0 = heuristic)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--table-blocks", type=int, default=0, help="block-table width (0: the longest context's)")
    ap.add_argument("--hint", action="store_true", help="also time with the step's split hint")
    ap.add_argument("--contexts-from", default=None, help="ragged contexts from a bench_data.py file")
    ap.add_argument("--sorted", action="store_true", help="ragged contexts longest first (as in a decode graph)")
    ap.add_argument("--prefill", type=int, nargs="*", default=None, help="also time prefill of these prompt lengths")
    ap.add_argument("--prefill-seqs", type=int, default=4, help="prompts per --prefill call")
    ap.add_argument(
        "--prefill-mix",
        default=None,
        help="also time one chunked-prefill step of ShareGPT prompts: a bench_data.py file, packed into --mix-tokens",
    )
    ap.add_argument("--mix-tokens", type=int, default=8192)
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--max-gib", type=float, default=60.0, help="skip shapes whose KV exceeds this")
    args = ap.parse_args()

    ops = cuda_harness.load()
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs; Hq={args.heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} block={args.block_size} bf16"
    )
    for n in args.prefill or []:
        bench_prefill(ops, args, [n] * args.prefill_seqs)
    if args.prefill_mix:
        for lens in sharegpt_steps(args.prefill_mix, args.mix_tokens):
            bench_prefill(ops, args, lens)
    if args.prefill_only:
        return
    print(
        f"{'batch':>6} {'context':>8} {'splits':>6} {'turbo us':>10} {'GB/s':>8} {'hinted us':>10} {'GB/s':>8} "
        f"{'triton us':>10} {'GB/s':>8}"
    )
    contexts = [0] if args.contexts_from else args.context
    for ctx in contexts:
        for b in args.batch:
            lens = ragged_contexts(args.contexts_from, b) if args.contexts_from else [ctx] * b
            if args.sorted:
                lens.sort(reverse=True)
            kv_bytes = sum(lens) * args.kv_heads * args.head_dim * 2 * 2
            label = f"~{sum(lens) // b}" if args.contexts_from else str(ctx)
            if kv_bytes / 2**30 > args.max_gib:
                print(f"{b:>6} {label:>8}  skipped ({kv_bytes / 2**30:.1f} GiB of KV)")
                continue
            for want in args.splits:
                splits, t_us, hint_us, tri_us = bench_shape(ops, args, lens, props.multi_processor_count, want)
                gbs, hint_gbs, tri_gbs = (kv_bytes / t / 1e3 for t in (t_us, hint_us, tri_us))
                print(
                    f"{b:>6} {label:>8} {splits:>6} {t_us:>10.1f} {gbs:>8.0f} {hint_us:>10.1f} {hint_gbs:>8.0f} "
                    f"{tri_us:>10.1f} {tri_gbs:>8.0f}",
                    flush=True,
                )
            torch.cuda.empty_cache()


def ragged_contexts(path: str, batch: int, seed: int = 0) -> list[int]:
    """Contexts of a decode step mid-run: conversation i's prompt and a uniform share of its answer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_data import load_tokenized

    reqs = load_tokenized(path)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(reqs), (batch,), generator=g).tolist()
    share = torch.rand(batch, generator=g).tolist()
    return [max(1, reqs[i].prompt_len + int(u * reqs[i].output_len)) for i, u in zip(pick, share)]


def sharegpt_steps(path: str, tokens: int, steps: int = 3) -> list[list[int]]:
    """The first `steps` chunked-prefill steps of a ShareGPT run: prompts in order, cut at `tokens` per step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_data import load_tokenized

    out, cur, room = [], [], tokens
    for req in load_tokenized(path):
        n = req.prompt_len
        while n > 0 and len(out) < steps:
            take = min(n, room)
            cur.append(take)
            n, room = n - take, room - take
            if room == 0:
                out.append(cur)
                cur, room = [], tokens
    return out


def paged_cache(args, seq_lens: list[int], min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 K/V caches holding just these sequences' blocks, in a random order, and their block tables
    (at least min_width wide; the padding entries 0)."""
    blocks = [triton.cdiv(n, args.block_size) for n in seq_lens]
    shape = (sum(blocks), args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(sum(blocks), dtype=torch.int32)
    tables = torch.zeros(len(seq_lens), max(max(blocks), min_width), dtype=torch.int32)
    at = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = perm[at : at + nb]
        at += nb
    return k_cache, v_cache, tables.cuda()


def bench_prefill(ops, args, seq_lens: list[int]) -> None:
    """Whole prompts (no cached prefix), one call: achieved TFLOP/s (causal: half the square), against Triton's
    paged kernel and ATen's flash attention (varlen, contiguous K/V: no pages) on the same prompts."""
    dtype = torch.bfloat16
    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    num_seqs = len(seq_lens)
    k_cache, v_cache, tables = paged_cache(args, seq_lens)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(device="cuda", dtype=torch.int32)
    total, max_len = sum(seq_lens), max(seq_lens)
    q = torch.randn(total, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(total, hk, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    scale = d**-0.5
    flops = sum(4 * hq * d * n * n / 2 for n in seq_lens)

    def turbo():
        ops.paged_attention_prefill(out, q, k_cache, v_cache, tables, cu, lens, max_len, scale, 0)

    t_ms = triton.testing.do_bench(turbo, warmup=20, rep=200, return_mode="median")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_prefill_attention

    def tri():
        paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, max_len, scale, out=out)

    tri_ms = triton.testing.do_bench(tri, warmup=20, rep=200, return_mode="median")

    def flash():
        torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)

    try:
        fl = f"{flops / triton.testing.do_bench(flash, warmup=20, rep=200, return_mode='median') / 1e9:.0f}"
    except Exception as e:  # not every build has the flash kernels
        fl = f"n/a ({type(e).__name__})"
    shape = f"{num_seqs} x {seq_lens[0]}" if len(set(seq_lens)) == 1 else f"{num_seqs} prompts, {total} tokens"
    print(
        f"prefill {shape} (max {max_len}): turbo {t_ms * 1e3:.0f} us = {flops / t_ms / 1e9:.0f} TFLOP/s, "
        f"triton {tri_ms * 1e3:.0f} us = {flops / tri_ms / 1e9:.0f}, aten flash {fl} TFLOP/s",
        flush=True,
    )


def bench_shape(ops, args, ctx: list[int], sms: int, want: int = 0) -> tuple[int, float, float, float]:
    """(splits, turbo median us, with the split hint, triton median us) for one batch of contexts."""
    dtype = torch.bfloat16
    b = len(ctx)
    hq, hk, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    k_cache, v_cache, tables = paged_cache(args, ctx, args.table_blocks)
    width = tables.shape[1]
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, hq, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    splits = want or ops.decode_num_splits(b, hk, width, bs, sms)
    ws = torch.empty(max(1, ops.decode_workspace_size(b, hq, d, splits)), dtype=torch.uint8, device="cuda")
    scale = d**-0.5
    hint = torch.tensor([ops.decode_min_split_tokens(sum(ctx), hq, hk, sms)], dtype=torch.int32, device="cuda")

    def turbo():
        ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, scale, splits, ws, 0)

    def hinted():
        ops.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, scale, splits, ws, 0, hint)

    t_us = triton.testing.do_bench(turbo, warmup=50, rep=300, return_mode="median") * 1e3
    hint_us = float("nan")
    if args.hint:
        hint_us = triton.testing.do_bench(hinted, warmup=50, rep=300, return_mode="median") * 1e3
    tri_us = float("nan")
    if not args.no_triton and not want:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from lmkit.pytorch_engine.kernels.triton.paged_attention import paged_decode_attention

        def tri():
            paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out)

        tri_us = triton.testing.do_bench(tri, warmup=50, rep=300, return_mode="median") * 1e3
    return splits, t_us, hint_us, tri_us


if __name__ == "__main__":
    main()
