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
#include "turbo/engine/step_profile.h"
#include "turbo/kernels/kernels.h"
#ifdef TURBO_WITH_CUDA
#include "turbo/engine/decode_graphs.h"
#endif

namespace turbo {


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
  // Pipelined decode: on by default with CUDA graphs; TURBO_PIPELINE=0 turns it off, =1 on for eager steps too
  // (on CPU it overlaps nothing: it is there so that the chaining logic runs in the CPU tests).
  if (const char* v = std::getenv("TURBO_PIPELINE")) {
    if (std::string(v) == "0") pipeline_ = false;
    if (std::string(v) == "1") pipeline_ = true;
  }
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
  pipeline_ = true;
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
