// A linear layer behind a small interface, so quantized weights (W4A16: packed int4 + scales/zeros) can
// replace the dense one without touching the model code.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>

namespace turbo {

class Linear {
 public:
  virtual ~Linear() = default;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;  // x [T, in] -> [T, out]
  virtual int64_t out_features() const = 0;
};

// A dense weight. On CUDA: cuBLAS through at::mm. On CPU the weight is reordered once into oneDNN's blocked
// layout and multiplied by oneDNN (torch's mkldnn ops): MKL's sgemm, which at::mm uses on CPU, is about 2x
// slower at decode shapes on the project's AMD development machine (see lmkit/pytorch_engine/models/linear.py
// for the measurements; the PyTorch engine does the same).
class DenseLinear final : public Linear {
 public:
  DenseLinear(at::Tensor weight, at::Tensor bias = {});
  at::Tensor forward(const at::Tensor& x) const override;
  int64_t out_features() const override { return w_.size(0); }

 private:
  at::Tensor w_;  // [out, in]; on CPU with oneDNN, packed (an opaque layout with the same sizes)
  at::Tensor b_;  // [out] or undefined
  bool packed_ = false;
};

}  // namespace turbo
