// tests/support/backend_mlp_checks.hpp — the bodies of the backend-generic MLP checks, written once
// and templated on the backend B: tests/test_nn_backend.cpp runs them with B = Cpu (Catch2, bit
// equality with nn::MLP and train::Trainer), tests/cuda/test_cuda_mlp.cu with B = Cuda (against
// the same CPU references, DESIGN.md §4 tolerances). No Catch2 and no CUDA here: each function
// returns host copies of what it computed and the caller compares.
//   mlp_reference / mlp_on_backend      forward (u), backward (dx, parameter gradients) of one batch
//   train_reference / train_on_backend  a few CFM / CFG-CFM / DSM training steps (losses, gradient
//                                       norms, parameters, EMA, generator offset)
//   optim_on_backend                    clip_grad_norm, Sgd, Adam, AdamW and Ema on a flat store
//   sample_reference / sample_on_backend  integrate() through nn::as_field (plain, conditional,
//                                       cfg) with Euler / Heun / Euler–Maruyama
//   checkpoint_runs                     BackendTrainer's checkpoints: straight vs interrupted +
//                                       resumed runs, and checkpoints crossing to / from Trainer
#pragma once

#include <cstdint>
#include <filesystem>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/data/toy2d.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/models/mlp.hpp>
#include <flowdiff/nn/models/mlp_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <flowdiff/paths/gaussian_path.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/samplers/sde.hpp>
#include <flowdiff/train/backend_trainer.hpp>
#include <flowdiff/train/clip.hpp>
#include <flowdiff/train/ema.hpp>
#include <flowdiff/train/objective.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <flowdiff/train/trainer.hpp>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "backend_common.hpp"
#include "files.hpp"

namespace flowdiff::test {

using backend_common::csv_without_seconds;
using backend_common::device_copy;
using backend_common::file_bytes;
using backend_common::host_copy;

// ---------------------------------------------------------------------------------------------
// Forward / backward of one batch.
// ---------------------------------------------------------------------------------------------

struct MlpCase {
  std::string name;
  nn::MLPConfig cfg;
  index_t n = 37;
  bool labels = false;  // pass labels (else a conditional model uses the null label)
  bool dx = true;       // ask for the input gradient
  std::uint64_t seed = 1;
};

inline std::vector<MlpCase> mlp_cases() {
  return {
      {"unconditional", {.dim = 3, .width = 24, .depth = 2, .time_dim = 8}, 37, false, true, 1},
      {"conditional, labels",
       {.dim = 2, .width = 16, .depth = 3, .time_dim = 6, .num_classes = 4},
       29, true, true, 2},
      {"conditional, null label, no dx",
       {.dim = 2, .width = 16, .depth = 1, .time_dim = 6, .num_classes = 3},
       19, false, false, 3},
      {"odd time_dim", {.dim = 2, .width = 8, .depth = 2, .time_dim = 7, .num_classes = 2},
       11, true, true, 4},
      // N * width above the CPU's parallel threshold: threaded loops and gemm.
      {"large batch", {.dim = 2, .width = 32, .depth = 2, .time_dim = 16, .num_classes = 5},
       1100, true, true, 5},
  };
}

template <class T>
struct MlpResult {
  std::vector<T> out, dx, grads, params;
};

/// The inputs of a case on the host (x ~ N(0, 1), t ~ U[0, 1), y cycling over [0, K]) and an
/// initialised nn::MLP's parameters.
template <class T>
struct MlpInputs {
  nn::Parameters<T> ps;
  Tensor<T> x, t, dout;
  Tensor<label_t> y;
  explicit MlpInputs(const MlpCase& c) : x(Shape{c.n, c.cfg.dim}), t(Shape{c.n}), dout(x.shape()) {
    Generator gen(c.seed);
    nn::MLP<T> mlp(ps, c.cfg);
    ps.allocate();
    mlp.init(ps, gen);
    fill_normal(x, gen);
    fill_uniform(t, gen);
    fill_normal(dout, gen);
    y = Tensor<label_t>(Shape{c.labels ? c.n : 0});
    for (index_t i = 0; i < y.numel(); ++i)
      y[i] = static_cast<label_t>(i % (c.cfg.num_classes + 1));
  }
};

template <class T>
MlpResult<T> mlp_reference(const MlpCase& c) {
  MlpInputs<T> in(c);
  nn::Parameters<T> ps;
  nn::MLP<T> mlp(ps, c.cfg);
  ps.allocate();
  copy(ps.flat_params(), View<const T>(in.ps.flat_params()));
  typename nn::MLP<T>::Cache cache;
  Tensor<T> out(in.x.shape()), dx(in.x.shape());
  mlp.forward(ps, in.x.view(), in.t.view(), in.y.view(), out.view(), cache);
  mlp.backward(ps, in.dout.view(), c.dx ? dx.view() : View<T>{}, cache);
  return {out.to_vector(), c.dx ? dx.to_vector() : std::vector<T>{},
          host_copy<T, Cpu>(ps.flat_grads()), host_copy<T, Cpu>(ps.flat_params())};
}

template <class T, Backend B>
MlpResult<T> mlp_on_backend(const MlpCase& c) {
  MlpInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendMLP<T, B> mlp(ps, c.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);
  const auto x = device_copy<T, B>(in.x.view());
  const auto t = device_copy<T, B>(in.t.view());
  const auto dout = device_copy<T, B>(in.dout.view());
  const auto y = device_copy<label_t, B>(in.y.view());
  typename nn::BackendMLP<T, B>::Cache cache;
  Tensor<T, B> out(in.x.shape()), dx(in.x.shape());
  mlp.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
  mlp.backward(ps, dout.view(), c.dx ? dx.view() : View<T, B>{}, cache);
  // The round trip of the parameters: download into a fresh host store of nn::MLP's layout.
  nn::Parameters<T> back;
  nn::MLP<T> host_model(back, c.cfg);
  back.allocate();
  nn::download_parameters(back, ps);
  return {host_copy<T, B>(out.view()), c.dx ? host_copy<T, B>(dx.view()) : std::vector<T>{},
          host_copy<T, B>(ps.flat_grads()), host_copy<T, Cpu>(back.flat_params())};
}

// ---------------------------------------------------------------------------------------------
// Training steps.
// ---------------------------------------------------------------------------------------------

enum class TrainKind { cfm, cfg_cfm, dsm };

struct TrainCase {
  std::string name;
  TrainKind kind = TrainKind::cfm;
  bool adamw = true;        // else Adam with L2 weight decay
  double grad_clip = 0.05;  // small enough to clip every step; 0: off
  std::int64_t steps = 5;
  index_t batch = 64;
};

inline std::vector<TrainCase> train_cases() {
  return {{"CFM, AdamW, clipped", TrainKind::cfm, true, 0.05},
          {"CFG-CFM (eta 0.3), Adam + L2, no clipping", TrainKind::cfg_cfm, false, 0.0},
          {"DSM (beta^2), AdamW, clipped", TrainKind::dsm, true, 0.05}};
}

template <class T>
struct TrainOutcome {
  std::vector<double> losses, norms;
  std::vector<T> params, ema;
  std::uint64_t offset = 0;
};

inline nn::MLPConfig train_config(const TrainCase& c) {
  return {.dim = 2, .width = 32, .depth = 2, .time_dim = 16,
          .num_classes = c.kind == TrainKind::cfg_cfm ? 2 : 0};
}

inline train::TrainerOptions train_options(const TrainCase& c, std::ostream& log) {
  return {.steps = c.steps, .batch = c.batch, .lr = 3e-3, .warmup_steps = 2,
          .grad_clip = c.grad_clip, .ema_decay = 0.9, .seed = 99,
          .progress = train::ProgressMode::quiet, .log = &log};
}

template <class T>
train::PathObjective<T, schedules::Linear> train_objective(const TrainCase& c) {
  const GaussianPath path{schedules::Linear{}};
  if (c.kind == TrainKind::dsm) return train::score_matching<T>(path, 0.0, 0.99);
  return train::flow_matching<T>(path, c.kind == TrainKind::cfg_cfm ? 0.3 : 0.0);
}

/// nn::MLP trained by train::Trainer (the CPU reference).
template <class T>
TrainOutcome<T> train_reference(const TrainCase& c) {
  std::ostringstream log;
  const data::Toy2DDistribution<T> dist(data::Toy2D::Moons);
  train::SampledSource<data::Toy2DDistribution<T>> source(dist, Shape{2}, dist.num_classes());
  nn::Parameters<T> ps;
  const nn::MLPConfig cfg = train_config(c);
  nn::MLP<T> mlp(ps, cfg);
  ps.allocate();
  Generator init(7);
  mlp.init(ps, init);
  TrainOutcome<T> r;
  auto run = [&](auto optimizer) {
    train::Trainer trainer(mlp, ps, train_objective<T>(c), std::move(optimizer),
                           train_options(c, log));
    trainer.fit(source);
    r.norms.push_back(trainer.last_grad_norm());
    r.losses = trainer.losses();
    r.params = host_copy<T, Cpu>(ps.flat_params());
    r.ema = host_copy<T, Cpu>(trainer.ema()->flat());
    r.offset = trainer.generator().offset();
  };
  if (c.adamw)
    run(train::AdamW<T>(train::AdamWOptions{.weight_decay = 0.05}));
  else
    run(train::Adam<T>(train::AdamOptions{.weight_decay = 0.01}));
  return r;
}

/// The same run with nn::BackendMLP and train::BackendTrainer on B (parameters initialised on
/// the host by nn::MLP, then uploaded).
template <class T, Backend B>
TrainOutcome<T> train_on_backend(const TrainCase& c) {
  std::ostringstream log;
  const data::Toy2DDistribution<T> dist(data::Toy2D::Moons);
  train::SampledSource<data::Toy2DDistribution<T>> source(dist, Shape{2}, dist.num_classes());
  const nn::MLPConfig cfg = train_config(c);
  nn::Parameters<T> host;
  nn::MLP<T> ref(host, cfg);
  host.allocate();
  Generator init(7);
  ref.init(host, init);
  nn::Parameters<T, B> ps;
  nn::BackendMLP<T, B> mlp(ps, cfg);
  ps.allocate();
  nn::upload_parameters(ps, host);
  TrainOutcome<T> r;
  auto run = [&](auto optimizer) {
    train::BackendTrainer<T, B, schedules::Linear, train::UniformTime, decltype(optimizer)> trainer(
        mlp, ps, train_objective<T>(c), std::move(optimizer), train_options(c, log));
    trainer.fit(source);
    r.norms.push_back(trainer.last_grad_norm());
    r.losses = trainer.losses();
    r.params = host_copy<T, B>(ps.flat_params());
    r.ema = host_copy<T, B>(trainer.ema()->flat());
    r.offset = trainer.generator().offset();
  };
  if (c.adamw)
    run(train::AdamW<T, B>(train::AdamWOptions{.weight_decay = 0.05}));
  else
    run(train::Adam<T, B>(train::AdamOptions{.weight_decay = 0.01}));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Optimizers, EMA and clipping on a flat store with a buffer.
// ---------------------------------------------------------------------------------------------

template <class T>
struct OptimOutcome {
  std::vector<T> sgd, adam, adamw, ema, swapped, clipped;
  double norm = 0;  // clip_grad_norm's returned norm
};

/// Parameters {a: [37, 5], b: [3], stats (a buffer): [4]} with host-drawn values and gradients,
/// then on B: 3 steps of each optimizer (from the same start), EMA updates after each Adam step,
/// a swap, and one clip to max_norm 0.5.
template <class T, Backend B>
OptimOutcome<T> optim_on_backend() {
  auto make = [](auto& ps) {
    ps.add("a", Shape{37, 5});
    ps.add("b", Shape{3});
    ps.add_buffer("stats", Shape{4});
    ps.allocate();
  };
  nn::Parameters<T> host;
  make(host);
  Generator gen(5);
  const index_t nt = host.trainable_size();
  fill_normal(host.flat_params().rows(0, nt), gen);
  fill_normal(host.flat_grads().rows(0, nt), gen);
  fill(host.param(2), T(3));
  const Tensor<T> grads = [&] {
    Tensor<T> g(host.flat_grads().shape());
    copy(g.view(), View<const T>(host.flat_grads()));
    return g;
  }();
  auto fresh = [&] {
    nn::Parameters<T, B> ps;
    make(ps);
    nn::upload_parameters(ps, host);
    BackendOps<B>::template upload<T>(ps.flat_grads(), grads.view());
    return ps;
  };
  OptimOutcome<T> r;
  {
    auto ps = fresh();
    train::Sgd<T, B> sgd({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true});
    for (int k = 0; k < 3; ++k) sgd.step(ps);
    r.sgd = host_copy<T, B>(ps.flat_params());
  }
  {
    auto ps = fresh();
    train::Adam<T, B> adam({.lr = 0.01, .weight_decay = 0.02});
    train::Ema<T, B> ema(ps, {.decay = 0.99});
    for (int k = 0; k < 3; ++k) {
      adam.step(ps);
      ema.update(ps);
    }
    r.adam = host_copy<T, B>(ps.flat_params());
    r.ema = host_copy<T, B>(ema.flat());
    ema.swap(ps);
    r.swapped = host_copy<T, B>(ps.flat_params());
  }
  {
    auto ps = fresh();
    train::AdamW<T, B> adamw({.lr = 0.01, .weight_decay = 0.1});
    for (int k = 0; k < 3; ++k) adamw.step(ps);
    r.adamw = host_copy<T, B>(ps.flat_params());
  }
  {
    auto ps = fresh();
    r.norm = static_cast<double>(train::clip_grad_norm(ps, 0.5));
    r.clipped = host_copy<T, B>(ps.flat_grads());
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Sampling through nn::as_field.
// ---------------------------------------------------------------------------------------------

enum class SampleStepper { euler, heun, euler_maruyama };

struct SampleCase {
  std::string name;
  index_t num_classes = 0;  // 0: an unconditional model
  bool guided = false;      // cfg(as_field(model, ps), w) with labels; else the plain field
  double w = 1;             // the guidance scale (guided only)
  SampleStepper stepper = SampleStepper::euler;
  index_t n = 33;
  index_t steps = 6;
  std::uint64_t seed = 1;
};

inline std::vector<SampleCase> sample_cases() {
  using S = SampleStepper;
  return {
      {"unconditional, Heun", 0, false, 1, S::heun, 33, 6, 1},
      {"unconditional, Euler-Maruyama", 0, false, 1, S::euler_maruyama, 33, 6, 2},
      {"conditional model, plain field (null label), Euler", 3, false, 1, S::euler, 21, 5, 3},
      {"conditional (cfg w = 1: the y half only), Euler", 3, true, 1, S::euler, 21, 5, 4},
      {"cfg w = 3, Euler", 3, true, 3, S::euler, 40, 6, 5},
      {"cfg w = 3, Heun", 3, true, 3, S::heun, 40, 6, 6},
      {"cfg w = 3, Euler-Maruyama", 3, true, 3, S::euler_maruyama, 40, 6, 7},
      // 2N * width above the CPU's parallel threshold: the threaded loops and gemm.
      {"cfg w = 3, Heun, large batch", 4, true, 3, S::heun, 600, 3, 8},
  };
}

template <class T>
struct SampleOutcome {
  std::vector<T> x0, x;      // the start and the samples, [N, 2] flattened
  std::uint64_t offset = 0;  // the sampler's generator after the run (Euler-Maruyama draws)
};

/// The case's model (nn::MLP initialised on the host), start x0 ~ N(0, I) and labels cycling
/// over [0, K] (K: the null label).
template <class T>
struct SampleInputs {
  nn::MLPConfig cfg;
  nn::Parameters<T> ps;
  Tensor<T> x0;
  Tensor<label_t> y;
  explicit SampleInputs(const SampleCase& c)
      : cfg{.dim = 2, .width = 32, .depth = 2, .time_dim = 16, .num_classes = c.num_classes},
        x0(Shape{c.n, 2}),
        y(Shape{c.n}) {
    Generator gen(c.seed);
    nn::MLP<T> mlp(ps, cfg);
    ps.allocate();
    mlp.init(ps, gen);
    fill_normal(x0, gen);
    for (index_t i = 0; i < c.n; ++i) y[i] = static_cast<label_t>(i % (c.num_classes + 1));
  }
};

/// integrate() on backend B with the case's stepper over a grid inside (0, 1) (the SDE's score
/// conversion is singular at the ends of the linear path), from x0 (host) through `model`.
template <class T, Backend B, class Model>
SampleOutcome<T> sample_with(const SampleCase& c, const Model& model,
                             const nn::Parameters<T, B>& ps, const SampleInputs<T>& in) {
  Generator gen(1000 + c.seed);
  auto x = device_copy<T, B>(in.x0.view());
  const auto grid = uniform_grid<T>(c.steps, T(0.02), T(0.98));
  auto run = [&](auto& field) {
    switch (c.stepper) {
      case SampleStepper::euler:
        integrate(Euler{}, field, x, grid);
        break;
      case SampleStepper::heun:
        integrate(Heun{}, field, x, grid);
        break;
      case SampleStepper::euler_maruyama:
        integrate(euler_maruyama(schedules::Linear{}, 0.8, gen), field, x, grid);
        break;
    }
  };
  auto field = nn::as_field(model, ps);
  if (c.guided) {
    const auto y = device_copy<label_t, B>(in.y.view());
    auto guided = cfg(field, c.w);
    guided.set_condition(View<const label_t, B>(y.view()));
    run(guided);
  } else {
    run(field);
  }
  return {in.x0.to_vector(), host_copy<T, B>(x.view()), gen.offset()};
}

/// The CPU reference: nn::MLP through as_field on the host.
template <class T>
SampleOutcome<T> sample_reference(const SampleCase& c) {
  const SampleInputs<T> in(c);
  nn::Parameters<T> ps;
  nn::MLP<T> mlp(ps, in.cfg);
  ps.allocate();
  copy(ps.flat_params(), View<const T>(in.ps.flat_params()));
  return sample_with<T, Cpu>(c, mlp, ps, in);
}

/// The same sampling with nn::BackendMLP on B (the weights uploaded), entirely on B.
template <class T, Backend B>
SampleOutcome<T> sample_on_backend(const SampleCase& c) {
  const SampleInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendMLP<T, B> mlp(ps, in.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);
  return sample_with<T, B>(c, mlp, ps, in);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and resuming.
// ---------------------------------------------------------------------------------------------

/// Thrown by CountingSource to interrupt a run (as a killed process would).
struct Interrupted {};

/// Moons batches from the trainer's generator, with a position (the number of batches drawn)
/// that the checkpoint saves and restores; next() throws Interrupted when `stop_at` batches have
/// been drawn.
template <class T>
struct CountingSource {
  data::Toy2DDistribution<T> dist{data::Toy2D::Moons};
  std::int64_t drawn = 0, stop_at = -1;
  void next(View<T> x, View<label_t> y, Generator& gen) {
    if (drawn == stop_at) throw Interrupted{};
    ++drawn;
    dist.sample(x, y, gen);
  }
  Shape sample_shape() const { return Shape{2}; }
  index_t num_classes() const { return dist.num_classes(); }
  std::vector<std::int64_t> state() const { return {drawn}; }
  void set_state(const std::vector<std::int64_t>& s) { drawn = s.at(0); }
};

template <class T>
struct CheckpointRuns {
  TrainOutcome<T> straight;  // 10 steps on B, one trainer
  TrainOutcome<T> resumed;   // interrupted during step 8, resumed from the step-5 checkpoint
  TrainOutcome<T> from_cpu;  // BackendTrainer on B resuming train::Trainer's step-5 checkpoint
  std::int64_t resumed_first_step = -1, resumed_drawn = -1;
  std::int64_t interrupted_step = -1;                 // the step in the interrupted run's file
  std::string straight_file, resumed_file, cpu_file;  // the bytes of the final checkpoints
  std::string straight_csv, resumed_csv;              // loss CSVs, the seconds column removed
  std::vector<T> cpu_loaded;          // Trainer (CPU) loading B's final checkpoint: parameters
  std::int64_t cpu_loaded_step = -1;  // and its step (resumed, nothing left to run)
  std::string wrong_seed, bad_every;  // the messages of two refused configurations
};

/// Trainer's and BackendTrainer's checkpoints on B, for the CFG-CFM case (conditional model,
/// AdamW, EMA 0.9, a stateful source): a straight run of 10 steps with a checkpoint at the end;
/// the same run interrupted during step 8 (checkpoint_every = 5), then resumed by a fresh model
/// with other initial weights and a fresh trainer; the CPU Trainer's own runs (straight, and
/// interrupted at step 5 then finished by BackendTrainer on B); the CPU Trainer loading B's final
/// checkpoint; a resume with another seed and a negative checkpoint_every (refused).
template <class T, Backend B>
CheckpointRuns<T> checkpoint_runs() {
  TempDir dir(std::string("backend_ckpt_") + B::name);
  std::ostringstream log;
  TrainCase c{"CFG-CFM checkpoints", TrainKind::cfg_cfm, true, 0.05, 10, 32};
  const nn::MLPConfig cfg = train_config(c);
  auto options = [&](const std::string& name) {
    train::TrainerOptions o = train_options(c, log);
    o.checkpoint = dir / (name + ".safetensors");
    o.checkpoint_every = 5;
    o.loss_csv = dir / (name + ".csv");
    return o;
  };
  // nn::MLP's initial weights drawn with `seed` (mlp registered on ps, not yet allocated).
  auto host_init = [&](nn::Parameters<T>& ps, const nn::MLP<T>& mlp, std::uint64_t seed) {
    ps.allocate();
    Generator init(seed);
    mlp.init(ps, init);
  };
  auto optimizer_b = [] { return train::AdamW<T, B>(train::AdamWOptions{.weight_decay = 0.05}); };
  using BTrainer =
      train::BackendTrainer<T, B, schedules::Linear, train::UniformTime, train::AdamW<T, B>>;
  // One run on B from host weights initialised with `seed`; `stop_at` >= 0 interrupts it.
  auto run_b = [&](const std::string& name, std::uint64_t seed, std::int64_t stop_at,
                   TrainOutcome<T>* out, std::int64_t* first_step, std::int64_t* drawn) {
    nn::Parameters<T> host;
    const nn::MLP<T> ref(host, cfg);
    host_init(host, ref, seed);
    nn::Parameters<T, B> ps;
    nn::BackendMLP<T, B> mlp(ps, cfg);
    ps.allocate();
    nn::upload_parameters(ps, host);
    CountingSource<T> source;
    source.stop_at = stop_at;
    BTrainer trainer(mlp, ps, train_objective<T>(c), optimizer_b(), options(name));
    try {
      const auto r = trainer.fit(source);
      if (first_step) *first_step = r.first_step;
    } catch (const Interrupted&) {
      return;
    }
    if (drawn) *drawn = source.drawn;
    if (out) {
      out->losses = trainer.losses();
      out->norms = {trainer.last_grad_norm()};
      out->params = host_copy<T, B>(ps.flat_params());
      out->ema = host_copy<T, B>(trainer.ema()->flat());
      out->offset = trainer.generator().offset();
    }
  };
  auto run_cpu = [&](const std::string& name, std::int64_t stop_at) {
    nn::Parameters<T> ps;
    const nn::MLP<T> mlp(ps, cfg);
    host_init(ps, mlp, 7);
    CountingSource<T> source;
    source.stop_at = stop_at;
    train::Trainer trainer(mlp, ps, train_objective<T>(c),
                           train::AdamW<T>(train::AdamWOptions{.weight_decay = 0.05}),
                           options(name));
    try {
      trainer.fit(source);
    } catch (const Interrupted&) {
    }
  };

  CheckpointRuns<T> r;
  run_b("straight", 7, -1, &r.straight, nullptr, nullptr);
  r.straight_file = file_bytes(dir / "straight.safetensors");
  r.straight_csv = csv_without_seconds(dir / "straight.csv");

  run_b("split", 7, 7, nullptr, nullptr, nullptr);  // killed during step 8
  {
    const auto f = io::SafetensorsFile::read(dir / "split.safetensors");
    r.interrupted_step = nn::load_checked<std::int64_t>(f, "trainer.step", Shape{1})[0];
  }
  run_b("split", 999, -1, &r.resumed, &r.resumed_first_step, &r.resumed_drawn);
  r.resumed_file = file_bytes(dir / "split.safetensors");
  r.resumed_csv = csv_without_seconds(dir / "split.csv");

  // The CPU Trainer's straight run, and its step-5 checkpoint finished on B.
  run_cpu("cpu", -1);
  r.cpu_file = file_bytes(dir / "cpu.safetensors");
  run_cpu("cpu_split", 7);
  run_b("cpu_split", 999, -1, &r.from_cpu, nullptr, nullptr);

  // B's final checkpoint loaded by the CPU Trainer: it resumes at step 10 and has nothing to do.
  {
    nn::Parameters<T> ps;
    const nn::MLP<T> mlp(ps, cfg);
    host_init(ps, mlp, 999);
    CountingSource<T> source;
    auto o = options("straight");
    o.loss_csv.clear();
    train::Trainer trainer(mlp, ps, train_objective<T>(c),
                           train::AdamW<T>(train::AdamWOptions{.weight_decay = 0.05}), o);
    const auto res = trainer.fit(source);
    r.cpu_loaded_step = res.first_step;
    r.cpu_loaded = host_copy<T, Cpu>(ps.flat_params());
  }

  // Refused: resuming with another seed, a negative checkpoint_every.
  {
    nn::Parameters<T, B> ps;
    nn::BackendMLP<T, B> mlp(ps, cfg);
    ps.allocate();
    CountingSource<T> source;
    auto o = options("straight");
    o.seed = 12345;
    BTrainer trainer(mlp, ps, train_objective<T>(c), optimizer_b(), o);
    try {
      trainer.fit(source);
    } catch (const config_error& e) {
      r.wrong_seed = e.what();
    }
    o.checkpoint_every = -1;
    try {
      BTrainer bad(mlp, ps, train_objective<T>(c), optimizer_b(), o);
    } catch (const config_error& e) {
      r.bad_every = e.what();
    }
  }
  return r;
}

}  // namespace flowdiff::test
