// flowdiff/analytic/gaussian_mixture.hpp — an exact, labelled Gaussian mixture in d dimensions
// p(z) = sum_k pi_k N(z; mu_k, diag(s_k^2)) and everything a Gaussian path x = alpha_t z + beta_t eps
// makes of it, in closed form, for any Schedule: the marginal
//   p_t(x) = sum_k pi_k N(x; alpha_t mu_k, alpha_t^2 diag(s_k^2) + beta_t^2 I),
// its marginal vector field u_t(x) = sum_k r_k(x) [d_alpha mu_k + g_k (x - alpha mu_k)] with
// g_k = (d_alpha alpha s_k^2 + d_beta beta) / (alpha^2 s_k^2 + beta^2) per dimension, the score, the
// data and noise predictions, the class-conditional versions (responsibilities restricted to the
// components of class y), log p_t(x), log p_t(x|y), log p_t(y|x) and ∇_x log p_t(y|x). These are
// the library's test oracles. Host-only (CPU backend): the fields run over samples in parallel and
// allocate nothing per call once they have seen a batch size.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flowdiff/analytic/mixture_kernel.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff::analytic {

/// Samples of a mixture: x: [n, d], labels: [n] (the null label num_classes() when the mixture is
/// unlabelled), components: [n] (which component each sample came from).
template <class T>
struct MixtureSamples {
  Tensor<T> x;
  Tensor<label_t> labels;
  Tensor<index_t> components;
};

namespace detail {
template <Schedule S>
PathValues path_values(const S& s, double t) {
  const auto v = flowdiff::evaluate<double>(s, t);
  return {t, v.alpha, v.beta, v.d_alpha, v.beta_d_beta};
}
}  // namespace detail

/// A posterior-mean field of a mixture under schedule S: `field(x, out, t)` writes the unconditional
/// quantity Q, `field(x, out, t, y)` the class-conditional one (y[i] == num_classes() is ∅). Both
/// Field and ConditionalField. Holds scratch, so one object must not be called from two threads at
/// once (copies are independent).
template <class T, Schedule S, Quantity Q>
class MixtureField {
 public:
  using value_type = T;
  using backend = Cpu;

  MixtureField(std::shared_ptr<const detail::MixtureParams> p, S schedule)
      : p_(std::move(p)), schedule_(std::move(schedule)) {
    coeffs_.resize(p_->K, p_->d);
  }

  index_t num_classes() const { return p_->num_classes; }
  index_t dim() const { return p_->d; }
  const S& schedule() const { return schedule_; }

  // x, out: [N, d]
  void operator()(View<const T> x, View<T> out, T t) { run(x, out, t, nullptr); }

  // x, out: [N, d]; y: [N]
  void operator()(View<const T> x, View<T> out, T t, View<const label_t> y) { run(x, out, t, &y); }

  /// The exact divergence of the (unconditional) field, div: [N]. With the field
  /// f = sum_k r_k m_k, m_kj = a_kj + b_kj x_j and d r_k / d x_j = r_k (g_kj - sum_m r_m g_mj),
  /// g_kj = -(x_j - alpha mu_kj) / v_kj:
  ///   div f = sum_j [ sum_k r_k b_kj + sum_k r_k g_kj m_kj - (sum_k r_k g_kj)(sum_k r_k m_kj) ].
  /// Used by log_likelihood(..., Divergence::exact).
  void divergence(View<const T> x, View<T> div, T t) {
    const char* who = "GaussianMixture::divergence";
    check_time(who, t);
    const index_t n = detail::check_batch(who, x, p_->d);
    check_shape(who, div, Shape{n});
    detail::prepare_coeffs(*p_, detail::path_values(schedule_, static_cast<double>(t)), Q, coeffs_,
                           who);
    const index_t K = coeffs_.K, d = coeffs_.d;
    const auto& c = coeffs_;
    const T* px = x.data();
    T* pd = div.data();
    Cpu::parallel_for(
        n,
        [&](index_t i) {
          // Small per-row buffers: K logits / responsibilities.
          std::vector<double> logit(static_cast<std::size_t>(K)), r(static_cast<std::size_t>(K));
          const T* xi = px + i * d;
          for (index_t k = 0; k < K; ++k) logit[k] = c.log_norm[k];
          for (index_t j = 0; j < d; ++j)
            for (index_t k = 0; k < K; ++k) {
              const auto jk = static_cast<std::size_t>(j * K + k);
              const double diff = double(xi[j]) - c.center[jk];
              logit[k] -= c.half_prec[jk] * diff * diff;
            }
          detail::softmax(logit.data(), K, nullptr, 0, detail::Select::all, r.data());
          double total = 0;
          for (index_t j = 0; j < d; ++j) {
            double sb = 0, sgm = 0, sg = 0, sm = 0;
            for (index_t k = 0; k < K; ++k) {
              const auto jk = static_cast<std::size_t>(j * K + k);
              const double m = c.a[jk] + c.b[jk] * double(xi[j]);
              const double g = -2 * c.half_prec[jk] * (double(xi[j]) - c.center[jk]);
              sb += r[k] * c.b[jk];
              sgm += r[k] * g * m;
              sg += r[k] * g;
              sm += r[k] * m;
            }
            total += sb + sgm - sg * sm;
          }
          pd[i] = static_cast<T>(total);
        },
        K * d);
  }

 private:
  // A literal, not a std::string: the field call must not allocate.
  static constexpr const char* name() {
    switch (Q) {
      case Quantity::velocity: return "GaussianMixture::velocity";
      case Quantity::score: return "GaussianMixture::score";
      case Quantity::data_prediction: return "GaussianMixture::data_prediction";
      case Quantity::noise_prediction: return "GaussianMixture::noise_prediction";
    }
    return "GaussianMixture";
  }

  void run(View<const T> x, View<T> out, T t, const View<const label_t>* y) {
    const char* who = name();
    check_time(who, t);
    const index_t n = detail::check_batch(who, x, p_->d);
    check_same_shape(who, "x", x, "out", View<const T>(out));
    if (y != nullptr) detail::check_labels(who, *y, n, p_->num_classes);
    detail::prepare_coeffs(*p_, detail::path_values(schedule_, static_cast<double>(t)), Q, coeffs_,
                           who);
    detail::evaluate_batch<detail::Mode::field>(*p_, coeffs_, x.data(), n, out.data(),
                                                y != nullptr ? y->data() : nullptr, scratch_);
  }

  std::shared_ptr<const detail::MixtureParams> p_;
  S schedule_;
  detail::MixtureCoeffs coeffs_;
  std::vector<double> scratch_;
};

/// ∇_x log p_t(y|x) = score_t(x|y) - score_t(x) of a labelled mixture: `grad(x, out, t, y)`
/// (zero for the null label), and `log_prob(x, out, t, y)` = log p_t(y|x) for checks.
template <class T, Schedule S>
class MixtureClassifierGradient {
 public:
  using value_type = T;
  using backend = Cpu;

  MixtureClassifierGradient(std::shared_ptr<const detail::MixtureParams> p, S schedule)
      : p_(std::move(p)), schedule_(std::move(schedule)) {
    coeffs_.resize(p_->K, p_->d);
  }

  index_t num_classes() const { return p_->num_classes; }

  // x, out: [N, d]; y: [N]
  void operator()(View<const T> x, View<T> out, T t, View<const label_t> y) {
    const char* who = "GaussianMixture::classifier_gradient";
    const index_t n = prepare(who, x, t, y);
    check_same_shape(who, "x", x, "out", View<const T>(out));
    detail::evaluate_batch<detail::Mode::class_gradient>(*p_, coeffs_, x.data(), n, out.data(),
                                                         y.data(), scratch_);
  }

  // x: [N, d]; out: [N]; y: [N]
  void log_prob(View<const T> x, View<T> out, T t, View<const label_t> y) {
    const char* who = "GaussianMixture::classifier_gradient::log_prob";
    const index_t n = prepare(who, x, t, y);
    check_shape("GaussianMixture::classifier_gradient::log_prob: out", out, Shape{n});
    detail::evaluate_batch<detail::Mode::class_log_prob>(*p_, coeffs_, x.data(), n, out.data(),
                                                         y.data(), scratch_);
  }

 private:
  index_t prepare(const char* who, View<const T> x, T t, View<const label_t> y) {
    check_time(who, t);
    const index_t n = detail::check_batch(who, x, p_->d);
    detail::check_labels(who, y, n, p_->num_classes);
    detail::prepare_coeffs(*p_, detail::path_values(schedule_, static_cast<double>(t)),
                           Quantity::score, coeffs_, who);
    return n;
  }

  std::shared_ptr<const detail::MixtureParams> p_;
  S schedule_;
  detail::MixtureCoeffs coeffs_;
  std::vector<double> scratch_;
};

/// A Gaussian mixture with diagonal covariances and optional class labels per component (several
/// components may share a class). Immutable; copies share the parameters.
template <std::floating_point T>
class GaussianMixture {
 public:
  using value_type = T;

  /// weights: [K] (> 0, normalised here); means, stddevs: [K, d] (stddevs >= 0; a zero stddev is a
  /// point mass in that dimension, whose density only exists at t < 1); labels: [K] or empty;
  /// num_classes: -1 to use max(labels) + 1. Every class in [0, num_classes) needs a component.
  GaussianMixture(std::vector<T> weights, View<const T> means, View<const T> stddevs,
                  std::vector<label_t> labels = {}, index_t num_classes = -1) {
    const char* who = "GaussianMixture";
    const auto K = static_cast<index_t>(weights.size());
    require<config_error>(K >= 1, who, ": weights must hold at least one component, got none");
    require<shape_error>(means.rank() == 2 && means.dim(0) == K && means.dim(1) >= 1, who,
                         ": means must have shape [K, d] with K = ", K, " (the number of weights)",
                         ", got ", means.shape());
    const index_t d = means.dim(1);
    check_shape(std::string(who) + ": stddevs", stddevs, Shape{K, d});
    auto p = std::make_shared<detail::MixtureParams>();
    p->K = K;
    p->d = d;
    double total = 0;
    for (index_t k = 0; k < K; ++k) {
      const double w = static_cast<double>(weights[static_cast<std::size_t>(k)]);
      require<config_error>(std::isfinite(w) && w > 0, who, ": weights[", k,
                            "] must be finite and > 0, got ", w);
      total += w;
    }
    for (index_t k = 0; k < K; ++k) {
      const double w = static_cast<double>(weights[static_cast<std::size_t>(k)]) / total;
      p->weight.push_back(w);
      p->log_weight.push_back(std::log(w));
      for (index_t j = 0; j < d; ++j) {
        const double mu = static_cast<double>(means(k, j));
        const double s = static_cast<double>(stddevs(k, j));
        require<config_error>(std::isfinite(mu), who, ": means[", k, ", ", j,
                              "] must be finite, got ", mu);
        require<config_error>(std::isfinite(s) && s >= 0, who, ": stddevs[", k, ", ", j,
                              "] must be finite and >= 0, got ", s);
        p->mean.push_back(mu);
        p->stddev.push_back(s);
      }
    }
    set_labels(*p, std::move(labels), num_classes);
    p_ = std::move(p);
  }

  /// Isotropic components: stddevs: [K], one standard deviation per component.
  static GaussianMixture isotropic(std::vector<T> weights, View<const T> means,
                                   std::vector<T> stddevs, std::vector<label_t> labels = {},
                                   index_t num_classes = -1) {
    require<shape_error>(means.rank() == 2, "GaussianMixture::isotropic: means must have shape ",
                         "[K, d], got ", means.shape());
    require<shape_error>(stddevs.size() == weights.size(),
                         "GaussianMixture::isotropic: stddevs must hold one value per component (",
                         weights.size(), "), got ", stddevs.size());
    Tensor<T> s(means.shape());
    for (index_t k = 0; k < means.dim(0); ++k)
      for (index_t j = 0; j < means.dim(1); ++j) s(k, j) = stddevs[static_cast<std::size_t>(k)];
    return GaussianMixture(std::move(weights), means, s, std::move(labels), num_classes);
  }

  /// A single Gaussian N(mean, diag(stddev^2)) (K = 1, unlabelled).
  static GaussianMixture gaussian(std::vector<T> mean, std::vector<T> stddev) {
    require<shape_error>(mean.size() == stddev.size() && !mean.empty(),
                         "GaussianMixture::gaussian: mean and stddev must have the same, non-zero "
                         "length, got ",
                         mean.size(), " and ", stddev.size());
    const auto d = static_cast<index_t>(mean.size());
    auto m = Tensor<T>::from({1, d}, std::span<const T>(mean));
    auto s = Tensor<T>::from({1, d}, std::span<const T>(stddev));
    return GaussianMixture({T(1)}, m, s);
  }

  /// A single isotropic Gaussian N(mean, stddev^2 I).
  static GaussianMixture gaussian(std::vector<T> mean, T stddev) {
    std::vector<T> s(mean.size(), stddev);
    return gaussian(std::move(mean), std::move(s));
  }

  /// N(0, I) in d dimensions: p_init, the t = 0 marginal of every path.
  static GaussianMixture standard_normal(index_t d) {
    require<config_error>(d >= 1, "GaussianMixture::standard_normal: d must be >= 1, got ", d);
    return gaussian(std::vector<T>(static_cast<std::size_t>(d), T(0)), T(1));
  }

  index_t num_components() const { return p_->K; }
  index_t dim() const { return p_->d; }
  /// 0 for an unlabelled mixture; the null label is num_classes().
  index_t num_classes() const { return p_->num_classes; }
  bool labelled() const { return !p_->label.empty(); }
  T weight(index_t k) const { return static_cast<T>(p_->weight[at(k)]); }
  T mean(index_t k, index_t j) const { return static_cast<T>(p_->mean[at(k, j)]); }
  T stddev(index_t k, index_t j) const { return static_cast<T>(p_->stddev[at(k, j)]); }
  /// The class of component k (the null label when unlabelled).
  label_t label(index_t k) const {
    return labelled() ? p_->label[at(k)] : static_cast<label_t>(p_->num_classes);
  }
  /// p(y): the total weight of class y's components (1 for the null label).
  T class_weight(label_t y) const {
    check_label("GaussianMixture::class_weight", y);
    return y == p_->num_classes ? T(1) : static_cast<T>(std::exp(p_->class_log_weight[y]));
  }

  // ---- sampling -------------------------------------------------------------------------------

  /// n samples of p. Sample i depends on (seed, call counter, i) only.
  MixtureSamples<T> sample(index_t n, Generator& gen) const {
    return sample_impl("GaussianMixture::sample", n, nullptr, static_cast<label_t>(num_classes()),
                       gen);
  }

  /// n samples of p(.|y); y == num_classes() samples p itself.
  MixtureSamples<T> sample_class(label_t y, index_t n, Generator& gen) const {
    check_label("GaussianMixture::sample_class", y);
    return sample_impl("GaussianMixture::sample_class", n, nullptr, y, gen);
  }

  /// One sample of p(.|y_i) per label. y: [n]
  MixtureSamples<T> sample_class(View<const label_t> y, Generator& gen) const {
    const char* who = "GaussianMixture::sample_class";
    detail::check_labels(who, y, y.numel(), num_classes());
    return sample_impl(who, y.numel(), y.data(), 0, gen);
  }

  // ---- exact densities of this distribution (double accumulation, log-sum-exp) -------------

  /// out[i] = log p(x_i). x: [N, d]; out: [N]
  void log_density(View<const T> x, View<T> out) const {
    density_impl<detail::Mode::log_density>("GaussianMixture::log_density", x, out, nullptr);
  }
  /// out[i] = log p(x_i | y_i) (y_i == num_classes(): log p(x_i)). x: [N, d]; out, y: [N]
  void log_density(View<const T> x, View<T> out, View<const label_t> y) const {
    density_impl<detail::Mode::log_density>("GaussianMixture::log_density", x, out, &y);
  }
  /// out[i] = log p(y_i | x_i) (0 for the null label). x: [N, d]; out, y: [N]
  void class_log_prob(View<const T> x, View<T> out, View<const label_t> y) const {
    density_impl<detail::Mode::class_log_prob>("GaussianMixture::class_log_prob", x, out, &y);
  }
  /// out = ∇_x log p(x). x, out: [N, d]
  void grad_log_density(View<const T> x, View<T> out) const {
    gradient_impl<detail::Mode::field>("GaussianMixture::grad_log_density", x, out, nullptr);
  }
  /// out = ∇_x log p(x | y). x, out: [N, d]; y: [N]
  void grad_log_density(View<const T> x, View<T> out, View<const label_t> y) const {
    gradient_impl<detail::Mode::field>("GaussianMixture::grad_log_density", x, out, &y);
  }
  /// out = ∇_x log p(y | x). x, out: [N, d]; y: [N]
  void grad_class_log_prob(View<const T> x, View<T> out, View<const label_t> y) const {
    gradient_impl<detail::Mode::class_gradient>("GaussianMixture::grad_class_log_prob", x, out,
                  &y);
  }

  // ---- the path p_t ------------------------------------------------------------------------

  /// p_t as a mixture: means alpha_t mu_k, stddevs sqrt(alpha_t^2 s_k^2 + beta_t^2), same weights
  /// and labels. Its log_density, class_log_prob, ... are log p_t(x), log p_t(y|x), ...
  template <Schedule S>
  GaussianMixture marginal(const S& schedule, T t) const {
    check_time("GaussianMixture::marginal", t);
    const auto v = detail::path_values(schedule, static_cast<double>(t));
    auto p = std::make_shared<detail::MixtureParams>(*p_);
    for (std::size_t i = 0; i < p->mean.size(); ++i) {
      const double s = p->stddev[i];
      p->mean[i] = v.alpha * p->mean[i];
      p->stddev[i] = std::sqrt(v.alpha * v.alpha * s * s + v.beta * v.beta);
    }
    return GaussianMixture(std::move(p));
  }

  /// The marginal vector field u_t(x) (and u_t(x|y)).
  template <Schedule S>
  MixtureField<T, S, Quantity::velocity> velocity(S schedule) const {
    return {p_, std::move(schedule)};
  }
  /// The score ∇_x log p_t(x) (and ∇_x log p_t(x|y)).
  template <Schedule S>
  MixtureField<T, S, Quantity::score> score(S schedule) const {
    return {p_, std::move(schedule)};
  }
  /// E[z | x_t] (and E[z | x_t, y]).
  template <Schedule S>
  MixtureField<T, S, Quantity::data_prediction> data_prediction(S schedule) const {
    return {p_, std::move(schedule)};
  }
  /// E[eps | x_t] (and E[eps | x_t, y]).
  template <Schedule S>
  MixtureField<T, S, Quantity::noise_prediction> noise_prediction(S schedule) const {
    return {p_, std::move(schedule)};
  }
  /// ∇_x log p_t(y|x), called as (x, out, t, y): the exact classifier for classifier guidance.
  template <Schedule S>
  MixtureClassifierGradient<T, S> classifier_gradient(S schedule) const {
    return {p_, std::move(schedule)};
  }

 private:
  explicit GaussianMixture(std::shared_ptr<const detail::MixtureParams> p) : p_(std::move(p)) {}

  static void set_labels(detail::MixtureParams& p, std::vector<label_t> labels,
                         index_t num_classes) {
    const char* who = "GaussianMixture";
    if (labels.empty()) {
      require<config_error>(num_classes <= 0, who, ": num_classes = ", num_classes,
                            " needs one label per component, got none");
      p.num_classes = 0;
      return;
    }
    require<shape_error>(static_cast<index_t>(labels.size()) == p.K, who,
                         ": labels must hold one label per component (", p.K, "), got ",
                         labels.size());
    label_t max_label = 0;
    for (std::size_t k = 0; k < labels.size(); ++k) {
      require<config_error>(labels[k] >= 0, who, ": labels[", k, "] must be >= 0, got ",
                            labels[k]);
      max_label = std::max(max_label, labels[k]);
    }
    if (num_classes < 0) num_classes = index_t(max_label) + 1;
    require<config_error>(max_label < num_classes, who, ": labels must lie in [0, num_classes = ",
                          num_classes, "), got ", max_label);
    std::vector<double> class_weight(static_cast<std::size_t>(num_classes), 0.0);
    for (std::size_t k = 0; k < labels.size(); ++k)
      class_weight[static_cast<std::size_t>(labels[k])] += p.weight[k];
    for (index_t c = 0; c < num_classes; ++c)
      require<config_error>(class_weight[static_cast<std::size_t>(c)] > 0, who, ": class ", c,
                            " has no component (num_classes = ", num_classes, ")");
    p.num_classes = num_classes;
    p.label = std::move(labels);
    p.class_log_weight.clear();
    for (double w : class_weight) p.class_log_weight.push_back(std::log(w));
  }

  std::size_t at(index_t k) const {
    require<config_error>(k >= 0 && k < p_->K, "GaussianMixture: component index ", k,
                          " is outside [0, ", p_->K, ")");
    return static_cast<std::size_t>(k);
  }
  std::size_t at(index_t k, index_t j) const {
    require<config_error>(j >= 0 && j < p_->d, "GaussianMixture: dimension ", j,
                          " is outside [0, ", p_->d, ")");
    return at(k) * static_cast<std::size_t>(p_->d) + static_cast<std::size_t>(j);
  }
  void check_label(const char* who, label_t y) const {
    require<config_error>(y >= 0 && y <= p_->num_classes, who, ": y = ", y, " is outside [0, ",
                          p_->num_classes, "] (", p_->num_classes, " is the null label)");
  }

  // Cumulative weights of the components of class y (of all when y is the null label): a
  // component of another class adds 0, so the first index whose cumulative weight exceeds u * total
  // is always a component of the class.
  std::vector<double> cumulative(label_t y) const {
    std::vector<double> cum(static_cast<std::size_t>(p_->K));
    double c = 0;
    for (index_t k = 0; k < p_->K; ++k) {
      const auto kk = static_cast<std::size_t>(k);
      if (y == p_->num_classes || p_->label[kk] == y) c += p_->weight[kk];
      cum[kk] = c;
    }
    return cum;
  }

  MixtureSamples<T> sample_impl(const char* who, index_t n, const label_t* per_sample,
                                label_t y_all, Generator& gen) const {
    require<config_error>(n >= 0, who, ": n must be >= 0, got ", n);
    const index_t K = p_->K, d = p_->d;
    const index_t nc = p_->num_classes;
    std::vector<std::vector<double>> cum;  // per class, then the null label
    for (index_t c = 0; c <= nc; ++c) cum.push_back(cumulative(static_cast<label_t>(c)));
    MixtureSamples<T> s{Tensor<T>(Shape{n, d}), Tensor<label_t>(Shape{n}),
                        Tensor<index_t>(Shape{n})};
    Tensor<double> u(Shape{n});
    fill_uniform(u, gen);
    fill_normal(s.x, gen);
    const double* mean = p_->mean.data();
    const double* sd = p_->stddev.data();
    for (index_t i = 0; i < n; ++i) {
      const label_t yi = per_sample != nullptr ? per_sample[i] : y_all;
      const auto& c = cum[static_cast<std::size_t>(yi)];
      const double target = u[i] * c.back();
      auto k = static_cast<index_t>(std::upper_bound(c.begin(), c.end(), target) - c.begin());
      // Rounding can put target at the total: take the last component of the class then.
      if (k >= K)
        for (k = K - 1; k > 0 && yi != nc && p_->label[static_cast<std::size_t>(k)] != yi;) --k;
      s.components[i] = k;
      s.labels[i] = label(k);
      for (index_t j = 0; j < d; ++j)
        s.x(i, j) =
            static_cast<T>(mean[k * d + j] + sd[k * d + j] * static_cast<double>(s.x(i, j)));
    }
    return s;
  }

  // Densities are those of the mixture itself: the path values of t = 1 with alpha = 1, beta = 0.
  detail::MixtureCoeffs data_coeffs(const char* who) const {
    detail::MixtureCoeffs c;
    detail::prepare_coeffs(*p_, detail::PathValues{1.0, 1.0, 0.0, 1.0, 0.0}, Quantity::score, c,
                           who);
    return c;
  }

  template <detail::Mode mode>
  void density_impl(const char* who, View<const T> x, View<T> out,
                    const View<const label_t>* y) const {
    const index_t n = detail::check_batch(who, x, p_->d);
    check_shape(std::string(who) + " out", out, Shape{n});
    if (y != nullptr) detail::check_labels(who, *y, n, p_->num_classes);
    const auto c = data_coeffs(who);
    std::vector<double> scratch;
    detail::evaluate_batch<mode>(*p_, c, x.data(), n, out.data(), y ? y->data() : nullptr, scratch);
  }

  template <detail::Mode mode>
  void gradient_impl(const char* who, View<const T> x, View<T> out,
                     const View<const label_t>* y) const {
    const index_t n = detail::check_batch(who, x, p_->d);
    check_same_shape(who, "x", x, "out", View<const T>(out));
    if (y != nullptr) detail::check_labels(who, *y, n, p_->num_classes);
    const auto c = data_coeffs(who);
    std::vector<double> scratch;
    detail::evaluate_batch<mode>(*p_, c, x.data(), n, out.data(), y ? y->data() : nullptr, scratch);
  }

  std::shared_ptr<const detail::MixtureParams> p_;
};

static_assert(Field<MixtureField<float, schedules::Linear, Quantity::velocity>, float>);
static_assert(ConditionalField<MixtureField<double, schedules::Linear, Quantity::score>, double>);

}  // namespace flowdiff::analytic
