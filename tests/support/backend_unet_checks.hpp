// tests/support/backend_unet_checks.hpp — the checks of nn::BackendUNet as a trained and sampled
// model, written once and templated on the backend B: tests/test_nn_backend_unet.cpp runs them
// with B = Cpu (Catch2), tests/cuda/test_cuda_unet.cu with B = Cpu in its host part and B = Cuda in
// its device part. No Catch2 and no CUDA here: every body appends (ok, message) entries to a
// spatial::Log (tests/support/backend_spatial_checks.hpp) that the caller turns into assertions.
//   train_checks       a few train::BackendTrainer steps of BackendUNet<T, B> (CFM with CFG dropout
//                      eta, L = 1/(N D) sum_i ||u_theta(x_t, t, y') - (z - eps)||^2, AdamW, global
//                      clipping, EMA) against train::Trainer with nn::UNet from the same initial
//                      weights and seed (AdamW eps 1e-6: see adamw_options): losses, gradient
//                      norm, parameters, EMA element-wise
//                      (|a - b| <= atol + rtol |ref|: fp32 1e-5 + 1e-4; fp64 1e-11 + 1e-9: the
//                      conv / GroupNorm sums run in another order than nn::UNet's) and the
//                      generator offset exactly
//   checkpoint_checks  an interrupted + resumed BackendUNet run equals the straight run bit for bit
//                      (parameters, EMA, losses, generator, data position, checkpoint file, CSV);
//                      the file loads into train::Trainer with nn::UNet (parameters bit-equal)
//   sample_checks      integrate(Euler / Heun) through as_field(BackendUNet) and cfg(as_field(..),
//                      w = 3) against the same through nn::UNet (the training rule), and the
//                      field's cache reused (no reallocation) while N repeats
//   error_checks       attention heads not dividing the channels, labels outside [0, K] refused
//                      by the model, by Cfg and by
//                      the objective, a class-count mismatch between data and model
// Every comparison first requires finite values and a reference that is not all zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/models/unet.hpp>
#include <flowdiff/nn/models/unet_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <flowdiff/paths/gaussian_path.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/train/backend_trainer.hpp>
#include <flowdiff/train/objective.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <flowdiff/train/trainer.hpp>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "backend_spatial_checks.hpp"
#include "files.hpp"

namespace flowdiff::test::unet_train {

using backend_common::csv_without_seconds;
using backend_common::file_bytes;
using backend_common::run_tolerance;
using spatial::compare;
using spatial::compare_exact;
using spatial::device_copy;
using spatial::expect_throw;
using spatial::guard;
using spatial::host_copy;
using spatial::Log;
using spatial::str;
using spatial::Tolerance;

/// The tiny class-conditional U-Net of every check: 1 -> {4, 8} channels, one residual block per
/// stage, 3 classes (3 = ∅), GroupNorm with 2 groups; on 8 x 8 images. Built member by member
/// (GCC 12 warns maybe-uninitialized on a braced UNetConfig).
inline nn::UNetConfig tiny_config(index_t num_classes = 3) {
  nn::UNetConfig c;
  c.in_channels = 1;
  c.channels = {4, 8};
  c.num_residual_layers = 1;
  c.t_embed_dim = 8;
  c.y_embed_dim = 6;
  c.num_classes = num_classes;
  c.groups = 2;
  return c;
}

inline const Shape& image_shape() {
  static const Shape s{1, 8, 8};
  return s;
}

/// Thrown by ImageSource to interrupt a run (as a killed process would).
struct Interrupted {};

/// Labelled 8 x 8 images from the trainer's generator: y ~ U{0, ..., K-1} (one uniform per
/// sample), x = 0.4 (y - 1) + U[-1, 1) per pixel, so the label says something about the image.
/// Its position (batches drawn) is saved in checkpoints; next() throws Interrupted once `stop_at`
/// batches have been drawn.
template <class T>
struct ImageSource {
  index_t k = 3;
  std::int64_t drawn = 0, stop_at = -1;
  // x: [N, 1, 8, 8], y: [N] or empty (an unconditional model)
  void next(View<T> x, View<label_t> y, Generator& gen) {
    if (drawn == stop_at) throw Interrupted{};
    ++drawn;
    const index_t n = x.dim(0), d = x.row_size();
    Tensor<T> u(Shape{n});
    fill_uniform(u, gen);
    fill_uniform(x, gen, T(-1), T(1));
    T* px = x.data();
    for (index_t i = 0; i < n; ++i) {
      const auto label = static_cast<label_t>(std::min<index_t>(
          k - 1, static_cast<index_t>(std::floor(static_cast<double>(u[i]) * k))));
      if (y.data() != nullptr && !y.empty()) y[i] = label;
      for (index_t j = 0; j < d; ++j) px[i * d + j] += T(0.4) * static_cast<T>(label - 1);
    }
  }
  Shape sample_shape() const { return image_shape(); }
  index_t num_classes() const { return k; }
  std::vector<std::int64_t> state() const { return {drawn}; }
  void set_state(const std::vector<std::int64_t>& s) { drawn = s.at(0); }
};

/// nn::UNet's initial weights for `cfg` drawn with `seed` (PyTorch's initialisation), then the
/// GroupNorm scales and shifts from N(1, 0.3^2) / N(0, 0.3^2) so that a swapped gradient shows.
template <class T>
void host_init(nn::Parameters<T>& ps, std::uint64_t seed, const nn::UNet<T>& net) {
  ps.allocate();
  Generator gen(seed);
  net.init(ps, gen);
  for (index_t id = 0; id < ps.count(); ++id) {
    const auto& name = ps.info(id).name;
    const bool norm = name.find("init_conv.1.") != std::string::npos ||
                      name.find(".block1.0.") != std::string::npos ||
                      name.find(".block2.0.") != std::string::npos;
    if (norm) fill_normal(ps.param(id), gen, T(name.ends_with(".weight") ? 1 : 0), T(0.3));
  }
}

// ---------------------------------------------------------------------------------------------
// Training steps.
// ---------------------------------------------------------------------------------------------

template <class T>
struct TrainOutcome {
  std::vector<double> losses;
  std::vector<T> params, ema;
  double norm = 0;  // the last step's gradient norm (before clipping)
  std::uint64_t offset = 0;
  std::int64_t first_step = -1, drawn = -1;
};

inline train::TrainerOptions train_options(std::int64_t steps, std::ostream& log) {
  return {.steps = steps,
          .batch = 6,
          .lr = 3e-3,
          .warmup_steps = 1,
          .grad_clip = 0.5,
          .ema_decay = 0.9,
          .seed = 99,
          .progress = train::ProgressMode::quiet,
          .log = &log};
}

/// CFM on the linear path with CFG label dropout eta = 0.3.
template <class T>
train::PathObjective<T, schedules::Linear> train_objective() {
  return train::flow_matching<T>(GaussianPath{schedules::Linear{}}, 0.3);
}

// AdamW with eps = 1e-6 rather than 1e-8: Adam's step m / (sqrt(v) + eps) is ±lr for any
// |g| >> eps, so a gradient element that cancels to ~1e-8 (where fp32 sums in another order than
// nn::UNet's differ by O(1) relative) moves by an arbitrary share of lr. Measured with 1e-8: one
// of 3584 fp32 weights (midcoder conv1) off by 2.7e-5 after 4 steps, twice the rule; with 1e-6
// the worst ratio is below 0.1. The larger eps keeps the comparison about the trainer, not about
// the conditioning of Adam's normalisation.
inline constexpr train::AdamWOptions adamw_options{.eps = 1e-6, .weight_decay = 0.05};

template <class T>
train::AdamW<T> adamw_cpu() {
  return train::AdamW<T>(adamw_options);
}

template <class T, Backend B>
train::AdamW<T, B> adamw_on() {
  return train::AdamW<T, B>(adamw_options);
}

/// train::Trainer with nn::UNet (the CPU reference).
template <class T>
TrainOutcome<T> train_reference(std::int64_t steps) {
  std::ostringstream log;
  nn::Parameters<T> ps;
  const nn::UNet<T> net(ps, tiny_config());
  host_init(ps, 7, net);
  ImageSource<T> source;
  train::Trainer trainer(net, ps, train_objective<T>(), adamw_cpu<T>(), train_options(steps, log));
  trainer.fit(source);
  return {trainer.losses(),
          host_copy<T, Cpu>(ps.flat_params()),
          host_copy<T, Cpu>(trainer.ema()->flat()),
          trainer.last_grad_norm(),
          trainer.generator().offset(),
          0,
          source.drawn};
}

/// The same run with nn::BackendUNet on B and train::BackendTrainer (its template arguments
/// deduced from the constructor), from nn::UNet's initial weights uploaded to B; `o` adds
/// checkpoint options, `init_seed` other initial weights (a resumed run must not depend on them).
template <class T, Backend B>
TrainOutcome<T> train_on_backend(const train::TrainerOptions& o, std::int64_t stop_at = -1,
                                 std::uint64_t init_seed = 7) {
  nn::Parameters<T> host;
  const nn::UNet<T> ref(host, tiny_config());
  host_init(host, init_seed, ref);
  nn::Parameters<T, B> ps;
  const nn::BackendUNet<T, B> net(ps, tiny_config());
  ps.allocate();
  nn::upload_parameters(ps, host);
  ImageSource<T> source;
  source.stop_at = stop_at;
  train::BackendTrainer trainer(net, ps, train_objective<T>(), adamw_on<T, B>(), o);
  static_assert(std::is_same_v<decltype(trainer),
                               train::BackendTrainer<T, B, schedules::Linear, train::UniformTime,
                                                     train::AdamW<T, B>, nn::BackendUNet<T, B>>>);
  TrainOutcome<T> r;
  try {
    r.first_step = trainer.fit(source).first_step;
  } catch (const Interrupted&) {
    r.first_step = -2;
  }
  r.losses = trainer.losses();
  r.params = host_copy<T, B>(ps.flat_params());
  r.ema = host_copy<T, B>(trainer.ema()->flat());
  r.norm = trainer.last_grad_norm();
  r.offset = trainer.generator().offset();
  r.drawn = source.drawn;
  return r;
}

/// Four steps on B against train::Trainer + nn::UNet (batch 6, CFG dropout 0.3, AdamW with weight
/// decay, clipping at 0.5, EMA 0.9).
template <class T, Backend B>
void train_checks(Log& log) {
  const std::string what = str("BackendTrainer<", std::is_same_v<T, float> ? "float" : "double",
                               ", ", B::name, "> + BackendUNet vs Trainer + nn::UNet, 4 steps");
  guard(log, what, [&] {
    std::ostringstream out;
    const auto ref = train_reference<T>(4);
    const auto got = train_on_backend<T, B>(train_options(4, out));
    const Tolerance tol = run_tolerance<T>();
    compare(log, what + ": losses", got.losses, ref.losses, {true, tol.atol, tol.rtol, 0});
    compare(log, what + ": last gradient norm", std::vector<double>{got.norm},
            std::vector<double>{ref.norm}, {true, tol.atol, tol.rtol, 0});
    compare(log, what + ": parameters", got.params, ref.params, tol);
    compare(log, what + ": EMA", got.ema, ref.ema, tol);
    log.expect(got.offset == ref.offset && got.offset > 0,
               str(what, ": generator offset ", got.offset, " == ", ref.offset));
    // The steps moved the weights: the comparison is not of two untouched initialisations.
    nn::Parameters<T> host;
    const nn::UNet<T> net(host, tiny_config());
    host_init(host, 7, net);
    const auto init = host_copy<T, Cpu>(host.flat_params());
    double moved = 0;
    for (std::size_t i = 0; i < init.size() && i < ref.params.size(); ++i)
      moved = std::max(moved, std::abs(static_cast<double>(ref.params[i] - init[i])));
    log.expect(moved > 1e-3,
               str(what, ": the reference moved the weights (max |change| ", moved, " > 1e-3)"));
    log.expect(ref.norm > 0.5, str(what, ": the reference gradient norm ", ref.norm,
                                   " exceeds the clip 0.5 (clipping is exercised)"));
  });
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and resuming.
// ---------------------------------------------------------------------------------------------

/// Six float steps on B with a checkpoint at the end, against the same run interrupted during
/// step 5 (checkpoint_every = 3) and resumed from its step-3 checkpoint by a fresh model with other
/// initial weights and a fresh trainer: bit for bit. Then train::Trainer with nn::UNet loads the
/// final file (a copy) and resumes at step 6 with the same parameters.
template <Backend B>
void checkpoint_checks(Log& log) {
  using T = float;
  const std::string what = str("BackendTrainer<float, ", B::name, "> + BackendUNet checkpoints");
  guard(log, what, [&] {
    TempDir dir(std::string("backend_unet_ckpt_") + B::name);
    std::ostringstream out;
    auto options = [&](const std::string& name) {
      train::TrainerOptions o = train_options(6, out);
      o.checkpoint = dir / (name + ".safetensors");
      o.checkpoint_every = 3;
      o.loss_csv = dir / (name + ".csv");
      return o;
    };
    const auto straight = train_on_backend<T, B>(options("straight"));
    const auto interrupted = train_on_backend<T, B>(options("split"), 4);
    const auto step_in_file = [](const std::filesystem::path& p) {
      const auto f = io::SafetensorsFile::read(p);
      return nn::load_checked<std::int64_t>(f, "trainer.step", Shape{1})[0];
    };
    const std::int64_t saved = step_in_file(dir / "split.safetensors");
    const auto resumed = train_on_backend<T, B>(options("split"), -1, 999);
    log.expect(interrupted.first_step == -2 && saved == 3 && resumed.first_step == 3,
               str(what, ": interrupted during step 5 (", interrupted.first_step == -2,
                   "), the file holds step ", saved, ", the resumed run starts at ",
                   resumed.first_step, " (expected 3, 3)"));
    compare_exact(log, what + ": resumed parameters", resumed.params, straight.params);
    compare_exact(log, what + ": resumed EMA", resumed.ema, straight.ema);
    const std::vector<double> tail(straight.losses.begin() + 3, straight.losses.end());
    compare_exact(log, what + ": losses of steps 4-6", resumed.losses, tail);
    log.expect(
        resumed.offset == straight.offset && resumed.drawn == straight.drawn && straight.drawn == 6,
        str(what, ": generator offset ", resumed.offset, " == ", straight.offset,
            ", batches drawn ", resumed.drawn, " == ", straight.drawn, " == 6"));
    const std::string a = file_bytes(dir / "straight.safetensors");
    log.expect(!a.empty() && a == file_bytes(dir / "split.safetensors"),
               str(what, ": the final checkpoint files are byte-equal (", a.size(), " bytes)"));
    const std::string csv = csv_without_seconds(dir / "straight.csv");
    log.expect(std::count(csv.begin(), csv.end(), '\n') == 7 &&
                   csv == csv_without_seconds(dir / "split.csv"),
               str(what, ": the loss CSVs (header + 6 rows) are equal but for the seconds"));

    // The file in train::Trainer with nn::UNet (other initial weights: all must come from it).
    std::filesystem::copy_file(dir / "straight.safetensors", dir / "cpu.safetensors");
    nn::Parameters<T> ps;
    const nn::UNet<T> net(ps, tiny_config());
    host_init(ps, 999, net);
    ImageSource<T> source;
    train::TrainerOptions o = options("cpu");
    o.loss_csv.clear();
    train::Trainer trainer(net, ps, train_objective<T>(), adamw_cpu<T>(), o);
    const auto r = trainer.fit(source);
    log.expect(r.resumed && r.first_step == 6 && source.drawn == 6,
               str(what, ": Trainer + nn::UNet resumes the file at step ", r.first_step,
                   " with the data position ", source.drawn, " (expected 6, 6)"));
    compare_exact(log, what + ": Trainer + nn::UNet's loaded parameters",
                  host_copy<T, Cpu>(ps.flat_params()), straight.params);
    compare_exact(log, what + ": Trainer + nn::UNet's loaded EMA",
                  host_copy<T, Cpu>(trainer.ema()->flat()), straight.ema);
  });
}

// ---------------------------------------------------------------------------------------------
// Sampling through nn::as_field.
// ---------------------------------------------------------------------------------------------

struct SampleCase {
  std::string name;
  bool guided = false;  // cfg(as_field(model, ps), w) with labels; else the plain field (∅)
  double w = 1;
  bool heun = false;  // else Euler
  index_t n = 5;
  index_t steps = 4;
};

inline std::vector<SampleCase> sample_cases() {
  return {{"plain field (null label), Euler", false, 1, false, 5, 4},
          {"plain field (null label), Heun", false, 1, true, 5, 4},
          {"cfg w = 3, Euler", true, 3, false, 7, 4},
          {"cfg w = 3, Heun", true, 3, true, 7, 4}};
}

/// integrate() on B from x0 (host, [N, 1, 8, 8]) through `model` (its field, guided or not) with
/// labels cycling over [0, K] (K = ∅). Returns the samples.
template <class T, Backend B, class Model>
std::vector<T> sample_with(const SampleCase& c, const Model& model, const nn::Parameters<T, B>& ps,
                           const Tensor<T>& x0, Log* log) {
  auto x = device_copy<T, B>(x0.view());
  const auto grid = uniform_grid<T>(c.steps);
  auto field = nn::as_field(model, ps);
  auto run = [&](auto& f) {
    if (c.heun)
      integrate(Heun{}, f, x, grid);
    else
      integrate(Euler{}, f, x, grid);
  };
  if (c.guided) {
    Tensor<label_t> y(Shape{c.n});
    for (index_t i = 0; i < c.n; ++i) y[i] = static_cast<label_t>(i % (model.num_classes() + 1));
    const auto yd = device_copy<label_t, B>(y.view());
    auto guided = cfg(field, c.w);
    guided.set_condition(View<const label_t, B>(yd.view()));
    run(guided);
  } else if (log != nullptr) {
    // The field's cache is sized by the first call and reused while N repeats: the buffers of
    // the first activation and of the last block's output stay where they are.
    Tensor<T, B> out(x.shape());
    field(View<const T, B>(x.view()), out.view(), T(0));
    const T* first = field.cache().c0.data();
    const T* last = field.cache().rb_out.back().data();
    run(field);
    log->expect(field.cache().c0.data() == first && field.cache().rb_out.back().data() == last,
                str("as_field(BackendUNet<", B::name, ">) ", c.name,
                    ": the cache's buffers are reused across the sampler's calls"));
  } else {
    run(field);
  }
  return host_copy<T, B>(x.view());
}

/// Each case through as_field(nn::UNet) on the CPU and as_field(BackendUNet) on B, from the same
/// weights and start.
template <class T, Backend B>
void sample_checks(Log& log) {
  for (const auto& c : sample_cases()) {
    const std::string what =
        str("as_field(BackendUNet<", std::is_same_v<T, float> ? "float" : "double", ", ", B::name,
            ">) vs as_field(nn::UNet), ", c.name);
    guard(log, what, [&] {
      nn::Parameters<T> host;
      const nn::UNet<T> ref(host, tiny_config());
      host_init(host, 11, ref);
      Generator gen(12);
      Shape s{c.n};
      for (int i = 0; i < image_shape().rank(); ++i) s.push_back(image_shape()[i]);
      const auto x0 = randn<T>(s, gen);
      const auto want = sample_with<T, Cpu>(c, ref, host, x0, nullptr);
      nn::Parameters<T, B> ps;
      const nn::BackendUNet<T, B> net(ps, tiny_config());
      ps.allocate();
      nn::upload_parameters(ps, host);
      const auto got = sample_with<T, B>(c, net, ps, x0, &log);
      compare(log, what + ": samples", got, want, run_tolerance<T>());
      // The samples moved away from the start (the field is not trivially zero).
      double moved = 0;
      for (std::size_t i = 0; i < want.size(); ++i)
        moved = std::max(moved, std::abs(static_cast<double>(want[i] - x0.data()[i])));
      log.expect(moved > 1e-2, str(what, ": the samples moved (max |x1 - x0| ", moved, ")"));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// A source whose labels are all `label` (outside [0, K] when label > K or < 0).
struct BadLabelSource {
  label_t label = 7;
  void next(View<float> x, View<label_t> y, Generator& gen) {
    fill_normal(x, gen);
    fill(y, label);
  }
  Shape sample_shape() const { return image_shape(); }
  index_t num_classes() const { return 3; }
};

template <Backend B>
void error_checks(Log& log) {
  using T = float;
  const std::string pre = str("BackendUNet<", B::name, "> errors: ");
  expect_throw<config_error>(log, pre + "attention heads",
                             "BackendUNet: attention_heads = 3 must divide the lowest level's "
                             "channels 8",
                             [] {
                               nn::Parameters<T, B> ps;
                               nn::UNetConfig cfg = tiny_config();
                               cfg.attention = true;
                               cfg.attention_heads = 3;
                               const nn::BackendUNet<T, B> net(ps, cfg);
                             });
  nn::Parameters<T, B> ps;
  const nn::BackendUNet<T, B> net(ps, tiny_config());
  ps.allocate();
  {
    nn::Parameters<T> host;
    const nn::UNet<T> ref(host, tiny_config());
    host_init(host, 5, ref);
    nn::upload_parameters(ps, host);
  }
  const Shape s{4, 1, 8, 8};
  Tensor<T, B> x(s), out(s), t(Shape{4});
  fill(x.view(), T(0.5));
  fill(t.view(), T(0.25));
  auto labels = [](std::vector<label_t> v) {
    Tensor<label_t> h(Shape{static_cast<index_t>(v.size())});
    for (std::size_t i = 0; i < v.size(); ++i) h[static_cast<index_t>(i)] = v[i];
    return device_copy<label_t, B>(h.view());
  };
  typename nn::BackendUNet<T, B>::Cache cache;
  expect_throw<config_error>(log, pre + "a label above K",
                             "BackendUNet: 1 of the 4 labels y lie outside [0, 3] (3 is the null "
                             "label)",
                             [&] {
                               const auto y = labels({0, 1, 4, 3});
                               net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                             });
  expect_throw<config_error>(log, pre + "negative labels", "2 of the 4 labels y lie outside [0, 3]",
                             [&] {
                               const auto y = labels({-1, 1, 2, -5});
                               net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                             });
  expect_throw<shape_error>(log, pre + "labels of the wrong length",
                            "BackendUNet: y: expected shape [4], got [3]", [&] {
                              const auto y = labels({0, 1, 2});
                              net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                            });
  guard(log, pre + "labels in [0, K] pass", [&] {
    const auto y = labels({0, 1, 2, 3});
    net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
    log.expect(all_finite(out), pre + "labels in [0, K] (3 = null) give a finite output");
  });
  // Cfg's label check (host labels: by index; device labels: by count), before any evaluation.
  expect_throw<config_error>(log, pre + "cfg(as_field) with a label above K", "outside [0, 3]",
                             [&] {
                               auto guided = cfg(nn::as_field(net, ps), 3.0);
                               const auto y = labels({0, 1, 9, 2});
                               guided.set_condition(View<const label_t, B>(y.view()));
                             });
  // The objective refuses data labels outside [0, K] (the trainer draws them on the host).
  {
    std::ostringstream out_log;
    BadLabelSource source;
    train::BackendTrainer trainer(net, ps, train_objective<T>(), adamw_on<T, B>(),
                                  train_options(2, out_log));
    expect_throw<config_error>(log, pre + "BackendTrainer with data labels above K",
                               "BackendObjective: y[0] = 7 is not a label in [0, 3]",
                               [&] { trainer.fit(source); });
  }
  {
    // A data set of 3 classes and a model of 5.
    std::ostringstream out_log;
    nn::Parameters<T, B> ps5;
    const nn::BackendUNet<T, B> net5(ps5, tiny_config(5));
    ps5.allocate();
    ImageSource<T> source;
    train::BackendTrainer trainer(net5, ps5, train_objective<T>(), adamw_on<T, B>(),
                                  train_options(2, out_log));
    expect_throw<config_error>(log, pre + "data / model class counts",
                               "BackendTrainer: the data has 3 classes but the model 5",
                               [&] { trainer.fit(source); });
  }
}

}  // namespace flowdiff::test::unet_train
