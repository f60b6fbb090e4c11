"""Engine logprobs ({"token_id", "logprob", "top": [(id, logprob)]}) -> the two OpenAI logprob shapes."""

from __future__ import annotations

import math
import re
from functools import cache, lru_cache


def _finite(x: float) -> float:
    return max(float(x), -9999.0) if not math.isnan(x) else -9999.0


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


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
        return {"token": text, "logprob": _finite(logprob), "bytes": self.token_bytes(token_id, text)}

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes: for a token that is part of a multi-byte character its text is U+FFFD,
        so read the bytes off the vocabulary entry (byte-level BPE or SentencePiece <0xNN>)."""
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        hf = getattr(self.tokenizer, "hf", None)
        try:
            piece = hf.convert_ids_to_tokens(token_id) if hf is not None else None
        except Exception:
            piece = None
        if isinstance(piece, str):
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if m:
                return [int(m.group(1), 16)]
            dec = _byte_decoder()
            if piece and all(c in dec for c in piece):
                return [dec[c] for c in piece]
        return list(text.encode("utf-8"))

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
