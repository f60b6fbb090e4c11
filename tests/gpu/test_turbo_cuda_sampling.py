"""On-device sampling and penalties of the turbo engine (src/turbo/kernels/cuda/sampling.cu, JIT-built by
cuda_harness) against the PyTorch engine's filter semantics (lmkit/pytorch_engine/sampling.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ops():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import cuda_harness

    return cuda_harness.load()


# ---------------------------------------------------------------- sampling


def _params(b, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, steps=None):
    dev = "cuda"
    return dict(
        temperature=torch.full((b,), temperature, device=dev),
        top_k=torch.full((b,), top_k, dtype=torch.int32, device=dev),
        top_p=torch.full((b,), top_p, device=dev),
        min_p=torch.full((b,), min_p, device=dev),
        seeds=torch.full((b,), seed, dtype=torch.int64, device=dev),
        steps=(torch.arange(b, device=dev) if steps is None else steps).to(torch.int64),
    )


def _sample(ops, logits, p):
    out = torch.full((logits.shape[0],), -7, dtype=torch.int64, device="cuda")
    ops.sample(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seeds"], p["steps"], out)
    return out


def _allowed(logits, temperature, top_k, top_p, min_p):
    """The tokens the PyTorch engine's filters keep (lmkit/pytorch_engine/sampling.py semantics)."""
    x = logits / temperature
    v = x.shape[-1]
    if 0 < top_k < v:
        kth = x.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, order = x.sort(dim=-1, descending=True)
        probs = sx.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
    if min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return x > float("-inf")


def test_greedy_is_argmax(ops):
    logits = torch.randn(64, 151936, device="cuda")
    logits[5, 77] = logits[5, 1000] = 100.0  # tie: the first index wins, like torch.argmax
    p = _params(64, temperature=0.0)
    assert torch.equal(_sample(ops, logits, p), logits.argmax(-1))
    p = _params(64, temperature=0.7, top_k=1)
    assert torch.equal(_sample(ops, logits, p), logits.argmax(-1))


def test_seeded_draws_do_not_depend_on_batch(ops):
    v = 32000
    logits = torch.randn(8, v, device="cuda") * 2
    p = _params(8, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    p["seeds"] = torch.arange(8, device="cuda") * 7919 + 1
    full = _sample(ops, logits, p)
    again = _sample(ops, logits, p)
    assert torch.equal(full, again)
    for idx in ([3], [5, 1], [7, 0, 2]):  # other batch compositions, other orders
        sub = {k: t[idx] for k, t in p.items()}
        assert torch.equal(_sample(ops, logits[idx].contiguous(), sub), full[idx])
    # a different step or seed gives other draws (somewhere)
    p2 = dict(p, steps=p["steps"] + 1)
    assert not torch.equal(_sample(ops, logits.repeat(8, 1), {k: t.repeat(8) for k, t in p2.items()}), full.repeat(8))


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 5, 1.0, 0.0),
        (1.0, 0, 0.5, 0.0),
        (0.7, 0, 1.0, 0.2),
        (1.3, 40, 0.8, 0.05),
        (1.0, 0, 0.0, 0.0),
        (2.0, 1000, 0.95, 0.0),
    ],
)
def test_filters_never_pick_a_filtered_token(ops, temperature, top_k, top_p, min_p):
    v, n = 50000, 4096
    base = torch.randn(1, v, device="cuda") * 3
    logits = base.expand(n, v).contiguous()
    p = _params(n, temperature, top_k, top_p, min_p, seed=42)
    tokens = _sample(ops, logits, p)
    allowed = _allowed(base, temperature, top_k, top_p, min_p)[0]
    assert allowed[tokens].all(), "a filtered token was drawn"
    if allowed.sum() > 1:
        assert tokens.unique().numel() > 1


@pytest.mark.parametrize("top_k", [0, 3])
def test_distribution_matches_softmax(ops, top_k):
    v, n = 10, 40000
    base = torch.randn(1, v, device="cuda")
    logits = base.expand(n, v).contiguous()
    p = _params(n, 0.8, top_k, seed=7)
    tokens = _sample(ops, logits, p)
    x = base[0] / 0.8
    if top_k:
        kth = x.sort(descending=True).values[top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    expected = x.softmax(-1) * n
    counts = torch.bincount(tokens, minlength=v).float()
    keep = expected > 0
    assert (counts[~keep] == 0).all()
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 40.0, f"chi-square {chi2:.1f} over {int(keep.sum()) - 1} degrees of freedom"


def test_penalties_and_logprobs(ops):
    b, v = 4, 1000
    logits = torch.randn(b, v, device="cuda") * 4
    ids = torch.randint(0, v, (b, 30), device="cuda")
    ids[:, -5:] = -1
    ids[0, :3] = 5  # duplicates penalised once
    pen = torch.tensor([1.0, 1.3, 0.8, 2.0], device="cuda")
    ref = logits.clone()
    for i in range(b):
        seen = ids[i][ids[i] >= 0].unique()
        row = ref[i, seen]
        ref[i, seen] = torch.where(row > 0, row / pen[i], row * pen[i])
    got = logits.clone()
    ops.repetition_penalty(got, ids, pen)
    torch.testing.assert_close(got, ref)
    counts = torch.zeros(b, v, dtype=torch.int32, device="cuda")
    counts.scatter_add_(1, ids.clamp_min(0), (ids >= 0).int())
    freq, pres = torch.tensor([0.0, 0.5, 1.0, 0.2], device="cuda"), torch.tensor([0.3, 0.0, 1.0, 0.1], device="cuda")
    got = logits.clone()
    ops.apply_penalties(got, counts, pen, freq, pres)
    ref2 = ref - (freq[:, None] * counts + pres[:, None] * (counts > 0)).float()
    torch.testing.assert_close(got, ref2)
    tokens = torch.randint(0, v, (b,), device="cuda")
    chosen, top_v, top_i = ops.logprobs(logits, tokens, 5)
    lp = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, lp.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(top_v, lp.topk(5).values)
