// Paged attention on CPU: prefill chunks (causal over cached + new tokens) and decodes in one call.
//
// A work item is (sequence, kv head, tile of up to kTile queries). Its rows are the tile's queries times the
// kv head's `group` query heads (GQA), so every K/V row is loaded once per item and used by all of them. The
// item walks the sequence's KV blocks once with an online softmax (per block: scores, block max, one rescale,
// weighted V sum). head_dim 64 and 128 are compiled with a constant D (fully unrolled vector loops); other
// sizes take the same code with a runtime D. Items are spread over ATen's thread pool.
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

struct ItemArgs {
  const float* q;  // the tile's first query row, the kv head's first query head
  int64_t q_stride, q_head_stride;
  float* out;
  int64_t out_stride, out_head_stride;
  int64_t n_q, group;  // rows = n_q * group, row r = (query r / group, head r % group)
  int64_t first_pos;   // position of the tile's first query
  const float* k;      // the caches at this kv head: row j of block b at k + (b * BS + j) * kv_row_stride
  const float* v;
  const int32_t* blocks;  // the sequence's block table
  int64_t block_size, kv_row_stride, D;
  float scale;
  int64_t window;  // 0 = global
  float* scratch;  // scratch_floats(kTile * group, D, BS)
};

inline int64_t scratch_floats(int64_t rows, int64_t D, int64_t BS) { return rows * (2 * D + BS + 2); }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Feature levels, not CPU models: `arch=skylake-avx512` is chosen only on Intel parts, never on AMD ones.
#define TURBO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
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

// 16 floats, one AVX-512 register (two AVX2 ones, four SSE ones in the other clones).
using vf = float __attribute__((vector_size(64)));
inline vf load16(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(vf v) {
  float t[16];
  std::memcpy(t, &v, sizeof(t));
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// One query's kRows heads (rows r0.., consecutive) against keys [j0, j1) of one block, head_dim kD (a multiple
// of 16): every K and V row is loaded once for all the heads, and the heads' accumulators stay in registers.
template <int kD, int kRows>
inline void block_scores(const float* qs, const float* kb, int64_t kv_row_stride, int64_t j0, int64_t j1, float* s,
                         int64_t BS) {
  constexpr int C = kD / 16;
  vf q[kRows][C];
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = load16(qs + g * kD + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const float* kj = kb + j * kv_row_stride;
    vf k[C];
    for (int c = 0; c < C; ++c) k[c] = load16(kj + 16 * c);
    for (int g = 0; g < kRows; ++g) {
      vf p0 = q[g][0] * k[0], p1 = C > 1 ? q[g][1] * k[1] : vf{};
      for (int c = 2; c < C; c += 2) {
        p0 += q[g][c] * k[c];
        if (c + 1 < C) p1 += q[g][c + 1] * k[c + 1];
      }
      s[g * BS + j] = hsum(p0 + p1);
    }
  }
}

template <int kD, int kRows>
inline void block_values(const float* p, int64_t BS, const float* vb, int64_t kv_row_stride, int64_t j0, int64_t j1,
                         float* acc) {
  constexpr int C = kD / 16;
  vf a[kRows][C];
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < C; ++c) a[g][c] = load16(acc + g * kD + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const float* vj = vb + j * kv_row_stride;
    vf v[C];
    for (int c = 0; c < C; ++c) v[c] = load16(vj + 16 * c);
    for (int g = 0; g < kRows; ++g) {
      const float pg = p[g * BS + j];
      for (int c = 0; c < C; ++c) a[g][c] += pg * v[c];
    }
  }
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < C; ++c) store16(acc + g * kD + 16 * c, a[g][c]);
}

// Up to 4 consecutive rows in one pass: `fn` (block_scores or block_values) instantiated for n = 1..4 rows.
#define TURBO_ROWS_DISPATCH(fn, kD, n, ...) \
  switch (n) {                               \
    case 1: fn<kD, 1>(__VA_ARGS__); break;   \
    case 2: fn<kD, 2>(__VA_ARGS__); break;   \
    case 3: fn<kD, 3>(__VA_ARGS__); break;   \
    default: fn<kD, 4>(__VA_ARGS__); break;  \
  }

// kD > 0: head_dim known at compile time; 0: a.D at run time.
template <int kD>
TURBO_CLONES void attend(const ItemArgs& a) {
  const int64_t D = kD > 0 ? kD : a.D, BS = a.block_size, G = a.group, R = a.n_q * a.group;
  float* qs = a.scratch;     // [R, D]: the rows' queries, pre-scaled
  float* acc = qs + R * D;   // [R, D]
  float* s = acc + R * D;    // [R, BS]: one block's scores, then probabilities
  float* m = s + R * BS;     // [R]: running max
  float* l = m + R;          // [R]: running sum
  for (int64_t r = 0; r < R; ++r) {
    const float* src = a.q + (r / G) * a.q_stride + (r % G) * a.q_head_stride;
    float* dst = qs + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.scale;
    std::memset(acc + r * D, 0, sizeof(float) * D);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t last_pos = a.first_pos + a.n_q - 1;
  const int64_t lo_all = a.window > 0 ? std::max<int64_t>(0, a.first_pos - a.window + 1) : 0;
  for (int64_t b = lo_all / BS; b <= last_pos / BS; ++b) {
    const int64_t start = b * BS;
    const float* kb = a.k + static_cast<int64_t>(a.blocks[b]) * BS * a.kv_row_stride;
    const float* vb = a.v + static_cast<int64_t>(a.blocks[b]) * BS * a.kv_row_stride;
    // Keys [j0, j1) of this block are visible to query i (its causal limit, and the window's lower one).
    auto range = [&](int64_t i, int64_t& j0, int64_t& j1) {
      const int64_t pos = a.first_pos + i;
      const int64_t first = a.window > 0 ? std::max<int64_t>(0, pos - a.window + 1) : 0;
      j0 = std::max<int64_t>(start, first) - start;
      j1 = std::min<int64_t>(start + BS, pos + 1) - start;
    };
    // Scores: one pass over the block's keys, each key against every row that sees it.
    for (int64_t i = 0; i < a.n_q; ++i) {
      int64_t j0, j1;
      range(i, j0, j1);
      if constexpr (kD > 0 && kD % 16 == 0) {
        for (int64_t g = 0; g < G; g += 4) {
          const int64_t r = i * G + g, n = std::min<int64_t>(4, G - g);
          TURBO_ROWS_DISPATCH(block_scores, kD, n, qs + r * kD, kb, a.kv_row_stride, j0, j1, s + r * BS, BS)
        }
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        const float* kj = kb + j * a.kv_row_stride;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qs + (i * G + g) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kj[d];
          s[(i * G + g) * BS + j] = dot;
        }
      }
    }
    // Online softmax row by row, then the weighted V sum.
    for (int64_t i = 0; i < a.n_q; ++i) {
      int64_t j0, j1;
      range(i, j0, j1);
      if (j0 >= j1) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = i * G + g;
        float* sr = s + r * BS;
        float bmax = -std::numeric_limits<float>::infinity();
        for (int64_t j = j0; j < j1; ++j) bmax = std::max(bmax, sr[j]);
        const float m_new = std::max(m[r], bmax);
        const float corr = exp_neg(m[r] - m_new);  // 0 on the first block (m = -inf, clamped)
        float* ar = acc + r * D;
        if (corr != 1.f) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
        }
        float lr = 0.f;
#pragma omp simd reduction(+ : lr)
        for (int64_t j = j0; j < j1; ++j) {
          sr[j] = exp_neg(sr[j] - m_new);
          lr += sr[j];
        }
        l[r] = l[r] * corr + lr;
        m[r] = m_new;
        if constexpr (kD == 0 || kD % 16 != 0) {
          for (int64_t j = j0; j < j1; ++j) {
            const float p = sr[j];
            const float* vj = vb + j * a.kv_row_stride;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ar[d] += p * vj[d];
          }
        }
      }
      if constexpr (kD > 0 && kD % 16 == 0) {
        for (int64_t g = 0; g < G; g += 4) {
          const int64_t r = i * G + g, n = std::min<int64_t>(4, G - g);
          TURBO_ROWS_DISPATCH(block_values, kD, n, s + r * BS, BS, vb, a.kv_row_stride, j0, j1, acc + r * kD)
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* o = a.out + (r / G) * a.out_stride + (r % G) * a.out_head_stride;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const float* ar = acc + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
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
  int64_t work = 0;  // query-key pairs
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s], kv_len = kvl[s];
    TORCH_CHECK(q_len >= 0 && q_len <= kv_len, "paged_attention: seq ", s, " has q_len > kv_len");
    TORCH_CHECK((kv_len + BS - 1) / BS <= max_blocks, "paged_attention: seq ", s, " needs more blocks than its table");
    for (int64_t r = 0; r < q_len; r += kTile) {
      const int64_t n = std::min(kTile, q_len - r);
      tiles.push_back({s, cu[s] + r, n, kv_len - q_len + r});
      work += n * (kv_len - q_len + r + n);
    }
  }
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), o_s0 = out.stride(0), o_s1 = out.stride(1);
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * KVH;
  // Small problems (short decodes) run on the calling thread: a parallel region costs more than they do.
  const int64_t grain = work * H * D < (1 << 18) ? n_items : 1;
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats(kTile * group, D, BS));
    for (int64_t it = begin; it < end; ++it) {
      const Tile& t = tiles[it / KVH];
      const int64_t kvh = it % KVH;
      ItemArgs a;
      a.q = qp + t.row * q_s0 + kvh * group * q_s1;
      a.q_stride = q_s0;
      a.q_head_stride = q_s1;
      a.out = op + t.row * o_s0 + kvh * group * o_s1;
      a.out_stride = o_s0;
      a.out_head_stride = o_s1;
      a.n_q = t.n_q;
      a.group = group;
      a.first_pos = t.first_pos;
      a.k = kc + kvh * D;
      a.v = vc + kvh * D;
      a.blocks = bt + t.seq * max_blocks;
      a.block_size = BS;
      a.kv_row_stride = KVH * D;
      a.D = D;
      a.scale = static_cast<float>(scale);
      a.window = sliding_window;
      a.scratch = scratch.data();
      if (D == 64) {
        attend<64>(a);
      } else if (D == 128) {
        attend<128>(a);
      } else {
        attend<0>(a);
      }
    }
  });
}

}  // namespace turbo::kernels::cpu
