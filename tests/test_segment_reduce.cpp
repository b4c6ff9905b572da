// Segmented reductions (backend/segment_reduce.hpp): every reduction functor of the image and
// token layers (GroupNorm / LayerNorm statistics, their input-gradient means and parameter
// gradients, BatchNorm's, the convolution and Linear bias gradients) gives the same results in
// the CUDA block's order (segment_reduce_reference: Threads strided partial sums, then a
// pairwise tree) as in its sequential form (what the CPU runs), to the rounding of the double
// sums: this is the host reference of the device kernel cuda::kernels::segment_reduce. Segments
// shorter and longer than the block, a block of 4 threads (many strided elements each), data far
// from zero (the two-pass variance), accumulating outputs, and Cpu::segment_reduce = the
// sequential form. tests/cuda/test_cuda_backend.cu runs the kernel itself against the reference.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <flowdiff/backend/cpu/cpu.hpp>
#include <flowdiff/backend/segment_reduce.hpp>
#include <flowdiff/nn/layers/kernels.hpp>
#include <flowdiff/nn/layers/spatial_kernels.hpp>
#include <random>
#include <string>
#include <vector>

namespace fd = flowdiff;
namespace kn = flowdiff::nn::kernels;

namespace test_segment_reduce_detail {

template <class T>
std::vector<T> random_vector(std::size_t n, std::uint32_t seed, double offset = 0.0) {
  std::mt19937 g(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(offset + d(g));
  return v;
}

// Equal to the rounding of the double sums: their order changes them by about (elements x 1e-16)
// relative to the terms' magnitudes, far below 1e-12; a float output rounded from them may differ
// by one unit.
template <class V>
void check_close(const std::vector<V>& got, const std::vector<V>& want, const std::string& what,
                 double abs_tol = 1e-12) {
  REQUIRE(got.size() == want.size());
  const double rel = std::is_same_v<V, float> ? 2.5e-7 : 1e-12;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double a = static_cast<double>(got[i]), b = static_cast<double>(want[i]);
    INFO(what << "[" << i << "]: " << a << " vs " << b);
    CHECK(std::isfinite(a));
    CHECK(std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)) + abs_tol);
  }
}

// The outputs a functor writes, initialised to `init` (the accumulating ones start nonzero).
template <class T>
struct Outputs {
  std::vector<T> a, b, c, d;
  std::vector<double> ga, gb;
  Outputs(std::size_t n, std::uint32_t seed)
      : a(random_vector<T>(n, seed)), b(random_vector<T>(n, seed + 1)),
        c(random_vector<T>(n, seed + 2)), d(random_vector<T>(n, seed + 3)),
        ga(n, -7.0), gb(n, -7.0) {}
};

template <class T>
void check_same_outputs(const Outputs<T>& got, const Outputs<T>& want, const std::string& what,
                        double abs_tol) {
  check_close(got.a, want.a, what + " a", abs_tol);
  check_close(got.b, want.b, what + " b");
  check_close(got.c, want.c, what + " c");
  check_close(got.d, want.d, what + " d");
  check_close(got.ga, want.ga, what + " ga");
  check_close(got.gb, want.gb, what + " gb");
}

// make(Outputs&) -> functor; runs the sequential form, Cpu::segment_reduce and the block order of
// Threads threads from the same initial outputs and compares them (abs_tol: for a sequential form
// that sums in T, whose rounding the double sums of the block order do not share).
template <class T, int Threads, class Make>
void compare_orders(fd::index_t segs, Make make, const std::string& what,
                    double abs_tol = 1e-12) {
  const auto n = static_cast<std::size_t>(segs);
  Outputs<T> seq(n, 5), cpu(n, 5), block(n, 5);
  for (fd::index_t s = 0; s < segs; ++s) make(seq)(s);
  fd::Cpu::segment_reduce(segs, make(cpu));
  fd::segment_reduce_reference<Threads>(segs, make(block));
  const std::string w = what + " (" + std::to_string(Threads) + " threads)";
  check_same_outputs(block, seq, w, abs_tol);
  // The CPU backend runs the sequential form: the same bits.
  CHECK(cpu.a == seq.a);
  CHECK(cpu.b == seq.b);
  CHECK(cpu.c == seq.c);
  CHECK(cpu.d == seq.d);
  CHECK(cpu.ga == seq.ga);
  CHECK(cpu.gb == seq.gb);
}

template <class T, int Threads>
void all_functors(fd::index_t n, fd::index_t channels, fd::index_t groups, fd::index_t len,
                  double offset) {
  const std::string shape = std::string(std::is_same_v<T, float> ? "float" : "double") + " [" +
                            std::to_string(n) + ", " + std::to_string(channels) + ", " +
                            std::to_string(len) + "], " + std::to_string(groups) + " groups";
  const auto total = static_cast<std::size_t>(n * channels * len);
  const auto x = random_vector<T>(total, 11, offset);
  const auto dy = random_vector<T>(total, 12);
  const auto gamma = random_vector<T>(static_cast<std::size_t>(channels), 13);
  const fd::index_t cg = channels / groups, sets = n * groups;

  // Per-set statistics (the sets' own, so the gradients below see a real normalisation).
  std::vector<T> mean(static_cast<std::size_t>(sets)), rstd(static_cast<std::size_t>(sets));
  kn::GroupNormStats<T> stats{mean.data(), rstd.data(), x.data(), cg * len, 1e-5};
  for (fd::index_t s = 0; s < sets; ++s) stats(s);
  // The sequential form against the statistics in long double (the two-pass variance survives
  // an offset far above the spread).
  for (fd::index_t s = 0; s < sets; ++s) {
    const fd::index_t k = cg * len;
    long double sum = 0, sq = 0;
    for (fd::index_t i = 0; i < k; ++i) sum += x[static_cast<std::size_t>(s * k + i)];
    const long double mu = sum / k;
    for (fd::index_t i = 0; i < k; ++i) {
      const long double dv = x[static_cast<std::size_t>(s * k + i)] - mu;
      sq += dv * dv;
    }
    const double want = static_cast<double>(1.0L / std::sqrt(sq / k + 1e-5L));
    CHECK(std::abs(static_cast<double>(rstd[static_cast<std::size_t>(s)]) - want) <=
          2.5e-7 * want);
  }

  compare_orders<T, Threads>(
      sets,
      [&](Outputs<T>& o) {
        return kn::GroupNormStats<T>{o.a.data(), o.b.data(), x.data(), cg * len, 1e-5};
      },
      "GroupNormStats " + shape);
  for (const bool affine : {true, false})
    compare_orders<T, Threads>(
        sets,
        [&](Outputs<T>& o) {
          return kn::GroupNormGradMeans<T>{o.ga.data(), o.gb.data(), x.data(), dy.data(),
                                           mean.data(), rstd.data(),
                                           affine ? gamma.data() : nullptr, groups, cg, len};
        },
        "GroupNormGradMeans " + shape + (affine ? " (gamma)" : ""));
  compare_orders<T, Threads>(
      channels,
      [&](Outputs<T>& o) {
        return kn::GroupNormParamGrad<T>{o.a.data(), o.b.data(), x.data(), dy.data(),
                                         mean.data(), rstd.data(), n, channels, groups, len};
      },
      "GroupNormParamGrad " + shape);
  compare_orders<T, Threads>(
      channels,
      [&](Outputs<T>& o) {
        return kn::ChannelGradSum<T>{o.a.data(), dy.data(), n, channels, len};
      },
      "ChannelGradSum " + shape,
      // The sequential form adds in T (sum8 per sample, then the samples): float's rounding of
      // n len terms of unit size, about 1e-5 here; a wrong element would be off by ~1.
      std::is_same_v<T, float> ? 1e-6 * static_cast<double>(n * len) : 1e-12);

  // A Linear's bias gradient: dy as [N L rows, C columns], a segment per column.
  compare_orders<T, Threads>(
      channels,
      [&](Outputs<T>& o) { return kn::BiasGrad<T>{o.a.data(), dy.data(), n * len, channels}; },
      "BiasGrad " + shape,
      std::is_same_v<T, float> ? 1e-6 * static_cast<double>(n * len) : 1e-12);

  // BatchNorm: per-channel statistics (training, with and without the running update; eval).
  const auto run_mean = random_vector<T>(static_cast<std::size_t>(channels), 14);
  auto run_var = random_vector<T>(static_cast<std::size_t>(channels), 15);
  for (auto& v : run_var) v = static_cast<T>(1.5 + std::abs(static_cast<double>(v)));
  for (const int mode : {0, 1, 2})  // 0 training + update, 1 training, 2 eval
    compare_orders<T, Threads>(
        channels,
        [&](Outputs<T>& o) {
          return kn::BatchNormStats<T>{o.a.data(), o.b.data(),
                                       mode == 0 ? o.c.data() : nullptr,
                                       mode == 0 ? o.d.data() : nullptr, x.data(),
                                       run_mean.data(), run_var.data(), n, channels, len,
                                       T(1e-5), T(0.1), mode != 2};
        },
        "BatchNormStats " + shape + " mode " + std::to_string(mode));
  std::vector<T> bmean(static_cast<std::size_t>(channels)), brstd(bmean.size());
  kn::BatchNormStats<T> bstats{bmean.data(), brstd.data(), nullptr, nullptr, x.data(),
                               run_mean.data(), run_var.data(), n, channels, len,
                               T(1e-5), T(0.1), true};
  for (fd::index_t c = 0; c < channels; ++c) bstats(c);
  compare_orders<T, Threads>(
      channels,
      [&](Outputs<T>& o) {
        return kn::BatchNormParamGrad<T>{o.a.data(), o.b.data(), o.ga.data(), o.gb.data(),
                                         x.data(), dy.data(), bmean.data(), brstd.data(),
                                         n, channels, len};
      },
      "BatchNormParamGrad " + shape);
}

}  // namespace test_segment_reduce_detail

TEST_CASE("segment_reduce: the CUDA block order equals every reduction's sequential form",
          "[backend][segment_reduce]") {
  using namespace test_segment_reduce_detail;
  // Segments of 74 elements (shorter than a 256-thread block, longer than 4 threads), of 1400
  // (several per thread), LayerNorm's shape (rows of features: one group, len 1), and data offset
  // by 1000 (the variance is then 1e6 times smaller than the mean square).
  all_functors<float, 256>(3, 6, 3, 37, 0.0);
  all_functors<float, 4>(3, 6, 3, 37, 0.0);
  all_functors<double, 256>(2, 4, 2, 700, 0.0);
  all_functors<double, 4>(2, 4, 2, 700, 0.0);
  all_functors<float, 256>(300, 5, 1, 1, 0.0);
  all_functors<float, 256>(2, 4, 2, 333, 1000.0);
  all_functors<double, 8>(2, 4, 2, 333, 1000.0);
}

TEST_CASE("segment_reduce: LayerNorm statistics over rows of the token layers",
          "[backend][segment_reduce]") {
  // nn/layers/token_kernels.hpp runs GroupNormStats with one set per row (k = D) and
  // GroupNormGradMeans with groups = 1, cg = D, len = 1: each row a segment of D features.
  using namespace test_segment_reduce_detail;
  const fd::index_t rows = 5, d = 300;
  const auto x = random_vector<float>(static_cast<std::size_t>(rows * d), 21, 3.0);
  const auto dy = random_vector<float>(x.size(), 22);
  const auto gamma = random_vector<float>(static_cast<std::size_t>(d), 23);
  std::vector<float> mean(rows), rstd(rows);
  kn::GroupNormStats<float> stats{mean.data(), rstd.data(), x.data(), d, 1e-5};
  for (fd::index_t r = 0; r < rows; ++r) stats(r);
  compare_orders<float, 256>(
      rows,
      [&](Outputs<float>& o) {
        return kn::GroupNormStats<float>{o.a.data(), o.b.data(), x.data(), d, 1e-5};
      },
      "LayerNorm statistics");
  compare_orders<float, 256>(
      rows,
      [&](Outputs<float>& o) {
        return kn::GroupNormGradMeans<float>{o.ga.data(), o.gb.data(), x.data(), dy.data(),
                                             mean.data(), rstd.data(), gamma.data(), 1, d, 1};
      },
      "LayerNorm gradient means");
}
