"""The compiled CPU layers: compiled at warm-up, once for every later batch size, step size and context length,
and running on eagerly when compilation fails. (test_model.py checks their logits against HF.)"""

from __future__ import annotations

import pytest
import torch

from lmkit.model.loader import load_model
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.kernels.decode_kv_cpu import TILED_ROWS
from lmkit.pytorch_engine.model_runner import ModelRunner
from lmkit.pytorch_engine.scheduler import ScheduledBatch
from lmkit.pytorch_engine.sequence import Sequence

BS, NUM_BLOCKS = 4, 2048


def _runner(path, eager: bool = False) -> ModelRunner:
    loaded = load_model(path)
    return ModelRunner(loaded.spec, loaded.weights, NUM_BLOCKS, BS, torch.device("cpu"), torch.float32, eager=eager)


def _steps(runner: ModelRunner, plan: list[list[str]], prompt_len: dict[str, int] | None = None):
    """Run `plan` (per step, the names of the sequences that take part) and yield each step's logits by name.
    A name's first step prefills its prompt (`prompt_len[name]` tokens, 5 by default); later steps decode the
    token its last step's greedy logits chose."""
    bm = BlockManager(NUM_BLOCKS, BS)
    gen = torch.Generator().manual_seed(0)
    seqs: dict[str, Sequence] = {}
    for names in plan:
        batch = ScheduledBatch()
        for name in names:
            if name not in seqs:
                seqs[name] = Sequence(
                    name, torch.randint(0, 320, ((prompt_len or {}).get(name, 5),), generator=gen).tolist()
                )
            seq = seqs[name]
            n = len(seq) - seq.num_computed_tokens
            assert bm.allocate_slots(seq, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        logits, idx = runner.run(batch)
        out = {}
        for row, i in enumerate(idx):
            seq = batch.seqs[i]
            seq.num_computed_tokens = len(seq)
            seq.token_ids.append(int(logits[row].argmax()))
            out[seq.request_id] = logits[row]
        yield out


def test_one_compilation_serves_every_batch_and_context(tiny_model_dir):
    runner = _runner(tiny_model_dir("llama"))
    runner.warm_up()
    model = runner.model
    functions = [*model.decode_path.compiled, *model.prefill_path.compiled]
    graphs = [f.num_graphs for f in functions]
    assert graphs == [1, 2, 1, 1], "warm-up: decode over plain keys; over tiled keys, for one and several; prefill"
    # Prefills of 5 to 35 tokens, alone and mixed with decodes; decode batches of 1 to 7 sequences; contexts
    # from 5 to past 100 tokens cross three steps of the rows' capacity.
    plan = [["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "b", "c", "d", "e", "f", "g"]]
    plan += [["a", "b", "c", "d", "e", "f", "g"]] * 3 + [["b", "d"], ["a", "b", "c"]] * 50 + [["a", "h"]]
    plan += [["a", "b", "c"] + [f"s{i}" for i in range(TILED_ROWS)]] * 3  # more rows than keep keys tiled
    for _ in _steps(runner, plan, prompt_len={"h": 35}):
        pass
    assert runner.model.decode_path.ran and runner.model.prefill_path.ran
    assert [f.num_graphs for f in functions] == graphs, "a step after warm-up compiled a new graph"


@pytest.mark.parametrize("failing", ["decode", "prefill", "decode,prefill"])
def test_runs_eagerly_when_compilation_fails(tiny_model_dir, capfd, failing):
    path = tiny_model_dir("llama")
    runner, reference = _runner(path), _runner(path, eager=True)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    paths = {"decode": runner.model.decode_path, "prefill": runner.model.prefill_path}
    for name in failing.split(","):
        paths[name].compiled = (no_compiler,) * len(paths[name].eager)
    plan = [["a", "b"]] * 6 + [["a", "c"]]
    # Exact where every step ran eagerly; the compiled halves of a path that still compiles round differently.
    tol = 0 if failing == "decode,prefill" else 1e-5
    for got, want in zip(_steps(runner, plan), _steps(reference, plan), strict=True):
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol)
    err = capfd.readouterr().err
    for name, p in paths.items():
        assert p.on == (name not in failing)
        assert (f"compiling the {name} step failed" in err) == (name in failing)


def test_errors_after_a_compiled_step_are_raised(tiny_model_dir):
    runner = _runner(tiny_model_dir("llama"))
    steps = _steps(runner, [["a"], ["a"], ["a"]])
    next(steps), next(steps)  # prefill, then a compiled decode step
    assert runner.model.decode_path.ran

    def failing(*args):
        raise RuntimeError("a bug in a layer")

    runner.model.decode_path.compiled = (failing, failing)
    with pytest.raises(RuntimeError, match="a bug in a layer"):
        next(steps)
    assert runner.decode_kv.seqs == [], "rows that may hold part of the failed step must be dropped"
