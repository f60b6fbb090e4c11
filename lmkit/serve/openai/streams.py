"""Running one or more AsyncEngine generations as one stream, and noticing clients that went away.

`ChoiceStream.start()` pulls the first chunk of every prompt before the HTTP response begins, so a
request the engine refuses is still a clean 400 (and a proxy can retry a node that fails before the
first byte). Closing the stream closes every engine generator, which aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from lmkit.messages import GenerationConfig, Response

T = TypeVar("T")
_DONE = object()


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


async def until_disconnect(request: Request, aw: Awaitable[T], poll_s: float = 0.5) -> T:
    """Await `aw`, cancelling it (and raising ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _first(gen: AsyncIterator[Response]) -> Response | None:
    try:
        return await anext(gen)
    except StopAsyncIteration:
        return None


class ChoiceStream:
    """Chunks of all choices of all prompts as (prompt_index, Response), interleaved as they come."""

    def __init__(self, engine, prompts: list[list[int]], gen_config: GenerationConfig, request_id: str) -> None:
        self.gens = [
            engine.generate(
                p, gen_config, request_id=f"{request_id}-{i}" if len(prompts) > 1 else request_id, do_preprocess=False
            )
            for i, p in enumerate(prompts)
        ]
        self.firsts: list[Response | None] = []
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    async def start(self) -> None:
        """Pull each prompt's first chunk; raises the engine's validation error, after closing everything."""
        try:
            results = await asyncio.gather(*(_first(g) for g in self.gens), return_exceptions=True)
        except BaseException:
            await self.aclose()
            raise
        for r in results:
            if isinstance(r, BaseException):
                await self.aclose()
                raise r
        self.firsts = list(results)  # type: ignore[arg-type]

    async def __aiter__(self) -> AsyncIterator[tuple[int, Response]]:
        if len(self.gens) == 1:
            if self.firsts[0] is not None:
                yield 0, self.firsts[0]
                async for resp in self.gens[0]:
                    yield 0, resp
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                if self.firsts[i] is not None:
                    await queue.put((i, self.firsts[i]))
                    async for resp in self.gens[i]:
                        await queue.put((i, resp))
                await queue.put((i, _DONE))
            except Exception as exc:  # surfaced to the consumer
                await queue.put((i, exc))

        self.tasks = [asyncio.create_task(pump(i)) for i in range(len(self.gens))]
        remaining = len(self.gens)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        for g in self.gens:
            with contextlib.suppress(BaseException):
                await g.aclose()
