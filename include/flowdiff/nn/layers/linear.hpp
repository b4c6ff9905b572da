// flowdiff/nn/layers/linear.hpp — the fully connected layer, as torch.nn.Linear:
//   forward   y = x W^T + b                       x: [M, in], W: [out, in], b: [out], y: [M, out]
//   backward  dW += dy^T x,  db += sum_rows dy,  dx = dy W
// forward_silu / forward_gelu and backward_through_silu / backward_through_gelu fuse a following /
// preceding activation into the products' epilogues (the MLP's hidden layers, the DiT's MLP
// blocks): the same bits as the separate passes, without their passes over memory.
// where M is the product of all leading dimensions (so [N, in] batches and [N, L, in] token
// sequences both work). Parameters are registered as prefix + ".weight" [out, in] and
// prefix + ".bias" [out] (PyTorch state_dict names and layout); both products go to gemm().
#pragma once

#include <cmath>
#include <functional>
#include <string>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
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

  // x: [..., in] -> y: [..., out]. The bias is added in the product's epilogue (no second pass).
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y) const {
    const index_t m = check(x, "x", in_);
    check_out(x, y, "y", out_);
    const T* b = bias_ ? ps.param(b_).data() : nullptr;
    T* py = y.data();
    const index_t o = out_;
    auto add_bias = [=](index_t i0, index_t i1, index_t j0, index_t j1) {
      if (b == nullptr) return;
      for (index_t r = i0; r < i1; ++r) add_bias_row(py + r * o, b, j0, j1);
    };
    gemm<T>(Trans::no, Trans::yes, T(1), x.reshape({m, in_}), ps.param(w_), T(0),
            y.reshape({m, out_}), add_bias);
  }

  // x: [..., in] -> pre: [..., out] = x W^T + b and act = SiLU(pre) (may not alias pre), both in
  // the product's epilogue: forward() followed by silu_forward(pre, act), bit for bit, without
  // their two passes over memory (pre is what backward_through_silu of the next layer needs).
  void forward_silu(const Parameters<T>& ps, View<const T> x, View<T> pre, View<T> act) const {
    forward_fused(ps, x, pre, act, "forward_silu",
                  [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::silu_fwd(v); });
  }
  // The same with act = GELU(pre) (gelu_forward's two forms, bit for bit).
  void forward_gelu(const Parameters<T>& ps, View<const T> x, View<T> pre, View<T> act,
                    GeluApprox approx = GeluApprox::none) const {
    if (approx == GeluApprox::tanh)
      forward_fused(ps, x, pre, act, "forward_gelu",
                    [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::gelu_tanh_fwd(v); });
    else
      forward_fused(ps, x, pre, act, "forward_gelu",
                    [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::GeluErfFwd<T>{}(v); });
  }

  /// What forward_columns applies after the bias.
  enum class Act { none, silu };

  // Output features [j0, j1) of forward() (act = Act::none; `act_out` unused) or of forward_silu
  // (pre and act_out), for x: [M, in] and row-major outputs [M, out]: the same bits as those
  // columns of the whole call when j0 is a multiple of 16 (sgemm's thin products work in blocks of
  // sixteen output features from the first column; the epilogue's arithmetic is per element).
  // On the calling thread, without checks beyond the range's: for a caller that splits one layer's
  // outputs over the threads of its own parallel region (the MLP's batch-1 forward), having
  // checked the shapes once outside it.
  void forward_columns(const Parameters<T>& ps, const T* x, index_t m, T* pre, T* act_out,
                       index_t j0, index_t j1, Act act) const {
    if (j1 <= j0) return;
    const index_t o = out_, in = in_;
    gemm_strided<T>(Trans::no, Trans::yes, m, j1 - j0, in, T(1), x, in,
                    ps.param(w_).data() + j0 * in, in, T(0), pre + j0, o);
    const T* b = bias_ ? ps.param(b_).data() : nullptr;
    for (index_t r = 0; r < m; ++r) {
      if (act == Act::silu)
        bias_act_row(pre + r * o, act_out + r * o, b, j0, j1,
                     [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::silu_fwd(v); });
      else if (b != nullptr)
        add_bias_row(pre + r * o, b, j0, j1);
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
    const index_t m = param_grads(ps, x, dy);
    if (!dx.empty()) {
      check_out(x, dx, "dx", in_);
      check_disjoint(dx, "dx", dy, "dy");  // the product reads dy while it writes dx
      gemm(Trans::no, Trans::no, T(1), dy.reshape({m, out_}), View<const T>(ps.param(w_)), T(0),
           dx.reshape({m, in_}));
    }
  }

  // backward() for a layer whose input is x = SiLU(pre) (pre: [..., in], what forward_silu of
  // the layer before wrote): parameter gradients as backward(), and dpre = SiLU'(pre) * (dy W),
  // the gradient w.r.t. pre, with the activation's derivative applied in the product's epilogue
  // (backward() then silu_backward(pre, dx, dx), bit for bit, less one pass over memory).
  void backward_through_silu(Parameters<T>& ps, View<const T> x, View<const T> dy,
                             View<const T> pre, View<T> dpre) const {
    backward_fused(ps, x, dy, pre, dpre,
                   [](T v, T g) FLOWDIFF_LAMBDA_INLINE { return detail::silu_bwd(v, g); });
  }
  // The same for x = GELU(pre) (gelu_backward's two forms, bit for bit).
  void backward_through_gelu(Parameters<T>& ps, View<const T> x, View<const T> dy,
                             View<const T> pre, View<T> dpre,
                             GeluApprox approx = GeluApprox::none) const {
    if (approx == GeluApprox::tanh)
      backward_fused(ps, x, dy, pre, dpre,
                     [](T v, T g) FLOWDIFF_LAMBDA_INLINE { return detail::gelu_tanh_bwd(v, g); });
    else
      backward_fused(ps, x, dy, pre, dpre,
                     [](T v, T g) FLOWDIFF_LAMBDA_INLINE { return detail::GeluErfBwd<T>{}(v, g); });
  }

 private:
  // row[j] += b[j] for j in [j0, j1).
  static void add_bias_row(T* row, const T* b, index_t j0, index_t j1) {
    simd::vector_loop(
        [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
          FLOWDIFF_SIMD
          for (index_t j = lo; j < hi; ++j) row[j] += b[j];
        },
        j0, j1);
  }
  // hr[j] = hr[j] (+ b[j]), yr[j] = f(hr[j]) for j in [j0, j1) (b may be null).
  template <class F>
  static void bias_act_row(T* hr, T* yr, const T* b, index_t j0, index_t j1, F f) {
    // Two loops rather than a test of b inside one: g++ 12 did not vectorise the loop with the
    // conditional load (scalar SiLU: 29 % of an AVX2 MLP training step).
    if (b != nullptr) {
      simd::vector_loop(
          [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
            FLOWDIFF_SIMD
            for (index_t j = lo; j < hi; ++j) {
              const T v = hr[j] + b[j];
              hr[j] = v;
              yr[j] = f(v);
            }
          },
          j0, j1);
    } else {
      simd::vector_loop(
          [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
            FLOWDIFF_SIMD
            for (index_t j = lo; j < hi; ++j) yr[j] = f(hr[j]);
          },
          j0, j1);
    }
  }

  // pre = x W^T + b, act = f(pre), in the product's epilogue.
  template <class F>
  void forward_fused(const Parameters<T>& ps, View<const T> x, View<T> pre, View<T> act,
                     const char* what, F f) const {
    const index_t m = check(x, "x", in_);
    check_out(x, pre, "pre", out_);
    check_out(x, act, "act", out_);
    require<shape_error>(pre.data() != act.data(), prefix_, " (Linear): ", what,
                         ": pre and act must be different arrays");
    const T* b = bias_ ? ps.param(b_).data() : nullptr;
    T* pp = pre.data();
    T* pa = act.data();
    const index_t o = out_;
    auto epilogue = [=](index_t i0, index_t i1, index_t j0, index_t j1) {
      for (index_t r = i0; r < i1; ++r) bias_act_row(pp + r * o, pa + r * o, b, j0, j1, f);
    };
    gemm<T>(Trans::no, Trans::yes, T(1), x.reshape({m, in_}), ps.param(w_), T(0),
            pre.reshape({m, out_}), epilogue);
  }

  // Parameter gradients, and dpre = g(pre, dy W) in the dx product's epilogue.
  template <class G>
  void backward_fused(Parameters<T>& ps, View<const T> x, View<const T> dy, View<const T> pre,
                      View<T> dpre, G g) const {
    const index_t m = param_grads(ps, x, dy);
    check_out(x, pre, "pre", in_);
    check_out(x, dpre, "dpre", in_);
    // The product reads dy while it writes dpre, and the epilogue reads pre after the product
    // wrote dpre: neither may share memory with dpre.
    check_disjoint(dpre, "dpre", dy, "dy");
    check_disjoint(dpre, "dpre", pre, "pre");
    const T* pp = pre.data();
    T* pd = dpre.data();
    const index_t in = in_;
    auto epilogue = [=](index_t i0, index_t i1, index_t j0, index_t j1) {
      for (index_t r = i0; r < i1; ++r) {
        const T* xr = pp + r * in;
        T* gr = pd + r * in;
        simd::vector_loop(
            [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
              FLOWDIFF_SIMD
              for (index_t j = lo; j < hi; ++j) gr[j] = g(xr[j], gr[j]);
            },
            j0, j1);
      }
    };
    gemm<T>(Trans::no, Trans::no, T(1), dy.reshape({m, out_}), View<const T>(ps.param(w_)), T(0),
            dpre.reshape({m, in_}), epilogue);
  }

  // dW += dy^T x and db += sum_rows dy; returns M.
  index_t param_grads(Parameters<T>& ps, View<const T> x, View<const T> dy) const {
    const index_t m = check(x, "x", in_);
    check_out(x, dy, "dy", out_);
    gemm(Trans::yes, Trans::no, T(1), dy.reshape({m, out_}), x.reshape({m, in_}), T(1),
         ps.grad(w_));
    if (bias_) {
      // Column sums of dy, row by row: contiguous, vectorisable, and m is a batch (small).
      T* db = ps.grad(b_).data();
      const T* g = dy.data();
      for (index_t r = 0; r < m; ++r)
        for (index_t j = 0; j < out_; ++j) db[j] += g[r * out_ + j];
    }
    return m;
  }

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

  // An output that overlaps an input would be read after it was partly overwritten.
  void check_disjoint(View<T> out, const char* out_arg, View<const T> in,
                      const char* in_arg) const {
    const T* o0 = out.data();
    const T* i0 = in.data();
    const std::less<const T*> before;  // a total order, also across unrelated arrays
    const bool overlap = out.numel() > 0 && in.numel() > 0 && before(o0, i0 + in.numel()) &&
                         before(i0, o0 + out.numel());
    require<shape_error>(!overlap, prefix_, " (Linear): ", out_arg, " must not share memory with ",
                         in_arg);
  }

  std::string prefix_;
  index_t in_, out_;
  bool bias_;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
