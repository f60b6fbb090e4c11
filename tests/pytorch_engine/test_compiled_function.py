"""CompiledFunction: traced once with the marked dims symbolic, compiled by Inductor, called without Dynamo."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lmkit.pytorch_engine.models.compiled import CompiledFunction
from lmkit.pytorch_engine.models.linear import Linear


@dataclass(slots=True)
class Weights:
    scale: torch.Tensor
    proj: Linear
    extra: torch.Tensor | None


def layer(x: torch.Tensor, w: Weights, pair: tuple, rows: torch.Tensor) -> torch.Tensor:
    """x [n, 16]; rows [cap, 4, 8], of which the first n * 8 values are overwritten, then read (all, and the
    first n)."""
    a, b = pair
    y = w.proj(x * w.scale) * a + b
    rows.view(-1, 8)[: x.shape[0]].copy_(y[:, :8])  # an input mutated in place
    return torch.softmax(y, dim=-1) + rows[: x.shape[0]].sum(dim=(1, 2))[:, None] + rows.sum()


def inputs(n: int, cap: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, a, b = (torch.randn(n, 16, generator=g) for _ in range(3))
    rows = torch.randn(cap, 4, 8, generator=g)
    for t in (x, a, b):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return x, (a, b), rows


@pytest.mark.parametrize("bias", [False, True])
def test_matches_eager_for_every_size_with_one_graph(bias):
    g = torch.Generator().manual_seed(0)
    w = Weights(
        torch.randn(16, generator=g), Linear(torch.randn(16, 16, generator=g), torch.randn(16) if bias else None), None
    )
    f = CompiledFunction(layer)
    # The first call's batch equals the rows' capacity: they must still be two dims, not one.
    for seed, (n, cap) in enumerate([(8, 8), (3, 8), (5, 16), (16, 16), (2, 40), (1, 8), (1, 16), (7, 9)]):
        x, pair, rows = inputs(n, cap, seed)
        want_rows = rows.clone()
        want = layer(x, w, pair, want_rows)
        got = f(x, w, pair, rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-5)
    assert f.num_graphs == 2, "one graph for every size above 1, one for a batch of 1"


def test_refuses_strided_inputs():
    w = Weights(torch.ones(16), Linear(torch.eye(16)), None)
    x, pair, rows = inputs(4, 8, 0)
    with pytest.raises(ValueError, match="contiguous"):
        CompiledFunction(layer)(x.t().contiguous().t(), w, pair, rows)


def test_a_call_that_breaks_what_tracing_assumed_gets_its_own_graph():
    """Traced where the narrowed length equals the rows' capacity, the narrow is the whole tensor, and the graph
    treats the two sizes as one; without its guards a later call where they differ fails or reads past the
    narrowed part."""

    def scores(q: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.bmm(q, rows.narrow(1, 0, bias.shape[-1]).transpose(1, 2)) + bias

    f = CompiledFunction(scores)
    for r, capacity, width in [(4, 8, 8), (4, 8, 5), (6, 16, 16), (6, 16, 9)]:
        q, rows, bias = torch.randn(r, 2, 4), torch.randn(r, capacity, 4), torch.randn(r, 1, width)
        for t, dim in ((q, 0), (rows, 0), (rows, 1), (bias, 0), (bias, 2)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        torch.testing.assert_close(f(q, rows, bias), scores(q, rows, bias))
    assert f.num_graphs == 2, "one graph where width equals the capacity, one where it is less"
