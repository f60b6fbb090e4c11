"""The PyTorch engine's Linear: oneDNN-packed on CPU, with rows padded and split to bound oneDNN's kernel cache."""

import pytest
import torch
import torch.nn.functional as F

from lmkit.pytorch_engine.models.linear import Linear, packs_on, padded_rows, row_pieces


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 256, 257, 512, 600, 2048, 2100])
def test_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    w, b = torch.randn(96, 64), torch.randn(96) if bias else None
    x, residual = torch.randn(rows, 64), torch.randn(rows, 96)
    lin = Linear(w, b)
    assert lin.packed == packs_on(w.device, w.dtype)
    assert lin.out_features == 96
    torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.add(x, residual), residual + F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_strided_input():
    w, x = torch.randn(32, 48), torch.randn(10, 96)[:, ::2]
    torch.testing.assert_close(Linear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_row_shapes_are_bounded():
    shapes = {padded_rows(r) for r in range(1, 257)}
    assert all(s >= 1 and s % 16 == 0 for s in shapes if s > 16)
    assert len(shapes) == 16 + 15
    assert all(padded_rows(r) >= r and padded_rows(r) - r < 16 for r in range(1, 257))


def test_row_pieces_cover_the_rows_in_few_shapes():
    shapes = set()
    for rows in range(1, 5000):
        pieces = row_pieces(rows)
        assert [s for s, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(len(pieces))]
        assert sum(n for _, n in pieces) == rows
        assert all(n % 256 == 0 and n <= 2048 for _, n in pieces[:-1])
        shapes |= {n if n > 256 else padded_rows(n) for _, n in pieces}
    assert len(shapes) == 38
    assert row_pieces(2048) == [(0, 2048)] and row_pieces(300) == [(0, 256), (256, 44)]
