"""Model forward over the paged cache vs HF transformers (fp32), through every attention path:
whole-prompt prefill, prefill chunks over a cached context, and batched decode with padded contexts, the
decode-only steps both compiled (the default on CPU) and eager."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_COMMON

from lmkit.model.loader import load_model
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.kernels import attention_cpu
from lmkit.pytorch_engine.model_runner import ModelRunner
from lmkit.pytorch_engine.scheduler import ScheduledBatch
from lmkit.pytorch_engine.sequence import Sequence

BS = 4
NUM_BLOCKS = 512  # enough for the decode batch's dense KV rows (at most half the pool)


@pytest.fixture(scope="module")
def windowed_mistral_dir(tmp_path_factory):
    """A tiny Mistral whose sliding window (16) is shorter than the test sequences."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(**TINY_COMMON, rope_theta=10000.0, sliding_window=16)
    path = tmp_path_factory.mktemp("tiny-mistral-window")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen2", "qwen3", "mistral", "mistral-window"])
def test_logits_match_hf(kind, eager, tiny_model_dir, request, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue("windowed_mistral_dir") if kind == "mistral-window" else tiny_model_dir(kind)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded = load_model(path)
    assert (loaded.spec.sliding_window is not None) == (kind == "mistral-window")
    runner = ModelRunner(loaded.spec, loaded.weights, NUM_BLOCKS, BS, torch.device("cpu"), torch.float32, eager=eager)
    bm = BlockManager(NUM_BLOCKS, BS)
    gen = torch.Generator().manual_seed(1)
    # Sequence a: prefilled in two chunks (the second over a cached context), decoded, then one more chunk.
    # Sequences b and c: prefilled whole (one padded batch) while a decodes, then decoded alongside a
    # (contexts of different lengths).
    texts = {name: torch.randint(0, 320, (n,), generator=gen) for name, n in [("a", 90), ("b", 70), ("c", 66)]}
    with torch.no_grad():
        refs = {k: hf(v[None]).logits[0] for k, v in texts.items()}
    plan = [{"a": (13, 13)}, {"a": (40, 27)}, {"a": (41, 1), "b": (50, 50), "c": (46, 46)}]
    plan += [{"a": (41 + i, 1), "b": (50 + i, 1), "c": (46 + i, 1)} for i in range(1, 20)]
    # Then a chunk of a over its cached context, which the decode steps wrote, while b and c decode.
    plan += [{"a": (90, 30), "b": (70, 1), "c": (66, 1)}]
    seqs = {k: Sequence(k, []) for k in texts}
    batched = []
    real_prefill_batch = attention_cpu._prefill_batch
    monkeypatch.setattr(attention_cpu, "_prefill_batch", lambda *a: batched.append(1) or real_prefill_batch(*a))
    worst = 0.0
    for step in plan:
        batch = ScheduledBatch()
        for name, (end, n) in step.items():
            s = seqs[name]
            s.token_ids = texts[name][:end].tolist()
            assert bm.allocate_slots(s, n)
            batch.seqs.append(s)
            batch.num_new_tokens.append(n)
        logits, idx = runner.run(batch)
        for row, i in enumerate(idx):
            s = batch.seqs[i]
            worst = max(worst, (logits[row] - refs[s.request_id][len(s) - 1]).abs().max().item())
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
    assert worst < 1e-4
    for path in (runner.model.decode_path, runner.model.prefill_path):
        assert path.on == (not eager) and path.ran == (not eager), path.name
    if kind != "mistral-window":  # chunks longer than the window read the cache with a window mask
        assert batched, "b and c should have been prefilled as one padded batch"
