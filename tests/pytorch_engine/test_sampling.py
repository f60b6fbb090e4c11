"""Sampler vs plain per-row PyTorch references; seeded draws independent of the batch."""

from __future__ import annotations

import pytest
import torch

from lmkit.frontend.protocol import SamplingParams
from lmkit.pytorch_engine.sampling import (
    Sampler,
    SampleRow,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    argmax,
)

V = 50


def logits_batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def ref_keep_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(V, dtype=torch.bool)
    if k <= 0:
        return ~keep
    keep[row.topk(k).indices] = True
    return keep


def ref_keep_top_p(row: torch.Tensor, p: float) -> torch.Tensor:
    probs = row.softmax(-1)
    keep = torch.zeros(V, dtype=torch.bool)
    mass = 0.0
    for i in probs.argsort(descending=True).tolist():
        keep[i] = True
        mass += probs[i].item()
        if mass >= p:
            break
    return keep


def ref_keep_min_p(row: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = row.softmax(-1)
    return probs >= min_p * probs.max()


def kept(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


def test_top_k_matches_reference():
    logits = logits_batch()
    ks = [0, 1, 5, 49]
    out = apply_top_k(logits, torch.tensor(ks))
    for i, k in enumerate(ks):
        assert torch.equal(kept(out[i]), ref_keep_top_k(logits[i], k))
    assert torch.equal(out[kept(out)], logits[kept(out)])


def test_top_p_matches_reference():
    logits = logits_batch()
    ps = [1.0, 0.9, 0.5, 0.01]
    out = apply_top_p(logits, torch.tensor(ps))
    for i, p in enumerate(ps):
        assert torch.equal(kept(out[i]), ref_keep_top_p(logits[i], p)), p
    assert kept(out[3]).sum() == 1


def test_min_p_matches_reference():
    logits = logits_batch()
    mps = [0.0, 0.05, 0.3, 1.0]
    out = apply_min_p(logits, torch.tensor(mps))
    for i, mp in enumerate(mps):
        assert torch.equal(kept(out[i]), ref_keep_min_p(logits[i], mp))


def test_repetition_penalty_matches_reference():
    logits = logits_batch(2)
    seen = [[1, 2, 2, 7], [3, 40]]
    out = logits.clone()
    apply_repetition_penalty(out, seen, [1.3, 0.7])
    for i, (ids, p) in enumerate(zip(seen, [1.3, 0.7])):
        ref = logits[i].clone()
        for t in set(ids):
            ref[t] = ref[t] / p if ref[t] > 0 else ref[t] * p
        assert torch.allclose(out[i], ref)


def row(tokens=(1, 2), step=0, **params) -> SampleRow:
    return SampleRow(SamplingParams(**params), list(tokens), step)


def test_greedy_and_penalty():
    logits = logits_batch(2)
    tokens, _ = Sampler()(logits, [row(temperature=0), row(temperature=0.0)])
    assert tokens == logits.argmax(-1).tolist()
    top = int(logits[0].argmax())
    tokens, _ = Sampler()(logits[:1], [row(tokens=[top], temperature=0, repetition_penalty=1000.0)])
    assert tokens[0] != top


def test_seeded_draw_is_independent_of_batch():
    logits = logits_batch(6, seed=1)
    params = dict(temperature=1.0, top_p=0.95, top_k=20, seed=1234)
    alone, _ = Sampler()(logits[2:3], [row(step=5, **params)])
    crowd_rows = [row(step=i, temperature=0.7) for i in range(6)]
    crowd_rows[2] = row(step=5, **params)
    crowd, _ = Sampler()(logits, crowd_rows)
    assert crowd[2] == alone[0]
    # Different steps or seeds give a different stream (over many draws).
    draws = [Sampler()(logits[2:3], [row(step=s, temperature=5.0, seed=1234)])[0][0] for s in range(20)]
    assert len(set(draws)) > 1


def test_sampled_distribution_follows_probs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-1e9] * (V - 4)])
    counts = torch.zeros(V)
    for s in range(3000):
        counts[Sampler()(logits, [row(step=s, seed=7, temperature=1.0)])[0][0]] += 1
    expected = logits[0].softmax(-1)
    assert torch.allclose(counts / 3000, expected, atol=0.03)
    top_k_counts = set()
    for s in range(200):
        top_k_counts.add(Sampler()(logits, [row(step=s, seed=7, temperature=1.0, top_k=2)])[0][0])
    assert top_k_counts == {0, 1}


@pytest.mark.parametrize("n", [0, 3])
def test_logprobs_are_of_raw_logits(n):
    logits = logits_batch(2)
    tokens, lps = Sampler()(logits, [row(temperature=0, logprobs=n, repetition_penalty=2.0), row(temperature=0)])
    ref = logits.log_softmax(-1)
    assert lps[1] is None
    lp = lps[0]
    assert lp.token_id == tokens[0]
    assert lp.logprob == pytest.approx(ref[0, tokens[0]].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == ref[0].topk(n).indices.tolist()
    assert all(v == pytest.approx(ref[0, t].item(), abs=1e-6) for t, v in lp.top)


@pytest.mark.parametrize("vocab", [4096, 5000, 49152, 128256])
def test_argmax_matches_torch(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g).bfloat16().float()  # bf16 values: many ties
    logits[1, :] = 0.0  # all equal: the first index
    logits[2, -1] = 100.0  # the very last token
    logits[3, [5, vocab - 3]] = 50.0  # tied maxima in different chunks: the first
    logits[4, 7] = float("nan")  # NaN counts as the largest, as in torch.argmax
    logits[5, :] = float("-inf")
    assert argmax(logits).tolist() == logits.argmax(-1).tolist()
