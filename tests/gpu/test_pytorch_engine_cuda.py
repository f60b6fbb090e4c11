"""The PyTorch engine on CUDA (Triton attention, decode CUDA graphs) against HF transformers on the GPU."""

from __future__ import annotations

import pytest
import torch

from lmkit.frontend.protocol import EngineRequest, SamplingParams
from lmkit.messages import PytorchEngineConfig
from lmkit.pytorch_engine import cuda_graph
from lmkit.pytorch_engine.engine import PytorchEngine

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 99, 3], list(range(40, 140)), [7] * 33, [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


def run_greedy(engine, prompts, max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    done = 0
    while done < len(prompts):
        for o in engine.get_outputs(timeout=5.0):
            assert o.error is None, o.error
            out[o.request_id] += o.new_token_ids
            done += o.finished
    return [out[f"r{i}"] for i in range(len(prompts))]


def hf_greedy(path, prompts, max_new_tokens: int, dtype=torch.float32) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).cuda().eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        g = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        outs.append(g[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_hf_fp32(tiny_model_dir, kind, eager, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_model_dir(kind)
    # Mixed steps of up to 2 decode rows replay the graphs of decode bucket 2, the rest those of bucket 8.
    monkeypatch.setattr(cuda_graph, "_MIXED_DECODE_BUCKETS", [2])
    # A small token budget mixes prefill chunks with decodes; graphs (when on) serve both kinds of step.
    cfg = PytorchEngineConfig(
        device="cuda",
        dtype="float32",
        num_gpu_blocks=64,
        block_size=16,
        max_num_batched_tokens=48,
        eager_mode=eager,
        max_batch_size=8,
    )
    engine = PytorchEngine(path, cfg)
    try:
        mixed_buckets = set()  # the decode buckets of the mixed-step graphs replayed
        if not eager:
            mixed = engine.runner.mixed_graphs
            assert mixed.decode_buckets == [2, 8]
            replay = mixed.replay

            def counting_replay(inputs, decode_tables, decode_lens, chunks, logits_rows, feed=None):
                mixed_buckets.add(mixed._key(len(decode_lens), sum(n for _, _, n in chunks))[0])
                return replay(inputs, decode_tables, decode_lens, chunks, logits_rows, feed)

            mixed.replay = counting_replay
        got = run_greedy(engine, PROMPTS, 32)
        if not eager:
            assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "no CUDA graph was replayed"
            assert mixed_buckets == {2, 8}, "mixed-step graphs of both decode buckets should have been replayed"
    finally:
        engine.shutdown()
    assert got == hf_greedy(path, PROMPTS, 32)


def test_prefix_cache_and_preemption_on_cuda(tiny_model_dir):
    path = tiny_model_dir("llama")
    shared = list(range(10, 90))
    prompts = [shared + [1, 2, 3], shared + [4, 5], list(range(100, 180))]
    cfg = PytorchEngineConfig(device="cuda", dtype="float32", num_gpu_blocks=14, block_size=16, max_batch_size=4)
    engine = PytorchEngine(path, cfg)
    try:
        first = run_greedy(engine, prompts, 40)
        again = run_greedy(engine, prompts[:2], 40)
        assert engine.num_preemptions > 0
        assert engine.stats().num_blocks_used == 0
    finally:
        engine.shutdown()
    ref = hf_greedy(path, prompts, 40)
    assert first == ref and again == ref[:2]


def _greedy_with_logprobs(engine, prompts, max_new_tokens: int) -> list[list[tuple[int, float]]]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    out: dict[str, list[tuple[int, float]]] = {f"r{i}": [] for i in range(len(prompts))}
    done = 0
    while done < len(prompts):
        for o in engine.get_outputs(timeout=5.0):
            assert o.error is None, o.error
            out[o.request_id] += [(lp.token_id, lp.logprob) for lp in o.logprobs or []]
            done += o.finished
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_fused_bf16_ops_match_pytorch_ops(tiny_model_dir, monkeypatch):
    """bf16 on CUDA runs the fused Triton RMSNorm / SiLU·mul / rotary; the PyTorch ops are the reference."""
    from lmkit.pytorch_engine.kernels.triton import fused
    from lmkit.pytorch_engine.models import llama

    path = tiny_model_dir("llama")
    cfg = dict(device="cuda", dtype="bfloat16", num_gpu_blocks=64, block_size=16, max_batch_size=8)
    runs = []
    for use_fused in (True, False):
        if not use_fused:
            monkeypatch.setattr(llama.DecoderOps, "for_device", staticmethod(lambda device, dtype: llama.DecoderOps()))
        engine = PytorchEngine(path, PytorchEngineConfig(**cfg))
        try:
            assert (engine.runner.model.ops.rms_norm is fused.rms_norm) == use_fused
            runs.append(_greedy_with_logprobs(engine, PROMPTS, 16))
        finally:
            engine.shutdown()
    for got, ref in zip(*runs):
        assert got[0][0] == ref[0][0]
        for (tok, lp), (ref_tok, ref_lp) in zip(got, ref):
            if tok != ref_tok:  # a near-tie in bf16 may go either way; compare up to there
                break
            assert abs(lp - ref_lp) < 0.1
