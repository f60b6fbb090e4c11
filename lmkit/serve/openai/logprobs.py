"""Engine logprobs ({"token_id", "logprob", "top": [(id, logprob)]}) -> the two OpenAI logprob shapes."""

from __future__ import annotations

import math
from functools import lru_cache


def _finite(x: float) -> float:
    return max(float(x), -9999.0) if not math.isnan(x) else -9999.0


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        try:
            return self.tokenizer.decode([token_id])
        except Exception:
            return f"<token {token_id}>"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def chat(self, entries: list[dict], top_n: int) -> list[dict]:
        out = []
        for e in entries:
            item = self._entry(e["token_id"], e["logprob"])
            item["top_logprobs"] = [self._entry(tid, lp) for tid, lp in list(e.get("top") or [])[:top_n]]
            out.append(item)
        return out

    def completion(self, entries: list[dict], offset: int) -> tuple[dict, int]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for e in entries:
            text = self.token_text(e["token_id"])
            tokens.append(text)
            token_logprobs.append(_finite(e["logprob"]))
            tops.append({self.token_text(tid): _finite(lp) for tid, lp in (e.get("top") or [])})
            offsets.append(offset)
            offset += len(text)
        body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
        return body, offset
