// One step of the engine's loop: schedule, build, launch the forward, sample, and pipelining (step N+1
// launched from step N's on-device tokens before N's are read back). The rest of Engine is in engine.cc.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <numeric>

#include "turbo/engine/batch_builder.h"
#include "turbo/engine/engine.h"
#include "turbo/engine/step_profile.h"
#include "turbo/kernels/kernels.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/engine/decode_graphs.h"
#endif

namespace turbo {

namespace {

bool is_stop(const Sequence& seq, int32_t token) {
  const auto& stops = seq.sampling.stop_token_ids;
  return !seq.sampling.ignore_eos && std::find(stops.begin(), stops.end(), token) != stops.end();
}

}  // namespace

void Engine::step() {
  StepProfile& profile = *profile_;
  const auto t0 = std::chrono::steady_clock::now();
  if (pending_) {
    if (const size_t rows = chain()) {
      profile.add(t0, true, rows, static_cast<long>(rows));
      return;
    }
  }
  std::vector<Output> outputs;
  if (pending_) complete(outputs);
  ScheduledBatch batch = scheduler_->schedule();
  counters_.num_preemptions = scheduler_->num_preemptions();
  for (Sequence* seq : batch.failed)
    end(seq, FinishReason::kError, outputs,
        "the request needs more KV blocks than the pool's " + std::to_string(config_.num_blocks));
  if (batch.empty()) {
    emit(outputs);
    return;
  }
  const long num_tokens =
      profile.on ? std::accumulate(batch.num_new_tokens.begin(), batch.num_new_tokens.end(), 0L) : 0;
  Launched launched{std::move(batch), {}, {}};
  std::vector<int32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  try {
    const ForwardBatch host = build_inputs(launched);
    const bool pipelined = can_pipeline(launched, host);
    at::Tensor logits = forward(host);
    if (pipelined) {  // the next step() chains the following decode step behind this one
      launched.tokens = kernels::argmax_async(logits);
      pending_ = std::make_unique<Launched>(std::move(launched));
      emit(outputs);
      profile.add(t0, false, pending_->batch.seqs.size(), num_tokens);
      return;
    }
    std::vector<kernels::SampleRow> rows;
    rows.reserve(launched.sample_seq.size());
    for (int i : launched.sample_seq) {
      const Sequence& s = *launched.batch.seqs[i];
      rows.push_back({&s.sampling, s.tokens.data(), s.size(), s.seed, static_cast<int64_t>(s.num_generated())});
    }
    if (!rows.empty()) kernels::sample(logits, rows, tokens, logprobs);
  } catch (const std::exception& e) {  // a failed forward fails its requests, not the engine
    for (Sequence* seq : launched.batch.seqs) end(seq, FinishReason::kError, outputs, e.what());
    emit(outputs);
    return;
  }
  finish(launched, tokens, logprobs, outputs);
  emit(outputs);
  profile.add(t0, false, launched.batch.seqs.size(), num_tokens);
}

// Pipelined decode. Step N (pending_) is on the GPU, its greedy tokens on their way. When step N+1 is certain to
// be N's sequences again, one token each, less those that N's token brings to their length limit (nobody waiting
// to be admitted, free blocks for those that cross a block boundary), N+1 is scheduled, built and launched now,
// its input tokens gathered on the device from N's argmax; only then are N's tokens read, so the host's work for
// N+1 overlaps the GPU's for N. The sequences at their limit leave the scheduler before N+1 is planned (N, ahead
// of N+1 on the stream, is done with their blocks before anyone reuses them) and end once N's tokens are read. A
// sequence that N ends with a stop token is also in N+1: N+1 is then finished at once and that row of it dropped.
size_t Engine::chain() {
  Launched& n = *pending_;
  const size_t S = n.batch.seqs.size();
  if (scheduler_->num_running() != S || static_cast<int>(S) > config_.max_num_batched_tokens) return 0;
  std::vector<Sequence*> ending, going;  // N's token is the last / not the last of these
  std::vector<int64_t> going_rows;       // their rows in N (every row of a pipelined step samples)
  int new_blocks = 0;
  for (size_t k = 0; k < S; ++k) {
    Sequence* seq = n.batch.seqs[k];
    if (seq->size() + 1 >= seq->max_tokens) {
      ending.push_back(seq);
    } else {
      going.push_back(seq);
      going_rows.push_back(static_cast<int64_t>(k));
      new_blocks += seq->size() % config_.block_size == 0;  // N+1 writes position size(): a new block
    }
  }
  if (going.empty() || new_blocks > bm_->num_blocks_free()) return 0;
  // With room in the batch, a waiting request is admitted (prefilled) rather than chained past.
  if (scheduler_->num_waiting() > 0 && static_cast<int>(going.size()) < config_.max_num_seqs) return 0;

  std::vector<Output> outputs;
  ++counters_.num_steps;
  ++counters_.num_pipelined_steps;
  scheduler_->advance(n.batch);  // every token up to N's input is real: the block hashes are right
  for (Sequence* seq : ending) scheduler_->finish(seq);
  for (Sequence* seq : going) seq->tokens.push_back(0);  // N's token, filled in below
  ScheduledBatch next = scheduler_->schedule();
  TORCH_CHECK(next.seqs == going && next.preempted.empty() && next.failed.empty(),
              "turbo: the pipelined step differs from the one planned");
  Launched launched{std::move(next), {}, {}};
  const ForwardBatch host = build_inputs(launched);
  at::Tensor n_tokens = n.tokens.device;
  if (!ending.empty()) {
    at::Tensor rows = at::tensor(going_rows, at::kLong);
    if (!n_tokens.device().is_cpu()) rows = rows.pin_memory().to(n_tokens.device(), /*non_blocking=*/true);
    n_tokens = n_tokens.index_select(0, rows);
  }
  launched.tokens = kernels::argmax_async(forward(host, n_tokens));

  const std::vector<int32_t> tokens = kernels::wait(n.tokens);
  std::vector<Sequence*> stopped;
  for (size_t k = 0; k < n.sample_seq.size(); ++k) {
    Sequence* seq = n.batch.seqs[n.sample_seq[k]];
    ++counters_.num_generated_tokens;
    if (seq->status == SeqStatus::kFinished) {  // at its length limit: out of the scheduler already
      seq->tokens.push_back(tokens[k]);
      end(seq, is_stop(*seq, tokens[k]) ? FinishReason::kStop : FinishReason::kLength, outputs);
      continue;
    }
    seq->tokens.back() = tokens[k];
    if (is_stop(*seq, tokens[k])) {
      stopped.push_back(seq);
    } else {
      outputs.push_back(make_output(*seq, FinishReason::kNone));
    }
  }
  *pending_ = std::move(launched);
  if (!stopped.empty()) {
    Launched last = std::move(*pending_);
    pending_.reset();
    const std::vector<int32_t> last_tokens = kernels::wait(last.tokens);
    std::vector<TokenLogprob> none(last_tokens.size());
    finish(last, last_tokens, none, outputs, stopped);
    for (Sequence* seq : stopped) end(seq, FinishReason::kStop, outputs);
  }
  emit(outputs);
  return going.size();
}

void Engine::complete(std::vector<Output>& outputs) {
  Launched launched = std::move(*pending_);
  pending_.reset();
  const std::vector<int32_t> tokens = kernels::wait(launched.tokens);
  std::vector<TokenLogprob> none(tokens.size());
  finish(launched, tokens, none, outputs);
}

// Decode-only steps (graph steps where there are graphs) whose rows all sample greedily without penalties or
// logprobs: their tokens can stay on the device for the next step (argmax_async).
bool Engine::can_pipeline(const Launched& launched, const ForwardBatch& host_batch) const {
  if (!pipeline_ || host_batch.sample_rows.size(0) != static_cast<int64_t>(launched.batch.seqs.size())) return false;
  if (!host_batch.is_decode) return false;
#ifdef TURBO_WITH_CUDA
  if (graphs_ && !graphs_->accepts(host_batch)) return false;
#endif
  for (const Sequence* seq : launched.batch.seqs) {
    const SamplingParams& p = seq->sampling;
    if (!(p.temperature <= 0.f || p.top_k == 1) || p.repetition_penalty != 1.0f || p.logprobs >= 0) return false;
  }
  return true;
}

// A step's results: KV counts advance, each sampling row gets its token (rows of `skip` excepted), finished
// sequences end.
void Engine::finish(Launched& launched, const std::vector<int32_t>& tokens, std::vector<TokenLogprob>& logprobs,
                    std::vector<Output>& outputs, const std::vector<Sequence*>& skip) {
  const ScheduledBatch& batch = launched.batch;
  ++counters_.num_steps;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const Sequence& s = *batch.seqs[i];
    const int64_t done = s.num_computed_tokens, n = batch.num_new_tokens[i];
    counters_.num_prefill_tokens += std::max<int64_t>(0, std::min<int64_t>(done + n, s.num_prompt_tokens) - done);
  }
  scheduler_->advance(batch);
  for (size_t k = 0; k < launched.sample_seq.size(); ++k) {
    Sequence* seq = batch.seqs[launched.sample_seq[k]];
    if (std::find(skip.begin(), skip.end(), seq) != skip.end()) continue;
    const int32_t token = tokens[k];
    seq->tokens.push_back(token);
    ++counters_.num_generated_tokens;
    if (seq->sampling.logprobs >= 0) seq->pending_logprobs.push_back(std::move(logprobs[k]));
    FinishReason reason = FinishReason::kNone;
    if (is_stop(*seq, token)) {
      reason = FinishReason::kStop;
    } else if (seq->size() >= seq->max_tokens) {
      reason = FinishReason::kLength;
    }
    if (reason != FinishReason::kNone) {
      end(seq, reason, outputs);
    } else {
      outputs.push_back(make_output(*seq, FinishReason::kNone));
    }
  }
}

ForwardBatch Engine::build_inputs(Launched& launched) const {
  const bool pinned = !model_->options().device().is_cpu();  // staged for a non-blocking copy to the GPU
  return build_forward_batch(launched.batch, config_.block_size, pinned, launched.sample_seq);
}

at::Tensor Engine::forward(const ForwardBatch& host_batch, const at::Tensor& device_tokens) {
#ifdef TURBO_WITH_CUDA
  if (graphs_ && graphs_->accepts(host_batch)) return graphs_->run(host_batch, device_tokens);
#endif
  ForwardBatch batch = to_device(host_batch, model_->options().device());
  if (device_tokens.defined()) batch.token_ids = device_tokens;
  return model_->forward(batch, kv_);
}

}  // namespace turbo
