// The kernel dispatch layer: one entry point per op on at::Tensors; each checks its arguments and calls the
// implementation for the tensors' device: kernels/cpu/ (float32 only) or kernels/cuda/ (float32, float16,
// bfloat16; built with TURBO_WITH_CUDA). Models call only these functions, never a device implementation directly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "turbo/engine/sequence.h"

namespace turbo::kernels {

// out = x / rms(x) * w over the last dim. x may be a strided view ([N, D] or [N, M, D], last dim contiguous);
// out may alias x (in place).
void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps);
// residual += x; x = rms_norm(residual) * w   (both [N, D] contiguous, in place).
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps);
// In place, neox style (halves): x [T, heads, D] strided view; positions int64 [T]; cos, sin [P, D/2].
void rotary(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);
// A model's rotary tables, float32: cos, sin [P, D/2] (CPU kernel) and cos_sin [P, D] = [cos | sin] (CUDA kernel).
struct RopeTables {
  at::Tensor cos, sin, cos_sin;
};
// q [T, H, D] and k [T, KVH, D] (strided views) in place, each token at its position.
void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const RopeTables& rope);
// gate_up [T, 2I] -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up);
// k, v [T, KVH, D] strided views -> caches [NB, BS, KVH, D] at flat slots (int64 [T]; -1 = skip).
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
// rotary(q, k, positions, rope), then write_kv(k, v, k_cache, v_cache, slot_mapping): one kernel on CUDA.
void rotary_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const RopeTables& rope, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping);
// Attention over the blocked cache for a batch of sequences, prefill chunks and decodes alike.
//   q [T, H, D] (strided view), out [T, H, D] contiguous; block_tables int32 [S, max_blocks];
//   cu_q_lens int32 [S+1] (query tokens of seq s are rows cu[s]..cu[s+1]); kv_lens int32 [S] (cached + new
//   tokens of seq s, whose KV is already written). Query i of seq s sits at position kv_len - q_len + i and
//   sees keys 0..position (causal), restricted to the last `sliding_window` positions when > 0.
//   max_query_len (a host value, so choosing a kernel needs no device sync): the longest q_len of the batch;
//   1 means a decode-only batch (the CUDA split-K decode kernel), else the prefill kernel serves every row.
//   min_split_tokens: the decode kernel's split hint (an int32 [1] CUDA tensor; see
//   turbo::cuda::paged_attention_decode), or undefined; the CPU and prefill kernels ignore it.
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     int64_t max_query_len, double scale, int64_t sliding_window,
                     const at::Tensor& min_split_tokens = {});

// y [T, out] = x [T, in] w [out, in]^T (+ bias [out]). On CUDA, decode-sized inputs (T == 1 row; env
// TURBO_GEMV_ROWS, 0..8, moves the limit) go to turbo's GEMV kernel, the rest to cuBLAS; on CPU at::mm.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

// Sampling: one token per row of logits [n, V] (any float dtype; CPU or CUDA). Tokens and logprobs come back
// to the host: on CUDA one small device->host copy per call.
struct SampleRow {
  const SamplingParams* params = nullptr;
  const int32_t* history = nullptr;  // prompt + generated (repetition penalty)
  int64_t history_len = 0;
  uint64_t seed = 0;
  int64_t step = 0;  // tokens generated so far: with the seed, keys the draw (batch-independent)
};
void sample(const at::Tensor& logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
            std::vector<TokenLogprob>& logprobs);

// Greedy tokens that are still on their way: the argmax of each row on the logits' device (int64 [n], to feed
// the next step without a round trip) and its copy to pinned host memory, awaited by wait(). On CPU both are
// ready at once.
struct TokenFuture {
  at::Tensor device;  // int64 [n]
  at::Tensor host;    // int64 [n], pinned on a GPU
  std::shared_ptr<void> ready;  // the copy's completion event (GPU only)
};
TokenFuture argmax_async(const at::Tensor& logits);
std::vector<int32_t> wait(const TokenFuture& tokens);

}  // namespace turbo::kernels
