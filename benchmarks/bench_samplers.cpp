// Sampler throughput: particle-steps per second of Euler, Heun and RK4 on the exact Gaussian-
// mixture field (d = 2 and d = 64, 1e4 to 1e6 particles), and the fused sampler update (CFG
// combination + Euler step + noise injection in one pass) against the copy bandwidth measured in
// the same binary. Report: bytes_per_second of BM_fused_update / bytes_per_second of BM_copy at the
// same size, counting the bytes each one moves (copy: read + write; fused: 4 reads + 1 write).
#include <benchmark/benchmark.h>

#include <cstring>
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

}  // namespace

BENCHMARK_MAIN();
