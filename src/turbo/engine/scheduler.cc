#include "turbo/engine/scheduler.h"

#include <algorithm>

namespace turbo {

void Scheduler::add(Sequence* seq) {
  seq->status = SeqStatus::kWaiting;
  waiting_.push_back(seq);
}

void Scheduler::remove_running(Sequence* seq) {
  running_.erase(std::remove(running_.begin(), running_.end(), seq), running_.end());
}

void Scheduler::finish(Sequence* seq) {
  if (seq->status == SeqStatus::kRunning) {
    remove_running(seq);
  } else {
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), seq), waiting_.end());
  }
  bm_->free(seq->table);
  seq->num_computed_tokens = 0;
  seq->status = SeqStatus::kFinished;
}

ScheduledBatch Scheduler::schedule() {
  ScheduledBatch batch;
  int budget = max_num_batched_tokens_;
  // Decodes first (one token each), then prefills that are mid-way (stable order).
  std::vector<Sequence*> order = running_;
  std::stable_partition(order.begin(), order.end(), [](Sequence* s) { return s->num_uncomputed() <= 1; });
  for (Sequence* seq : order) {
    if (budget == 0) break;
    if (seq->status != SeqStatus::kRunning) continue;  // preempted earlier in this loop
    int num_new = static_cast<int>(std::min<int64_t>(seq->num_uncomputed(), budget));
    if (allocate_or_preempt(seq, num_new, batch)) {
      batch.seqs.push_back(seq);
      batch.num_new_tokens.push_back(num_new);
      budget -= num_new;
    }
  }
  if (batch.preempted.empty()) admit(batch, budget);
  return batch;
}

bool Scheduler::allocate_or_preempt(Sequence* seq, int num_new, ScheduledBatch& batch) {
  while (!bm_->allocate(seq->table, seq->num_computed_tokens + num_new)) {
    Sequence* victim = seq;
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      Sequence* s = *it;
      if (s != seq && std::find(batch.seqs.begin(), batch.seqs.end(), s) == batch.seqs.end()) {
        victim = s;
        break;
      }
    }
    if (victim == seq && running_.size() == 1 && batch.seqs.empty()) {
      fail(seq, batch);  // alone with the whole pool and still short
      return false;
    }
    preempt(victim, batch);
    if (victim == seq) return false;
  }
  return true;
}

void Scheduler::admit(ScheduledBatch& batch, int budget) {
  while (!waiting_.empty() && budget > 0 && static_cast<int>(running_.size()) < max_num_seqs_) {
    Sequence* seq = waiting_.front();
    const bool first_time = seq->num_preemptions == 0;
    seq->num_computed_tokens = bm_->match_prefix(seq->tokens.data(), static_cast<int>(seq->size()), seq->table);
    int num_new = static_cast<int>(std::min<int64_t>(seq->num_uncomputed(), budget));
    if (!bm_->allocate(seq->table, seq->num_computed_tokens + num_new)) {
      bm_->free(seq->table);
      seq->num_computed_tokens = 0;
      if (!running_.empty()) break;  // wait for running sequences to free blocks
      waiting_.pop_front();
      fail(seq, batch);
      continue;
    }
    if (first_time) seq->num_cached_tokens = static_cast<int>(seq->num_computed_tokens);
    waiting_.pop_front();
    seq->status = SeqStatus::kRunning;
    running_.push_back(seq);
    batch.seqs.push_back(seq);
    batch.num_new_tokens.push_back(num_new);
    budget -= num_new;
  }
}

void Scheduler::preempt(Sequence* seq, ScheduledBatch& batch) {
  remove_running(seq);
  bm_->free(seq->table);
  seq->num_computed_tokens = 0;
  seq->status = SeqStatus::kWaiting;
  ++seq->num_preemptions;
  ++num_preemptions_;
  waiting_.push_front(seq);
  batch.preempted.push_back(seq);
}

void Scheduler::fail(Sequence* seq, ScheduledBatch& batch) {
  if (seq->status == SeqStatus::kRunning) remove_running(seq);
  bm_->free(seq->table);
  seq->num_computed_tokens = 0;
  seq->status = SeqStatus::kFinished;
  batch.failed.push_back(seq);
}

void Scheduler::advance(const ScheduledBatch& batch) {
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    Sequence* seq = batch.seqs[i];
    seq->num_computed_tokens += batch.num_new_tokens[i];
    bm_->cache_full_blocks(seq->tokens.data(), seq->num_computed_tokens, seq->table);
  }
}

}  // namespace turbo
