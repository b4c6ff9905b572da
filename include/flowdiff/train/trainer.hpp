// flowdiff/train/trainer.hpp — the training loop: for step k = 0 .. steps-1
//   lr_k = warmup_cosine(k)                 (linear warmup, cosine decay to min_lr)
//   (z, y) = data.next(batch)               (a fresh batch; labels when the model is conditional)
//   g = grad L(theta; z, y)                 (the objective: CFM / CFG-CFM / DSM, objective.hpp)
//   g = clip(g, grad_clip)                  (global L2 norm)
//   theta = optimizer(theta, g, lr_k);  ema = EMA(ema, theta)
// with progress on the terminal (progress.hpp), the loss of every step in a CSV file, and
// checkpoints. A checkpoint is one safetensors file, written atomically, holding everything the
// run's future depends on: the parameters ("model.<name>", PyTorch names), the EMA
// ("ema.<name>"), the optimizer state ("optimizer.*"), the step, the generator's seed and counter
// and the data source's position. Resuming from it therefore continues bit for bit like the run
// that was never interrupted. A non-finite loss or gradient stops the run with numeric_error
// before the parameters are touched, and no checkpoint is written from a non-finite state, so the
// last checkpoint on disk is always a good one. Everything random comes from the trainer's
// generator (seeded by the options): a run is a pure function of its seed. The checkpoint, the
// weights file and the loss CSV are written and read by functions in detail:: shared with
// train::BackendTrainer (backend_trainer.hpp), which therefore writes the same files from a model
// on any backend.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/train/clip.hpp"
#include "flowdiff/train/ema.hpp"
#include "flowdiff/train/objective.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/progress.hpp"
#include "flowdiff/train/schedule.hpp"

namespace flowdiff::train {

/// Where batches come from: next(x [B, ...], y [B] or empty, gen) fills one batch;
/// sample_shape() is the shape of one sample; num_classes() is 0 for unlabelled data.
template <class D, class T>
concept BatchSource = requires(D& d, View<T> x, View<label_t> y, Generator& gen) {
  d.next(x, y, gen);
  { d.sample_shape() } -> std::convertible_to<Shape>;
  { d.num_classes() } -> std::convertible_to<index_t>;
};

/// A source whose position is part of the run's state (a shuffling batcher): it is saved in the
/// checkpoint and restored on resume.
template <class D>
concept StatefulSource = requires(const D& cd, D& d, const std::vector<std::int64_t>& s) {
  { cd.state() } -> std::convertible_to<std::vector<std::int64_t>>;
  d.set_state(s);
};

/// Fresh samples from a distribution each step: dist.sample(x [B, ...], y [B] or empty, gen),
/// e.g. data::Toy2DDistribution or analytic::GaussianMixture. Holds a reference.
template <class Dist>
class SampledSource {
 public:
  SampledSource(const Dist& dist, Shape sample_shape, index_t num_classes)
      : dist_(&dist), shape_(sample_shape), k_(num_classes) {}
  template <class T>
  void next(View<T> x, View<label_t> y, Generator& gen) {
    dist_->sample(x, y, gen);
  }
  Shape sample_shape() const { return shape_; }
  index_t num_classes() const { return k_; }

 private:
  const Dist* dist_;
  Shape shape_;
  index_t k_;
};

/// Batches from a shuffling batcher over a data set in memory (data::Batcher: next(x, y),
/// state() -> {epoch, position}, set_state): the batcher's position is checkpointed, so a resumed
/// run sees the same batches. Holds a reference.
template <class Batcher>
class BatcherSource {
 public:
  BatcherSource(Batcher& batcher, Shape sample_shape, index_t num_classes)
      : b_(&batcher), shape_(sample_shape), k_(num_classes) {}
  template <class T>
  void next(View<T> x, View<label_t> y, Generator&) {
    b_->next(x, y);
  }
  Shape sample_shape() const { return shape_; }
  index_t num_classes() const { return k_; }
  std::vector<std::int64_t> state() const {
    const auto s = b_->state();
    return {s.epoch, s.position};
  }
  void set_state(const std::vector<std::int64_t>& s) {
    require<io_error>(s.size() == 2,
                      "BatcherSource: a batcher state has 2 values (epoch, "
                      "position), the checkpoint holds ",
                      s.size());
    auto st = b_->state();
    st.epoch = s[0];
    st.position = s[1];
    b_->set_state(st);
  }

 private:
  Batcher* b_;
  Shape shape_;
  index_t k_;
};

struct TrainerOptions {
  std::int64_t steps = 1000;      ///< total optimizer steps of the run (a resumed run included)
  index_t batch = 128;            ///< samples per step
  double lr = 1e-3;               ///< peak learning rate
  std::int64_t warmup_steps = 0;  ///< linear warmup to lr
  double min_lr = 0;              ///< cosine decay floor; min_lr == lr gives a constant rate
  bool cosine = true;             ///< false: constant lr after the warmup
  double grad_clip = 1.0;         ///< global-norm clipping; 0: off
  double ema_decay = 0.999;       ///< 0: no EMA
  bool ema_warmup = true;         ///< EMA decay min(decay, (1 + n) / (10 + n))
  std::uint64_t seed = 0;         ///< the run's generator
  std::filesystem::path checkpoint = {};  ///< empty: no checkpoints
  std::int64_t checkpoint_every = 0;      ///< 0: only at the end
  bool resume = true;                     ///< continue from `checkpoint` when the file exists
  std::filesystem::path loss_csv = {};    ///< empty: no CSV
  std::int64_t log_every = 100;           ///< steps between progress lines
  ProgressMode progress = ProgressMode::automatic;
  std::ostream* log = &std::cerr;  ///< where progress goes
};

/// The learning rate of 0-based step k under o: linear warmup over o.warmup_steps, then o.lr,
/// or with o.cosine a cosine decay to o.min_lr at o.steps.
inline double scheduled_lr(const TrainerOptions& o, std::int64_t k) {
  if (k < o.warmup_steps) return linear_warmup(k, o.lr, o.warmup_steps);
  if (!o.cosine) return o.lr;
  return cosine_decay(k - o.warmup_steps, o.lr, o.steps - o.warmup_steps, o.min_lr);
}

struct TrainResult {
  std::int64_t first_step = 0;  ///< where this run started (> 0 when resumed)
  std::int64_t last_step = 0;   ///< steps done in all
  bool resumed = false;
  double seconds = 0;  ///< wall time of this run
  double steps_per_second = 0;
  double final_loss = NAN;  ///< mean loss of the last min(log_every, steps run) steps
};

namespace detail {

inline void add_i64(io::SafetensorsWriter& w, const std::string& name,
                    const std::vector<std::int64_t>& v) {
  const Tensor<std::int64_t> t =
      Tensor<std::int64_t>::from(Shape{static_cast<index_t>(v.size())}, std::span(v));
  w.add(name, t.view());
}

/// Writes a run's full state to `path` atomically in the format of the file comment
/// ("flowdiff.trainer/1"): parameters, EMA (null: none) and optimizer state on backend B
/// (downloaded when B is a device), the step, the generator and the data source's position.
/// Refuses (numeric_error naming `who`) to write non-finite parameters.
template <class T, Backend B, class Optimizer, class D>
void write_trainer_checkpoint(std::string_view who, const std::filesystem::path& path,
                              const nn::Parameters<T, B>& ps, const Ema<T, B>* ema,
                              const Optimizer& opt, std::int64_t step, const Generator& gen,
                              std::uint64_t seed, const D& data) {
  require<numeric_error>(all_finite(ps.flat_params()), who, ": step ", step,
                         ": the parameters are not finite; refusing to overwrite the checkpoint ",
                         path.string());
  io::SafetensorsWriter w;
  nn::add_parameters(w, ps, "model.");
  if (ema) ema->save_state(w, ps, "ema.");
  opt.save_state(w, ps, "optimizer.");
  add_i64(w, "trainer.step", {step});
  add_i64(w, "trainer.rng",
          {static_cast<std::int64_t>(gen.seed()), static_cast<std::int64_t>(gen.offset())});
  if constexpr (StatefulSource<D>) {
    const std::vector<std::int64_t> st = data.state();
    if (!st.empty()) add_i64(w, "trainer.data_state", st);
  }
  w.set_metadata("format", "flowdiff.trainer/1");
  w.set_metadata("step", std::to_string(step));
  w.set_metadata("seed", std::to_string(seed));
  w.write(path);
}

/// Restores the state written by write_trainer_checkpoint into a run with options `o` (whose seed
/// must be the checkpoint's), all or nothing: a checkpoint that does not fit leaves the
/// parameters, EMA, optimizer, step, generator and data position as they were.
template <class T, Backend B, class Optimizer, class D>
void read_trainer_checkpoint(const std::filesystem::path& path, const TrainerOptions& o,
                             nn::Parameters<T, B>& ps, std::optional<Ema<T, B>>& ema,
                             Optimizer& opt, std::int64_t& step_out, Generator& gen, D& data) {
  const io::SafetensorsFile f = io::SafetensorsFile::read(path);
  const auto meta = f.metadata();
  const auto fmt = meta.find("format");
  require<io_error>(fmt != meta.end() && fmt->second == "flowdiff.trainer/1", path.string(),
                    ": not a flowdiff trainer checkpoint (metadata 'format' is ",
                    fmt == meta.end() ? std::string("missing") : "'" + fmt->second + "'",
                    "); to start afresh, delete it or choose another checkpoint path");
  const auto step = nn::load_checked<std::int64_t>(f, "trainer.step", Shape{1});
  const auto rng = nn::load_checked<std::int64_t>(f, "trainer.rng", Shape{2});
  require<config_error>(static_cast<std::uint64_t>(rng[0]) == o.seed, path.string(),
                        ": the checkpoint was trained with seed ",
                        static_cast<std::uint64_t>(rng[0]), " but the options say seed ", o.seed,
                        "; resume with the same seed");
  require<io_error>(step[0] >= 0 && step[0] <= o.steps, path.string(), ": checkpoint step ",
                    step[0], " is outside [0, steps = ", o.steps, "]");
  // All or nothing: what can be staged is staged (the EMA, the data position), the parameters
  // are backed up before load_parameters (which validates every name, shape and dtype before it
  // writes any) and restored if a later part fails, and the optimizer goes last (its load_state
  // changes nothing when it fails). A checkpoint that does not fit leaves the run as it was.
  std::optional<Ema<T, B>> staged_ema;
  if (ema) {
    staged_ema.emplace(ps, EmaOptions{o.ema_decay, o.ema_warmup});
    staged_ema->load_state(f, ps, "ema.");
  }
  std::optional<std::vector<std::int64_t>> data_state;
  if constexpr (StatefulSource<D>) {
    if (f.contains("trainer.data_state")) {
      const Shape ds = f.shape("trainer.data_state");
      const auto t = nn::load_checked<std::int64_t>(f, "trainer.data_state", ds);
      data_state.emplace(t.data(), t.data() + t.numel());
    }
  }
  Tensor<T, B> backup(ps.flat_params().shape());
  copy(backup.view(), View<const T, B>(ps.flat_params()));
  nn::load_parameters(ps, f, nn::LoadOptions{.strict = true, .prefix = "model."});
  try {
    if constexpr (StatefulSource<D>) {
      const std::vector<std::int64_t> old_state = data.state();
      if (data_state) data.set_state(*data_state);
      try {
        opt.load_state(f, ps, "optimizer.");
      } catch (...) {
        data.set_state(old_state);
        throw;
      }
    } else {
      opt.load_state(f, ps, "optimizer.");
    }
  } catch (...) {
    copy(ps.flat_params(), View<const T, B>(backup.view()));
    throw;
  }
  if (staged_ema) ema = std::move(staged_ema);
  step_out = step[0];
  gen.set_offset(static_cast<std::uint64_t>(rng[1]));
}

/// Writes the weights alone as a plain state_dict: the EMA when there is one and use_ema, else
/// the parameters (on any backend).
template <class T, Backend B>
void write_weights(const std::filesystem::path& path, const nn::Parameters<T, B>& ps,
                   const Ema<T, B>* ema, std::int64_t step, bool use_ema) {
  io::SafetensorsWriter w;
  if (use_ema && ema) {
    for (const auto& e : ps.entries())
      nn::add_tensor<T, B>(w, e.name,
                           ema->flat().rows(e.offset, e.offset + e.numel()).reshape(e.shape));
  } else {
    nn::add_parameters(w, ps);
  }
  w.set_metadata("step", std::to_string(step));
  w.set_metadata("weights", use_ema && ema ? "ema" : "raw");
  w.write(path);
}

/// The loss CSV of a run ("step,loss,lr,grad_norm,seconds", one row per step). open() keeps the
/// rows of the steps a resumed run continues from (dropping those an interrupted run wrote after
/// its last checkpoint) and appends after them.
class LossCsv {
 public:
  void open(std::string_view who, const std::filesystem::path& path, std::int64_t step) {
    if (path.empty()) return;
    namespace fs = std::filesystem;
    if (path.has_parent_path()) fs::create_directories(path.parent_path());
    std::vector<std::string> keep;
    if (step > 0 && fs::exists(path)) {
      std::ifstream in(path);
      std::string line;
      while (std::getline(in, line)) {
        if (line.rfind("step,", 0) == 0) continue;
        const auto comma = line.find(',');
        if (comma == std::string::npos) continue;
        try {
          if (std::stoll(line.substr(0, comma)) <= step) keep.push_back(line);
        } catch (const std::exception&) {
        }
      }
    }
    f_.emplace(path, std::ios::trunc);
    require<io_error>(f_->good(), who, ": cannot write the loss CSV ", path.string());
    *f_ << "step,loss,lr,grad_norm,seconds\n";
    for (const auto& l : keep) *f_ << l << '\n';
  }

  /// One row for the 1-based step `step` (flushed every 100 steps).
  void row(std::int64_t step, double loss, double lr, double norm, double seconds) {
    if (!f_) return;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%lld,%.9g,%.9g,%.9g,%.3f\n", static_cast<long long>(step), loss,
                  lr, norm, seconds);
    *f_ << buf;
    if (step % 100 == 0) f_->flush();
  }

  void flush() {
    if (f_) f_->flush();
  }

 private:
  std::optional<std::ofstream> f_;
};

/// What a non-finite stop says about the checkpoint.
inline std::string checkpoint_status(const TrainerOptions& o) {
  if (o.checkpoint.empty()) return "no checkpoint is configured";
  if (std::filesystem::exists(o.checkpoint))
    return "the last good checkpoint is " + o.checkpoint.string() + " (untouched)";
  return "no checkpoint had been written yet";
}

}  // namespace detail

template <TrainableModel M, class Objective, class Optimizer = AdamW<typename M::value_type>>
class Trainer {
 public:
  using T = typename M::value_type;

  /// `model` and `params` are held by reference (the trainer updates params in place); the
  /// parameters must already be allocated and initialised.
  Trainer(const M& model, nn::Parameters<T>& params, Objective objective,
          Optimizer optimizer = Optimizer(), TrainerOptions options = {})
      : model_(&model),
        ps_(&params),
        objective_(std::move(objective)),
        opt_(std::move(optimizer)),
        o_(std::move(options)),
        gen_(o_.seed) {
    require<config_error>(o_.steps >= 1, "Trainer: steps must be >= 1, got ", o_.steps);
    require<config_error>(o_.batch >= 1, "Trainer: batch must be >= 1, got ", o_.batch);
    require<config_error>(std::isfinite(o_.lr) && o_.lr > 0,
                          "Trainer: lr must be finite and > 0, got ", o_.lr);
    require<config_error>(o_.min_lr >= 0 && o_.min_lr <= o_.lr,
                          "Trainer: min_lr must lie in [0, lr = ", o_.lr, "], got ", o_.min_lr);
    require<config_error>(o_.warmup_steps >= 0 && o_.warmup_steps < o_.steps,
                          "Trainer: warmup_steps must lie in [0, steps = ", o_.steps, "), got ",
                          o_.warmup_steps);
    require<config_error>(o_.grad_clip >= 0 && std::isfinite(o_.grad_clip),
                          "Trainer: grad_clip must be finite and >= 0 (0: off), got ",
                          o_.grad_clip);
    require<config_error>(o_.ema_decay >= 0 && o_.ema_decay < 1,
                          "Trainer: ema_decay must lie in [0, 1) (0: off), got ", o_.ema_decay);
    require<config_error>(o_.checkpoint_every >= 0, "Trainer: checkpoint_every must be >= 0, got ",
                          o_.checkpoint_every);
    require<config_error>(o_.log != nullptr, "Trainer: log stream is null");
    require<config_error>(params.allocated(), "Trainer: the parameters are not allocated");
    if (o_.ema_decay > 0) ema_.emplace(params, EmaOptions{o_.ema_decay, o_.ema_warmup});
  }

  /// Trains until options.steps steps are done in all, resuming from the checkpoint when it
  /// exists (and options.resume). Returns what this call did.
  template <class D>
  requires BatchSource<D, T> TrainResult fit(D& data) {
    const Shape s = data.sample_shape();
    Shape bs;
    bs.push_back(o_.batch);
    for (int i = 0; i < s.rank(); ++i) bs.push_back(s[i]);
    x_.resize(bs);
    const bool labelled = data.num_classes() > 0 && model_->num_classes() > 0;
    require<config_error>(data.num_classes() == 0 || model_->num_classes() == 0 ||
                              data.num_classes() == model_->num_classes(),
                          "Trainer: the data has ", data.num_classes(), " classes but the model ",
                          model_->num_classes());
    y_.resize(Shape{o_.batch});
    fill(y_.view(), label_t(0));

    TrainResult r;
    if (o_.resume && !o_.checkpoint.empty() && std::filesystem::exists(o_.checkpoint)) {
      load_checkpoint(o_.checkpoint, data);
      r.resumed = true;
    }
    r.first_step = step_;
    csv_.open("Trainer", o_.loss_csv, step_);
    Progress progress(*o_.log, o_.progress, step_, o_.steps, o_.log_every);
    if (r.resumed)
      progress.message("resumed from " + o_.checkpoint.string() + " at step " +
                       std::to_string(step_));

    double window = 0;
    std::int64_t window_n = 0;
    while (step_ < o_.steps) {
      const double lr = learning_rate(step_);
      opt_.set_lr(lr);
      const View<label_t> yv = labelled ? y_.view() : View<label_t>{};
      data.next(x_.view(), yv, gen_);
      ps_->zero_grad();
      double loss = 0;
      try {
        loss = objective_.forward_backward(*model_, *ps_, cache_, View<const T>(x_.view()),
                                           View<const label_t>(yv), gen_);
      } catch (const numeric_error& e) {
        stop_nonfinite(progress, "the loss", e.what());
      }
      const double norm = o_.grad_clip > 0
                              ? static_cast<double>(clip_grad_norm(*ps_, o_.grad_clip, false))
                              : grad_norm();
      if (!std::isfinite(norm))
        stop_nonfinite(progress, "the gradient", "gradient norm " + std::to_string(norm));
      opt_.step(*ps_);
      if (ema_) ema_->update(*ps_);
      ++step_;
      last_loss_ = loss;
      last_grad_norm_ = norm;
      losses_.push_back(loss);
      window += loss;
      ++window_n;
      if (window_n > o_.log_every) {
        window = loss;
        window_n = 1;
      }
      r.final_loss = window / static_cast<double>(window_n);
      csv_.row(step_, loss, lr, norm, progress.elapsed());
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

  /// The learning rate of 0-based step k.
  double learning_rate(std::int64_t k) const { return scheduled_lr(o_, k); }

  std::int64_t step() const { return step_; }
  double last_loss() const { return last_loss_; }
  double last_grad_norm() const { return last_grad_norm_; }
  /// The loss of every step this trainer ran (since construction; a resumed run's earlier steps
  /// are in the CSV).
  const std::vector<double>& losses() const { return losses_; }
  const Generator& generator() const { return gen_; }
  const Objective& objective() const { return objective_; }
  Objective& objective() { return objective_; }
  const Optimizer& optimizer() const { return opt_; }
  const TrainerOptions& options() const { return o_; }
  /// The EMA of the parameters (null when ema_decay = 0).
  const Ema<T>* ema() const { return ema_ ? &*ema_ : nullptr; }

  /// Writes the full training state to `path` atomically (see the file comment).
  template <class D>
  void save_checkpoint(const std::filesystem::path& path, const D& data) const {
    detail::write_trainer_checkpoint("Trainer", path, *ps_, ema(), opt_, step_, gen_, o_.seed,
                                     data);
  }

  /// Restores the state written by save_checkpoint. The seed must be the options' seed.
  template <class D>
  void load_checkpoint(const std::filesystem::path& path, D& data) {
    detail::read_trainer_checkpoint(path, o_, *ps_, ema_, opt_, step_, gen_, data);
  }

  /// Writes the weights alone as a plain state_dict (the EMA when there is one and use_ema),
  /// loadable with nn::load_parameters or PyTorch's load_state_dict.
  void save_weights(const std::filesystem::path& path, bool use_ema = true) const {
    detail::write_weights(path, *ps_, ema(), step_, use_ema);
  }

 private:
  double grad_norm() const {
    const auto g = ps_->flat_grads();
    const T* p = g.data();
    return std::sqrt(Cpu::reduce_sum(g.numel(), [p](index_t i) {
      const double x = static_cast<double>(p[i]);
      return x * x;
    }));
  }

  [[noreturn]] void stop_nonfinite(Progress& progress, const char* what, const std::string& why) {
    const std::string msg = "Trainer: step " + std::to_string(step_ + 1) + ": " + what +
                            " is not finite (" + why + "); the parameters were not updated and " +
                            detail::checkpoint_status(o_) +
                            ". Lower the learning rate or check the data.";
    progress.message(msg);
    csv_.flush();
    fail<numeric_error>(msg);
  }

  const M* model_;
  nn::Parameters<T>* ps_;
  Objective objective_;
  Optimizer opt_;
  TrainerOptions o_;
  Generator gen_;
  std::optional<Ema<T>> ema_;
  typename M::Cache cache_;
  Tensor<T> x_;
  Tensor<label_t> y_;
  std::int64_t step_ = 0;
  double last_loss_ = NAN, last_grad_norm_ = NAN;
  std::vector<double> losses_;
  detail::LossCsv csv_;
};

}  // namespace flowdiff::train
