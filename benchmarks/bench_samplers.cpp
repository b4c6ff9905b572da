// Sampler throughput: particle-steps per second of Euler, Heun and RK4 on the exact Gaussian-
// mixture field (d = 2 and d = 64, 1e4 to 1e6 particles), and the fused sampler update (CFG
// combination + Euler step + noise injection in one pass) against the copy bandwidth measured in
// the same binary. Report: bytes_per_second of BM_fused_update / bytes_per_second of BM_copy at the
// same size, counting the bytes each one moves (copy: read + write; fused: 4 reads + 1 write).
// BM_cfg_sampling: integrate() under cfg with the samplers' own fused update against the unfused
// path (the same bits), Euler and Euler-Maruyama, on a cheap field and on the mixture.
#include <benchmark/benchmark.h>

#include <cstring>
#include <string>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/distances.hpp>

namespace fd = flowdiff;

namespace {

fd::analytic::GaussianMixture<float> mixture(fd::index_t d) {
  fd::Generator gen{1};
  auto means = fd::randn<float>({8, d}, gen);
  fd::scale(means, 3.0f);
  std::vector<fd::label_t> labels{0, 1, 2, 3, 0, 1, 2, 3};
  return fd::analytic::GaussianMixture<float>::isotropic(std::vector<float>(8, 1.0f), means,
                                                         std::vector<float>(8, 0.5f), labels, 4);
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
