// Likelihoods through the reverse ODE against exact log densities: Gaussian data (closed form) and
// Gaussian mixtures in d = 2 and d = 10; exact, Jacobian and Hutchinson divergences; the Hutchinson
// estimate is unbiased within its confidence interval.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/analytic/analytic.hpp>
#include <flowdiff/samplers/likelihood.hpp>
#include <numbers>

namespace fd = flowdiff;
using Catch::Matchers::Contains;

namespace {

// z ~ N(mu, s^2 I) under the linear path: u_t(x) = mu + c_t (x - t mu), div u = d c_t,
// c_t = (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2).
struct LinearGaussianFlow {
  double mu = 1.0, s = 0.5;
  int evaluations = 0;
  double c(double t) const { return (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) * (1 - t)); }
  void operator()(fd::View<const double> x, fd::View<double> out, double t) {
    ++evaluations;
    const double ct = c(t), m = mu;
    fd::transform(out, [=](double v) { return m + ct * (v - t * m); }, x);
  }
  void divergence(fd::View<const double> x, fd::View<double> div, double t) {
    fd::fill(div, double(x.dim(1)) * c(t));
  }
  double log_density(fd::View<const double> x, fd::index_t i) const {
    double q = 0;
    for (fd::index_t j = 0; j < x.dim(1); ++j) q += (x(i, j) - mu) * (x(i, j) - mu);
    const double d = double(x.dim(1));
    return -0.5 * d * std::log(2 * std::numbers::pi * s * s) - q / (2 * s * s);
  }
};

}  // namespace

TEST_CASE("Likelihood of Gaussian data matches the closed form", "[likelihood]") {
  for (fd::index_t d : {2, 10}) {
    LinearGaussianFlow flow;
    fd::Generator gen{1};
    auto x = fd::randn<double>({20, d}, gen);
    fd::transform(x, [&](double v) { return flow.mu + flow.s * v; }, x);
    fd::Tensor<double> lp(fd::Shape{20});
    for (auto method : {fd::Divergence::exact, fd::Divergence::jacobian}) {
      fd::log_likelihood(flow, x.view(), lp.view(), {.divergence = method}, 1e-9, 1e-9);
      for (fd::index_t i = 0; i < 20; ++i) {
        const double ref = flow.log_density(x, i);
        REQUIRE(std::isfinite(lp[i]));
        INFO("d = " << d << ", sample " << i);
        CHECK(lp[i] == Approx(ref).margin(1e-5));
      }
    }
  }
}

TEST_CASE("Likelihood of Gaussian-mixture samples matches the exact log density", "[likelihood]") {
  for (fd::index_t d : {2, 10}) {
    fd::Generator gen{7};
    auto means = fd::randn<double>({3, d}, gen);
    fd::scale(means, 2.0);
    const auto data = fd::analytic::GaussianMixture<double>::isotropic({0.2, 0.5, 0.3}, means,
                                                                       {0.6, 0.8, 1.0});
    auto field = data.velocity(fd::schedules::Linear{});
    auto s = data.sample(16, gen);
    fd::Tensor<double> lp(fd::Shape{16}), ref(fd::Shape{16});
    data.log_density(s.x, ref);
    for (auto method : {fd::Divergence::exact, fd::Divergence::jacobian}) {
      const auto stats = fd::log_likelihood(field, s.x.view(), lp.view(), {.divergence = method}, 1e-8, 1e-8);
      CHECK(stats.ode.accepted > 0);
      for (fd::index_t i = 0; i < 16; ++i) {
        INFO("d = " << d << ", sample " << i << ": " << lp[i] << " vs exact " << ref[i]);
        REQUIRE(std::isfinite(lp[i]));
        CHECK(std::abs(lp[i] - ref[i]) < 2e-4 * std::max(1.0, std::abs(ref[i])));
      }
    }
  }
}

TEST_CASE("The Hutchinson estimate is unbiased within its confidence interval", "[likelihood]") {
  fd::Generator gen{3};
  auto means = fd::randn<double>({2, 4}, gen);
  const auto data = fd::analytic::GaussianMixture<double>::isotropic({0.4, 0.6}, means, {0.7, 0.9});
  auto field = data.velocity(fd::schedules::Linear{});
  auto s = data.sample(1, gen);
  fd::Tensor<double> exact(fd::Shape{1}), est(fd::Shape{1});
  data.log_density(s.x, exact);
  const auto grid = fd::uniform_grid<double>(40, 1.0, 0.0);
  const int reps = 60;
  double sum = 0, sum2 = 0;
  for (int r = 0; r < reps; ++r) {
    fd::log_likelihood(fd::RK4{}, field, s.x.view(), est.view(), grid,
                       {.divergence = fd::Divergence::hutchinson, .probes = 2}, &gen);
    sum += est[0];
    sum2 += est[0] * est[0];
  }
  const double mean = sum / reps, sd = std::sqrt((sum2 / reps - mean * mean) * reps / (reps - 1));
  INFO("Hutchinson mean " << mean << " +- " << sd / std::sqrt(double(reps)) << ", exact " << exact[0]);
  REQUIRE(sd > 0);  // it really is random
  CHECK(std::abs(mean - exact[0]) < 4 * sd / std::sqrt(double(reps)) + 1e-4);
}

TEST_CASE("Hutchinson is exact when the Jacobian is a multiple of the identity", "[likelihood]") {
  // u = mu + c_t (x - t mu) has Jacobian c_t I, so every Rademacher probe v gives v^T J v = d c_t:
  // the estimator has no variance and meets the closed form (and the exact divergence's result).
  for (fd::index_t d : {1, 3, 8}) {
    LinearGaussianFlow flow;
    fd::Generator gen{4};
    auto x = fd::randn<double>({12, d}, gen);
    fd::transform(x, [&](double v) { return flow.mu + flow.s * v; }, x);
    fd::Tensor<double> lp(fd::Shape{12}), lp_exact(fd::Shape{12});
    const auto grid = fd::uniform_grid<double>(60, 1.0, 0.0);
    fd::log_likelihood(fd::RK4{}, flow, x.view(), lp.view(), grid,
                       {.divergence = fd::Divergence::hutchinson, .probes = 3}, &gen);
    fd::log_likelihood(fd::RK4{}, flow, x.view(), lp_exact.view(), grid,
                       {.divergence = fd::Divergence::exact});
    for (fd::index_t i = 0; i < 12; ++i) {
      INFO("d = " << d << ", sample " << i);
      CHECK(lp[i] == Approx(lp_exact[i]).margin(1e-8));
      CHECK(lp[i] == Approx(flow.log_density(x, i)).margin(1e-5));
    }
  }
}

TEST_CASE("The mixture's exact divergence matches central differences", "[likelihood]") {
  fd::Generator gen{9};
  auto means = fd::randn<double>({3, 5}, gen);
  const auto data = fd::analytic::GaussianMixture<double>::isotropic({0.3, 0.3, 0.4}, means,
                                                                     {0.5, 0.9, 1.3});
  auto field = data.velocity(fd::schedules::Linear{});
  auto x = fd::randn<double>({6, 5}, gen);
  fd::Tensor<double> div(fd::Shape{6}), up(fd::Shape{6, 5}), um(fd::Shape{6, 5});
  for (double t : {0.0, 0.3, 0.8, 1.0}) {
    field.divergence(x.view(), div.view(), t);
    for (fd::index_t i = 0; i < 6; ++i) {
      double fdiv = 0;
      for (fd::index_t j = 0; j < 5; ++j) {
        const double h = 1e-5;
        auto xp = x.clone(), xm = x.clone();
        xp(i, j) += h;
        xm(i, j) -= h;
        field(xp.view(), up.view(), t);
        field(xm.view(), um.view(), t);
        fdiv += (up(i, j) - um(i, j)) / (2 * h);
      }
      REQUIRE(std::isfinite(div[i]));
      CHECK(div[i] == Approx(fdiv).epsilon(1e-6).margin(1e-7));
    }
  }
}

TEST_CASE("Likelihood input errors", "[likelihood]") {
  LinearGaussianFlow flow;
  fd::Tensor<double> x(fd::Shape{4, 2}), out(fd::Shape{3});
  fd::fill(x, 0.0);
  CHECK_THROWS_WITH(fd::log_likelihood(flow, x.view(), out.view()), Contains("out"));
  fd::Tensor<double> out4(fd::Shape{4});
  CHECK_THROWS_WITH(fd::log_likelihood(fd::RK4{}, flow, x.view(), out4.view(), fd::uniform_grid<double>(4)),
                    Contains("must descend from t = 1 to t = 0"));
  CHECK_THROWS_WITH(fd::log_likelihood(flow, x.view(), out4.view(), {.divergence = fd::Divergence::hutchinson}),
                    Contains("needs a Generator"));
  x[3] = NAN;
  CHECK_THROWS_AS(fd::log_likelihood(flow, x.view(), out4.view()), fd::numeric_error);
}
