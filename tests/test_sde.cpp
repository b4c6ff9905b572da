// SDE sampling and guided sampling against exact answers: Euler–Maruyama with sigma = 0 is the
// Euler ODE bit for bit; ODE and SDE samples (sigma in {0.5, 1, 2}) of an exact Gaussian-mixture
// field match the mixture (energy distance within the spread of equal-size samples of the mixture
// itself, mode weights within binomial bounds); CFG at w = 1 samples the class-conditional and a
// larger w raises the exact classifier's probability; the SDE increment is Gaussian.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/analytic/analytic.hpp>
#include <flowdiff/guidance/guidance.hpp>
#include <flowdiff/metrics/distances.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/samplers/sde.hpp>
#include <numeric>

namespace fd = flowdiff;
using Catch::Matchers::Contains;
using Mixture = fd::analytic::GaussianMixture<float>;

namespace {

// Three well-separated labelled components (distinct classes) in 2D.
Mixture three_modes() {
  auto means = fd::Tensor<float>::from({3, 2}, {-3.0f, 0.0f, 3.0f, 0.5f, 0.0f, 3.5f});
  return Mixture::isotropic({0.5f, 0.3f, 0.2f}, means, {0.5f, 0.7f, 0.4f}, {0, 1, 2}, 3);
}

// Energy distances between pairs of independent size-n samples of the mixture: mean + 6 sd of 8
// replicates bounds what sampling noise alone produces at this size.
double null_bound(const Mixture& data, fd::index_t n, fd::Generator& gen) {
  std::vector<double> d;
  for (int r = 0; r < 8; ++r) {
    auto a = data.sample(n, gen);
    auto b = data.sample(n, gen);
    d.push_back(fd::metrics::energy_distance<float>(a.x, b.x));
  }
  const double mean = std::accumulate(d.begin(), d.end(), 0.0) / double(d.size());
  double var = 0;
  for (double v : d) var += (v - mean) * (v - mean);
  const double sd = std::sqrt(var / double(d.size() - 1));
  return mean + 6 * sd;
}

// Share of samples nearest (in exact class posterior) to each class.
std::vector<double> class_shares(const Mixture& data, fd::View<const float> x) {
  const auto n = x.rows();
  std::vector<std::vector<float>> lp;
  fd::Tensor<float> out(fd::Shape{n});
  for (fd::label_t c = 0; c < data.num_classes(); ++c) {
    auto y = fd::Tensor<fd::label_t>::full({n}, c);
    data.class_log_prob(x, out, y);
    lp.push_back(out.to_vector());
  }
  std::vector<double> share(lp.size(), 0.0);
  for (fd::index_t i = 0; i < n; ++i) {
    std::size_t best = 0;
    for (std::size_t c = 1; c < lp.size(); ++c)
      if (lp[c][i] > lp[best][i]) best = c;
    share[best] += 1.0 / double(n);
  }
  return share;
}

}  // namespace

TEST_CASE("Euler-Maruyama with sigma = 0 reproduces the Euler ODE bit for bit", "[sde]") {
  const auto data = three_modes();
  const fd::schedules::Linear sch;
  auto field = data.velocity(sch);
  fd::Generator g0{3}, g1{3};
  auto x_ode = fd::randn<float>({500, 2}, g0);
  auto x_sde = x_ode.clone();
  const auto grid = fd::uniform_grid<float>(50);
  fd::integrate(fd::Euler{}, field, x_ode, grid);
  fd::integrate(fd::euler_maruyama(sch, 0.0, g1), field, x_sde, grid);
  REQUIRE(fd::all_finite(x_ode));
  REQUIRE(fd::max_abs(x_ode) > 1.0f);
  CHECK(std::equal(x_ode.data(), x_ode.data() + x_ode.numel(), x_sde.data()));
}

TEST_CASE("ODE and SDE samples of the exact mixture field match the mixture", "[sde][slow]") {
  const auto data = three_modes();
  const fd::schedules::Linear sch;
  const fd::index_t n = 1500;
  fd::Generator gen{11};
  const double bound = null_bound(data, n, gen);
  REQUIRE(bound > 0);
  const std::vector<double> weights{0.5, 0.3, 0.2};

  auto check = [&](const char* what, fd::Tensor<float>& x) {
    REQUIRE(fd::all_finite(x));
    auto ref = data.sample(n, gen);
    const double ed = fd::metrics::energy_distance<float>(x, ref.x);
    INFO(what << ": energy distance " << ed << " (null bound " << bound << ")");
    CHECK(ed < bound);
    const auto share = class_shares(data, x);
    for (std::size_t c = 0; c < 3; ++c) {
      const double sd = std::sqrt(weights[c] * (1 - weights[c]) / double(n));
      INFO(what << ": class " << c << " share " << share[c] << " vs weight " << weights[c]);
      CHECK(std::abs(share[c] - weights[c]) < 5 * sd);
    }
  };

  {
    auto field = data.velocity(sch);
    auto x = fd::randn<float>({n, 2}, gen);
    fd::integrate(fd::RK4{}, field, x, fd::uniform_grid<float>(40));
    check("ode rk4", x);
  }
  for (double sigma : {0.5, 1.0, 2.0}) {
    auto field = data.velocity(sch);
    auto x = fd::randn<float>({n, 2}, gen);
    fd::integrate(fd::euler_maruyama(sch, sigma, gen), field, x, fd::uniform_grid<float>(400));
    const std::string what = "sde sigma " + std::to_string(sigma);
    check(what.c_str(), x);
  }
  {  // the score taken from the exact score field, with a time-dependent sigma_t = 1 - t
    auto field = data.velocity(sch);
    auto score = data.score(sch);
    auto x = fd::randn<float>({n, 2}, gen);
    auto sigma = [](double t) { return 1.0 - t; };
    fd::integrate(fd::euler_maruyama(sch, sigma, score, gen), field, x, fd::uniform_grid<float>(400));
    check("sde with score field", x);
  }
}

TEST_CASE("CFG sampling: w = 1 is the class-conditional, larger w sharpens it", "[sde][cfg]") {
  // Two overlapping classes so that guidance has a visible effect.
  auto means = fd::Tensor<float>::from({2, 2}, {-1.0f, 0.0f, 1.0f, 0.0f});
  const Mixture data = Mixture::isotropic({0.5f, 0.5f}, means, {0.8f, 0.8f}, {0, 1}, 2);
  const fd::schedules::Linear sch;
  const fd::index_t n = 1500;
  fd::Generator gen{5};
  const double bound = null_bound(data, n, gen);
  auto y = fd::Tensor<fd::label_t>::full({n}, 1);

  double previous = 0;
  for (float w : {1.0f, 2.0f, 4.0f}) {
    auto field = fd::cfg(data.velocity(sch), w);
    field.set_condition(y);
    auto x = fd::randn<float>({n, 2}, gen);
    fd::integrate(fd::Heun{}, field, x, fd::uniform_grid<float>(60));
    REQUIRE(fd::all_finite(x));
    fd::Tensor<float> lp(fd::Shape{n});
    data.class_log_prob(x, lp, y);
    double mean_p = 0;
    for (fd::index_t i = 0; i < n; ++i) mean_p += std::exp(double(lp[i])) / double(n);
    INFO("w = " << w << ": mean p(y|x) = " << mean_p);
    CHECK(mean_p > previous);
    previous = mean_p;
    if (w == 1.0f) {
      auto ref = data.sample_class(1, n, gen);
      const double ed = fd::metrics::energy_distance<float>(x, ref.x);
      INFO("w = 1 vs class-conditional samples: energy distance " << ed << ", bound " << bound);
      CHECK(ed < bound);
    }
  }
}

TEST_CASE("The Euler-Maruyama increment is one Gaussian per element", "[sde]") {
  // With a zero velocity field the step is x + h sigma^2/2 (cx x) + sigma sqrt(h) xi, so
  // (x_new - x - h sigma^2/2 cx x) / (sigma sqrt(h)) must be standard normal.
  struct Zero {
    void operator()(fd::View<const double>, fd::View<double> out, double) { fd::fill(out, 0.0); }
  } zero;
  const fd::schedules::Linear sch;
  fd::Generator gen{8};
  const fd::index_t n = 200000;
  auto x = fd::randn<double>({n, 1}, gen);
  const auto x0 = x.clone();
  const double t = 0.3, h = 0.01, sigma = 1.5;
  fd::integrate(fd::euler_maruyama(sch, sigma, gen), zero, x, std::vector<double>{t, t + h});
  const auto c = fd::conversion_at<double>(sch, fd::Parametrization::velocity,
                                           fd::Parametrization::score, t);
  double m2 = 0, m4 = 0, m1 = 0;
  for (fd::index_t i = 0; i < n; ++i) {
    const double z = (x[i] - x0[i] - h * sigma * sigma / 2 * c.cx * x0[i]) / (sigma * std::sqrt(h));
    m1 += z;
    m2 += z * z;
    m4 += z * z * z * z;
  }
  m1 /= double(n), m2 /= double(n), m4 /= double(n);
  const double kurtosis = m4 / (m2 * m2);
  CHECK(std::abs(m1) < 5 / std::sqrt(double(n)));
  CHECK(std::abs(m2 - 1) < 5 * std::sqrt(2.0 / double(n)));
  CHECK(std::abs(kurtosis - 3) < 5 * std::sqrt(24.0 / double(n)));
}

TEST_CASE("SDE errors are clear", "[sde]") {
  const fd::schedules::Linear sch;
  fd::Generator gen{1};
  CHECK_THROWS_WITH(fd::euler_maruyama(sch, -1.0, gen), Contains("sigma must be finite and >= 0"));
  const auto data = three_modes();
  auto field = data.velocity(sch);
  auto x = fd::randn<float>({4, 2}, gen);
  CHECK_THROWS_WITH(fd::integrate(fd::euler_maruyama(sch, 1.0, gen), field, x,
                                  fd::uniform_grid<float>(4, 1.0f, 0.0f)),
                    Contains("must go forward in time"));
}

TEST_CASE("The last SDE step into t = 1 stays finite for every schedule", "[sde]") {
  // Schedules whose score coefficient degenerates at t = 1 (beta_1 = 0; d_beta(1) = -inf for
  // sqrt-beta and VP) with a large sigma: the score is evaluated at the left end of each step,
  // so the final step never touches the singular point.
  const auto data = three_modes();
  fd::Generator gen{21};
  auto run = [&](auto schedule, const char* name) {
    for (double sigma : {0.5, 2.0}) {
      auto field = data.velocity(schedule);
      auto x = fd::randn<float>({256, 2}, gen);
      fd::integrate(fd::euler_maruyama(schedule, sigma, gen), field, x, fd::uniform_grid<float>(100));
      INFO(name << ", sigma " << sigma);
      CHECK(fd::all_finite(x));
      CHECK(fd::max_abs(x) < 20.0f);
    }
  };
  run(fd::schedules::Linear{}, "linear");
  run(fd::schedules::Cosine{}, "cosine");
  run(fd::schedules::SqrtBeta{}, "sqrt-beta");
  run(fd::schedules::Polynomial{2.0}, "polynomial(2)");
  run(fd::schedules::VariancePreserving{}, "variance-preserving");
}
