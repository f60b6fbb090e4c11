"""The Python API: `pipeline(model)` -> a Pipeline that answers prompts or chats in batches or streams.

The Pipeline runs its AsyncEngine on a private event loop in a background thread, so its blocking
methods work from plain scripts and from code that already runs an event loop (notebooks) alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from lmkit.frontend.async_engine import AsyncEngine
from lmkit.messages import GenerationConfig, PytorchEngineConfig, Response, TurboEngineConfig

Prompt = str | list[dict] | list[int]


def pipeline(
    model: str | Path | None = None,
    backend_config: PytorchEngineConfig | TurboEngineConfig | None = None,
    backend: str = "auto",
    model_name: str | None = None,
) -> Pipeline:
    """Load `model` (a HF folder or .gguf file; None = the default model) on `backend` ("auto", "pytorch", "turbo")."""
    from lmkit.engines import build_async_engine

    return Pipeline(build_async_engine(model, backend, backend_config, model_name))


def _is_single(prompts) -> bool:
    """One prompt (a string, a chat, or token ids) rather than a list of them."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts):
        return True
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)


class Pipeline:
    """Batch and streaming inference over one AsyncEngine."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.async_engine = async_engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmkit-pipeline", daemon=True)
        self._thread.start()

    @property
    def backend(self) -> str:
        return self.async_engine.backend

    def generate(
        self,
        prompt: Prompt,
        gen_config: GenerationConfig | None = None,
        request_id: str | None = None,
        do_preprocess: bool = True,
    ) -> AsyncIterator[Response]:
        """The AsyncEngine's stream (for callers on their own event loop)."""
        return self.async_engine.generate(prompt, gen_config, request_id, do_preprocess)

    def __call__(self, prompts, gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        """Answer one prompt (-> Response) or a list of prompts (-> list, n per prompt, in order)."""
        single = _is_single(prompts)
        batch = [prompts] if single else list(prompts)
        gen = gen_config or GenerationConfig()
        results = asyncio.run_coroutine_threadsafe(self._batch(batch, gen), self._loop).result()
        return results[0] if single and gen.n == 1 else results

    async def _batch(self, prompts: list[Prompt], gen: GenerationConfig) -> list[Response]:
        async def one(i: int, prompt: Prompt) -> list[Response]:
            acc = [Response("", 0, 0, index=i * gen.n + c) for c in range(gen.n)]
            async for chunk in self.async_engine.generate(prompt, gen):
                r = acc[chunk.index]
                r.text += chunk.text
                r.token_ids += chunk.token_ids
                r.generate_token_len = chunk.generate_token_len
                r.input_token_len = chunk.input_token_len
                r.num_cached_tokens = chunk.num_cached_tokens
                r.finish_reason, r.error = chunk.finish_reason, chunk.error
                if chunk.logprobs is not None:
                    r.logprobs = (r.logprobs or []) + chunk.logprobs
            return acc

        per_prompt = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return [r for group in per_prompt for r in group]

    def stream_infer(self, prompts, gen_config: GenerationConfig | None = None) -> Iterator[Response]:
        """Chunks of all prompts as they come; `index` = prompt_index * n + choice. Closing it aborts."""
        batch = [prompts] if _is_single(prompts) else list(prompts)
        gen = gen_config or GenerationConfig()
        import queue

        out: queue.Queue = queue.Queue()
        done = object()

        async def pump(i: int, prompt: Prompt) -> None:
            async for chunk in self.async_engine.generate(prompt, gen):
                chunk.index = i * gen.n + chunk.index
                out.put(chunk)

        async def run_all() -> None:
            try:
                await asyncio.gather(*(pump(i, p) for i, p in enumerate(batch)))
            except BaseException as exc:  # noqa: B036 - handed to the consumer thread
                out.put(exc)
            finally:
                out.put(done)

        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        try:
            while (item := out.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not future.done():
                future.cancel()  # cancels the generators, which aborts the engine requests

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.async_engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
