// The vectorisable float exp / tanh of core/fast_math.hpp against std::exp / std::tanh in double
// on a dense grid of floats (every 211th representable float of the range, both signs), in ulp of
// the correctly rounded result; their behaviour outside the range and on NaN; and the float
// activations built on them (SiLU, GELU tanh, forward and backward, and the fused bias + GELU)
// against the textbook formulas in double, and bit-identical on 1 and 2 threads (the vector body
// and the scalar remainder of a chunk compute the same function).
#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <flowdiff/core/fast_math.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <limits>
#include <numbers>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fd = flowdiff;
namespace nn = flowdiff::nn;

namespace fast_math_test {

// |got - ref| in units of the spacing of floats at float(ref).
double ulp_error(float got, double ref) {
  const float r = static_cast<float>(ref);
  const float a = std::fabs(r);
  const double ulp =
      static_cast<double>(std::nextafter(a, std::numeric_limits<float>::infinity())) -
      static_cast<double>(a);
  return std::fabs(static_cast<double>(got) - ref) / ulp;
}

// Calls f(x) for every 211th float in [0, hi] and its negative.
template <class F>
void for_grid(float hi, F&& f) {
  const std::uint32_t top = std::bit_cast<std::uint32_t>(hi);
  for (std::uint32_t b = 0; b <= top; b += 211) {
    const float x = std::bit_cast<float>(b);
    f(x);
    f(-x);
  }
}

double gelu_tanh_ref(double x) {
  const double k = std::sqrt(2.0 / std::numbers::pi);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
double gelu_tanh_grad_ref(double x) {
  const double k = std::sqrt(2.0 / std::numbers::pi);
  const double th = std::tanh(k * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3 * 0.044715 * x * x);
}
double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }
double silu_grad_ref(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s * (1.0 + x * (1.0 - s));
}

// DESIGN.md §4, element-wise fp32 rule.
void check_close(const std::vector<float>& got, const std::vector<double>& ref, const char* what) {
  REQUIRE(got.size() == ref.size());
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    REQUIRE(std::isfinite(got[i]));
    const double excess = std::fabs(got[i] - ref[i]) - (1e-6 + 1e-5 * std::fabs(ref[i]));
    if (excess > worst) {
      worst = excess;
      at = i;
    }
  }
  INFO(what << ": worst at element " << at << ": " << got[at] << " vs " << ref[at]);
  CHECK(worst == 0);
}

}  // namespace fast_math_test

TEST_CASE("fast_exp (float) is within 2 ulp of exp on [-87, 88]", "[nn][fast_math]") {
  using fast_math_test::ulp_error;
  double worst = 0;
  float at = 0;
  long n = 0;
  fast_math_test::for_grid(88.0f, [&](float x) {
    if (x < -87.0f) return;
    const double e = ulp_error(fd::fast_exp(x), std::exp(static_cast<double>(x)));
    ++n;
    if (e > worst) {
      worst = e;
      at = x;
    }
  });
  INFO("max error " << worst << " ulp at x = " << at << " over " << n << " points");
  CHECK(n > 8'000'000);
  CHECK(worst <= 2.0);
  CHECK(worst > 0.0);  // the grid really compared something inexact
  // Ends of the range and beyond: clamped, finite, ordered; NaN propagates.
  CHECK(fd::fast_exp(0.0f) == 1.0f);
  CHECK(fd::fast_exp(-100.0f) >= 0.0f);
  CHECK(fd::fast_exp(-100.0f) <= 1.7e-38f);
  CHECK(fd::fast_exp(100.0f) >= 1.6e38f);
  CHECK(std::isfinite(fd::fast_exp(100.0f)));
  CHECK(std::isnan(fd::fast_exp(std::numeric_limits<float>::quiet_NaN())));
  // double is std::exp itself.
  CHECK(fd::fast_exp(0.3) == std::exp(0.3));
}

TEST_CASE("fast_sincos (double) is within 2.5e-16 of sin / cos; rounded to float, equal to them",
          "[nn][fast_math]") {
  // The sinusoidal time embeddings' arguments (scale 1000 t times frequencies <= 1), the
  // quadrant boundaries k pi / 4, and random ones up to fast_sincos_limit. Rounded to float
  // (what the embeddings keep) no value may differ from std::sin / std::cos's.
  double worst = 0;
  long float_diffs = 0, count = 0;
  auto check = [&](double x) {
    double s = 0, c = 0;
    flowdiff::fast_sincos(x, s, c);
    const double es = std::fabs(s - std::sin(x)), ec = std::fabs(c - std::cos(x));
    worst = std::max({worst, es, ec});
    float_diffs += (static_cast<float>(s) != static_cast<float>(std::sin(x))) +
                   (static_cast<float>(c) != static_cast<float>(std::cos(x)));
    ++count;
  };
  for (double x = -1000.0; x <= 1000.0; x += 0.00731) check(x);
  for (int k = -4000; k <= 4000; ++k) check(k * std::numbers::pi / 4);
  std::mt19937_64 g(3);
  std::uniform_real_distribution<double> u(-flowdiff::fast_sincos_limit, flowdiff::fast_sincos_limit);
  for (int i = 0; i < 200000; ++i) check(u(g));
  INFO(count << " arguments");
  CHECK(worst < 2.5e-16);
  CHECK(float_diffs == 0);
  double s = 0, c = 0;
  flowdiff::fast_sincos(std::numeric_limits<double>::quiet_NaN(), s, c);
  CHECK((std::isnan(s) && std::isnan(c)));
}

TEST_CASE("fast_tanh (float) is within 2 ulp of tanh on [-12, 12] and +-1 beyond",
          "[nn][fast_math]") {
  using fast_math_test::ulp_error;
  double worst = 0;
  float at = 0;
  fast_math_test::for_grid(12.0f, [&](float x) {
    const double e = ulp_error(fd::fast_tanh(x), std::tanh(static_cast<double>(x)));
    if (e > worst) {
      worst = e;
      at = x;
    }
  });
  INFO("max error " << worst << " ulp at x = " << at);
  CHECK(worst <= 2.0);
  CHECK(worst > 0.0);
  for (float x : {12.5f, 20.0f, 90.0f, 1e6f, std::numeric_limits<float>::infinity()}) {
    CHECK(fd::fast_tanh(x) == 1.0f);
    CHECK(fd::fast_tanh(-x) == -1.0f);
  }
  CHECK(fd::fast_tanh(1e-30f) == 1e-30f);
  CHECK(std::signbit(fd::fast_tanh(-0.0f)));
  CHECK(std::isnan(fd::fast_tanh(std::numeric_limits<float>::quiet_NaN())));
  CHECK(fd::fast_tanh(0.3) == std::tanh(0.3));
}

TEST_CASE("Float SiLU and GELU (tanh) match the double formulas; bias + GELU fuses exactly",
          "[nn][fast_math]") {
  using namespace fast_math_test;
  const fd::index_t n = 48'001;  // odd: chunks end in a scalar remainder
  fd::Tensor<float> x({n}), g({n}), y({n}), dx({n});
  fd::Generator gen(3);
  fd::fill_uniform(g, gen, -1.0f, 1.0f);
  for (fd::index_t i = 0; i < n; ++i)
    x.data()[i] = -12.0f + 24.0f * static_cast<float>(i) / static_cast<float>(n - 1);
  std::vector<double> ry(n), rdx(n);
  auto got = [](const fd::Tensor<float>& t) {
    return std::vector<float>(t.data(), t.data() + t.numel());
  };

  nn::gelu_forward<float>(x, y.view(), nn::GeluApprox::tanh);
  nn::gelu_backward<float>(x, g, dx.view(), nn::GeluApprox::tanh);
  for (fd::index_t i = 0; i < n; ++i) {
    ry[i] = gelu_tanh_ref(x.data()[i]);
    rdx[i] = g.data()[i] * gelu_tanh_grad_ref(x.data()[i]);
  }
  check_close(got(y), ry, "GELU tanh forward");
  check_close(got(dx), rdx, "GELU tanh backward");

  nn::silu_forward<float>(x, y.view());
  nn::silu_backward<float>(x, g, dx.view());
  for (fd::index_t i = 0; i < n; ++i) {
    ry[i] = silu_ref(x.data()[i]);
    rdx[i] = g.data()[i] * silu_grad_ref(x.data()[i]);
  }
  check_close(got(y), ry, "SiLU forward");
  check_close(got(dx), rdx, "SiLU backward");

  // Fused bias: h [rows, 7] += b, y = GELU(h), equal to the unfused passes bit for bit.
  const fd::index_t rows = 301, c = 7;
  auto h = fd::randn<float>({rows, c}, gen);
  auto b = fd::randn<float>({c}, gen);
  fd::Tensor<float> hb({rows, c}), yf({rows, c}), yu({rows, c});
  for (fd::index_t r = 0; r < rows; ++r)
    for (fd::index_t j = 0; j < c; ++j) hb.data()[r * c + j] = h.data()[r * c + j] + b.data()[j];
  nn::gelu_forward<float>(hb, yu.view(), nn::GeluApprox::tanh);
  nn::gelu_bias_forward<float>(h.view(), b, yf.view(), nn::GeluApprox::tanh);
  CHECK(got(h) == got(hb));
  CHECK(got(yf) == got(yu));
  CHECK_THROWS_WITH(nn::gelu_bias_forward<float>(h.view(), fd::Tensor<float>({c + 1}), yf.view()),
                    Catch::Matchers::Contains("bias: expected shape [7]"));
}

TEST_CASE("Float activations are bit-identical on 1 and 2 threads", "[nn][fast_math][threads]") {
  const fd::index_t n = (1 << 17) + 3;  // above the parallel threshold; odd split
  fd::Generator gen(4);
  auto x = fd::randn<float>({n}, gen);
  fd::scale(x, 4.0f);
  auto g = fd::randn<float>({n}, gen);
  auto run = [&](int threads) {
#if defined(_OPENMP)
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    fd::Tensor<float> y({n}), dx({n}), s({n});
    nn::gelu_forward<float>(x, y.view(), nn::GeluApprox::tanh);
    nn::gelu_backward<float>(x, g, dx.view(), nn::GeluApprox::tanh);
    nn::silu_forward<float>(x, s.view());
#if defined(_OPENMP)
    omp_set_num_threads(before);
#endif
    std::vector<float> out(y.data(), y.data() + n);
    out.insert(out.end(), dx.data(), dx.data() + n);
    out.insert(out.end(), s.data(), s.data() + n);
    return out;
  };
  const auto one = run(1), two = run(2);
  CHECK(one == two);
}
