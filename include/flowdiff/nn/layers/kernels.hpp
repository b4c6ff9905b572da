// flowdiff/nn/layers/kernels.hpp — the element-wise and per-row parts of the dense layers as
// FLOWDIFF_HOST_DEVICE named functors, for backend-generic networks (nn/models/mlp_backend.hpp):
// B::parallel_for(n, functor) runs them on the CPU's threads or as one CUDA kernel each, the
// same arithmetic in the same order as the CPU layers they mirror, so that with B = Cpu the
// generic path reproduces nn::Linear / silu_* / Embedding / SinusoidalTimeEmbedding bit for bit:
//   Linear bias      y[r, j] += b[j]                       db[j] += sum_r dy[r, j] (r in order)
//   SiLU             y = x s(x)                            dx = dy s (1 + x (1 - s)),  s = 1/(1+e^-x)
//   time embedding   e[n, i] = cos(scale t_n f_i), e[n, half + i] = sin(...)   (double, as the CPU)
//   label embedding  e[n, :] += W[y_n, :]                  dW[c, :] += sum_{n: y_n = c} de[n, :]
// s(x) in float is fast_math.hpp's exp (Cephes polynomial, Cody-Waite reduction) written once more
// with explicitly rounded operations: on the host they are plain * and + (the baseline build has
// no FMA, so the bits are fast_sigmoid's, which tests/test_nn_backend.cpp checks on a dense grid);
// under nvcc's device pass they are __fmul_rn / __fadd_rn, which nvcc never contracts into FMAs,
// so the device computes the same bits. Sums over rows (bias and label gradients) run one thread
// per output element looping over the rows in order: no atomics, deterministic, and the CPU's
// order of additions.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn::kernels {

// ---------------------------------------------------------------------------------------------
// Explicitly rounded arithmetic (no FMA contraction on the device).
// ---------------------------------------------------------------------------------------------

template <class T>
FLOWDIFF_INLINE T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>)
    return __fmul_rn(a, b);
  else
    return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <class T>
FLOWDIFF_INLINE T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>)
    return __fadd_rn(a, b);
  else
    return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

/// sum_{l < n} p[l] in the library's fixed order for long contiguous runs (per-channel sums of
/// gradients over the pixels of an image): eight interleaved partial sums, element l into
/// partial l % 8, combined as ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). Eight independent
/// chains where one would wait on the latency of every add (the CPU overlaps and vectorises
/// them: 5x faster than the plain loop for a conv bias gradient); the same bits on every backend
/// and for any thread count.
template <class T>
FLOWDIFF_INLINE T sum8(const T* p, index_t n) {
  T s[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  index_t l = 0;
  for (; l + 8 <= n; l += 8)
    for (int q = 0; q < 8; ++q) s[q] = add_rn(s[q], p[l + q]);
  for (int q = 0; l + q < n; ++q) s[q] = add_rn(s[q], p[l + q]);
  return add_rn(add_rn(add_rn(s[0], s[1]), add_rn(s[2], s[3])),
                add_rn(add_rn(s[4], s[5]), add_rn(s[6], s[7])));
}

FLOWDIFF_INLINE float float_from_bits(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

/// e^x in float, fast_math.hpp's exp_f32 step by step (see there for the method and accuracy).
FLOWDIFF_INLINE float exp_f32(float x) {
  x = x > 88.0f ? 88.0f : x;  // a NaN fails both tests and propagates
  x = x < -87.0f ? -87.0f : x;
  const float shifted = add_rn(mul_rn(x, 1.44269504088896341f), 12582912.0f);
  const float n = add_rn(shifted, -12582912.0f);
  float r = add_rn(x, -mul_rn(n, 0.693359375f));
  r = add_rn(r, -mul_rn(n, -2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999507e-3f);
  p = add_rn(mul_rn(p, r), 8.3334519073e-3f);
  p = add_rn(mul_rn(p, r), 4.1665795894e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665459e-1f);
  p = add_rn(mul_rn(p, r), 5.0000001201e-1f);
  p = add_rn(add_rn(mul_rn(mul_rn(p, r), r), r), 1.0f);
  const auto bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return mul_rn(p, float_from_bits(bits));
}

/// 1 / (1 + e^-x): fast_sigmoid's value in float, std::exp's (the device's exp) in double.
template <class T>
FLOWDIFF_INLINE T sigmoid(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / add_rn(1.0f, exp_f32(-x));
  } else {
    using std::exp;
    return T(1) / (T(1) + exp(-x));
  }
}

/// SiLU x s(x) and its backward dy s (1 + x (1 - s)), in the CPU's order of operations.
template <class T>
FLOWDIFF_INLINE T silu(T x) {
  return mul_rn(x, sigmoid(x));
}
template <class T>
FLOWDIFF_INLINE T silu_grad(T x, T g) {
  const T s = sigmoid(x);
  return mul_rn(mul_rn(g, s), add_rn(T(1), mul_rn(x, add_rn(T(1), -s))));
}

// ---------------------------------------------------------------------------------------------
// Linear: bias and activation.
// ---------------------------------------------------------------------------------------------

/// y[k] += b[k % out] over the [M, out] output of the product (k < M out).
template <class T>
struct BiasAdd {
  T* y;
  const T* b;
  index_t out;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const { y[k] = add_rn(y[k], b[k % out]); }
};

/// The hidden layer's epilogue: a = h + b (kept in place for backward), y = silu(a).
template <class T>
struct BiasSilu {
  T* a;  // [M, out]: the product on entry, the pre-activation on exit
  T* y;  // [M, out]
  const T* b;
  index_t out;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const T v = add_rn(a[k], b[k % out]);
    a[k] = v;
    y[k] = silu(v);
  }
};

/// dh[k] = silu'(a[k]) dh[k] (in place).
template <class T>
struct SiluBackwardInPlace {
  const T* a;
  T* dh;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const { dh[k] = silu_grad(a[k], dh[k]); }
};

/// db[j] += dy[0, j] + dy[1, j] + ... Sequential form (one thread per column j): rows in order
/// in T, as the CPU. Also a segmented reduction over the columns (segment_reduce.hpp; block form:
/// the rows' sum in double, added to db[j] once): see accumulate_bias_grad.
template <class T>
struct BiasGrad {
  T* db;
  const T* dy;  // [M, out]
  index_t rows, out;
  static constexpr int passes = 1, width = 1;
  FLOWDIFF_HOST_DEVICE index_t size() const { return rows; }
  FLOWDIFF_HOST_DEVICE void element(index_t j, index_t r, int, const double*, double* v) const {
    v[0] = static_cast<double>(dy[r * out + j]);
  }
  FLOWDIFF_HOST_DEVICE void put(index_t j, const double* sums) const {
    db[j] = add_rn(db[j], static_cast<T>(sums[0]));
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t j) const {
    T s = db[j];
    for (index_t r = 0; r < rows; ++r) s = add_rn(s, dy[r * out + j]);
    db[j] = s;
  }
};

/// db[j] += the sum over the rows of dy[:, j] (a Linear's bias gradient) on B. The CPU runs
/// BiasGrad's sequential form, one thread per column. A GPU does too when the columns are many or
/// the rows few (coalesced loads, threads enough); with at least 256 rows and at most 4096
/// columns (a Linear over a batch of tokens or samples) each column gets a block instead
/// (B::segment_reduce): one thread per column would add thousands of rows one after another.
template <class T, class B>
void accumulate_bias_grad(T* db, const T* dy, index_t rows, index_t out) {
  const BiasGrad<T> f{db, dy, rows, out};
  if (rows >= 256 && out <= 4096)
    B::segment_reduce(out, f, rows);
  else
    B::parallel_for(out, f, rows);
}

// ---------------------------------------------------------------------------------------------
// The MLP's input h0 = [x, e] and its gradient.
// ---------------------------------------------------------------------------------------------

/// h0[r, :] = [x[r, :], e(t_r) (+ W_y[y_r, :])] over the N (d + td) elements of h0, with the
/// sinusoidal embedding of SinusoidalTimeEmbedding (double arguments, rounded once to T) and,
/// when `label_w` is not null, the label embedding added in T.
template <class T>
struct MlpInput {
  T* h0;             // [N, d + td]
  const T* x;        // [N, d]
  const T* t;        // [N]
  const double* f;   // [td / 2]: the frequencies
  const T* label_w;  // [K + 1, td] or null
  const label_t* y;  // [N] (with label_w)
  index_t d, td;
  double scale;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    using std::cos;
    using std::sin;
    const index_t in0 = d + td, r = k / in0, j = k % in0;
    if (j < d) {
      h0[k] = x[r * d + j];
      return;
    }
    const index_t i = j - d, half = td / 2;
    T e = T(0);  // the zero column of an odd td
    if (i < 2 * half) {
      const double tn = scale * static_cast<double>(t[r]);
      const double a = tn * f[i < half ? i : i - half];
#if defined(__CUDA_ARCH__)
      e = static_cast<T>(i < half ? cos(a) : sin(a));
#else
      // SinusoidalTimeEmbedding's choice, per argument: fast_sincos within its range.
      if (std::fabs(a) <= fast_sincos_limit) {
        double sa, ca;
        fast_sincos(a, sa, ca);
        e = static_cast<T>(i < half ? ca : sa);
      } else {
        e = static_cast<T>(i < half ? cos(a) : sin(a));
      }
#endif
    }
    if (label_w != nullptr) e = add_rn(e, label_w[static_cast<index_t>(y[r]) * td + i]);
    h0[k] = e;
  }
};

/// dx[r, j] = dh0[r, j] for j < d: the x part of the input gradient.
template <class T>
struct MlpInputGrad {
  T* dx;          // [N, d]
  const T* dh0;   // [N, d + td]
  index_t d, td;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const index_t r = k / d, j = k % d;
    dx[k] = dh0[r * (d + td) + j];
  }
};

/// dW[c, i] += sum over the samples n with y_n = c (in order) of de[n, i], where de is the
/// embedding part of dh0: one thread per element (c, i) of dW [K + 1, td].
template <class T>
struct LabelEmbeddingGrad {
  T* dw;            // [K + 1, td]
  const T* dh0;     // [N, d + td]
  const label_t* y; // [N]
  index_t n, d, td;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const index_t c = k / td, i = k % td;
    T s = dw[k];
    for (index_t r = 0; r < n; ++r)
      if (static_cast<index_t>(y[r]) == c) s = add_rn(s, dh0[r * (d + td) + d + i]);
    dw[k] = s;
  }
};

/// 1 where y[i] is not a label in [0, k], else 0 (summed to count the bad labels on any backend).
struct BadLabel {
  const label_t* y;
  index_t k;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    return (y[i] < 0 || static_cast<index_t>(y[i]) > k) ? 1.0 : 0.0;
  }
};

}  // namespace flowdiff::nn::kernels

namespace flowdiff::nn::detail {

/// The label check of the backend models' forward (BackendMLP, BackendUNet, BackendDiT), for y
/// given: the model must be conditional, y [n], and every label in [0, num_classes] (num_classes
/// is the null label), counted by one reduction on B (one synchronisation on a device). With
/// null_label = false (a classifier's targets: BackendConvClassifier, BackendSoftmaxCrossEntropy)
/// the labels must lie in [0, num_classes) instead.
template <class B>
void check_backend_labels(std::string_view who, View<const label_t, B> y, index_t n,
                          index_t num_classes, bool null_label = true) {
  if (null_label && num_classes <= 0)
    fail<config_error>(who, ": labels y were given (shape ", y.shape(),
                       ") but the model is unconditional (num_classes = 0)");
  if (!(y.shape() == Shape{n}))
    fail<shape_error>(who, ": y: expected shape ", Shape{n}, ", got ", y.shape());
  const index_t top = null_label ? num_classes : num_classes - 1;  // the largest valid label
  const double bad = B::reduce_sum(n, kernels::BadLabel{y.data(), top});
  if (bad > 0 && null_label)
    fail<config_error>(who, ": ", static_cast<index_t>(bad), " of the ", n,
                       " labels y lie outside [0, ", num_classes, "] (", num_classes,
                       " is the null label)");
  if (bad > 0)
    fail<config_error>(who, ": ", static_cast<index_t>(bad), " of the ", n,
                       " labels y lie outside [0, ", num_classes, ") (K = ", num_classes,
                       " classes)");
}

/// SinusoidalTimeEmbedding's frequencies f_i = exp(-log(max_period) i / half), i < half = dim / 2,
/// in double on the host by the CPU layer's expression, then on B: the table f of MlpInput for
/// the backend models (BackendMLP, BackendUNet, BackendDiT, BackendConvClassifier).
template <class B>
Tensor<double, B> time_frequencies(index_t dim, double max_period) {
  const index_t half = dim / 2;
  Tensor<double> f(Shape{half});
  for (index_t i = 0; i < half; ++i)
    f[i] = std::exp(-std::log(max_period) * static_cast<double>(i) / static_cast<double>(half));
  Tensor<double, B> on_b(Shape{half});
  if (half > 0) BackendOps<B>::template upload<double>(on_b.view(), View<const double>(f.view()));
  return on_b;
}

}  // namespace flowdiff::nn::detail
