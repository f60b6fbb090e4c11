"""Tokenizer wrapper (encode, chat template, EOS ids) and the incremental detokenizer used by streams.

The detokenizer decodes a small window of ids per step (vLLM's prefix-offset / read-offset scheme), so a
step costs O(window), never O(generated tokens), and it holds back text that ends in an incomplete
UTF-8 sequence (U+FFFD) until the bytes that complete it arrive.
"""

from __future__ import annotations

import json
from pathlib import Path

_REPLACEMENT = "\ufffd"
# How many prompt ids seed the window: enough context for the first generated token to decode with the
# same spacing as it would in the middle of the text (SentencePiece drops a leading space otherwise).
_PROMPT_CONTEXT = 5


class Tokenizer:
    """A transformers tokenizer plus the model's EOS ids and chat template."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(model_path)
        self.hf = AutoTokenizer.from_pretrained(str(self.path))
        self.vocab_size: int = len(self.hf)
        self.eos_token_ids: list[int] = _eos_ids(self.path, self.hf.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opener."""
        if not self.has_chat_template:
            # A base model without a template: a plain transcript that still ends on the assistant's turn.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def detokenizer(self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def _eos_ids(path: Path, tokenizer_eos: int | None) -> list[int]:
    """EOS ids of generation_config.json (one id or a list), then the tokenizer's own, deduplicated."""
    ids: list[int] = []
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list):
            ids.extend(int(i) for i in eos)
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(int(tokenizer_eos))
    return ids


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces whose concatenation is the full decode.

    ids:  [ ... context ... | ... already emitted ... | new ]
                          prefix_offset           read_offset
    Each step decodes ids[prefix_offset:read_offset] and ids[prefix_offset:]; the difference is the new
    text. It is emitted only when it does not end in U+FFFD (a partial UTF-8 sequence); then the window
    slides forward.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_ids: list[int]) -> str:
        """Add `new_ids`; return the text they complete (possibly empty)."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # Drop ids that fell out of the window, so memory stays O(window) as well.
            if self.prefix_offset > 0:
                del self.ids[: self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return full_text[len(prefix_text) :].replace(_REPLACEMENT, "")
        return ""

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back, less a trailing incomplete UTF-8 sequence.

        A stream cut by max_new_tokens inside a multi-byte character can never complete it; sending the bytes
        as U+FFFD would break the "no broken UTF-8" contract, so they are dropped (as `step` drops invalid
        byte sequences the model generates mid-stream).
        """
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :].replace(_REPLACEMENT, "") if len(full_text) > len(prefix_text) else ""
