"""The incremental detokenizer over the real SmolLM2 tokenizer: streamed text == full decode, never U+FFFD."""

from __future__ import annotations

import json

import pytest

from lmkit.frontend.tokenizer import _eos_ids

TEXTS = [
    "Hello world, 你好世界! 😀 The end.",
    "  two  leading spaces,\n\ttabs\tand  double  spaces  ",
    "日本語のテキスト、そして絵文字 🎉🎉 👨‍👩‍👧‍👦 family",
    "Ünïcödé àccents — em dash… “quotes” 🇫🇷 flag",
    "code:\n    def f(x):\n        return x  # 😀\n",
]


def stream(tokenizer, ids, per_step=1, prompt_ids=None):
    detok = tokenizer.detokenizer(prompt_ids)
    chunks = [detok.step(ids[i : i + per_step]) for i in range(0, len(ids), per_step)]
    return chunks + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("per_step", [1, 3])
def test_stream_equals_full_decode(tokenizer, text, per_step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = stream(tokenizer, ids, per_step)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji spans two byte-level tokens
    chunks = stream(tokenizer, ids)
    assert chunks[-2] == "😀" or "😀" in "".join(chunks[1:])
    assert all("\ufffd" not in c for c in chunks)


def test_prompt_context_keeps_spacing(tokenizer):
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    answer = tokenizer.encode(" Paris, of course.", add_special_tokens=False)
    assert "".join(stream(tokenizer, answer, prompt_ids=prompt)) == " Paris, of course."


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [2]
    assert "".join(stream(tokenizer, ids)) == "hi"
    detok = tokenizer.detokenizer(None, skip_special_tokens=False)
    assert "".join([detok.step([i]) for i in ids] + [detok.flush()]) == "hi<|im_end|>"


def test_truncated_character_is_dropped_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    assert tokenizer.decode(ids).endswith("\ufffd")
    chunks = stream(tokenizer, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tokenizer.decode(ids).rstrip("\ufffd")


def test_window_stays_small(tokenizer):
    ids = tokenizer.encode("word " * 300, add_special_tokens=False)
    detok = tokenizer.detokenizer()
    for i in ids:
        detok.step([i])
        assert len(detok.ids) <= 4


def test_eos_ids_from_generation_config(tmp_path):
    assert _eos_ids(tmp_path, 2) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert _eos_ids(tmp_path, 2) == [7, 9, 2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert _eos_ids(tmp_path, 9) == [9]


def test_smollm2_eos_and_chat_template(tokenizer):
    assert tokenizer.eos_token_ids == [2]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
