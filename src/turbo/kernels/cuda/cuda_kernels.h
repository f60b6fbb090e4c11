// Launchers of the turbo CUDA kernels (namespace turbo::cuda). All take at::Tensor, check dtypes/shapes, and
// launch on the current CUDA stream without host syncs or allocations (except where a comment says so), so they
// can be captured into CUDA graphs. Activations may be float32, float16 or bfloat16. This header needs no CUDA
// headers, so host-only code (kernels/dispatch.cc) can include it.
//
// Paged KV cache of one layer (the layout of lmkit/pytorch_engine/kernels/triton/paged_attention.py):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (contiguous)
//   block_tables:     [num_seqs, max_blocks_per_seq] int32              (block ids in token order)
//   context_lens:     [num_seqs] int32 (tokens in the cache, the new ones included: KV is written first)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace turbo {
namespace cuda {

// ---- device ----

// Streaming multiprocessors of the current device (queried once per device, then cached).
int64_t device_num_sms();

// ---- attention ----

// Bytes of the workspace paged_attention_decode needs (0 when num_splits == 1).
int64_t decode_workspace_size(int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t num_splits);

// A split count for this shape (fixed per shape, so CUDA-graph friendly): enough CTAs to fill the GPU, and
// splits of at most ~512 tokens of the longest context while the grid stays under 64 CTAs per SM.
int64_t decode_num_splits(int64_t num_seqs, int64_t num_kv_heads, int64_t max_blocks_per_seq, int64_t block_size,
                          int64_t num_sms);

// A step's hint for paged_attention_decode's min_split_tokens: the tokens one CTA would read if the step's
// contexts (total_tokens, summed over its sequences) were spread evenly over two waves of the GPU's resident CTA
// slots (TURBO_DECODE_BALANCE sets the waves; 0: no hint, returns 0).
int64_t decode_min_split_tokens(int64_t total_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t num_sms);

// Flash-decoding (split-K + merge), one query token per sequence, GQA: one CTA per (split, kv head, seq) serves
// every query head of the group (up to 4; larger groups take several CTAs of 4). q, out: [num_seqs, num_heads,
// head_dim] (head rows may be strided), head_dim 64 or 128, any block_size. workspace: any contiguous CUDA tensor
// of >= decode_workspace_size bytes (unused when num_splits == 1). window > 0: attend to the last `window`
// tokens only. A sequence with context 0 gets zeros. min_split_tokens: undefined, or an int32 [1] CUDA tensor
// (read by the kernels, so a CUDA graph can replay with a new value): contexts up to about that many tokens take
// one split, longer ones splits of about that many (never more than num_splits).
void paged_attention_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t num_splits, at::Tensor& workspace,
                            int64_t window = 0, const at::Tensor& min_split_tokens = {});

// Chunked prefill: causal attention of each sequence's new tokens (q [num_tokens, num_heads, head_dim] packed by
// cu_seqlens_q [num_seqs + 1] int32) over its whole context in the cache (cached prefix + the new tokens, which
// sit at positions context_len - q_len .. context_len - 1). Tensor cores (WMMA) for fp16/bf16.
void paged_attention_prefill(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, int64_t max_query_len,
                             double scale, int64_t window = 0);

// Scatter k, v [num_tokens, num_kv_heads, head_dim] (rows may be strided) into their cache slots
// (slot = block * block_size + offset); slot_mapping [num_tokens] int32/int64, slot < 0 skipped.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

// ---- GEMM for decode ----

constexpr int64_t kGemvMaxRows = 8;

// Whether gemv takes these operands: x [M <= kGemvMaxRows, K] (contiguous rows), w [N, K] contiguous, one float
// dtype, rows 16-byte aligned.
bool gemv_supported(const at::Tensor& x, const at::Tensor& w);

// y [M, N] = x [M, K] w[N, K]^T (+ bias [N], or undefined), fp32 accumulation: one warp per output column,
// streaming the weight (decode is bound by reading it). y: [M, N] with contiguous rows.
void gemv(at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);

// ---- elementwise / norms ----

// out = weight * (x * rsqrt(mean(x^2) + eps)) in HF's rounding order; x, out [T, H] (rows may be strided).
void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);

// In place, like vLLM: residual += x; x = rms_norm(residual) * weight.
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);

// Neox (rotate-half) rotary embedding in place. q [T, Hq, D], k [T, Hk, D] (head rows may be strided),
// positions [T] int32/int64, cos_sin_cache [max_pos, rot_dim] (first rot_dim/2 cos, then rot_dim/2 sin; float32
// or q's dtype); the first rot_dim dims of each head are rotated (rot_dim <= D).
void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin_cache);

// rotary(q, k, positions, cos_sin_cache) and then write_kv(k, v, k_cache, v_cache, slot_mapping), in one kernel
// where rot_dim == head_dim, the rows are 16-byte aligned and slot_mapping is int64 (else the two kernels).
void rotary_write_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slot_mapping);

// out [T, I] = silu(gate) * up where gate_up [T, 2I] = [gate | up].
void silu_mul(at::Tensor& out, const at::Tensor& gate_up);

// ---- sampling ----

// One token per row of logits [B, V] float32, all on the device (no host sync). Per row: greedy (argmax, first
// index on ties) when temperature <= 0 or top_k == 1; else x = logits / T, then top-k (k <= 0 or k >= V: off),
// top-p over the top-k set (>= 1: off), min-p (<= 0: off) -- the order and semantics of
// lmkit/pytorch_engine/sampling.py -- then a Gumbel-max draw keyed by (seeds[i], steps[i], token), so a
// request's draws do not depend on the batch. temperature, top_p, min_p [B] float32; top_k [B] int32;
// seeds, steps [B] int64; out_tokens [B] int64.
void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& steps,
            at::Tensor& out_tokens);

// In place on logits [B, V] float32 with token_counts [B, V] int32 (occurrences of each token so far):
// CTRL repetition penalty (seen token: logit / p if > 0 else logit * p), then OpenAI frequency/presence
// penalties (logit -= f * count + pr * (count > 0)). repetition, frequency, presence: [B] float32.
void apply_penalties(at::Tensor& logits, const at::Tensor& token_counts, const at::Tensor& repetition,
                     const at::Tensor& frequency, const at::Tensor& presence);

// Repetition penalty from token ids [B, L] (-1 = padding) and penalty [B] float32 (allocates; ATen).
void repetition_penalty(at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& penalty);

// Logprobs of the raw logits (ATen; allocates): (logprob of tokens [B], top-n values [B, n], top-n ids [B, n]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs(const at::Tensor& logits, const at::Tensor& tokens,
                                                        int64_t top_n);

}  // namespace cuda
}  // namespace turbo
