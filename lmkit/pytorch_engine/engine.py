"""PytorchEngine: the Engine protocol over a Python loop thread (admit -> schedule -> run -> sample -> emit)."""

from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.cpu_threads import in_passing_thread
from lmkit.frontend.protocol import (
    EngineCapabilities,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
    check_request,
)
from lmkit.messages import PytorchEngineConfig
from lmkit.model.loader import load_model
from lmkit.pytorch_engine.block_manager import BlockManager
from lmkit.pytorch_engine.model_runner import ModelRunner, kv_bytes_per_block
from lmkit.pytorch_engine.sampling import Sampler, SampleRow, argmax
from lmkit.pytorch_engine.scheduler import ScheduledBatch, Scheduler
from lmkit.pytorch_engine.sequence import Sequence, SequenceStatus

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STOP = object()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[name]


class PytorchEngine:
    """The PyTorch engine. Thread-safe; all model work happens on its own daemon thread."""

    capabilities = EngineCapabilities(supports_lora=False)

    def __init__(self, model_path: str | Path | None, config: PytorchEngineConfig | None = None) -> None:
        self.config = config = config or PytorchEngineConfig()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        if self.device.type == "cpu":  # see lmkit/cpu_threads.py
            num_blocks = in_passing_thread(self._load, model_path, config)
        else:
            num_blocks = self._load(model_path, config)
        block_size = config.block_size
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_size, config.max_num_batched_tokens, config.prefill_interval
        )
        self.sampler = Sampler(self.device)
        if num_blocks * block_size < self.session_len:
            print(
                f"[lmkit] session_len {self.session_len} capped at the KV pool's {num_blocks * block_size} tokens",
                file=sys.stderr,
            )
            self.session_len = num_blocks * block_size
        print(
            f"[lmkit] pytorch engine on {self.device}: {num_blocks} KV blocks x {block_size} = "
            f"{num_blocks * block_size} tokens, session_len {self.session_len}",
            file=sys.stderr,
        )

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outputs: list[EngineOutput] = []
        self._outputs_ready = threading.Condition(self._lock)
        self._live_ids: set[str] = set()  # guarded by _lock; for duplicate checks in add_request
        self._live: dict[str, Sequence] = {}  # the loop thread's own
        self._num_live_sampled = 0  # live sequences whose tokens are not a plain argmax (see _argmax_only)
        self._pending: list[tuple[Sequence, FinishReason | None, TokenLogprob | None, int | None]] = []  # see _step
        self._defer_outputs = self.device.type == "cuda"
        # Pipelined steps (CUDA graphs on; LMKIT_PIPELINE=0 turns them off): see _pipelined_step.
        self._pipeline = self.runner.graphs is not None and os.environ.get("LMKIT_PIPELINE", "1") != "0"
        self._in_flight: _InFlight | None = None
        if self._pipeline:
            self._host_tokens = torch.empty(config.max_batch_size, dtype=torch.long, pin_memory=True)
            self._tokens_copied = torch.cuda.Event()
        self._stats = EngineStats(num_blocks_total=num_blocks)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lmkit-pytorch-engine", daemon=True)
        self._warmed_up = threading.Event()
        self._thread.start()
        self._warmed_up.wait()  # the warm-up runs in the loop thread: that thread's OpenMP pool is the one to keep

    def _load(self, model_path: str | Path | None, config: PytorchEngineConfig) -> int:
        """Read the weights, size the KV pool, build the model runner; returns the pool's blocks."""
        load_format = getattr(config, "load_format", "auto")
        if load_format == "dummy":  # random weights made where they run, in their dtype (benchmarks)
            loaded = load_model(model_path, dtype=self.dtype, load_format="dummy", device=self.device)
        else:
            loaded = load_model(model_path, dtype=torch.float32)
        self.spec = loaded.spec
        self.model_path = loaded.path
        self.vocab_size = self.spec.vocab_size
        block_size = config.block_size
        self.session_len = min(self.spec.max_position_embeddings, config.session_len or sys.maxsize)
        weights = loaded.weights
        del loaded
        num_blocks = self._num_blocks(config, kv_bytes_per_block(self.spec, block_size, self.dtype), weights)
        self.runner = ModelRunner(
            self.spec,
            weights,
            num_blocks,
            block_size,
            self.device,
            self.dtype,
            max_batch_size=config.max_batch_size,
            max_model_len=min(self.session_len, num_blocks * block_size),
            eager=config.eager_mode,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        return num_blocks

    def _num_blocks(self, config: PytorchEngineConfig, block_bytes: int, weights: dict[str, torch.Tensor]) -> int:
        if config.num_gpu_blocks:
            return config.num_gpu_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Weights still on the host will take their share of the free memory first.
            elem = torch.tensor([], dtype=self.dtype).element_size()
            pending = sum(t.numel() * elem for t in {id(t): t for t in weights.values()}.values() if not t.is_cuda)
            budget = (free - pending) * config.cache_max_entry_count
        else:
            budget = config.cpu_kv_cache_gib * 2**30 * config.cache_max_entry_count
        return max(1, int(budget // block_bytes))

    # ---- Engine protocol ----
    def add_request(self, request: EngineRequest) -> None:
        self._validate(request)
        seq = Sequence(request.request_id, list(request.prompt_token_ids), request.sampling)
        seq.max_tokens = min(seq.max_tokens, self.session_len)
        with self._lock:
            if request.request_id in self._live_ids:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running")
            if not self._running:
                raise InvalidRequestError("the engine is shut down")
            self._live_ids.add(request.request_id)
        self._inbox.put(seq)

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(request_id)

    def get_outputs(self, timeout: float | None = None) -> list[EngineOutput]:
        with self._outputs_ready:
            if not self._outputs:
                self._outputs_ready.wait(timeout)
            outputs, self._outputs = self._outputs, []
        return outputs

    def stats(self) -> EngineStats:
        s = self._stats
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=bm.num_blocks_total,
            num_blocks_free=bm.num_blocks_free,
            num_blocks_cached=bm.num_blocks_cached,
            num_prefill_tokens=s.num_prefill_tokens,
            num_generated_tokens=s.num_generated_tokens,
            num_steps=s.num_steps,
            num_pipelined_steps=s.num_pipelined_steps,
        )

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def shutdown(self) -> None:
        with self._lock:
            if not self._running:
                return
            self._running = False
        self._inbox.put(_STOP)
        self._thread.join()
        self.runner = None

    # ---- validation ----
    def _validate(self, request: EngineRequest) -> None:
        check_request(request, self.capabilities)
        ids = request.prompt_token_ids
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) + 1 > self.session_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; with one new token it exceeds session_len {self.session_len}"
            )

    # ---- the loop ----
    def _loop(self) -> None:
        try:
            self.runner.warm_up()
        except Exception as e:
            print(f"[lmkit] decode warm-up failed ({type(e).__name__}: {e}); serving anyway", file=sys.stderr)
        finally:
            self._warmed_up.set()
        with torch.inference_mode():
            while True:
                idle = not self.scheduler.has_work()
                if idle:
                    self._emit(self._take_pending())
                if not self._admit(block=idle):
                    break
                if self.scheduler.has_work():
                    try:
                        outputs = self._step()
                    except Exception as e:  # a bug outside the forward: fail what is live, keep serving
                        self._in_flight = None
                        error = f"engine step failed: {type(e).__name__}: {e}"
                        outputs = self._take_pending()
                        outputs += [self._end(seq, FinishReason.ERROR, error) for seq in list(self._live.values())]
                    self._emit(outputs)
            outputs = self._take_pending()
            self._emit(outputs + [self._end(seq, FinishReason.ABORT) for seq in list(self._live.values())])

    def _admit(self, block: bool) -> bool:
        """Apply queued adds and aborts, in order; False once shutdown is requested."""
        outputs = []
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is _STOP:
                    self._emit(outputs)
                    return False
                if isinstance(item, Sequence):
                    self._live[item.request_id] = item
                    self._num_live_sampled += not _argmax_only(item.sampling)
                    self.scheduler.add(item)
                elif item in self._live:
                    outputs += self._take_pending()  # its last tokens go out before its end
                    outputs.append(self._end(self._live[item], FinishReason.ABORT))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._emit(outputs)
        return True

    def _step(self) -> list[EngineOutput]:
        """Schedule, run and sample a step. On CUDA the previous step's outputs are built while the GPU runs
        this one (their tokens are known by then; building them is ~1 ms of Python for a batch of 256)."""
        pipelined = self._pipeline and self._num_live_sampled == 0
        if not pipelined:
            self._drain()
        batch = self.scheduler.schedule()
        failed = [
            self._end(
                seq,
                FinishReason.ERROR,
                f"the request needs more KV blocks than the pool's {self.block_manager.num_blocks_total}",
            )
            for seq in batch.failed
        ]
        if not batch.seqs:
            self._drain()
            return self._take_pending() + failed
        if pipelined:
            return self._pipelined_step(batch, failed)
        outputs = None
        try:
            logits, sample_idx = self.runner.run(batch)
            outputs = self._take_pending() + failed  # the GPU is busy with this step's forward meanwhile
            if self._num_live_sampled == 0:  # the sampler would take each row's argmax: skip its per-row work
                tokens, logprobs = argmax(logits.float()).tolist(), [None] * len(sample_idx)
            else:
                seqs = [batch.seqs[i] for i in sample_idx]
                rows = [SampleRow(s.sampling, s.token_ids, s.num_generated_tokens) for s in seqs]
                tokens, logprobs = self.sampler(logits, rows)
        except Exception as e:  # a failed forward fails its requests, not the engine
            if outputs is None:
                outputs = self._take_pending() + failed
            return outputs + [self._end(s, FinishReason.ERROR, f"{type(e).__name__}: {e}") for s in batch.seqs]
        self._count(batch)
        logprobs_of = dict(zip(sample_idx, logprobs))
        for i, seq, reason in self.scheduler.postprocess(batch, dict(zip(sample_idx, tokens))):
            self._pending.append((seq, reason, logprobs_of[i], None))
            if reason is not None:
                self._forget(seq)
        if not self._defer_outputs:
            outputs += self._take_pending()
        return outputs

    def _pipelined_step(self, batch: ScheduledBatch, failed: list[EngineOutput]) -> list[EngineOutput]:
        """Run this step before the last one's tokens are read: its decode rows take those tokens on the device.

        While every live request is a plain argmax, the loop runs one step ahead of its tokens:

            host:  schedule N+1 | launch N+1 | read N's tokens, finish, build outputs | schedule N+2 | ...
            GPU:   ...  step N        ...    |           step N+1            ...    |

        So scheduling and building inputs overlap the GPU. Each sequence that samples in a step gets a placeholder
        token -(j + 1) (j: its row among the step's sampled rows) and its num_computed_tokens moved on at launch;
        the next step feeds tokens[j] from the device, and reading the tokens fills the placeholders
        (Scheduler.fill). A sequence that stops on a stop token has run one more step for nothing; one that
        reaches max_tokens is not scheduled again."""
        prev = self._in_flight
        try:
            logits, sample_idx = self.runner.run(batch, prev.tokens if prev is not None else None)
            tokens = argmax(logits)
        except Exception as e:  # a failed forward fails its requests, not the engine
            self._drain()
            outputs = self._take_pending() + failed
            error = f"{type(e).__name__}: {e}"
            return outputs + [self._end(s, FinishReason.ERROR, error) for s in batch.seqs if s.status is not _DONE]
        outputs = self._take_pending() + failed
        self._count(batch)
        self._stats.num_pipelined_steps += prev is not None
        placeholders = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for j, i in enumerate(sample_idx):
            seq = batch.seqs[i]
            placeholders.append(len(seq.token_ids))
            seq.token_ids.append(-1 - j)
        self._drain()  # step N's tokens, while the GPU runs this step
        outputs += self._take_pending()
        self._host_tokens[: len(sample_idx)].copy_(tokens, non_blocking=True)
        self._tokens_copied.record()
        self._in_flight = _InFlight(batch, sample_idx, placeholders, tokens)
        return outputs

    def _drain(self) -> None:
        """Read the in-flight step's tokens and finish it (its outputs go to _pending)."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return
        self._tokens_copied.synchronize()
        tokens = self._host_tokens[: len(step.sample_idx)].tolist()
        ends = dict(zip(step.sample_idx, step.placeholders))
        for i, seq, reason in self.scheduler.fill(step.batch, list(zip(step.sample_idx, step.placeholders, tokens))):
            self._pending.append((seq, reason, None, ends[i] + 1))
            if reason is not None:
                self._forget(seq)

    def _take_pending(self) -> list[EngineOutput]:
        """The outputs of the last step's new tokens (kept back on CUDA until the next step is running)."""
        pending, self._pending = self._pending, []
        outputs = []
        for seq, reason, logprob, end in pending:
            out = self._output(seq, reason, end)
            if logprob is not None:
                out.logprobs = [logprob]
            outputs.append(out)
        return outputs

    def _count(self, batch: ScheduledBatch) -> None:
        """Update the counters (before postprocess moves num_computed_tokens on)."""
        s = self._stats
        s.num_steps += 1
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            done = seq.num_computed_tokens
            s.num_prefill_tokens += max(0, min(done + n, seq.num_prompt_tokens) - done)
            s.num_generated_tokens += batch.samples(i)

    @staticmethod
    def _output(seq: Sequence, reason: FinishReason | None, end: int | None = None) -> EngineOutput:
        """The tokens of seq not sent yet, up to token_ids[end] (exclusive; None: all)."""
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_sent_tokens : end]
        seq.num_sent_tokens += len(new)
        first_or_last = seq.num_sent_tokens == len(new) or reason is not None
        out = EngineOutput(seq.request_id, new, finish_reason=reason)
        if first_or_last:
            out.num_prompt_tokens, out.num_cached_tokens = seq.num_prompt_tokens, seq.num_cached_tokens
        return out

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> EngineOutput:
        """Finish a sequence outside the normal flow (abort, error, shutdown) and free its blocks."""
        self.scheduler.finish(seq)
        out = EngineOutput(
            seq.request_id,
            [],
            finish_reason=reason,
            error=error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        self._forget(seq)
        return out

    def _forget(self, seq: Sequence) -> None:
        if self._live.pop(seq.request_id, None) is not None:
            self._num_live_sampled -= not _argmax_only(seq.sampling)
        with self._lock:
            self._live_ids.discard(seq.request_id)

    def _emit(self, outputs: list[EngineOutput]) -> None:
        if outputs:
            with self._outputs_ready:
                self._outputs.extend(outputs)
                self._outputs_ready.notify_all()


_DONE = SequenceStatus.FINISHED


@dataclass(slots=True)
class _InFlight:
    """A pipelined step whose tokens are still on the device (see PytorchEngine._pipelined_step)."""

    batch: ScheduledBatch
    sample_idx: list[int]
    placeholders: list[int]
    """Where each sampled row's placeholder sits in its sequence's token_ids."""
    tokens: torch.Tensor
    """[len(sample_idx)] int64 on the device; the next step's decode rows read it."""


def _argmax_only(params: SamplingParams) -> bool:
    """Whether the sampler picks this request's tokens by a plain argmax: greedy, no penalty, no logprobs."""
    greedy = params.temperature <= 0 or params.top_k == 1
    return greedy and params.repetition_penalty == 1.0 and params.logprobs is None
