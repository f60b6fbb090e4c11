// Paged attention on CPU: prefill chunks (causal over cached + new tokens) and decodes in one call.
// Work is split over (sequence, query tile, head) with at::parallel_for; each item walks the sequence's KV
// blocks once with an online softmax (per block: scores, block max, one rescale, weighted V sum), so a K/V
// block is loaded once per tile of queries. GQA: head h reads kv head h / (H / KVH).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "turbo/kernels/cpu/cpu_kernels.h"

namespace turbo::kernels::cpu {
namespace {

constexpr int64_t kTile = 16;  // queries per work item

struct TileArgs {
  const float* q;  // first query row of the tile, this head
  int64_t q_stride;
  float* out;
  int64_t out_stride;
  int64_t n_q;
  int64_t first_pos;  // position of the tile's first query
  const float* k_cache;
  const float* v_cache;
  const int32_t* blocks;  // the sequence's block table
  int64_t block_size, kv_row_stride, kvh_offset, D;
  float scale;
  int64_t window;  // 0 = global
  float* scratch;  // n_q * (D + 2) + block_size floats
};

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TURBO_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define TURBO_CLONES
#endif

// exp for x <= 0 (softmax terms), vectorizable: 2^(x log2 e) = 2^i * 2^f, 2^f by a degree-6 polynomial
// (relative error < 1e-7, the order of float rounding).
inline float exp_neg(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.4426950408889634f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 2.1690609e-4f;
  p = p * f + 1.2443082e-3f;
  p = p * f + 9.6784728e-3f;
  p = p * f + 5.5483524e-2f;
  p = p * f + 2.4022980e-1f;
  p = p * f + 6.9314700e-1f;
  p = p * f + 1.0f;
  const int32_t e = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

TURBO_CLONES
void attend_tile(const TileArgs& a) {
  const int64_t D = a.D, BS = a.block_size;
  float* acc = a.scratch;                  // [n_q, D]
  float* m = acc + a.n_q * D;              // [n_q]
  float* l = m + a.n_q;                    // [n_q]
  float* s = l + a.n_q;                    // [BS]
  for (int64_t i = 0; i < a.n_q * D; ++i) acc[i] = 0.f;
  for (int64_t i = 0; i < a.n_q; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  const int64_t last_pos = a.first_pos + a.n_q - 1;
  const int64_t lo_all = a.window > 0 ? std::max<int64_t>(0, a.first_pos - a.window + 1) : 0;
  for (int64_t b = lo_all / BS; b <= last_pos / BS; ++b) {
    const int64_t block_start = b * BS;
    const float* kb = a.k_cache + static_cast<int64_t>(a.blocks[b]) * BS * a.kv_row_stride + a.kvh_offset;
    const float* vb = a.v_cache + static_cast<int64_t>(a.blocks[b]) * BS * a.kv_row_stride + a.kvh_offset;
    for (int64_t i = 0; i < a.n_q; ++i) {
      const int64_t pos = a.first_pos + i;
      const int64_t lo = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
      const int64_t j0 = std::max<int64_t>(block_start, lo) - block_start;
      const int64_t j1 = std::min<int64_t>(block_start + BS, pos + 1) - block_start;
      if (j0 >= j1) continue;
      const float* qi = a.q + i * a.q_stride;
      float bmax = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j < j1; ++j) {
        const float* kj = kb + j * a.kv_row_stride;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
        s[j] = dot * a.scale;
        bmax = std::max(bmax, s[j]);
      }
      float* ai = acc + i * D;
      const float m_new = std::max(m[i], bmax);
      const float corr = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
      if (corr != 1.f) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ai[d] *= corr;
      }
      float li = l[i] * corr;
#pragma omp simd reduction(+ : li)
      for (int64_t j = j0; j < j1; ++j) {
        s[j] = exp_neg(s[j] - m_new);
        li += s[j];
      }
      for (int64_t j = j0; j < j1; ++j) {
        const float p = s[j];
        const float* vj = vb + j * a.kv_row_stride;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ai[d] += p * vj[d];
      }
      l[i] = li;
      m[i] = m_new;
    }
  }
  for (int64_t i = 0; i < a.n_q; ++i) {
    float* o = a.out + i * a.out_stride;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    const float* ai = acc + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = ai[d] * inv;
  }
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_q_lens, const at::Tensor& kv_lens,
                     double scale, int64_t sliding_window) {
  const int64_t S = block_tables.size(0), max_blocks = block_tables.size(1);
  const int64_t H = q.size(1), D = q.size(2), KVH = k_cache.size(2), BS = k_cache.size(1);
  const int64_t group = H / KVH;
  const int32_t* cu = cu_q_lens.data_ptr<int32_t>();
  const int32_t* kvl = kv_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(cu[S] == q.size(0), "paged_attention: cu_q_lens[-1] must equal the number of query rows");

  struct Tile {
    int64_t seq, row, n_q, first_pos;
  };
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s], kv_len = kvl[s];
    TORCH_CHECK(q_len >= 0 && q_len <= kv_len, "paged_attention: seq ", s, " has q_len > kv_len");
    TORCH_CHECK((kv_len + BS - 1) / BS <= max_blocks, "paged_attention: seq ", s, " needs more blocks than its table");
    for (int64_t r = 0; r < q_len; r += kTile)
      tiles.push_back({s, cu[s] + r, std::min(kTile, q_len - r), kv_len - q_len + r});
  }
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), o_s0 = out.stride(0), o_s1 = out.stride(1);
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * H;
  // Small problems (short decodes) run on the calling thread: a parallel region costs more than they do.
  int64_t work = 0;
  for (const Tile& t : tiles) work += t.n_q * (t.first_pos + t.n_q);
  work *= H * D;
  const int64_t grain = work < (1 << 20) ? n_items : 1;
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kTile * (D + 2) + BS);
    for (int64_t it = begin; it < end; ++it) {
      const Tile& t = tiles[it / H];
      const int64_t h = it % H;
      TileArgs a;
      a.q = qp + t.row * q_s0 + h * q_s1;
      a.q_stride = q_s0;
      a.out = op + t.row * o_s0 + h * o_s1;
      a.out_stride = o_s0;
      a.n_q = t.n_q;
      a.first_pos = t.first_pos;
      a.k_cache = kc;
      a.v_cache = vc;
      a.blocks = bt + t.seq * max_blocks;
      a.block_size = BS;
      a.kv_row_stride = KVH * D;
      a.kvh_offset = (h / group) * D;
      a.D = D;
      a.scale = static_cast<float>(scale);
      a.window = sliding_window;
      a.scratch = scratch.data();
      attend_tile(a);
    }
  });
}

}  // namespace turbo::kernels::cpu
