"""benchmark/throughput_floor.py: the per-step floor summed over a run, on a case worked by hand."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("throughput_floor", REPO / "benchmark" / "throughput_floor.py")
tf = importlib.util.module_from_spec(_spec)
sys.modules["throughput_floor"] = tf  # its dataclasses look their module up
_spec.loader.exec_module(tf)

# 1 s to read the weights, 0.5 s of GEMMs per token, 0.02 s per cached token of KV.
COSTS = tf.StepCosts(weight_bytes=100.0, flops_per_token=10.0, kv_bytes_per_token=2.0)


@pytest.mark.parametrize(
    ("max_batch", "decode_weights_s", "decode_kv_s", "steps"),
    [
        # Both requests at once: steps of contexts (4, 2) then (5, 3), each max(1 s, 2 x 0.5 s) = 1 s.
        (2, 2.0, (6 + 8) * 0.02, 2),
        # One at a time: (4), (5), then (2), (3): four steps of 1 s.
        (1, 4.0, (4 + 5 + 2 + 3) * 0.02, 4),
    ],
)
def test_floor_by_hand(max_batch, decode_weights_s, decode_kv_s, steps):
    f = tf.floor([3, 1], [3, 3], COSTS, bandwidth=100.0, matrix_rate=20.0, max_batch=max_batch)
    assert f.prefill_s == pytest.approx(4 * 10 / 20)
    assert f.decode_weights_s == pytest.approx(decode_weights_s)
    assert f.decode_kv_s == pytest.approx(decode_kv_s)
    assert f.decode_steps == steps and f.output_tokens == 6
    assert f.output_tok_s == pytest.approx(6 / (2.0 + decode_weights_s + decode_kv_s))


def test_gemm_bound_steps_and_one_token_outputs():
    # Batch 4 at 0.5 s of GEMMs a token is FLOP-bound (2 s a step); a one-token output needs no decode step.
    f = tf.floor([1, 1, 1, 1, 5], [2, 2, 2, 2, 1], COSTS, bandwidth=100.0, matrix_rate=20.0, max_batch=8)
    assert f.decode_steps == 1 and f.decode_weights_s == pytest.approx(2.0)
    assert f.decode_kv_s == pytest.approx(4 * 2 * 0.02)


def test_llama3_8b_costs():
    c = tf.model_costs(REPO / "benchmark" / "configs" / "llama-3-8b")
    assert c.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    # 8.03B parameters less the 0.53B embedding table, in bf16; two FLOPs per matrix weight.
    assert c.weight_bytes == pytest.approx(15.01e9, rel=1e-3)
    assert c.flops_per_token == pytest.approx(2 * 7.50e9, rel=1e-3)


def test_bad_input():
    with pytest.raises(ValueError):
        tf.floor([1, 2], [3], COSTS, 1.0, 1.0, 4)
    with pytest.raises(ValueError):
        tf.floor([1], [3], COSTS, 1.0, 1.0, 0)


def test_profile_throughput_reports_the_floor_and_each_engines_share():
    sys.path.insert(0, str(REPO / "benchmark"))
    import profile_throughput as pt
    from bench_data import BenchRequest

    reqs = [BenchRequest([1] * 100, 100, 50), BenchRequest([1] * 20, 20, 10)]
    model = REPO / "benchmark" / "configs" / "llama-3-8b"
    f = tf.floor([100, 20], [50, 10], tf.model_costs(model), 4.0e12, 700e12, 8)
    line = pt.floor_report(model, "bfloat16", reqs, 8, 4.0e12, 700e12, {"turbo": f.output_tok_s / 2})
    assert f"= {f.total_s:.2f} s, {f.output_tok_s:,.0f} output tok/s" in line
    assert "4.00 TB/s" in line and "700 TFLOP/s" in line and line.endswith("turbo at 50% of it")
