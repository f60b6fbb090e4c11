// A linear layer behind a small interface, so quantized weights (W4A16: packed int4 + scales/zeros) can
// replace the dense one without touching the model code.
#pragma once

#include <ATen/ATen.h>

#include <memory>

namespace turbo {

class Linear {
 public:
  virtual ~Linear() = default;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;  // x [T, in] -> [T, out]
  virtual int64_t out_features() const = 0;
};

class DenseLinear final : public Linear {
 public:
  DenseLinear(at::Tensor weight, at::Tensor bias = {}) : w_(std::move(weight)), b_(std::move(bias)) {}
  at::Tensor forward(const at::Tensor& x) const override {
    if (x.size(0) == 1) {  // a single row: matrix-vector (faster than a 1-row GEMM in MKL)
      at::Tensor y = b_.defined() ? at::addmv(b_, w_, x[0]) : at::mv(w_, x[0]);
      return y.unsqueeze(0);
    }
    return b_.defined() ? at::addmm(b_, x, w_.t()) : at::mm(x, w_.t());
  }
  int64_t out_features() const override { return w_.size(0); }

 private:
  at::Tensor w_;  // [out, in]
  at::Tensor b_;  // [out] or undefined
};

}  // namespace turbo
