// flowdiff/paths/convert.hpp — conversions between the parametrisations of a Gaussian-path model
// output at (x, t): data z_hat = E[z|x], noise eps_hat = E[eps|x], score s = -eps_hat / beta,
// velocity u = d_alpha z_hat + d_beta eps_hat, and v = alpha eps_hat - beta z_hat (Salimans & Ho).
// Every quantity is a fixed linear combination A z_hat + B eps_hat and x = alpha z_hat + beta eps_hat,
// so every conversion is out = cx x + cin in with coefficients that depend only on the schedule at
// t: solving the 2x2 system [alpha beta; A_from B_from] (z_hat, eps_hat) = (x, in) gives
// out = ((A_to B_from - B_to A_from) x + (alpha B_to - beta A_to) in) / (alpha B_from - beta A_from).
// Each of the 20 non-trivial pairs is written out below in the form that stays finite wherever the
// maths allows (e.g. velocity -> data z_hat = (beta u - d_beta x) / (d_alpha beta - d_beta alpha),
// finite at both ends for Linear; velocity -> score s = (alpha u - d_alpha x) / (d_alpha beta^2 -
// beta d_beta alpha), finite at t = 0 and, via beta d_beta, at t = 1 for SqrtBeta/VP). Where the
// conversion is undefined (the input carries no information about the output: noise -> data at
// alpha = 0, anything -> score at beta = 0, ...) the coefficients carry a status and the host
// functions throw numeric_error naming the conversion and t. For the Cosine schedule u = -(pi/2) v.
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// What a Gaussian-path model predicts at (x, t).
enum class Parametrization {
  velocity,  ///< u_t(x) = E[d_alpha z + d_beta eps | x]: the flow-matching target
  score,     ///< grad log p_t(x) = -eps_hat / beta
  noise,     ///< eps_hat = E[eps | x] (epsilon-prediction)
  data,      ///< z_hat = E[z | x] (x1-, x0- or data-prediction)
  v,         ///< v = alpha eps_hat - beta z_hat (v-prediction, Salimans & Ho 2022)
};

inline constexpr Parametrization all_parametrizations[] = {
    Parametrization::velocity, Parametrization::score, Parametrization::noise,
    Parametrization::data, Parametrization::v};

/// "velocity", "score", "noise", "data" or "v".
constexpr std::string_view parametrization_name(Parametrization p) {
  switch (p) {
    case Parametrization::velocity: return "velocity";
    case Parametrization::score: return "score";
    case Parametrization::noise: return "noise";
    case Parametrization::data: return "data";
    case Parametrization::v: return "v";
  }
  return "?";
}

/// Why a conversion is undefined at a point (ok when it is defined).
enum class ConversionStatus : unsigned char {
  ok,
  alpha_zero,           ///< alpha = 0: x and this input say nothing about the data z
  beta_zero,            ///< beta = 0: the noise (and the infinite score) cannot be recovered
  velocity_singular,    ///< d_alpha beta - d_beta alpha = 0: the velocity carries no information
  infinite_d_beta,      ///< d_beta = -inf (e.g. SqrtBeta / VP / DDPM at t = 1) multiplies an input
  non_finite,           ///< a coefficient overflowed or a schedule value is not finite
};

/// out = cx * x + cin * in, valid when status == ok.
template <class T>
struct Conversion {
  T cx = T(0);
  T cin = T(1);
  ConversionStatus status = ConversionStatus::ok;

  FLOWDIFF_INLINE T operator()(T x, T in) const { return cx * x + cin * in; }
  FLOWDIFF_INLINE bool ok() const { return status == ConversionStatus::ok; }
};

namespace detail {

template <class T>
FLOWDIFF_INLINE Conversion<T> conversion_result(T cx, T cin) {
  Conversion<T> c{cx, cin, ConversionStatus::ok};
  // cx - cx is NaN exactly when cx is infinite or NaN: a test that needs no <cmath> on the device.
  if (!(cx - cx == T(0)) || !(cin - cin == T(0))) c.status = ConversionStatus::non_finite;
  return c;
}

template <class T>
FLOWDIFF_INLINE Conversion<T> conversion_error(ConversionStatus s) {
  return {T(0), T(0), s};
}

template <class T>
FLOWDIFF_INLINE bool is_finite(T v) {
  return v - v == T(0);
}

}  // namespace detail

/// The coefficients of the conversion from -> to at schedule values `c` (host and device; never
/// throws: an undefined conversion is reported in `status`).
template <class T>
FLOWDIFF_INLINE Conversion<T> conversion(const ScheduleValues<T>& c, Parametrization from,
                                         Parametrization to) {
  using P = Parametrization;
  using St = ConversionStatus;
  const T a = c.alpha, b = c.beta, da = c.d_alpha, db = c.d_beta, p = c.beta_d_beta;
  const T n2 = a * a + b * b;  // > 0 always: the determinant of the v parametrisation
  if (from == to) return detail::conversion_result(T(0), T(1));
  // A non-finite d_alpha or d_beta only matters where it is used; the results are checked.
  if (!detail::is_finite(a) || !detail::is_finite(b))
    return detail::conversion_error<T>(St::non_finite);

  switch (from) {
    case P::data:  // in = z_hat; eps_hat = (x - alpha z_hat) / beta needs beta > 0
      if (b == T(0)) return detail::conversion_error<T>(St::beta_zero);
      switch (to) {
        case P::noise: return detail::conversion_result(T(1) / b, -a / b);
        case P::score: return detail::conversion_result(T(-1) / (b * b), a / (b * b));
        case P::velocity: return detail::conversion_result(db / b, da - a * db / b);
        case P::v: return detail::conversion_result(a / b, -n2 / b);
        default: break;
      }
      break;

    case P::noise:  // in = eps_hat; z_hat = (x - beta eps_hat) / alpha needs alpha > 0
      if (to == P::score) {
        if (b == T(0)) return detail::conversion_error<T>(St::beta_zero);
        return detail::conversion_result(T(0), T(-1) / b);
      }
      if (a == T(0)) return detail::conversion_error<T>(St::alpha_zero);
      switch (to) {
        case P::data: return detail::conversion_result(T(1) / a, -b / a);
        case P::velocity:
          if (!detail::is_finite(db)) return detail::conversion_error<T>(St::infinite_d_beta);
          return detail::conversion_result(da / a, db - da * b / a);
        case P::v: return detail::conversion_result(-b / a, n2 / a);
        default: break;
      }
      break;

    case P::score:  // in = s; eps_hat = -beta s, z_hat = (x + beta^2 s) / alpha
      if (to == P::noise) return detail::conversion_result(T(0), -b);
      if (a == T(0)) return detail::conversion_error<T>(St::alpha_zero);
      switch (to) {
        case P::data: return detail::conversion_result(T(1) / a, b * b / a);
        // u = (d_alpha / alpha) x + (d_alpha beta^2 - alpha beta d_beta) / alpha s (DESIGN §1),
        // with beta d_beta taken whole so it stays finite where d_beta alone is infinite.
        case P::velocity:
          if (!detail::is_finite(p)) return detail::conversion_error<T>(St::non_finite);
          return detail::conversion_result(da / a, da * b * b / a - p);
        case P::v: return detail::conversion_result(-b / a, -b * n2 / a);
        default: break;
      }
      break;

    case P::velocity: {  // in = u; the system has determinant alpha d_beta - beta d_alpha
      if (!detail::is_finite(p) || !detail::is_finite(da))
        return detail::conversion_error<T>(St::non_finite);
      // Where alpha = 0, p_t = N(0, beta^2 I) whatever the data: the score -x / beta^2 and the
      // noise x / beta are known without the velocity, even where the velocity says nothing
      // (d_alpha = 0 too, e.g. Polynomial(n > 1) at t = 0).
      if (a == T(0) && b > T(0) && to == P::score) return detail::conversion_result(T(-1) / (b * b), T(0));
      if (a == T(0) && b > T(0) && to == P::noise) return detail::conversion_result(T(1) / b, T(0));
      if (to == P::score) {
        // s = (alpha u - d_alpha x) / (d_alpha beta^2 - alpha beta d_beta): finite at t = 0 when
        // d_alpha(0) != 0, and at t = 1 exactly when beta d_beta does not vanish there.
        const T den = da * b * b - a * p;
        if (den == T(0))
          return detail::conversion_error<T>(b == T(0) ? St::beta_zero : St::velocity_singular);
        return detail::conversion_result(-da / den, a / den);
      }
      // z_hat = (zx x + zu u) / den, eps_hat = (ex x + eu u) / den. Where d_beta is infinite
      // (beta = 0) numerator and denominator are multiplied by beta, which turns every d_beta
      // into the finite beta d_beta.
      T den, zx, zu, ex, eu;
      if (detail::is_finite(db)) {
        den = a * db - b * da;
        zx = db;
        zu = -b;
        ex = -da;
        eu = a;
      } else {
        den = a * p - b * b * da;
        zx = p;
        zu = -b * b;
        ex = -da * b;
        eu = a * b;
      }
      if (den == T(0)) return detail::conversion_error<T>(St::velocity_singular);
      switch (to) {
        case P::data: return detail::conversion_result(zx / den, zu / den);
        case P::noise: return detail::conversion_result(ex / den, eu / den);
        case P::v: return detail::conversion_result((a * ex - b * zx) / den, (a * eu - b * zu) / den);
        default: break;
      }
      break;
    }

    case P::v:  // in = v; z_hat = (alpha x - beta v) / n2, eps_hat = (beta x + alpha v) / n2
      switch (to) {
        case P::data: return detail::conversion_result(a / n2, -b / n2);
        case P::noise: return detail::conversion_result(b / n2, a / n2);
        case P::score:
          if (b == T(0)) return detail::conversion_error<T>(St::beta_zero);
          return detail::conversion_result(T(-1) / n2, -a / (b * n2));
        case P::velocity:
          if (!detail::is_finite(db)) return detail::conversion_error<T>(St::infinite_d_beta);
          if (!detail::is_finite(p)) return detail::conversion_error<T>(St::non_finite);
          return detail::conversion_result((da * a + p) / n2, (a * db - b * da) / n2);
        default: break;
      }
      break;
  }
  return detail::conversion_error<T>(St::non_finite);  // unreachable for valid enum values
}

/// One converted value: cx x + cin in; NaN where the conversion is undefined (host and device; the
/// host-side functions below throw instead).
template <class T>
FLOWDIFF_INLINE T convert_value(const ScheduleValues<T>& c, Parametrization from, Parametrization to,
                                T x, T in) {
  const Conversion<T> k = conversion(c, from, to);
  return k.ok() ? k(x, in) : static_cast<T>(NAN);
}

namespace detail {

inline const char* conversion_reason(ConversionStatus s) {
  switch (s) {
    case ConversionStatus::alpha_zero:
      return "alpha = 0 there, so the input carries no information about the data z_hat";
    case ConversionStatus::beta_zero:
      return "beta = 0 there: the path is a point mass at the data, the noise is not determined "
             "and the score is infinite";
    case ConversionStatus::velocity_singular:
      return "d_alpha beta - d_beta alpha = 0 there, so the velocity carries no information "
             "about the data";
    case ConversionStatus::infinite_d_beta:
      return "d_beta is infinite there (e.g. a square-root-type schedule at t = 1) and "
             "multiplies a term the input does not determine";
    case ConversionStatus::non_finite: return "a coefficient is not finite there";
    case ConversionStatus::ok: break;
  }
  return "ok";
}

template <class T>
[[noreturn]] void fail_conversion(std::string_view what, Parametrization from, Parametrization to,
                                  T t, const ScheduleValues<double>& v, ConversionStatus s) {
  fail<numeric_error>(what, ": ", parametrization_name(from), " -> ", parametrization_name(to),
                      " is undefined at t = ", t, ": ", conversion_reason(s), " (alpha = ", v.alpha,
                      ", beta = ", v.beta, ", d_alpha = ", v.d_alpha, ", d_beta = ", v.d_beta, ")");
}

}  // namespace detail

/// The coefficients of from -> to at time t under `schedule` (host). The schedule is evaluated in
/// double and the coefficients rounded to T once. Throws config_error for t outside [0, 1] and
/// numeric_error where the conversion is undefined.
template <class T, Schedule S>
Conversion<T> conversion_at(const S& schedule, Parametrization from, Parametrization to, T t,
                            std::string_view what = "convert") {
  check_time(what, t);
  const ScheduleValues<double> v = evaluate(schedule, static_cast<double>(t));
  const Conversion<double> c = conversion(v, from, to);
  if (!c.ok()) detail::fail_conversion(what, from, to, t, v, c.status);
  const Conversion<T> r{static_cast<T>(c.cx), static_cast<T>(c.cin), ConversionStatus::ok};
  require<numeric_error>(detail::is_finite(r.cx) && detail::is_finite(r.cin), what, ": ",
                         parametrization_name(from), " -> ", parametrization_name(to), " at t = ", t,
                         " overflows this floating-point type (coefficients ", c.cx, ", ", c.cin,
                         ")");
  return r;
}

/// out = the `to` parametrisation of a model output `in` given in parametrisation `from`, at
/// points x and time t. out may alias in.
/// x, in, out: [N, ...] (same shape)
template <Schedule S, TensorLike X, TensorLike In, TensorLike Out>
void convert(const S& schedule, Parametrization from, Parametrization to, const X& x, const In& in,
             Out&& out, value_type_of<X> t) {
  using T = value_type_of<X>;
  using B = backend_of<X>;
  const View<const T, B> vx = view_of(x);
  const View<const T, B> vin = view_of(in);
  const View<T, B> vout = view_of(out);
  check_same_shape("convert", "x", vx, "in", vin);
  check_same_shape("convert", "x", vx, "out", vout);
  const Conversion<T> c = conversion_at(schedule, from, to, t);
  if (from == to) {
    copy(vout, vin);
    return;
  }
  transform(vout, c, vx, vin);
}

/// A field adapter: calls a field that predicts `from` and returns its `to` parametrisation
/// (e.g. a noise-prediction network as the velocity field a sampler integrates). The inner field
/// writes straight into the caller's `out`, which is then converted in place: no allocation. An
/// lvalue field is held by reference (it must outlive the adapter), an rvalue one is moved in.
/// Conditional fields stay conditional: `field(x, out, t, y)` and `num_classes()` are forwarded.
template <class F, Schedule S>
class ParametrizationAdapter {
 public:
  ParametrizationAdapter(F field, Parametrization from, Parametrization to, S schedule)
      : field_(std::forward<F>(field)), schedule_(std::move(schedule)), from_(from), to_(to) {}

  // x, out: [N, ...]
  template <TensorLike X, TensorLike Out>
  void operator()(const X& x, Out&& out, value_type_of<X> t) {
    using T = value_type_of<X>;
    using B = backend_of<X>;
    const View<const T, B> vx = view_of(x);
    const View<T, B> vout = view_of(out);
    check_same_shape("as_parametrization", "x", vx, "out", vout);
    const Conversion<T> c = conversion_at(schedule_, from_, to_, t, "as_parametrization");
    field_(vx, vout, t);
    if (from_ != to_) transform(vout, c, vx, View<const T, B>(vout));
  }

  // x, out: [N, ...]; y: [N]
  template <TensorLike X, TensorLike Out, TensorLike Y>
  void operator()(const X& x, Out&& out, value_type_of<X> t, const Y& y)
    requires requires(std::remove_reference_t<F>& f, View<const value_type_of<X>, backend_of<X>> a,
                      View<value_type_of<X>, backend_of<X>> o, value_type_of<X> tt,
                      View<const label_t, backend_of<X>> l) { f(a, o, tt, l); }
  {
    using T = value_type_of<X>;
    using B = backend_of<X>;
    const View<const T, B> vx = view_of(x);
    const View<T, B> vout = view_of(out);
    check_same_shape("as_parametrization", "x", vx, "out", vout);
    const Conversion<T> c = conversion_at(schedule_, from_, to_, t, "as_parametrization");
    field_(vx, vout, t, View<const label_t, B>(view_of(y)));
    if (from_ != to_) transform(vout, c, vx, View<const T, B>(vout));
  }

  index_t num_classes() const
    requires requires(const std::remove_reference_t<F>& f) { f.num_classes(); }
  {
    return static_cast<index_t>(field_.num_classes());
  }

  Parametrization from() const { return from_; }
  Parametrization to() const { return to_; }
  const S& schedule() const { return schedule_; }
  std::remove_reference_t<F>& inner() { return field_; }

 private:
  F field_;
  S schedule_;
  Parametrization from_, to_;
};

/// `auto u = as_parametrization(eps_net, Parametrization::noise, Parametrization::velocity, sched);`
template <class F, Schedule S>
ParametrizationAdapter<F, S> as_parametrization(F&& field, Parametrization from, Parametrization to,
                                                S schedule) {
  return ParametrizationAdapter<F, S>(std::forward<F>(field), from, to, std::move(schedule));
}

}  // namespace flowdiff
