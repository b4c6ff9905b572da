// flowdiff/nn/layers/linear.hpp — the fully connected layer, as torch.nn.Linear:
//   forward   y = x W^T + b                       x: [M, in], W: [out, in], b: [out], y: [M, out]
//   backward  dW += dy^T x,  db += sum_rows dy,  dx = dy W
// where M is the product of all leading dimensions (so [N, in] batches and [N, L, in] token
// sequences both work). Parameters are registered as prefix + ".weight" [out, in] and
// prefix + ".bias" [out] (PyTorch state_dict names and layout); both products go to gemm().
#pragma once

#include <cmath>
#include <string>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

template <class T>
class Linear {
 public:
  Linear(Parameters<T>& ps, const std::string& prefix, index_t in, index_t out, bool bias = true)
      : prefix_(prefix), in_(in), out_(out), bias_(bias) {
    require<config_error>(in > 0 && out > 0, prefix,
                          " (Linear): in and out must be >= 1, got in = ", in, ", out = ", out);
    w_ = ps.add(prefix + ".weight", Shape{out, in});
    if (bias) b_ = ps.add(prefix + ".bias", Shape{out});
  }

  index_t in_features() const { return in_; }
  index_t out_features() const { return out_; }
  bool has_bias() const { return bias_; }
  index_t weight_id() const { return w_; }
  /// -1 when the layer has no bias.
  index_t bias_id() const { return b_; }
  const std::string& prefix() const { return prefix_; }

  /// PyTorch's default: W and b uniform in [-1/sqrt(in), 1/sqrt(in)] (kaiming_uniform_ with
  /// a = sqrt(5) reduces to exactly this bound).
  void init(Parameters<T>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(in_));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    if (bias_) fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  // x: [..., in] -> y: [..., out]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y) const {
    const index_t m = check(x, "x", in_);
    check_out(x, y, "y", out_);
    gemm(Trans::no, Trans::yes, T(1), x.reshape({m, in_}), ps.param(w_), T(0),
         y.reshape({m, out_}));
    if (bias_) {
      const T* b = ps.param(b_).data();
      T* py = y.data();
      const index_t o = out_;
      Cpu::parallel_for(
          m,
          [=](index_t r) {
            T* row = py + r * o;
            for (index_t j = 0; j < o; ++j) row[j] += b[j];
          },
          o);
    }
  }

  // x: [..., in] -> y: [..., out] = x W^T without the bias, for a caller that fuses the bias into
  // the next element-wise pass (e.g. gelu_bias_forward with bias_view()).
  void forward_product(const Parameters<T>& ps, View<const T> x, View<T> y) const {
    const index_t m = check(x, "x", in_);
    check_out(x, y, "y", out_);
    gemm(Trans::no, Trans::yes, T(1), x.reshape({m, in_}), ps.param(w_), T(0),
         y.reshape({m, out_}));
  }
  /// The bias [out]; the layer must have one.
  View<const T> bias_view(const Parameters<T>& ps) const {
    require<config_error>(bias_, prefix_, " (Linear): bias_view() on a layer without bias");
    return ps.param(b_);
  }

  // x: [..., in], dy: [..., out], dx: [..., in] or empty. Parameter gradients accumulate.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx) const {
    const index_t m = check(x, "x", in_);
    check_out(x, dy, "dy", out_);
    const auto dy2 = dy.reshape({m, out_});
    gemm(Trans::yes, Trans::no, T(1), dy2, x.reshape({m, in_}), T(1), ps.grad(w_));
    if (bias_) {
      // Column sums of dy, row by row: contiguous, vectorisable, and m is a batch (small).
      T* db = ps.grad(b_).data();
      const T* g = dy.data();
      for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < out_; ++j) db[j] += g[r * out_ + j];
    }
    if (!dx.empty()) {
      check_out(x, dx, "dx", in_);
      gemm(Trans::no, Trans::no, T(1), dy2, View<const T>(ps.param(w_)), T(0),
           dx.reshape({m, in_}));
    }
  }

 private:
  // Returns the number of rows M of x viewed as [M, features].
  index_t check(View<const T> x, const char* arg, index_t features) const {
    detail::check_arg_axis(prefix_, "Linear", arg, x, 2, -1, features, "[N, ..., in]");
    return x.numel() / features;
  }
  // `v` must have x's leading dimensions and `features` last.
  template <class U>
  void check_out(View<const T> x, View<U> v, const char* arg, index_t features) const {
    Shape s = x.shape();
    s[s.rank() - 1] = features;
    detail::check_arg(prefix_, "Linear", arg, v, s);
  }

  std::string prefix_;
  index_t in_, out_;
  bool bias_;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
