// CPU implementations (called through kernels.h only). Arguments are checked by the dispatch layer.
#pragma once

#include "turbo/kernels/kernels.h"

namespace turbo::kernels::cpu {

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, double eps);
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps);
void rotary(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     double scale, int64_t sliding_window);
void sample(const at::Tensor& logits, const std::vector<SampleRow>& rows, std::vector<int32_t>& tokens,
            std::vector<TokenLogprob>& logprobs);

}  // namespace turbo::kernels::cpu
