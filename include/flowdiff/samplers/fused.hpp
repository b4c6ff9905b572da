// flowdiff/samplers/fused.hpp — fused sampler updates on any backend: the classifier-free
// guidance combination (DESIGN.md §1)
//   u~ = (1 - w) u(x|∅) + w u(x|y)
// and the step that uses it, in one pass that reads x, u(x|y), u(x|∅) once and writes x once:
//   Euler:           x <- x + h u~
//   Euler–Maruyama:  x <- x + h (u~ + sigma^2/2 s) + sigma sqrt(h) xi,
//                    s = cx x + cu u~ (the score from the velocity: paths/convert.hpp),
//                    xi ~ N(0, I)
// with xi drawn inside the pass from the generator's next stream with fill_normal's counter
// mapping (element j of sample i from Philox block (j / per_block, i)). Each element's arithmetic
// is written in the order of the unfused path it replaces — Cfg's combination (guidance/cfg.hpp),
// then Euler's or EulerMaruyama's update (samplers/ode.hpp, sde.hpp) — and the generator advances
// as there (one stream per stochastic step, none for sigma = 0): on the CPU the fused step gives
// the unfused step's bits, on a GPU the same values to rounding (nvcc contracts into FMAs).
// The per-element work is a FLOWDIFF_HOST_DEVICE functor run by B::parallel_for: one kernel on
// the CUDA backend, an OpenMP loop on the CPU.
//
// Euler and EulerMaruyama (with the score from the velocity) call these themselves when the field
// is a Cfg whose combination is a plain blend (Cfg::evaluate_halves): integrate(Euler{},
// cfg(field, w), x, grid) is fused without asking. Not fused: CFG rescale (a per-sample reduction
// first), w = 0 or 1 (one half is evaluated), separate score fields, other guidance adapters.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// The scalars of one fused step: x <- x + h (u~ + half_s2 (cx x + cu u~)) + noise xi, with
/// u~ = wu u_null + wc u_cond.
template <class T>
struct FusedStep {
  T wc = 1, wu = 0;               ///< CFG weights w and 1 - w
  T h = 0;                        ///< step size
  T half_s2 = 0, cx = 0, cu = 0;  ///< sigma^2 / 2 and the velocity -> score coefficients
  T noise = 0;                    ///< sigma sqrt(h)
};

namespace fused_kernels {

/// One element per index: the deterministic (Euler) form.
template <class T>
struct CfgEuler {
  T* x;
  const T* cond;
  const T* uncond;
  T wc, wu, h;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    const T u = wu * uncond[i] + wc * cond[i];  // Cfg: (1 - w) u(x|∅) + w u(x|y)
    x[i] = x[i] + h * u;                        // Euler
  }
};

/// One Philox block per index k = (sample i, block jb): up to per_block<T> consecutive elements of
/// sample i, each with its own Gaussian from the block, as fill_normal assigns them.
template <class T>
struct CfgEulerMaruyama {
  T* x;
  const T* cond;
  const T* uncond;
  FusedStep<T> c;
  rng_detail::Stream stream;
  index_t d;   // elements per sample
  index_t nb;  // Philox blocks per sample
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    constexpr int pb = rng_detail::per_block<T>;
    const index_t i = k / nb, jb = k % nb;
    const auto blk = stream.block(static_cast<std::uint32_t>(jb), static_cast<std::uint32_t>(i));
    for (int l = 0; l < pb; ++l) {
      const index_t j = jb * pb + l;
      if (j < d) {
        const index_t e = i * d + j;
        const T z = rng_detail::normal_lane<T>(blk, l);
        const T u = c.wu * uncond[e] + c.wc * cond[e];
        const T xv = x[e];
        x[e] = xv + c.h * (u + c.half_s2 * (c.cx * xv + c.cu * u)) + c.noise * z;
      }
    }
  }
};

}  // namespace fused_kernels

namespace fused_detail {
template <class T, class B>
void check_fused_operands(const char* who, View<T, B> x, View<const T, B> cond,
                          View<const T, B> uncond, double w) {
  check_same_shape(who, "x", View<const T, B>(x), "cond", cond);
  check_same_shape(who, "x", View<const T, B>(x), "uncond", uncond);
  require<config_error>(std::isfinite(w), who, ": the guidance scale w must be finite, got ", w);
}
}  // namespace fused_detail

/// One classifier-free guided Euler step in one pass (one kernel on a GPU):
///   x <- x + h ((1 - w) uncond + w cond).
/// x, cond = u(x|y), uncond = u(x|∅): [N, ...] (e.g. the two halves of a 2N field evaluation)
template <class T, Backend B>
void cfg_euler_step(View<T, B> x, std::type_identity_t<View<const T, B>> cond,
                    std::type_identity_t<View<const T, B>> uncond, double w,
                    std::type_identity_t<T> h) {
  static_assert(std::is_floating_point_v<T>, "cfg_euler_step: floating-point tensors only");
  fused_detail::check_fused_operands<T, B>("cfg_euler_step", x, cond, uncond, w);
  const T wc = static_cast<T>(w), wu = static_cast<T>(1.0 - w);
  B::parallel_for(x.numel(),
                  fused_kernels::CfgEuler<T>{x.data(), cond.data(), uncond.data(), wc, wu, h});
}

/// The coefficients of an Euler–Maruyama step of the marginal-preserving SDE with the score taken
/// from the (guided) velocity, as EulerMaruyama::step computes them (samplers/sde.hpp). w is the
/// guidance scale (1: no guidance).
template <class T, Schedule S>
FusedStep<T> euler_maruyama_coefficients(const S& schedule, double w, double sigma, T t, T h) {
  const char* who = "euler_maruyama";
  require<config_error>(std::isfinite(w), who, ": the guidance scale w must be finite, got ", w);
  require<config_error>(std::isfinite(sigma) && sigma >= 0, who,
                        ": sigma must be finite and >= 0, got ", sigma);
  FusedStep<T> c;
  c.wc = static_cast<T>(w);
  c.wu = static_cast<T>(1.0 - w);
  c.h = h;
  if (sigma == 0) return c;
  require<config_error>(h > 0, who, ": stochastic steps must go forward in time (h = ", h,
                        "); integrate the ODE (sigma = 0) to invert");
  const auto conv = conversion_at<T>(schedule, Parametrization::velocity, Parametrization::score, t,
                                     "euler_maruyama: score from velocity");
  c.half_s2 = static_cast<T>(sigma * sigma / 2);
  c.cx = conv.cx;
  c.cu = conv.cin;
  c.noise = static_cast<T>(sigma * std::sqrt(static_cast<double>(h)));
  return c;
}

/// One classifier-free guided Euler–Maruyama step in one pass (noise drawn in the pass):
///   x <- x + h (u~ + sigma^2/2 s(x, u~)) + sigma sqrt(h) xi,  u~ = (1 - w) uncond + w cond,
/// consuming one stream of `gen` exactly as fill_normal(xi, gen) would; sigma == 0 is the Euler
/// step, bit for bit, and consumes nothing (as EulerMaruyama does).
/// x, cond, uncond: [N, ...]
template <class T, Backend B, Schedule S>
void cfg_euler_maruyama_step(View<T, B> x, std::type_identity_t<View<const T, B>> cond,
                             std::type_identity_t<View<const T, B>> uncond, double w,
                             const S& schedule, double sigma, std::type_identity_t<T> t,
                             std::type_identity_t<T> h, Generator& gen) {
  static_assert(std::is_floating_point_v<T>, "cfg_euler_maruyama_step: floating-point only");
  const char* who = "cfg_euler_maruyama_step";
  fused_detail::check_fused_operands<T, B>(who, x, cond, uncond, w);
  const FusedStep<T> c = euler_maruyama_coefficients<T>(schedule, w, sigma, t, h);
  if (sigma == 0) {
    cfg_euler_step<T, B>(x, cond, uncond, w, h);
    return;
  }
  const index_t rows = x.rows(), d = x.row_size();
  constexpr int pb = rng_detail::per_block<T>;
  require<config_error>(rows <= index_t(0xFFFFFFFF) && d / pb < index_t(0xFFFFFFFF), who,
                        ": tensor of shape ", x.shape(), " is too large for one noise stream");
  const index_t nb = (d + pb - 1) / pb;
  B::parallel_for(rows * nb,
                  fused_kernels::CfgEulerMaruyama<T>{x.data(), cond.data(), uncond.data(), c,
                                                     gen.next_stream(), d, nb},
                  16);
}

}  // namespace flowdiff
