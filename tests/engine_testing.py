"""Drive an Engine synchronously in tests (shared by both engines' suites)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmkit.frontend.protocol import EngineOutput, EngineRequest, SamplingParams


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    outputs: list[EngineOutput] = field(default_factory=list)

    @property
    def last(self) -> EngineOutput:
        return self.outputs[-1]


def collect(engine, request_ids, timeout: float = 120.0) -> dict[str, Result]:
    results = {rid: Result() for rid in request_ids}
    pending = set(request_ids)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"timed out waiting for {sorted(pending)}"
        for out in engine.get_outputs(timeout=1.0):
            r = results[out.request_id]
            r.outputs.append(out)
            r.token_ids += out.new_token_ids
            if out.finished:
                pending.discard(out.request_id)
    return results


def generate(engine, prompts: dict[str, list[int]], sampling: SamplingParams) -> dict[str, Result]:
    for rid, ids in prompts.items():
        engine.add_request(EngineRequest(rid, ids, sampling))
    return collect(engine, list(prompts))


def wait_idle(engine, baseline_free: int, timeout: float = 30.0) -> None:
    """Wait until the engine runs nothing and every block is free again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_blocks_free == baseline_free:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


# The acceptance prompt set of both engines' SmolLM2 parity tests: chat prompts that share a system prompt (a
# common prefix of several blocks) and raw completions of mixed lengths.
PARITY_NEW_TOKENS = 64
_SYSTEM = "You are a terse assistant who answers questions about geography and history in one paragraph."
_CHATS = [
    "What is the capital of France?",
    "Name three rivers in Africa and say which is the longest.",
    "Who built the pyramids of Giza?",
    "Explain in detail why the Roman Empire fell, covering economics, the military, politics and the "
    "pressure of migrating peoples on its borders over several centuries.",
]
_RAW = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
    "The history of the printing press begins",
]


def parity_prompts(model_dir) -> dict[str, list[int]]:
    """{"chat0".."chat3", "raw0".."raw3": token ids}."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for i, q in enumerate(_CHATS):
        text = tok.apply_chat_template(
            [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        out[f"chat{i}"] = tok.encode(text, add_special_tokens=False)
    for i, text in enumerate(_RAW):
        out[f"raw{i}"] = tok.encode(text)
    return out


def hf_greedy(model_dir, prompts: dict[str, list[int]], new_tokens: int) -> dict[str, list[int]]:
    """HF transformers' greedy tokens in fp32, one prompt at a time (no batching, no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = {}
    with torch.inference_mode():
        for rid, ids in prompts.items():
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
            ref[rid] = out[0, len(ids) :].tolist()
    return ref


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_wave(engine, prefix: str, n: int, rng, vocab: int, num_blocks: int, max_new_tokens: int = 5) -> None:
    """n short requests with random prompts, lengths and temperatures, a third of them cancelled at random
    moments: every request must end exactly once, and the pool must be back to `num_blocks` free blocks."""
    ids = []
    ends: dict[str, int] = {}
    for i in range(n):
        rid = f"{prefix}{i}"
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
        sampling = SamplingParams(max_new_tokens=rng.randrange(1, max_new_tokens), temperature=rng.choice([0.0, 1.0]))
        engine.add_request(EngineRequest(rid, prompt, sampling))
        ids.append(rid)
        if rng.random() < 0.33:
            engine.abort_request(ids[rng.randrange(len(ids))])
        for out in engine.get_outputs(0):
            if out.finished:
                ends[out.request_id] = ends.get(out.request_id, 0) + 1
    deadline = time.monotonic() + 120
    while len(ends) < n:
        assert time.monotonic() < deadline, f"{n - len(ends)} requests never finished"
        for out in engine.get_outputs(1.0):
            if out.finished:
                ends[out.request_id] = ends.get(out.request_id, 0) + 1
    assert set(ends) == set(ids) and set(ends.values()) == {1}
    wait_idle(engine, num_blocks)
