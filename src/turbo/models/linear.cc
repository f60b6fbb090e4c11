#include "turbo/models/linear.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <string_view>

namespace turbo {
namespace {

// torch's oneDNN linear ops, registered by libtorch_cpu as `mkldnn::*` (no C++ API of their own, so through
// the dispatcher). Null when this torch has none.
constexpr int64_t kPackRowsHint = 64;  // the row count the packed layout is tuned for (serves 1..2048 rows well)
// oneDNN JIT-compiles and caches one kernel per input shape (~0.7 MiB each): rows are bounded to a few shapes,
// exact up to kExactRows, then padded to a multiple of kRowStep, and inputs over kMaxRows run in pieces.
constexpr int64_t kExactRows = 16, kRowStep = 16, kMaxRows = 256;

int64_t padded_rows(int64_t rows) { return rows <= kExactRows ? rows : (rows + kRowStep - 1) / kRowStep * kRowStep; }

using PackFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>);

struct OneDnnOps {
  std::optional<c10::TypedOperatorHandle<PackFn>> pack;
  std::optional<c10::TypedOperatorHandle<LinearFn>> linear;
};

const OneDnnOps& onednn_ops() {
  static const OneDnnOps ops = [] {
    OneDnnOps o;
    if (!at::hasMKLDNN()) return o;
    auto& d = c10::Dispatcher::singleton();
    auto pack = d.findSchema({"mkldnn::_reorder_linear_weight", ""});
    auto linear = d.findSchema({"mkldnn::_linear_pointwise", ""});
    if (pack && linear) {
      o.pack = pack->typed<PackFn>();
      o.linear = linear->typed<LinearFn>();
    }
    return o;
  }();
  return ops;
}

}  // namespace

DenseLinear::DenseLinear(at::Tensor weight, at::Tensor bias)
    : w_(std::move(weight)), b_(std::move(bias)) {
  const OneDnnOps& ops = onednn_ops();
  if (w_.device().is_cpu() && w_.scalar_type() == at::kFloat && ops.pack) {
    w_ = ops.pack->call(w_.contiguous(), kPackRowsHint);
    packed_ = true;
  }
}

at::Tensor DenseLinear::forward(const at::Tensor& x) const {
  if (!packed_) return b_.defined() ? at::addmm(b_, x, w_.t()) : at::mm(x, w_.t());
  const int64_t rows = x.size(0);
  if (rows > kMaxRows) {
    at::Tensor y = at::empty({rows, w_.size(0)}, x.options());
    for (int64_t i = 0; i < rows; i += kMaxRows) {
      const int64_t n = std::min(kMaxRows, rows - i);
      y.narrow(0, i, n).copy_(forward(x.narrow(0, i, n)));
    }
    return y;
  }
  const int64_t padded = padded_rows(rows);
  at::Tensor xp = x.contiguous();
  if (padded != rows) {
    xp = at::zeros({padded, x.size(1)}, x.options());
    xp.narrow(0, 0, rows).copy_(x);
  }
  const std::optional<at::Tensor> bias = b_.defined() ? std::optional<at::Tensor>(b_) : std::nullopt;
  at::Tensor y = onednn_ops().linear->call(xp, w_, bias, "none", c10::List<std::optional<at::Scalar>>(), "");
  return padded == rows ? y : y.narrow(0, 0, rows);
}

}  // namespace turbo
