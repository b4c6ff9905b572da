// flowdiff/nn/layers/token_kernels.hpp — the token layers a diffusion transformer needs, written
// once for any backend B: FLOWDIFF_HOST_DEVICE functors run by B::parallel_for (the CPU's threads
// or one CUDA kernel each) plus products through BackendOps<B>::gemm / gemm_strided_batched (the
// CPU gemm; cuBLAS), with the semantics, parameter names, shapes and registration order of the CPU
// layers (linear.hpp, norm.hpp, activation.hpp, modulation.hpp, patchify.hpp, attention.hpp), so
// the flat parameter buffers have the same layout. On rows x: [M, D] (M = N L tokens):
//   Linear      y = x W^T + b,  dW += dy^T x,  db += sum_rows dy,  dx = dy W   (optionally with
//               the GELU after it fused: a = x W^T + b kept, y = GELU(a))
//   LayerNorm   mu, rstd = 1/sqrt(var + eps) per row (in double),  xh = (x - mu) rstd,
//               y = xh gamma + beta (or y = xh);  dgamma += sum dy xh,  dbeta += sum dy,
//               g = dy gamma,  dx = rstd (g - mean_D g - xh mean_D(g xh))
//   GELU (tanh) y = x s(2u),  u = sqrt(2/pi) (x + 0.044715 x^3),  s = 1/(1+e^-x)  (activation.hpp's
//               form: (1 + tanh u)/2 = s(2u));  dy/dx = s + 2 x s (1 - s) du/dx
//   adaLN       y[n, l, :] = x[n, l, :] (1 + scale[n, :]) + shift[n, :],  dx = dy (1 + scale),
//               dscale[n, :] = sum_l dy x,  dshift[n, :] = sum_l dy;  a gate y = x + g f has
//               df = g dy,  dg[n, :] = sum_l dy f
//   patchify    P[n, a w + b, e] = x[n, c, a p + u, b p + v] with e = (c p + u) p + v (channel
//               first) or (u p + v) C + c (channel last); unpatchify is its inverse
//   PatchEmbed  y = patchify(x) W^T + b (a Conv2d with kernel = stride = p),  W: [D, C, p, p]
//   attention   [q | k | v] = x Wqkv^T + bqkv;  per head h of width d: S = q_h k_h^T / sqrt(d),
//               P = softmax_rows(S), o_h = P v_h;  y = o Wproj^T + bproj;  backward
//               dP = do_h v_h^T,  dv_h = P^T do_h,  dS = P (dP - rowsum(dP P)) / sqrt(d),
//               dq_h = dS k_h,  dk_h = dS^T q_h
// The per-head products read q, k, v in place inside the [N L, 3D] qkv matrix: one
// strided-batched product per head over the N samples (batch stride L 3D), so no head split or
// merge copies. The softmax subtracts the row maximum, takes its exponentials with the CPU's
// fast_exp in float (kernels::exp_f32) and std::exp in double, and sums in double. Every functor
// writes each output element from exactly one thread and sums in a fixed order: no atomics, so
// results are deterministic on every backend. Statistics and reductions over tokens accumulate in
// double; the element-wise arithmetic uses kernels::mul_rn / add_rn (no FMA contraction on the
// device), in the CPU layers' order of operations. LayerNorm's statistics, gradient means and
// parameter gradients are segmented reductions (B::segment_reduce: a block per row or feature on
// a GPU); the softmax and modulation sums still run one thread per row or per (sample, channel):
// correct everywhere, latency-bound on a GPU. This header names no CUDA type: include
// backend/cuda/dispatch.cuh (nvcc) for B = Cuda.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/layers/patchify.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

// ---------------------------------------------------------------------------------------------
// GELU, tanh form (activation.hpp's gelu_tanh_fwd / gelu_tanh_bwd, explicitly rounded).
// ---------------------------------------------------------------------------------------------

/// x s(2u), u = sqrt(2/pi) (x + 0.044715 x^3), in activation.hpp's order of operations; s is
/// fast_sigmoid's value in float (kernels::sigmoid).
template <class T>
FLOWDIFF_INLINE T gelu_tanh(T x) {
  const T k = static_cast<T>(1.4142135623730951 * 0.5641895835477563);  // sqrt(2) / sqrt(pi)
  const T c = static_cast<T>(0.044715);
  const T u = mul_rn(k, add_rn(x, mul_rn(mul_rn(mul_rn(c, x), x), x)));
  return mul_rn(x, sigmoid(mul_rn(T(2), u)));
}

/// g (s + 2 x s (1 - s) du/dx), du/dx = sqrt(2/pi) (1 + 3 0.044715 x^2).
template <class T>
FLOWDIFF_INLINE T gelu_tanh_grad(T x, T g) {
  const T k = static_cast<T>(1.4142135623730951 * 0.5641895835477563);
  const T c = static_cast<T>(0.044715);
  const T u = mul_rn(k, add_rn(x, mul_rn(mul_rn(mul_rn(c, x), x), x)));
  const T s = sigmoid(mul_rn(T(2), u));
  const T du = mul_rn(k, add_rn(T(1), mul_rn(mul_rn(mul_rn(T(3), c), x), x)));
  const T t = mul_rn(mul_rn(mul_rn(mul_rn(T(2), x), s), add_rn(T(1), -s)), du);
  return mul_rn(g, add_rn(s, t));
}

/// y = GELU(x) (out of place; y may alias x).
template <class T>
struct GeluTanhOut {
  T* y;
  const T* x;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { y[q] = gelu_tanh(x[q]); }
};

/// dx = GELU'(x) dy (dx may alias dy).
template <class T>
struct GeluTanhGrad {
  T* dx;
  const T* x;
  const T* dy;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { dx[q] = gelu_tanh_grad(x[q], dy[q]); }
};

/// The Linear's epilogue before a GELU: a = h + b (kept for backward), y = GELU(a).
template <class T>
struct BiasGeluTanh {
  T* a;  // [M, out]: the product on entry, the pre-activation on exit
  T* y;  // [M, out]
  const T* b;
  index_t out;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const T v = add_rn(a[k], b[k % out]);
    a[k] = v;
    y[k] = gelu_tanh(v);
  }
};

// ---------------------------------------------------------------------------------------------
// LayerNorm over rows (the statistics are GroupNormStats with one set per row), fused with the
// adaLN modulation that follows it in a DiT.
// ---------------------------------------------------------------------------------------------

/// y = xh gamma + beta (or xh without an affine map), xh = (x - mu) rstd, and, when `scale` is
/// not null, y = y (1 + scale[n, j]) + shift[n, j] for the row's sample n = row / len, where
/// scale and shift are rows of stride ld (a chunk of adaLN's [N, K D] output). xh is also written
/// to xn when that is not null. One thread per element.
template <class T>
struct LayerNormApply {
  T* y;            // [M, D]
  T* xn;           // [M, D] or null
  const T* x;      // [M, D]
  const T* mean;   // [M]
  const T* rstd;   // [M]
  const T* gamma;  // [D] or null
  const T* beta;   // [D] (with gamma)
  const T* scale;  // [N, ld] or null
  const T* shift;  // [N, ld] (with scale)
  index_t d, len, ld;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t r = q / d, j = q % d;
    const T xh = mul_rn(add_rn(x[q], -mean[r]), rstd[r]);
    if (xn != nullptr) xn[q] = xh;
    T v = gamma != nullptr ? add_rn(mul_rn(xh, gamma[j]), beta[j]) : xh;
    if (scale != nullptr) {
      const index_t s = (r / len) * ld + j;
      v = add_rn(mul_rn(v, add_rn(T(1), scale[s])), shift[s]);
    }
    y[q] = v;
  }
};

// ---------------------------------------------------------------------------------------------
// adaLN modulation and gates over tokens [N, L, D] with per-sample vectors of row stride ld.
// ---------------------------------------------------------------------------------------------

/// y = x (1 + scale[n, j]) + shift[n, j]: modulation.hpp's channels-last modulate_forward.
template <class T>
struct ModulateTokens {
  T* y;            // [N, L, D] (may alias x)
  const T* x;      // [N, L, D]
  const T* scale;  // [N, ld]
  const T* shift;  // [N, ld]
  index_t d, len, ld;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t s = (q / (len * d)) * ld + q % d;
    y[q] = add_rn(mul_rn(x[q], add_rn(T(1), scale[s])), shift[s]);
  }
};

/// y = x + g[n, j] f: a DiT block's gated residual (y may alias x).
template <class T>
struct GatedAdd {
  T* y;        // [N, L, D]
  const T* x;  // [N, L, D]
  const T* g;  // [N, ld]
  const T* f;  // [N, L, D]
  index_t d, len, ld;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    y[q] = add_rn(x[q], mul_rn(g[(q / (len * d)) * ld + q % d], f[q]));
  }
};

/// dx = dy (1 + s[n, j]) (a modulation's input gradient, `one_plus`) or dx = s[n, j] dy (a
/// gate's). dx may alias dy.
template <class T>
struct ScaleTokens {
  T* dx;        // [N, L, D]
  const T* dy;  // [N, L, D]
  const T* s;   // [N, ld]
  index_t d, len, ld;
  bool one_plus;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const T v = s[(q / (len * d)) * ld + q % d];
    dx[q] = mul_rn(dy[q], one_plus ? add_rn(T(1), v) : v);
  }
};

/// sx[n, j] = sum_l dy[n, l, j] x[n, l, j] and s1[n, j] = sum_l dy[n, l, j] (either may be null),
/// accumulated in double over l in order and overwritten: the per-sample gradients of a
/// modulation's scale and shift, or of a gate. One thread per (n, j).
template <class T>
struct TokenSums {
  T* sx;        // [N, ld] or null
  T* s1;        // [N, ld] or null
  const T* dy;  // [N, L, D]
  const T* x;   // [N, L, D] (with sx)
  index_t d, len, ld;
  FLOWDIFF_HOST_DEVICE void operator()(index_t nj) const {
    const index_t n = nj / d, j = nj % d;
    const T* g = dy + n * len * d + j;
    const T* v = x != nullptr ? x + n * len * d + j : nullptr;
    double a = 0, b = 0;
    for (index_t l = 0; l < len; ++l) {
      const double gl = static_cast<double>(g[l * d]);
      if (v != nullptr) a += gl * static_cast<double>(v[l * d]);
      b += gl;
    }
    if (sx != nullptr) sx[n * ld + j] = static_cast<T>(a);
    if (s1 != nullptr) s1[n * ld + j] = static_cast<T>(b);
  }
};

/// y = a + b element-wise (out of place).
template <class T>
struct AddOut {
  T* y;
  const T* a;
  const T* b;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { y[q] = add_rn(a[q], b[q]); }
};

// ---------------------------------------------------------------------------------------------
// Patches.
// ---------------------------------------------------------------------------------------------

/// The permutation between an image [N, C, H, W] and its patches [N, (H/p)(W/p), C p p]
/// (patchify.hpp): one thread per patch element q = (token, e), moving it image -> patches
/// (`to_patches`) or back. Every element is written by exactly one thread in either direction.
template <class T>
struct PatchPermute {
  T* dst;
  const T* src;
  index_t channels, height, width, p;
  bool channel_first, to_patches;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t C = channels, w = width / p, h = height / p, E = C * p * p;
    const index_t tok = q / E, e = q % E;
    const index_t n = tok / (h * w), a = (tok / w) % h, b = tok % w;
    index_t c, u, v;
    if (channel_first) {
      c = e / (p * p);
      u = (e / p) % p;
      v = e % p;
    } else {
      c = e % C;
      u = e / (C * p);
      v = (e / C) % p;
    }
    const index_t pix = ((n * C + c) * height + a * p + u) * width + b * p + v;
    if (to_patches)
      dst[q] = src[pix];
    else
      dst[pix] = src[q];
  }
};

// ---------------------------------------------------------------------------------------------
// Softmax over the rows of the attention probabilities.
// ---------------------------------------------------------------------------------------------

/// row <- softmax(row) for each row of [rows, L], in place: the row maximum subtracted, the
/// exponentials by exp_f32 (fast_exp's bits) in float and exp in double, their sum in double in
/// order, then every element times 1 / sum in T. One thread per row.
template <class T>
struct SoftmaxRows {
  T* p;  // [rows, L]
  index_t len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t r) const {
    using std::exp;
    T* row = p + r * len;
    T mx = row[0];
    for (index_t c = 1; c < len; ++c) mx = row[c] > mx ? row[c] : mx;
    double s = 0;
    for (index_t c = 0; c < len; ++c) {
      const T d = add_rn(row[c], -mx);
      T e;
      if constexpr (std::is_same_v<T, float>)
        e = exp_f32(d);
      else
        e = exp(d);
      row[c] = e;
      s += static_cast<double>(e);
    }
    const T inv = T(1) / static_cast<T>(s);
    for (index_t c = 0; c < len; ++c) row[c] = mul_rn(row[c], inv);
  }
};

/// dS = scale P (dP - <dP, P>) row by row, in place of dP, the inner product in double. One
/// thread per row.
template <class T>
struct SoftmaxBackwardRows {
  T* dp;       // [rows, L]: dP on entry, dS on exit
  const T* p;  // [rows, L]
  index_t len;
  T scale;
  FLOWDIFF_HOST_DEVICE void operator()(index_t r) const {
    T* row = dp + r * len;
    const T* pr = p + r * len;
    double s = 0;
    for (index_t c = 0; c < len; ++c) s += static_cast<double>(row[c]) * static_cast<double>(pr[c]);
    const T st = static_cast<T>(s);
    for (index_t c = 0; c < len; ++c) row[c] = mul_rn(mul_rn(scale, pr[c]), add_rn(row[c], -st));
  }
};

/// dst[n, j, i] = src[n, i, j] for src: [N, R, C] (R rows, C columns per sample): an image
/// [N, C, H W] to its tokens [N, H W, C] and back. One thread per element of dst.
template <class T>
struct TransposeSamples {
  T* dst;        // [N, C, R]
  const T* src;  // [N, R, C]
  index_t rows, cols;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t per = rows * cols, n = q / per, j = (q % per) / rows, i = q % rows;
    dst[q] = src[n * per + i * cols + j];
  }
};

}  // namespace kernels

namespace token_detail {

template <class T, class B>
void resize_if(Tensor<T, B>& t, const Shape& s) {
  if (!(t.shape() == s)) t.resize(s);
}

/// v is absent: no data or no elements (an optional output left out).
template <class T, class B>
bool absent(View<T, B> v) {
  return v.data() == nullptr || v.empty();
}

/// x: [..., D] with D = `features` at the last axis and at least one row; returns the rows.
template <class T, class B>
index_t rows_of(const std::string& layer, const char* kind, View<T, B> x, index_t features) {
  detail::check_arg_axis(layer, kind, "x", x, 1, -1, features, "[..., D]");
  return x.numel() / features;
}

/// The LayerNorm statistics of the rows of x: [M, D] (mean, rstd: [M], in double, as T).
template <class T, Backend B>
void row_stats(View<const T, B> x, index_t d, double eps, T* mean, T* rstd) {
  const index_t m = x.numel() / d;
  B::segment_reduce(m, kernels::GroupNormStats<T>{mean, rstd, x.data(), d, eps}, 3 * d);
}

/// dx = rstd (g - mean_D g - xh mean_D(g xh)) with g = dy gamma (or dy) per row of [M, D]: the
/// GroupNorm kernels with one group per row (k = D elements, "channels" = the D features).
template <class T, Backend B>
void row_norm_input_grad(View<const T, B> x, View<const T, B> dy, const T* mean, const T* rstd,
                         const T* gamma, index_t d, double* ga, double* gb, T* dx) {
  const index_t m = x.numel() / d;
  B::segment_reduce(
      m, kernels::GroupNormGradMeans<T>{ga, gb, x.data(), dy.data(), mean, rstd, gamma, 1, d, 1},
      4 * d);
  B::parallel_for(
      x.numel(),
      kernels::GroupNormInputGrad<T>{dx, x.data(), dy.data(), mean, rstd, gamma, ga, gb, d, d, 1},
      6);
}

}  // namespace token_detail

// ---------------------------------------------------------------------------------------------
// Linear on B.
// ---------------------------------------------------------------------------------------------

/// nn::Linear on backend B over the last axis of x: [..., in] (same constructor, names, shapes
/// and order: prefix.weight [out, in], prefix.bias [out] unless bias = false), with the GELU that
/// follows it in a transformer MLP optionally fused (forward_gelu / backward_through_gelu).
template <class T, Backend B>
class BackendLinear {
 public:
  using Context = typename BackendOps<B>::Context;

  BackendLinear(Parameters<T, B>& ps, const std::string& prefix, index_t in, index_t out,
                bool bias = true)
      : prefix_(prefix), in_(in), out_(out) {
    require<config_error>(in >= 1 && out >= 1, prefix, " (", kind,
                          "): in and out features must be >= 1, got in = ", in, ", out = ", out);
    w_ = ps.add(prefix + ".weight", Shape{out, in});
    if (bias) b_ = ps.add(prefix + ".bias", Shape{out});
  }

  index_t in_features() const { return in_; }
  index_t out_features() const { return out_; }
  bool has_bias() const { return b_ >= 0; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }  // -1 without bias
  const std::string& prefix() const { return prefix_; }

  /// nn::Linear::init's draws on B: W, b ~ U(+-1/sqrt(in)), W first. (On a device the uniforms
  /// may differ from the CPU's in the last bit: docs/cuda.md, "Random numbers".)
  void init(Parameters<T, B>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(in_));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    if (b_ >= 0) fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  // x: [..., in] -> y: [..., out]
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y) const {
    const index_t m = check(x, y, "y");
    product(ctx, ps, x, y, m);
    if (b_ >= 0)
      B::parallel_for(y.numel(), kernels::BiasAdd<T>{y.data(), ps.param(b_).data(), out_});
  }

  // x: [..., in] -> pre = x W^T + b (kept for backward) and act = GELU_tanh(pre): [..., out].
  void forward_gelu(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> pre,
                    View<T, B> act) const {
    const index_t m = check(x, pre, "pre");
    detail::check_arg(prefix_, kind, "act", act, pre.shape());
    require<config_error>(b_ >= 0, prefix_, " (", kind, "): forward_gelu needs a bias");
    product(ctx, ps, x, pre, m);
    B::parallel_for(pre.numel(),
                    kernels::BiasGeluTanh<T>{pre.data(), act.data(), ps.param(b_).data(), out_});
  }

  // x: [..., in] (the forward's input), dy: [..., out], dx: [..., in] (overwritten) or empty / {}
  // (skipped). Parameter gradients accumulate.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx) const {
    const index_t m = check(x, dy, "dy");
    const View<const T, B> x2 = x.reshape({m, in_}), dy2 = dy.reshape({m, out_});
    BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), dy2, x2, T(1), ps.grad(w_));
    if (b_ >= 0)
      kernels::accumulate_bias_grad<T, B>(ps.grad(b_).data(), dy.data(), m, out_);
    if (token_detail::absent(dx)) return;
    detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), dy2,
                                    View<const T, B>(ps.param(w_)), T(0), dx.reshape({m, in_}));
  }

  // backward() of act = GELU(pre): act (the forward's, or recomputed from pre) is this layer's
  // input; dy the gradient of its output; dpre (overwritten) the gradient of the previous layer's
  // pre-activation, pre: [..., in].
  void backward_through_gelu(Context& ctx, Parameters<T, B>& ps, View<const T, B> act,
                             View<const T, B> dy, View<const T, B> pre, View<T, B> dpre) const {
    detail::check_arg(prefix_, kind, "pre", pre, act.shape());
    backward(ctx, ps, act, dy, dpre);
    B::parallel_for(dpre.numel(), kernels::GeluTanhGrad<T>{dpre.data(), pre.data(), dpre.data()},
                    24);
  }

 private:
  static constexpr const char* kind = "BackendLinear";

  // x: [..., in] and `other` (y, pre or dy): [..., out]; returns the rows of x.
  template <class U>
  index_t check(View<const T, B> x, View<U, B> other, const char* other_name) const {
    const index_t m = token_detail::rows_of(prefix_, kind, x, in_);
    Shape s = x.shape();
    s[s.rank() - 1] = out_;
    detail::check_arg(prefix_, kind, other_name, other, s);
    return m;
  }

  void product(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y,
               index_t m) const {
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), x.reshape({m, in_}),
                                    ps.param(w_), T(0), y.reshape({m, out_}));
  }

  std::string prefix_;
  index_t in_, out_;
  index_t w_ = -1, b_ = -1;
};

// ---------------------------------------------------------------------------------------------
// LayerNorm on B.
// ---------------------------------------------------------------------------------------------

/// nn::LayerNorm on backend B over the last axis (same constructor, eps default 1e-5, names and
/// shapes; the statistics in double). forward_modulated fuses the adaLN modulation after it.
template <class T, Backend B>
class BackendLayerNorm {
 public:
  /// The statistics forward keeps for backward, and backward's scratch, on B.
  struct Cache {
    Tensor<T, B> mean, rstd;   // [M]
    Tensor<double, B> ga, gb;  // [M]: the input gradient's two means
  };

  BackendLayerNorm(Parameters<T, B>& ps, const std::string& prefix, index_t features,
                   T eps = T(1e-5), bool affine = true)
      : prefix_(prefix), c_(features), eps_(eps), affine_(affine) {
    require<config_error>(features > 0, prefix, " (", kind, "): features must be >= 1, got ",
                          features);
    require<config_error>(eps >= T(0), prefix, " (", kind, "): eps must be >= 0, got ", eps);
    if (affine) {
      w_ = ps.add(prefix + ".weight", Shape{features});
      b_ = ps.add(prefix + ".bias", Shape{features});
    }
  }

  index_t features() const { return c_; }
  bool affine() const { return affine_; }
  T eps() const { return eps_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }

  /// gamma = 1, beta = 0 (PyTorch's init; the generator is unused, kept for a uniform API).
  void init(Parameters<T, B>& ps, Generator&) const {
    if (!affine_) return;
    fill(ps.param(w_), T(1));
    fill(ps.param(b_), T(0));
  }

  // x: [..., D] -> y: same shape
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, Cache& cache) const {
    run_forward(ps, x, y, View<T, B>{}, nullptr, nullptr, 0, 1, cache, true);
  }

  // x: [N, L, D] -> y = LN(x) (1 + scale[n]) + shift[n], the adaLN modulation fused, with
  // scale / shift the [N, D] rows of stride ld starting at the given pointers (chunks of an adaLN
  // output) on B; xn = LN(x) too unless empty. With `fresh` false the statistics of the last
  // forward on this x in `cache` are reused (a recomputation for backward gives the same values).
  void forward_modulated(const Parameters<T, B>& ps, View<const T, B> x, const T* scale,
                         const T* shift, index_t ld, View<T, B> y, View<T, B> xn, Cache& cache,
                         bool fresh = true) const {
    if (x.rank() != 3)
      fail<shape_error>(prefix_, " (", kind, "): x: expected shape [N, L, ", c_, "], got ",
                        x.shape());
    run_forward(ps, x, y, xn, scale, shift, ld, x.dim(1), cache, fresh);
  }

  // x, dy: [..., D]; dx: same shape (overwritten) or empty / {} (skipped). Parameter gradients
  // accumulate. Needs the cache of forward() on the same x.
  void backward(Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy, View<T, B> dx,
                Cache& cache) const {
    const index_t m = token_detail::rows_of(prefix_, kind, x, c_);
    detail::check_arg(prefix_, kind, "dy", dy, x.shape());
    detail::check_arg(prefix_, kind, "cache.mean (run forward first)", cache.mean.view(), Shape{m});
    const T* gam = nullptr;
    if (affine_) {
      gam = ps.param(w_).data();
      // One group per row, the D features as channels: dgamma[j] += sum_rows dy xh.
      B::segment_reduce(c_,
                        kernels::GroupNormParamGrad<T>{ps.grad(w_).data(), ps.grad(b_).data(),
                                                       x.data(), dy.data(), cache.mean.data(),
                                                       cache.rstd.data(), m, c_, 1, 1},
                        2 * m);
    }
    if (token_detail::absent(dx)) return;
    detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    token_detail::resize_if(cache.ga, Shape{m});
    token_detail::resize_if(cache.gb, Shape{m});
    token_detail::row_norm_input_grad<T, B>(x, dy, cache.mean.data(), cache.rstd.data(), gam, c_,
                                            cache.ga.data(), cache.gb.data(), dx.data());
  }

 private:
  static constexpr const char* kind = "BackendLayerNorm";

  void run_forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, View<T, B> xn,
                   const T* scale, const T* shift, index_t ld, index_t len, Cache& cache,
                   bool fresh) const {
    const index_t m = token_detail::rows_of(prefix_, kind, x, c_);
    detail::check_arg(prefix_, kind, "y", y, x.shape());
    const bool want_xn = !token_detail::absent(xn);
    if (want_xn) detail::check_arg(prefix_, kind, "xn", xn, x.shape());
    if (fresh) {
      token_detail::resize_if(cache.mean, Shape{m});
      token_detail::resize_if(cache.rstd, Shape{m});
      token_detail::row_stats<T, B>(x, c_, static_cast<double>(eps_), cache.mean.data(),
                                    cache.rstd.data());
    } else {
      detail::check_arg(prefix_, kind, "cache.mean (run forward first)", cache.mean.view(),
                        Shape{m});
    }
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    B::parallel_for(x.numel(),
                    kernels::LayerNormApply<T>{y.data(), want_xn ? xn.data() : nullptr, x.data(),
                                               cache.mean.data(), cache.rstd.data(), gam, bet,
                                               scale, shift, c_, len, ld},
                    4);
  }

  std::string prefix_;
  index_t c_;
  T eps_;
  bool affine_;
  index_t w_ = -1, b_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Element-wise functions on B: GELU, adaLN modulation, gates, patches.
// ---------------------------------------------------------------------------------------------

// x: any shape -> y = GELU_tanh(x), same shape (may alias x): gelu_forward(.., GeluApprox::tanh).
template <class T, Backend B>
void gelu_tanh_forward(View<const T, B> x, View<T, B> y) {
  detail::check_arg("gelu_tanh_forward", "element-wise", "y", y, x.shape());
  B::parallel_for(x.numel(), kernels::GeluTanhOut<T>{y.data(), x.data()}, 16);
}

// x, dy -> dx = GELU_tanh'(x) dy, all of one shape (dx may alias dy).
template <class T, Backend B>
void gelu_tanh_backward(View<const T, B> x, View<const T, B> dy, View<T, B> dx) {
  detail::check_arg("gelu_tanh_backward", "element-wise", "dy", dy, x.shape());
  detail::check_arg("gelu_tanh_backward", "element-wise", "dx", dx, x.shape());
  B::parallel_for(x.numel(), kernels::GeluTanhGrad<T>{dx.data(), x.data(), dy.data()}, 24);
}

namespace token_detail {
// patch_detail::check_patches (the same checks and messages) for views on any backend.
template <class U, class V, class B>
void check_patches(const char* who, View<U, B> x, View<V, B> patches, index_t p) {
  require<config_error>(p >= 1, who, ": patch size must be >= 1, got ", p);
  if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) < 1 || x.dim(2) < p || x.dim(3) < p ||
      x.dim(2) % p != 0 || x.dim(3) % p != 0)
    fail<shape_error>(who, ": image: expected shape [N, C, H, W] with H, W positive multiples of ",
                      "the patch size ", p, ", got ", x.shape());
  const Shape ps{x.dim(0), (x.dim(2) / p) * (x.dim(3) / p), x.dim(1) * p * p};
  if (!(patches.shape() == ps))
    fail<shape_error>(who, ": patches: expected shape ", ps, " for an image of shape ", x.shape(),
                      " and patch size ", p, ", got ", patches.shape());
}

// x: [N, L, D] against a per-sample [N, D] tensor.
template <class T, class U, class B>
void check_tokens(const char* who, const char* arg, View<T, B> x, View<U, B> v) {
  if (x.rank() != 3 || x.dim(0) < 1)
    fail<shape_error>(who, ": x: expected shape [N, L, D] with N >= 1, got ", x.shape());
  detail::check_arg(who, "tokens", arg, v, Shape{x.dim(0), x.dim(2)});
}
}  // namespace token_detail

// x: [N, L, D], scale, shift: [N, D] -> y = x (1 + scale[n]) + shift[n]: [N, L, D] (may alias x);
// modulate_forward(x, scale, shift, y, ChannelAxis::last).
template <class T, Backend B>
void modulate_tokens(View<const T, B> x, View<const T, B> scale, View<const T, B> shift,
                     View<T, B> y) {
  token_detail::check_tokens("modulate_tokens", "scale", x, scale);
  token_detail::check_tokens("modulate_tokens", "shift", x, shift);
  detail::check_arg("modulate_tokens", "tokens", "y", y, x.shape());
  const index_t d = x.dim(2);
  B::parallel_for(x.numel(), kernels::ModulateTokens<T>{y.data(), x.data(), scale.data(),
                                                        shift.data(), d, x.dim(1), d});
}

// modulate_tokens' backward: x, dy: [N, L, D]; scale: [N, D]; dx: [N, L, D] or empty (may alias
// dy); dscale, dshift: [N, D] or empty. All overwritten.
template <class T, Backend B>
void modulate_tokens_backward(View<const T, B> x, View<const T, B> scale, View<const T, B> dy,
                              View<T, B> dx, View<T, B> dscale, View<T, B> dshift) {
  using token_detail::absent;
  token_detail::check_tokens("modulate_tokens_backward", "scale", x, scale);
  detail::check_arg("modulate_tokens_backward", "tokens", "dy", dy, x.shape());
  if (!absent(dx)) detail::check_arg("modulate_tokens_backward", "tokens", "dx", dx, x.shape());
  if (!absent(dscale)) token_detail::check_tokens("modulate_tokens_backward", "dscale", x, dscale);
  if (!absent(dshift)) token_detail::check_tokens("modulate_tokens_backward", "dshift", x, dshift);
  const index_t n = x.dim(0), L = x.dim(1), d = x.dim(2);
  if (!absent(dscale) || !absent(dshift))  // before dx: dx may alias dy
    B::parallel_for(n * d,
                    kernels::TokenSums<T>{absent(dscale) ? nullptr : dscale.data(),
                                          absent(dshift) ? nullptr : dshift.data(), dy.data(),
                                          x.data(), d, L, d},
                    2 * L);
  if (!absent(dx))
    B::parallel_for(x.numel(),
                    kernels::ScaleTokens<T>{dx.data(), dy.data(), scale.data(), d, L, d, true});
}

// x, f: [N, L, D], g: [N, D] -> y = x + g[n] f: [N, L, D] (may alias x).
template <class T, Backend B>
void gated_add(View<const T, B> x, View<const T, B> g, View<const T, B> f, View<T, B> y) {
  token_detail::check_tokens("gated_add", "g", x, g);
  detail::check_arg("gated_add", "tokens", "f", f, x.shape());
  detail::check_arg("gated_add", "tokens", "y", y, x.shape());
  const index_t d = x.dim(2);
  B::parallel_for(x.numel(),
                  kernels::GatedAdd<T>{y.data(), x.data(), g.data(), f.data(), d, x.dim(1), d});
}

// gated_add's backward for the gated branch: f, dy: [N, L, D], g: [N, D] -> df = g dy: [N, L, D],
// dg = sum_l dy f: [N, D] (both overwritten; either may be empty). (dx = dy: no pass needed.)
template <class T, Backend B>
void gate_backward(View<const T, B> f, View<const T, B> g, View<const T, B> dy, View<T, B> df,
                   View<T, B> dg) {
  using token_detail::absent;
  token_detail::check_tokens("gate_backward", "g", f, g);
  detail::check_arg("gate_backward", "tokens", "dy", dy, f.shape());
  if (!absent(df)) detail::check_arg("gate_backward", "tokens", "df", df, f.shape());
  if (!absent(dg)) token_detail::check_tokens("gate_backward", "dg", f, dg);
  const index_t n = f.dim(0), L = f.dim(1), d = f.dim(2);
  if (!absent(dg))
    B::parallel_for(n * d, kernels::TokenSums<T>{dg.data(), nullptr, dy.data(), f.data(), d, L, d},
                    2 * L);
  if (!absent(df))
    B::parallel_for(f.numel(),
                    kernels::ScaleTokens<T>{df.data(), dy.data(), g.data(), d, L, d, false});
}

// x: [N, C, H, W] -> patches: [N, (H/p)(W/p), C p p] (overwritten): patchify() on B.
template <class T, Backend B>
void backend_patchify(View<const T, B> x, index_t p, View<T, B> patches,
                      PatchLayout layout = PatchLayout::channel_first) {
  token_detail::check_patches("patchify", x, patches, p);
  B::parallel_for(patches.numel(),
                  kernels::PatchPermute<T>{patches.data(), x.data(), x.dim(1), x.dim(2), x.dim(3),
                                           p, layout == PatchLayout::channel_first, true});
}

// patches: [N, (H/p)(W/p), C p p] -> x: [N, C, H, W] (overwritten; its shape gives C, H, W):
// unpatchify() on B.
template <class T, Backend B>
void backend_unpatchify(View<const T, B> patches, index_t p, View<T, B> x,
                        PatchLayout layout = PatchLayout::channel_first) {
  token_detail::check_patches("unpatchify", x, patches, p);
  B::parallel_for(patches.numel(),
                  kernels::PatchPermute<T>{x.data(), patches.data(), x.dim(1), x.dim(2), x.dim(3),
                                           p, layout == PatchLayout::channel_first, false});
}

/// nn::PatchEmbed on backend B (timm's PatchEmbed: a Conv2d with kernel = stride = p, flattened
/// to tokens), as patchify + one product over the patches of the whole batch: registers
/// prefix.proj.weight [D, C, p, p] and prefix.proj.bias [D], the CPU layer's names and shapes.
template <class T, Backend B>
class BackendPatchEmbed {
 public:
  using Context = typename BackendOps<B>::Context;

  struct Cache {
    Tensor<T, B> patches;   // [N, L, C p p] of the last forward
    Tensor<T, B> dpatches;  // [N, L, C p p] backward scratch
  };

  BackendPatchEmbed(Parameters<T, B>& ps, const std::string& prefix, index_t in_ch, index_t dim,
                    index_t patch)
      : prefix_(prefix), c_(in_ch), d_(dim), p_(patch) {
    require<config_error>(in_ch >= 1 && dim >= 1 && patch >= 1, prefix, " (", kind,
                          "): in_ch, dim and patch must be >= 1, got in_ch = ", in_ch,
                          ", dim = ", dim, ", patch = ", patch);
    w_ = ps.add(prefix + ".proj.weight", Shape{dim, in_ch, patch, patch});
    b_ = ps.add(prefix + ".proj.bias", Shape{dim});
  }

  index_t in_channels() const { return c_; }
  index_t dim() const { return d_; }
  index_t patch_size() const { return p_; }
  index_t patch_dim() const { return c_ * p_ * p_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }

  /// [N, C, H, W] -> [N, (H/p)(W/p), D]
  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4 || s[0] < 1 || s[1] != c_ || s[2] < p_ || s[3] < p_ || s[2] % p_ != 0 ||
        s[3] % p_ != 0)
      fail<shape_error>(prefix_, " (", kind, "): x: expected shape [N, ", c_,
                        ", H, W] with H, W positive multiples of ", p_, ", got ", s);
    return Shape{s[0], (s[2] / p_) * (s[3] / p_), d_};
  }

  // x: [N, C, H, W] -> y: [N, (H/p)(W/p), D]
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y,
               Cache& cache) const {
    const Shape ys = output_shape(x.shape());
    detail::check_arg(prefix_, kind, "y", y, ys);
    token_detail::resize_if(cache.patches, Shape{ys[0], ys[1], patch_dim()});
    backend_patchify<T, B>(x, p_, cache.patches.view(), PatchLayout::channel_first);
    const index_t rows = ys[0] * ys[1];
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1),
                                    cache.patches.reshape({rows, patch_dim()}), weight(ps), T(0),
                                    y.reshape({rows, d_}));
    B::parallel_for(y.numel(), kernels::BiasAdd<T>{y.data(), ps.param(b_).data(), d_});
  }

  // x: the forward's input (for its shape), dy: [N, L, D], dx: like x (overwritten) or empty / {}
  // (skipped). Parameter gradients accumulate. Uses the patches the forward left in the cache.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx, Cache& cache) const {
    const Shape ys = output_shape(x.shape());
    detail::check_arg(prefix_, kind, "dy", dy, ys);
    const Shape pshape{ys[0], ys[1], patch_dim()};
    require<config_error>(cache.patches.shape() == pshape, prefix_, " (", kind,
                          "): backward needs the cache of the matching forward call");
    const index_t rows = ys[0] * ys[1];
    const View<const T, B> dy2 = dy.reshape({rows, d_});
    BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), dy2,
                                    View<const T, B>(cache.patches.reshape({rows, patch_dim()})),
                                    T(1), ps.grad(w_).reshape({d_, patch_dim()}));
    kernels::accumulate_bias_grad<T, B>(ps.grad(b_).data(), dy.data(), rows, d_);
    if (token_detail::absent(dx)) return;
    detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    token_detail::resize_if(cache.dpatches, pshape);
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), dy2, weight(ps), T(0),
                                    cache.dpatches.reshape({rows, patch_dim()}));
    backend_unpatchify<T, B>(cache.dpatches.view(), p_, dx, PatchLayout::channel_first);
  }

 private:
  static constexpr const char* kind = "BackendPatchEmbed";

  View<const T, B> weight(const Parameters<T, B>& ps) const {
    return ps.param(w_).reshape({d_, patch_dim()});
  }

  std::string prefix_;
  index_t c_, d_, p_;
  index_t w_ = -1, b_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Multi-head self-attention on B.
// ---------------------------------------------------------------------------------------------

/// nn::MultiheadSelfAttention on backend B (same constructor, names, shapes and order:
/// prefix.qkv.weight [3D, D], prefix.qkv.bias [3D] unless qkv_bias = false, prefix.proj.weight
/// [D, D], prefix.proj.bias [D]).
template <class T, Backend B>
class BackendMultiheadSelfAttention {
 public:
  using Context = typename BackendOps<B>::Context;

  /// Backward temporaries: a model with several attention layers shares one set between them.
  struct Scratch {
    Tensor<T, B> dqkv;  // [N L, 3D]
    Tensor<T, B> dp;    // [N, heads, L, L]
    Tensor<T, B> dout;  // [N L, D]
  };

  /// The forward's activations; its Scratch base holds the backward temporaries of the overload
  /// without a Scratch argument.
  struct Cache : Scratch {
    Tensor<T, B> qkv;  // [N L, 3D]
    Tensor<T, B> p;    // [N, heads, L, L] attention probabilities
    Tensor<T, B> o;    // [N L, D] attention output before the projection
  };

  BackendMultiheadSelfAttention(Parameters<T, B>& ps, const std::string& prefix, index_t dim,
                                index_t heads, bool qkv_bias = true)
      : prefix_(prefix), d_(dim), heads_(heads), qkv_bias_(qkv_bias) {
    require<config_error>(dim >= 1 && heads >= 1 && dim % heads == 0, prefix, " (", kind,
                          "): dim must be a positive multiple of heads, got dim = ", dim,
                          ", heads = ", heads);
    wqkv_ = ps.add(prefix + ".qkv.weight", Shape{3 * dim, dim});
    if (qkv_bias) bqkv_ = ps.add(prefix + ".qkv.bias", Shape{3 * dim});
    wproj_ = ps.add(prefix + ".proj.weight", Shape{dim, dim});
    bproj_ = ps.add(prefix + ".proj.bias", Shape{dim});
  }

  index_t dim() const { return d_; }
  index_t heads() const { return heads_; }
  index_t head_dim() const { return d_ / heads_; }
  const std::string& prefix() const { return prefix_; }
  index_t qkv_weight_id() const { return wqkv_; }
  index_t qkv_bias_id() const { return bqkv_; }  // -1 without qkv bias
  index_t proj_weight_id() const { return wproj_; }
  index_t proj_bias_id() const { return bproj_; }

  // x: [N, L, D] -> y: [N, L, D]
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y,
               Cache& cache) const {
    using spatial_backend_detail::cmat;
    using spatial_backend_detail::grow;
    using spatial_backend_detail::mat;
    check_input(x);
    detail::check_arg(prefix_, kind, "y", y, x.shape());
    const index_t n = x.dim(0), L = x.dim(1), D = d_, H = heads_, dh = D / H, rows = n * L;
    grow(cache.qkv, rows * 3 * D);
    grow(cache.p, n * H * L * L);
    grow(cache.o, rows * D);
    T* qkv = cache.qkv.data();
    T* p = cache.p.data();
    T* o = cache.o.data();
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), x.reshape({rows, D}),
                                    ps.param(wqkv_), T(0), mat<T, B>(qkv, rows, 3 * D));
    if (qkv_bias_)
      B::parallel_for(rows * 3 * D, kernels::BiasAdd<T>{qkv, ps.param(bqkv_).data(), 3 * D});
    const T scale = T(1) / static_cast<T>(std::sqrt(static_cast<double>(dh)));
    for (index_t h = 0; h < H; ++h)  // S_h = scale q_h k_h^T for every sample
      BackendOps<B>::template gemm_strided_batched<T>(
          ctx, Trans::no, Trans::yes, L, L, dh, scale, qkv + h * dh, 3 * D, L * 3 * D,
          qkv + D + h * dh, 3 * D, L * 3 * D, T(0), p + h * L * L, L, H * L * L, n);
    B::parallel_for(n * H * L, kernels::SoftmaxRows<T>{p, L}, 4 * L);
    for (index_t h = 0; h < H; ++h)  // o_h = P_h v_h
      BackendOps<B>::template gemm_strided_batched<T>(
          ctx, Trans::no, Trans::no, L, dh, L, T(1), p + h * L * L, L, H * L * L,
          qkv + 2 * D + h * dh, 3 * D, L * 3 * D, T(0), o + h * dh, D, L * D, n);
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), cmat<T, B>(o, rows, D),
                                    ps.param(wproj_), T(0), y.reshape({rows, D}));
    B::parallel_for(rows * D, kernels::BiasAdd<T>{y.data(), ps.param(bproj_).data(), D});
  }

  // x: [N, L, D], dy: [N, L, D], dx: [N, L, D] (overwritten) or empty / {} (skipped). Parameter
  // gradients accumulate. Uses the cache of the matching forward.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx, Cache& cache) const {
    backward(ctx, ps, x, dy, dx, cache, static_cast<Scratch&>(cache));
  }

  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx, Cache& cache, Scratch& scratch) const {
    using spatial_backend_detail::cmat;
    using spatial_backend_detail::grow;
    using spatial_backend_detail::mat;
    check_input(x);
    detail::check_arg(prefix_, kind, "dy", dy, x.shape());
    const bool want_dx = !token_detail::absent(dx);
    if (want_dx) detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    const index_t n = x.dim(0), L = x.dim(1), D = d_, H = heads_, dh = D / H, rows = n * L;
    require<config_error>(cache.qkv.numel() >= rows * 3 * D && cache.p.numel() >= n * H * L * L,
                          prefix_, " (", kind,
                          "): backward needs the cache of the matching forward call");
    grow(scratch.dqkv, rows * 3 * D);
    grow(scratch.dp, n * H * L * L);
    grow(scratch.dout, rows * D);
    const T* qkv = cache.qkv.data();
    const T* p = cache.p.data();
    T* dqkv = scratch.dqkv.data();
    T* dp = scratch.dp.data();
    T* dout = scratch.dout.data();
    const View<const T, B> dy2 = dy.reshape({rows, D});
    BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), dy2,
                                    cmat<T, B>(cache.o.data(), rows, D), T(1), ps.grad(wproj_));
    kernels::accumulate_bias_grad<T, B>(ps.grad(bproj_).data(), dy.data(), rows, D);
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), dy2,
                                    View<const T, B>(ps.param(wproj_)), T(0),
                                    mat<T, B>(dout, rows, D));
    const T scale = T(1) / static_cast<T>(std::sqrt(static_cast<double>(dh)));
    const index_t sq = L * 3 * D, sp = H * L * L, so = L * D;  // per-sample strides
    for (index_t h = 0; h < H; ++h) {
      const T* q = qkv + h * dh;  // k at + D, v at + 2 D; likewise in dqkv
      const T* dO = dout + h * dh;
      const T* ph = p + h * L * L;
      T* dph = dp + h * L * L;
      // dP = dO v^T
      BackendOps<B>::template gemm_strided_batched<T>(ctx, Trans::no, Trans::yes, L, L, dh, T(1),
                                                      dO, D, so, q + 2 * D, 3 * D, sq, T(0), dph, L,
                                                      sp, n);
      // dv = P^T dO
      BackendOps<B>::template gemm_strided_batched<T>(ctx, Trans::yes, Trans::no, L, dh, L, T(1),
                                                      ph, L, sp, dO, D, so, T(0),
                                                      dqkv + 2 * D + h * dh, 3 * D, sq, n);
    }
    B::parallel_for(n * H * L, kernels::SoftmaxBackwardRows<T>{dp, p, L, scale}, 4 * L);
    for (index_t h = 0; h < H; ++h) {
      const T* q = qkv + h * dh;
      const T* ds = dp + h * L * L;
      // dq = dS k
      BackendOps<B>::template gemm_strided_batched<T>(ctx, Trans::no, Trans::no, L, dh, L, T(1), ds,
                                                      L, sp, q + D, 3 * D, sq, T(0), dqkv + h * dh,
                                                      3 * D, sq, n);
      // dk = dS^T q
      BackendOps<B>::template gemm_strided_batched<T>(ctx, Trans::yes, Trans::no, L, dh, L, T(1),
                                                      ds, L, sp, q, 3 * D, sq, T(0),
                                                      dqkv + D + h * dh, 3 * D, sq, n);
    }
    const View<const T, B> dqkv2 = cmat<T, B>(dqkv, rows, 3 * D);
    BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), dqkv2, x.reshape({rows, D}),
                                    T(1), ps.grad(wqkv_));
    if (qkv_bias_)
      kernels::accumulate_bias_grad<T, B>(ps.grad(bqkv_).data(), dqkv, rows, 3 * D);
    if (want_dx)
      BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), dqkv2,
                                      View<const T, B>(ps.param(wqkv_)), T(0),
                                      dx.reshape({rows, D}));
  }

 private:
  static constexpr const char* kind = "BackendMultiheadSelfAttention";

  void check_input(View<const T, B> x) const {
    if (x.rank() != 3 || x.dim(0) < 1 || x.dim(1) < 1 || x.dim(2) != d_)
      fail<shape_error>(prefix_, " (", kind, "): x: expected shape [N, L, ", d_,
                        "] with N, L >= 1, got ", x.shape());
  }

  std::string prefix_;
  index_t d_, heads_;
  bool qkv_bias_;
  index_t wqkv_ = -1, bqkv_ = -1, wproj_ = -1, bproj_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Self-attention over the pixels of an image on B.
// ---------------------------------------------------------------------------------------------

/// nn::ImageSelfAttention on backend B: x: [N, C, H, W] read as the tokens [N, H W, C], attended
/// by a BackendMultiheadSelfAttention of dim C and written back as [N, C, H, W] (no residual, no
/// normalisation: the U-Net's midcoder adds those). Parameter names are the inner attention's
/// (prefix.qkv.*, prefix.proj.*).
template <class T, Backend B>
class BackendImageSelfAttention {
 public:
  using Context = typename BackendOps<B>::Context;
  using Attention = BackendMultiheadSelfAttention<T, B>;

  BackendImageSelfAttention(Parameters<T, B>& ps, const std::string& prefix, index_t channels,
                            index_t heads, bool qkv_bias = true)
      : attn_(ps, prefix, channels, heads, qkv_bias) {}

  const Attention& attention() const { return attn_; }

  struct Cache {
    typename Attention::Cache attn;
    Tensor<T, B> tokens;   // [N, H W, C]: x as tokens
    Tensor<T, B> tokens2;  // [N, H W, C]: y tokens in forward, dy tokens in backward
    Tensor<T, B> dtokens;  // [N, H W, C]
  };

  // x: [N, C, H, W] -> y: [N, C, H, W]
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y,
               Cache& cache) const {
    const Shape ts = token_shape(x);
    detail::check_arg(attn_.prefix(), kind, "y", y, x.shape());
    token_detail::resize_if(cache.tokens, ts);
    token_detail::resize_if(cache.tokens2, ts);
    B::parallel_for(x.numel(),
                    kernels::TransposeSamples<T>{cache.tokens.data(), x.data(), ts[2], ts[1]});
    attn_.forward(ctx, ps, cache.tokens.view(), cache.tokens2.view(), cache.attn);
    B::parallel_for(x.numel(),
                    kernels::TransposeSamples<T>{y.data(), cache.tokens2.data(), ts[1], ts[2]});
  }

  // x: [N, C, H, W] (the forward's input), dy: like x, dx: like x (overwritten) or empty / {}
  // (skipped). Parameter gradients accumulate. Uses the forward's cache.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx, Cache& cache) const {
    const Shape ts = token_shape(x);
    detail::check_arg(attn_.prefix(), kind, "dy", dy, x.shape());
    const bool want_dx = !token_detail::absent(dx);
    if (want_dx) detail::check_arg(attn_.prefix(), kind, "dx", dx, x.shape());
    require<config_error>(cache.tokens.shape() == ts, attn_.prefix(), " (", kind,
                          "): backward needs the cache of the matching forward");
    token_detail::resize_if(cache.tokens2, ts);
    B::parallel_for(x.numel(),
                    kernels::TransposeSamples<T>{cache.tokens2.data(), dy.data(), ts[2], ts[1]});
    if (!want_dx) {
      attn_.backward(ctx, ps, cache.tokens.view(), cache.tokens2.view(), View<T, B>{}, cache.attn);
      return;
    }
    token_detail::resize_if(cache.dtokens, ts);
    attn_.backward(ctx, ps, cache.tokens.view(), cache.tokens2.view(), cache.dtokens.view(),
                   cache.attn);
    B::parallel_for(x.numel(),
                    kernels::TransposeSamples<T>{dx.data(), cache.dtokens.data(), ts[1], ts[2]});
  }

 private:
  static constexpr const char* kind = "BackendImageSelfAttention";

  Shape token_shape(View<const T, B> x) const {
    if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) != attn_.dim() || x.dim(2) < 1 || x.dim(3) < 1)
      fail<shape_error>(attn_.prefix(), " (", kind, "): x: expected shape [N, ", attn_.dim(),
                        ", H, W] with N, H, W >= 1, got ", x.shape());
    return Shape{x.dim(0), x.dim(2) * x.dim(3), x.dim(1)};
  }

  Attention attn_;
};

}  // namespace flowdiff::nn
