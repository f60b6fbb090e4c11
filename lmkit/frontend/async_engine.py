"""AsyncEngine: the shared front-end over any Engine.

template -> tokenize -> validate -> submit -> stream token ids -> detokenize -> stop strings -> Response.
One background thread pumps `engine.get_outputs()` and hands each output to the event loop that is
waiting for it (`loop.call_soon_threadsafe`), so several loops may use one AsyncEngine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmkit.frontend.errors import RequestError
from lmkit.frontend.protocol import (
    Engine,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
)
from lmkit.frontend.stop import StopMatcher
from lmkit.frontend.tokenizer import Tokenizer
from lmkit.messages import GenerationConfig, Response

logger = logging.getLogger("lmkit")

Prompt = str | list[dict] | list[int]


@dataclass(slots=True)
class _Waiter:
    """Where the pump delivers the outputs of one engine request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class _Choice:
    """The per-choice stream state: detokenizer, stop matcher, counters."""

    def __init__(
        self, async_engine: AsyncEngine, index: int, request_id: str, prompt_ids: list[int], gen: GenerationConfig
    ) -> None:
        self.index = index
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_ids)
        self.detok = async_engine.tokenizer.detokenizer(prompt_ids, gen.skip_special_tokens)
        self.stop = StopMatcher(gen.stop)
        self.num_generated = 0
        self.num_cached = 0
        self.finished = False
        self.stopped_by_string = False

    def process(self, out: EngineOutput) -> Response:
        """Turn one engine output into one Response chunk (ids past a stop string are dropped)."""
        self.num_cached = max(self.num_cached, out.num_cached_tokens)
        pieces: list[str] = []
        ids: list[int] = []
        logprobs: list[dict] | None = [] if out.logprobs is not None else None
        for k, tid in enumerate(out.new_token_ids):
            ids.append(tid)
            if logprobs is not None and k < len(out.logprobs):
                lp = out.logprobs[k]
                logprobs.append({"token_id": lp.token_id, "logprob": lp.logprob, "top": list(lp.top)})
            text, hit = self.stop.feed(self.detok.step([tid]))
            pieces.append(text)
            if hit:
                self.stopped_by_string = True
                break
        self.num_generated += len(ids)
        finish: str | None = None
        if self.stopped_by_string:
            finish = FinishReason.STOP.value
        elif out.finish_reason is not None:
            text, hit = self.stop.feed(self.detok.flush())
            pieces.append(text)
            if hit:
                self.stopped_by_string = True
                finish = FinishReason.STOP.value
            else:
                pieces.append(self.stop.flush())
                finish = FinishReason(out.finish_reason).value
        self.finished = finish is not None
        return Response(
            text="".join(pieces),
            generate_token_len=self.num_generated,
            input_token_len=self.num_prompt_tokens,
            finish_reason=finish,
            token_ids=ids,
            logprobs=logprobs,
            index=self.index,
            error=out.error if finish == FinishReason.ERROR.value else None,
            num_cached_tokens=self.num_cached,
        )


class AsyncEngine:
    """The shared front-end: template -> tokenize -> submit -> stream -> detokenize -> stop strings."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, backend: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.backend = backend
        self.session_len: int = engine.session_len
        self._waiters: dict[str, _Waiter] = {}  # engine request id -> where its outputs go
        self._groups: dict[str, list[str]] = {}  # user request id -> its engine request ids (n of them)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._pump = threading.Thread(target=self._pump_outputs, name="lmkit-output-pump", daemon=True)
        self._pump.start()

    # -- text helpers ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # -- the pump (background thread) ------------------------------------------------------------------

    def _pump_outputs(self) -> None:
        while not self._closed.is_set():
            try:
                outputs = self.engine.get_outputs(timeout=0.1)
            except Exception as exc:  # the engine broke: fail every live request, keep serving stats
                if self._closed.is_set():
                    return
                logger.exception("engine.get_outputs failed")
                with self._lock:
                    ids = list(self._waiters)
                outputs = [EngineOutput(i, [], finish_reason=FinishReason.ERROR, error=str(exc)) for i in ids]
                self._closed.wait(0.5)
            if outputs:
                self._dispatch(outputs)

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineOutput]]] = {}
        with self._lock:
            for out in outputs:
                w = self._waiters.get(out.request_id)
                if w is not None:
                    by_loop.setdefault(w.loop, []).append((w.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed; its requests are gone
                pass

    # -- requests --------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt, do_preprocess: bool) -> tuple[list[int], str]:
        """Token ids of the prompt and the name of the parameter that carried it."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", "prompt")
            return self.encode(prompt, add_special_tokens=True), "prompt"
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a non-empty string, list of messages or list of token ids", "prompt")
        if all(isinstance(m, dict) for m in prompt):
            if do_preprocess:
                try:
                    text = self.apply_chat_template(prompt)
                except Exception as exc:
                    raise RequestError(f"cannot apply the chat template: {exc}", "messages") from None
            else:  # already formatted by the caller: plain concatenation of the contents
                text = "".join(str(m.get("content", "")) for m in prompt)
            ids = self.encode(text, add_special_tokens=False)
            if not ids:
                raise RequestError("messages must not be empty", "messages")
            return ids, "messages"
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt must be a string, a list of messages or a list of token ids", "prompt")
        vocab = self.engine.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(prompt), "prompt"

    def _sampling(self, prompt_len: int, where: str, gen: GenerationConfig) -> list[SamplingParams]:
        """Validate `gen` against this prompt and the engine; one SamplingParams per choice."""
        caps = self.engine.capabilities
        if prompt_len + 1 > self.session_len:
            raise RequestError(
                f"the prompt has {prompt_len} tokens, which leaves no room for the answer within the "
                f"session length of {self.session_len} tokens",
                where,
            )
        _check(gen.max_new_tokens >= 1, "max_new_tokens", f"max_new_tokens must be >= 1, got {gen.max_new_tokens}")
        _check(gen.n >= 1, "n", f"n must be >= 1, got {gen.n}")
        _check(gen.temperature >= 0, "temperature", f"temperature must be >= 0, got {gen.temperature}")
        _check(0 < gen.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {gen.top_p}")
        _check(gen.top_k >= 0, "top_k", f"top_k must be >= 0, got {gen.top_k}")
        _check(0 <= gen.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {gen.min_p}")
        _check(
            gen.repetition_penalty > 0,
            "repetition_penalty",
            f"repetition_penalty must be > 0, got {gen.repetition_penalty}",
        )
        if gen.logprobs is not None:
            _check(caps.supports_logprobs, "logprobs", "this engine does not return logprobs")
            _check(
                0 <= gen.logprobs <= caps.max_top_logprobs,
                "logprobs",
                f"logprobs must be in [0, {caps.max_top_logprobs}], got {gen.logprobs}",
            )
        vocab = self.engine.vocab_size
        _check(
            all(0 <= t < vocab for t in gen.stop_token_ids), "stop_token_ids", f"stop_token_ids must be in [0, {vocab})"
        )
        stop_ids = list(gen.stop_token_ids)
        if not gen.ignore_eos:
            stop_ids += [t for t in self.tokenizer.eos_token_ids if t not in stop_ids and t < vocab]
        base = dict(
            max_new_tokens=min(gen.max_new_tokens, self.session_len - prompt_len),
            temperature=float(gen.temperature),
            top_p=float(gen.top_p),
            top_k=int(gen.top_k),
            min_p=float(gen.min_p),
            repetition_penalty=float(gen.repetition_penalty),
            stop_token_ids=stop_ids,
            # EOS is left out of stop_token_ids above; the user's own stop ids still apply.
            ignore_eos=gen.ignore_eos and not gen.stop_token_ids,
            logprobs=gen.logprobs,
        )
        seeds = [None if gen.seed is None else gen.seed + i for i in range(gen.n)]
        return [SamplingParams(seed=s, **base) for s in seeds]

    async def generate(
        self,
        prompt: Prompt,
        gen_config: GenerationConfig | None = None,
        request_id: str | None = None,
        do_preprocess: bool = True,
    ) -> AsyncIterator[Response]:
        """Stream Response chunks of all n choices (interleaved; `index` tells them apart)."""
        gen = gen_config or GenerationConfig()
        prompt_ids, where = self._prompt_ids(prompt, do_preprocess)
        params = self._sampling(len(prompt_ids), where, gen)
        rid = request_id or uuid.uuid4().hex
        eids = [rid] if gen.n == 1 else [f"{rid}-{i}" for i in range(gen.n)]
        queue: asyncio.Queue = asyncio.Queue()
        self._register(rid, eids, _Waiter(asyncio.get_running_loop(), queue))
        choices = {eid: _Choice(self, i, eid, prompt_ids, gen) for i, eid in enumerate(eids)}
        try:
            self._submit(eids, prompt_ids, params)
            remaining = len(choices)
            while remaining:
                out: EngineOutput = await queue.get()
                choice = choices[out.request_id]
                if choice.finished:
                    continue
                resp = choice.process(out)
                if choice.finished:
                    remaining -= 1
                    if choice.stopped_by_string and out.finish_reason is None:
                        self.engine.abort_request(choice.request_id)
                yield resp
        finally:
            for c in choices.values():
                if not c.finished:
                    self.engine.abort_request(c.request_id)
            self._unregister(rid)

    def _register(self, rid: str, eids: list[str], waiter: _Waiter) -> None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the engine is closed")
            if rid in self._groups or any(e in self._waiters for e in eids):
                raise RequestError(f"request id {rid!r} is already in use", "request_id")
            self._groups[rid] = eids
            for e in eids:
                self._waiters[e] = waiter

    def _unregister(self, rid: str) -> None:
        with self._lock:
            for e in self._groups.pop(rid, []):
                self._waiters.pop(e, None)

    def _submit(self, eids: list[str], prompt_ids: list[int], params: list[SamplingParams]) -> None:
        try:  # on failure, generate()'s cleanup aborts the choices already added
            for eid, sp in zip(eids, params):
                self.engine.add_request(EngineRequest(eid, list(prompt_ids), sp))
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None

    def abort(self, request_id: str) -> None:
        """Cancel a request (all its choices); its stream ends with finish_reason "abort"."""
        with self._lock:
            eids = list(self._groups.get(request_id, []))
        for eid in eids:
            self.engine.abort_request(eid)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self, stop_engine: bool = True) -> None:
        """Stop the pump and (unless `stop_engine` is False, to hand the engine on) the engine; blocking."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._pump.join(timeout=5)
        if stop_engine:
            self.engine.shutdown()
        with self._lock:  # streams still open end with "abort" rather than wait forever
            live = list(self._waiters)
        if not stop_engine:
            for rid in live:
                self.engine.abort_request(rid)
        self._dispatch([EngineOutput(rid, [], finish_reason=FinishReason.ABORT) for rid in live])

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)


def _deliver(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise RequestError(message, param)
