// flowdiff/nn/layers/norm.hpp — LayerNorm and GroupNorm, as torch.nn.LayerNorm /
// torch.nn.GroupNorm. Both normalise a set S of elements (LayerNorm: the last axis of one row;
// GroupNorm: the C/G channels of one group of one sample, with all their spatial positions) with
// the biased variance, then apply a per-channel affine map:
//   forward   mu = mean_S x,  rstd = 1/sqrt(mean_S (x - mu)^2 + eps),  xh = (x - mu) rstd,
//             y = gamma_c xh + beta_c
//   backward  dgamma_c += sum dy xh,  dbeta_c += sum dy   (over every element of channel c)
//             g = dy gamma_c,  dx = rstd (g - mean_S g - xh mean_S(g xh))
// The forward pass stores mu and rstd per set in the caller's Cache (resized on demand; no
// allocation while the batch shape is unchanged); backward needs that cache and the same x.
// Parameters: prefix + ".weight" (gamma, starts at 1) and prefix + ".bias" (beta, starts at 0),
// both [C], only when `affine`.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace detail {

/// Number of independent partial sums in lane_sums: one AVX-512 register of floats.
inline constexpr int sum_lanes = 16;

/// (sum_i f(i), sum_i g(i)) over i in [0, k) in a fixed order that does not depend on the
/// instruction set: element i goes to lane i % 16 (each lane adds its elements in order), then
/// the 16 lanes are combined pairwise (lane l += lane l + w for w = 8, 4, 2, 1). The lanes are
/// independent, so the compiler keeps them in vector registers (one zmm, two ymm or four xmm)
/// with the same bits in every case; a single running sum would be one serial chain of adds
/// (4 cycles each). Inline into the caller, which vector_loop may compile for AVX2 / AVX-512.
template <class T, class F, class G>
FLOWDIFF_ALWAYS_INLINE void lane_sums(index_t k, F f, G g, T& sum_f, T& sum_g) {
  constexpr int W = sum_lanes;
  T af[W], ag[W];
  for (int l = 0; l < W; ++l) af[l] = ag[l] = T(0);
  index_t i = 0;
  for (; i + W <= k; i += W)
    for (int l = 0; l < W; ++l) {
      af[l] += f(i + l);
      ag[l] += g(i + l);
    }
  for (int l = 0; i + l < k; ++l) {
    af[l] += f(i + l);
    ag[l] += g(i + l);
  }
  for (int w = W / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) {
      af[l] += af[l + w];
      ag[l] += ag[l + w];
    }
  sum_f = af[0];
  sum_g = ag[0];
}

/// sum_i f(i) over [0, k) in lane_sums' fixed order.
template <class T, class F>
FLOWDIFF_ALWAYS_INLINE T lane_sum(index_t k, F f) {
  constexpr int W = sum_lanes;
  T a[W];
  for (int l = 0; l < W; ++l) a[l] = T(0);
  index_t i = 0;
  for (; i + W <= k; i += W)
    for (int l = 0; l < W; ++l) a[l] += f(i + l);
  for (int l = 0; i + l < k; ++l) a[l] += f(i + l);
  for (int w = W / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}

/// Mean and 1/sqrt(biased variance + eps) of x[0..k), two-pass (no cancellation of sum x^2),
/// each sum in lane_sum's fixed order.
template <class T>
FLOWDIFF_ALWAYS_INLINE void moments(const T* x, index_t k, T eps, T& mean, T& rstd) {
  const T s = lane_sum<T>(k, [x](index_t i) FLOWDIFF_LAMBDA_INLINE { return x[i]; });
  const T mu = s / static_cast<T>(k);
  const T v = lane_sum<T>(k, [x, mu](index_t i) FLOWDIFF_LAMBDA_INLINE {
    return (x[i] - mu) * (x[i] - mu);
  });
  mean = mu;
  rstd = T(1) / std::sqrt(v / static_cast<T>(k) + eps);
}

/// f(r) for r in [0, m) over the threads (Cpu::parallel_for with `work` per item), each call
/// compiled for the widest vector instruction set of the CPU (simd::vector_loop); f must be
/// marked FLOWDIFF_LAMBDA_INLINE.
template <class F>
void vector_rows(index_t m, index_t work, F f) {
  Cpu::parallel_for(
      m,
      [=](index_t r) {
        simd::vector_loop(
            [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
              for (index_t i = lo; i < hi; ++i) f(i);
            },
            r, r + 1);
      },
      work);
}

/// Statistics a normalisation layer keeps between forward and backward.
template <class T>
struct NormCache {
  Tensor<T> mean, rstd;  // [number of normalised sets]
  void ensure(index_t n) {
    if (mean.numel() != n) mean.resize(Shape{n});
    if (rstd.numel() != n) rstd.resize(Shape{n});
  }
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last axis: x [..., C], statistics per row.
// ---------------------------------------------------------------------------------------------
template <class T>
class LayerNorm {
 public:
  using Cache = detail::NormCache<T>;

  LayerNorm(Parameters<T>& ps, const std::string& prefix, index_t features, T eps = T(1e-5),
            bool affine = true)
      : prefix_(prefix), c_(features), eps_(eps), affine_(affine) {
    require<config_error>(features > 0, prefix, " (LayerNorm): features must be >= 1, got ",
                          features);
    require<config_error>(eps >= T(0), prefix, " (LayerNorm): eps must be >= 0, got ", eps);
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

  /// gamma = 1, beta = 0 (PyTorch's init; the generator is unused and kept for a uniform API).
  void init(Parameters<T>& ps, Generator&) const {
    if (!affine_) return;
    fill(ps.param(w_), T(1));
    fill(ps.param(b_), T(0));
  }

  // x: [..., C] -> y: same shape
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    const index_t m = check(x, y, "y");
    cache.ensure(m);
    const T* px = x.data();
    T* py = y.data();
    T* mean = cache.mean.data();
    T* rstd = cache.rstd.data();
    const T* g = affine_ ? ps.param(w_).data() : nullptr;
    const T* b = affine_ ? ps.param(b_).data() : nullptr;
    const index_t c = c_;
    const T eps = eps_;
    detail::vector_rows(
        m, 4 * c,
        [=](index_t r) FLOWDIFF_LAMBDA_INLINE {
          const T* xr = px + r * c;
          T* yr = py + r * c;
          detail::moments(xr, c, eps, mean[r], rstd[r]);
          const T mu = mean[r], rs = rstd[r];
          if (g) {
            for (index_t j = 0; j < c; ++j) yr[j] = (xr[j] - mu) * rs * g[j] + b[j];
          } else {
            for (index_t j = 0; j < c; ++j) yr[j] = (xr[j] - mu) * rs;
          }
        });
  }

  // x, dy: [..., C]; dx: same shape or empty. Parameter gradients accumulate.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                const Cache& cache) const {
    const index_t m = check(x, dy, "dy");
    detail::check_arg(prefix_, "LayerNorm", "cache.mean (run forward first)", cache.mean.view(),
                      Shape{m});
    const T* px = x.data();
    const T* pdy = dy.data();
    const T* mean = cache.mean.data();
    const T* rstd = cache.rstd.data();
    const index_t c = c_;
    const T* g = nullptr;
    if (affine_) {
      g = ps.param(w_).data();
      // Row by row into the [C] accumulators: contiguous inner loops; rows are few.
      T* dg = ps.grad(w_).data();
      T* db = ps.grad(b_).data();
      for (index_t r = 0; r < m; ++r) {
        const T* xr = px + r * c;
        const T* gr = pdy + r * c;
        const T mu = mean[r], rs = rstd[r];
        for (index_t j = 0; j < c; ++j) {
          dg[j] += gr[j] * (xr[j] - mu) * rs;
          db[j] += gr[j];
        }
      }
    }
    if (dx.empty()) return;
    detail::check_arg(prefix_, "LayerNorm", "dx", dx, x.shape());
    T* pdx = dx.data();
    detail::vector_rows(
        m, 6 * c,
        [=](index_t r) FLOWDIFF_LAMBDA_INLINE {
          const T* xr = px + r * c;
          const T* gr = pdy + r * c;
          T* dxr = pdx + r * c;
          const T mu = mean[r], rs = rstd[r];
          T a, bsum;
          detail::lane_sums<T>(
              c,
              [=](index_t j) FLOWDIFF_LAMBDA_INLINE { return g ? gr[j] * g[j] : gr[j]; },
              [=](index_t j) FLOWDIFF_LAMBDA_INLINE {
                return (g ? gr[j] * g[j] : gr[j]) * (xr[j] - mu) * rs;
              },
              a, bsum);
          a /= static_cast<T>(c);
          bsum /= static_cast<T>(c);
          for (index_t j = 0; j < c; ++j) {
            const T gh = g ? gr[j] * g[j] : gr[j];
            dxr[j] = rs * (gh - a - (xr[j] - mu) * rs * bsum);
          }
        });
  }

 private:
  index_t check(View<const T> x, View<const T> other, const char* other_name) const {
    detail::check_arg_axis(prefix_, "LayerNorm", "x", x, 1, -1, c_, "[..., C]");
    detail::check_arg(prefix_, "LayerNorm", other_name, other, x.shape());
    return x.numel() / c_;
  }

  std::string prefix_;
  index_t c_;
  T eps_;
  bool affine_;
  index_t w_ = -1, b_ = -1;
};

// ---------------------------------------------------------------------------------------------
// GroupNorm: x [N, C, ...] (e.g. [N, C, H, W] or [N, C]), statistics per (sample, group).
// ---------------------------------------------------------------------------------------------
template <class T>
class GroupNorm {
 public:
  using Cache = detail::NormCache<T>;

  GroupNorm(Parameters<T>& ps, const std::string& prefix, index_t groups, index_t channels,
            T eps = T(1e-5), bool affine = true)
      : prefix_(prefix), g_(groups), c_(channels), eps_(eps), affine_(affine) {
    require<config_error>(groups > 0 && channels > 0 && channels % groups == 0, prefix,
                          " (GroupNorm): channels must be a positive multiple of groups, got "
                          "groups = ",
                          groups, ", channels = ", channels);
    require<config_error>(eps >= T(0), prefix, " (GroupNorm): eps must be >= 0, got ", eps);
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

  /// gamma = 1, beta = 0 (PyTorch's init).
  void init(Parameters<T>& ps, Generator&) const {
    if (!affine_) return;
    fill(ps.param(w_), T(1));
    fill(ps.param(b_), T(0));
  }

  // x: [N, C, ...] -> y: same shape
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    forward_impl(ps, x, y, View<T>(), cache);
  }
  /// forward() and act = SiLU(y) in the same pass (y bit for bit as forward(), act as
  /// silu_forward(y, act) would give), for a norm followed by SiLU: one pass over memory less.
  /// y may be empty (not written) when only act is needed: backward_silu recomputes y itself.
  void forward_silu(const Parameters<T>& ps, View<const T> x, View<T> y, View<T> act,
                    Cache& cache) const {
    check(x, act, "act");
    forward_impl(ps, x, y, act, cache);
  }

 private:
  void forward_impl(const Parameters<T>& ps, View<const T> x, View<T> y, View<T> act,
                    Cache& cache) const {
    if (act.empty() || !y.empty()) check(x, y, "y");
    const index_t n = x.dim(0), s = x.row_size() / c_, cg = c_ / g_, k = cg * s;
    cache.ensure(n * g_);
    const T* px = x.data();
    T* py = y.empty() ? nullptr : y.data();
    T* pz = act.empty() ? nullptr : act.data();
    T* mean = cache.mean.data();
    T* rstd = cache.rstd.data();
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    const index_t groups = g_;
    const T eps = eps_;
    // Sets (n, g) are contiguous blocks of k = (C/G) * spatial elements.
    detail::vector_rows(
        n * groups, 4 * k,
        [=](index_t ng) FLOWDIFF_LAMBDA_INLINE {
          const T* xb = px + ng * k;
          detail::moments(xb, k, eps, mean[ng], rstd[ng]);
          normalise_set(xb, py ? py + ng * k : nullptr, pz ? pz + ng * k : nullptr, mean[ng],
                        rstd[ng], gam, bet, (ng % groups) * cg, cg, s);
        });
  }

 public:

  /// forward() again from the statistics it left in `cache` (no reduction): y = GN(x) with
  /// the same bits, and, when `act` is not empty, act = SiLU(y) in the same pass (as
  /// silu_forward would give). For recomputing activations in backward instead of keeping them.
  /// y may be empty (not written) when act is not.
  void recompute(const Parameters<T>& ps, View<const T> x, View<T> y, View<T> act,
                 const Cache& cache) const {
    if (act.empty() || !y.empty()) check(x, y, "y");
    if (!act.empty()) check(x, act, "act");
    const index_t n = x.dim(0), s = x.row_size() / c_, cg = c_ / g_, k = cg * s;
    detail::check_arg(prefix_, "GroupNorm", "cache.mean (run forward first)", cache.mean.view(),
                      Shape{n * g_});
    const T* px = x.data();
    T* py = y.empty() ? nullptr : y.data();
    T* pz = act.empty() ? nullptr : act.data();
    const T* mean = cache.mean.data();
    const T* rstd = cache.rstd.data();
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    const index_t groups = g_;
    detail::vector_rows(
        n * groups, 3 * k,
        [=](index_t ng) FLOWDIFF_LAMBDA_INLINE {
          normalise_set(px + ng * k, py ? py + ng * k : nullptr, pz ? pz + ng * k : nullptr,
                        mean[ng], rstd[ng], gam, bet, (ng % groups) * cg, cg, s);
        });
  }

  // x, dy: [N, C, ...]; dx: same shape or empty. Parameter gradients accumulate.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                const Cache& cache) const {
    backward_impl(ps, x, dy.data(), nullptr, nullptr, dx, cache);
  }
  /// backward() for a norm followed by SiLU, act = SiLU(y) with y = pre (what forward wrote):
  /// dact, the gradient w.r.t. act, is overwritten with the gradient w.r.t. y, SiLU'(y) dact (as
  /// silu_backward(pre, dact, dact) would leave it), one channel at a time inside the norm's own
  /// pass while the channel is in L1, and backward() follows from it. One pass over memory less.
  void backward_through_silu(Parameters<T>& ps, View<const T> x, View<const T> pre,
                             View<T> dact, View<T> dx, const Cache& cache) const {
    check(x, pre, "pre");
    check(x, dact, "dact");
    require<shape_error>(dact.data() != dx.data() || dx.empty(), prefix_,
                         " (GroupNorm): backward_through_silu: dact and dx must be different "
                         "arrays");
    backward_impl(ps, x, dact.data(), dact.data(), pre.data(), dx, cache);
  }
  /// backward_through_silu without `pre` and without writing to dact: each set's y = GN(x) is
  /// recomputed from x and the statistics in `cache` (normalise_set's expression: forward's
  /// bits) and SiLU'(y) dact goes to a per-thread scratch the size of one set, which stays in
  /// the cache. The same results bit for bit, with two streams over memory less (no y to read,
  /// no dact written back), and forward_silu / recompute need not keep y at all.
  /// With `residual` (x's shape, not dx's storage), dx = that gradient + residual in the same
  /// pass (bit for bit a separate add: a residual block's identity path, one pass over memory
  /// less).
  void backward_silu(Parameters<T>& ps, View<const T> x, View<const T> dact, View<T> dx,
                     const Cache& cache, View<const T> residual = {}) const {
    check(x, dact, "dact");
    if (!residual.empty()) {
      check(x, residual, "residual");
      require<shape_error>(!dx.empty() && residual.data() != dx.data(), prefix_,
                           " (GroupNorm): backward_silu: a residual needs dx, in another array");
    }
    backward_impl(ps, x, dact.data(), nullptr, nullptr, dx, cache, /*silu_of_x=*/true,
                  residual.empty() ? nullptr : residual.data());
  }

 private:
  // dy: the gradient w.r.t. y; when pre is given, dyw (== dy, writable) holds the gradient
  // w.r.t. SiLU(y) on entry and is turned into dy channel by channel first. silu_of_x: dy holds
  // the gradient w.r.t. SiLU(y) and y is recomputed from x; SiLU'(y) dy goes to a scratch set.
  void backward_impl(Parameters<T>& ps, View<const T> x, const T* pdy_in, T* dyw,
                     const T* ppre, View<T> dx, const Cache& cache,
                     bool silu_of_x = false, const T* pres = nullptr) const {
    const View<const T> dy(pdy_in, x.shape());
    check(x, dy, "dy");
    const index_t n = x.dim(0), s = x.row_size() / c_, cg = c_ / g_, k = cg * s;
    detail::check_arg(prefix_, "GroupNorm", "cache.mean (run forward first)", cache.mean.view(),
                      Shape{n * g_});
    const T* px = x.data();
    const T* pdy = dy.data();
    const T* mean = cache.mean.data();
    const T* rstd = cache.rstd.data();
    const index_t c = c_, groups = g_;
    const T* gam = affine_ ? ps.param(w_).data() : nullptr;
    const bool want_dx = !dx.empty();
    if (want_dx) detail::check_arg(prefix_, "GroupNorm", "dx", dx, x.shape());
    if (!affine_ && !want_dx) return;
    // One pass over each set (n, g) reads x and dy once: per channel the sums of dy and of
    // dy xhat (lane_sums' order), from which the set's dx follows, and which are kept per
    // (sample, channel) for dgamma / dbeta (summed over the samples in order afterwards: the
    // same sums as a pass per channel would make, without reading x and dy a second time).
    std::vector<T> sums(affine_ ? static_cast<std::size_t>(2 * n * c) : 0);
    T* sdy = affine_ ? sums.data() : nullptr;
    T* sdxh = affine_ ? sums.data() + n * c : nullptr;
    T* pdx = want_dx ? dx.data() : nullptr;
    const T* bet = affine_ ? ps.param(b_).data() : nullptr;
    detail::vector_rows(
        n * groups, (want_dx ? 6 : 3) * k,
        [=](index_t ng) FLOWDIFF_LAMBDA_INLINE {
          const T* xb = px + ng * k;
          const T* gb = pdy + ng * k;
          const T mu = mean[ng], rs = rstd[ng];
          const index_t c0 = (ng % groups) * cg, row = (ng / groups) * c + c0;
          T* const scratch = silu_of_x ? set_scratch(k) : nullptr;
          if (silu_of_x) gb = scratch;
          T a = 0, bsum = 0;
          for (index_t ci = 0; ci < cg; ++ci) {  // per channel in lane order, then channel order
            const T gm = gam ? gam[c0 + ci] : T(1);
            const T* gc = gb + ci * s;
            const T* xc = xb + ci * s;
            if (ppre) {  // dy = SiLU'(pre) dact for this channel, in place
              T* gw = dyw + ng * k + ci * s;
              const T* pc = ppre + ng * k + ci * s;
              for (index_t j = 0; j < s; ++j) gw[j] = detail::silu_bwd(pc[j], gw[j]);
            } else if (silu_of_x) {  // dy = SiLU'(y) dact with y as normalise_set computes it
              const T scale = gam ? rs * gam[c0 + ci] : rs;
              const T shift = gam ? bet[c0 + ci] - mu * scale : -mu * scale;
              const T* dc = pdy + ng * k + ci * s;
              T* sc = scratch + ci * s;
              for (index_t j = 0; j < s; ++j)
                sc[j] = detail::silu_bwd(xc[j] * scale + shift, dc[j]);
            }
            T pa, pb;
            detail::lane_sums<T>(
                s, [=](index_t j) FLOWDIFF_LAMBDA_INLINE { return gc[j]; },
                [=](index_t j) FLOWDIFF_LAMBDA_INLINE { return gc[j] * (xc[j] - mu) * rs; }, pa,
                pb);
            if (sdy) {
              sdy[row + ci] = pa;
              sdxh[row + ci] = pb;
            }
            a += gm * pa;
            bsum += gm * pb;
          }
          if (!pdx) return;
          a /= static_cast<T>(k);
          bsum /= static_cast<T>(k);
          T* dxb = pdx + ng * k;
          const T* rb = pres ? pres + ng * k : nullptr;
          for (index_t ci = 0; ci < cg; ++ci) {
            const T gm = gam ? gam[c0 + ci] : T(1);
            if (rb) {  // (the dispatched loops do not contract: the bits of a separate add)
              for (index_t j = ci * s; j < (ci + 1) * s; ++j)
                dxb[j] = rs * (gb[j] * gm - a - (xb[j] - mu) * rs * bsum) + rb[j];
            } else {
              for (index_t j = ci * s; j < (ci + 1) * s; ++j)
                dxb[j] = rs * (gb[j] * gm - a - (xb[j] - mu) * rs * bsum);
            }
          }
        });
    if (affine_) {
      T* dg = ps.grad(w_).data();
      T* db = ps.grad(b_).data();
      for (index_t ch = 0; ch < c; ++ch) {  // per channel, the samples in order
        T sg = 0, sb = 0;
        for (index_t i = 0; i < n; ++i) {
          sg += sdxh[i * c + ch];
          sb += sdy[i * c + ch];
        }
        dg[ch] += sg;
        db[ch] += sb;
      }
    }
  }

 private:
  // The calling thread's scratch of at least n elements (grown on demand, kept: backward_silu
  // needs one set's worth per call, and allocating it per set would cost more than the set).
  static T* set_scratch(index_t n) {
    thread_local std::vector<T> buf;
    if (static_cast<index_t>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
    return buf.data();
  }

  // One set (sample, group) of cg channels of s elements: y = x a + b per channel with
  // a = rstd gamma, b = beta - mean a; z = SiLU(y) too when z is not null. forward() and
  // recompute() share it, so their y bits agree by construction.
  FLOWDIFF_ALWAYS_INLINE static void normalise_set(const T* xb, T* yb, T* zb, T mu, T rs,
                                                   const T* gam, const T* bet, index_t c0,
                                                   index_t cg, index_t s) {
    for (index_t ci = 0; ci < cg; ++ci) {
      const T a = gam ? rs * gam[c0 + ci] : rs;
      const T b = gam ? bet[c0 + ci] - mu * a : -mu * a;
      if (zb && yb) {
        for (index_t j = ci * s; j < (ci + 1) * s; ++j) {
          const T v = xb[j] * a + b;
          yb[j] = v;
          zb[j] = detail::silu_fwd(v);
        }
      } else if (zb) {
        for (index_t j = ci * s; j < (ci + 1) * s; ++j) zb[j] = detail::silu_fwd(xb[j] * a + b);
      } else {
        for (index_t j = ci * s; j < (ci + 1) * s; ++j) yb[j] = xb[j] * a + b;
      }
    }
  }

  void check(View<const T> x, View<const T> other, const char* other_name) const {
    detail::check_arg_axis(prefix_, "GroupNorm", "x", x, 2, 1, c_, "[N, C, ...]");
    detail::check_arg(prefix_, "GroupNorm", other_name, other, x.shape());
  }

  std::string prefix_;
  index_t g_, c_;
  T eps_;
  bool affine_;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
