// Sampler throughput: particle-steps per second of Euler, Heun and RK4 on the exact Gaussian-
// mixture field (d = 2 and d = 64, 1e4 to 1e6 particles), and the fused sampler update (CFG
// combination + Euler step + noise injection in one pass) against the copy bandwidth measured in
// the same binary. Report: bytes_per_second of BM_fused_update / bytes_per_second of BM_copy at the
// same size, counting the bytes each one moves (copy: read + write; fused: 4 reads + 1 write).
// BM_cfg_sampling: integrate() under cfg with the samplers' own fused update against the unfused
// path (the same bits), Euler and Euler-Maruyama, on a cheap field and on the mixture.
// BM_sampler_accuracy: the distance of each stepper's samples to the exact ODE solution at a budget
// of field evaluations, on three grids (the accuracy a budget buys; deterministic figures).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <vector>
#include <string>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/distances.hpp>

namespace fd = flowdiff;

namespace {

template <class T = float>
fd::analytic::GaussianMixture<T> mixture(fd::index_t d) {
  fd::Generator gen{1};
  auto means = fd::randn<T>({8, d}, gen);
  fd::scale(means, T(3));
  std::vector<fd::label_t> labels{0, 1, 2, 3, 0, 1, 2, 3};
  return fd::analytic::GaussianMixture<T>::isotropic(std::vector<T>(8, T(1)), means,
                                                     std::vector<T>(8, T(0.5)), labels, 4);
}

template <class Stepper>
void BM_sampler(benchmark::State& state) {
  const fd::index_t n = state.range(0), d = state.range(1);
  const auto data = mixture(d);
  auto field = data.velocity(fd::schedules::Linear{});
  fd::Generator gen{2};
  auto x0 = fd::randn<float>({n, d}, gen);
  fd::Tensor<float> x(x0.shape());
  const auto grid = fd::uniform_grid<float>(4);
  for (auto _ : state) {
    fd::copy(x, x0);
    fd::integrate(Stepper{}, field, x, grid);
    benchmark::DoNotOptimize(x.data());
  }
  state.SetItemsProcessed(state.iterations() * n * 4);  // particle-steps
  state.counters["evals/step"] = Stepper::stages;
}

void sampler_args(benchmark::internal::Benchmark* b) {
  for (long d : {2, 64})
    for (long n : {10000, 100000, 1000000})
      if (n * d <= 16'000'000) b->Args({n, d});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK_TEMPLATE(BM_sampler, fd::Euler)->Apply(sampler_args);
BENCHMARK_TEMPLATE(BM_sampler, fd::Heun)->Apply(sampler_args);
BENCHMARK_TEMPLATE(BM_sampler, fd::RK4)->Apply(sampler_args);

// ---------------------------------------------------------------------------------------------
// Accuracy for the cost: how far each sampler's samples land from the exact ODE solution at a
// budget of field evaluations (NFE), on the exact velocity of the 8-component mixture above (in
// double, so that the error is the sampler's alone). One particle set of 2000 draws, the same for
// every sampler; the reference is Dopri5 at atol = rtol = 1e-12. Args: stepper (0 Euler,
// 1 Midpoint, 2 Heun, 3 RK4, 4 DPM-Solver++(2M), 5 Dopri5, 6 Dopri5 with the worst-sample error
// norm), budget (NFE; for Dopri5 the tolerance's exponent, NFE as it comes), d, grid (0:
// uniform; 1: shifted_grid(steps, 3), its steps finer towards the data; 2: shifted_grid(steps,
// 1/3), finer towards the noise; 3: dpm_solver_grid(schedule, steps), DPM-Solver++(2M) only).
// Counters: rms_error (root mean squared Euclidean distance to the reference over the
// particles), median_error, wrong_mode (the fraction of particles whose nearest component mean
// is not the reference's), nfe; the time is one whole integration.
// ---------------------------------------------------------------------------------------------
struct AccuracyCase {
  fd::analytic::GaussianMixture<double> data;
  fd::Tensor<double> x0, reference;
};

const AccuracyCase& accuracy_case(fd::index_t d) {
  static std::map<fd::index_t, AccuracyCase> cases;  // benchmarks run one at a time
  auto it = cases.find(d);
  if (it != cases.end()) return it->second;
  AccuracyCase c{mixture<double>(d), {}, {}};
  fd::Generator gen{9};
  c.x0 = fd::randn<double>({2000, d}, gen);
  c.reference = c.x0.clone();
  auto field = c.data.velocity(fd::schedules::Linear{});
  fd::integrate(fd::Dopri5{1e-12, 1e-12}, field, c.reference, fd::uniform_grid<double>(1));
  return cases.emplace(d, std::move(c)).first->second;
}

void BM_sampler_accuracy(benchmark::State& state) {
  const int which = static_cast<int>(state.range(0));
  const fd::index_t budget = state.range(1), d = state.range(2);
  const int shifted = static_cast<int>(state.range(3));
  const AccuracyCase& c = accuracy_case(d);
  auto field = c.data.velocity(fd::schedules::Linear{});
  fd::Tensor<double> x(c.x0.shape());
  static constexpr const char* names[] = {"Euler", "Midpoint", "Heun", "RK4", "DPM-Solver++(2M)",
                                          "Dopri5", "Dopri5 worst-sample"};
  static constexpr int stages[] = {1, 2, 2, 4, 1, 0, 0};
  fd::IntegrateStats stats{};
  for (auto _ : state) {
    fd::copy(x, c.x0);
    const fd::index_t steps = which >= 5 ? 1 : budget / stages[which];
    const double shift = shifted == 1 ? 3.0 : 1.0 / 3;
    const auto grid = shifted == 0   ? fd::uniform_grid<double>(steps)
                      : shifted == 3 ? fd::dpm_solver_grid<double>(fd::schedules::Linear{}, steps)
                                     : fd::shifted_grid<double>(steps, shift);
    switch (which) {
      case 0: stats = fd::integrate(fd::Euler{}, field, x, grid); break;
      case 1: stats = fd::integrate(fd::Midpoint{}, field, x, grid); break;
      case 2: stats = fd::integrate(fd::Heun{}, field, x, grid); break;
      case 3: stats = fd::integrate(fd::RK4{}, field, x, grid); break;
      case 4:
        stats = fd::integrate(fd::dpm_solver_pp_2m(fd::schedules::Linear{}), field, x, grid);
        break;
      default: {
        const double tol = std::pow(10.0, -static_cast<double>(budget));
        fd::Dopri5 dopri{tol, tol};
        if (which == 6) dopri.error_norm = fd::Dopri5::ErrorNorm::worst_sample;
        stats = fd::integrate(dopri, field, x, grid);
      }
    }
    benchmark::DoNotOptimize(x.data());
  }
  const fd::index_t n = x.dim(0);
  const auto nearest = [&](const double* p) {
    fd::index_t best = 0;
    double best_d = INFINITY;
    for (fd::index_t k = 0; k < c.data.num_components(); ++k) {
      double dist = 0;
      for (fd::index_t j = 0; j < d; ++j)
        dist += (p[j] - c.data.mean(k, j)) * (p[j] - c.data.mean(k, j));
      if (dist < best_d) best_d = dist, best = k;
    }
    return best;
  };
  double sq = 0;
  std::vector<double> errors(static_cast<std::size_t>(n));
  fd::index_t wrong = 0;
  for (fd::index_t i = 0; i < n; ++i) {
    double e2 = 0;
    for (fd::index_t j = 0; j < d; ++j) {
      const double e = x(i, j) - c.reference(i, j);
      e2 += e * e;
    }
    sq += e2;
    errors[static_cast<std::size_t>(i)] = std::sqrt(e2);
    wrong += nearest(&x(i, 0)) != nearest(&c.reference(i, 0));
  }
  std::nth_element(errors.begin(), errors.begin() + n / 2, errors.end());
  state.counters["rms_error"] = std::sqrt(sq / static_cast<double>(n));
  state.counters["median_error"] = errors[static_cast<std::size_t>(n / 2)];
  state.counters["wrong_mode"] = static_cast<double>(wrong) / static_cast<double>(n);
  state.counters["nfe"] = static_cast<double>(stats.field_evaluations);
  state.SetLabel((which >= 5 ? std::string(names[which]) + " tol 1e-" + std::to_string(budget)
                             : std::string(names[which])) +
                 (shifted == 1   ? ", finer near data"
                  : shifted == 2 ? ", finer near noise"
                  : shifted == 3 ? ", dpm_solver_grid"
                                 : ""));
}

void accuracy_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"stepper", "budget", "d", "grid"});
  for (long d : {2, 64})
    for (long grid : {0, 1, 2}) {
      for (long s = 0; s < 5; ++s)
        for (long nfe : {8, 16, 32, 64, 128}) b->Args({s, nfe, d, grid});
      if (grid == 0)  // Dopri5 chooses its own steps in the one interval [0, 1]
        for (long s : {5, 6})
          for (long e = 2; e <= 8; e += 2) b->Args({s, e, d, grid});
    }
  for (long d : {2, 64})  // DPM-Solver++(2M) on its own grid
    for (long nfe : {8, 16, 32, 64, 128}) b->Args({4, nfe, d, 3});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_sampler_accuracy)->Apply(accuracy_args);

// The copy bandwidth reference: one read and one write per element.
void BM_copy(benchmark::State& state) {
  const fd::index_t n = state.range(0);
  auto a = fd::Tensor<float>::full({n}, 1.0f);
  auto b = fd::Tensor<float>::zeros({n});
  for (auto _ : state) {
    fd::transform(b, [](float v) { return v; }, a);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 2 * static_cast<int64_t>(sizeof(float)));
}

// x <- x + h ((1 - w) u_uncond + w u_cond) + s xi: four reads, one write per element.
void BM_fused_update(benchmark::State& state) {
  const fd::index_t n = state.range(0);
  fd::Generator gen{3};
  auto x = fd::randn<float>({n}, gen);
  auto uc = fd::randn<float>({n}, gen);
  auto uu = fd::randn<float>({n}, gen);
  auto xi = fd::randn<float>({n}, gen);
  const float h = 1e-3f, w = 3.0f, s = 1e-3f;
  for (auto _ : state) {
    fd::transform(
        x, [=](float xv, float c, float u, float z) { return xv + h * ((1 - w) * u + w * c) + s * z; },
        x, uc, uu, xi);
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 5 * static_cast<int64_t>(sizeof(float)));
}

BENCHMARK(BM_copy)->Arg(1 << 16)->Arg(1 << 20)->Arg(1 << 24)->UseRealTime();
BENCHMARK(BM_fused_update)->Arg(1 << 16)->Arg(1 << 20)->Arg(1 << 24)->UseRealTime();

// A cheap conditional field, u(x|y) = (1 + y / 4) x + t: one read and one write per element, so
// that the sampler's own passes are a visible share of a step.
struct CheapClassField {
  using value_type = float;
  fd::index_t num_classes() const { return 4; }
  void operator()(fd::View<const float> x, fd::View<float> out, float t,
                  fd::View<const fd::label_t> y) const {
    const fd::index_t d = x.row_size();
    fd::Cpu::parallel_for(x.rows(), [&](fd::index_t i) {
      const float a = 1.0f + 0.25f * static_cast<float>(y[i]);
      for (fd::index_t j = 0; j < d; ++j) out[i * d + j] = a * x[i * d + j] + t;
    });
  }
};

// Forwards field(x, out, t) only, hiding Cfg::evaluate_halves: the steppers' unfused path.
template <class G>
struct HideHalves {
  G& g;
  void operator()(fd::View<const float> x, fd::View<float> out, float t) { g(x, out, t); }
};

// Guided sampling, integrate(stepper, cfg(field, 3), x, 8 steps), with the samplers' own fusion of
// the CFG combination into the update (fused = 1) or without it (0: a combination pass, then the
// update pass; fill_normal in a pass of its own for Euler-Maruyama). Args: particles, d, fused,
// stochastic (Euler-Maruyama, sigma 0.5), field (0: CheapClassField, 1: the Gaussian mixture).
// Report: the fused rate over the unfused one at the same arguments (the same bits either way).
void BM_cfg_sampling(benchmark::State& state) {
  const fd::index_t n = state.range(0), d = state.range(1);
  const bool fused = state.range(2) != 0, stochastic = state.range(3) != 0;
  const bool mixture_field = state.range(4) != 0;
  fd::Generator gen{2};
  auto x0 = fd::randn<float>({n, d}, gen);
  fd::Tensor<float> x(x0.shape());
  fd::Tensor<fd::label_t> y(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % 5);
  const auto grid = fd::uniform_grid<float>(8);
  const auto data = mixture(d);
  const auto run = [&](auto&& field) {
    auto guided = fd::cfg(field, 3.0f);
    guided.set_condition(y);
    HideHalves<decltype(guided)> hidden{guided};
    for (auto _ : state) {
      fd::copy(x, x0);
      fd::Generator noise{5};
      const auto sample = [&](auto& f) {
        if (stochastic)
          fd::integrate(fd::euler_maruyama(fd::schedules::Linear{}, 0.5, noise), f, x, grid);
        else
          fd::integrate(fd::Euler{}, f, x, grid);
      };
      if (fused)
        sample(guided);
      else
        sample(hidden);
      benchmark::DoNotOptimize(x.data());
    }
  };
  if (mixture_field)
    run(data.velocity(fd::schedules::Linear{}));
  else
    run(CheapClassField{});
  state.SetItemsProcessed(state.iterations() * n * 8);  // particle-steps
  state.SetLabel(std::string(mixture_field ? "mixture" : "cheap") +
                 (stochastic ? ", EM" : ", Euler") + (fused ? ", fused" : ", unfused"));
}

void cfg_sampling_args(benchmark::internal::Benchmark* b) {
  for (long field : {0, 1})
    for (long stochastic : {0, 1})
      for (long fused : {0, 1})
        b->Args({field == 0 ? 100000 : 20000, 64, fused, stochastic, field});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_cfg_sampling)->Apply(cfg_sampling_args);

}  // namespace

BENCHMARK_MAIN();
