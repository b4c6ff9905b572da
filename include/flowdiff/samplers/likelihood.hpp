// flowdiff/samplers/likelihood.hpp — exact log-likelihoods of a flow through the instantaneous
// change of variables (Chen et al. 2018): along the ODE dx/dt = u_t(x),
//   d/dt log p_t(x_t) = -div u_t(x_t),  so  log p_1(x) = log N(x_0; 0, I) - int_0^1 div u_t(x_t) dt,
// where x_0 is x carried backwards from t = 1 to t = 0. The state [x, Delta] with
// dDelta/dt = -div u (Delta(1) = 0, so Delta(0) = int_0^1 div u dt) is integrated by any stepper
// over a descending grid. The divergence comes from the field itself (`field.divergence(x, div, t)`,
// exact), from the full Jacobian trace by d central-difference Jacobian-vector products (accurate
// to O(h^2); use double), or from Hutchinson's estimator E[eps^T J eps] with k fixed Rademacher
// probes drawn once from a Generator (unbiased for any k, up to the O(h^2) difference error).
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

/// The augmented field on [x, Delta]: out = [u_t(x), -div u_t(x)].
template <class F, class T>
struct AugmentedDivergenceField {
  F& field;
  LikelihoodOptions opt;
  index_t n, d;
  Tensor<T> xs, us, xp, up, um, div, probes;

  AugmentedDivergenceField(F& f, LikelihoodOptions o, index_t rows, index_t dim, Generator* gen)
      : field(f), opt(o), n(rows), d(dim), xs(Shape{rows, dim}), us(Shape{rows, dim}),
        xp(Shape{rows, dim}), up(Shape{rows, dim}), um(Shape{rows, dim}), div(Shape{rows}) {
    if (opt.divergence == Divergence::hutchinson) {
      require<config_error>(gen != nullptr, "log_likelihood: the Hutchinson estimator needs a Generator");
      require<config_error>(opt.probes >= 1, "log_likelihood: probes must be >= 1, got ", opt.probes);
      probes = Tensor<T>(Shape{opt.probes * rows, dim});
      fill_uniform(probes, *gen);
      transform(probes, [](T u) { return u < T(0.5) ? T(-1) : T(1); }, probes);
    }
  }

  void operator()(View<const T> s, View<T> out, T t) {
    // Split the state [N, d + 1] into x: [N, d].
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < d; ++j) xs(i, j) = s(i, j);
    field(View<const T>(xs.view()), us.view(), t);
    divergence(t);
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < d; ++j) out(i, j) = us(i, j);
      out(i, d) = -div[i];
    }
  }

  void divergence(T t) {
    if (opt.divergence == Divergence::exact) {
      if constexpr (DivergenceField<F, T, Cpu>) {
        field.divergence(View<const T>(xs.view()), div.view(), t);
      } else {
        fail<config_error>("log_likelihood: Divergence::exact needs a field with a "
                           "divergence(x, div, t) member; use Divergence::jacobian or hutchinson");
      }
      return;
    }
    fill(div, T(0));
    const T h0 = static_cast<T>(opt.fd_step);
    auto jvp = [&](auto&& direction, T weight) {  // div += weight * v . (u(x + h v) - u(x - h v)) / 2h
      for (int sgn : {1, -1}) {
        for (index_t i = 0; i < n; ++i)
          for (index_t j = 0; j < d; ++j) {
            const T h = h0 * std::max(T(1), std::abs(xs(i, j)));
            xp(i, j) = xs(i, j) + T(sgn) * h * direction(i, j);
          }
        field(View<const T>(xp.view()), (sgn > 0 ? up : um).view(), t);
      }
      for (index_t i = 0; i < n; ++i) {
        T acc = 0;
        for (index_t j = 0; j < d; ++j) {
          const T v = direction(i, j);
          if (v == T(0)) continue;
          const T h = h0 * std::max(T(1), std::abs(xs(i, j)));
          acc += v * (up(i, j) - um(i, j)) / (2 * h);
        }
        div[i] += weight * acc;
      }
    };
    if (opt.divergence == Divergence::jacobian) {
      for (index_t k = 0; k < d; ++k)
        jvp([k](index_t, index_t j) { return j == k ? T(1) : T(0); }, T(1));
    } else {
      const T w = T(1) / static_cast<T>(opt.probes);
      for (index_t p = 0; p < opt.probes; ++p) {
        const T* pr = probes.data() + p * n * d;
        const index_t dd = d;
        jvp([pr, dd](index_t i, index_t j) { return pr[i * dd + j]; }, w);
      }
    }
  }
};

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
  const View<const T> x = view_of(x_in);
  const View<T> out = view_of(out_in);
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
  detail::AugmentedDivergenceField<F, T> aug(field, options, n, d, gen);
  Tensor<T> state(Shape{n, d + 1});
  for (index_t i = 0; i < n; ++i) {
    for (index_t j = 0; j < d; ++j) state(i, j) = x(i, j);
    state(i, d) = 0;
  }
  LikelihoodStats stats;
  stats.ode = integrate(stepper, aug, state, g);
  const T log_norm = static_cast<T>(-0.5 * static_cast<double>(d) * std::log(2 * std::numbers::pi));
  for (index_t i = 0; i < n; ++i) {
    T sq = 0;
    for (index_t j = 0; j < d; ++j) sq += state(i, j) * state(i, j);
    out[i] = log_norm - sq / 2 - state(i, d);
  }
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
