// flowdiff/paths/gaussian_path.hpp — the Gaussian conditional probability path
// p_t(x|z) = N(alpha_t z, beta_t^2 I) of a schedule: sampling x_t = alpha_t z + beta_t eps, the
// conditional vector field u_t(x|z) = (d_alpha - d_beta/beta alpha) z + d_beta/beta x, the training
// target it equals on the path, u = d_alpha z + d_beta eps (better conditioned: no division by
// beta), the conditional score grad log p_t(x|z) = -(x - alpha z) / beta^2, and the regression target
// of any parametrisation (convert.hpp) from (z, eps). Each operation is out = c1(t) a + c2(t) b over
// a batch, with t either one scalar or one value per sample (t: [N]); per-sample coefficients are
// evaluated once per row, inside the backend loop. Times are checked to lie in [0, 1] and points
// where an operation is undefined (beta = 0 for the conditional field and score, d_beta = -inf for
// the target) throw numeric_error naming the sample.
#pragma once

#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// out = c1 * a + c2 * b for one sample; `ok` is false where the operation is undefined.
template <class T>
struct PathCoefficients {
  T c1, c2;
  bool ok;
};

namespace detail {

// The coefficient rules of GaussianPath's operations, as host-device functors of the schedule
// values so the per-sample kernels and the host checks share one definition.
struct SampleRule {  // a = z, b = eps
  static constexpr const char* undefined = "";
  template <class T>
  FLOWDIFF_INLINE PathCoefficients<T> operator()(const ScheduleValues<T>& v) const {
    return {v.alpha, v.beta, true};
  }
};
struct ConditionalVelocityRule {  // a = x, b = z
  static constexpr const char* undefined =
      "beta = 0 there (p_t(x|z) is a point mass and u_t(x|z) is infinite off it)";
  template <class T>
  FLOWDIFF_INLINE PathCoefficients<T> operator()(const ScheduleValues<T>& v) const {
    if (!(v.beta > T(0))) return {T(0), T(0), false};
    const T r = v.d_beta / v.beta;
    return {r, v.d_alpha - r * v.alpha, is_finite(r) && is_finite(v.d_alpha)};
  }
};
struct VelocityTargetRule {  // a = z, b = eps
  static constexpr const char* undefined =
      "d_beta is infinite there (a square-root-type schedule at t = 1)";
  template <class T>
  FLOWDIFF_INLINE PathCoefficients<T> operator()(const ScheduleValues<T>& v) const {
    return {v.d_alpha, v.d_beta, is_finite(v.d_alpha) && is_finite(v.d_beta)};
  }
};
struct ConditionalScoreRule {  // a = x, b = z
  static constexpr const char* undefined = "beta = 0 there (the conditional score is infinite)";
  template <class T>
  FLOWDIFF_INLINE PathCoefficients<T> operator()(const ScheduleValues<T>& v) const {
    if (!(v.beta > T(0))) return {T(0), T(0), false};
    const T inv = T(1) / (v.beta * v.beta);
    return {-inv, v.alpha * inv, is_finite(inv)};
  }
};
struct TargetRule {  // a = z, b = eps
  Parametrization p;
  static constexpr const char* undefined =
      "the target is not finite there (score at beta = 0, or velocity where d_beta is infinite)";
  template <class T>
  FLOWDIFF_INLINE PathCoefficients<T> operator()(const ScheduleValues<T>& v) const {
    switch (p) {
      case Parametrization::data: return {T(1), T(0), true};
      case Parametrization::noise: return {T(0), T(1), true};
      case Parametrization::velocity:
        return {v.d_alpha, v.d_beta, is_finite(v.d_alpha) && is_finite(v.d_beta)};
      case Parametrization::v: return {-v.beta, v.alpha, true};
      case Parametrization::score:
        if (!(v.beta > T(0))) return {T(0), T(0), false};
        return {T(0), T(-1) / v.beta, is_finite(T(1) / v.beta)};
    }
    return {T(0), T(0), false};
  }
};

// out = c1 a + c2 b with per-sample coefficients, one row of the batch per call. Named functors,
// not lambdas: nvcc rejects extended lambdas in private member functions.
template <class T, class Sched, class Rule>
struct PathRowKernel {
  Sched schedule;
  Rule rule;
  const T* a;
  const T* b;
  const T* t;
  T* out;
  index_t row_size;
  FLOWDIFF_EXEC_CHECK_DISABLE
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    const PathCoefficients<T> c = rule(evaluate(schedule, t[i]));
    for (index_t j = i * row_size; j < (i + 1) * row_size; ++j) out[j] = c.c1 * a[j] + c.c2 * b[j];
  }
};

template <class T>
struct Combine2 {
  T c1, c2;
  FLOWDIFF_HOST_DEVICE T operator()(T x, T y) const { return c1 * x + c2 * y; }
};

// 1 for a time outside [0, 1] (or NaN), 0 otherwise: summed by B::reduce_sum, the count of bad
// per-sample times on a backend whose memory the host cannot read.
template <class T>
struct TimeOutside {
  const T* t;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    return t[i] >= T(0) && t[i] <= T(1) ? 0.0 : 1.0;
  }
};

// 1 for a time in [0, 1] where the rule's coefficients are undefined (e.g. a score target at
// beta = 0), 0 otherwise.
template <class T, class Sched, class Rule>
struct RuleUndefined {
  Sched schedule;
  Rule rule;
  const T* t;
  FLOWDIFF_EXEC_CHECK_DISABLE
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    if (!(t[i] >= T(0) && t[i] <= T(1))) return 0.0;
    return rule(evaluate(schedule, t[i])).ok ? 0.0 : 1.0;
  }
};

}  // namespace detail

template <Schedule S>
class GaussianPath {
 public:
  using schedule_type = S;

  GaussianPath()
    requires std::is_default_constructible_v<S>
  = default;
  explicit GaussianPath(S schedule) : schedule_(std::move(schedule)) {}

  const S& schedule() const { return schedule_; }

  /// alpha, beta and their derivatives at t (checked to lie in [0, 1]).
  template <class T>
  ScheduleValues<T> values(T t) const {
    check_time("GaussianPath::values", t);
    return evaluate(schedule_, t);
  }

  /// x = alpha_t z + beta_t eps: a draw from p_t(.|z) given the noise eps.
  /// z, eps, x: [N, ...]; t: [N] or a scalar. x may alias z or eps.
  template <TensorLike Z, TensorLike E, class Time, TensorLike X>
  void sample(const Z& z, const E& eps, const Time& t, X&& x) const {
    apply("GaussianPath::sample", "z", z, "eps", eps, t, x, detail::SampleRule{});
  }

  /// u_t(x|z) = (d_alpha - d_beta/beta alpha) z + d_beta/beta x, for any x (not only points of the
  /// path). Throws numeric_error where beta = 0.
  /// x, z, out: [N, ...]; t: [N] or a scalar.
  template <TensorLike X, TensorLike Z, class Time, TensorLike Out>
  void conditional_velocity(const X& x, const Z& z, const Time& t, Out&& out) const {
    apply("GaussianPath::conditional_velocity", "x", x, "z", z, t, out,
          detail::ConditionalVelocityRule{});
  }

  /// The conditional flow-matching regression target d_alpha z + d_beta eps: u_t(x_t|z) at
  /// x_t = alpha z + beta eps, without dividing by beta. Throws numeric_error where d_beta is
  /// infinite (SqrtBeta, VP and DDPM tables at t = 1: sample training times in [0, 1)).
  /// z, eps, out: [N, ...]; t: [N] or a scalar.
  template <TensorLike Z, TensorLike E, class Time, TensorLike Out>
  void velocity_target(const Z& z, const E& eps, const Time& t, Out&& out) const {
    apply("GaussianPath::velocity_target", "z", z, "eps", eps, t, out,
          detail::VelocityTargetRule{});
  }

  /// grad_x log p_t(x|z) = -(x - alpha z) / beta^2. Throws numeric_error where beta = 0.
  /// x, z, out: [N, ...]; t: [N] or a scalar.
  template <TensorLike X, TensorLike Z, class Time, TensorLike Out>
  void conditional_score(const X& x, const Z& z, const Time& t, Out&& out) const {
    apply("GaussianPath::conditional_score", "x", x, "z", z, t, out,
          detail::ConditionalScoreRule{});
  }

  /// The regression target of a model trained in parametrisation p, at x_t = alpha z + beta eps:
  /// data -> z, noise -> eps, velocity -> d_alpha z + d_beta eps, v -> alpha eps - beta z,
  /// score -> -eps / beta (the denoising-score-matching target).
  /// z, eps, out: [N, ...]; t: [N] or a scalar.
  template <TensorLike Z, TensorLike E, class Time, TensorLike Out>
  void target(Parametrization p, const Z& z, const E& eps, const Time& t, Out&& out) const {
    apply("GaussianPath::target", "z", z, "eps", eps, t, out, detail::TargetRule{p});
  }

 private:
  template <class A, class Bt, class Time, class Out, class Rule>
  void apply(std::string_view what, std::string_view name_a, const A& a, std::string_view name_b,
             const Bt& b, const Time& t, Out& out, Rule rule) const {
    using T = value_type_of<A>;
    using B = backend_of<A>;
    const View<const T, B> va = view_of(a);
    const View<const T, B> vb = view_of(b);
    const View<T, B> vo = view_of(out);
    check_same_shape(what, name_a, va, name_b, vb);
    check_same_shape(what, name_a, va, "out", vo);
    require<shape_error>(va.rank() >= 1, what, ": ", name_a,
                         " must be a batch [N, ...] of rank >= 1, got shape ", va.shape());
    if constexpr (TensorLike<Time>) {
      static_assert(std::is_same_v<value_type_of<Time>, T>,
                    "GaussianPath: per-sample times must have the element type of the data");
      const View<const T, B> vt = view_of(t);
      require<shape_error>(vt.rank() == 1 && vt.dim(0) == va.rows(), what,
                           ": t must have shape [N] = [", va.rows(), "] (one time per sample of ",
                           name_a, " ", va.shape(), "), got ", vt.shape());
      check_rows(what, vt, rule);
      using Sched = std::remove_cvref_t<decltype(detail::kernel_schedule(schedule_))>;
      const detail::PathRowKernel<T, Sched, Rule> kernel{detail::kernel_schedule(schedule_),
                                                         rule,
                                                         va.data(),
                                                         vb.data(),
                                                         vt.data(),
                                                         vo.data(),
                                                         va.row_size()};
      B::parallel_for(va.rows(), kernel, va.row_size());
    } else {
      static_assert(std::is_arithmetic_v<Time>, "GaussianPath: t must be a scalar or a [N] tensor");
      const T ts = static_cast<T>(t);
      check_time(what, ts);
      const PathCoefficients<T> c = rule(evaluate(schedule_, ts));
      require<numeric_error>(c.ok, what, ": undefined at t = ", ts, ": ", Rule::undefined);
      transform(vo, detail::Combine2<T>{c.c1, c.c2}, va, vb);
    }
  }

  // Per-sample checks before the loop (kernels cannot throw): element by element on the host,
  // naming the first bad time; on a device backend by two reductions, naming how many are bad.
  template <class T, class B, class Rule>
  void check_rows(std::string_view what, View<const T, B> vt, const Rule& rule) const {
    if constexpr (B::host_accessible) {
      for (index_t i = 0; i < vt.numel(); ++i) {
        const T ti = vt[i];
        require<config_error>(ti >= T(0) && ti <= T(1), what, ": t[", i,
                              "] must lie in [0, 1], got ", ti);
        require<numeric_error>(rule(evaluate(schedule_, ti)).ok, what, ": undefined at t[", i,
                               "] = ", ti, ": ", Rule::undefined);
      }
    } else {
      const index_t n = vt.numel();
      const double outside = B::reduce_sum(n, detail::TimeOutside<T>{vt.data()});
      require<config_error>(outside == 0, what, ": ", static_cast<index_t>(outside), " of the ", n,
                            " times t (on ", B::name, ") do not lie in [0, 1]");
      using Sched = std::remove_cvref_t<decltype(detail::kernel_schedule(schedule_))>;
      const double undefined = B::reduce_sum(
          n, detail::RuleUndefined<T, Sched, Rule>{detail::kernel_schedule(schedule_), rule,
                                                   vt.data()});
      require<numeric_error>(undefined == 0, what, ": undefined at ",
                             static_cast<index_t>(undefined), " of the ", n, " times t (on ",
                             B::name, "): ", Rule::undefined);
    }
  }

  S schedule_;
};

template <Schedule S>
GaussianPath(S) -> GaussianPath<S>;

}  // namespace flowdiff
