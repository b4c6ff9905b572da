// flowdiff/samplers/likelihood.hpp — exact log-likelihoods of a flow through the instantaneous
// change of variables (Chen et al. 2018): along the ODE dx/dt = u_t(x),
//   d/dt log p_t(x_t) = -div u_t(x_t),  so  log p_1(x) = log N(x_0; 0, I) - int_0^1 div u_t(x_t) dt,
// where x_0 is x carried backwards from t = 1 to t = 0. The state [x, Delta] with
// dDelta/dt = -div u (Delta(1) = 0, so Delta(0) = int_0^1 div u dt) is integrated by any stepper
// over a descending grid. The divergence comes from the field itself (`field.divergence(x, div, t)`,
// exact), from the full Jacobian trace by d central-difference Jacobian-vector products (accurate
// to O(h^2); use double), or from Hutchinson's estimator E[eps^T J eps] with k fixed Rademacher
// probes drawn once from a Generator (unbiased for any k, up to the O(h^2) difference error).
// Backend-generic: x, out and the field live on one backend (Cpu, or Cuda under nvcc); the
// augmented field's passes are element-wise and per-sample kernels (one thread per sample for
// the sums over d, so the result does not depend on the thread count).
#pragma once

#include <cmath>
#include <numbers>
#include <type_traits>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/samplers/adaptive.hpp"
#include "flowdiff/samplers/integrate.hpp"

namespace flowdiff {

/// How the divergence of the field is obtained.
enum class Divergence {
  exact,       ///< field.divergence(x, div, t): the field knows its own divergence
  jacobian,    ///< trace of the Jacobian from d central-difference JVPs (2 d evaluations)
  hutchinson,  ///< Hutchinson's trace estimator with `probes` Rademacher probes (2 k evaluations)
};

/// A field that also provides its divergence: field.divergence(x, div, t), x: [N, d], div: [N].
template <class F, class T, class B = Cpu>
concept DivergenceField = Field<F, T, B> && requires(F& f, View<const T, B> x, View<T, B> div, T t) {
  f.divergence(x, div, t);
};

struct LikelihoodOptions {
  Divergence divergence = Divergence::jacobian;
  index_t probes = 1;     ///< Hutchinson probes per sample
  double fd_step = 1e-4;  ///< finite-difference step, relative to max(1, |x|)
};

namespace detail {

/// Hutchinson's Rademacher sign from a uniform draw.
template <class T>
struct RademacherSign {
  FLOWDIFF_HOST_DEVICE T operator()(T u) const { return u < T(0.5) ? T(-1) : T(1); }
};

/// The finite-difference step for a coordinate of value v: h0 max(1, |v|) (max as std::max:
/// 1 for a NaN).
template <class T>
FLOWDIFF_HOST_DEVICE inline T fd_step_at(T h0, T v) {
  const T a = v < T(0) ? -v : v;
  return h0 * (T(1) < a ? a : T(1));
}

/// The augmented field on [x, Delta]: out = [u_t(x), -div u_t(x)], on the field's backend B
/// (each pass one element-wise or per-sample kernel; the field's own evaluations are the
/// field's).
template <class F, class T, class B>
struct AugmentedDivergenceField {
  F& field;
  LikelihoodOptions opt;
  index_t n, d;
  Tensor<T, B> xs, us, xp, up, um, div, probes;

  AugmentedDivergenceField(F& f, LikelihoodOptions o, index_t rows, index_t dim, Generator* gen)
      : field(f), opt(o), n(rows), d(dim), xs(Shape{rows, dim}), us(Shape{rows, dim}),
        xp(Shape{rows, dim}), up(Shape{rows, dim}), um(Shape{rows, dim}), div(Shape{rows}) {
    if (opt.divergence == Divergence::hutchinson) {
      require<config_error>(gen != nullptr, "log_likelihood: the Hutchinson estimator needs a Generator");
      require<config_error>(opt.probes >= 1, "log_likelihood: probes must be >= 1, got ", opt.probes);
      probes = Tensor<T, B>(Shape{opt.probes * rows, dim});
      fill_uniform(probes, *gen);
      transform(probes, RademacherSign<T>{}, probes);
    }
  }

  void operator()(View<const T, B> s, View<T, B> out, T t) {
    const index_t dd = d;
    const T* ps = s.data();
    T* px = xs.data();
    B::parallel_for(n * d, FLOWDIFF_LAMBDA(index_t k) {  // x: the first d columns of [N, d + 1]
      px[k] = ps[k / dd * (dd + 1) + k % dd];
    });
    field(View<const T, B>(xs.view()), us.view(), t);
    divergence(t);
    const T* pu = us.data();
    const T* pdiv = div.data();
    T* po = out.data();
    B::parallel_for(n * (d + 1), FLOWDIFF_LAMBDA(index_t k) {
      const index_t i = k / (dd + 1), j = k % (dd + 1);
      po[k] = j < dd ? pu[i * dd + j] : -pdiv[i];
    });
  }

  /// div += weight * v . (u(x + h v) - u(x - h v)) / 2h per sample, h = h0 max(1, |x|) per
  /// coordinate, for the direction v = probe (Hutchinson: a [N, d] Rademacher block) or, with
  /// probe == nullptr, the unit vector along coordinate `unit` (the Jacobian's trace).
  void jvp(const T* probe, index_t unit, T weight, T t) {
    const T h0 = static_cast<T>(opt.fd_step);
    const index_t dd = d;
    const T* px = xs.data();
    for (int sgn : {1, -1}) {
      T* pp = xp.data();
      const T sg = static_cast<T>(sgn);
      B::parallel_for(n * d, FLOWDIFF_LAMBDA(index_t k) {
        const T v = probe != nullptr ? probe[k] : (k % dd == unit ? T(1) : T(0));
        pp[k] = px[k] + sg * fd_step_at(h0, px[k]) * v;
      });
      field(View<const T, B>(xp.view()), (sgn > 0 ? up : um).view(), t);
    }
    const T* pup = up.data();
    const T* pum = um.data();
    T* pdiv = div.data();
    B::parallel_for(
        n,
        FLOWDIFF_LAMBDA(index_t i) {
          T acc = 0;
          for (index_t j = 0; j < dd; ++j) {
            const index_t k = i * dd + j;
            const T v = probe != nullptr ? probe[k] : (j == unit ? T(1) : T(0));
            if (v == T(0)) continue;
            acc += v * (pup[k] - pum[k]) / (2 * fd_step_at(h0, px[k]));
          }
          pdiv[i] += weight * acc;
        },
        d);
  }

  void divergence(T t) {
    if (opt.divergence == Divergence::exact) {
      if constexpr (DivergenceField<F, T, B>) {
        field.divergence(View<const T, B>(xs.view()), div.view(), t);
      } else {
        fail<config_error>("log_likelihood: Divergence::exact needs a field with a "
                           "divergence(x, div, t) member; use Divergence::jacobian or hutchinson");
      }
      return;
    }
    fill(div, T(0));
    if (opt.divergence == Divergence::jacobian) {
      for (index_t k = 0; k < d; ++k) jvp(nullptr, k, T(1), t);
    } else {
      const T w = T(1) / static_cast<T>(opt.probes);
      for (index_t p = 0; p < opt.probes; ++p) jvp(probes.data() + p * n * d, 0, w, t);
    }
  }
};

/// [x, 0] for x: [N, d] into state: [N, d + 1].
template <class T, class B>
void augment_state(View<const T, B> x, View<T, B> state) {
  const index_t d = x.dim(1);
  const T* px = x.data();
  T* ps = state.data();
  B::parallel_for(state.numel(), FLOWDIFF_LAMBDA(index_t k) {
    const index_t i = k / (d + 1), j = k % (d + 1);
    ps[k] = j < d ? px[i * d + j] : T(0);
  });
}

/// out[i] = log N(x_0; 0, I) - Delta for the final state [x_0, Delta] of each sample.
template <class T, class B>
void log_density_of_state(View<const T, B> state, View<T, B> out, index_t d) {
  const T log_norm = static_cast<T>(-0.5 * static_cast<double>(d) * std::log(2 * std::numbers::pi));
  const T* ps = state.data();
  T* po = out.data();
  B::parallel_for(
      out.numel(),
      FLOWDIFF_LAMBDA(index_t i) {
        const T* row = ps + i * (d + 1);
        T sq = 0;
        for (index_t j = 0; j < d; ++j) sq += row[j] * row[j];
        po[i] = log_norm - sq / 2 - row[d];
      },
      d);
}

}  // namespace detail

/// What log_likelihood did.
struct LikelihoodStats {
  IntegrateStats ode;
};

/// log p_1(x) for each row of x: [N, d] under the flow of `field` (a velocity field), with the
/// reverse ODE solved by `stepper` over `grid` (descending, from 1 to 0; e.g. {1, 0} for an
/// adaptive stepper). out: [N]. `gen` is needed only for the Hutchinson estimator.
template <class Stepper, class F, TensorLike X, TensorLike Out, class Grid>
  requires(!std::is_same_v<std::remove_cvref_t<Stepper>, std::remove_cvref_t<F>>)
LikelihoodStats log_likelihood(const Stepper& stepper, F& field, const X& x_in, Out&& out_in,
                               const Grid& grid, LikelihoodOptions options = {},
                               Generator* gen = nullptr) {
  using T = value_type_of<X>;
  using B = backend_of<X>;
  static_assert(std::is_same_v<backend_of<Out>, B>,
                "log_likelihood: x and out must live on the same backend");
  const View<const T, B> x = view_of(x_in);
  const View<T, B> out = view_of(out_in);
  require<shape_error>(x.rank() == 2 && x.dim(0) >= 1 && x.dim(1) >= 1,
                       "log_likelihood: x must be [N, d], got ", x.shape());
  check_shape("log_likelihood: out", out, Shape{x.dim(0)});
  check_finite("log_likelihood: x", x);
  require<config_error>(options.fd_step > 0, "log_likelihood: fd_step must be > 0, got ",
                        options.fd_step);
  const std::vector<T> g(std::begin(grid), std::end(grid));
  require<config_error>(g.size() >= 2 && g.front() == T(1) && g.back() == T(0),
                        "log_likelihood: the grid must descend from t = 1 to t = 0, got [",
                        g.empty() ? T(-1) : g.front(), ", ..., ", g.empty() ? T(-1) : g.back(), "]");
  const index_t n = x.dim(0), d = x.dim(1);
  detail::AugmentedDivergenceField<F, T, B> aug(field, options, n, d, gen);
  Tensor<T, B> state(Shape{n, d + 1});
  detail::augment_state(x, state.view());
  LikelihoodStats stats;
  stats.ode = integrate(stepper, aug, state, g);
  detail::log_density_of_state(View<const T, B>(state.view()), out, d);
  check_finite("log_likelihood: result", out);
  return stats;
}

/// log p_1(x) with the adaptive Dormand–Prince solver at the given tolerances.
template <class F, TensorLike X, TensorLike Out>
LikelihoodStats log_likelihood(F& field, const X& x, Out&& out, LikelihoodOptions options = {},
                               double atol = 1e-7, double rtol = 1e-7, Generator* gen = nullptr) {
  using T = value_type_of<X>;
  Dopri5 dopri;
  dopri.atol = atol;
  dopri.rtol = rtol;
  return log_likelihood(dopri, field, x, out, std::vector<T>{T(1), T(0)}, options, gen);
}

}  // namespace flowdiff
