#include "turbo/engine/engine.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>

#include "turbo/engine/batch_builder.h"
#include "turbo/kernels/kernels.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/kernels/cuda/decode_graphs.h"
#endif

namespace turbo {

// TURBO_PROFILE=1: every 32 steps, the mean wall time of a step and how many of them were pipelined.
struct StepProfile {
  bool on = std::getenv("TURBO_PROFILE") != nullptr;
  double total = 0;
  int n = 0, pipelined = 0;
  void add(std::chrono::steady_clock::time_point t0, bool chained, size_t batch) {
    if (!on) return;
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pipelined += chained;
    if (++n == 32) {
      std::fprintf(stderr, "[turbo] per step: %.2f ms, %d of 32 pipelined (batch %zu)\n", 1e3 * total / n, pipelined,
                   batch);
      total = 0;
      n = pipelined = 0;
    }
  }
};

Engine::Engine(const EngineConfig& config, const ModelConfig& model_config, const WeightMap& weights)
    : config_(config), model_config_(model_config) {
  if (config.num_blocks < 1 || config.block_size < 1) throw std::invalid_argument("num_blocks, block_size >= 1");
  if (config.max_num_seqs < 1 || config.max_num_batched_tokens < 1)
    throw std::invalid_argument("max_num_seqs and max_num_batched_tokens must be >= 1");
  if (config.quant_policy != 0) throw std::invalid_argument("turbo: KV quantization is not implemented yet");
  model_ = std::make_unique<LlamaModel>(model_config, weights);
  kv_ = KVCache(model_config.num_layers, config.num_blocks, config.block_size, model_config.num_kv_heads,
                model_config.head_dim, model_->options());
  print_kv_pool();
  bm_ = std::make_unique<BlockManager>(config.num_blocks, config.block_size, config.enable_prefix_caching);
  scheduler_ = std::make_unique<Scheduler>(bm_.get(), config.max_num_seqs, config.max_num_batched_tokens);
  profile_ = std::make_unique<StepProfile>();
  setup_cuda_graphs();
  stats_.num_blocks_total = stats_.num_blocks_free = config.num_blocks;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { shutdown(); }

// GPU models: decode CUDA graphs for every batch bucket, captured now, and pipelined decode on top of them.
// A capture that fails (e.g. out of memory) leaves the engine eager, with a warning.
void Engine::setup_cuda_graphs() {
#ifdef TURBO_WITH_CUDA
  auto env_off = [](const char* name) {
    const char* v = std::getenv(name);
    return v && std::string(v) == "0";
  };
  if (!model_->options().device().is_cuda() || !config_.cuda_graphs || env_off("TURBO_CUDA_GRAPHS")) return;
  const int64_t max_blocks = std::min<int64_t>(config_.num_blocks, bm_->blocks_needed(config_.session_len));
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c10::InferenceMode inference;
    graphs_ = std::make_unique<cuda::DecodeGraphs>(*model_, kv_, config_.max_num_seqs, max_blocks);
    graphs_->capture_all();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[turbo] CUDA graphs off (capture failed: %s)\n", e.what());
    graphs_.reset();
    return;
  }
  std::fprintf(stderr, "[turbo] %lld decode CUDA graphs captured in %.1f s\n",
               static_cast<long long>(graphs_->num_graphs()),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  pipeline_ = !env_off("TURBO_PIPELINE");
#endif
}

void Engine::add_request(const std::string& request_id, std::vector<int32_t> prompt, SamplingParams sampling) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n == 0) throw std::invalid_argument("the prompt is empty");
  for (int32_t t : prompt)
    if (t < 0 || t >= model_config_.vocab_size)
      throw std::invalid_argument("prompt token id " + std::to_string(t) + " is outside [0, " +
                                  std::to_string(model_config_.vocab_size) + ")");
  if (n + 1 > config_.session_len)
    throw std::invalid_argument("the prompt has " + std::to_string(n) +
                                " tokens; with one new token it exceeds session_len " +
                                std::to_string(config_.session_len));
  if (bm_->blocks_needed(n + 1) > config_.num_blocks)
    throw std::invalid_argument("the KV pool (" + std::to_string(config_.num_blocks) + " blocks of " +
                                std::to_string(config_.block_size) + " tokens) is too small for this request");
  if (sampling.max_new_tokens < 1) throw std::invalid_argument("max_new_tokens must be >= 1");

  auto seq = std::make_unique<Sequence>();
  seq->request_id = request_id;
  seq->num_prompt_tokens = static_cast<int>(n);
  seq->max_tokens = static_cast<int>(std::min<int64_t>(n + sampling.max_new_tokens, config_.session_len));
  seq->tokens = std::move(prompt);
  if (sampling.has_seed) {
    seq->seed = sampling.seed;
  } else {
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    seq->seed = rng();
  }
  seq->sampling = std::move(sampling);
  std::lock_guard<std::mutex> lock(in_mu_);
  if (!accepting_) throw std::invalid_argument("the engine is shut down");
  if (!live_ids_.insert(request_id).second)
    throw std::invalid_argument("request id '" + request_id + "' is already running");
  inbox_.push_back(Command{Command::kAdd, std::move(seq), request_id});
  in_cv_.notify_one();
}

void Engine::abort_request(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(in_mu_);
  if (!live_ids_.count(request_id)) return;
  inbox_.push_back(Command{Command::kAbort, nullptr, request_id});
  in_cv_.notify_one();
}

std::vector<Output> Engine::get_outputs(double timeout_s) {
  std::unique_lock<std::mutex> lock(out_mu_);
  // After shutdown an untimed wait returns at once; a timed one still waits (so a polling reader does not spin).
  if (timeout_s < 0) {
    out_cv_.wait(lock, [this] { return !outbox_.empty() || stopped_; });
  } else if (timeout_s > 0) {
    out_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return !outbox_.empty(); });
  }
  std::vector<Output> out;
  out.swap(outbox_);
  return out;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  return stats_;
}

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (accepting_) {
      accepting_ = false;
      inbox_.push_back(Command{Command::kStop, nullptr, ""});
      in_cv_.notify_one();
    }
  }
  if (thread_.joinable()) thread_.join();
}

// ---- the loop ----

void Engine::print_kv_pool() const {
  const at::TensorOptions opts = model_->options();
  const int64_t bytes = KVCache::bytes_per_block(model_config_.num_layers, config_.block_size,
                                                 model_config_.num_kv_heads, model_config_.head_dim,
                                                 static_cast<int>(opts.dtype().itemsize()));
  const char* dtype = c10::toString(c10::typeMetaToScalarType(opts.dtype()));
  std::fprintf(stderr, "[turbo] KV cache on %s (%s): %d blocks x %d tokens = %lld tokens, %.0f MiB\n",
               opts.device().str().c_str(), dtype, config_.num_blocks, config_.block_size,
               static_cast<long long>(config_.num_blocks) * config_.block_size,
               static_cast<double>(bytes) * config_.num_blocks / (1 << 20));
}

void Engine::loop() {
  c10::InferenceMode guard;
  c10::OptionalDeviceGuard device_guard;  // a new thread starts on device 0: use the model's
  if (!model_->options().device().is_cpu()) device_guard.reset_device(model_->options().device());
  at::init_num_threads();
  if (config_.num_threads > 0) at::set_num_threads(config_.num_threads);
  while (admit(!scheduler_->has_work())) {
    if (!scheduler_->has_work()) continue;
    try {
      step();
    } catch (const std::exception& e) {  // a bug in the loop: fail every live request, keep serving
      pending_.reset();
      std::vector<Output> outputs;
      std::vector<Sequence*> all;
      for (auto& [id, seq] : live_) all.push_back(seq.get());
      for (Sequence* seq : all) end(seq, FinishReason::kError, outputs, std::string("engine error: ") + e.what());
      emit(outputs);
    }
  }
  std::vector<Output> outputs;
  if (pending_) {
    try {
      complete(outputs);
    } catch (const std::exception&) {
      pending_.reset();
    }
  }
  std::vector<Sequence*> all;
  for (auto& [id, seq] : live_) all.push_back(seq.get());
  for (Sequence* seq : all) end(seq, FinishReason::kAbort, outputs);
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    stopped_ = true;
  }
  emit(outputs);
}

bool Engine::admit(bool block) {
  std::deque<Command> cmds;
  {
    std::unique_lock<std::mutex> lock(in_mu_);
    if (block) in_cv_.wait(lock, [this] { return !inbox_.empty(); });
    cmds.swap(inbox_);
  }
  std::vector<Output> outputs;
  if (!cmds.empty() && pending_) complete(outputs);  // never end a sequence that a launched step still uses
  bool keep_going = true;
  for (Command& c : cmds) {
    if (c.kind == Command::kStop) {
      keep_going = false;
      break;
    }
    if (c.kind == Command::kAdd) {
      Sequence* seq = c.seq.get();
      seq->arrival = arrivals_++;
      live_[seq->request_id] = std::move(c.seq);
      scheduler_->add(seq);
    } else {
      auto it = live_.find(c.request_id);
      if (it != live_.end()) end(it->second.get(), FinishReason::kAbort, outputs);
    }
  }
  emit(outputs);
  return keep_going;
}

namespace {

bool is_stop(const Sequence& seq, int32_t token) {
  const auto& stops = seq.sampling.stop_token_ids;
  return !seq.sampling.ignore_eos && std::find(stops.begin(), stops.end(), token) != stops.end();
}

}  // namespace

void Engine::step() {
  StepProfile& profile = *profile_;
  const auto t0 = std::chrono::steady_clock::now();
  if (pending_ && chain()) {
    profile.add(t0, true, scheduler_->num_running());
    return;
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
  Launched launched{std::move(batch), {}, {}};
  std::vector<int32_t> tokens;
  std::vector<TokenLogprob> logprobs;
  try {
    const bool pinned = !model_->options().device().is_cpu();
    const ForwardBatch host = build_forward_batch(launched.batch, config_.block_size, pinned, launched.sample_seq);
    const bool pipelined = can_pipeline(launched, host);
    at::Tensor logits = forward(host);
    if (pipelined) {  // the next step() chains the following decode step behind this one
      launched.tokens = kernels::argmax_async(logits);
      pending_ = std::make_unique<Launched>(std::move(launched));
      emit(outputs);
      profile.add(t0, false, pending_->batch.seqs.size());
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
  profile.add(t0, false, launched.batch.seqs.size());
}

// Pipelined decode. Step N (pending_) is on the GPU, its greedy tokens on their way. When step N+1 is certain to
// be the same sequences again, one token each (nobody waiting to be admitted, nobody at its length limit, free
// blocks for those that cross a block boundary), N+1 is scheduled, built and launched now, its input tokens
// copied on the device from N's argmax; only then are N's tokens read, so the host's work for N+1 overlaps the
// GPU's for N. A sequence that N ends with a stop token is also in N+1: N+1 is then finished at once and that
// row of it dropped.
bool Engine::chain() {
  Launched& n = *pending_;
  const size_t S = n.batch.seqs.size();
  if (scheduler_->num_running() != S || static_cast<int>(S) > config_.max_num_batched_tokens) return false;
  if (scheduler_->num_waiting() > 0 && static_cast<int>(S) < config_.max_num_seqs) return false;
  int new_blocks = 0;
  for (Sequence* seq : n.batch.seqs) {
    if (seq->size() + 1 >= seq->max_tokens) return false;  // N's token is its last
    new_blocks += seq->size() % config_.block_size == 0;    // N+1 writes position size(): a new block
  }
  if (new_blocks > bm_->num_blocks_free()) return false;

  std::vector<Output> outputs;
  ++counters_.num_steps;
  scheduler_->advance(n.batch);  // every token up to N's input is real: the block hashes are right
  for (Sequence* seq : n.batch.seqs) seq->tokens.push_back(0);  // N's token, filled in below
  ScheduledBatch next = scheduler_->schedule();
  TORCH_CHECK(next.seqs == n.batch.seqs && next.preempted.empty() && next.failed.empty(),
              "turbo: the pipelined step differs from the one planned");
  Launched launched{std::move(next), {}, {}};
  const ForwardBatch host = build_forward_batch(launched.batch, config_.block_size, true, launched.sample_seq);
  launched.tokens = kernels::argmax_async(forward(host, n.tokens.device));

  const std::vector<int32_t> tokens = kernels::wait(n.tokens);
  std::vector<Sequence*> stopped;
  for (size_t k = 0; k < n.sample_seq.size(); ++k) {
    Sequence* seq = n.batch.seqs[n.sample_seq[k]];
    seq->tokens.back() = tokens[k];
    ++counters_.num_generated_tokens;
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
  return true;
}

void Engine::complete(std::vector<Output>& outputs) {
  Launched launched = std::move(*pending_);
  pending_.reset();
  const std::vector<int32_t> tokens = kernels::wait(launched.tokens);
  std::vector<TokenLogprob> none(tokens.size());
  finish(launched, tokens, none, outputs);
}

// Decode-only graph steps whose rows all sample greedily without penalties or logprobs: their tokens can stay on
// the GPU for the next step (argmax_async).
bool Engine::can_pipeline(const Launched& launched, const ForwardBatch& host_batch) const {
  if (!pipeline_ || host_batch.sample_rows.size(0) != static_cast<int64_t>(launched.batch.seqs.size())) return false;
#ifdef TURBO_WITH_CUDA
  if (!graphs_ || !graphs_->accepts(host_batch)) return false;
#else
  return false;
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

at::Tensor Engine::forward(const ForwardBatch& host_batch, const at::Tensor& device_tokens) {
#ifdef TURBO_WITH_CUDA
  if (graphs_ && graphs_->accepts(host_batch)) return graphs_->run(host_batch, device_tokens);
#endif
  ForwardBatch batch = to_device(host_batch, model_->options().device());
  if (device_tokens.defined()) batch.token_ids = device_tokens;
  return model_->forward(batch, kv_);
}

Output Engine::make_output(Sequence& seq, FinishReason reason, const std::string& error) {
  Output out;
  out.request_id = seq.request_id;
  const int begin = seq.num_prompt_tokens + seq.num_sent_tokens;
  out.new_token_ids.assign(seq.tokens.begin() + begin, seq.tokens.end());
  const bool first = seq.num_sent_tokens == 0;
  seq.num_sent_tokens += static_cast<int>(out.new_token_ids.size());
  if (seq.sampling.logprobs >= 0) {
    out.has_logprobs = true;
    out.logprobs.swap(seq.pending_logprobs);
  }
  out.finish_reason = reason;
  out.error = error;
  if (first || reason != FinishReason::kNone) {
    out.num_prompt_tokens = seq.num_prompt_tokens;
    out.num_cached_tokens = seq.num_cached_tokens;
  }
  return out;
}

void Engine::end(Sequence* seq, FinishReason reason, std::vector<Output>& outputs, const std::string& error) {
  if (seq->status != SeqStatus::kFinished) scheduler_->finish(seq);
  outputs.push_back(make_output(*seq, reason, error));
  const std::string id = seq->request_id;
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    live_ids_.erase(id);
  }
  live_.erase(id);  // frees seq
}

void Engine::emit(std::vector<Output>& outputs) {
  std::lock_guard<std::mutex> lock(out_mu_);
  stats_ = counters_;
  stats_.num_running = static_cast<int64_t>(scheduler_->num_running());
  stats_.num_waiting = static_cast<int64_t>(scheduler_->num_waiting());
  stats_.num_blocks_total = bm_->num_blocks_total();
  stats_.num_blocks_free = bm_->num_blocks_free();
  stats_.num_blocks_cached = bm_->num_blocks_cached();
  stats_.num_cache_hit_blocks = bm_->num_hits();
  stats_.num_preemptions = scheduler_->num_preemptions();
  if (outputs.empty()) return;
  for (Output& o : outputs) outbox_.push_back(std::move(o));
  outputs.clear();
  out_cv_.notify_all();
}

}  // namespace turbo
