// Philox4x32-10 known-answer vectors (Random123's kat_vectors) and the statistical and
// reproducibility properties of the fills built on it.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/core/ops.hpp>
#include <flowdiff/core/random.hpp>
#include <set>

namespace fd = flowdiff;

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors", "[random]") {
  struct Kat {
    std::uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& k : kats) {
    const auto b = fd::Philox4x32::hash(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) CHECK(b.v[i] == k.out[i]);
  }
  // It is usable in constant expressions (and so in device code without host state).
  static_assert(fd::Philox4x32::hash(0, 0, 0, 0, 0, 0).v[0] == 0x6627e8d5u);
}

TEST_CASE("Normal fills have the right moments, and the increment is Gaussian", "[random]") {
  fd::Generator gen{2024};
  auto x = fd::randn<double>({200000}, gen);
  const double n = static_cast<double>(x.numel());
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0;
  for (fd::index_t i = 0; i < x.numel(); ++i) {
    const double v = x[i];
    m1 += v;
    m2 += v * v;
    m3 += v * v * v;
    m4 += v * v * v * v;
  }
  m1 /= n, m2 /= n, m3 /= n, m4 /= n;
  // Standard errors: mean 1/sqrt(n), variance sqrt(2/n), skewness sqrt(6/n), kurtosis sqrt(24/n);
  // bounds at 5 standard errors.
  CHECK(std::abs(m1) < 5 / std::sqrt(n));
  CHECK(std::abs(m2 - 1) < 5 * std::sqrt(2 / n));
  CHECK(std::abs(m3) < 5 * std::sqrt(6 / n));
  CHECK(std::abs(m4 - 3) < 5 * std::sqrt(24 / n) * 1.5);

  fd::Generator genf{11};
  auto xf = fd::randn<float>({100000}, genf);
  CHECK(fd::all_finite(xf));
  CHECK(std::abs(fd::mean(xf)) < 5 / std::sqrt(1e5));
}

TEST_CASE("Uniform fills lie in [lo, hi) and are uniform", "[random]") {
  fd::Generator gen{5};
  fd::Tensor<float> u(fd::Shape{100000});
  fd::fill_uniform(u, gen, -1.0f, 3.0f);
  int hist[8] = {};
  for (fd::index_t i = 0; i < u.numel(); ++i) {
    REQUIRE(u[i] >= -1.0f);
    REQUIRE(u[i] < 3.0f);
    hist[static_cast<int>((u[i] + 1.0f) * 2.0f)]++;
  }
  // Each bin is Binomial(n, 1/8): sd = sqrt(n p (1-p)) ~ 105.
  for (int b : hist) CHECK(std::abs(b - 12500) < 5 * 105);
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    const auto k = gen.uniform_int(10);
    REQUIRE(k < 10);
    seen.insert(k);
  }
  CHECK(seen.size() == 10);
}

TEST_CASE("Sample i does not depend on the batch size; seeds and calls are independent",
          "[random]") {
  fd::Generator g1{42}, g2{42};
  auto big = fd::randn<float>({1000, 7}, g1);
  auto small = fd::randn<float>({3, 7}, g2);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 7; ++j) REQUIRE(big(i, j) == small(i, j));
  // Large enough to take the threaded path: still identical to a serial recomputation.
  fd::Generator g3{42}, g4{42};
  auto huge = fd::randn<double>({50000, 9}, g3);
  auto one = fd::randn<double>({1, 9}, g4);
  for (int j = 0; j < 9; ++j) REQUIRE(huge(0, j) == one(0, j));
  // Successive calls and different seeds give different numbers.
  auto next = fd::randn<float>({3, 7}, g2);
  CHECK(next(0, 0) != small(0, 0));
  fd::Generator g5{43};
  CHECK(fd::randn<float>({3, 7}, g5)(0, 0) != small(0, 0));
  // Replaying from a saved offset reproduces the stream.
  fd::Generator g6{42};
  g6.set_offset(1);
  CHECK(fd::randn<float>({3, 7}, g6)(2, 6) == next(2, 6));
  // Elements within a row are distinct draws (no lane reuse).
  std::set<float> row(small.data(), small.data() + 7);
  CHECK(row.size() == 7);
}
