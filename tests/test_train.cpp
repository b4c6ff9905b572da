// Training objectives and the trainer (train/objective.hpp, time_sampler.hpp, trainer.hpp):
// - the regression objectives' minimisers are the exact fields: with the exact velocity (CFM) or
//   score (DSM) of a Gaussian mixture as the "network", shifting its output by a constant c raises
//   the loss by exactly E[w] |c|^2 (the cross term vanishes in expectation), within Monte Carlo
//   error — the identity L(f) = L(u*) + E w |f - u*|^2 that makes CFM learn the marginal field;
// - a small MLP trained by CFM on a 2-D mixture approaches the exact marginal field;
// - the objective's gradient matches central differences of its loss (double);
// - per-sample label dropout happens at rate eta (binomial bounds), dropped labels are ∅;
// - time samplers: moments and ranges;
// - the trainer: deterministic from its seed, resumes bit for bit from a checkpoint (parameters,
//   EMA, optimizer and data position), stops on a non-finite loss keeping the last good
//   checkpoint, writes the loss CSV and progress lines, and rejects bad options.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <flowdiff/analytic/gaussian_mixture.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/models/mlp.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <flowdiff/train/objective.hpp>
#include <flowdiff/train/time_sampler.hpp>
#include <flowdiff/train/trainer.hpp>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "support/files.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;

using flowdiff::test::TempDir;

/// Every sample at the same time t (so an exact field can be evaluated on the whole batch).
struct FixedTime {
  double t;
  template <class T>
  void sample(fd::View<T> out, fd::Generator&) const {
    fd::fill(out, static_cast<T>(t));
  }
};

/// The exact field of a mixture (velocity or score) plus a constant shift, as a "network" the
/// objectives can evaluate. All samples of a batch share one time (FixedTime).
template <class Field>
struct ExactModel {
  using value_type = double;
  struct Cache {};
  mutable Field field;
  std::vector<double> shift;
  fd::index_t classes = 0;
  void forward(const nn::Parameters<double>&, fd::View<const double> x, fd::View<const double> t,
               fd::View<const fd::label_t> y, fd::View<double> out, Cache&) const {
    if (y.data() != nullptr && !y.empty())
      field(x, out, t[0], y);
    else
      field(x, out, t[0]);
    const fd::index_t d = x.dim(1);
    for (fd::index_t i = 0; i < x.dim(0); ++i)
      for (fd::index_t j = 0; j < d; ++j) out(i, j) += shift[static_cast<std::size_t>(j)];
  }
  void backward(nn::Parameters<double>&, fd::View<const double>, fd::View<double>, Cache&) const {}
  fd::index_t num_classes() const { return classes; }
};

fd::analytic::GaussianMixture<double> two_blobs() {
  auto means = fd::Tensor<double>::from({2, 2}, {-1.5, 0.0, 1.0, 0.5});
  return fd::analytic::GaussianMixture<double>::isotropic({0.4, 0.6}, means, {0.5, 0.4}, {0, 1});
}

template <class T>
fd::Tensor<T> mixture_batch(const fd::analytic::GaussianMixture<T>& m, fd::index_t n,
                            fd::Generator& gen, fd::Tensor<fd::label_t>* labels = nullptr) {
  auto s = m.sample(n, gen);
  if (labels != nullptr) *labels = std::move(s.labels);
  return std::move(s.x);
}

/// Fresh mixture samples each step (float or double), with labels.
template <class T>
struct MixtureSource {
  fd::analytic::GaussianMixture<T> mixture;
  fd::Shape sample_shape() const { return fd::Shape{mixture.dim()}; }
  fd::index_t num_classes() const { return mixture.num_classes(); }
  void next(fd::View<T> x, fd::View<fd::label_t> y, fd::Generator& gen) {
    auto s = mixture.sample(x.dim(0), gen);
    fd::copy(x, fd::View<const T>(s.x.view()));
    if (y.data() != nullptr && !y.empty())
      fd::copy(y, fd::View<const fd::label_t>(s.labels.view()));
  }
};

/// A fixed data set served in shuffled epochs, with a resumable position (a StatefulSource), and
/// optionally a NaN injected into the batch of one step.
struct ShuffledSource {
  fd::Tensor<float> data;  // [M, 2]
  fd::Tensor<fd::label_t> labels;
  std::uint64_t seed = 5;
  std::int64_t epoch = 0, pos = 0, served = 0, nan_at = -1;
  std::vector<fd::index_t> perm;

  fd::Shape sample_shape() const { return fd::Shape{2}; }
  fd::index_t num_classes() const { return 2; }
  void make_perm() {
    const fd::index_t m = data.dim(0);
    perm.resize(static_cast<std::size_t>(m));
    for (fd::index_t i = 0; i < m; ++i) perm[static_cast<std::size_t>(i)] = i;
    fd::Generator g(seed + static_cast<std::uint64_t>(epoch) * 7919u);
    for (fd::index_t i = m - 1; i > 0; --i)
      std::swap(perm[static_cast<std::size_t>(i)],
                perm[g.uniform_int(static_cast<std::uint64_t>(i + 1))]);
  }
  void next(fd::View<float> x, fd::View<fd::label_t> y, fd::Generator&) {
    if (perm.empty()) make_perm();
    for (fd::index_t i = 0; i < x.dim(0); ++i) {
      if (pos == data.dim(0)) {
        ++epoch;
        pos = 0;
        make_perm();
      }
      const fd::index_t r = perm[static_cast<std::size_t>(pos++)];
      x(i, 0) = data(r, 0);
      x(i, 1) = data(r, 1);
      if (y.data() != nullptr && !y.empty()) y[i] = labels[r];
    }
    if (served++ == nan_at) x(0, 0) = NAN;
  }
  std::vector<std::int64_t> state() const { return {epoch, pos}; }
  void set_state(const std::vector<std::int64_t>& s) {
    REQUIRE(s.size() == 2);
    epoch = s[0];
    pos = s[1];
    make_perm();
  }
};

ShuffledSource make_shuffled(fd::index_t m) {
  fd::Generator g(99);
  auto mix = fd::analytic::GaussianMixture<float>::isotropic(
      {0.5f, 0.5f}, fd::Tensor<float>::from({2, 2}, {-1.0f, 0.0f, 1.0f, 0.0f}), {0.3f, 0.3f},
      {0, 1});
  auto s = mix.sample(m, g);
  ShuffledSource src;
  src.data = std::move(s.x);
  src.labels = std::move(s.labels);
  return src;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("Objectives: the exact field minimises CFM and DSM (L(u* + c) - L(u*) = E[w] |c|^2)",
          "[train][objective]") {
  const auto mix = two_blobs();
  const fd::schedules::Linear lin;
  const fd::index_t n = 40000;
  fd::Generator data_gen(3);
  fd::Tensor<fd::label_t> labels;
  const auto z = mixture_batch(mix, n, data_gen, &labels);
  const std::vector<double> c = {0.05, -0.03};
  const double c2 = c[0] * c[0] + c[1] * c[1];
  nn::Parameters<double> none;

  for (double t : {0.2, 0.5, 0.8}) {
    INFO("t = " << t);
    // CFM: velocity target, uniform weight, unconditional and conditional fields.
    for (bool conditional : {false, true}) {
      INFO("conditional = " << conditional);
      tr::PathObjective<double, fd::schedules::Linear, FixedTime> obj(
          fd::GaussianPath<fd::schedules::Linear>(lin), FixedTime{t},
          {.target = fd::Parametrization::velocity});
      ExactModel<decltype(mix.velocity(lin))> exact{
          mix.velocity(lin), {0.0, 0.0}, conditional ? mix.num_classes() : 0};
      ExactModel<decltype(mix.velocity(lin))> shifted{mix.velocity(lin), c, exact.classes};
      typename decltype(exact)::Cache cache;
      const fd::View<const fd::label_t> y =
          conditional ? fd::View<const fd::label_t>(labels.view()) : fd::View<const fd::label_t>{};
      fd::Generator g1(17), g2(17);  // the same t, eps and dropout draws for both
      const double l0 = obj.loss(exact, none, cache, z.view(), y, g1);
      // Per-sample squared residuals of the exact field: their spread bounds the Monte Carlo
      // error of the cross term 2/D E[<c, u* - target>].
      double m2 = 0;
      const auto res_pred = obj.last_predictions();
      const auto res_tgt = obj.last_targets();
      for (fd::index_t i = 0; i < n; ++i) {
        const double r =
            c[0] * (res_pred(i, 0) - res_tgt(i, 0)) + c[1] * (res_pred(i, 1) - res_tgt(i, 1));
        m2 += r * r;
      }
      const double se = 2.0 / 2.0 * std::sqrt(m2 / n) / std::sqrt(static_cast<double>(n));
      const double l1 = obj.loss(shifted, none, cache, z.view(), y, g2);
      CHECK(l0 > 0);
      CHECK(std::abs((l1 - l0) - c2 / 2.0) <= 5 * se + 1e-12);
    }
    // DSM: score target -eps/beta with weight beta^2: excess E[beta^2] |c|^2 / D.
    {
      tr::PathObjective<double, fd::schedules::Linear, FixedTime> obj(
          fd::GaussianPath<fd::schedules::Linear>(lin), FixedTime{t},
          {.target = fd::Parametrization::score, .weighting = tr::Weighting::beta_squared});
      ExactModel<decltype(mix.score(lin))> exact{mix.score(lin), {0.0, 0.0}, 0};
      ExactModel<decltype(mix.score(lin))> shifted{mix.score(lin), c, 0};
      typename decltype(exact)::Cache cache;
      fd::Generator g1(23), g2(23);
      const double l0 = obj.loss(exact, none, cache, z.view(), {}, g1);
      double m2 = 0;
      const double w = (1 - t) * (1 - t);
      for (fd::index_t i = 0; i < n; ++i) {
        const double r = c[0] * (obj.last_predictions()(i, 0) - obj.last_targets()(i, 0)) +
                         c[1] * (obj.last_predictions()(i, 1) - obj.last_targets()(i, 1));
        m2 += w * w * r * r;
      }
      const double se = std::sqrt(m2 / n) / std::sqrt(static_cast<double>(n));
      const double l1 = obj.loss(shifted, none, cache, z.view(), {}, g2);
      CHECK(obj.last_weights()[0] == Approx(w).epsilon(1e-12));
      CHECK(std::abs((l1 - l0) - w * c2 / 2.0) <= 5 * se + 1e-12);
    }
  }
}

TEST_CASE("Objectives: the gradient matches central differences of the loss (double)",
          "[train][objective][gradcheck]") {
  for (auto target : {fd::Parametrization::velocity, fd::Parametrization::score}) {
    INFO("target = " << static_cast<int>(target));
    fd::Generator init(7);
    nn::Parameters<double> ps;
    nn::MLP<double> mlp(ps, {.dim = 2, .width = 8, .depth = 2, .time_dim = 4, .num_classes = 2});
    ps.allocate();
    mlp.init(ps, init);
    tr::PathObjective<double, fd::schedules::Linear> obj(
        fd::GaussianPath(fd::schedules::Linear{}), tr::UniformTime{0, 0.95},
        {.target = target,
         .cfg_dropout = 0.3,
         .weighting = target == fd::Parametrization::score ? tr::Weighting::beta_squared
                                                           : tr::Weighting::uniform});
    nn::MLP<double>::Cache cache;
    fd::Generator dg(1);
    fd::Tensor<fd::label_t> y;
    const auto z = mixture_batch(two_blobs(), 16, dg, &y);
    const fd::Generator start(42);
    fd::Generator g = start;
    ps.zero_grad();
    obj.forward_backward(mlp, ps, cache, z.view(), y.view(), g);
    const auto grad = fd::Tensor<double>::from(
        {ps.flat_size()},
        std::span<const double>(ps.flat_grads().data(), static_cast<std::size_t>(ps.flat_size())));
    double worst = 0, rms = 0;
    for (fd::index_t i = 0; i < grad.numel(); ++i) rms += grad[i] * grad[i];
    rms = std::sqrt(rms / static_cast<double>(grad.numel()));
    REQUIRE(rms > 0);
    auto p = ps.flat_params();
    for (fd::index_t i = 0; i < ps.flat_size(); i += 3) {
      const double h = 1e-6, v = p[i];
      p[i] = v + h;
      g = start;
      const double lp = obj.loss(mlp, ps, cache, z.view(), y.view(), g);
      p[i] = v - h;
      g = start;
      const double lm = obj.loss(mlp, ps, cache, z.view(), y.view(), g);
      p[i] = v;
      const double num = (lp - lm) / (2 * h);
      const double a = grad[i];
      worst = std::max(worst, std::abs(a - num) / std::max({std::abs(a), std::abs(num), rms}));
    }
    CHECK(worst <= 1e-6);
  }
}

TEST_CASE("Objectives: per-sample label dropout at rate eta", "[train][objective][cfg]") {
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 4, .depth = 1, .time_dim = 4, .num_classes = 3});
  ps.allocate();
  fd::Generator init(1);
  mlp.init(ps, init);
  nn::MLP<float>::Cache cache;
  const fd::index_t n = 50000;
  fd::Tensor<float> z = fd::Tensor<float>::zeros({n, 2});
  fd::Tensor<fd::label_t> y(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % 3);
  for (double eta : {0.0, 0.1, 0.5, 1.0}) {
    INFO("eta = " << eta);
    auto obj = tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{}), eta);
    fd::Generator g(5);
    obj.loss(mlp, ps, cache, z.view(), y.view(), g);
    fd::index_t dropped = 0, wrong = 0;
    for (fd::index_t i = 0; i < n; ++i) {
      const auto l = obj.last_labels()[i];
      if (l == 3)
        ++dropped;
      else if (l != y[i])
        ++wrong;
    }
    CHECK(wrong == 0);
    const double sd = std::sqrt(n * eta * (1 - eta));
    CHECK(std::abs(static_cast<double>(dropped) - n * eta) <= 5 * sd + 1e-9);
  }
  // No labels: a conditional model trains on ∅ throughout.
  auto obj = tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{}), 0.1);
  fd::Generator g(6);
  obj.loss(mlp, ps, cache, z.view(), {}, g);
  for (fd::index_t i = 0; i < n; i += 997) CHECK(obj.last_labels()[i] == 3);
  // Errors.
  CHECK_THROWS_AS(tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{}), 1.5),
                  fd::config_error);
  y[7] = 9;
  CHECK_THROWS_WITH(obj.loss(mlp, ps, cache, z.view(), y.view(), g), Contains("y[7] = 9"));
  nn::Parameters<float> ps2;
  nn::MLP<float> unconditional(ps2, {.dim = 2, .width = 4, .depth = 1, .time_dim = 4});
  ps2.allocate();
  nn::MLP<float>::Cache c2;
  CHECK_THROWS_WITH(obj.loss(unconditional, ps2, c2, z.view(), {}, g),
                    Contains("needs a class-conditional model"));
  fd::Tensor<fd::label_t> short_y(fd::Shape{5});
  CHECK_THROWS_AS(obj.loss(mlp, ps, cache, z.view(), short_y.view(), g), fd::shape_error);
}

TEST_CASE("Time samplers: ranges and moments", "[train][time]") {
  const fd::index_t n = 100000;
  fd::Tensor<double> t(fd::Shape{n});
  fd::Generator g(3);
  tr::UniformTime{0.1, 0.9}.sample(t.view(), g);
  double s = 0, lo = 1, hi = 0;
  for (fd::index_t i = 0; i < n; ++i) {
    s += t[i];
    lo = std::min(lo, t[i]);
    hi = std::max(hi, t[i]);
  }
  CHECK(lo >= 0.1);
  CHECK(hi < 0.9);
  CHECK(std::abs(s / n - 0.5) < 5 * 0.8 / std::sqrt(12.0 * n));
  tr::LogitNormalTime{.mean = 0.5, .stddev = 0.8}.sample(t.view(), g);
  double m = 0, v = 0;
  for (fd::index_t i = 0; i < n; ++i) {
    REQUIRE(t[i] > 0);
    REQUIRE(t[i] < 1);
    const double l = std::log(t[i] / (1 - t[i]));
    m += l;
    v += l * l;
  }
  m /= n;
  v = v / n - m * m;
  CHECK(std::abs(m - 0.5) < 5 * 0.8 / std::sqrt(double(n)));
  CHECK(std::abs(std::sqrt(v) - 0.8) < 0.01);
  CHECK_THROWS_WITH(tr::UniformTime({0.5, 0.2}).sample(t.view(), g), Contains("t_min < t_max"));
  CHECK_THROWS_AS(tr::LogitNormalTime({.stddev = 0}).sample(t.view(), g), fd::config_error);
}

TEST_CASE("CFM: a trained MLP approaches the exact marginal field", "[train][cfm]") {
  // Minimising CFM minimises E_t E_x |f(x, t) - u*(x, t)|^2 (the identity checked above), so the
  // trained network's error to the exact field, relative to the field's own size, must become
  // small: untrained it is ~1; 3000 AdamW steps of batch 256 bring it to 0.0004-0.007 for the
  // conditional field and 0.004-0.016 for the unconditional one (trained on the 20% of samples
  // whose label was dropped). The bound 0.05 leaves 3x room for the finite training budget; the
  // untrained network scores about 1.
  auto means = fd::Tensor<float>::from({2, 2}, {-1.5f, 0.0f, 1.0f, 0.5f});
  MixtureSource<float> src{
      fd::analytic::GaussianMixture<float>::isotropic({0.4f, 0.6f}, means, {0.5f, 0.4f}, {0, 1})};
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 64, .depth = 3, .time_dim = 16, .num_classes = 2});
  ps.allocate();
  fd::Generator init(2);
  mlp.init(ps, init);
  std::ostringstream log;
  tr::Trainer trainer(mlp, ps,
                      tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{}), 0.2),
                      tr::AdamW<float>({.weight_decay = 0}),
                      {.steps = 3000,
                       .batch = 256,
                       .lr = 3e-3,
                       .warmup_steps = 50,
                       .ema_decay = 0,
                       .seed = 1,
                       .log_every = 500,
                       .progress = tr::ProgressMode::lines,
                       .log = &log});
  const auto r = trainer.fit(src);
  CHECK(r.last_step == 3000);
  CHECK(std::isfinite(r.final_loss));

  auto field = nn::as_field(mlp, ps);
  auto exact = src.mixture.velocity(fd::schedules::Linear{});
  fd::Generator eg(77);
  for (bool conditional : {false, true}) {
    for (float t : {0.1f, 0.4f, 0.7f, 0.9f}) {
      INFO("t = " << t << ", conditional = " << conditional);
      const fd::index_t n = 2000;
      auto s = src.mixture.sample(n, eg);
      auto eps = fd::randn<float>({n, 2}, eg);
      fd::Tensor<float> x({n, 2}), u({n, 2}), ref({n, 2});
      fd::GaussianPath(fd::schedules::Linear{}).sample(s.x, eps, t, x);
      if (conditional) {
        field(x.view(), u.view(), t, s.labels.view());
        exact(x.view(), ref.view(), t, s.labels.view());
      } else {
        field(x.view(), u.view(), t);
        exact(x.view(), ref.view(), t);
      }
      double err = 0, size = 0;
      for (fd::index_t i = 0; i < 2 * n; ++i) {
        err += (u[i] - ref[i]) * (u[i] - ref[i]);
        size += ref[i] * ref[i];
      }
      CHECK(err / size < 0.05);
    }
  }
}

TEST_CASE("Trainer: deterministic from the seed; resume continues bit for bit",
          "[train][trainer][checkpoint]") {
  TempDir dir("resume");
  // Straight run A, 40 steps.
  auto make = [](nn::Parameters<float>& ps, nn::MLP<float>& mlp, std::uint64_t init_seed) {
    ps.allocate();
    fd::Generator init(init_seed);
    mlp.init(ps, init);
  };
  auto options = [&](const fs::path& ckpt, const fs::path& csv, std::uint64_t seed) {
    return tr::TrainerOptions{.steps = 40,
                              .batch = 32,
                              .lr = 2e-3,
                              .warmup_steps = 5,
                              .seed = seed,
                              .checkpoint = ckpt,
                              .checkpoint_every = 10,
                              .loss_csv = csv,
                              .progress = tr::ProgressMode::quiet};
  };
  const nn::MLPConfig cfg{.dim = 2, .width = 16, .depth = 2, .time_dim = 8, .num_classes = 2};
  auto objective = [] {
    return tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{}), 0.1);
  };

  std::vector<float> straight, again, other_seed;
  std::string straight_csv;
  {
    auto src = make_shuffled(300);
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 1);
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(),
                        options(dir.path / "a.safetensors", dir.path / "a.csv", 3));
    const auto r = trainer.fit(src);
    CHECK(!r.resumed);
    CHECK(r.last_step == 40);
    straight =
        std::vector<float>(ps.flat_params().data(), ps.flat_params().data() + ps.flat_size());
    straight_csv = read_text(dir.path / "a.csv");
  }
  {  // the same seed again: identical
    auto src = make_shuffled(300);
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 1);
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(),
                        options(dir.path / "b.safetensors", {}, 3));
    trainer.fit(src);
    again = std::vector<float>(ps.flat_params().data(), ps.flat_params().data() + ps.flat_size());
  }
  {  // another seed: different
    auto src = make_shuffled(300);
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 1);
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(), options({}, {}, 4));
    trainer.fit(src);
    other_seed =
        std::vector<float>(ps.flat_params().data(), ps.flat_params().data() + ps.flat_size());
  }
  CHECK(again == straight);
  CHECK(other_seed != straight);

  // Interrupted at step 20 (a run whose total is 40 but which is stopped after its checkpoint at
  // 20: emulated by a first trainer with steps = 40 that we stop via a source that throws), then
  // resumed by a fresh process-like setup: new parameters (initialised differently), new source,
  // new trainer with the same options.
  struct Stop {};
  {
    auto src = make_shuffled(300);
    struct Stopping : ShuffledSource {
      std::int64_t stop_after = 0, calls = 0;
      void next(fd::View<float> x, fd::View<fd::label_t> y, fd::Generator& g) {
        if (calls++ == stop_after) throw Stop{};
        ShuffledSource::next(x, y, g);
      }
    } stopping;
    static_cast<ShuffledSource&>(stopping) = std::move(src);
    stopping.stop_after = 23;  // killed during step 24, after the checkpoint of step 20
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 1);
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(),
                        options(dir.path / "c.safetensors", dir.path / "c.csv", 3));
    CHECK_THROWS_AS(trainer.fit(stopping), Stop);
  }
  {
    const auto f = fd::io::SafetensorsFile::read(dir.path / "c.safetensors");
    CHECK(nn::load_checked<std::int64_t>(f, "trainer.step", fd::Shape{1})[0] == 20);
    CHECK(f.contains("ema.net.0.weight"));
    CHECK(f.contains("optimizer.exp_avg.net.0.weight"));
    CHECK(f.contains("trainer.data_state"));
  }
  {
    auto src = make_shuffled(300);
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 999);  // different initial weights: the checkpoint must replace them
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(),
                        options(dir.path / "c.safetensors", dir.path / "c.csv", 3));
    const auto r = trainer.fit(src);
    CHECK(r.resumed);
    CHECK(r.first_step == 20);
    CHECK(r.last_step == 40);
    const std::vector<float> resumed(ps.flat_params().data(),
                                     ps.flat_params().data() + ps.flat_size());
    CHECK(resumed == straight);  // bit for bit
    // The CSV holds each step once (rows 21-23 of the interrupted run were dropped), with the
    // same losses as the straight run (the seconds column differs).
    auto strip = [](const std::string& text) {
      std::stringstream in(text), out;
      std::string line;
      while (std::getline(in, line)) out << line.substr(0, line.rfind(',')) << '\n';
      return out.str();
    };
    CHECK(strip(read_text(dir.path / "c.csv")) == strip(straight_csv));
    // A second resume of a finished run does nothing more.
    const auto r2 = trainer.fit(src);
    CHECK(r2.first_step == 40);
    // Resuming with another seed is refused.
    tr::Trainer wrong(mlp, ps, objective(), tr::AdamW<float>(),
                      options(dir.path / "c.safetensors", {}, 8));
    CHECK_THROWS_WITH(wrong.fit(src), Contains("trained with seed 3"));
  }
  // The EMA weights export loads as a plain state_dict.
  {
    auto src = make_shuffled(300);
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    make(ps, mlp, 1);
    tr::Trainer trainer(mlp, ps, objective(), tr::AdamW<float>(), options({}, {}, 3));
    trainer.fit(src);
    trainer.save_weights(dir.path / "w.safetensors");
    nn::Parameters<float> ps2;
    nn::MLP<float> mlp2(ps2, cfg);
    ps2.allocate();
    nn::load_parameters(ps2, fd::io::SafetensorsFile::read(dir.path / "w.safetensors"));
    REQUIRE(trainer.ema() != nullptr);
    for (fd::index_t i = 0; i < ps.flat_size(); ++i)
      REQUIRE(ps2.flat_params()[i] == trainer.ema()->flat()[i]);
  }
}

TEST_CASE("Trainer: a non-finite loss stops the run and keeps the last good checkpoint",
          "[train][trainer][errors]") {
  TempDir dir("nan");
  const nn::MLPConfig cfg{.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 2};
  auto src = make_shuffled(200);
  src.nan_at = 14;  // the 15th batch carries a NaN
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, cfg);
  ps.allocate();
  fd::Generator init(1);
  mlp.init(ps, init);
  std::ostringstream log;
  const fs::path ckpt = dir.path / "run.safetensors";
  tr::Trainer trainer(mlp, ps, tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{})),
                      tr::AdamW<float>(),
                      {.steps = 30,
                       .batch = 16,
                       .checkpoint = ckpt,
                       .checkpoint_every = 10,
                       .progress = tr::ProgressMode::lines,
                       .log = &log});
  CHECK_THROWS_WITH(trainer.fit(src), Contains("step 15") && Contains("not finite") &&
                                          Contains("last good checkpoint"));
  CHECK(trainer.step() == 14);
  CHECK(fd::all_finite(ps.flat_params()));
  const auto f = fd::io::SafetensorsFile::read(ckpt);
  CHECK(nn::load_checked<std::int64_t>(f, "trainer.step", fd::Shape{1})[0] == 10);
  CHECK_THAT(log.str(), Contains("not finite"));
  // A clean source resumes from step 10 and finishes.
  auto clean = make_shuffled(200);
  tr::Trainer again(mlp, ps, tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{})),
                    tr::AdamW<float>(), trainer.options());
  const auto r = again.fit(clean);
  CHECK(r.first_step == 10);
  CHECK(r.last_step == 30);
}

TEST_CASE("Trainer: a checkpoint that does not fit leaves the trainer as it was",
          "[train][trainer][errors]") {
  TempDir dir("misfit");
  const nn::MLPConfig cfg{.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 2};
  auto obj = [] { return tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{})); };
  const fs::path ckpt = dir.path / "run.safetensors";
  {
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    ps.allocate();
    fd::Generator init(1);
    mlp.init(ps, init);
    auto src = make_shuffled(200);
    tr::Trainer trainer(mlp, ps, obj(), tr::AdamW<float>(),
                        {.steps = 12, .batch = 16, .ema_decay = 0.9, .checkpoint = ckpt,
                         .progress = tr::ProgressMode::quiet});
    trainer.fit(src);
  }
  // Resuming the AdamW run with SGD + momentum: the parameters and the EMA in the file fit, the
  // optimizer state does not (no momentum buffers). The load fails after the parameters were
  // read; parameters, EMA, data position and step must be what they were before.
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, cfg);
  ps.allocate();
  fd::Generator init(7);
  mlp.init(ps, init);
  const std::vector<float> before(ps.flat_params().data(),
                                  ps.flat_params().data() + ps.flat_size());
  auto src = make_shuffled(200);
  const auto src_state = src.state();
  tr::Trainer trainer(mlp, ps, obj(), tr::Sgd<float>({.momentum = 0.9}),
                      {.steps = 12, .batch = 16, .ema_decay = 0.9, .checkpoint = ckpt,
                       .progress = tr::ProgressMode::quiet});
  CHECK_THROWS_WITH(trainer.fit(src), Contains("optimizer.momentum_buffer"));
  const std::vector<float> after(ps.flat_params().data(),
                                 ps.flat_params().data() + ps.flat_size());
  CHECK(after == before);
  CHECK(src.state() == src_state);
  CHECK(trainer.step() == 0);
  REQUIRE(trainer.ema() != nullptr);
  for (fd::index_t i = 0; i < ps.flat_size(); ++i) REQUIRE(trainer.ema()->flat()[i] == before[i]);
}

TEST_CASE("Trainer: progress lines, the loss CSV and option errors", "[train][trainer]") {
  TempDir dir("log");
  const nn::MLPConfig cfg{.dim = 2, .width = 8, .depth = 1, .time_dim = 4};
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, cfg);
  ps.allocate();
  fd::Generator init(1);
  mlp.init(ps, init);
  MixtureSource<float> src{fd::analytic::GaussianMixture<float>::standard_normal(2)};
  std::ostringstream log;
  const fs::path csv = dir.path / "sub" / "loss.csv";
  tr::Trainer trainer(mlp, ps, tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{})),
                      tr::AdamW<float>(),
                      {.steps = 25,
                       .batch = 8,
                       .loss_csv = csv,
                       .log_every = 10,
                       .progress = tr::ProgressMode::lines,
                       .log = &log});
  trainer.fit(src);  // an unlabelled source: the unconditional model gets no labels
  const std::string text = log.str();
  CHECK_THAT(text, Contains("step 10/25") && Contains("step 20/25") && Contains("step 25/25") &&
                       Contains("steps/s") && Contains("took"));
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);
  CHECK(line == "step,loss,lr,grad_norm,seconds");
  int rows = 0;
  while (std::getline(in, line)) ++rows;
  CHECK(rows == 25);
  CHECK(trainer.learning_rate(0) == Approx(1e-3));
  CHECK(trainer.learning_rate(25) == Approx(0).margin(1e-12));

  auto obj = [] { return tr::flow_matching<float>(fd::GaussianPath(fd::schedules::Linear{})); };
  using Opts = tr::TrainerOptions;
  CHECK_THROWS_WITH(tr::Trainer(mlp, ps, obj(), tr::AdamW<float>(), Opts{.steps = 0}),
                    Contains("steps must be >= 1"));
  CHECK_THROWS_WITH(tr::Trainer(mlp, ps, obj(), tr::AdamW<float>(), Opts{.batch = 0}),
                    Contains("batch must be >= 1"));
  CHECK_THROWS_WITH(tr::Trainer(mlp, ps, obj(), tr::AdamW<float>(), Opts{.lr = -1}),
                    Contains("lr must be"));
  CHECK_THROWS_WITH(
      tr::Trainer(mlp, ps, obj(), tr::AdamW<float>(), Opts{.steps = 10, .warmup_steps = 10}),
      Contains("warmup_steps"));
  CHECK_THROWS_WITH(tr::Trainer(mlp, ps, obj(), tr::AdamW<float>(), Opts{.ema_decay = 1.0}),
                    Contains("ema_decay"));
  // A file that is not a trainer checkpoint is refused with a clear message.
  nn::save_parameters(ps, dir.path / "weights.safetensors");
  tr::Trainer t2(mlp, ps, obj(), tr::AdamW<float>(),
                 Opts{.steps = 5,
                      .batch = 4,
                      .checkpoint = dir.path / "weights.safetensors",
                      .progress = tr::ProgressMode::quiet});
  CHECK_THROWS_WITH(t2.fit(src), Contains("not a flowdiff trainer checkpoint"));
  // Data with a different number of classes than the model.
  nn::Parameters<float> ps3;
  nn::MLP<float> mlp3(ps3, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 5});
  ps3.allocate();
  auto shuffled = make_shuffled(50);
  tr::Trainer t3(mlp3, ps3, obj(), tr::AdamW<float>(),
                 Opts{.steps = 2, .batch = 4, .progress = tr::ProgressMode::quiet});
  CHECK_THROWS_WITH(t3.fit(shuffled), Contains("2 classes but the model 5"));
}
