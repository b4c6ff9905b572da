// flowdiff/train/backend_trainer.hpp — the training step of train/trainer.hpp and
// train/objective.hpp for a network whose parameters and activations live on a backend B
// (nn::BackendMLP today): for step k,
//   lr_k = warmup_cosine(k);  (z, y) = data.next(batch)                    (host; z copied to B)
//   t ~ p(t) (host, then B), eps ~ N(0, I) (on B), y' = ∅ w.p. eta (host, then B)
//   x_t = alpha_t z + beta_t eps,  target = c1(t) z + c2(t) eps                         (on B)
//   L = 1/(N D) sum_i w(t_i) ||f(x_t, t, y') - target||^2,  dL/df = 2 w (f - target)/(N D)  (on B)
//   backward;  g = clip(g, grad_clip) (global L2 norm);  Adam / AdamW step;  EMA update   (on B)
// drawing from the generator in the CPU trainer's order (data, t, eps, dropout uniforms: the same
// counters), so with B = Cpu a run reproduces Trainer's bit for bit and on a GPU it follows it to
// rounding. Per-sample scalars (t, the weights, the labels) are drawn and checked on the host,
// where the CPU objective checks them, and copied to B: N values per step. The loss and the
// gradient norm are B's deterministic reductions. Checkpoints, resuming, the weights file and the
// loss CSV are Trainer's (train/trainer.hpp's detail:: functions, the same file format): the
// parameters, the EMA and the optimizer state are downloaded from B to be written and uploaded
// after a checkpoint is validated, so a resumed run continues bit for bit and a checkpoint loads
// into either trainer. Not here yet: schedules with host tables (DiscreteSchedule).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/as_field.hpp"
#include "flowdiff/nn/models/mlp_backend.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/paths/gaussian_path.hpp"
#include "flowdiff/paths/schedule.hpp"
#include "flowdiff/train/clip.hpp"
#include "flowdiff/train/ema.hpp"
#include "flowdiff/train/objective.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/progress.hpp"
#include "flowdiff/train/schedule.hpp"
#include "flowdiff/train/time_sampler.hpp"
#include "flowdiff/train/trainer.hpp"

namespace flowdiff::train {

/// What BackendTrainer needs of a model M with parameters Parameters<T, B>: value_type T, its
/// backend (nn::model_backend_t) B, a default-constructible Cache the trainer keeps across steps,
/// forward(ps, x [N, ...], t [N], y [N] or empty, out [N, ...], cache), backward(ps, dout, dx or
/// empty, cache) accumulating the parameter gradients, and num_classes() (0: unconditional;
/// K: the labels are 0..K-1 and K is the null label of CFG dropout). All tensors on B.
template <class M, class T, class B>
concept BackendTrainable = std::same_as<typename M::value_type, T> &&
    std::same_as<nn::model_backend_t<M>, B> && std::default_initializable<typename M::Cache> &&
    requires(const M& m, const nn::Parameters<T, B>& cps, nn::Parameters<T, B>& ps,
             View<const T, B> x, View<T, B> out, View<const label_t, B> y,
             typename M::Cache& cache) {
  m.forward(cps, x, x, y, out, cache);
  m.backward(ps, x, out, cache);
  { m.num_classes() } -> std::convertible_to<index_t>;
};

namespace detail {

/// w(t_i) (pred - target)^2 in double, element i of the [N, D] batch.
template <class T>
struct WeightedSquaredError {
  const T* pred;
  const T* target;
  const T* w;  // [N]
  index_t d;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double r = static_cast<double>(pred[i]) - static_cast<double>(target[i]);
    return static_cast<double>(w[i / d]) * r * r;
  }
};

/// dL/dpred for row i: g = (2 w_i / (N D)) (pred - target), as PathObjective computes it.
template <class T>
struct WeightedSquaredErrorGrad {
  T* g;
  const T* pred;
  const T* target;
  const T* w;
  T c;  // 2 / (N D)
  index_t d;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    const T wi = c * w[i];
    for (index_t j = i * d; j < (i + 1) * d; ++j) g[j] = wi * (pred[j] - target[j]);
  }
};

}  // namespace detail

/// PathObjective's forward_backward for a backend model: the same path, time sampler and options
/// (take them from flow_matching() / score_matching()), tensors on B.
template <class T, Backend B, Schedule S, class Times = UniformTime>
class BackendObjective {
 public:
  using value_type = T;

  explicit BackendObjective(const PathObjective<T, S, Times>& o)
      : path_(o.path()), times_(o.times()), o_(o.options()) {
    static_assert(B::host_accessible || !flowdiff::detail::HasKernelView<S>,
                  "BackendObjective: schedules with host tables (DiscreteSchedule) do not run on "
                  "a device backend yet");
  }

  const ObjectiveOptions& options() const { return o_; }

  /// One stochastic estimate of the loss on the batch z (on B) with host labels y ([N] or
  /// empty); the gradients of `model` accumulate into ps. Returns the mean loss.
  template <class M>
  double forward_backward(const M& model, nn::Parameters<T, B>& ps, typename M::Cache& cache,
                          View<const T, B> z, View<const label_t> y, Generator& gen) {
    require<shape_error>(z.rank() >= 2 && z.dim(0) >= 1,
                         "BackendObjective: z must be a batch [N, ...] with N >= 1, got ",
                         z.shape());
    const index_t n = z.dim(0), d = z.row_size();
    const index_t k = static_cast<index_t>(model.num_classes());
    const bool has_labels = y.data() != nullptr && !y.empty();
    if (has_labels)
      require<shape_error>(y.rank() == 1 && y.dim(0) == n, "BackendObjective: y must have shape [",
                           n, "] (one label per sample of z ", z.shape(), "), got ", y.shape());
    require<config_error>(o_.cfg_dropout == 0 || k > 0, "BackendObjective: cfg_dropout = ",
                          o_.cfg_dropout,
                          " needs a class-conditional model, but the model has num_classes = 0");
    require<config_error>(!has_labels || k > 0,
                          "BackendObjective: labels y were given but the model is unconditional "
                          "(num_classes = 0)");
    prepare(z.shape(), k > 0);

    // Randomness: three generator calls, in PathObjective's order (t, eps, dropout).
    times_.sample(t_host_.view(), gen);
    fill_normal(eps_, gen);
    if (k > 0) draw_labels(y, has_labels, k, gen);
    check_times();
    compute_weights();
    BackendOps<B>::template upload<T>(t_.view(), t_host_.view());
    BackendOps<B>::template upload<T>(w_.view(), w_host_.view());
    if (k > 0) BackendOps<B>::template upload<label_t>(labels_.view(), labels_host_.view());

    // x_t and the target: GaussianPath's per-row kernels, with the times on B.
    using Sched = std::remove_cvref_t<decltype(flowdiff::detail::kernel_schedule(path_.schedule()))>;
    const auto sched = flowdiff::detail::kernel_schedule(path_.schedule());
    B::parallel_for(n,
                    flowdiff::detail::PathRowKernel<T, Sched, flowdiff::detail::SampleRule>{
                        sched, {}, z.data(), eps_.data(), t_.data(), xt_.data(), d},
                    d);
    B::parallel_for(n,
                    flowdiff::detail::PathRowKernel<T, Sched, flowdiff::detail::TargetRule>{
                        sched, {o_.target}, z.data(), eps_.data(), t_.data(), target_.data(), d},
                    d);

    const View<const label_t, B> labels =
        k > 0 ? View<const label_t, B>(labels_.view()) : View<const label_t, B>{};
    model.forward(ps, View<const T, B>(xt_.view()), View<const T, B>(t_.view()), labels,
                  pred_.view(), cache);

    const double inv = 1.0 / (static_cast<double>(n) * static_cast<double>(d));
    const double sum = B::reduce_sum(
        n * d, detail::WeightedSquaredError<T>{pred_.data(), target_.data(), w_.data(), d});
    const double loss = sum * inv;
    require<numeric_error>(std::isfinite(loss), "BackendObjective: the loss is not finite (", loss,
                           "); check the data, the learning rate and the time range (score "
                           "targets need t_max < 1)");
    B::parallel_for(n,
                    detail::WeightedSquaredErrorGrad<T>{dpred_.data(), pred_.data(),
                                                        target_.data(), w_.data(),
                                                        static_cast<T>(2.0 * inv), d},
                    d);
    model.backward(ps, View<const T, B>(dpred_.view()), View<T, B>{}, cache);
    return loss;
  }

  // The last batch, for inspection and tests: host copies of the per-sample values, B tensors of
  // the rest.
  View<const T> last_times() const { return t_host_.view(); }              // [N]
  View<const T> last_weights() const { return w_host_.view(); }            // [N]
  View<const label_t> last_labels() const { return labels_host_.view(); }  // [N], after dropout
  View<const T, B> last_noise() const { return eps_.view(); }              // [N, ...]
  View<const T, B> last_inputs() const { return xt_.view(); }              // [N, ...]: x_t
  View<const T, B> last_targets() const { return target_.view(); }         // [N, ...]
  View<const T, B> last_predictions() const { return pred_.view(); }       // [N, ...]

 private:
  void prepare(const Shape& s, bool conditional) {
    const index_t n = s[0];
    if (!(xt_.shape() == s)) {
      eps_.resize(s);
      xt_.resize(s);
      target_.resize(s);
      pred_.resize(s);
      dpred_.resize(s);
    }
    t_host_.resize(Shape{n});
    w_host_.resize(Shape{n});
    t_.resize(Shape{n});
    w_.resize(Shape{n});
    if (conditional) {
      labels_host_.resize(Shape{n});
      u_host_.resize(Shape{n});
      labels_.resize(Shape{n});
    }
  }

  // PathObjective::draw_labels: one uniform per sample, always drawn.
  void draw_labels(View<const label_t> y, bool has_labels, index_t k, Generator& gen) {
    detail::draw_cfg_labels<T>("BackendObjective", y, has_labels, k, o_.cfg_dropout,
                               u_host_.view(), labels_host_.view(), gen);
  }

  // GaussianPath's per-sample checks (the kernels cannot throw), on the host copy of t.
  void check_times() const {
    const flowdiff::detail::TargetRule rule{o_.target};
    for (index_t i = 0; i < t_host_.numel(); ++i) {
      const T ti = t_host_[i];
      require<config_error>(ti >= T(0) && ti <= T(1), "BackendObjective: t[", i,
                            "] must lie in [0, 1], got ", ti);
      require<numeric_error>(rule(evaluate(path_.schedule(), ti)).ok,
                             "BackendObjective: the target is undefined at t[", i, "] = ", ti,
                             ": ", flowdiff::detail::TargetRule::undefined);
    }
  }

  // PathObjective::compute_weights.
  void compute_weights() {
    detail::loss_weights<T>("BackendObjective", o_, path_.schedule(), t_host_.view(),
                            w_host_.view());
  }

  GaussianPath<S> path_;
  Times times_;
  ObjectiveOptions o_;
  Tensor<T> t_host_, w_host_, u_host_;          // [N] on the host
  Tensor<label_t> labels_host_;                 // [N] on the host
  Tensor<T, B> t_, w_;                          // [N]
  Tensor<label_t, B> labels_;                   // [N]
  Tensor<T, B> eps_, xt_, target_, pred_, dpred_;  // [N, ...]
};

/// Trainer's loop (learning-rate schedule, clipping, optimizer, EMA, progress) for a backend
/// model (BackendTrainable: nn::BackendMLP by default, nn::BackendUNet, ...); the data source
/// fills host batches, which are copied to B each step. Class template argument deduction takes
/// every argument from the constructor: BackendTrainer trainer(unet, ps, objective, opt, options).
template <class T, Backend B, Schedule S, class Times = UniformTime, class Optimizer = AdamW<T, B>,
          class Model = nn::BackendMLP<T, B>>
class BackendTrainer {
  // Checked here, not as a constraint on Model, so that a wrong model gets these messages rather
  // than a list of failed deduction candidates.
  static_assert(
      requires {
        typename Model::value_type;
        requires std::same_as<typename Model::value_type, T>;
      },
      "BackendTrainer: Model::value_type must be the parameters' T");
  static_assert(std::same_as<nn::model_backend_t<Model>, B>,
                "BackendTrainer: the model must run on the trainer's backend B (Model::backend; "
                "the CPU models nn::MLP / nn::UNet run on Cpu)");
  static_assert(BackendTrainable<Model, T, B>,
                "BackendTrainer: Model must offer a default-constructible Cache, forward(ps, x, t, "
                "y, out, cache), backward(ps, dout, dx, cache) and num_classes() on B "
                "(train::BackendTrainable)");

 public:
  BackendTrainer(const Model& model, nn::Parameters<T, B>& params,
                 const PathObjective<T, S, Times>& objective, Optimizer optimizer = Optimizer(),
                 TrainerOptions options = {})
      : model_(&model),
        ps_(&params),
        objective_(objective),
        opt_(std::move(optimizer)),
        o_(std::move(options)),
        gen_(o_.seed) {
    require<config_error>(o_.steps >= 1, "BackendTrainer: steps must be >= 1, got ", o_.steps);
    require<config_error>(o_.batch >= 1, "BackendTrainer: batch must be >= 1, got ", o_.batch);
    require<config_error>(std::isfinite(o_.lr) && o_.lr > 0,
                          "BackendTrainer: lr must be finite and > 0, got ", o_.lr);
    require<config_error>(o_.min_lr >= 0 && o_.min_lr <= o_.lr,
                          "BackendTrainer: min_lr must lie in [0, lr = ", o_.lr, "], got ",
                          o_.min_lr);
    require<config_error>(o_.warmup_steps >= 0 && o_.warmup_steps < o_.steps,
                          "BackendTrainer: warmup_steps must lie in [0, steps = ", o_.steps,
                          "), got ", o_.warmup_steps);
    require<config_error>(o_.grad_clip >= 0 && std::isfinite(o_.grad_clip),
                          "BackendTrainer: grad_clip must be finite and >= 0 (0: off), got ",
                          o_.grad_clip);
    require<config_error>(o_.ema_decay >= 0 && o_.ema_decay < 1,
                          "BackendTrainer: ema_decay must lie in [0, 1) (0: off), got ",
                          o_.ema_decay);
    require<config_error>(o_.checkpoint_every >= 0,
                          "BackendTrainer: checkpoint_every must be >= 0, got ",
                          o_.checkpoint_every);
    require<config_error>(o_.log != nullptr, "BackendTrainer: log stream is null");
    require<config_error>(params.allocated(), "BackendTrainer: the parameters are not allocated");
    if (o_.ema_decay > 0) ema_.emplace(params, EmaOptions{o_.ema_decay, o_.ema_warmup});
  }

  /// One step on a host batch z [N, ...] (labels y [N] or empty) at the learning rate of the
  /// current step: Trainer::fit's loop body (without the CSV row and the checkpoint, which fit
  /// adds). Returns the loss.
  double step(View<const T> z, View<const label_t> y) {
    const double lr = learning_rate(step_);
    opt_.set_lr(lr);
    if (!(zd_.shape() == z.shape())) zd_.resize(z.shape());
    BackendOps<B>::template upload<T>(zd_.view(), z);
    ps_->zero_grad();
    double loss = 0;
    try {
      loss = objective_.forward_backward(*model_, *ps_, cache_, View<const T, B>(zd_.view()), y,
                                         gen_);
    } catch (const numeric_error& e) {
      stop_nonfinite("the loss", e.what());
    }
    const double norm = o_.grad_clip > 0
                            ? static_cast<double>(clip_grad_norm(*ps_, o_.grad_clip, false))
                            : grad_norm();
    if (!std::isfinite(norm)) stop_nonfinite("the gradient", "gradient norm " + std::to_string(norm));
    opt_.step(*ps_);
    if (ema_) ema_->update(*ps_);
    ++step_;
    last_loss_ = loss;
    last_grad_norm_ = norm;
    losses_.push_back(loss);
    return loss;
  }

  /// Trains until options.steps steps are done in all, resuming from the checkpoint when it
  /// exists (and options.resume), as Trainer::fit. Returns what this call did.
  template <class D>
    requires BatchSource<D, T>
  TrainResult fit(D& data) {
    const Shape s = data.sample_shape();
    Shape bs;
    bs.push_back(o_.batch);
    for (int i = 0; i < s.rank(); ++i) bs.push_back(s[i]);
    x_.resize(bs);
    const bool labelled = data.num_classes() > 0 && model_->num_classes() > 0;
    require<config_error>(data.num_classes() == 0 || model_->num_classes() == 0 ||
                              data.num_classes() == model_->num_classes(),
                          "BackendTrainer: the data has ", data.num_classes(),
                          " classes but the model ", model_->num_classes());
    y_.resize(Shape{o_.batch});
    fill(y_.view(), label_t(0));
    TrainResult r;
    if (o_.resume && !o_.checkpoint.empty() && std::filesystem::exists(o_.checkpoint)) {
      load_checkpoint(o_.checkpoint, data);
      r.resumed = true;
    }
    r.first_step = step_;
    csv_.open("BackendTrainer", o_.loss_csv, step_);
    Progress progress(*o_.log, o_.progress, step_, o_.steps, o_.log_every);
    if (r.resumed)
      progress.message("resumed from " + o_.checkpoint.string() + " at step " +
                       std::to_string(step_));
    double window = 0;
    std::int64_t window_n = 0;
    while (step_ < o_.steps) {
      const double lr = learning_rate(step_);
      const View<label_t> yv = labelled ? y_.view() : View<label_t>{};
      data.next(x_.view(), yv, gen_);
      double loss = 0;
      try {
        loss = step(View<const T>(x_.view()), View<const label_t>(yv));
      } catch (const numeric_error& e) {
        progress.message(e.what());
        throw;
      }
      window += loss;
      ++window_n;
      if (window_n > o_.log_every) {
        window = loss;
        window_n = 1;
      }
      r.final_loss = window / static_cast<double>(window_n);
      csv_.row(step_, loss, lr, last_grad_norm_, progress.elapsed());
      progress.update(step_, loss, lr);
      if (!o_.checkpoint.empty() && o_.checkpoint_every > 0 && step_ % o_.checkpoint_every == 0 &&
          step_ < o_.steps)
        save_checkpoint(o_.checkpoint, data);
    }
    if (!o_.checkpoint.empty()) save_checkpoint(o_.checkpoint, data);
    csv_.flush();
    r.last_step = step_;
    r.seconds = progress.elapsed();
    r.steps_per_second = r.seconds > 0 ? static_cast<double>(step_ - r.first_step) / r.seconds : 0;
    return r;
  }

  /// The learning rate of 0-based step k (Trainer's warmup + cosine schedule).
  double learning_rate(std::int64_t k) const { return scheduled_lr(o_, k); }

  std::int64_t steps_done() const { return step_; }
  double last_loss() const { return last_loss_; }
  double last_grad_norm() const { return last_grad_norm_; }
  const std::vector<double>& losses() const { return losses_; }
  const Generator& generator() const { return gen_; }
  const BackendObjective<T, B, S, Times>& objective() const { return objective_; }
  const Optimizer& optimizer() const { return opt_; }
  const TrainerOptions& options() const { return o_; }
  /// The EMA of the parameters on B (null when ema_decay = 0).
  const Ema<T, B>* ema() const { return ema_ ? &*ema_ : nullptr; }

  /// Writes the full training state to `path` atomically, in Trainer's format (parameters, EMA
  /// and optimizer state downloaded from B).
  template <class D>
  void save_checkpoint(const std::filesystem::path& path, const D& data) const {
    detail::write_trainer_checkpoint("BackendTrainer", path, *ps_, ema(), opt_, step_, gen_,
                                     o_.seed, data);
  }

  /// Restores the state written by save_checkpoint (or by Trainer::save_checkpoint for the same
  /// model and optimizer), uploading it to B; all or nothing. The seed must be the options' seed.
  template <class D>
  void load_checkpoint(const std::filesystem::path& path, D& data) {
    detail::read_trainer_checkpoint(path, o_, *ps_, ema_, opt_, step_, gen_, data);
  }

  /// Writes the weights alone as a plain state_dict (the EMA when there is one and use_ema).
  void save_weights(const std::filesystem::path& path, bool use_ema = true) const {
    detail::write_weights(path, *ps_, ema(), step_, use_ema);
  }

 private:
  double grad_norm() const {
    const auto g = ps_->flat_grads();
    return std::sqrt(B::reduce_sum(g.numel(), detail::SquareTerm<T>{g.data()}));
  }

  [[noreturn]] void stop_nonfinite(const char* what, const std::string& why) {
    csv_.flush();
    fail<numeric_error>("BackendTrainer: step ", step_ + 1, ": ", what, " is not finite (", why,
                        "); the parameters were not updated and ", detail::checkpoint_status(o_),
                        ". Lower the learning rate or check the data.");
  }

  const Model* model_;
  nn::Parameters<T, B>* ps_;
  BackendObjective<T, B, S, Times> objective_;
  Optimizer opt_;
  TrainerOptions o_;
  Generator gen_;
  std::optional<Ema<T, B>> ema_;
  typename Model::Cache cache_;
  Tensor<T> x_;
  Tensor<label_t> y_;
  Tensor<T, B> zd_;
  std::int64_t step_ = 0;
  double last_loss_ = NAN, last_grad_norm_ = NAN;
  std::vector<double> losses_;
  detail::LossCsv csv_;
};

}  // namespace flowdiff::train
