// Continuous-batching policy over sequences and token counts; no tensors.
//
// Each step gets a budget of max_num_batched_tokens: running decodes first, then running prefills
// continued in chunks, then waiting sequences admitted (up to max_num_seqs) with what budget is left.
// When blocks run out, the newest running sequence is preempted by recompute: its blocks are freed and it
// goes back to the front of the waiting queue (its full blocks stay in the prefix cache).
#pragma once

#include <deque>
#include <vector>

#include "turbo/engine/sequence.h"
#include "turbo/kv/block_manager.h"

namespace turbo {

struct ScheduledBatch {
  std::vector<Sequence*> seqs;
  std::vector<int> num_new_tokens;
  std::vector<Sequence*> preempted;
  std::vector<Sequence*> failed;  // cannot fit in the whole pool; the engine ends them with ERROR
  bool empty() const { return seqs.empty(); }
  // Whether seqs[i] reaches its last token this step (a token is sampled for it).
  bool samples(size_t i) const { return seqs[i]->num_computed_tokens + num_new_tokens[i] == seqs[i]->size(); }
};

class Scheduler {
 public:
  Scheduler(BlockManager* bm, int max_num_seqs, int max_num_batched_tokens)
      : bm_(bm), max_num_seqs_(max_num_seqs), max_num_batched_tokens_(max_num_batched_tokens) {}

  void add(Sequence* seq);
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  // Take a sequence out (finished, aborted, failed) and release its blocks.
  void finish(Sequence* seq);
  ScheduledBatch schedule();
  // After the forward: advance num_computed_tokens and register newly full blocks.
  void advance(const ScheduledBatch& batch);

  size_t num_running() const { return running_.size(); }
  size_t num_waiting() const { return waiting_.size(); }
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  bool allocate_or_preempt(Sequence* seq, int num_new, ScheduledBatch& batch);
  void admit(ScheduledBatch& batch, int budget);
  void preempt(Sequence* seq, ScheduledBatch& batch);
  void fail(Sequence* seq, ScheduledBatch& batch);
  void remove_running(Sequence* seq);

  BlockManager* bm_;
  int max_num_seqs_;
  int max_num_batched_tokens_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // in admission order: the back is the newest
  int64_t num_preemptions_ = 0;
};

}  // namespace turbo
