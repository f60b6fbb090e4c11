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
