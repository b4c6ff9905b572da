// flowdiff/paths/retarget.hpp — sampling a velocity field trained under schedule A with schedule B,
// the scale-time transformation of Lipman et al., "Flow Matching Guide and Code" (2024), §4.8
// (scheduler change): x^B_r = s_r x^A_{t_r} with the same (z, eps) when alpha_B(r)/beta_B(r) =
// alpha_A(t_r)/beta_A(t_r) and s_r = beta_B(r)/beta_A(t_r) = alpha_B(r)/alpha_A(t_r); then
// u_B(x, r) = (ds_r/dr / s_r) x + s_r dt_r/dr u_A(x / s_r, t_r).
// t_r solves lambda_A(t_r) = lambda_B(r) (lambda = log(alpha/beta), bisection); implicit
// differentiation gives dt_r/dr = W_B(r) / (s_r^2 W_A(t_r)) with W = d_alpha beta - d_beta alpha
// (the SNR ratio cancels, so this form is finite at both exact endpoints), and d log s_r / dr =
// d_beta_B/beta_B - (d_beta_A/beta_A) dt_r (or the alpha form near r = 1, where beta -> 0).
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/paths/log_snr.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

namespace detail {
template <class T>
struct ScaleBy {
  T factor;
  FLOWDIFF_HOST_DEVICE T operator()(T x) const { return factor * x; }
};
template <class T>
struct AffineCombine {
  T cx, cu;
  FLOWDIFF_HOST_DEVICE T operator()(T x, T u) const { return cx * x + cu * u; }
};
}  // namespace detail

/// u_to(x, r) = d_log_scale x + scale d_time u_from(x / scale, time).
template <class T>
struct RetargetCoefficients {
  T time;         ///< t_r: the source-schedule time with the same log-SNR as r
  T scale;        ///< s_r
  T d_log_scale;  ///< (ds_r/dr) / s_r
  T d_time;       ///< dt_r/dr
};

/// The scale-time map from schedule `from` (the one the field was trained with) to schedule `to`
/// at r (host, double precision). Throws numeric_error where it is undefined: when no source time
/// has the target's log-SNR (the source schedule only approximately reaches an endpoint the target
/// reaches exactly, e.g. from VP to Linear near r = 0), or where a coefficient is not finite (the
/// source velocity carries no information, W_A = 0, e.g. from Polynomial{2} at r = 0; or a
/// schedule's d_beta is infinite at r = 1).
template <Schedule SA, Schedule SB>
RetargetCoefficients<double> retarget_coefficients(const SA& from, const SB& to, double r) {
  check_time("retarget", r);
  const ScheduleValues<double> vb = evaluate(to, r);
  const double lb = std::log(vb.alpha) - std::log(vb.beta);
  const double la0 = lambda(from, 0.0), la1 = lambda(from, 1.0);
  require<numeric_error>(lb >= la0 && lb <= la1, "retarget: at r = ", r,
                         " the target schedule has log(alpha/beta) = ", lb,
                         ", outside the source schedule's range [", la0, ", ", la1,
                         "], so no source time matches it");
  const double t = lambda_inverse(from, lb);
  const ScheduleValues<double> va = evaluate(from, t);
  // Of the two equal ratios use the one whose denominators are far from 0 (beta near r = 0,
  // alpha near r = 1).
  const bool use_beta = vb.beta >= vb.alpha;
  const double scale = use_beta ? vb.beta / va.beta : vb.alpha / va.alpha;
  const double w_a = va.d_alpha * va.beta - va.d_beta * va.alpha;
  const double w_b = vb.d_alpha * vb.beta - vb.d_beta * vb.alpha;
  const double d_time = w_b / (scale * scale * w_a);
  const double d_log_scale = use_beta ? vb.d_beta / vb.beta - va.d_beta / va.beta * d_time
                                      : vb.d_alpha / vb.alpha - va.d_alpha / va.alpha * d_time;
  const RetargetCoefficients<double> c{t, scale, d_log_scale, d_time};
  if (!(std::isfinite(scale) && scale > 0 && std::isfinite(d_time) && std::isfinite(d_log_scale))) {
    const char* why = w_a == 0 ? "the source velocity carries no information at t_r "
                                 "(d_alpha beta - d_beta alpha = 0 there)"
                      : !std::isfinite(w_a) || !std::isfinite(w_b)
                          ? "a schedule derivative is infinite there (d_beta = -inf at t = 1 for "
                            "SqrtBeta, VP and DDPM tables)"
                          : "a coefficient is not finite there";
    fail<numeric_error>("retarget: undefined at r = ", r, " (source time t_r = ", t, "): ", why,
                        "; scale = ", scale, ", dt_r/dr = ", d_time, ", d log s_r/dr = ",
                        d_log_scale);
  }
  return c;
}

/// The field adapter: a velocity field trained under `from`, sampled under `to`. It owns one
/// scratch tensor for x / s_r, allocated on the first call and reused (reallocated only when the
/// element count changes). T and B (the element type and backend of the batches it will see) are
/// given explicitly because the scratch has to be typed: `retarget<float>(net, Linear{}, Cosine{})`.
/// An lvalue field is held by reference, an rvalue one is moved in; conditional fields stay
/// conditional.
template <class F, Schedule SA, Schedule SB, class T, Backend B = Cpu>
class RetargetedField {
 public:
  RetargetedField(F field, SA from, SB to)
      : field_(std::forward<F>(field)), from_(std::move(from)), to_(std::move(to)) {}

  // x, out: [N, ...]
  void operator()(View<const T, B> x, View<T, B> out, T r) {
    run(x, out, r, [&](View<const T, B> xs, T t) { field_(xs, out, t); });
  }

  // x, out: [N, ...]; y: [N]
  void operator()(View<const T, B> x, View<T, B> out, T r, View<const label_t, B> y)
    requires requires(std::remove_reference_t<F>& f, View<const T, B> a, View<T, B> o, T t,
                      View<const label_t, B> l) { f(a, o, t, l); }
  {
    run(x, out, r, [&](View<const T, B> xs, T t) { field_(xs, out, t, y); });
  }

  index_t num_classes() const
    requires requires(const std::remove_reference_t<F>& f) { f.num_classes(); }
  {
    return static_cast<index_t>(field_.num_classes());
  }

  const SA& from() const { return from_; }
  const SB& to() const { return to_; }
  std::remove_reference_t<F>& inner() { return field_; }

 private:
  template <class Call>
  void run(View<const T, B> x, View<T, B> out, T r, Call call) {
    check_same_shape("retarget", "x", x, "out", out);
    const RetargetCoefficients<double> c = retarget_coefficients(from_, to_, static_cast<double>(r));
    scratch_.resize(x.shape());
    transform(scratch_.view(), detail::ScaleBy<T>{static_cast<T>(1 / c.scale)}, x);
    call(View<const T, B>(scratch_.view()), static_cast<T>(c.time));
    transform(out,
              detail::AffineCombine<T>{static_cast<T>(c.d_log_scale),
                                       static_cast<T>(c.scale * c.d_time)},
              x, View<const T, B>(out));
  }

  F field_;
  SA from_;
  SB to_;
  Tensor<T, B> scratch_;
};

/// `auto u_cos = retarget<float>(u_linear, schedules::Linear{}, schedules::Cosine{});`
template <class T, Backend B = Cpu, class F, Schedule SA, Schedule SB>
RetargetedField<F, SA, SB, T, B> retarget(F&& field, SA from, SB to) {
  return RetargetedField<F, SA, SB, T, B>(std::forward<F>(field), std::move(from), std::move(to));
}

}  // namespace flowdiff
