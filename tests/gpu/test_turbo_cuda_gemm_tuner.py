"""turbo's GEMM tuner (kernels/cuda/gemm_tuner.cc, TURBO_GEMM_TUNE=1): every cuBLASLt candidate it may pick, and
its pick, against a float32 product of the same inputs; the tuned model's decode graphs against the eager model."""

from __future__ import annotations

import pytest
import torch

from lmkit import _turbo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not getattr(_turbo, "cuda_built", lambda: False)(), reason="_turbo built without CUDA"),
]

# (out, in): Llama-3-8B's qkv and down projections, and a small one.
SHAPES = [(6144, 4096), (4096, 14336), (256, 128)]


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().T


def assert_close_rel(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-2 and torch.isfinite(got).all(), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [7, 300])
def test_every_candidate_matches_reference(rows, shape, dtype):
    """Each candidate cuBLASLt's heuristic offers computes x @ w.T (layouts and transposes are right)."""
    torch.manual_seed(0)
    x = torch.randn(rows, shape[1], device="cuda", dtype=dtype)
    w = torch.randn(*shape, device="cuda", dtype=dtype) / shape[1] ** 0.5
    want = reference(x, w)
    n = len(_turbo.time_gemm_candidates(x, [w], 12)) - 1
    assert n >= 1, "cuBLASLt offered no candidate"
    for i in range(n):
        y = _turbo.run_gemm_candidate(x, w, i)
        assert y.shape == (rows, shape[0])
        assert_close_rel(y, want)
    with pytest.raises(RuntimeError, match="no index"):
        _turbo.run_gemm_candidate(x, w, n)


@pytest.mark.parametrize("rows", [1, 2, 16, 37, 256, 1000, 1024, 2048])
def test_tuned_linear_matches_reference(rows):
    """The tuner's pick (after timing over the rotation of registered weights) at decode and prefill sizes."""
    torch.manual_seed(1)
    ws = [torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(3)]
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    for i in (0, 2):
        assert_close_rel(_turbo.tuned_linear(x, ws, i), reference(x, ws[i]))


def test_unsupported_inputs_take_the_default_path():
    """A strided x and float32 inputs are outside cuBLASLt's path here: the default path serves them."""
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)[:, :128]  # rows 256 elements apart
    assert_close_rel(_turbo.tuned_linear(x, [w]), reference(x, w))
    w32, x32 = w.float(), x.float().contiguous()
    torch.testing.assert_close(_turbo.tuned_linear(x32, [w32]), x32 @ w32.T, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="unsupported"):
        _turbo.run_gemm_candidate(x, w, 0)
