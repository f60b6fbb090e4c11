"""The turbo engine on CUDA through the built extension (lmkit._turbo), against HF transformers / plain PyTorch.

Tiny random checkpoints (head_dim 64: the CUDA attention kernels take 64 or 128) in float32: logits and greedy
tokens equal HF on the GPU; a Llama-3-8B-shaped model (2 layers, dummy weights) in bfloat16: prefill and decode
logits within bf16 tolerance of a float32 reference. Build first: `pip install --no-build-isolation -e .`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

from lmkit import _turbo
from lmkit.frontend.protocol import EngineRequest, FinishReason, SamplingParams
from lmkit.messages import TurboEngineConfig
from lmkit.model.loader import load_model
from lmkit.turbo.engine import TurboEngine
from lmkit.turbo.weights import turbo_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not getattr(_turbo, "cuda_built", lambda: False)(), reason="_turbo built without CUDA"),
]

KINDS = ["llama", "llama31", "qwen2", "qwen3"]
REPO = Path(__file__).resolve().parents[2]
BLOCK = 16


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    """Factory: a tiny random checkpoint of `kind` with head_dim 64, saved once per module."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            cfg = tiny_config(kind)
            cfg.head_dim, cfg.hidden_size, cfg.intermediate_size = 64, 128, 256
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.uniform_(0.5, 1.5)
                    elif name.endswith("bias"):
                        p.normal_(0.0, 0.1)
            made[kind] = tmp_path_factory.mktemp(f"gpu-{kind}")
            model.save_pretrained(str(made[kind]))
        return made[kind]

    return get


def model_config(spec) -> _turbo.ModelConfig:
    cfg = _turbo.ModelConfig()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings", "rms_norm_eps", "qkv_bias", "qk_norm"):  # fmt: skip
        setattr(cfg, name, getattr(spec, name))
    cfg.sliding_window = spec.sliding_window or 0
    return cfg


def forward(model, seqs: list[list[int]], done: list[int], blocks_per_seq: int) -> torch.Tensor:
    """One batched step: seq i feeds tokens done[i]: (its KV cache holds the rest); logits of every new row."""
    return model.forward(*step_inputs(seqs, done, blocks_per_seq))


def step_inputs(seqs: list[list[int]], done: list[int], blocks_per_seq: int, ids=None) -> tuple[torch.Tensor, ...]:
    """The device tensors of one step (seq ids[i], default i, owns blocks ids[i] * blocks_per_seq ...); every new
    row is sampled."""
    ids = list(range(len(seqs))) if ids is None else ids
    toks, pos, slots, cu, kvl = [], [], [], [0], []
    for i, s, d in zip(ids, seqs, done):
        base = i * blocks_per_seq
        for p in range(d, len(s)):
            toks.append(s[p])
            pos.append(p)
            slots.append((base + p // BLOCK) * BLOCK + p % BLOCK)
        cu.append(len(toks))
        kvl.append(len(s))
    table = torch.tensor([[i * blocks_per_seq + b for b in range(blocks_per_seq)] for i in ids], dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device="cuda")
    return (
        torch.tensor(toks, device="cuda"),
        torch.tensor(pos, device="cuda"),
        torch.tensor(slots, device="cuda"),
        table.cuda(),
        torch.tensor(cu, **i32),
        torch.tensor(kvl, **i32),
        torch.arange(len(toks), device="cuda"),
    )


def turbo_model(path: Path, dtype: torch.dtype, load_format: str = "auto", num_blocks: int = 64):
    loaded = load_model(path, dtype=dtype, load_format=load_format, device="cuda" if load_format == "dummy" else "cpu")
    weights = turbo_weights(loaded.spec, loaded.weights, 512, "cuda", dtype)
    return _turbo.Model(model_config(loaded.spec), weights, num_blocks, BLOCK), loaded.spec


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda().eval()


def prompts(vocab: int, lens=(5, 19, 40, 71)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def fp32_against_hf(path: Path):
    """turbo's model and HF's on the GPU in fp32, and four prompts of mixed lengths."""
    model, spec = turbo_model(path, torch.float32)
    return model, hf_model(path), prompts(spec.vocab_size)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_prefill_then_decode(kind, gpu_model_dir):
    """A mixed batch (prefill chunks) then a decode-only step (split-K kernel), fp32, against HF on the GPU."""
    model, hf, seqs = fp32_against_hf(gpu_model_dir(kind))
    with torch.no_grad():
        first = forward(model, [s[:-1] for s in seqs], [0] * len(seqs), 8)  # prefill all but the last token
        last = forward(model, seqs, [len(s) - 1 for s in seqs], 8)  # decode-only: one token each
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([s], device="cuda")).logits[0]
            row0 = sum(len(x) - 1 for x in seqs[:i])
            torch.testing.assert_close(first[row0 : row0 + len(s) - 1], ref[:-1], atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(last[i], ref[-1], atol=2e-4, rtol=2e-4)


def run_engine(engine: TurboEngine, reqs: list[tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Submit every request at once; returns request id -> [tokens, logprobs, finish reason]."""
    for i, (p, sp) in enumerate(reqs):
        engine.add_request(EngineRequest(f"r{i}", p, sp))
    got: dict[str, list] = {f"r{i}": [[], [], None] for i in range(len(reqs))}
    done, deadline = set(), time.monotonic() + 120
    while len(done) < len(reqs) and time.monotonic() < deadline:
        for o in engine.get_outputs(timeout=1.0):
            assert o.error is None, o.error
            got[o.request_id][0] += o.new_token_ids
            got[o.request_id][1] += o.logprobs or []
            if o.finished:
                got[o.request_id][2] = o.finish_reason
                done.add(o.request_id)
    assert len(done) == len(reqs)
    return got


def hf_greedy(hf, prompt: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(
        ids,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_matches_hf(kind, gpu_model_dir):
    """Concurrent requests, small token budget (chunked prefill mixed with decodes), 64 tokens each."""
    path = gpu_model_dir(kind)
    cfg = TurboEngineConfig(device="cuda", dtype="float32", num_blocks=128, cache_block_seq_len=BLOCK,
                            max_num_batched_tokens=48, session_len=512)  # fmt: skip
    engine = TurboEngine(path, cfg)
    try:
        assert engine.device == "cuda" and engine.dtype == torch.float32
        hf = hf_model(path)
        seqs = prompts(engine.vocab_size)
        sp = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
        got = run_engine(engine, [(p, sp) for p in seqs])
        for i, p in enumerate(seqs):
            assert got[f"r{i}"][0] == hf_greedy(hf, p, 64), f"{kind} prompt {i}"
    finally:
        engine.shutdown()


def test_engine_sampling_logprobs_and_penalty(gpu_model_dir):
    """Seeded draws do not depend on the batch; logprobs match HF; repetition penalty matches HF greedy."""
    path = gpu_model_dir("llama")
    cfg = TurboEngineConfig(device="cuda", dtype="float32", num_blocks=128, cache_block_seq_len=BLOCK)
    engine = TurboEngine(path, cfg)
    try:
        hf = hf_model(path)
        seqs = prompts(engine.vocab_size)
        seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
        alone = run_engine(engine, [(seqs[0], seeded)])["r0"][0]
        others = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
        batch = run_engine(engine, [(seqs[0], seeded)] + [(p, others) for p in seqs[1:]])
        assert batch["r0"][0] == alone and len(alone) == 16

        lp = SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
        pen = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
        got = run_engine(engine, [(seqs[1], lp), (seqs[2], pen)])
        toks, lps, _ = got["r0"]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([seqs[1] + toks], device="cuda")).logits[0].float(), -1)
        for j, (t, entry) in enumerate(zip(toks, lps)):
            row = ref[len(seqs[1]) - 1 + j]
            assert entry.token_id == t and abs(entry.logprob - row[t].item()) < 1e-3
            assert [i for i, _ in entry.top] == row.topk(3).indices.tolist()
        assert got["r1"][0] == hf_greedy(hf, seqs[2], 24, repetition_penalty=1.3)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def llama3_8b_2layers(tmp_path_factory) -> Path:
    """benchmark/configs/llama-3-8b with 2 layers: real shapes, quick to build."""
    out = tmp_path_factory.mktemp("llama-3-8b-2l")
    shutil.copy(REPO / "benchmark" / "configs" / "llama-3-8b" / "config.json", out / "config.json")
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def reference_logits(path: Path, seq: list[int]) -> torch.Tensor:
    """HF Llama in float32 on the same dummy weights (upcast from bfloat16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = load_model(path, dtype=torch.bfloat16, load_format="dummy", device="cuda").weights
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)
    hf.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True, strict=False)
    with torch.device("cuda"):  # the meta model's rotary buffers are not in the state dict: rebuild them
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    with torch.no_grad():
        return hf.cuda().eval()(torch.tensor([seq], device="cuda")).logits[0].float()


def test_llama3_8b_shape_bf16_logits(llama3_8b_2layers):
    """bf16 prefill + decode logits within bf16 tolerance of the float32 reference (relative to their scale)."""
    model, spec = turbo_model(llama3_8b_2layers, torch.bfloat16, load_format="dummy", num_blocks=32)
    seqs = prompts(spec.vocab_size, lens=(33, 130))
    with torch.no_grad():
        first = forward(model, [s[:-1] for s in seqs], [0, 0], 16).float()
        last = forward(model, seqs, [len(s) - 1 for s in seqs], 16).float()
    for i, s in enumerate(seqs):
        ref = reference_logits(llama3_8b_2layers, s)
        row0 = sum(len(x) - 1 for x in seqs[:i])
        for got, want in ((first[row0 : row0 + len(s) - 1], ref[:-1]), (last[i], ref[-1])):
            err = (got - want).abs().max().item() / want.abs().max().item()
            cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
            assert err < 0.05 and cos > 0.999, (i, err, cos)


def test_engine_llama3_8b_shape_bf16_runs(llama3_8b_2layers):
    """The engine itself in bf16 with dummy weights: pool sized from free GPU memory, full-length outputs."""
    cfg = TurboEngineConfig(device="cuda", load_format="dummy", cache_max_entry_count=0.1, session_len=1024)
    engine = TurboEngine(llama3_8b_2layers, cfg)
    try:
        assert engine.dtype == torch.bfloat16 and engine.num_blocks > 100
        sp = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
        got = run_engine(engine, [(p, sp) for p in prompts(engine.vocab_size, lens=(7, 64, 300))])
        assert all(len(v[0]) == 32 for v in got.values())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_mixed_batch_split_attention_matches_hf(kind, gpu_model_dir):
    """Leading decode rows (split-K decode kernel) and prefill rows (prefill kernel) of one step, against HF."""
    model, hf, seqs = fp32_against_hf(gpu_model_dir(kind))
    with torch.no_grad():
        forward(model, [s[:-1] for s in seqs[:2]], [0, 0], 8)
        mixed = forward(model, seqs, [len(seqs[0]) - 1, len(seqs[1]) - 1, 0, 0], 8)
        refs = [hf(torch.tensor([s], device="cuda")).logits[0] for s in seqs]
    torch.testing.assert_close(mixed[0], refs[0][-1], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(mixed[1], refs[1][-1], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(mixed[2 : 2 + len(seqs[2])], refs[2], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(mixed[2 + len(seqs[2]) :], refs[3], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bf16", [False, True], ids=["tiny-fp32", "llama3-8b-shape-bf16"])
def test_decode_graph_logits_equal_eager(bf16, gpu_model_dir, llama3_8b_2layers):
    """Decode steps replayed from CUDA graphs (the batch padded to its bucket: 5 -> 8, 3 -> 4) give the eager
    logits and write the same KV: four steps over changing subsets, each fed the eager model's greedy tokens."""
    path, dtype, fmt = (
        (llama3_8b_2layers, torch.bfloat16, "dummy") if bf16 else (gpu_model_dir("llama"), torch.float32, "auto")
    )
    loaded = load_model(path, dtype=dtype, load_format=fmt, device="cuda" if fmt == "dummy" else "cpu")
    weights = turbo_weights(loaded.spec, loaded.weights, 512, "cuda", dtype)
    eager, graph = (_turbo.Model(model_config(loaded.spec), weights, 64, BLOCK) for _ in range(2))
    seqs = prompts(loaded.spec.vocab_size, lens=(5, 19, 40, 71, 9))
    with torch.no_grad():
        for m in (eager, graph):  # the KV of all but each sequence's last token
            forward(m, [s[:-1] for s in seqs], [0] * len(seqs), 8)
        for step, live in enumerate([[0, 1, 2, 3, 4], [0, 2, 4], [1, 2, 3, 4, 0], [3, 1, 0]]):
            batch = [seqs[i] for i in live]
            inputs = step_inputs(batch, [len(s) - 1 for s in batch], 8, ids=live)
            want = eager.forward(*inputs)
            got, bucket, _ = graph.forward_graph(*inputs, 8, 8)
            assert bucket == {5: 8, 3: 4}[len(live)]
            if bf16:
                err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
                assert err < 2e-2, (step, err)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for i, t in zip(live, want.argmax(-1).tolist()):
                seqs[i] = seqs[i] + [t]


def test_engine_cuda_graphs_match_eager(gpu_model_dir, monkeypatch):
    """The engine with decode graphs (the default) and with TURBO_CUDA_GRAPHS=0 produce the same greedy tokens,
    seeded draws and logprobs while the batch shrinks through several buckets."""
    path = gpu_model_dir("llama")
    cfg = TurboEngineConfig(device="cuda", dtype="float32", num_blocks=256, cache_block_seq_len=BLOCK,
                            max_num_batched_tokens=64, session_len=512)  # fmt: skip
    seqs = prompts(tiny_config("llama").vocab_size, lens=(5, 19, 40, 71, 3, 12, 33, 7, 50, 21, 9, 14))
    reqs = []
    for i, p in enumerate(seqs):
        n = 8 + 5 * i  # requests end at different steps: the decode batch walks down the buckets
        if i % 4 == 3:
            sp = SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        else:
            sp = SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=2 if i % 4 == 1 else None, ignore_eos=True)
        reqs.append((p, sp))
    results = []
    for graphs in ("1", "0"):
        monkeypatch.setenv("TURBO_CUDA_GRAPHS", graphs)
        engine = TurboEngine(path, cfg)
        try:
            results.append(run_engine(engine, reqs))
        finally:
            engine.shutdown()
    with_graphs, eager = results
    for rid in eager:
        assert with_graphs[rid][0] == eager[rid][0], rid
        for a, b in zip(with_graphs[rid][1], eager[rid][1]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_engine_pipelined_decode_matches_unpipelined(gpu_model_dir, monkeypatch):
    """Pipelined decode (the default with CUDA graphs: step N+1 launched before step N's tokens are read) and
    TURBO_PIPELINE=0 give the same tokens and finish reasons: stop tokens hit mid-stream, length limits at
    different steps; an abort mid-stream ends only its request."""
    path = gpu_model_dir("llama")
    cfg = TurboEngineConfig(device="cuda", dtype="float32", num_blocks=256, cache_block_seq_len=BLOCK, session_len=512)
    seqs = prompts(tiny_config("llama").vocab_size, lens=(5, 19, 40, 71, 3, 12))

    def run(pipeline: str, reqs, abort: str | None = None) -> dict[str, tuple[list[int], object]]:
        monkeypatch.setenv("TURBO_PIPELINE", pipeline)
        engine = TurboEngine(path, cfg)
        try:
            for i, (p, sp) in enumerate(reqs):
                engine.add_request(EngineRequest(f"r{i}", p, sp))
            got = {f"r{i}": ([], None) for i in range(len(reqs))}
            done, deadline = set(), time.monotonic() + 120
            while len(done) < len(reqs) and time.monotonic() < deadline:
                for o in engine.get_outputs(timeout=1.0):
                    assert o.error is None, o.error
                    got[o.request_id] = (got[o.request_id][0] + o.new_token_ids, o.finish_reason)
                    if o.finished:
                        done.add(o.request_id)
                if abort and len(got[abort][0]) >= 3:
                    engine.abort_request(abort)
                    abort = None
            assert len(done) == len(reqs)
            return got
        finally:
            engine.shutdown()

    plain = [
        (p, SamplingParams(max_new_tokens=20 + 7 * i, temperature=0.0, ignore_eos=True)) for i, p in enumerate(seqs)
    ]
    ref = run("0", plain)
    assert ref == run("1", plain)
    stops = []
    for i, (p, sp) in enumerate(plain):  # odd requests stop on the token they generate 7th
        ids = [ref[f"r{i}"][0][6]] if i % 2 else []
        stops.append((p, SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=0.0, stop_token_ids=ids)))
    want = run("0", stops)
    assert any(reason == FinishReason.STOP for _, reason in want.values())
    assert run("1", stops) == want
    aborted = run("1", plain, abort="r5")
    assert aborted.pop("r5")[1] == FinishReason.ABORT
    assert aborted == {k: v for k, v in ref.items() if k != "r5"}


def test_engine_pipeline_chains_past_length_limits(gpu_model_dir, monkeypatch):
    """A request reaching its length limit leaves the batch without breaking the chain of pipelined steps: 24
    requests ending at 24 different steps, the same tokens as TURBO_PIPELINE=0, and only the steps that admit
    requests (and the first decode step after them) launched unchained, not one more per request that ends."""
    path = gpu_model_dir("llama")
    cfg = TurboEngineConfig(device="cuda", dtype="float32", num_blocks=256, cache_block_seq_len=BLOCK, session_len=512)
    seqs = prompts(tiny_config("llama").vocab_size, lens=[3 + 5 * i for i in range(24)])
    reqs = [(p, SamplingParams(max_new_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True)) for i, p in enumerate(seqs)]

    def run(pipeline: str):
        monkeypatch.setenv("TURBO_PIPELINE", pipeline)
        engine = TurboEngine(path, cfg)
        try:
            return run_engine(engine, reqs), engine.stats()
        finally:
            engine.shutdown()

    ref, plain = run("0")
    got, piped = run("1")
    assert got == ref
    assert all(len(ref[f"r{i}"][0]) == 6 + 3 * i for i in range(24))
    assert plain.num_pipelined_steps == 0
    # Each step that admits requests and the decode step after it are unchained: the 24 requests arrive within
    # the first few steps. A chain broken by each of the 23 requests that end before the last would leave 25 or
    # more steps unchained.
    assert piped.num_steps - piped.num_pipelined_steps <= 10, (piped.num_steps, piped.num_pipelined_steps)


@pytest.mark.parametrize("num_blocks", [256, 24])
def test_engine_pipelined_steps_with_admissions_match_unpipelined(gpu_model_dir, monkeypatch, num_blocks):
    """Steps chained across admissions: more requests than the batch holds, prefill chunks beside decodes
    (a 32-token budget), sequences at their length limit leaving mid-chain, stop tokens, and (24 blocks) a pool
    small enough to preempt. Same tokens and finish reasons as TURBO_PIPELINE=0."""
    path = gpu_model_dir("llama")
    cfg = TurboEngineConfig(
        device="cuda",
        dtype="float32",
        num_blocks=num_blocks,
        cache_block_seq_len=BLOCK,
        session_len=512,
        max_batch_size=4,
        max_num_batched_tokens=32,
    )
    seqs = prompts(tiny_config("llama").vocab_size, lens=(5, 19, 40, 71, 3, 12, 33, 8, 50))
    plain = [
        (p, SamplingParams(max_new_tokens=9 + 5 * i, temperature=0.0, ignore_eos=True)) for i, p in enumerate(seqs)
    ]

    def run(pipeline: str, reqs) -> dict:
        monkeypatch.setenv("TURBO_PIPELINE", pipeline)
        engine = TurboEngine(path, cfg)
        try:
            return {k: (v[0], v[2]) for k, v in run_engine(engine, reqs).items()}
        finally:
            engine.shutdown()

    ref = run("0", plain)
    assert run("1", plain) == ref
    stops = []
    for i, (p, sp) in enumerate(plain):  # every third request stops on the token it generates 4th
        ids = [ref[f"r{i}"][0][3]] if i % 3 == 0 else []
        stops.append((p, SamplingParams(max_new_tokens=sp.max_new_tokens, temperature=0.0, stop_token_ids=ids)))
    want = run("0", stops)
    assert any(reason == FinishReason.STOP for _, reason in want.values())
    assert run("1", stops) == want
