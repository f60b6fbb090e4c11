"""A small fake AsyncEngine (the contract in the front-end) for serving tests that need no model.

Tokens are UTF-8 bytes (id = byte value, 256 = EOS). The "model" answers by cycling through a fixed
reply text, one token every `token_delay_s`, so tests can disconnect mid-stream and watch aborts.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass

from lmkit.frontend.protocol import EngineCapabilities, EngineStats
from lmkit.messages import GenerationConfig, Response

try:
    from lmkit.frontend.errors import RequestError
except ImportError:
    from lmkit.serve.openai.serving import RequestError  # type: ignore[assignment]

REPLY = "Hello there! 你好, 世界 🙂. The quick brown fox jumps over the lazy dog. "
EOS = 256


class ByteTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class FakeInnerEngine:
    capabilities: EngineCapabilities
    vocab_size: int
    session_len: int


class FakeAsyncEngine:
    def __init__(
        self,
        session_len: int = 256,
        token_delay_s: float = 0.002,
        num_blocks: int = 1000,
        model_name: str = "fake-model",
    ) -> None:
        self.model_name = model_name
        self.backend = "fake"
        self.session_len = session_len
        self.tokenizer = ByteTokenizer()
        self.engine = FakeInnerEngine(EngineCapabilities(), 257, session_len)
        self.token_delay_s = token_delay_s
        self.num_blocks = num_blocks
        self.live: dict[str, int] = {}  # request id -> blocks held
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.stall = False
        self._ids = itertools.count()

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text)

    def stats(self) -> EngineStats:
        used = sum(self.live.values())
        return EngineStats(
            num_running=len(self.live),
            num_waiting=0,
            num_blocks_total=self.num_blocks,
            num_blocks_free=self.num_blocks - used,
        )

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def close(self) -> None:
        pass

    async def generate(
        self, prompt, gen_config: GenerationConfig, request_id: str | None = None, do_preprocess: bool = True
    ):
        ids = prompt if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)) else None
        if ids is None:
            text = self.apply_chat_template(prompt) if isinstance(prompt, list) else prompt
            ids = self.encode(text)
        if not ids:
            raise RequestError("empty prompt")
        if len(ids) + 1 > self.session_len:
            raise RequestError("prompt too long")
        if gen_config.max_new_tokens < 1 or gen_config.n < 1:
            raise RequestError("bad gen config")
        if any(i < 0 or i >= 257 for i in ids):
            raise RequestError("token id out of range")
        rid = request_id or f"fake-{next(self._ids)}"
        max_new = min(gen_config.max_new_tokens, self.session_len - len(ids))
        subs = [self._choice(f"{rid}/{k}", k, ids, max_new, gen_config) for k in range(gen_config.n)]
        active = list(range(len(subs)))
        try:
            while active:
                for k in list(active):
                    try:
                        r = await anext(subs[k])
                    except StopAsyncIteration:
                        active.remove(k)
                        continue
                    yield r
        finally:
            for sub in subs:
                await sub.aclose()

    async def _choice(self, rid: str, index: int, ids: list[int], max_new: int, cfg: GenerationConfig):
        stops = [cfg.stop] if isinstance(cfg.stop, str) else list(cfg.stop or [])
        rng = random.Random(cfg.seed if cfg.seed is not None else None)
        start = 0 if cfg.temperature == 0 else rng.randrange(len(REPLY))
        reply = (REPLY[start:] + REPLY * 100).encode("utf-8")
        self.live[rid] = 1 + len(ids) // 16
        out: list[int] = []
        emitted = 0  # chars of decoded text already sent
        sent = 0  # tokens already sent
        finish = None
        try:
            while finish is None:
                while self.stall:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(self.token_delay_s)
                out.append(reply[len(out)])
                self.live[rid] = 1 + (len(ids) + len(out)) // 16
                text = bytes(out).decode("utf-8", errors="ignore")
                if len(bytes(out)) != len(text.encode("utf-8")) and len(out) < max_new:
                    continue  # an incomplete UTF-8 sequence: wait for the rest (dropped at the length limit)
                cut = _first_stop(text, stops)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                elif len(out) >= max_new:
                    finish = "length"
                hold = 0 if finish else _partial_stop(text, stops)
                new = text[emitted : len(text) - hold]
                emitted += len(new)
                new_ids, sent = out[sent:], len(out)
                lp = None
                if cfg.logprobs is not None:
                    lp = [
                        {
                            "token_id": t,
                            "logprob": -0.1,
                            "top": ([(t, -0.1)] + [(i, -2.0 - i / 100) for i in range(97, 97 + cfg.logprobs)])[
                                : max(cfg.logprobs, 1)
                            ],
                        }
                        for t in new_ids
                    ]
                yield Response(
                    text=new,
                    generate_token_len=len(out),
                    input_token_len=len(ids),
                    finish_reason=finish,
                    token_ids=new_ids,
                    logprobs=lp,
                    index=index,
                )
            self.finished.append(rid)
        finally:
            if finish is None:
                self.aborted.append(rid)
            self.live.pop(rid, None)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
