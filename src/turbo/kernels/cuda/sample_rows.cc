#include "turbo/kernels/cuda/sample_rows.h"

#include <algorithm>

#include "turbo/kernels/cuda/cuda_kernels.h"

namespace turbo::cuda {
namespace {

using kernels::SampleRow;

// A small host tensor in pinned memory, so its copy to the device can be asynchronous.
at::Tensor pinned(at::IntArrayRef sizes, at::ScalarType dt) {
  return at::empty(sizes, at::TensorOptions().dtype(dt).pinned_memory(true));
}

at::Tensor to(const at::Tensor& host, const at::Tensor& like) { return host.to(like.device(), /*non_blocking=*/true); }

bool needs_penalty(const SampleRow& r) { return r.params->repetition_penalty != 1.0f && r.history_len > 0; }
bool is_greedy(const SampleRow& r) { return r.params->temperature <= 0.f || r.params->top_k == 1; }

// CTRL repetition penalty over each row's history (prompt + generated), in place on the device.
void apply_repetition_penalty(at::Tensor& x, const std::vector<SampleRow>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  int64_t L = 1;
  for (const SampleRow& r : rows)
    if (needs_penalty(r)) L = std::max(L, r.history_len);
  at::Tensor ids = pinned({n, L}, at::kInt);
  at::Tensor pen = pinned({n}, at::kFloat);
  ids.fill_(-1);
  for (int64_t i = 0; i < n; ++i) {
    const bool on = needs_penalty(rows[i]);
    pen.data_ptr<float>()[i] = on ? rows[i].params->repetition_penalty : 1.0f;
    if (on) std::copy(rows[i].history, rows[i].history + rows[i].history_len, ids.data_ptr<int32_t>() + i * L);
  }
  repetition_penalty(x, to(ids, x), to(pen, x));
}

// One draw per row with the sample kernel (greedy rows included: temperature <= 0 takes the argmax there).
at::Tensor draw(const at::Tensor& x, const std::vector<SampleRow>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  at::Tensor temp = pinned({n}, at::kFloat), top_p = pinned({n}, at::kFloat), min_p = pinned({n}, at::kFloat);
  at::Tensor top_k = pinned({n}, at::kInt), seeds = pinned({n}, at::kLong), steps = pinned({n}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    const SamplingParams& p = *rows[i].params;
    temp.data_ptr<float>()[i] = p.temperature;
    top_p.data_ptr<float>()[i] = p.top_p;
    min_p.data_ptr<float>()[i] = p.min_p;
    top_k.data_ptr<int32_t>()[i] = p.top_k;
    seeds.data_ptr<int64_t>()[i] = static_cast<int64_t>(rows[i].seed);  // the kernel hashes the bits
    steps.data_ptr<int64_t>()[i] = rows[i].step;
  }
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  sample(x, to(temp, x), to(top_k, x), to(top_p, x), to(min_p, x), to(seeds, x), to(steps, x), out);
  return out;
}

// Logprobs of the raw logits for the rows that asked (top-n up to the largest n asked), copied back.
void fill_logprobs(const at::Tensor& logits, const at::Tensor& ids, const std::vector<SampleRow>& rows,
                   std::vector<TokenLogprob>& logprobs) {
  int64_t top_n = 0;
  for (const SampleRow& r : rows) top_n = std::max<int64_t>(top_n, r.params->logprobs);
  top_n = std::min<int64_t>(top_n, logits.size(1));
  auto [chosen, top_v, top_i] = turbo::cuda::logprobs(logits, ids, top_n);
  const at::Tensor c = chosen.cpu(), v = top_v.cpu().contiguous(), t = top_i.cpu().contiguous();
  for (size_t i = 0; i < rows.size(); ++i) {
    const int n_top = rows[i].params->logprobs;
    if (n_top < 0) continue;
    TokenLogprob& lp = logprobs[i];
    lp.logprob = c.data_ptr<float>()[i];
    lp.top.clear();
    for (int64_t j = 0; j < std::min<int64_t>(n_top, top_n); ++j)
      lp.top.emplace_back(static_cast<int32_t>(t.data_ptr<int64_t>()[i * top_n + j]), v.data_ptr<float>()[i * top_n + j]);
  }
}

}  // namespace

void sample_rows(const at::Tensor& raw_logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
                 std::vector<TokenLogprob>& logprobs) {
  const int64_t n = static_cast<int64_t>(rows.size());
  tokens.assign(n, 0);
  logprobs.assign(n, TokenLogprob{});
  if (n == 0) return;
  const bool any_penalty = std::any_of(rows.begin(), rows.end(), needs_penalty);
  const bool all_greedy = std::all_of(rows.begin(), rows.end(), is_greedy);
  const bool any_logprobs = std::any_of(rows.begin(), rows.end(), [](const SampleRow& r) {
    return r.params->logprobs >= 0;
  });
  if (all_greedy && !any_penalty && !any_logprobs) {  // argmax in the logits' own dtype (widening is exact)
    const at::Tensor host = raw_logits.argmax(1).to(at::kInt).cpu();
    std::copy_n(host.data_ptr<int32_t>(), n, tokens.begin());
    return;
  }
  const at::Tensor logits = raw_logits.to(at::kFloat);
  at::Tensor x = logits;
  if (any_penalty) {
    x = logits.clone();  // logprobs are of the raw logits
    apply_repetition_penalty(x, rows);
  }
  const at::Tensor ids = all_greedy ? x.argmax(1) : draw(x, rows);
  const at::Tensor host = ids.to(at::kInt).cpu();
  const int32_t* h = host.data_ptr<int32_t>();
  std::copy(h, h + n, tokens.begin());
  if (!any_logprobs) return;
  fill_logprobs(logits, ids, rows, logprobs);
  for (int64_t i = 0; i < n; ++i) logprobs[i].token_id = tokens[i];
}

}  // namespace turbo::cuda
