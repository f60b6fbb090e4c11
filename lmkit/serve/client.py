"""A thin client for scripts over the `openai` package, pointed at an lmkit api_server or proxy.

from lmkit.serve.client import APIClient
client = APIClient("http://127.0.0.1:23333")
print(client.chat("What is the capital of France?", max_tokens=32))
for piece in client.chat_stream([{"role": "user", "content": "Hi"}]):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator

import openai


class APIClient:
    def __init__(
        self, api_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0
    ) -> None:
        base = api_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = openai.OpenAI(base_url=base, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self._model = model

    @property
    def model(self) -> str:
        """The model to ask: the one given, else the first the server lists."""
        if self._model is None:
            self._model = self.client.models.list().data[0].id
        return self._model

    def models(self) -> list[str]:
        return [m.id for m in self.client.models.list().data]

    @staticmethod
    def _messages(messages: str | list[dict]) -> list[dict]:
        return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages

    def chat(self, messages: str | list[dict], **params) -> str:
        """The assistant's reply (params: max_tokens, temperature, top_p, stop, seed, ...)."""
        r = self.client.chat.completions.create(model=self.model, messages=self._messages(messages), **params)
        return r.choices[0].message.content or ""

    def chat_stream(self, messages: str | list[dict], **params) -> Iterator[str]:
        """The reply's text pieces as they arrive; closing the iterator cancels the request."""
        stream = self.client.chat.completions.create(
            model=self.model, messages=self._messages(messages), stream=True, **params
        )
        try:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
        finally:
            stream.close()

    def complete(self, prompt: str, **params) -> str:
        r = self.client.completions.create(model=self.model, prompt=prompt, **params)
        return r.choices[0].text

    def complete_stream(self, prompt: str, **params) -> Iterator[str]:
        stream = self.client.completions.create(model=self.model, prompt=prompt, stream=True, **params)
        try:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.text:
                        yield choice.text
        finally:
            stream.close()
