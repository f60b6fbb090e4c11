"""AsyncEngine over a scripted fake engine: streaming, stop strings, n > 1, validation, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from lmkit.frontend.errors import RequestError
from lmkit.messages import GenerationConfig

EOS = 2
ANSWER = "Hello world. 你好 😀 STOP here and more"


def text_script(tokenizer, text=ANSWER, eos=True):
    ids = tokenizer.encode(text, add_special_tokens=False) + ([EOS] if eos else [])
    return lambda request: ids


async def collect(agen):
    return [chunk async for chunk in agen]


async def test_stream_until_eos(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    chunks = await collect(ae.generate("Hi", GenerationConfig(temperature=0)))
    assert "".join(c.text for c in chunks) == ANSWER
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].generate_token_len == len(tokenizer.encode(ANSWER, add_special_tokens=False)) + 1
    assert not any("\ufffd" in c.text for c in chunks)
    (req,) = ae.engine.requests.values()
    assert req.sampling.temperature == 0 and EOS in req.sampling.stop_token_ids
    assert req.prompt_token_ids == tokenizer.encode("Hi")


async def test_messages_use_the_chat_template(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    messages = [{"role": "user", "content": "Hi"}]
    await collect(ae.generate(messages, GenerationConfig(max_new_tokens=2)))
    (req,) = ae.engine.requests.values()
    assert req.prompt_token_ids == tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


@pytest.mark.parametrize("tokens_per_step", [1, 4])
async def test_stop_string_spanning_tokens(tokenizer, make_async_engine, tokens_per_step):
    ae = make_async_engine(text_script(tokenizer, ANSWER + " filler" * 20), tokens_per_step=tokens_per_step)
    chunks = await collect(ae.generate("Hi", GenerationConfig(stop=["STOP here"]), request_id="r1"))
    assert "".join(c.text for c in chunks) == "Hello world. 你好 😀 "
    assert chunks[-1].finish_reason == "stop"
    assert not any("S" in c.text for c in chunks)
    await asyncio.sleep(0.05)
    assert "r1" in ae.engine.aborted  # the engine request was cut short
    assert ae.engine.stats().num_running == 0


async def test_stop_string_at_first_token(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    chunks = await collect(ae.generate("Hi", GenerationConfig(stop=["Hello", "world"])))
    assert "".join(c.text for c in chunks) == ""
    assert chunks[-1].finish_reason == "stop" and chunks[-1].generate_token_len == 1


async def test_max_new_tokens_gives_length(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    chunks = await collect(ae.generate("Hi", GenerationConfig(max_new_tokens=3)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].generate_token_len == 3


async def test_max_new_tokens_clipped_to_session_len(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer), session_len=20)
    prompt = list(range(100, 115))
    await collect(ae.generate(prompt, GenerationConfig(max_new_tokens=100)))
    (req,) = ae.engine.requests.values()
    assert req.sampling.max_new_tokens == 5


async def test_n_choices_with_seeds(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    chunks = await collect(ae.generate("Hi", GenerationConfig(n=3, seed=7, max_new_tokens=4), request_id="x"))
    assert sorted(r.sampling.seed for r in ae.engine.requests.values()) == [7, 8, 9]
    assert len(ae.engine.requests) == 3
    finals = {c.index: c for c in chunks if c.finish_reason}
    assert sorted(finals) == [0, 1, 2] and all(c.finish_reason == "length" for c in finals.values())
    for i in range(3):
        assert "".join(c.text for c in chunks if c.index == i) == tokenizer.decode(
            tokenizer.encode(ANSWER, add_special_tokens=False)[:4]
        )


async def test_logprobs_pass_through(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    chunks = await collect(ae.generate("Hi", GenerationConfig(max_new_tokens=3, logprobs=2)))
    entries = [e for c in chunks for e in (c.logprobs or [])]
    ids = [t for c in chunks for t in c.token_ids]
    assert [e["token_id"] for e in entries] == ids and len(ids) == 3
    assert entries[0]["logprob"] == -0.5 and len(entries[0]["top"]) == 2


async def test_ignore_eos_drops_eos_from_stop_ids(tokenizer, make_async_engine):
    ae = make_async_engine(text_script(tokenizer))
    await collect(ae.generate("Hi", GenerationConfig(max_new_tokens=2, ignore_eos=True, stop_token_ids=[5])))
    (req,) = ae.engine.requests.values()
    assert req.sampling.stop_token_ids == [5] and not req.sampling.ignore_eos


BAD = [
    ("", GenerationConfig(), "prompt"),
    ([], GenerationConfig(), "prompt"),
    ([1, 2, 10**6], GenerationConfig(), "prompt"),
    ([-1], GenerationConfig(), "prompt"),
    (list(range(3, 260)), GenerationConfig(), "prompt"),  # prompt + 1 > session_len (256)
    ("Hi", GenerationConfig(max_new_tokens=0), "max_new_tokens"),
    ("Hi", GenerationConfig(n=0), "n"),
    ("Hi", GenerationConfig(logprobs=6), "logprobs"),
    ("Hi", GenerationConfig(logprobs=-1), "logprobs"),
    ("Hi", GenerationConfig(top_p=0), "top_p"),
    ("Hi", GenerationConfig(temperature=-1), "temperature"),
    ("Hi", GenerationConfig(stop_token_ids=[10**6]), "stop_token_ids"),
]


@pytest.mark.parametrize(("prompt", "gen", "param"), BAD)
async def test_validation_errors(tokenizer, make_async_engine, prompt, gen, param):
    ae = make_async_engine(text_script(tokenizer))
    with pytest.raises(RequestError) as info:
        await collect(ae.generate(prompt, gen))
    assert info.value.param == param
    assert not ae.engine.requests
    chunks = await collect(ae.generate("Hi", GenerationConfig(max_new_tokens=2)))  # still serving
    assert chunks[-1].finish_reason == "length"


async def test_duplicate_request_id(tokenizer, make_async_engine):
    ae = make_async_engine(lambda r: [100] * 1000, step_s=0.01)
    first = ae.generate("Hi", GenerationConfig(max_new_tokens=500), request_id="same")
    await anext(first)
    with pytest.raises(RequestError):
        await collect(ae.generate("Hi", GenerationConfig(), request_id="same"))
    await first.aclose()


async def test_aclose_aborts_engine_request(make_async_engine):
    ae = make_async_engine(lambda r: [100] * 1000, step_s=0.005)
    agen = ae.generate("Hi", GenerationConfig(max_new_tokens=900, n=2), request_id="c")
    await anext(agen)
    await agen.aclose()
    assert sorted(ae.engine.aborted) == ["c-0", "c-1"]
    await asyncio.sleep(0.05)
    assert ae.engine.stats().num_running == 0


async def test_task_cancel_aborts_engine_request(make_async_engine):
    ae = make_async_engine(lambda r: [100] * 1000, step_s=0.005)
    started = asyncio.Event()

    async def consume():
        async for _ in ae.generate("Hi", GenerationConfig(max_new_tokens=900), request_id="t"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ae.engine.aborted == ["t"]


async def test_abort_by_id_reports_abort(make_async_engine):
    ae = make_async_engine(lambda r: [100] * 1000, step_s=0.005)
    agen = ae.generate("Hi", GenerationConfig(max_new_tokens=900), request_id="a")
    await anext(agen)
    ae.abort("a")
    chunks = [c async for c in agen]
    assert chunks[-1].finish_reason == "abort"


def test_pipeline_over_fake_engine(tokenizer, make_async_engine):
    from lmkit.api import Pipeline

    pipe = Pipeline(make_async_engine(text_script(tokenizer)))
    try:
        one = pipe("Hi", GenerationConfig(max_new_tokens=50))
        assert one.text == ANSWER and one.finish_reason == "stop"
        many = pipe(["Hi", [{"role": "user", "content": "Yo"}]], GenerationConfig(max_new_tokens=2, n=2))
        assert [r.index for r in many] == [0, 1, 2, 3] and all(r.generate_token_len == 2 for r in many)
        texts: dict[int, str] = {}
        for chunk in pipe.stream_infer(["a", "b"], GenerationConfig(stop="world")):
            texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        assert texts == {0: "Hello ", 1: "Hello "}
        stream = pipe.stream_infer("Hi", GenerationConfig(max_new_tokens=5))
        next(stream)
        stream.close()
    finally:
        pipe.close()


async def test_close_ends_open_streams_with_abort(make_async_engine):
    ae = make_async_engine(lambda r: [100] * 1000, step_s=0.005)
    agen = ae.generate("Hi", GenerationConfig(max_new_tokens=900))
    await anext(agen)
    await ae.close()
    chunks = await asyncio.wait_for(collect(agen), timeout=5)
    assert chunks[-1].finish_reason == "abort"
