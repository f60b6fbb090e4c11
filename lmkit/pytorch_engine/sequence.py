"""The one per-request state object of the PyTorch engine: tokens, progress, KV blocks, sampling."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lmkit.frontend.protocol import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the engine tracks it.

    token_ids = prompt ++ generated. The KV of token_ids[:num_computed_tokens] sits in the blocks of
    block_table; the next step computes token_ids[num_computed_tokens:...] (a prefill chunk, or the one
    token sampled last step).
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first admission."""
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the full blocks at the head of block_table that are registered in the cache."""
    status: SequenceStatus = SequenceStatus.WAITING
    max_tokens: int = 0
    """len(token_ids) may not exceed this (prompt + max_new_tokens, capped by the session length)."""
    num_preemptions: int = 0
    num_sent_tokens: int = 0
    """Generated tokens already handed to the front-end."""

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)
        if not self.max_tokens:
            self.max_tokens = self.num_prompt_tokens + self.sampling.max_new_tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
