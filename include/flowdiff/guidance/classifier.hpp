// flowdiff/guidance/classifier.hpp — classifier guidance as a field adapter. For a velocity field,
// u~ = u(x) + w b_t ∇_x log p_t(y|x) with b_t = (d_alpha beta^2 - d_beta beta alpha) / alpha, the
// coefficient of the score in u_t(x) = a_t x + b_t ∇log p_t(x); for a score field, s~ = s(x) +
// w ∇_x log p_t(y|x). With the exact field and the exact classifier this is the CFG field with the
// same w. b_t is infinite at t = 0 where alpha_0 = 0; the product with ∇log p_t(y|x) (which is
// O(alpha)) has a finite limit for the exact classifier but not for a learned one, so the velocity
// adapter throws numeric_error wherever b_t is not finite and w(t) != 0: start the time grid at
// t_min > 0.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/guidance/cfg.hpp"
#include "flowdiff/guidance/scale.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// b_t = (d_alpha beta^2 - d_beta beta alpha) / alpha: ∇log p_t(x) enters u_t(x) with this weight.
/// Infinite (or NaN) where alpha_t = 0. Uses the schedule's beta * d_beta product, so it stays
/// finite (0) at t = 1 for schedules whose d_beta(1) is -inf.
template <Schedule S>
double score_coefficient(const S& schedule, double t) {
  const auto v = evaluate<double>(schedule, t);
  return (v.d_alpha * v.beta * v.beta - v.beta_d_beta * v.alpha) / v.alpha;
}

namespace detail {

/// The weight of ∇log p_t(y|x) in a guided velocity: b_t, checked finite.
template <Schedule S>
struct VelocityGuidanceWeight {
  S schedule;
  static constexpr const char* who = "classifier_guidance";
  double operator()(double t) const {
    const double b = score_coefficient(schedule, t);
    if (!std::isfinite(b)) {
      const auto v = evaluate<double>(schedule, t);
      fail<numeric_error>(who,
                          ": b_t = (d_alpha beta^2 - d_beta beta alpha) / alpha is not finite at "
                          "t = ",
                          t, " (alpha_t = ", v.alpha, ", beta_t = ", v.beta,
                          "); the guided velocity has no general limit there. Start the time grid "
                          "at t_min > 0 (e.g. 1e-3) or use a scale with w(t) = 0 near t = 0");
    }
    return b;
  }
};

/// The weight of ∇log p_t(y|x) in a guided score: 1.
struct ScoreGuidanceWeight {
  static constexpr const char* who = "classifier_guidance_score";
  double operator()(double) const { return 1.0; }
};

}  // namespace detail

/// u~ = u(x) + w(t) c_t ∇_x log p_t(y|x), c_t from Weight (b_t for velocities, 1 for scores).
/// F: a Field (stored by value, or by reference when an lvalue reference type); G: a callable
/// g(View<const T> x, View<T> out, T t, View<const label_t> y) writing ∇_x log p_t(y|x).
template <class F, class G, class Weight, class T, class Scale = ConstantScale, Backend B = Cpu>
class ClassifierGuidance {
 public:
  using field_type = std::remove_reference_t<F>;
  using classifier_type = std::remove_reference_t<G>;
  using value_type = T;
  using backend = B;
  static_assert(Field<field_type, T, B>,
                "classifier_guidance: the field must be callable as field(View<const T> x, "
                "View<T> out, T t)");
  static_assert(std::is_invocable_v<classifier_type&, View<const T, B>, View<T, B>, T,
                                    View<const label_t, B>>,
                "classifier_guidance: the classifier gradient must be callable as "
                "g(View<const T> x, View<T> out, T t, View<const label_t> y)");

  ClassifierGuidance(F field, G classifier_grad, Weight weight, Scale scale)
      : field_(std::forward<F>(field)),
        classifier_(std::forward<G>(classifier_grad)),
        weight_(std::move(weight)),
        scale_(std::move(scale)) {}

  /// Copies the labels y: [N]. Checked against [0, num_classes()] when the classifier gradient
  /// has num_classes(), else only y >= 0.
  void set_condition(View<const label_t, B> labels) {
    detail::check_guidance_labels<B>(std::string(Weight::who) + "::set_condition", labels,
                                     classifier_classes());
    labels_.resize(labels.shape());
    B::copy(labels_.data(), labels.data(), labels.numel());
    n_ = labels.numel();
  }

  /// The same label y for n samples.
  void set_condition(label_t y, index_t n) {
    const index_t nc = classifier_classes();
    if (nc < 0)
      require<config_error>(y >= 0, Weight::who, "::set_condition: y = ", y, " must be >= 0");
    else
      require<config_error>(y >= 0 && y <= nc, Weight::who, "::set_condition: y = ", y,
                            " is outside [0, ", nc, "] (", nc, " is the null label)");
    require<config_error>(n >= 1, Weight::who, "::set_condition: n must be >= 1, got ", n);
    labels_.resize(Shape{n});
    fill(labels_.view(), y);
    n_ = n;
  }

  // x, out: [N, ...] with N the number of labels given to set_condition
  void operator()(View<const T, B> x, View<T, B> out, T t) {
    const char* who = Weight::who;
    check_time(who, t);
    require<config_error>(n_ > 0, who, ": call set_condition(labels) before evaluating the field");
    require<shape_error>(x.rank() >= 1 && x.rows() == n_, who, ": x has shape ", x.shape(),
                         " but set_condition received ", n_, " labels");
    check_same_shape(who, "x", x, "out", View<const T, B>(out));
    const double w = detail::scale_at(who, scale_, static_cast<double>(t));
    // Check b_t before any work, so a bad t fails fast and leaves `out` untouched.
    const double c = w == 0.0 ? 0.0 : w * weight_(static_cast<double>(t));
    field_(x, out, t);
    if (c == 0.0) return;
    grad_.resize(x.shape());
    classifier_(x, grad_.view(), t, View<const label_t, B>(labels_.view()));
    const T ct = static_cast<T>(c);
    transform(
        out, [ct] FLOWDIFF_HOST_DEVICE(T u, T g) { return u + ct * g; }, View<const T, B>(out),
        View<const T, B>(grad_.view()));
  }

  /// w at time t.
  double scale_at(T t) const {
    return detail::scale_at(Weight::who, scale_, static_cast<double>(t));
  }
  /// The number of labels set (N), 0 before set_condition.
  index_t batch_size() const { return n_; }
  field_type& field() { return field_; }
  classifier_type& classifier() { return classifier_; }

 private:
  index_t classifier_classes() const {
    if constexpr (requires(const classifier_type& g) { g.num_classes(); })
      return static_cast<index_t>(classifier_.num_classes());
    else
      return -1;
  }

  F field_;
  G classifier_;
  Weight weight_;
  Scale scale_;
  index_t n_ = 0;
  Tensor<label_t, B> labels_;  // [N]
  Tensor<T, B> grad_;          // [N, ...]
};

namespace detail {
// The scalar type: explicit, else the field's value_type, else the classifier's, else a
// floating-point scale's.
template <class T, class F, class G, class W>
auto classifier_value_impl() {
  if constexpr (!std::is_void_v<T> || requires { typename F::value_type; }) {
    return std::type_identity<guidance_value_t<T, F, W>>{};
  } else {
    return std::type_identity<guidance_value_t<void, G, W>>{};
  }
}
template <class T, class F, class G, class W>
using classifier_value_t = typename decltype(classifier_value_impl<T, F, G, W>())::type;
}  // namespace detail

/// Classifier guidance for a velocity field under `schedule`: u~ = u(x) + w b_t ∇_x log p_t(y|x).
/// Throws numeric_error when evaluated where b_t is not finite (t = 0 for alpha_0 = 0) with w != 0.
template <class T = void, class F, class G, Schedule S, class W>
auto classifier_guidance(F&& field, G&& classifier_grad, S schedule, W w) {
  using Value = detail::classifier_value_t<T, std::remove_cvref_t<F>, std::remove_cvref_t<G>, W>;
  static_assert(!std::is_void_v<Value>,
                "classifier_guidance: cannot tell the scalar type; write "
                "classifier_guidance<float>(...)");
  auto scale = detail::make_scale("classifier_guidance", w);
  using Weight = detail::VelocityGuidanceWeight<S>;
  return ClassifierGuidance<F, G, Weight, Value, decltype(scale),
                            detail::guidance_backend_t<std::remove_cvref_t<F>>>(
      std::forward<F>(field), std::forward<G>(classifier_grad), Weight{std::move(schedule)},
      scale);
}

/// Classifier guidance for a score field: s~ = s(x) + w ∇_x log p_t(y|x) (finite for every t).
template <class T = void, class F, class G, class W>
auto classifier_guidance_score(F&& score_field, G&& classifier_grad, W w) {
  using Value = detail::classifier_value_t<T, std::remove_cvref_t<F>, std::remove_cvref_t<G>, W>;
  static_assert(!std::is_void_v<Value>,
                "classifier_guidance_score: cannot tell the scalar type; write "
                "classifier_guidance_score<float>(...)");
  auto scale = detail::make_scale("classifier_guidance_score", w);
  using Weight = detail::ScoreGuidanceWeight;
  return ClassifierGuidance<F, G, Weight, Value, decltype(scale),
                            detail::guidance_backend_t<std::remove_cvref_t<F>>>(
      std::forward<F>(score_field), std::forward<G>(classifier_grad), Weight{}, scale);
}

}  // namespace flowdiff
