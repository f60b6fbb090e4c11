"""The compiled CPU decode step: compiled at warm-up, once for every later batch size and context length, and
decoding on eagerly when compilation fails. (test_model.py checks its logits against HF.)"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lmkit.model.loader import load_model
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.model_runner import ModelRunner
from lmkit.pytorch_engine.scheduler import ScheduledBatch
from lmkit.pytorch_engine.sequence import Sequence

BS, NUM_BLOCKS = 4, 512


def _runner(path, eager: bool = False) -> ModelRunner:
    loaded = load_model(path)
    return ModelRunner(loaded.spec, loaded.weights, NUM_BLOCKS, BS, torch.device("cpu"), torch.float32, eager=eager)


def _steps(runner: ModelRunner, plan: list[list[str]], prompt_len: int = 5):
    """Run `plan` (per step, the names of the sequences that take part) and yield each step's logits by name.
    A name's first step prefills its prompt; later steps decode the token its last step's greedy logits chose."""
    bm = BlockManager(NUM_BLOCKS, BS)
    gen = torch.Generator().manual_seed(0)
    seqs: dict[str, Sequence] = {}
    for names in plan:
        batch = ScheduledBatch()
        for name in names:
            if name not in seqs:
                seqs[name] = Sequence(name, torch.randint(0, 320, (prompt_len,), generator=gen).tolist())
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
    graphs = counters["stats"]["unique_graphs"]
    # Batches of 1 to 7 sequences; contexts from 5 to past 100 tokens cross three steps of the rows' capacity.
    plan = [["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "b", "c", "d", "e", "f", "g"]]
    plan += [["a", "b", "c", "d", "e", "f", "g"]] * 3 + [["b", "d"], ["a", "b", "c"]] * 50
    for _ in _steps(runner, plan):
        pass
    assert runner.model._compiled_once
    assert counters["stats"]["unique_graphs"] == graphs, "a decode step after warm-up compiled a new graph"


def test_decodes_eagerly_when_compilation_fails(tiny_model_dir, capfd):
    path = tiny_model_dir("llama")
    runner, reference = _runner(path), _runner(path, eager=True)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    runner.model._compiled_layer = no_compiler
    plan = [["a", "b"]] * 6
    for got, want in zip(_steps(runner, plan), _steps(reference, plan)):
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert not runner.model.compiles_decode
    assert "torch.compile of the decode step failed" in capfd.readouterr().err


def test_errors_after_a_compiled_step_are_raised(tiny_model_dir):
    runner = _runner(tiny_model_dir("llama"))
    steps = _steps(runner, [["a"], ["a"], ["a"]])
    next(steps), next(steps)  # prefill, then a compiled decode step
    assert runner.model._compiled_once

    def failing(*args):
        raise RuntimeError("a bug in a layer")

    runner.model._compiled_layer = failing
    with pytest.raises(RuntimeError, match="a bug in a layer"):
        next(steps)
    assert runner.decode_kv.seqs == [], "rows that may hold part of the failed step must be dropped"
