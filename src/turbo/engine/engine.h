// The turbo engine: a persistent batching loop on its own std::thread. See README.md for the contract.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "turbo/engine/scheduler.h"
#include "turbo/engine/sequence.h"
#include "turbo/kv/block_manager.h"
#include "turbo/kv/kv_cache.h"
#include "turbo/models/llama.h"

namespace turbo {

namespace cuda {
class DecodeGraphs;
}
struct StepProfile;

struct EngineConfig {
  int max_num_seqs = 128;
  int max_num_batched_tokens = 2048;
  int num_blocks = 0;
  int block_size = 64;
  bool enable_prefix_caching = true;
  int session_len = 4096;
  int num_threads = 0;   // 0: the default (all cores)
  int quant_policy = 0;  // KV quantization: 0 only, for now
  bool cuda_graphs = true;  // GPU: replay decode steps as CUDA graphs (env TURBO_CUDA_GRAPHS=0 turns them off)
};

struct EngineStats {
  int64_t num_running = 0, num_waiting = 0;
  int64_t num_blocks_total = 0, num_blocks_free = 0, num_blocks_cached = 0;
  int64_t num_prefill_tokens = 0, num_generated_tokens = 0, num_steps = 0, num_preemptions = 0;
  int64_t num_pipelined_steps = 0;  // steps launched before the previous step's tokens were read
  int64_t num_cache_hit_blocks = 0;
};

class Engine {
 public:
  Engine(const EngineConfig& config, const ModelConfig& model_config, const WeightMap& weights);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Thread-safe. add_request throws std::invalid_argument for a request that can never run.
  void add_request(const std::string& request_id, std::vector<int32_t> prompt, SamplingParams sampling);
  void abort_request(const std::string& request_id);
  // Waits up to timeout_s (< 0: forever) for outputs, then returns all of them. Never holds the engine up.
  std::vector<Output> get_outputs(double timeout_s);
  EngineStats stats() const;
  // Stops the loop; in-flight requests end with ABORT (their outputs stay readable). Idempotent.
  void shutdown();

  const EngineConfig& config() const { return config_; }

 private:
  struct Command {
    enum Kind { kAdd, kAbort, kStop } kind;
    std::unique_ptr<Sequence> seq;
    std::string request_id;
  };

  // A launched step: its batch, the batch index of each sampling row, and (pipelined steps) tokens on their way.
  struct Launched {
    ScheduledBatch batch;
    std::vector<int> sample_seq;
    kernels::TokenFuture tokens;
  };

  void setup_cuda_graphs();
  void loop();
  bool admit(bool block);  // apply queued commands; false once stop is requested
  void step();
  size_t chain();  // pipelined decode: launch the next step (its rows; 0: not chained), then finish pending_
  void complete(std::vector<Output>& outputs);  // wait for pending_'s tokens and finish it
  bool can_pipeline(const Launched& launched, const ForwardBatch& host_batch) const;
  void finish(Launched& launched, const std::vector<int32_t>& tokens, std::vector<TokenLogprob>& logprobs,
              std::vector<Output>& outputs, const std::vector<Sequence*>& skip = {});
  // The host inputs of a launched batch (pinned on a GPU); fills launched.sample_seq.
  ForwardBatch build_inputs(Launched& launched) const;
  // A CUDA graph where one fits, else the eager forward; device_tokens (optional) replace the batch's token ids.
  at::Tensor forward(const ForwardBatch& host_batch, const at::Tensor& device_tokens = {});
  void emit(std::vector<Output>& outputs);
  Output make_output(Sequence& seq, FinishReason reason, const std::string& error = "");
  void end(Sequence* seq, FinishReason reason, std::vector<Output>& outputs, const std::string& error = "");
  void print_kv_pool() const;

  EngineConfig config_;
  ModelConfig model_config_;

  // Inbox (any thread -> loop).
  mutable std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::deque<Command> inbox_;
  std::unordered_set<std::string> live_ids_;  // requests added and not yet finished (guarded by in_mu_)
  bool accepting_ = true;

  // Outbox (loop -> get_outputs), with the stats snapshot taken at each emission.
  mutable std::mutex out_mu_;
  std::condition_variable out_cv_;
  std::vector<Output> outbox_;
  EngineStats stats_;
  bool stopped_ = false;

  // Owned by the loop thread only (after construction).
  std::unique_ptr<LlamaModel> model_;
  KVCache kv_;
  std::unique_ptr<BlockManager> bm_;
  std::unique_ptr<Scheduler> scheduler_;
#ifdef TURBO_WITH_CUDA
  std::unique_ptr<cuda::DecodeGraphs> graphs_;  // null on CPU or with CUDA graphs off
#endif
  bool pipeline_ = false;  // overlap decode steps (GPU with graphs; TURBO_PIPELINE=0 off, =1 on, eager too)
  std::unique_ptr<Launched> pending_;  // a pipelined step whose tokens are not read yet
  std::unique_ptr<StepProfile> profile_;  // TURBO_PROFILE step timing
  std::unordered_map<std::string, std::unique_ptr<Sequence>> live_;
  int64_t arrivals_ = 0;
  EngineStats counters_;

  std::thread thread_;
};

}  // namespace turbo
