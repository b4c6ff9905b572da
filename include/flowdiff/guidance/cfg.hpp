// flowdiff/guidance/cfg.hpp — classifier-free guidance as a field adapter: from a conditional field
// u(x|y) (a velocity, a score, or any prediction that is an expectation given x) it makes the plain
// field u~ = (1 - w) u(x|∅) + w u(x|y), so samplers never see guidance. The conditional field is
// evaluated once per call on a 2N batch (rows 0..N-1 with the labels y, rows N..2N-1 with the null
// label num_classes()), which is what a network wants, in scratch allocated once and reused while
// N is unchanged; one element-wise pass then combines the halves. Optional CFG rescale (Lin et al.
// 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 2): per sample,
// u_rescaled = u~ std(u(x|y)) / std(u~) and u = phi u_rescaled + (1 - phi) u~.
#pragma once

#include <cmath>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/guidance/scale.hpp"

namespace flowdiff {

/// Options of classifier-free guidance.
struct CfgOptions {
  /// phi of CFG rescale, in [0, 1]: 0 is plain CFG, 1 gives every sample the per-sample standard
  /// deviation (over its features) of the conditional output. Lin et al. use 0.7.
  double rescale = 0.0;
};

namespace detail {

// The scalar type of a guidance adapter: explicit, else the field's value_type, else the type of a
// floating-point scale.
template <class T, class F, class W>
auto guidance_value_impl() {
  if constexpr (!std::is_void_v<T>) {
    return std::type_identity<T>{};
  } else if constexpr (requires { typename F::value_type; }) {
    return std::type_identity<typename F::value_type>{};
  } else if constexpr (std::is_floating_point_v<W>) {
    return std::type_identity<W>{};
  } else {
    return std::type_identity<void>{};
  }
}
template <class T, class F, class W>
using guidance_value_t = typename decltype(guidance_value_impl<T, F, W>())::type;

template <class F>
auto guidance_backend_impl() {
  if constexpr (requires { typename F::backend; }) {
    return std::type_identity<typename F::backend>{};
  } else {
    return std::type_identity<Cpu>{};
  }
}
template <class F>
using guidance_backend_t = typename decltype(guidance_backend_impl<F>())::type;

/// 1 for a label outside [0, num_classes] (num_classes < 0: for a negative label), else 0: the term
/// of the label check's reduction on a device.
struct LabelOutside {
  const label_t* y;
  index_t num_classes;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const index_t v = static_cast<index_t>(y[i]);
    return (v < 0 || (num_classes >= 0 && v > num_classes)) ? 1.0 : 0.0;
  }
};

/// Checks labels [n] against [0, num_classes] (num_classes < 0: only >= 0) with one reduction on
/// B (B::reduce_sum of LabelOutside, deterministic), so labels that live on a device are checked
/// where they are: the message gives the number of bad labels and the valid range, not an index
/// (finding the first one would take a second pass). The device path of check_guidance_labels,
/// callable on any backend.
template <Backend B>
void check_labels_by_count(std::string_view who, View<const label_t, B> labels,
                           index_t num_classes) {
  const index_t n = labels.numel();
  const double bad = B::reduce_sum(n, LabelOutside{labels.data(), num_classes});
  if (bad == 0) return;
  const auto count = static_cast<index_t>(bad);
  if (num_classes >= 0)
    fail<config_error>(who, ": ", count, " of the ", n, " labels lie outside [0, ", num_classes,
                       "] (", num_classes, " is the null label)");
  fail<config_error>(who, ": ", count, " of the ", n, " labels are negative; labels must be >= 0");
}

/// Checks labels: [n] against [0, num_classes] (num_classes < 0: only >= 0 is checked). On a
/// host-accessible backend the message names the first bad label and its index; on a device one
/// reduction counts them (check_labels_by_count).
template <Backend B>
void check_guidance_labels(std::string_view who, View<const label_t, B> labels,
                           index_t num_classes) {
  require<shape_error>(labels.rank() == 1 && labels.numel() >= 1, who,
                       ": labels must have shape [N] with N >= 1, got ", labels.shape());
  if constexpr (!B::host_accessible) {
    check_labels_by_count<B>(who, labels, num_classes);
  } else {
    for (index_t i = 0; i < labels.numel(); ++i) {
      const label_t y = labels[i];
      if (num_classes >= 0 && (y < 0 || y > num_classes))
        fail<config_error>(who, ": labels[", i, "] = ", y, " is outside [0, ", num_classes, "] (",
                           num_classes, " is the null label)");
      if (num_classes < 0 && y < 0)
        fail<config_error>(who, ": labels[", i, "] = ", y, " must be >= 0");
    }
  }
}

/// The guidance scale at t, checked finite.
template <class Scale>
double scale_at(std::string_view who, const Scale& scale, double t) {
  const double w = static_cast<double>(scale(t));
  require<config_error>(std::isfinite(w), who, ": the guidance scale w(t) must be finite, got ", w,
                        " at t = ", t);
  return w;
}

/// CFG rescale, row by row: out *= phi std(cond_i) / std(out_i) + (1 - phi). A row whose CFG
/// output is constant (std 0) is left as it is rather than divided by zero. A free function
/// because nvcc does not allow extended lambdas in private members. cond, out: [N, ...]
template <class T, Backend B>
void cfg_rescale(View<const T, B> cond, View<T, B> out, double phi) {
  const index_t n = out.rows(), d = out.row_size();
  const T* pc = cond.data();
  T* po = out.data();
  B::parallel_for(
      n,
      FLOWDIFF_LAMBDA(index_t i) {
        const T* c = pc + i * d;
        T* o = po + i * d;
        double mc = 0, mo = 0;
        for (index_t j = 0; j < d; ++j) {
          mc += static_cast<double>(c[j]);
          mo += static_cast<double>(o[j]);
        }
        mc /= static_cast<double>(d);
        mo /= static_cast<double>(d);
        double vc = 0, vo = 0;
        for (index_t j = 0; j < d; ++j) {
          const double ec = static_cast<double>(c[j]) - mc, eo = static_cast<double>(o[j]) - mo;
          vc += ec * ec;
          vo += eo * eo;
        }
        const double f = vo > 0 ? phi * std::sqrt(vc / vo) + (1.0 - phi) : 1.0;
        for (index_t j = 0; j < d; ++j) o[j] = static_cast<T>(f * static_cast<double>(o[j]));
      },
      2 * d);
}

}  // namespace detail


/// Classifier-free guidance over a conditional field F (stored by value, or by reference when F is
/// an lvalue reference type: cfg(my_field, w) refers to my_field, cfg(make_field(), w) owns it).
template <class F, class T, class Scale = ConstantScale, Backend B = Cpu>
class Cfg {
 public:
  using field_type = std::remove_reference_t<F>;
  using value_type = T;
  using backend = B;
  static_assert(ConditionalField<field_type, T, B>,
                "cfg: the field must be a ConditionalField: field(View<const T> x, View<T> out, T "
                "t, View<const label_t> y) and num_classes()");

  Cfg(F field, Scale scale, CfgOptions options = {})
      : field_(std::forward<F>(field)), scale_(std::move(scale)), rescale_(options.rescale) {
    require<config_error>(rescale_ >= 0 && rescale_ <= 1,
                          "cfg: options.rescale (phi) must lie in [0, 1], got ", rescale_);
  }

  /// Copies the labels y: [N] (each in [0, num_classes()], num_classes() meaning ∅).
  void set_condition(View<const label_t, B> labels) {
    const index_t nc = static_cast<index_t>(field_.num_classes());
    detail::check_guidance_labels<B>("cfg::set_condition", labels, nc);
    const index_t n = labels.numel();
    labels_.resize(Shape{2 * n});
    B::copy(labels_.data(), labels.data(), n);
    fill(labels_.view().rows(n, 2 * n), static_cast<label_t>(nc));
    n_ = n;
  }

  /// The same label y for n samples.
  void set_condition(label_t y, index_t n) {
    const index_t nc = static_cast<index_t>(field_.num_classes());
    require<config_error>(y >= 0 && y <= nc, "cfg::set_condition: y = ", y, " is outside [0, ", nc,
                          "] (", nc, " is the null label)");
    require<config_error>(n >= 1, "cfg::set_condition: n must be >= 1, got ", n);
    labels_.resize(Shape{2 * n});
    fill(labels_.view().rows(0, n), y);
    fill(labels_.view().rows(n, 2 * n), static_cast<label_t>(nc));
    n_ = n;
  }

  // x, out: [N, ...] with N the number of labels given to set_condition
  void operator()(View<const T, B> x, View<T, B> out, T t) {
    const double w = check_and_scale(x, t);
    check_same_shape("cfg", "x", x, "out", View<const T, B>(out));
    const index_t n = n_;
    const View<const label_t, B> y = labels_.view();
    // Where the combination is exactly one of the two fields, evaluate only that half: this is
    // what makes limited-interval guidance cheaper than guidance everywhere.
    if (w == 1.0) {
      field_(x, out, t, y.rows(0, n));
      return;
    }
    if (w == 0.0 && rescale_ == 0.0) {
      field_(x, out, t, y.rows(n, 2 * n));
      return;
    }
    evaluate_both(x, t);
    const View<T, B> cond = out2_.view().rows(0, n);
    const View<T, B> uncond = out2_.view().rows(n, 2 * n);
    const T wc = static_cast<T>(w), wu = static_cast<T>(1.0 - w);
    transform(
        out, [wc, wu] FLOWDIFF_HOST_DEVICE(T c, T u) { return wu * u + wc * c; }, cond, uncond);
    if (rescale_ > 0.0) detail::cfg_rescale(View<const T, B>(cond), out, rescale_);
  }

  /// For samplers that fuse the combination into their update (FusableGuidance: Euler and
  /// EulerMaruyama, samplers/fused.hpp): u(x|y) and u(x|∅) from one 2N evaluation, and w at t,
  /// or nothing (and no evaluation) when operator() would not blend them: w = 0 or 1 (one half is
  /// evaluated) or CFG rescale. The views are valid until the next evaluation.
  std::optional<GuidedHalves<T, B>> evaluate_halves(View<const T, B> x, T t) {
    const double w = check_and_scale(x, t);
    if (w == 1.0 || w == 0.0 || rescale_ > 0.0) return std::nullopt;
    evaluate_both(x, t);
    const index_t n = n_;
    return GuidedHalves<T, B>{View<const T, B>(out2_.view().rows(0, n)),
                              View<const T, B>(out2_.view().rows(n, 2 * n)), w};
  }

  /// w at time t.
  double scale_at(T t) const { return detail::scale_at("cfg", scale_, static_cast<double>(t)); }
  const Scale& scale() const { return scale_; }
  double rescale() const { return rescale_; }
  /// The number of labels set (N), 0 before set_condition.
  index_t batch_size() const { return n_; }
  field_type& field() { return field_; }
  const field_type& field() const { return field_; }

 private:
  // The checks of an evaluation at t; returns w(t).
  double check_and_scale(View<const T, B> x, T t) const {
    const char* who = "cfg";
    check_time(who, t);
    require<config_error>(n_ > 0, who, ": call set_condition(labels) before evaluating the field");
    require<shape_error>(x.rank() >= 1 && x.rows() == n_, who, ": x has shape ", x.shape(),
                         " but set_condition received ", n_, " labels");
    return detail::scale_at(who, scale_, static_cast<double>(t));
  }

  // out2_ = [u(x|y); u(x|∅)]: the field once on the 2N batch [x; x] with the labels [y; ∅].
  void evaluate_both(View<const T, B> x, T t) {
    const Shape s2 = x.shape().with_rows(2 * n_);
    x2_.resize(s2);
    out2_.resize(s2);
    const index_t m = x.numel();
    B::copy(x2_.data(), x.data(), m);
    B::copy(x2_.data() + m, x.data(), m);
    field_(View<const T, B>(x2_.view()), out2_.view(), t, View<const label_t, B>(labels_.view()));
  }

  F field_;
  Scale scale_;
  double rescale_;
  index_t n_ = 0;
  Tensor<label_t, B> labels_;  // [2N]: y, then ∅
  Tensor<T, B> x2_, out2_;     // [2N, ...]
};

/// Classifier-free guidance u~ = (1 - w) u(x|∅) + w u(x|y). `w` is a number or a callable t -> w
/// (e.g. guidance_interval(3.0, 0.2, 0.8)). The scalar type is T if given, else the field's
/// value_type, else the type of a floating-point w: `cfg(field, 3.0f)`, `cfg<double>(f, interval)`.
template <class T = void, class F, class W>
auto cfg(F&& field, W w, CfgOptions options = {}) {
  using FieldT = std::remove_cvref_t<F>;
  using Value = detail::guidance_value_t<T, FieldT, W>;
  static_assert(!std::is_void_v<Value>,
                "cfg: cannot tell the scalar type; write cfg<float>(field, w) (or give the field a "
                "value_type)");
  auto scale = detail::make_scale("cfg", w);
  return Cfg<F, Value, decltype(scale), detail::guidance_backend_t<FieldT>>(std::forward<F>(field),
                                                                            scale, options);
}

}  // namespace flowdiff
