// Core: shapes, tensors and views, element-wise maps, deterministic reductions, GEMM, errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/backend/cpu/linalg.hpp>
#include <flowdiff/core/ops.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <limits>
#include <string>

namespace fd = flowdiff;
using Catch::Matchers::Contains;

TEST_CASE("Shape basics and errors", "[core]") {
  fd::Shape s{4, 3, 2};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s.rows() == 4);
  CHECK(s.row_size() == 6);
  CHECK(s.str() == "[4, 3, 2]");
  CHECK(s.tail() == fd::Shape{3, 2});
  CHECK(fd::Shape{}.numel() == 1);
  CHECK_THROWS_AS(fd::Shape({1, 2, 3, 4, 5, 6, 7}), fd::shape_error);
  CHECK_THROWS_WITH(fd::Shape({2, -1}), Contains("extents must be >= 0"));
}

TEST_CASE("Tensor ownership, views and indexing", "[core]") {
  auto t = fd::Tensor<float>::from({2, 3}, {1, 2, 3, 4, 5, 6});
  CHECK(t(1, 2) == 6.0f);
  CHECK(t.row(1)[0] == 4.0f);
  auto c = t.clone();
  c(0, 0) = 10.0f;
  CHECK(t(0, 0) == 1.0f);
  fd::Tensor<float> moved = std::move(c);
  CHECK(moved(0, 0) == 10.0f);
  CHECK(reinterpret_cast<std::uintptr_t>(moved.data()) % 64 == 0);
  fd::View<const float> cv = t;  // mutable tensor -> read-only view
  CHECK(cv.reshape({3, 2})(2, 1) == 6.0f);
  CHECK(t.view().rows(1, 2).shape() == fd::Shape{1, 3});
  CHECK_THROWS_WITH(t.view().reshape({4, 2}), Contains("cannot view [2, 3] as [4, 2]"));
  CHECK_THROWS_AS(t.view().row(2), fd::shape_error);
  CHECK_THROWS_WITH((fd::Tensor<float>::from({2, 2}, {1, 2, 3})), Contains("needs 4 values, got 3"));
  fd::View<float> no_view;
  CHECK(no_view.empty());
  CHECK(no_view.data() == nullptr);
  fd::Tensor<float> none;
  CHECK(none.empty());
  CHECK(none.numel() == 0);
  CHECK(none.data() == nullptr);
  fd::Tensor<float> taken = std::move(moved);
  CHECK(moved.empty());
  auto z = fd::Tensor<double>::zeros({3});
  CHECK(fd::sum(z) == 0.0);
}

TEST_CASE("transform fuses an n-ary element-wise map and checks shapes", "[core]") {
  const fd::index_t n = 100000;  // above the threading threshold
  fd::Tensor<float> a(fd::Shape{n}), b(fd::Shape{n}), out(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) {
    a[i] = static_cast<float>(i);
    b[i] = 2.0f;
  }
  fd::transform(out, [](float x, float y) { return x * y + 1.0f; }, a, b);
  for (fd::index_t i = 0; i < n; i += 997) REQUIRE(out[i] == static_cast<float>(2 * i + 1));
  // In place (output aliases an input).
  fd::transform(a, [](float x) { return -x; }, a);
  CHECK(a[5] == -5.0f);
  fd::Tensor<float> wrong(fd::Shape{n - 1});
  CHECK_THROWS_WITH(fd::transform(out, [](float x) { return x; }, wrong),
                    Contains("input 1 has shape [99999]"));
  fd::axpy(out, 2.0f, b);
  CHECK(out[0] == 5.0f);
  fd::scale(out, 0.5f);
  CHECK(out[0] == 2.5f);
}

TEST_CASE("Reductions are accurate and independent of chunking", "[core]") {
  fd::Generator gen{7};
  auto x = fd::randn<float>({1000, 101}, gen);
  double ref = 0;
  for (fd::index_t i = 0; i < x.numel(); ++i) ref += x[i];
  CHECK(std::abs(fd::sum(x) - ref) <= 1e-6 * std::abs(ref) + 1e-3);
  // Same bits on repeated calls.
  CHECK(fd::sum(x) == fd::sum(x));
  double ss = 0;
  for (fd::index_t i = 0; i < x.numel(); ++i) ss += double(x[i]) * x[i];
  CHECK(fd::sum_squares(x) == Approx(ss).epsilon(1e-6));
  CHECK(fd::mean(x) == Approx(ref / x.numel()).margin(1e-6));
  fd::Tensor<float> rs(fd::Shape{1000});
  fd::row_sum<float, fd::Cpu>(x, rs);
  double r0 = 0;
  for (int j = 0; j < 101; ++j) r0 += x(0, j);
  CHECK(rs[0] == Approx(r0).margin(1e-4));
  x[17] = std::numeric_limits<float>::quiet_NaN();
  CHECK_FALSE(fd::all_finite(x));
  CHECK_THROWS_WITH(fd::check_finite("loss", x), Contains("element 17"));
  CHECK(std::isnan(fd::max_abs(x)));
}

TEST_CASE("Cpu::reduce_sum adds its block sums in block order at any size", "[core]") {
  // Past 256 blocks of reduce_block elements the block sums are taken 256 at a time (on the
  // stack): the result must be the one pass over all block sums, bit for bit.
  const fd::index_t blk = fd::Cpu::reduce_block;
  for (const fd::index_t n : {blk * 3 + 5, blk * 256, blk * 256 + 1, blk * 700 + 123}) {
    const auto g = [](fd::index_t i) { return std::sin(0.001 * double(i)) + 1e-9 * double(i % 7); };
    double ref = 0;
    for (fd::index_t lo = 0; lo < n; lo += blk) {
      double b = 0;
      for (fd::index_t i = lo; i < std::min(n, lo + blk); ++i) b += g(i);
      ref += b;
    }
    INFO("n = " << n);
    CHECK(fd::Cpu::reduce_sum(n, g) == ref);
  }
}

TEST_CASE("GEMM matches a naive double reference for every transpose", "[core][gemm]") {
  fd::Generator gen{3};
  const fd::index_t m = 37, k = 53, n = 29;
  for (auto ta : {fd::Trans::no, fd::Trans::yes}) {
    for (auto tb : {fd::Trans::no, fd::Trans::yes}) {
      auto a = ta == fd::Trans::no ? fd::randn<double>({m, k}, gen) : fd::randn<double>({k, m}, gen);
      auto b = tb == fd::Trans::no ? fd::randn<double>({k, n}, gen) : fd::randn<double>({n, k}, gen);
      auto c = fd::randn<double>({m, n}, gen);
      auto c0 = c.clone();
      fd::gemm(ta, tb, 0.5, a, b, 2.0, c);
      double num = 0, den = 0;
      for (fd::index_t i = 0; i < m; ++i)
        for (fd::index_t j = 0; j < n; ++j) {
          double s = 0;
          for (fd::index_t p = 0; p < k; ++p)
            s += (ta == fd::Trans::no ? a(i, p) : a(p, i)) * (tb == fd::Trans::no ? b(p, j) : b(j, p));
          const double ref = 0.5 * s + 2.0 * c0(i, j);
          num += (c(i, j) - ref) * (c(i, j) - ref);
          den += ref * ref;
        }
      REQUIRE(den > 1.0);
      CHECK(num / den <= 1e-24);
    }
  }
  fd::Tensor<float> a(fd::Shape{2, 3}), b(fd::Shape{4, 2}), c(fd::Shape{2, 2});
  CHECK_THROWS_WITH(fd::gemm(fd::Trans::no, fd::Trans::no, 1.f, a, b, 0.f, c),
                    Contains("inner dimensions differ"));
}

TEST_CASE("check_time names the bad value", "[core]") {
  CHECK_NOTHROW(fd::check_time("euler", 0.5));
  CHECK_THROWS_WITH(fd::check_time("euler", 1.5), Contains("t must lie in [0, 1], got 1.5"));
  CHECK_THROWS_AS(fd::check_time("euler", std::nan("")), fd::config_error);
}
