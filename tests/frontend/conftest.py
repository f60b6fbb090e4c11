"""A scripted fake Engine (the token-level protocol) and the real SmolLM2 tokenizer, for front-end tests."""

from __future__ import annotations

import threading
import time

import pytest

from lmkit.frontend.protocol import (
    EngineCapabilities,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    TokenLogprob,
)


class FakeEngine:
    """Answers every request with `script(request)` (a list of token ids), `tokens_per_step` per step.

    Honours max_new_tokens, stop_token_ids, ignore_eos, abort and logprobs (made-up values); records every
    request it was given and every abort.
    """

    capabilities = EngineCapabilities(max_top_logprobs=5)

    def __init__(
        self, script, vocab_size: int = 49152, session_len: int = 256, tokens_per_step: int = 1, step_s: float = 0.001
    ) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.session_len = session_len
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.requests: dict[str, EngineRequest] = {}
        self.aborted: list[str] = []
        self._live: dict[str, list] = {}  # id -> [request, tokens, position]
        self._outputs: list[EngineOutput] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def add_request(self, request: EngineRequest) -> None:
        if not request.prompt_token_ids:
            raise InvalidRequestError("empty prompt")
        if request.sampling.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1")
        with self._cv:
            self.requests[request.request_id] = request
            self._live[request.request_id] = [request, list(self.script(request)), 0]
            self._cv.notify_all()

    def abort_request(self, request_id: str) -> None:
        with self._cv:
            self.aborted.append(request_id)
            if self._live.pop(request_id, None) is not None:
                self._outputs.append(EngineOutput(request_id, [], finish_reason=FinishReason.ABORT))
                self._cv.notify_all()

    def get_outputs(self, timeout: float | None = None) -> list[EngineOutput]:
        with self._cv:
            if not self._outputs:
                self._cv.wait(timeout)
            out, self._outputs = self._outputs, []
            return out

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(num_running=len(self._live))

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                for rid in list(self._live):
                    out = self._advance(rid)
                    if out is not None:
                        self._outputs.append(out)
                if self._outputs:
                    self._cv.notify_all()
            time.sleep(self.step_s)

    def _advance(self, rid: str) -> EngineOutput | None:
        req, tokens, pos = self._live[rid]
        sp = req.sampling
        new, finish = [], None
        for _ in range(self.tokens_per_step):
            if pos >= len(tokens):
                finish = FinishReason.LENGTH  # the script ran out: behave like a length cut
                break
            tid = tokens[pos]
            pos += 1
            new.append(tid)
            if tid in sp.stop_token_ids and not sp.ignore_eos:
                finish = FinishReason.STOP
                break
            if pos >= sp.max_new_tokens:
                finish = FinishReason.LENGTH
                break
        self._live[rid][2] = pos
        if finish is not None:
            del self._live[rid]
        if not new and finish is None:
            return None
        lps = None
        if sp.logprobs is not None:
            lps = [TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5)][: sp.logprobs]) for t in new]
        return EngineOutput(rid, new, lps, finish, num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=3)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from lmkit.frontend.tokenizer import Tokenizer

    return Tokenizer(smollm2_dir)


@pytest.fixture
def make_async_engine(tokenizer):
    """Factory: make_async_engine(script, **fake_engine_kwargs) -> AsyncEngine over a FakeEngine."""
    from lmkit.frontend.async_engine import AsyncEngine

    made = []

    def make(script, **kwargs):
        ae = AsyncEngine(FakeEngine(script, **kwargs), tokenizer, "fake", "fake")
        made.append(ae)
        return ae

    yield make
    for ae in made:
        ae.shutdown()
