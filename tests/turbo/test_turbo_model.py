"""turbo's forward against HF transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testing import step_inputs

from lmkit import _turbo
from lmkit.model.loader import load_model
from lmkit.turbo.engine import model_config
from lmkit.turbo.weights import turbo_weights

KINDS = ["llama", "llama31", "qwen2", "qwen3", "mistral"]


def run_chunks(model, tokens, chunks, block_size, blocks):
    """Feed `tokens` in chunks through the blocked cache; returns logits of every position."""
    out, done = [], 0
    table = torch.tensor([blocks], dtype=torch.int32)
    for n in chunks:
        pos = torch.arange(done, done + n)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in pos.tolist()])
        logits = model.forward(
            torch.tensor(tokens[done : done + n]),
            pos,
            slots,
            table,
            torch.tensor([0, n], dtype=torch.int32),
            torch.tensor([done + n], dtype=torch.int32),
            torch.arange(n),
        )
        out.append(logits)
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(kind, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(kind)
    loaded = load_model(path)
    spec = loaded.spec
    assert (spec.qkv_bias, spec.qk_norm) == (kind == "qwen2", kind == "qwen3")
    weights = turbo_weights(spec, dict(loaded.weights), max_positions=256)
    block_size = 16
    n = 70
    blocks = [5, 2, 7, 0, 3]  # a scattered table
    model = _turbo.Model(model_config(spec), weights, 8, block_size)
    tokens = torch.randint(0, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    # chunked prefill (23, then 40 over 23 cached), then decodes one token at a time
    ours = run_chunks(model, tokens, [23, 40] + [1] * 7, block_size, blocks)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(ours.abs().max()))


def test_batch_of_sequences_matches_single(tiny_model_dir):
    """Two sequences in one call give the same logits as each alone (per-sequence causal masks)."""
    loaded = load_model(tiny_model_dir("llama"))
    weights = turbo_weights(loaded.spec, dict(loaded.weights), max_positions=256)
    model = _turbo.Model(model_config(loaded.spec), weights, 8, 16)
    a, b = list(range(3, 23)), list(range(40, 45))
    single_a = run_chunks(model, a, [20], 16, [0, 1])
    single_b = run_chunks(model, b, [5], 16, [2])
    tokens = torch.tensor(a + b)
    pos = torch.tensor(list(range(20)) + list(range(5)))
    slots = torch.tensor(list(range(32, 52)) + list(range(96, 101)))  # blocks 2, 3 | block 6
    tables = torch.tensor([[2, 3], [6, 0]], dtype=torch.int32)
    logits = model.forward(
        tokens,
        pos,
        slots,
        tables,
        torch.tensor([0, 20, 25], dtype=torch.int32),
        torch.tensor([20, 5], dtype=torch.int32),
        torch.tensor([19, 24]),
    )
    torch.testing.assert_close(logits[0], single_a[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], single_b[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_nano_batches_match_one_batch(kind, tiny_model_dir):
    """Decode steps run as two nano-batches (nano_batch_rows=2: every step of two rows or more) give the one-batch
    logits and write the same KV: five steps over changing, odd-sized and reordered subsets, each fed the greedy
    tokens of the one-batch model; a one-row step stays one batch."""
    loaded = load_model(tiny_model_dir(kind))
    spec = loaded.spec
    weights = turbo_weights(spec, dict(loaded.weights), max_positions=256)
    plain, nano = (_turbo.Model(model_config(spec), weights, 64, 16, nano_batch_rows=n) for n in (0, 2))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, spec.vocab_size, (n,), generator=g).tolist() for n in (5, 19, 40, 33, 9)]
    for m in (plain, nano):  # prefill all but each sequence's last token (a mixed step: never split)
        m.forward(*step_inputs([s[:-1] for s in seqs], [0] * len(seqs), 8, device="cpu"))
    for live in ([0, 1, 2, 3, 4], [0, 2, 4], [4, 1, 3, 2, 0], [3, 1], [2]):
        batch = [seqs[i] for i in live]
        inputs = step_inputs(batch, [len(s) - 1 for s in batch], 8, ids=live, device="cpu")
        want, got = plain.forward(*inputs), nano.forward(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for i, t in zip(live, want.argmax(-1).tolist()):
            seqs[i] = seqs[i] + [t]
