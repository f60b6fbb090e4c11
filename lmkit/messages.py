"""User-facing configuration and result types: GenerationConfig, engine configs, Response."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationConfig:
    """How to generate, as a user states it (the front-end turns it into engine SamplingParams)."""

    max_new_tokens: int = 512
    """Generate at most this many tokens; must be >= 1."""
    temperature: float = 0.8
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens below min_p * p(max); 0 disables."""
    repetition_penalty: float = 1.0
    """1 disables."""
    seed: int | None = None
    """The same seed gives the same output whatever else is in the batch."""
    stop: list[str] | str | None = None
    """Stop strings; generation ends before them and they never appear in the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (besides the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    logprobs: int | None = None
    """Return logprobs of the generated tokens and the top-n alternatives (0 = chosen token only)."""
    n: int = 1
    """Number of completions per prompt."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""


@dataclass
class PytorchEngineConfig:
    """Configuration of the PyTorch engine."""

    session_len: int | None = None
    """Max prompt + generated tokens per request; None = the model's max_position_embeddings."""
    max_batch_size: int = 128
    """Max sequences running at once (max_num_seqs)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunks)."""
    cache_max_entry_count: float = 0.8
    """Fraction of free memory (GPU) given to the KV cache; on CPU, of `cpu_kv_cache_gib`."""
    cpu_kv_cache_gib: float = 2.0
    """On CPU: the memory the fraction above applies to."""
    num_gpu_blocks: int | None = None
    """Exact number of KV blocks (overrides cache_max_entry_count; for tests)."""
    block_size: int = 16
    """Tokens per KV block (--cache-block-seq-len)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes."""
    prefill_interval: int = 1
    """While sequences are decoding, admit waiting requests only every this many steps (1 = every step). Larger
    values keep more steps decode-only (on CUDA, replayed as graphs) for throughput, at the cost of TTFT."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bfloat16 on GPU), "float32", "float16" or "bfloat16"."""
    load_format: str = "auto"
    """"auto" reads the checkpoint, "dummy" makes random weights in its shapes (benchmarks)."""
    adapters: dict[str, str] | None = None
    """LoRA adapters to load at start: name -> path."""
    eager_mode: bool = False
    """Run every step eagerly: no CUDA graphs (GPU), no compiled layers (CPU)."""
    tp: int = 1
    """Tensor parallel degree."""

    @property
    def cache_block_seq_len(self) -> int:
        return self.block_size


@dataclass
class TurboEngineConfig:
    """Configuration of the turbo (C++) engine."""

    session_len: int | None = None
    """Max prompt + generated tokens per request; None = the model's max_position_embeddings."""
    max_batch_size: int = 128
    """Max sequences running at once (max_num_seqs)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunks)."""
    cache_max_entry_count: float = 0.8
    """Fraction of free memory (GPU) given to the KV cache; on CPU, of `cpu_kv_cache_gib`."""
    cpu_kv_cache_gib: float = 2.0
    """On CPU: the memory the fraction above applies to."""
    num_blocks: int | None = None
    """Exact number of KV blocks (overrides cache_max_entry_count; for tests)."""
    cache_block_seq_len: int = 64
    """Tokens per KV block."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bfloat16 on GPU), "float32", "float16" or "bfloat16"."""
    load_format: str = "auto"
    """"auto" reads the checkpoint, "dummy" makes random weights in its shapes (benchmarks)."""
    quant_policy: int = 0
    """KV cache quantization: 0 (none), 8 (int8), 4 (int4)."""
    model_format: str | None = None
    """"hf", "awq" or None to detect."""
    num_threads: int = 0
    """CPU threads for the forward; 0 = all cores."""
    tp: int = 1
    """Tensor parallel degree."""


@dataclass
class Response:
    """The result of one completion (or the latest chunk of a stream)."""

    text: str
    """The generated text (a stream chunk holds only the new text)."""
    generate_token_len: int
    """Tokens generated so far."""
    input_token_len: int
    """Prompt tokens."""
    finish_reason: str | None = None
    """"stop", "length", "abort" or "error"; None while streaming."""
    token_ids: list[int] = field(default_factory=list)
    """Generated token ids (a stream chunk holds only the new ones)."""
    logprobs: list[dict] | None = None
    """Per token: {"token_id", "logprob", "top": [(id, logprob), ...]}."""
    index: int = 0
    """Which prompt (and which of n completions) this answers: prompt_index * n + choice."""
    error: str | None = None
    """Why, when finish_reason is "error"."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
