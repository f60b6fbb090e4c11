// Sampling on CPU, one row per request, rows in parallel.
// Order (as HF generate): repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
// The draw is an inverse-CDF pick with one uniform from a counter-based generator keyed by (seed, step),
// so a request's tokens do not depend on the batch it runs in. Logprobs are of the raw logits.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "turbo/kernels/cpu/cpu_kernels.h"

namespace turbo::kernels::cpu {
namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Uniform in [0, 1) from (seed, step).
inline double uniform(uint64_t seed, int64_t step) {
  uint64_t r = splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ULL);
  return static_cast<double>(r >> 11) * (1.0 / 9007199254740992.0);
}

int32_t argmax(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (x[i] > x[best]) best = i;
  return static_cast<int32_t>(best);
}

void row_logprobs(const float* raw, int64_t V, int32_t token, int n_top, TokenLogprob& lp) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, raw[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(raw[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  lp.token_id = token;
  lp.logprob = raw[token] - lse;
  lp.top.clear();
  if (n_top > 0) {
    const int64_t n = std::min<int64_t>(n_top, V);
    std::vector<int32_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
      return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) lp.top.emplace_back(idx[i], raw[idx[i]] - lse);
  }
}

int32_t sample_row(const float* raw, int64_t V, const SampleRow& r, std::vector<float>& buf) {
  const SamplingParams& p = *r.params;
  const float* x = raw;
  if (p.repetition_penalty != 1.0f && r.history_len > 0) {
    buf.assign(raw, raw + V);
    std::vector<char> seen(V, 0);
    for (int64_t i = 0; i < r.history_len; ++i) {
      int32_t t = r.history[i];
      if (t < 0 || t >= V || seen[t]) continue;
      seen[t] = 1;
      buf[t] = buf[t] > 0 ? buf[t] / p.repetition_penalty : buf[t] * p.repetition_penalty;
    }
    x = buf.data();
  }
  if (p.temperature <= 0.f || p.top_k == 1) return argmax(x, V);

  const float inv_t = 1.f / p.temperature;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, x[i]);
  mx *= inv_t;
  const double u = uniform(r.seed, r.step);
  const bool truncate = (p.top_k > 0 && p.top_k < V) || p.top_p < 1.f;
  if (!truncate) {
    // Weights over the whole vocabulary in index order (min-p: drop w < min_p * w_max = min_p).
    std::vector<float> w(V);
    double total = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      float wi = std::exp(x[i] * inv_t - mx);
      if (wi < p.min_p) wi = 0.f;
      w[i] = wi;
      total += wi;
    }
    double target = u * total, c = 0.0;
    int64_t last = argmax(x, V);
    for (int64_t i = 0; i < V; ++i) {
      if (w[i] <= 0.f) continue;
      c += w[i];
      last = i;
      if (c > target) return static_cast<int32_t>(i);
    }
    return static_cast<int32_t>(last);
  }
  // Candidates (tokens within e^-30 of the top; the rest carry no mass at float precision), sorted by logit.
  std::vector<int32_t> cand;
  cand.reserve(1024);
  const float cut = mx - 30.f;
  for (int64_t i = 0; i < V; ++i)
    if (x[i] * inv_t >= cut) cand.push_back(static_cast<int32_t>(i));
  auto by_logit = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  if (p.top_k > 0 && static_cast<int64_t>(cand.size()) > p.top_k) {
    std::nth_element(cand.begin(), cand.begin() + p.top_k, cand.end(), by_logit);
    cand.resize(p.top_k);
  }
  std::sort(cand.begin(), cand.end(), by_logit);
  std::vector<double> w(cand.size());
  double total = 0.0;
  for (size_t i = 0; i < cand.size(); ++i) total += (w[i] = std::exp(static_cast<double>(x[cand[i]] * inv_t - mx)));
  size_t n = cand.size();
  if (p.top_p < 1.f) {  // keep the smallest prefix whose mass reaches top_p (at least one token)
    double above = 0.0;
    for (size_t i = 0; i < cand.size(); ++i) {
      if (i > 0 && above >= p.top_p * total) {
        n = i;
        break;
      }
      above += w[i];
    }
  }
  // min-p relative to the top token (weights are relative to it: w[0] = 1).
  double kept = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (i > 0 && w[i] < p.min_p * w[0]) w[i] = 0.0;
    kept += w[i];
  }
  double target = u * kept, c = 0.0;
  for (size_t i = 0; i < n; ++i) {
    c += w[i];
    if (w[i] > 0.0 && c > target) return cand[i];
  }
  return cand[0];
}

}  // namespace

void sample(const at::Tensor& logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
            std::vector<TokenLogprob>& logprobs) {
  const int64_t n = logits.size(0), V = logits.size(1);
  tokens.assign(n, 0);
  logprobs.assign(n, TokenLogprob{});
  const float* lp = logits.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; ++i) {
      const float* raw = lp + i * V;
      tokens[i] = sample_row(raw, V, rows[i], buf);
      if (rows[i].params->logprobs >= 0) row_logprobs(raw, V, tokens[i], rows[i].params->logprobs, logprobs[i]);
    }
  });
}

}  // namespace turbo::kernels::cpu
