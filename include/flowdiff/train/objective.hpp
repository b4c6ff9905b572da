// flowdiff/train/objective.hpp — the regression objectives that train a network on a Gaussian
// path: conditional flow matching (CFM), its classifier-free form with per-sample label dropout,
// and denoising score matching (DSM). For data z ~ p_data (with labels y), t ~ p(t), eps ~ N(0, I):
//   x_t = alpha_t z + beta_t eps,     target = c1(t) z + c2(t) eps     (GaussianPath::target)
//   y'  = ∅ with probability eta, else y                                (CFG label dropout)
//   L(theta) = 1/(N D) sum_i w(t_i) || f_theta(x_t_i, t_i, y'_i) - target_i ||^2
// with D the elements per sample (PyTorch's F.mse_loss mean). The velocity target
// d_alpha z + d_beta eps is CFM (its minimiser is the marginal field u_t(x|y), Lipman et al. 2023);
// the score target -eps/beta is DSM (minimiser grad log p_t(x|y), Vincent 2011), usually weighted
// by w = beta_t^2, which makes the loss ||beta f + eps||^2 and keeps it finite as beta -> 0; noise,
// data and v targets train the other parametrisations (paths/convert.hpp turns any of them back
// into a velocity for the samplers). The gradient handed to the network is
// dL/df_i = 2 w(t_i) (f_i - target_i) / (N D). One objective owns its scratch tensors and draws
// t, eps and the dropout from the caller's generator (three calls, per-sample streams), so a step
// is a pure function of (parameters, data batch, generator state).
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <string_view>
#include <utility>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/gaussian_path.hpp"
#include "flowdiff/paths/schedule.hpp"
#include "flowdiff/train/time_sampler.hpp"

namespace flowdiff::train {

/// The per-sample loss weight w(t).
enum class Weighting {
  uniform,       ///< w = 1
  beta_squared,  ///< w = beta_t^2 (DSM's classical lambda(t) = sigma^2: ||beta s + eps||^2)
};

struct ObjectiveOptions {
  /// What the network predicts (its regression target). velocity: CFM; score: DSM.
  Parametrization target = Parametrization::velocity;
  /// eta: probability that a sample's label is replaced by the null label ∅ (= num_classes).
  double cfg_dropout = 0;
  Weighting weighting = Weighting::uniform;
  /// A custom weight w(t) (> 0, finite); overrides `weighting` when set.
  std::function<double(double)> weight = {};
};

namespace detail {

/// The labels of one CFG training batch (per-sample label dropout): out[i] = the null label k
/// when u[i] < eta, else y[i] (the null label when there are no labels), with u[i] uniform in
/// [0, 1) from one fill of the generator — always one call, so the stream of later steps does
/// not depend on eta. A label outside [0, k] is a config_error naming `who` and the sample.
/// u and out are host views of the batch size.
template <class T>
void draw_cfg_labels(const char* who, View<const label_t> y, bool has_labels, index_t k,
                     double eta, View<T> u, View<label_t> out, Generator& gen) {
  const index_t n = out.numel();
  const auto null = static_cast<label_t>(k);
  fill_uniform(u, gen);
  const T e = static_cast<T>(eta);
  const T* pu = u.data();
  label_t* po = out.data();
  for (index_t i = 0; i < n; ++i) {
    label_t l = null;
    if (has_labels) {
      l = y[i];
      require<config_error>(l >= 0 && l <= null, who, ": y[", i, "] = ", l,
                            " is not a label in [0, ", k, "] (", k, " = ∅)");
    }
    po[i] = pu[i] < e ? null : l;
  }
}


/// w[i] = the loss weight of sample i at time t[i]: o.weight(t) when set (a config_error naming
/// `who` unless finite and >= 0), beta_t^2 for Weighting::beta_squared, else 1. Host views.
template <class T, class S>
void loss_weights(const char* who, const ObjectiveOptions& o, const S& schedule,
                  View<const T> t, View<T> w) {
  const T* pt = t.data();
  T* pw = w.data();
  for (index_t i = 0; i < w.numel(); ++i) {
    double wi = 1;
    const double ti = static_cast<double>(pt[i]);
    if (o.weight) {
      wi = o.weight(ti);
      require<config_error>(std::isfinite(wi) && wi >= 0, who, ": the weight w(t) at t = ", ti,
                            " is ", wi, "; it must be finite and >= 0");
    } else if (o.weighting == Weighting::beta_squared) {
      const double b = flowdiff::evaluate(schedule, ti).beta;
      wi = b * b;
    }
    pw[i] = static_cast<T>(wi);
  }
}

}  // namespace detail

/// A network trained by an objective: forward(ps, x, t, y, out, cache), backward(ps, dout, dx,
/// cache) and num_classes() (nn::MLP, nn::UNet, ... all are).
template <class M>
concept TrainableModel = requires(const M& m, nn::Parameters<typename M::value_type>& ps,
                                  View<const typename M::value_type> x,
                                  View<typename M::value_type> out, View<const label_t> y,
                                  typename M::Cache& cache) {
  m.forward(ps, x, x, y, out, cache);
  m.backward(ps, x, out, cache);
  { m.num_classes() } -> std::convertible_to<index_t>;
};

template <class T, Schedule S, class Times = UniformTime>
class PathObjective {
 public:
  using value_type = T;

  PathObjective(GaussianPath<S> path, Times times = {}, ObjectiveOptions options = {})
      : path_(std::move(path)), times_(std::move(times)), o_(std::move(options)) {
    require<config_error>(
        std::isfinite(o_.cfg_dropout) && o_.cfg_dropout >= 0 && o_.cfg_dropout <= 1,
        "PathObjective: cfg_dropout (eta) must lie in [0, 1], got ", o_.cfg_dropout);
  }

  const GaussianPath<S>& path() const { return path_; }
  const Times& times() const { return times_; }
  const ObjectiveOptions& options() const { return o_; }

  /// One stochastic estimate of L(theta) on the batch z (with labels y) and its gradient: the
  /// parameter gradients of `model` accumulate (+=) into ps. Returns the mean loss.
  /// z: [N, ...] data; y: [N] labels in [0, num_classes] or empty (a conditional model then
  /// trains unconditionally, on ∅).
  template <TrainableModel M>
  double forward_backward(const M& model, nn::Parameters<T>& ps, typename M::Cache& cache,
                          View<const T> z, View<const label_t> y, Generator& gen) {
    const double loss = run(model, ps, cache, z, y, gen, /*with_gradient=*/true);
    model.backward(ps, View<const T>(dpred_.view()), View<T>{}, cache);
    return loss;
  }

  /// The loss alone (no backward), drawing t, eps and the dropout exactly as forward_backward.
  template <TrainableModel M>
  double loss(const M& model, const nn::Parameters<T>& ps, typename M::Cache& cache,
              View<const T> z, View<const label_t> y, Generator& gen) {
    return run(model, ps, cache, z, y, gen, /*with_gradient=*/false);
  }

  // The last batch, for inspection and tests.
  View<const T> last_times() const { return t_.view(); }              // [N]
  View<const T> last_noise() const { return eps_.view(); }            // [N, ...]
  View<const T> last_inputs() const { return xt_.view(); }            // [N, ...]: x_t
  View<const T> last_targets() const { return target_.view(); }       // [N, ...]
  View<const T> last_predictions() const { return pred_.view(); }     // [N, ...]
  View<const T> last_weights() const { return w_.view(); }            // [N]
  View<const label_t> last_labels() const { return labels_.view(); }  // [N], after dropout

 private:
  template <class M>
  double run(const M& model, const nn::Parameters<T>& ps, typename M::Cache& cache, View<const T> z,
             View<const label_t> y, Generator& gen, bool with_gradient) {
    require<shape_error>(z.rank() >= 2 && z.dim(0) >= 1,
                         "PathObjective: z must be a batch [N, ...] with N >= 1, got ", z.shape());
    const index_t n = z.dim(0);
    const index_t k = static_cast<index_t>(model.num_classes());
    const bool has_labels = y.data() != nullptr && !y.empty();
    if (has_labels)
      require<shape_error>(y.rank() == 1 && y.dim(0) == n, "PathObjective: y must have shape [", n,
                           "] (one label per sample of z ", z.shape(), "), got ", y.shape());
    require<config_error>(o_.cfg_dropout == 0 || k > 0,
                          "PathObjective: cfg_dropout = ", o_.cfg_dropout,
                          " needs a class-conditional model, but the model has num_classes = 0");
    require<config_error>(!has_labels || k > 0,
                          "PathObjective: labels y were given but the model is unconditional "
                          "(num_classes = 0)");
    prepare(z.shape(), k > 0);

    // Randomness: three generator calls, always in this order (t, eps, dropout).
    times_.sample(t_.view(), gen);
    fill_normal(eps_, gen);
    if (k > 0) draw_labels(y, has_labels, k, gen);

    path_.sample(z, eps_, t_, xt_);
    path_.target(o_.target, z, eps_, t_, target_);
    compute_weights();

    const View<const label_t> labels =
        k > 0 ? View<const label_t>(labels_.view()) : View<const label_t>{};
    model.forward(ps, View<const T>(xt_.view()), View<const T>(t_.view()), labels, pred_.view(),
                  cache);

    // Loss (double, deterministic block order) and, when asked, dL/dpred.
    const index_t d = z.row_size();
    const double inv = 1.0 / (static_cast<double>(n) * static_cast<double>(d));
    const T* pp = pred_.data();
    const T* pt = target_.data();
    const T* pw = w_.data();
    const double sum = Cpu::reduce_sum(n * d, [=](index_t i) {
      const double r = static_cast<double>(pp[i]) - static_cast<double>(pt[i]);
      return static_cast<double>(pw[i / d]) * r * r;
    });
    const double loss = sum * inv;
    require<numeric_error>(std::isfinite(loss), "PathObjective: the loss is not finite (", loss,
                           "); check the data, the learning rate and the time range (score "
                           "targets need t_max < 1)");
    if (with_gradient) {
      T* g = dpred_.data();
      const T c = static_cast<T>(2.0 * inv);
      Cpu::parallel_for(
          n,
          [=](index_t i) {
            const T wi = c * pw[i];
            for (index_t j = i * d; j < (i + 1) * d; ++j) g[j] = wi * (pp[j] - pt[j]);
          },
          d);
    }
    return loss;
  }

  void prepare(const Shape& s, bool conditional) {
    const index_t n = s[0];
    if (!(xt_.shape() == s)) {
      eps_.resize(s);
      xt_.resize(s);
      target_.resize(s);
      pred_.resize(s);
      dpred_.resize(s);
    }
    t_.resize(Shape{n});
    w_.resize(Shape{n});
    if (conditional) {
      labels_.resize(Shape{n});
      u_.resize(Shape{n});
    }
  }

  void draw_labels(View<const label_t> y, bool has_labels, index_t k, Generator& gen) {
    detail::draw_cfg_labels<T>("PathObjective", y, has_labels, k, o_.cfg_dropout, u_.view(),
                               labels_.view(), gen);
  }

  void compute_weights() {
    detail::loss_weights<T>("PathObjective", o_, path_.schedule(), t_.view(), w_.view());
  }

  GaussianPath<S> path_;
  Times times_;
  ObjectiveOptions o_;
  Tensor<T> t_, w_, u_;                         // [N]
  Tensor<T> eps_, xt_, target_, pred_, dpred_;  // [N, ...]
  Tensor<label_t> labels_;                      // [N]
};

/// Conditional flow matching: the network regresses the velocity d_alpha z + d_beta eps.
/// cfg_dropout = eta > 0 gives the classifier-free form (per-sample label dropout).
template <class T = float, Schedule S, class Times = UniformTime>
PathObjective<T, S, Times> flow_matching(GaussianPath<S> path, double cfg_dropout = 0,
                                         Times times = {}) {
  return PathObjective<T, S, Times>(
      std::move(path), std::move(times),
      ObjectiveOptions{.target = Parametrization::velocity, .cfg_dropout = cfg_dropout});
}

/// Denoising score matching: the network regresses -eps / beta_t with weight beta_t^2. Times are
/// drawn from [0, t_max] with t_max < 1, where beta > 0 (the score target is infinite at t = 1).
template <class T = float, Schedule S>
PathObjective<T, S, UniformTime> score_matching(GaussianPath<S> path, double cfg_dropout = 0,
                                                double t_max = 0.99) {
  require<config_error>(t_max > 0 && t_max < 1,
                        "score_matching: t_max must lie in (0, 1) (beta_1 = 0 makes the score "
                        "target infinite), got ",
                        t_max);
  return PathObjective<T, S, UniformTime>(std::move(path), UniformTime{0, t_max},
                                          ObjectiveOptions{.target = Parametrization::score,
                                                           .cfg_dropout = cfg_dropout,
                                                           .weighting = Weighting::beta_squared});
}

}  // namespace flowdiff::train
