// flowdiff/nn/layers/spatial_kernels.hpp — the image layers a U-Net needs, written once for any
// backend B: FLOWDIFF_HOST_DEVICE functors run by B::parallel_for (the CPU's threads or one CUDA
// kernel each) plus products through BackendOps<B>::gemm (the CPU gemm; cuBLAS), with the
// semantics, parameter names, shapes and registration order of the CPU layers (conv.hpp,
// norm.hpp, upsample.hpp, pooling.hpp, batchnorm.hpp), so the flat parameter buffers have the same
// layout:
//   Conv2d     y_n = W col(x_n) + b,  dW += dy_n col(x_n)^T,  db += sum_{n,hw} dy,
//              dx_n = col2im(W^T dy_n)                   W: [O, C k k], col(x_n): [C k k, Ho Wo]
//              (square kernel k, stride s, zero padding p, Ho = (H + 2p - k) / s + 1)
//   GroupNorm  mu, rstd = 1/sqrt(var + eps) per (sample, group),  y = gamma_c (x - mu) rstd +
//   beta_c
//              dgamma_c += sum dy xh,  dbeta_c += sum dy,  g = dy gamma_c,
//              dx = rstd (g - mean_S g - xh mean_S(g xh))        (optionally fused with SiLU)
//   Upsample   y[n, c, h f + i, w f + j] = x[n, c, h, w],  dx[n, c, h, w] = sum_{i, j < f} dy[...]
//   AvgPool    y[n, c, oh, ow] = 1/k^2 sum_{i, j < k} x[n, c, oh k + i, ow k + j],
//              dx[n, c, oh k + i, ow k + j] = dy[n, c, oh, ow] / k^2  (0 past the last window)
//   BatchNorm  per channel over the M = N H W values: training mu, var (biased) of the batch and
//              running_mean <- (1 - m) running_mean + m mu, running_var <- (1 - m) running_var +
//              m var M / (M - 1); eval mu, var = the running ones; y = gamma (x - mu) rstd + beta,
//              dgamma += sum dy xh,  dbeta += sum dy,
//              dx = gamma rstd (dy - mean dy - xh mean(dy xh))  (eval: gamma rstd dy)
//   per-channel broadcast  y[n, c, h, w] += v[n, c],  dv[n, c] = sum_{h, w} dy[n, c, h, w]
// Every functor writes each output element from exactly one thread and sums in a fixed order:
// no atomics, so results are deterministic on every backend. The per-set and per-channel sums
// (GroupNorm, BatchNorm, the bias gradient) are segmented reductions, B::segment_reduce
// (backend/segment_reduce.hpp): one thread per segment in element order on the CPU, one block
// per segment with a fixed tree on a GPU. col2im is a gather (one thread per
// input pixel adding its k x k contributions in (i, j) order, which is the CPU col2im's order of
// additions). GroupNorm's and BatchNorm's statistics are accumulated in double (BatchNorm: one
// thread per channel, samples then positions in order, nn::BatchNorm2d's order). The element-wise
// arithmetic uses kernels::mul_rn / add_rn (no FMA contraction on the device), in the CPU layers'
// order of operations. This header names no CUDA type: include backend/cuda/dispatch.cuh (nvcc)
// for B = Cuda.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

// ---------------------------------------------------------------------------------------------
// Convolution: im2col, col2im (gather), bias, sample packing, bias gradient.
// ---------------------------------------------------------------------------------------------

/// A convolution's geometry: a square kernel over an (height x width) image with `channels`
/// channels gives an (out_h x out_w) output. Plain values, copied into the functors.
struct ConvShape {
  index_t channels = 0, height = 0, width = 0, kernel = 1, stride = 1, padding = 0;
  index_t out_h = 0, out_w = 0;
  FLOWDIFF_HOST_DEVICE index_t rows() const { return channels * kernel * kernel; }
  FLOWDIFF_HOST_DEVICE index_t cols() const { return out_h * out_w; }
  FLOWDIFF_HOST_DEVICE index_t plane() const { return channels * height * width; }
  FLOWDIFF_HOST_DEVICE bool identity() const { return kernel == 1 && stride == 1 && padding == 0; }
};

/// col[r, g L + l] = x_g[c, oh s - p + i, ow s - p + j] (0 outside the image) for the gn samples
/// of a group, r = (c k + i) k + j, l = oh Wo + ow, L = Ho Wo: one thread per column element (the
/// consecutive threads of a warp write consecutive columns).
template <class T>
struct Im2col {
  T* col;      // [C k k, gn L]
  const T* x;  // [gn, C, H, W]: the group's first sample
  ConvShape g;
  index_t gn;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t L = g.cols(), ld = gn * L, k = g.kernel;
    const index_t r = q / ld, rest = q % ld, s = rest / L, l = rest % L;
    const index_t c = r / (k * k), i = (r / k) % k, j = r % k;
    const index_t ih = (l / g.out_w) * g.stride - g.padding + i;
    const index_t iw = (l % g.out_w) * g.stride - g.padding + j;
    col[q] = (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width)
                 ? x[s * g.plane() + (c * g.height + ih) * g.width + iw]
                 : T(0);
  }
};

/// The adjoint of Im2col as a gather: dx_g[c, h, w] = sum over the (i, j) (in that order) whose
/// column entry reads pixel (h, w) of dcol[(c k + i) k + j, g L + oh Wo + ow]. One thread per
/// input pixel, so no two threads write one element; the order of additions is the CPU col2im's
/// (conv.hpp: zero, then (i, j, oh) in order), so the sums have its bits.
template <class T>
struct Col2imGather {
  T* dx;          // [gn, C, H, W]
  const T* dcol;  // [C k k, gn L]
  ConvShape g;
  index_t gn;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t L = g.cols(), ld = gn * L, k = g.kernel, s = g.stride;
    const index_t hw = g.height * g.width, sample = q / g.plane();
    const index_t c = (q / hw) % g.channels, h = (q % hw) / g.width, w = q % g.width;
    T acc = T(0);
    for (index_t i = 0; i < k; ++i) {
      const index_t th = h + g.padding - i;  // = oh s
      if (th < 0 || th % s != 0 || th / s >= g.out_h) continue;
      const index_t oh = th / s;
      for (index_t j = 0; j < k; ++j) {
        const index_t tw = w + g.padding - j;
        if (tw < 0 || tw % s != 0 || tw / s >= g.out_w) continue;
        const index_t r = (c * k + i) * k + j;
        acc = add_rn(acc, dcol[r * ld + sample * L + oh * g.out_w + tw / s]);
      }
    }
    dx[q] = acc;
  }
};

/// y[g, o, l] = out[o, g L + l] (+ b[o]): a group's product [O, gn L] back to [gn, O, L].
template <class T>
struct UnpackBias {
  T* y;          // [gn, O, L]
  const T* out;  // [O, gn L]
  const T* b;    // [O] or null
  index_t channels, len, gn;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t s = q / (channels * len), o = (q / len) % channels, l = q % len;
    const T v = out[o * gn * len + s * len + l];
    y[q] = b != nullptr ? add_rn(v, b[o]) : v;
  }
};

/// dst[c, g L + l] = src[g, c, l]: the samples of a group side by side (dy before dW = dy col^T).
template <class T>
struct PackSamples {
  T* dst;        // [C, gn L]
  const T* src;  // [gn, C, L]
  index_t channels, len, gn;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t ld = gn * len, c = q / ld, s = (q % ld) / len, l = q % len;
    dst[q] = src[(s * channels + c) * len + l];
  }
};

/// y[n, c, l] += b[c] over an [N, C, L] tensor.
template <class T>
struct ChannelBias {
  T* y;
  const T* b;  // [C]
  index_t channels, len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    y[q] = add_rn(y[q], b[(q / len) % channels]);
  }
};

/// db[c] += the sum of dy[:, c, :], a segmented reduction over channels (segment_reduce.hpp).
/// Sequential form: (sum over n in order of sum8(dy[n, c, :])) in T, as the CPU's
/// accumulate_channel_sums; block form (CUDA): the N L values in double, rounded once.
template <class T>
struct ChannelGradSum {
  T* db;        // [C]
  const T* dy;  // [N, C, L]
  index_t n, channels, len;
  static constexpr int passes = 1, width = 1;
  FLOWDIFF_HOST_DEVICE index_t size() const { return n * len; }
  FLOWDIFF_HOST_DEVICE void element(index_t c, index_t i, int, const double*, double* v) const {
    v[0] = static_cast<double>(dy[((i / len) * channels + c) * len + i % len]);
  }
  FLOWDIFF_HOST_DEVICE void put(index_t c, const double* sums) const {
    db[c] = add_rn(db[c], static_cast<T>(sums[0]));
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t c) const {
    T acc = T(0);
    for (index_t i = 0; i < n; ++i) acc = add_rn(acc, sum8(dy + (i * channels + c) * len, len));
    db[c] = add_rn(db[c], acc);
  }
};

// ---------------------------------------------------------------------------------------------
// GroupNorm over sets (sample n, group g) of k = (C / G) S contiguous elements.
// ---------------------------------------------------------------------------------------------

/// mean[ng] and rstd[ng] = 1 / sqrt(biased variance + eps) of x's set ng, two-pass (the mean,
/// then the squared deviations from it: no cancellation of sum x^2), each sum in double: a
/// segmented reduction over the sets (segment_reduce.hpp; sequential form: element order).
template <class T>
struct GroupNormStats {
  T* mean;     // [N G]
  T* rstd;     // [N G]
  const T* x;  // [N, C, S] = N G sets of k elements
  index_t k;
  double eps;
  static constexpr int passes = 2, width = 1;
  FLOWDIFF_HOST_DEVICE index_t size() const { return k; }
  FLOWDIFF_HOST_DEVICE void element(index_t ng, index_t i, int pass, const double* prev,
                                    double* v) const {
    const double xv = static_cast<double>(x[ng * k + i]);
    if (pass == 0) {
      v[0] = xv;
    } else {
      const double d = xv - prev[0] / static_cast<double>(k);
      v[0] = d * d;
    }
  }
  FLOWDIFF_HOST_DEVICE void put(index_t ng, const double* sums) const {
    store(ng, sums[0] / static_cast<double>(k), sums[1]);
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t ng) const {
    const T* xb = x + ng * k;
    double s = 0;
    for (index_t i = 0; i < k; ++i) s += static_cast<double>(xb[i]);
    const double mu = s / static_cast<double>(k);
    double v = 0;
    for (index_t i = 0; i < k; ++i) {
      const double d = static_cast<double>(xb[i]) - mu;
      v += d * d;
    }
    store(ng, mu, v);
  }
  // mu: the mean; v: the sum of squared deviations from it.
  FLOWDIFF_HOST_DEVICE void store(index_t ng, double mu, double v) const {
    using std::sqrt;
    mean[ng] = static_cast<T>(mu);
    rstd[ng] = static_cast<T>(1.0 / sqrt(v / static_cast<double>(k) + eps));
  }
};

/// y = x a + b per channel with a = rstd gamma_c, b = beta_c - mean a (norm.hpp's normalise_set,
/// the same operations): element q of a GroupNorm's output from its input and statistics.
template <class T>
FLOWDIFF_INLINE T group_norm_value(const T* x, const T* mean, const T* rstd, const T* gamma,
                                   const T* beta, index_t channels, index_t cg, index_t len,
                                   index_t q) {
  const index_t row = q / len, c = row % channels, ng = row / cg;
  const T mu = mean[ng], rs = rstd[ng];
  const T a = gamma != nullptr ? mul_rn(rs, gamma[c]) : rs;
  const T b = gamma != nullptr ? add_rn(beta[c], -mul_rn(mu, a)) : -mul_rn(mu, a);
  return add_rn(mul_rn(x[q], a), b);
}

/// y = GN(x) (group_norm_value) when y is not null, and act = SiLU(y) when act is not null. One
/// thread per element.
template <class T>
struct GroupNormApply {
  T* y;            // [N, C, S] or null
  T* act;          // [N, C, S] or null
  const T* x;      // [N, C, S]
  const T* mean;   // [N G]
  const T* rstd;   // [N G]
  const T* gamma;  // [C] or null (no affine map)
  const T* beta;   // [C] or null
  index_t channels, cg, len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const T v = group_norm_value(x, mean, rstd, gamma, beta, channels, cg, len, q);
    if (y != nullptr) y[q] = v;
    if (act != nullptr) act[q] = silu(v);
  }
};

/// dy = silu'(y) dact with y = GN(x) recomputed (group_norm_value: the forward's bits), so the
/// norm's output need not be kept for the SiLU's backward.
template <class T>
struct GroupNormSiluGrad {
  T* dy;           // [N, C, S]
  const T* dact;   // [N, C, S]: the gradient of SiLU(y)
  const T* x;      // [N, C, S]
  const T* mean;   // [N G]
  const T* rstd;   // [N G]
  const T* gamma;  // [C] or null
  const T* beta;   // [C] or null
  index_t channels, cg, len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    dy[q] = silu_grad(group_norm_value(x, mean, rstd, gamma, beta, channels, cg, len, q), dact[q]);
  }
};

/// dgamma[c] += sum dy (x - mu) rstd, dbeta[c] += sum dy over every sample and position of
/// channel c, accumulated in double: a segmented reduction over channels (segment_reduce.hpp;
/// sequential form: samples in order, positions in order).
template <class T>
struct GroupNormParamGrad {
  T* dgamma;      // [C]
  T* dbeta;       // [C]
  const T* x;     // [N, C, S]
  const T* dy;    // [N, C, S]
  const T* mean;  // [N G]
  const T* rstd;  // [N G]
  index_t n, channels, groups, len;
  static constexpr int passes = 1, width = 2;
  FLOWDIFF_HOST_DEVICE index_t size() const { return n * len; }
  FLOWDIFF_HOST_DEVICE void element(index_t c, index_t i, int, const double*, double* v) const {
    const index_t smp = i / len, set = smp * groups + c / (channels / groups);
    const index_t q = (smp * channels + c) * len + i % len;
    const double g = static_cast<double>(dy[q]);
    v[0] = g * ((static_cast<double>(x[q]) - static_cast<double>(mean[set])) *
                static_cast<double>(rstd[set]));
    v[1] = g;
  }
  FLOWDIFF_HOST_DEVICE void put(index_t c, const double* sums) const {
    dgamma[c] = static_cast<T>(static_cast<double>(dgamma[c]) + sums[0]);
    dbeta[c] = static_cast<T>(static_cast<double>(dbeta[c]) + sums[1]);
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t c) const {
    const index_t grp = c / (channels / groups);
    double sg = 0, sb = 0;
    for (index_t i = 0; i < n; ++i) {
      const double mu = static_cast<double>(mean[i * groups + grp]);
      const double rs = static_cast<double>(rstd[i * groups + grp]);
      const T* xi = x + (i * channels + c) * len;
      const T* gi = dy + (i * channels + c) * len;
      for (index_t l = 0; l < len; ++l) {
        const double g = static_cast<double>(gi[l]);
        sg += g * ((static_cast<double>(xi[l]) - mu) * rs);
        sb += g;
      }
    }
    const double sums[2] = {sg, sb};
    put(c, sums);
  }
};

/// The two means of the input gradient per set ng, in double over the set's elements:
/// ga[ng] = mean_S (dy gamma_c), gb[ng] = mean_S (dy gamma_c xh), xh = (x - mu) rstd. A segmented
/// reduction over the sets (segment_reduce.hpp; sequential form: element order).
template <class T>
struct GroupNormGradMeans {
  double* ga;      // [N G]
  double* gb;      // [N G]
  const T* x;      // [N, C, S]
  const T* dy;     // [N, C, S]
  const T* mean;   // [N G]
  const T* rstd;   // [N G]
  const T* gamma;  // [C] or null
  index_t groups, cg, len;
  static constexpr int passes = 1, width = 2;
  FLOWDIFF_HOST_DEVICE index_t size() const { return cg * len; }
  FLOWDIFF_HOST_DEVICE void element(index_t ng, index_t i, int, const double*, double* v) const {
    const index_t q = ng * cg * len + i;
    const double gm =
        gamma != nullptr ? static_cast<double>(gamma[(ng % groups) * cg + i / len]) : 1.0;
    const double g = static_cast<double>(dy[q]) * gm;
    v[0] = g;
    v[1] = g * ((static_cast<double>(x[q]) - static_cast<double>(mean[ng])) *
                static_cast<double>(rstd[ng]));
  }
  FLOWDIFF_HOST_DEVICE void put(index_t ng, const double* sums) const {
    const double k = static_cast<double>(cg * len);
    ga[ng] = sums[0] / k;
    gb[ng] = sums[1] / k;
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t ng) const {
    const index_t k = cg * len, c0 = (ng % groups) * cg;
    const double mu = static_cast<double>(mean[ng]), rs = static_cast<double>(rstd[ng]);
    const T* xb = x + ng * k;
    const T* gb_ = dy + ng * k;
    double a = 0, b = 0;
    for (index_t ci = 0; ci < cg; ++ci) {
      const double gm = gamma != nullptr ? static_cast<double>(gamma[c0 + ci]) : 1.0;
      for (index_t l = ci * len; l < (ci + 1) * len; ++l) {
        const double g = static_cast<double>(gb_[l]) * gm;
        a += g;
        b += g * ((static_cast<double>(xb[l]) - mu) * rs);
      }
    }
    const double sums[2] = {a, b};
    put(ng, sums);
  }
};

/// dx = rstd (dy gamma_c - ga - (x - mu) rstd gb) per element, in T in norm.hpp's order.
template <class T>
struct GroupNormInputGrad {
  T* dx;             // [N, C, S]
  const T* x;        // [N, C, S]
  const T* dy;       // [N, C, S]
  const T* mean;     // [N G]
  const T* rstd;     // [N G]
  const T* gamma;    // [C] or null
  const double* ga;  // [N G]
  const double* gb;  // [N G]
  index_t channels, cg, len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t row = q / len, c = row % channels, ng = row / cg;
    const T mu = mean[ng], rs = rstd[ng];
    const T a = static_cast<T>(ga[ng]), b = static_cast<T>(gb[ng]);
    const T g = gamma != nullptr ? mul_rn(dy[q], gamma[c]) : dy[q];
    const T xh_b = mul_rn(mul_rn(add_rn(x[q], -mu), rs), b);
    dx[q] = mul_rn(rs, add_rn(add_rn(g, -a), -xh_b));
  }
};

/// dy = silu'(y) dact (out of place): the gradient through a SiLU that followed y.
template <class T>
struct SiluGradOut {
  T* dy;
  const T* y;     // the SiLU's input
  const T* dact;  // the gradient of its output
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { dy[q] = silu_grad(y[q], dact[q]); }
};

/// act = SiLU(x) (out of place).
template <class T>
struct SiluOut {
  T* act;
  const T* x;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { act[q] = silu(x[q]); }
};

// ---------------------------------------------------------------------------------------------
// Nearest upsampling, per-channel broadcast and its spatial sum, element-wise add.
// ---------------------------------------------------------------------------------------------

/// y[nc, h f + i, w f + j] = x[nc, h, w]: one thread per output element.
template <class T>
struct UpsampleNearest {
  T* y;        // [N C, H f, W f]
  const T* x;  // [N C, H, W]
  index_t height, width, factor;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t wo = width * factor, ho = height * factor;
    const index_t nc = q / (ho * wo), r = q % (ho * wo);
    y[q] = x[(nc * height + (r / wo) / factor) * width + (r % wo) / factor];
  }
};

/// dx[nc, h, w] = sum over i, then j (< f), of dy[nc, h f + i, w f + j]: one thread per input
/// element, upsample.hpp's order of additions.
template <class T>
struct UpsampleNearestGrad {
  T* dx;        // [N C, H, W]
  const T* dy;  // [N C, H f, W f]
  index_t height, width, factor;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t wo = width * factor, hw = height * width;
    const index_t nc = q / hw, h = (q % hw) / width, w = q % width;
    const T* base = dy + (nc * height * factor + h * factor) * wo + w * factor;
    T acc = T(0);
    for (index_t i = 0; i < factor; ++i)
      for (index_t j = 0; j < factor; ++j) acc = add_rn(acc, base[i * wo + j]);
    dx[q] = acc;
  }
};

/// y[nc, l] += v[nc] over [N C, L].
template <class T>
struct AddPerChannel {
  T* y;
  const T* v;  // [N C]
  index_t len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { y[q] = add_rn(y[q], v[q / len]); }
};

/// dv[nc] = sum8(dy[nc, :]) (broadcast.hpp's sum_spatial).
template <class T>
struct SumPerChannel {
  T* dv;        // [N C]
  const T* dy;  // [N C, L]
  index_t len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t nc) const { dv[nc] = sum8(dy + nc * len, len); }
};

/// a[q] += b[q].
template <class T>
struct AddInPlace {
  T* a;
  const T* b;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { a[q] = add_rn(a[q], b[q]); }
};

// ---------------------------------------------------------------------------------------------
// Average pooling with kernel = stride = k (pooling.hpp: Ho = H / k, floor).
// ---------------------------------------------------------------------------------------------

/// y[nc, oh, ow] = (sum over i, then j (< k), of x[nc, oh k + i, ow k + j]) inv, inv = 1 / k^2:
/// one thread per output element, AvgPool2d's order (from zero, then one multiply).
template <class T>
struct AvgPoolForward {
  T* y;        // [N C, H / k, W / k]
  const T* x;  // [N C, H, W]
  index_t height, width, kernel;
  T inv;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t ho = height / kernel, wo = width / kernel;
    const index_t nc = q / (ho * wo), r = q % (ho * wo);
    const T* base = x + (nc * height + (r / wo) * kernel) * width + (r % wo) * kernel;
    T acc = T(0);
    for (index_t i = 0; i < kernel; ++i)
      for (index_t j = 0; j < kernel; ++j) acc = add_rn(acc, base[i * width + j]);
    y[q] = mul_rn(acc, inv);
  }
};

/// dx[nc, h, w] = dy[nc, h / k, w / k] inv inside the pooled windows, 0 on the rows and columns
/// past the last one: one thread per input element.
template <class T>
struct AvgPoolBackward {
  T* dx;        // [N C, H, W]
  const T* dy;  // [N C, H / k, W / k]
  index_t height, width, kernel;
  T inv;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t ho = height / kernel, wo = width / kernel, hw = height * width;
    const index_t nc = q / hw, h = (q % hw) / width, w = q % width;
    dx[q] = (h < ho * kernel && w < wo * kernel)
                ? mul_rn(dy[(nc * ho + h / kernel) * wo + w / kernel], inv)
                : T(0);
  }
};

// ---------------------------------------------------------------------------------------------
// BatchNorm2d over the N S values of each channel of [N, C, S] (batchnorm.hpp's arithmetic).
// ---------------------------------------------------------------------------------------------

/// The statistics of channel c that the normalisation uses: in training the batch's, two passes
/// in double (the mean, then the squared deviations: no cancellation), and (when run_mean_out is
/// not null) the running statistics' update in T; in eval the running ones. mean[c] = mu,
/// rstd[c] = 1 / sqrt(var + eps) in T. A segmented reduction over channels (segment_reduce.hpp;
/// sequential form: samples then positions in order; no elements in eval).
template <class T>
struct BatchNormStats {
  T* mean;            // [C]
  T* rstd;            // [C]
  T* run_mean_out;    // [C] or null (no update)
  T* run_var_out;     // [C] or null
  const T* x;         // [N, C, S]
  const T* run_mean;  // [C]
  const T* run_var;   // [C]
  index_t n, channels, len;
  T eps, momentum;
  bool training;
  static constexpr int passes = 2, width = 1;
  FLOWDIFF_HOST_DEVICE index_t size() const { return training ? n * len : 0; }
  FLOWDIFF_HOST_DEVICE void element(index_t c, index_t i, int pass, const double* prev,
                                    double* v) const {
    const double xv = static_cast<double>(x[((i / len) * channels + c) * len + i % len]);
    if (pass == 0) {
      v[0] = xv;
    } else {
      const double d = xv - prev[0] / static_cast<double>(n * len);
      v[0] = d * d;
    }
  }
  FLOWDIFF_HOST_DEVICE void put(index_t c, const double* sums) const {
    store(c, sums[0] / static_cast<double>(n * len), sums[1]);
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t c) const {
    double md = 0, q = 0;
    if (training) {
      double s = 0;
      for (index_t i = 0; i < n; ++i) {
        const T* xr = x + (i * channels + c) * len;
        for (index_t l = 0; l < len; ++l) s += static_cast<double>(xr[l]);
      }
      md = s / static_cast<double>(n * len);
      for (index_t i = 0; i < n; ++i) {
        const T* xr = x + (i * channels + c) * len;
        for (index_t l = 0; l < len; ++l) {
          const double d = static_cast<double>(xr[l]) - md;
          q += d * d;
        }
      }
    }
    store(c, md, q);
  }
  // Training: md the batch mean, q the sum of squared deviations from it (unused in eval).
  FLOWDIFF_HOST_DEVICE void store(index_t c, double md, double q) const {
    using std::sqrt;
    T mu, var;
    if (training) {
      const double cnt = static_cast<double>(n * len);
      mu = static_cast<T>(md);
      var = static_cast<T>(q / cnt);
      if (run_mean_out != nullptr) {
        const T keep = add_rn(T(1), -momentum);
        run_mean_out[c] = add_rn(mul_rn(keep, run_mean[c]), mul_rn(momentum, mu));
        run_var_out[c] =
            add_rn(mul_rn(keep, run_var[c]), mul_rn(momentum, static_cast<T>(q / (cnt - 1))));
      }
    } else {
      mu = run_mean[c];
      var = run_var[c];
    }
    mean[c] = mu;
    rstd[c] = T(1) / sqrt(add_rn(var, eps));
  }
};

/// y = a x + b per channel with a = gamma_c rstd_c, b = beta_c - mean_c a. One thread per element.
template <class T>
struct BatchNormApply {
  T* y;            // [N, C, S]
  const T* x;      // [N, C, S]
  const T* mean;   // [C]
  const T* rstd;   // [C]
  const T* gamma;  // [C]
  const T* beta;   // [C]
  index_t channels, len;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t c = (q / len) % channels;
    const T a = mul_rn(gamma[c], rstd[c]);
    const T b = add_rn(beta[c], -mul_rn(mean[c], a));
    y[q] = add_rn(mul_rn(a, x[q]), b);
  }
};

/// sg = sum dy and sgx = sum dy xh over channel c (double, xh = (x - mu) rstd in T): dgamma[c] +=
/// sgx, dbeta[c] += sg (in T), and the input gradient's means ga[c] = sg / M, gb[c] = sgx / M
/// (M = N S). A segmented reduction over channels (segment_reduce.hpp; sequential form: samples
/// then positions in order).
template <class T>
struct BatchNormParamGrad {
  T* dgamma;      // [C]
  T* dbeta;       // [C]
  double* ga;     // [C]
  double* gb;     // [C]
  const T* x;     // [N, C, S]
  const T* dy;    // [N, C, S]
  const T* mean;  // [C]
  const T* rstd;  // [C]
  index_t n, channels, len;
  static constexpr int passes = 1, width = 2;
  FLOWDIFF_HOST_DEVICE index_t size() const { return n * len; }
  FLOWDIFF_HOST_DEVICE void element(index_t c, index_t i, int, const double*, double* v) const {
    const index_t q = ((i / len) * channels + c) * len + i % len;
    const double g = static_cast<double>(dy[q]);
    v[0] = g;
    v[1] = g * static_cast<double>(mul_rn(add_rn(x[q], -mean[c]), rstd[c]));
  }
  FLOWDIFF_HOST_DEVICE void put(index_t c, const double* sums) const {
    const double sg = sums[0], sgx = sums[1];
    dgamma[c] = add_rn(dgamma[c], static_cast<T>(sgx));
    dbeta[c] = add_rn(dbeta[c], static_cast<T>(sg));
    const double m = static_cast<double>(n * len);
    ga[c] = sg / m;
    gb[c] = sgx / m;
  }
  FLOWDIFF_HOST_DEVICE void operator()(index_t c) const {
    const T mu = mean[c], rs = rstd[c];
    double sg = 0, sgx = 0;
    for (index_t i = 0; i < n; ++i) {
      const T* xr = x + (i * channels + c) * len;
      const T* gr = dy + (i * channels + c) * len;
      for (index_t l = 0; l < len; ++l) {
        sg += static_cast<double>(gr[l]);
        sgx += static_cast<double>(gr[l]) * static_cast<double>(mul_rn(add_rn(xr[l], -mu), rs));
      }
    }
    const double sums[2] = {sg, sgx};
    put(c, sums);
  }
};

/// dx = gamma_c rstd_c (dy - ga_c - (x - mu_c) rstd_c gb_c) in training, gamma_c rstd_c dy in eval
/// (the means taken as 0, as nn::BatchNorm2d does), in T in its order. One thread per element.
template <class T>
struct BatchNormInputGrad {
  T* dx;             // [N, C, S]
  const T* x;        // [N, C, S]
  const T* dy;       // [N, C, S]
  const T* mean;     // [C]
  const T* rstd;     // [C]
  const T* gamma;    // [C]
  const double* ga;  // [C]
  const double* gb;  // [C]
  index_t channels, len;
  bool training;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t c = (q / len) % channels;
    const T mu = mean[c], rs = rstd[c];
    const T scale = mul_rn(gamma[c], rs);
    const T mg = training ? static_cast<T>(ga[c]) : T(0);
    const T mgx = training ? static_cast<T>(gb[c]) : T(0);
    const T xh_g = mul_rn(mul_rn(add_rn(x[q], -mu), rs), mgx);
    dx[q] = mul_rn(scale, add_rn(add_rn(dy[q], -mg), -xh_g));
  }
};

}  // namespace kernels

namespace spatial_backend_detail {

template <class T, class B>
View<const T, B> cmat(const T* p, index_t r, index_t c) {
  return View<const T, B>(p, Shape{r, c});
}
template <class T, class B>
View<T, B> mat(T* p, index_t r, index_t c) {
  return View<T, B>(p, Shape{r, c});
}

/// Grows t to at least n elements (never shrinks: a smaller batch reuses the storage).
template <class T, class B>
void grow(Tensor<T, B>& t, index_t n) {
  if (t.numel() < n) t.resize(Shape{n});
}

/// v is absent: no data or no elements (an optional output left out).
template <class T, class B>
bool absent(View<T, B> v) {
  return v.data() == nullptr || v.empty();
}

}  // namespace spatial_backend_detail

// ---------------------------------------------------------------------------------------------
// Conv2d on B.
// ---------------------------------------------------------------------------------------------

/// nn::Conv2d's convolution on backend B (same constructor, names, shapes and order). Samples
/// go in groups whose columns sit side by side in one [C k k, G Ho Wo] matrix, so a batch of small
/// images makes one large product; G is the largest group whose column matrix fits the workspace
/// limit (set_workspace_limit; at least one sample). Backward recomputes the columns, one group
/// after another (dW accumulates the groups in order, so it is deterministic).
template <class T, Backend B>
class BackendConv2d {
 public:
  using Context = typename BackendOps<B>::Context;

  /// Workspaces on B, grown on demand and reused while shapes repeat.
  struct Cache {
    Tensor<T, B> col;  // [C k k, G Ho Wo]: a group's columns (dcol in backward)
    Tensor<T, B> out;  // [O, G Ho Wo]: a group's product / packed dy (G > 1 only)
  };

  /// Registers prefix.weight [out_ch, in_ch, kernel, kernel] and prefix.bias [out_ch].
  BackendConv2d(Parameters<T, B>& ps, const std::string& prefix, index_t in_ch, index_t out_ch,
                index_t kernel, index_t stride = 1, index_t padding = 0, bool bias = true)
      : prefix_(prefix),
        in_(in_ch),
        out_(out_ch),
        k_(kernel),
        s_(stride),
        p_(padding),
        bias_(bias) {
    require<config_error>(in_ch > 0 && out_ch > 0 && kernel > 0 && stride > 0 && padding >= 0,
                          prefix,
                          " (BackendConv2d): need in_ch, out_ch, kernel, stride >= 1 and "
                          "padding >= 0, got in_ch = ",
                          in_ch, ", out_ch = ", out_ch, ", kernel = ", kernel,
                          ", stride = ", stride, ", padding = ", padding);
    w_ = ps.add(prefix + ".weight", Shape{out_ch, in_ch, kernel, kernel});
    if (bias) b_ = ps.add(prefix + ".bias", Shape{out_ch});
  }

  index_t in_channels() const { return in_; }
  index_t out_channels() const { return out_; }
  index_t kernel() const { return k_; }
  index_t stride() const { return s_; }
  index_t padding() const { return p_; }
  bool has_bias() const { return bias_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }  // -1 without bias
  const std::string& prefix() const { return prefix_; }

  /// The column workspace holds at most this many elements (or one sample's columns, when that
  /// is more). 2^22 by default (16 MiB of floats); a GPU may want more for larger products.
  void set_workspace_limit(index_t elements) {
    require<config_error>(elements >= 1, prefix_,
                          " (BackendConv2d): workspace limit must be >= 1, got ", elements);
    limit_ = elements;
  }
  index_t workspace_limit() const { return limit_; }

  /// nn::Conv2d::init's draws on B: W, b ~ U(+-1/sqrt(in k k)). (For the CPU's exact values
  /// initialise an nn::Conv2d and upload_parameters.)
  void init(Parameters<T, B>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(in_ * k_ * k_));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    if (bias_) fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  /// [N, in, H, W] -> [N, out, Ho, Wo]; throws shape_error for a wrong input.
  Shape output_shape(const Shape& input) const {
    const auto g = geometry(input);
    return Shape{input[0], out_, g.out_h, g.out_w};
  }

  // x: [N, in, H, W] -> y: [N, out, Ho, Wo]
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y,
               Cache& cache) const {
    using namespace spatial_backend_detail;
    const auto g = geometry(x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows();
    detail::check_arg(prefix_, kind, "y", y, Shape{n, out_, g.out_h, g.out_w});
    const index_t G = group_size(n, K, L);
    prepare(cache, G, K, L);
    const View<const T, B> w = cmat<T, B>(ps.param(w_).data(), out_, K);
    const T* b = bias_ ? ps.param(b_).data() : nullptr;
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
      const T* col = columns(x, g, n0, gn, cache);
      T* yn = y.data() + n0 * out_ * L;
      if (gn == 1) {  // the product lands in y directly
        BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), w, cmat<T, B>(col, K, L),
                                        T(0), mat<T, B>(yn, out_, L));
        if (b != nullptr) B::parallel_for(out_ * L, kernels::ChannelBias<T>{yn, b, out_, L});
      } else {
        BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), w,
                                        cmat<T, B>(col, K, cols), T(0),
                                        mat<T, B>(cache.out.data(), out_, cols));
        B::parallel_for(gn * out_ * L,
                        kernels::UnpackBias<T>{yn, cache.out.data(), b, out_, L, gn});
      }
    }
  }

  // x: [N, in, H, W], dy: [N, out, Ho, Wo], dx: [N, in, H, W] (overwritten) or empty / {}
  // (skipped). Parameter gradients accumulate.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy,
                View<T, B> dx, Cache& cache) const {
    using namespace spatial_backend_detail;
    const auto g = geometry(x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows();
    detail::check_arg(prefix_, kind, "dy", dy, Shape{n, out_, g.out_h, g.out_w});
    const bool want_dx = !absent(dx);
    if (want_dx) detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    const index_t G = group_size(n, K, L);
    prepare(cache, G, K, L);
    if (bias_)
      B::segment_reduce(out_, kernels::ChannelGradSum<T>{ps.grad(b_).data(), dy.data(), n, out_, L},
                        n * L);
    const View<const T, B> w = cmat<T, B>(ps.param(w_).data(), out_, K);
    const View<T, B> dw = mat<T, B>(ps.grad(w_).data(), out_, K);
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
      const T* dyg = dy.data() + n0 * out_ * L;
      if (gn > 1) {  // dy of the group as [O, gn L], the columns' layout
        B::parallel_for(out_ * cols, kernels::PackSamples<T>{cache.out.data(), dyg, out_, L, gn});
        dyg = cache.out.data();
      }
      const View<const T, B> dym = cmat<T, B>(dyg, out_, cols);
      const T* col = columns(x, g, n0, gn, cache);
      BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), dym,
                                      cmat<T, B>(col, K, cols), T(1), dw);
      if (!want_dx) continue;
      T* dxn = dx.data() + n0 * g.plane();
      if (g.identity() && gn == 1) {  // col2im is the identity: W^T dy is dx
        BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), w, dym, T(0),
                                        mat<T, B>(dxn, K, cols));
        continue;
      }
      // The columns are no longer needed: their buffer takes dcol = W^T dy.
      T* dcol = cache.col.data();
      BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), w, dym, T(0),
                                      mat<T, B>(dcol, K, cols));
      B::parallel_for(gn * g.plane(), kernels::Col2imGather<T>{dxn, dcol, g, gn}, k_ * k_);
    }
  }

 private:
  static constexpr const char* kind = "BackendConv2d";

  kernels::ConvShape geometry(const Shape& s) const {
    if (s.rank() != 4 || s[0] < 1 || s[1] != in_ || s[2] + 2 * p_ < k_ || s[3] + 2 * p_ < k_)
      fail<shape_error>(prefix_, " (", kind, "): x: expected shape [N, ", in_,
                        ", H, W] with N >= 1 and H, W >= ", std::max<index_t>(1, k_ - 2 * p_),
                        ", got ", s);
    kernels::ConvShape g;
    g.channels = in_;
    g.height = s[2];
    g.width = s[3];
    g.kernel = k_;
    g.stride = s_;
    g.padding = p_;
    g.out_h = (s[2] + 2 * p_ - k_) / s_ + 1;
    g.out_w = (s[3] + 2 * p_ - k_) / s_ + 1;
    return g;
  }

  // Samples per product: as many as the workspace limit allows (at least one).
  index_t group_size(index_t n, index_t K, index_t L) const {
    return std::clamp<index_t>(limit_ / std::max<index_t>(1, K * L), 1, n);
  }

  void prepare(Cache& cache, index_t G, index_t K, index_t L) const {
    spatial_backend_detail::grow(cache.col, K * G * L);
    if (G > 1) spatial_backend_detail::grow(cache.out, out_ * G * L);
  }

  // The column matrix [K, gn L] of samples n0 .. n0 + gn - 1 in cache.col (x itself for a 1x1
  // convolution of one sample).
  const T* columns(View<const T, B> x, const kernels::ConvShape& g, index_t n0, index_t gn,
                   Cache& cache) const {
    const T* xn = x.data() + n0 * g.plane();
    if (g.identity() && gn == 1) return xn;
    B::parallel_for(g.rows() * gn * g.cols(), kernels::Im2col<T>{cache.col.data(), xn, g, gn});
    return cache.col.data();
  }

  std::string prefix_;
  index_t in_, out_, k_, s_, p_;
  bool bias_;
  index_t w_ = -1, b_ = -1;
  index_t limit_ = index_t{1} << 22;
};

// ---------------------------------------------------------------------------------------------
// GroupNorm on B.
// ---------------------------------------------------------------------------------------------

/// nn::GroupNorm on backend B (same constructor, eps default 1e-5, names and shapes), with the
/// SiLU that follows it in a U-Net optionally fused: forward_silu writes y and SiLU(y) in one
/// pass, backward_silu takes the gradient of SiLU(y) and goes through the SiLU first.
template <class T, Backend B>
class BackendGroupNorm {
 public:
  /// The statistics forward keeps for backward, and backward's scratch, on B.
  struct Cache {
    Tensor<T, B> mean, rstd;   // [N G]
    Tensor<double, B> ga, gb;  // [N G]: the input gradient's two means
    Tensor<T, B> dy;           // [N, C, ...]: backward_silu's gradient before the SiLU
  };

  BackendGroupNorm(Parameters<T, B>& ps, const std::string& prefix, index_t groups,
                   index_t channels, T eps = T(1e-5), bool affine = true)
      : prefix_(prefix), g_(groups), c_(channels), eps_(eps), affine_(affine) {
    require<config_error>(groups > 0 && channels > 0 && channels % groups == 0, prefix, " (", kind,
                          "): channels must be a positive multiple of groups, got groups = ",
                          groups, ", channels = ", channels);
    require<config_error>(eps >= T(0), prefix, " (", kind, "): eps must be >= 0, got ", eps);
    if (affine) {
      w_ = ps.add(prefix + ".weight", Shape{channels});
      b_ = ps.add(prefix + ".bias", Shape{channels});
    }
  }

  index_t groups() const { return g_; }
  index_t channels() const { return c_; }
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

  // x: [N, C, ...] -> y: same shape
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, Cache& cache) const {
    run_forward(ps, x, y, View<T, B>{}, cache);
  }

  // x: [N, C, ...] -> y = GN(x) and act = SiLU(y), both of x's shape. y may be empty / {} (not
  // written): the backward_silu without y recomputes it.
  void forward_silu(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, View<T, B> act,
                    Cache& cache) const {
    detail::check_arg(prefix_, kind, "act", act, x.shape());
    run_forward(ps, x, y, act, cache);
  }

  // x, dy: [N, C, ...]; dx: same shape (overwritten) or empty / {} (skipped). Parameter
  // gradients accumulate. Needs the cache of forward() on the same x.
  void backward(Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy, View<T, B> dx,
                Cache& cache) const {
    const Dims d = check(x, dy, "dy");
    detail::check_arg(prefix_, kind, "cache.mean (run forward first)", cache.mean.view(),
                      Shape{d.n * g_});
    const T* gam = nullptr;
    if (affine_) {
      gam = ps.param(w_).data();
      B::segment_reduce(c_,
                        kernels::GroupNormParamGrad<T>{ps.grad(w_).data(), ps.grad(b_).data(),
                                                       x.data(), dy.data(), cache.mean.data(),
                                                       cache.rstd.data(), d.n, c_, g_, d.s},
                        2 * d.n * d.s);
    }
    if (spatial_backend_detail::absent(dx)) return;
    detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    const index_t sets = d.n * g_, cg = c_ / g_;
    if (cache.ga.numel() != sets) cache.ga.resize(Shape{sets});
    if (cache.gb.numel() != sets) cache.gb.resize(Shape{sets});
    B::segment_reduce(
        sets,
        kernels::GroupNormGradMeans<T>{cache.ga.data(), cache.gb.data(), x.data(), dy.data(),
                                       cache.mean.data(), cache.rstd.data(), gam, g_, cg, d.s},
        4 * cg * d.s);
    B::parallel_for(x.numel(),
                    kernels::GroupNormInputGrad<T>{dx.data(), x.data(), dy.data(),
                                                   cache.mean.data(), cache.rstd.data(), gam,
                                                   cache.ga.data(), cache.gb.data(), c_, cg, d.s},
                    6);
  }

  // backward() of act = SiLU(GN(x)): y is forward_silu's y (the SiLU's input), dact the gradient
  // of act; dx as in backward(). The gradient through the SiLU goes to cache.dy first.
  void backward_silu(Parameters<T, B>& ps, View<const T, B> x, View<const T, B> y,
                     View<const T, B> dact, View<T, B> dx, Cache& cache) const {
    check(x, y, "y");
    detail::check_arg(prefix_, kind, "dact", dact, x.shape());
    if (!(cache.dy.shape() == x.shape())) cache.dy.resize(x.shape());
    B::parallel_for(x.numel(), kernels::SiluGradOut<T>{cache.dy.data(), y.data(), dact.data()}, 8);
    backward(ps, x, View<const T, B>(cache.dy.view()), dx, cache);
  }
  // The same without y: y = GN(x) is recomputed from x and the statistics in the cache (the
  // forward's operations, so the same bits), so forward_silu need not keep it.
  void backward_silu(Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dact,
                     View<T, B> dx, Cache& cache) const {
    const Dims d = check(x, dact, "dact");
    detail::check_arg(prefix_, kind, "cache.mean (run forward first)", cache.mean.view(),
                      Shape{d.n * g_});
    if (!(cache.dy.shape() == x.shape())) cache.dy.resize(x.shape());
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    B::parallel_for(x.numel(),
                    kernels::GroupNormSiluGrad<T>{cache.dy.data(), dact.data(), x.data(),
                                                  cache.mean.data(), cache.rstd.data(), gam, bet,
                                                  c_, c_ / g_, d.s},
                    14);
    backward(ps, x, View<const T, B>(cache.dy.view()), dx, cache);
  }

 private:
  static constexpr const char* kind = "BackendGroupNorm";

  struct Dims {
    index_t n, s;  // samples, elements per channel and sample
  };

  template <class U>
  Dims check(View<const T, B> x, View<U, B> other, const char* other_name) const {
    detail::check_arg_axis(prefix_, kind, "x", x, 2, 1, c_, "[N, C, ...]");
    detail::check_arg(prefix_, kind, other_name, other, x.shape());
    const index_t n = x.dim(0);
    return {n, n > 0 ? x.numel() / (n * c_) : 0};
  }

  void run_forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, View<T, B> act,
                   Cache& cache) const {
    const bool no_y = spatial_backend_detail::absent(y) && !spatial_backend_detail::absent(act);
    const Dims d = no_y ? check(x, View<const T, B>(act), "act") : check(x, y, "y");
    const index_t sets = d.n * g_, cg = c_ / g_;
    if (cache.mean.numel() != sets) cache.mean.resize(Shape{sets});
    if (cache.rstd.numel() != sets) cache.rstd.resize(Shape{sets});
    B::segment_reduce(sets,
                      kernels::GroupNormStats<T>{cache.mean.data(), cache.rstd.data(), x.data(),
                                                 cg * d.s, static_cast<double>(eps_)},
                      3 * cg * d.s);
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    T* pa = spatial_backend_detail::absent(act) ? nullptr : act.data();
    B::parallel_for(x.numel(),
                    kernels::GroupNormApply<T>{no_y ? nullptr : y.data(), pa, x.data(),
                                               cache.mean.data(), cache.rstd.data(), gam, bet,
                                               c_, cg, d.s},
                    pa != nullptr ? 12 : 3);
  }

  std::string prefix_;
  index_t g_, c_;
  T eps_;
  bool affine_;
  index_t w_ = -1, b_ = -1;
};

// ---------------------------------------------------------------------------------------------
// BatchNorm2d on B.
// ---------------------------------------------------------------------------------------------

/// nn::BatchNorm2d on backend B (same constructor, eps 1e-5 and momentum 0.1 by default, names,
/// shapes and registration order: prefix.weight, prefix.bias, then the buffers
/// prefix.running_mean and prefix.running_var, all [C]), so checkpoints and
/// nn::upload_parameters move the running statistics with the weights. Training mode (the default)
/// normalises with the batch's statistics and, through the non-const forward, updates the running
/// ones; eval mode normalises with the running statistics. Backward uses the statistics its
/// matching forward left in the cache.
template <class T, Backend B>
class BackendBatchNorm2d {
 public:
  /// The statistics the last forward normalised with and backward's per-channel means, on B.
  struct Cache {
    Tensor<T, B> mean, inv_std;  // [C]
    Tensor<double, B> ga, gb;    // [C]: mean dy, mean dy xh
  };

  /// Registers prefix.weight, prefix.bias, prefix.running_mean, prefix.running_var, all [C].
  BackendBatchNorm2d(Parameters<T, B>& ps, const std::string& prefix, index_t channels,
                     T eps = T(1e-5), T momentum = T(0.1))
      : prefix_(prefix), c_(channels), eps_(eps), momentum_(momentum) {
    detail::check_batchnorm_config(prefix, kind, channels, eps, momentum);
    w_ = ps.add(prefix + ".weight", Shape{channels});
    b_ = ps.add(prefix + ".bias", Shape{channels});
    rm_ = ps.add_buffer(prefix + ".running_mean", Shape{channels});
    rv_ = ps.add_buffer(prefix + ".running_var", Shape{channels});
  }

  index_t channels() const { return c_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }
  index_t running_mean_id() const { return rm_; }
  index_t running_var_id() const { return rv_; }
  const std::string& prefix() const { return prefix_; }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// PyTorch's default: gamma = 1, beta = 0, running_mean = 0, running_var = 1.
  void init(Parameters<T, B>& ps, Generator&) const {
    fill(ps.param(w_), T(1));
    fill(ps.param(b_), T(0));
    fill(ps.param(rm_), T(0));
    fill(ps.param(rv_), T(1));
  }

  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4 || s[1] != c_)
      fail<shape_error>(prefix_, " (", kind, "): x: expected shape [N, ", c_, ", H, W], got ", s);
    return s;
  }

  /// x: [N, C, H, W] -> y: like x. In training mode also updates the running statistics.
  void forward(Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, Cache& cache) const {
    run_forward(ps, x, y, cache, ps.param(rm_).data(), ps.param(rv_).data());
  }
  /// Read-only parameters: eval mode, or training mode without the running-statistics update
  /// (as nn::BatchNorm2d's const overload).
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, Cache& cache) const {
    run_forward(ps, x, y, cache, nullptr, nullptr);
  }

  // x, dy: [N, C, H, W]; dx: like x (overwritten) or empty / {} (skipped). Parameter gradients
  // accumulate.
  void backward(Parameters<T, B>& ps, View<const T, B> x, View<const T, B> dy, View<T, B> dx,
                Cache& cache) const {
    output_shape(x.shape());
    detail::check_arg(prefix_, kind, "dy", dy, x.shape());
    const bool want_dx = !spatial_backend_detail::absent(dx);
    if (want_dx) detail::check_arg(prefix_, kind, "dx", dx, x.shape());
    require<config_error>(cache.mean.numel() == c_, prefix_, " (", kind,
                          "): backward needs the cache of a forward call");
    const index_t n = x.dim(0), L = x.dim(2) * x.dim(3);
    if (cache.ga.numel() != c_) cache.ga.resize(Shape{c_});
    if (cache.gb.numel() != c_) cache.gb.resize(Shape{c_});
    B::segment_reduce(c_,
                      kernels::BatchNormParamGrad<T>{ps.grad(w_).data(), ps.grad(b_).data(),
                                                     cache.ga.data(), cache.gb.data(), x.data(),
                                                     dy.data(), cache.mean.data(),
                                                     cache.inv_std.data(), n, c_, L},
                      2 * n * L);
    if (!want_dx) return;
    B::parallel_for(x.numel(),
                    kernels::BatchNormInputGrad<T>{dx.data(), x.data(), dy.data(),
                                                   cache.mean.data(), cache.inv_std.data(),
                                                   ps.param(w_).data(), cache.ga.data(),
                                                   cache.gb.data(), c_, L, training_},
                    6);
  }

 private:
  static constexpr const char* kind = "BackendBatchNorm2d";

  // rm_out / rv_out: the running statistics to update (training only), or null.
  void run_forward(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> y, Cache& cache,
                   T* rm_out, T* rv_out) const {
    output_shape(x.shape());
    detail::check_arg(prefix_, kind, "y", y, x.shape());
    const index_t n = x.dim(0), L = x.dim(2) * x.dim(3);
    require<config_error>(!training_ || n * L > 1, prefix_, " (", kind,
                          "): training needs more than one value per channel, got input shape ",
                          x.shape());
    if (cache.mean.numel() != c_) {
      cache.mean.resize(Shape{c_});
      cache.inv_std.resize(Shape{c_});
    }
    const bool update = training_ && rm_out != nullptr;
    B::segment_reduce(c_,
                      kernels::BatchNormStats<T>{cache.mean.data(), cache.inv_std.data(),
                                                 update ? rm_out : nullptr,
                                                 update ? rv_out : nullptr, x.data(),
                                                 ps.param(rm_).data(), ps.param(rv_).data(), n, c_,
                                                 L, eps_, momentum_, training_},
                      3 * n * L);
    B::parallel_for(x.numel(),
                    kernels::BatchNormApply<T>{y.data(), x.data(), cache.mean.data(),
                                               cache.inv_std.data(), ps.param(w_).data(),
                                               ps.param(b_).data(), c_, L},
                    3);
  }

  std::string prefix_;
  index_t c_;
  T eps_, momentum_;
  bool training_ = true;
  index_t w_ = -1, b_ = -1, rm_ = -1, rv_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Nearest upsampling on B.
// ---------------------------------------------------------------------------------------------

/// nn::UpsampleNearest2d on backend B: nearest-neighbour upsampling by an integer factor (2 in a
/// U-Net). No parameters.
template <class T, Backend B>
class BackendUpsampleNearest2d {
 public:
  explicit BackendUpsampleNearest2d(index_t factor = 2, std::string name = "upsample")
      : f_(factor), name_(std::move(name)) {
    require<config_error>(factor >= 1, name_, " (", kind, "): factor must be >= 1, got ", factor);
  }

  index_t factor() const { return f_; }

  /// [N, C, H, W] -> [N, C, H f, W f]
  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4)
      fail<shape_error>(name_, " (", kind, "): x: expected shape [N, C, H, W], got ", s);
    return Shape{s[0], s[1], s[2] * f_, s[3] * f_};
  }

  // x: [N, C, H, W] -> y: [N, C, H f, W f]
  void forward(View<const T, B> x, View<T, B> y) const {
    detail::check_arg(name_, kind, "y", y, output_shape(x.shape()));
    B::parallel_for(y.numel(),
                    kernels::UpsampleNearest<T>{y.data(), x.data(), x.dim(2), x.dim(3), f_});
  }

  // x: [N, C, H, W] (for its shape), dy: [N, C, H f, W f], dx: [N, C, H, W] (overwritten) or
  // empty / {} (skipped)
  void backward(View<const T, B> x, View<const T, B> dy, View<T, B> dx) const {
    detail::check_arg(name_, kind, "dy", dy, output_shape(x.shape()));
    if (spatial_backend_detail::absent(dx)) return;
    detail::check_arg(name_, kind, "dx", dx, x.shape());
    B::parallel_for(dx.numel(),
                    kernels::UpsampleNearestGrad<T>{dx.data(), dy.data(), x.dim(2), x.dim(3), f_},
                    f_ * f_);
  }

 private:
  static constexpr const char* kind = "BackendUpsampleNearest2d";
  index_t f_;
  std::string name_;
};

// ---------------------------------------------------------------------------------------------
// Average pooling on B.
// ---------------------------------------------------------------------------------------------

/// nn::AvgPool2d on backend B: kernel = stride = k (2 in the classifier), no padding, rows and
/// columns past the last full window dropped (Ho = floor(H / k)). No parameters. The same
/// additions in the same order as the CPU layer, so the results are bit-equal to it.
template <class T, Backend B>
class BackendAvgPool2d {
 public:
  explicit BackendAvgPool2d(index_t kernel = 2, std::string name = "avg_pool2d")
      : k_(kernel), name_(std::move(name)) {
    require<config_error>(kernel >= 1, name_, " (", kind, "): kernel must be >= 1, got ", kernel);
  }

  index_t kernel() const { return k_; }

  /// [N, C, H, W] -> [N, C, H / k, W / k]
  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4 || s[2] < k_ || s[3] < k_)
      fail<shape_error>(name_, " (", kind, "): x: expected shape [N, C, H, W] with H, W >= ", k_,
                        ", got ", s);
    return Shape{s[0], s[1], s[2] / k_, s[3] / k_};
  }

  // x: [N, C, H, W] -> y: [N, C, H / k, W / k]
  void forward(View<const T, B> x, View<T, B> y) const {
    detail::check_arg(name_, kind, "y", y, output_shape(x.shape()));
    B::parallel_for(y.numel(), kernels::AvgPoolForward<T>{y.data(), x.data(), x.dim(2), x.dim(3),
                                                          k_, inv()},
                    k_ * k_);
  }

  // x: [N, C, H, W] (for its shape), dy: [N, C, H / k, W / k], dx: like x (overwritten) or empty
  // / {} (skipped)
  void backward(View<const T, B> x, View<const T, B> dy, View<T, B> dx) const {
    detail::check_arg(name_, kind, "dy", dy, output_shape(x.shape()));
    if (spatial_backend_detail::absent(dx)) return;
    detail::check_arg(name_, kind, "dx", dx, x.shape());
    B::parallel_for(dx.numel(), kernels::AvgPoolBackward<T>{dx.data(), dy.data(), x.dim(2),
                                                            x.dim(3), k_, inv()});
  }

 private:
  static constexpr const char* kind = "BackendAvgPool2d";
  T inv() const { return T(1) / static_cast<T>(k_ * k_); }
  index_t k_;
  std::string name_;
};

// ---------------------------------------------------------------------------------------------
// Per-channel broadcast (a U-Net block's conditioning) and its backward; element-wise add.
// ---------------------------------------------------------------------------------------------

// y: [N, C, H, W] += v: [N, C] broadcast over H, W.
template <class T, Backend B>
void add_per_channel(View<T, B> y, View<const T, B> v) {
  if (y.rank() != 4)
    fail<shape_error>("add_per_channel: y: expected shape [N, C, H, W], got ", y.shape());
  detail::check_arg("add_per_channel", "broadcast", "v", v, Shape{y.dim(0), y.dim(1)});
  const index_t len = y.dim(2) * y.dim(3);
  B::parallel_for(y.numel(), kernels::AddPerChannel<T>{y.data(), v.data(), len});
}

// dv: [N, C] = sum over H, W of dy: [N, C, H, W] (overwritten): add_per_channel's backward.
template <class T, Backend B>
void sum_per_channel(View<const T, B> dy, View<T, B> dv) {
  if (dy.rank() != 4)
    fail<shape_error>("sum_per_channel: dy: expected shape [N, C, H, W], got ", dy.shape());
  detail::check_arg("sum_per_channel", "broadcast", "dv", dv, Shape{dy.dim(0), dy.dim(1)});
  const index_t len = dy.dim(2) * dy.dim(3);
  B::parallel_for(dv.numel(), kernels::SumPerChannel<T>{dv.data(), dy.data(), len}, len);
}

// a += b, same shape.
template <class T, Backend B>
void add_in_place(View<T, B> a, View<const T, B> b) {
  detail::check_arg("add_in_place", "element-wise", "b", b, a.shape());
  B::parallel_for(a.numel(), kernels::AddInPlace<T>{a.data(), b.data()});
}

}  // namespace flowdiff::nn
