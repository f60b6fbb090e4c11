// A request as the engine loop sees it. Owned by the engine thread; never touched by other threads.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "turbo/kv/block_manager.h"

namespace turbo {

enum class FinishReason : int { kNone = 0, kStop = 1, kLength = 2, kAbort = 3, kError = 4 };

struct SamplingParams {
  int max_new_tokens = 512;
  float temperature = 1.0f;  // 0 = greedy
  float top_p = 1.0f;
  int top_k = 0;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  bool has_seed = false;
  uint64_t seed = 0;  // when !has_seed the engine draws one at admission
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int logprobs = -1;  // -1: none; n >= 0: the sampled token's logprob and the top n
};

struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
};

// One step's output of one request (the Python side turns it into lmkit EngineOutput).
struct Output {
  std::string request_id;
  std::vector<int32_t> new_token_ids;
  std::vector<TokenLogprob> logprobs;
  bool has_logprobs = false;
  FinishReason finish_reason = FinishReason::kNone;
  std::string error;
  int num_prompt_tokens = 0;
  int num_cached_tokens = 0;
};

enum class SeqStatus { kWaiting, kRunning, kFinished };

struct Sequence {
  std::string request_id;
  std::vector<int32_t> tokens;  // prompt + generated
  int num_prompt_tokens = 0;
  int max_tokens = 0;           // min(prompt + max_new_tokens, session_len)
  SamplingParams sampling;
  uint64_t seed = 0;

  SeqStatus status = SeqStatus::kWaiting;
  int64_t num_computed_tokens = 0;  // tokens whose KV is in the cache
  int num_cached_tokens = 0;        // prompt tokens served from the prefix cache at first admission
  int num_sent_tokens = 0;          // generated tokens already handed out
  int num_preemptions = 0;
  int64_t arrival = 0;              // admission order
  BlockTable table;
  std::vector<TokenLogprob> pending_logprobs;

  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_uncomputed() const { return size() - num_computed_tokens; }
  int num_generated() const { return static_cast<int>(tokens.size()) - num_prompt_tokens; }
};

}  // namespace turbo
