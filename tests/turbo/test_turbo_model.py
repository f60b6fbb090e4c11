"""turbo's forward against HF transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import math

import pytest
import torch

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
