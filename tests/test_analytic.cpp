// Exact oracles: Gaussian mixtures and their marginal fields under a Gaussian path, checked against
// direct formulas, sampling statistics, importance-weighted Monte Carlo, finite differences and
// the identities that tie velocity, score, data and noise predictions together.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <flowdiff/analytic/analytic.hpp>
#include <flowdiff/core/ops.hpp>
#include <flowdiff/core/random.hpp>
#include <limits>
#include <numbers>
#include <vector>

#include "support/mixtures.hpp"

namespace fd = flowdiff;
using fd::analytic::GaussianMixture;
using Catch::Matchers::Contains;

namespace {

// The library's cosine path (alpha = sin(pi t / 2), beta = cos(pi t / 2)).
using TestCosine = fd::schedules::Cosine;
static_assert(fd::Schedule<TestCosine>);

// A schedule whose d_alpha blows up at t = 0 (alpha = sqrt(t)).
struct TestSqrt {
  template <class T>
  T alpha(T t) const {
    return std::sqrt(t);
  }
  template <class T>
  T beta(T t) const {
    return T(1) - t;
  }
  template <class T>
  T d_alpha(T t) const {
    return T(0.5) / std::sqrt(t);
  }
  template <class T>
  T d_beta(T) const {
    return T(-1);
  }
};

// alpha = t, beta = sqrt(1 - t): d_beta(1) = -inf while beta d_beta = -1/2 stays finite; the
// schedule says so through the optional beta_d_beta member. TestSqrtBetaNoProduct lacks it.
struct TestSqrtBetaNoProduct {
  template <class T>
  T alpha(T t) const {
    return t;
  }
  template <class T>
  T beta(T t) const {
    return std::sqrt(T(1) - t);
  }
  template <class T>
  T d_alpha(T) const {
    return T(1);
  }
  template <class T>
  T d_beta(T t) const {
    return T(-0.5) / std::sqrt(T(1) - t);
  }
};
struct TestSqrtBeta : TestSqrtBetaNoProduct {
  template <class T>
  T beta_d_beta(T) const {
    return T(-0.5);
  }
};

using flowdiff::test::make_mixture;

double normal_log_pdf(double x, double m, double s) {
  return -0.5 * std::log(2 * std::numbers::pi * s * s) - 0.5 * (x - m) * (x - m) / (s * s);
}

// log p(x) of a mixture straight from the definition, in long double.
template <class T>
double direct_log_density(const GaussianMixture<T>& g, const T* x, int only_class = -1) {
  long double p = 0, wsum = 0;
  for (fd::index_t k = 0; k < g.num_components(); ++k) {
    if (only_class >= 0 && g.label(k) != only_class) continue;
    long double lp = 0;
    for (fd::index_t j = 0; j < g.dim(); ++j) lp += normal_log_pdf(x[j], g.mean(k, j), g.stddev(k, j));
    p += g.weight(k) * std::exp(lp);
    wsum += g.weight(k);
  }
  return static_cast<double>(std::log(p / wsum));
}

template <class S>
fd::ScheduleValues<double> sv(const S& s, double t) {
  return fd::evaluate<double>(s, t);
}

}  // namespace

TEST_CASE("GaussianMixture construction, accessors and validation", "[analytic]") {
  auto g = make_mixture<double>();
  CHECK(g.num_components() == 4);
  CHECK(g.dim() == 2);
  CHECK(g.num_classes() == 3);
  CHECK(g.labelled());
  CHECK(g.weight(2) == Approx(0.35));
  CHECK(g.class_weight(1) == Approx(0.35));
  CHECK(g.class_weight(3) == 1.0);  // the null label
  CHECK(g.label(3) == 1);

  // Weights are normalised.
  auto m = fd::Tensor<float>::from({2, 1}, {0, 1});
  auto s = fd::Tensor<float>::from({2, 1}, {1, 1});
  GaussianMixture<float> h({2, 6}, m, s);
  CHECK(h.weight(0) == Approx(0.25f));
  CHECK(h.num_classes() == 0);
  CHECK_FALSE(h.labelled());
  CHECK(h.label(0) == 0);  // unlabelled: the null label

  auto one = GaussianMixture<double>::gaussian({1.0, -2.0}, 0.5);
  CHECK(one.num_components() == 1);
  CHECK(one.stddev(0, 1) == 0.5);
  auto iso = GaussianMixture<double>::isotropic({1, 1}, fd::Tensor<double>::from({2, 2}, {0, 0, 1, 1}),
                                                {0.5, 2.0}, {0, 1});
  CHECK(iso.stddev(1, 0) == 2.0);
  CHECK(GaussianMixture<float>::standard_normal(3).dim() == 3);

  CHECK_THROWS_WITH(GaussianMixture<float>({1, -1}, m, s), Contains("weights[1] must be finite and > 0"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1, 1}, m, s), Contains("means must have shape [K, d] with K = 3"));
  auto s_bad = fd::Tensor<float>::from({2, 1}, {1, -0.5f});
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, s_bad), Contains("stddevs[1, 0] must be finite and >= 0"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, fd::Tensor<float>::from({1, 2}, {1, 1})),
                    Contains("stddevs: expected shape [2, 1], got [1, 2]"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, s, {0}), Contains("one label per component (2), got 1"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, s, {0, 2}), Contains("class 1 has no component"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, s, {0, 1}, 1), Contains("labels must lie in [0, num_classes = 1)"));
  CHECK_THROWS_WITH(GaussianMixture<float>({1, 1}, m, s, {0, -1}), Contains("labels[1] must be >= 0"));
  CHECK_THROWS_AS(g.weight(4), fd::config_error);
  CHECK_THROWS_WITH(g.class_weight(4), Contains("y = 4 is outside [0, 3]"));
}

TEST_CASE("log_density matches the direct formula and integrates to one", "[analytic]") {
  auto g = make_mixture<double>();
  fd::Generator gen{11};
  auto x = fd::randn<double>({50, 2}, gen);
  scale(x, 2.5);
  fd::Tensor<double> lp(fd::Shape{50}), lpy(fd::Shape{50}), lyx(fd::Shape{50});
  fd::Tensor<fd::label_t> y(fd::Shape{50});
  for (int i = 0; i < 50; ++i) y[i] = i % 4;  // includes the null label 3
  g.log_density(x, lp);
  g.log_density(x, lpy, y);
  g.class_log_prob(x, lyx, y);
  for (int i = 0; i < 50; ++i) {
    const double ref = direct_log_density(g, x.row(i).data());
    REQUIRE(std::isfinite(lp[i]));
    CHECK(std::abs(lp[i] - ref) <= 1e-12 * (1 + std::abs(ref)));
    const int c = y[i] == 3 ? -1 : y[i];
    const double refy = direct_log_density(g, x.row(i).data(), c);
    CHECK(std::abs(lpy[i] - refy) <= 1e-12 * (1 + std::abs(refy)));
    // Bayes: log p(y|x) = log p(x|y) + log p(y) - log p(x)
    const double ref_yx = c < 0 ? 0.0 : refy + std::log(g.class_weight(y[i])) - ref;
    CHECK(std::abs(lyx[i] - ref_yx) <= 1e-10 * (1 + std::abs(ref_yx)));
  }
  // Far in the tail, log-sum-exp keeps the density finite where exp underflows.
  auto far = fd::Tensor<double>::from({1, 2}, {60.0, -80.0});
  fd::Tensor<double> lfar(fd::Shape{1});
  g.log_density(far, lfar);
  double lse_max = -1e300, lse_sum = 0;
  std::vector<double> terms;
  for (fd::index_t k = 0; k < 4; ++k)
    terms.push_back(std::log(g.weight(k)) + normal_log_pdf(60.0, g.mean(k, 0), g.stddev(k, 0)) +
                    normal_log_pdf(-80.0, g.mean(k, 1), g.stddev(k, 1)));
  for (double v : terms) lse_max = std::max(lse_max, v);
  for (double v : terms) lse_sum += std::exp(v - lse_max);
  REQUIRE(std::isfinite(lfar[0]));
  CHECK(lfar[0] < -1000.0);
  CHECK(std::abs(lfar[0] - (lse_max + std::log(lse_sum))) <= 1e-12 * std::abs(lfar[0]));

  // A 2D midpoint-rule integral of the density (and of p(x|y)) over a box holding all the mass.
  const int m = 500;
  const double lo = -6, hi = 6, h = (hi - lo) / m;
  fd::Tensor<double> grid(fd::Shape{m * m, 2}), dens(fd::Shape{m * m}), dens1(fd::Shape{m * m});
  fd::Tensor<fd::label_t> ones(fd::Shape{m * m});
  fd::fill(ones, 1);
  for (int a = 0; a < m; ++a)
    for (int b = 0; b < m; ++b) {
      grid(a * m + b, 0) = lo + (a + 0.5) * h;
      grid(a * m + b, 1) = lo + (b + 0.5) * h;
    }
  g.log_density(grid, dens);
  g.log_density(grid, dens1, ones);
  double total = 0, total1 = 0;
  for (fd::index_t i = 0; i < m * m; ++i) {
    total += std::exp(dens[i]) * h * h;
    total1 += std::exp(dens1[i]) * h * h;
  }
  CHECK(std::abs(total - 1.0) < 1e-6);
  CHECK(std::abs(total1 - 1.0) < 1e-6);
}

TEMPLATE_TEST_CASE("Sampling: mode frequencies, moments, classes, reproducibility", "[analytic]",
                   float, double) {
  using T = TestType;
  auto g = make_mixture<T>();
  fd::Generator gen{2024};
  const fd::index_t n = 200000;
  auto s = g.sample(n, gen);
  REQUIRE(s.x.shape() == fd::Shape{n, 2});
  REQUIRE(fd::all_finite(s.x));
  std::vector<double> count(4, 0), mean(8, 0), var(8, 0);
  for (fd::index_t i = 0; i < n; ++i) {
    const auto k = s.components[i];
    REQUIRE(k >= 0);
    REQUIRE(k < 4);
    REQUIRE(s.labels[i] == g.label(k));
    count[k] += 1;
    for (int j = 0; j < 2; ++j) mean[k * 2 + j] += s.x(i, j);
  }
  for (int k = 0; k < 4; ++k) {
    const double p = g.weight(k);
    // Binomial count: within 5 standard deviations.
    CHECK(std::abs(count[k] - n * p) <= 5 * std::sqrt(n * p * (1 - p)));
    for (int j = 0; j < 2; ++j) mean[k * 2 + j] /= count[k];
  }
  for (fd::index_t i = 0; i < n; ++i)
    for (int j = 0; j < 2; ++j) {
      const double e = s.x(i, j) - mean[s.components[i] * 2 + j];
      var[s.components[i] * 2 + j] += e * e;
    }
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 2; ++j) {
      const double sd = g.stddev(k, j), nk = count[k];
      // Per-component mean and variance of a Gaussian sample: SE sd/sqrt(n) and sd^2 sqrt(2/n).
      CHECK(std::abs(mean[k * 2 + j] - g.mean(k, j)) <= 5 * sd / std::sqrt(nk));
      CHECK(std::abs(var[k * 2 + j] / nk - sd * sd) <= 5 * sd * sd * std::sqrt(2 / nk));
    }
  // Overall mixture mean.
  for (int j = 0; j < 2; ++j) {
    double mu = 0, second = 0, emp = 0;
    for (int k = 0; k < 4; ++k) {
      mu += g.weight(k) * g.mean(k, j);
      second += g.weight(k) * (g.stddev(k, j) * g.stddev(k, j) + g.mean(k, j) * g.mean(k, j));
    }
    for (fd::index_t i = 0; i < n; ++i) emp += s.x(i, j);
    CHECK(std::abs(emp / n - mu) <= 5 * std::sqrt((second - mu * mu) / n));
  }

  // Class-conditional sampling only draws the class's components, in proportion to their weights.
  auto s1 = g.sample_class(1, 40000, gen);
  double c3 = 0;
  for (fd::index_t i = 0; i < 40000; ++i) {
    REQUIRE((s1.components[i] == 1 || s1.components[i] == 3));
    REQUIRE(s1.labels[i] == 1);
    c3 += s1.components[i] == 3;
  }
  const double p3 = 0.15 / 0.35;
  CHECK(std::abs(c3 - 40000 * p3) <= 5 * std::sqrt(40000 * p3 * (1 - p3)));
  auto labels = fd::Tensor<fd::label_t>::from({6}, {2, 0, 3, 1, 2, 0});
  auto s2 = g.sample_class(labels, gen);
  CHECK(s2.components[0] == 2);
  CHECK(s2.components[1] == 0);
  CHECK((s2.components[3] == 1 || s2.components[3] == 3));
  CHECK_THROWS_WITH(g.sample_class(4, 10, gen), Contains("y = 4 is outside [0, 3]"));
  auto bad = fd::Tensor<fd::label_t>::from({3}, {0, 5, 1});
  CHECK_THROWS_WITH(g.sample_class(bad, gen), Contains("y[1] = 5 is outside [0, 3]"));

  // Same seed, same samples; sample i does not depend on the batch size.
  fd::Generator a{5}, b{5};
  auto sa = g.sample(1000, a);
  auto sb = g.sample(10, b);
  for (fd::index_t i = 0; i < 10; ++i) {
    CHECK(sa.components[i] == sb.components[i]);
    CHECK(sa.x(i, 1) == sb.x(i, 1));
  }
}

namespace {

// Importance-weighted Monte Carlo of the marginal velocity and score at x from data samples z_i:
// E[f | x] = sum_i w_i f(x|z_i) / sum_i w_i with w_i = N(x; alpha z_i, beta^2 I); the tolerance is
// five delta-method standard errors of the self-normalised estimate.
template <class S>
void check_against_monte_carlo(const GaussianMixture<double>& g, const S& sched, fd::label_t y,
                               fd::Generator& gen) {
  const fd::index_t n = 250000;
  auto data = y == g.num_classes() ? g.sample(n, gen) : g.sample_class(y, n, gen);
  auto u = g.velocity(sched);
  auto sc = g.score(sched);
  auto yy = fd::Tensor<fd::label_t>::from({1}, {y});
  for (double t : {0.25, 0.5, 0.75}) {
    const auto v = sv(sched, t);
    auto xs = g.marginal(sched, t).sample_class(y, 3, gen);
    for (fd::index_t p = 0; p < 3; ++p) {
      auto x = fd::Tensor<double>::from({1, 2}, {xs.x(p, 0), xs.x(p, 1)});
      fd::Tensor<double> ue(fd::Shape{1, 2}), se(fd::Shape{1, 2});
      u(x, ue, t, yy);
      sc(x, se, t, yy);
      std::vector<double> w(n);
      double wmax = -1e300;
      for (fd::index_t i = 0; i < n; ++i) {
        double q = 0;
        for (int j = 0; j < 2; ++j) {
          const double e = x(0, j) - v.alpha * data.x(i, j);
          q += e * e;
        }
        w[i] = -0.5 * q / (v.beta * v.beta);
        wmax = std::max(wmax, w[i]);
      }
      double wsum = 0, w2sum = 0;
      for (auto& wi : w) {
        wi = std::exp(wi - wmax);
        wsum += wi;
        w2sum += wi * wi;
      }
      REQUIRE(wsum * wsum / w2sum > 200);  // effective sample size
      for (int j = 0; j < 2; ++j) {
        // u_t(x|z) = (d_alpha - d_beta/beta alpha) z + d_beta/beta x; ∇log p_t(x|z) = -(x - alpha z)/beta^2
        auto ucond = [&](fd::index_t i) {
          return (v.d_alpha - v.d_beta / v.beta * v.alpha) * data.x(i, j) + v.d_beta / v.beta * x(0, j);
        };
        auto scond = [&](fd::index_t i) { return -(x(0, j) - v.alpha * data.x(i, j)) / (v.beta * v.beta); };
        double um = 0, sm = 0;
        for (fd::index_t i = 0; i < n; ++i) {
          um += w[i] * ucond(i);
          sm += w[i] * scond(i);
        }
        um /= wsum;
        sm /= wsum;
        double uvar = 0, svar = 0;
        for (fd::index_t i = 0; i < n; ++i) {
          uvar += w[i] * w[i] * (ucond(i) - um) * (ucond(i) - um);
          svar += w[i] * w[i] * (scond(i) - sm) * (scond(i) - sm);
        }
        const double use = std::sqrt(uvar) / wsum, sse = std::sqrt(svar) / wsum;
        INFO("t = " << t << ", y = " << y << ", point " << p << ", dim " << j);
        REQUIRE(std::isfinite(ue(0, j)));
        CHECK(std::abs(ue(0, j) - um) <= 5 * use + 1e-9);
        CHECK(std::abs(se(0, j) - sm) <= 5 * sse + 1e-9);
      }
    }
  }
}

}  // namespace

TEST_CASE("Marginal velocity and score agree with importance-weighted Monte Carlo", "[analytic]") {
  auto g = make_mixture<double>();
  fd::Generator gen{77};
  check_against_monte_carlo(g, fd::schedules::Linear{}, 3, gen);
  check_against_monte_carlo(g, TestCosine{}, 3, gen);
  check_against_monte_carlo(g, fd::schedules::Linear{}, 1, gen);  // class-conditional
}

namespace {

// Central differences of a per-sample scalar f(x): [1, d] -> [1] in double.
template <class F>
std::vector<double> finite_difference(F f, const fd::Tensor<double>& x0, double h) {
  const auto d = x0.numel();
  std::vector<double> g(static_cast<std::size_t>(d));
  for (fd::index_t j = 0; j < d; ++j) {
    auto xp = x0.clone(), xm = x0.clone();
    xp[j] += h;
    xm[j] -= h;
    g[j] = (f(xp) - f(xm)) / (2 * h);
  }
  return g;
}

double max_rel_err(const std::vector<double>& ref, const fd::Tensor<double>& got) {
  double num = 0, den = 0;
  for (std::size_t j = 0; j < ref.size(); ++j) {
    num = std::max(num, std::abs(ref[j] - got[j]));
    den = std::max(den, std::abs(ref[j]));
  }
  return num / std::max(den, 1e-300);
}

template <class S>
void check_finite_differences(const S& sched) {
  auto g = make_mixture<double>();
  fd::Generator gen{9};
  auto sc = g.score(sched);
  auto cg = g.classifier_gradient(sched);
  for (double t : {0.05, 0.3, 0.6, 0.9, 1.0}) {
    const auto pt = g.marginal(sched, t);
    auto xs = pt.sample(6, gen);
    for (fd::index_t p = 0; p < 6; ++p) {
      for (fd::label_t y : {0, 1, 2, 3}) {
        auto x = fd::Tensor<double>::from({1, 2}, {xs.x(p, 0), xs.x(p, 1)});
        auto yy = fd::Tensor<fd::label_t>::from({1}, {y});
        fd::Tensor<double> s(fd::Shape{1, 2}), c(fd::Shape{1, 2}), s_uncond(fd::Shape{1, 2});
        sc(x, s, t, yy);
        cg(x, c, t, yy);
        sc(x, s_uncond, t);
        auto log_p = [&](const fd::Tensor<double>& xx) {
          fd::Tensor<double> o(fd::Shape{1});
          pt.log_density(xx, o, yy);
          return o[0];
        };
        auto log_c = [&](const fd::Tensor<double>& xx) {
          fd::Tensor<double> o(fd::Shape{1});
          pt.class_log_prob(xx, o, yy);
          return o[0];
        };
        INFO("t = " << t << ", y = " << y << ", point " << p);
        REQUIRE(fd::all_finite(s));
        CHECK(max_rel_err(finite_difference(log_p, x, 1e-5), s) <= 1e-6);
        if (y != 3) {
          CHECK(max_rel_err(finite_difference(log_c, x, 1e-5), c) <= 1e-6);
          // ∇ log p(y|x) = score(x|y) - score(x)
          for (int j = 0; j < 2; ++j)
            CHECK(std::abs(c(0, j) - (s(0, j) - s_uncond(0, j))) <= 1e-9 * (1 + std::abs(s(0, j))));
        } else {
          CHECK(c(0, 0) == 0.0);
          CHECK(c(0, 1) == 0.0);
        }
        // log p_t(y|x) of the field object agrees with the marginal mixture.
        fd::Tensor<double> lc(fd::Shape{1});
        cg.log_prob(x, lc, t, yy);
        CHECK(std::abs(lc[0] - log_c(x)) <= 1e-12 * (1 + std::abs(lc[0])));
      }
    }
  }
}

}  // namespace

TEST_CASE("Score and classifier gradient agree with finite differences (double)", "[analytic]") {
  check_finite_differences(fd::schedules::Linear{});
  check_finite_differences(TestCosine{});
}

TEST_CASE("Data-level gradients agree with finite differences", "[analytic]") {
  auto g = make_mixture<double>();
  fd::Generator gen{4};
  auto xs = g.sample(5, gen);
  for (fd::index_t p = 0; p < 5; ++p)
    for (fd::label_t y : {0, 1, 2}) {
      auto x = fd::Tensor<double>::from({1, 2}, {xs.x(p, 0), xs.x(p, 1)});
      auto yy = fd::Tensor<fd::label_t>::from({1}, {y});
      fd::Tensor<double> s(fd::Shape{1, 2}), sy(fd::Shape{1, 2}), c(fd::Shape{1, 2});
      g.grad_log_density(x, s);
      g.grad_log_density(x, sy, yy);
      g.grad_class_log_prob(x, c, yy);
      auto f = [&](const fd::Tensor<double>& xx) {
        fd::Tensor<double> o(fd::Shape{1});
        g.log_density(xx, o);
        return o[0];
      };
      auto fy = [&](const fd::Tensor<double>& xx) {
        fd::Tensor<double> o(fd::Shape{1});
        g.log_density(xx, o, yy);
        return o[0];
      };
      auto fc = [&](const fd::Tensor<double>& xx) {
        fd::Tensor<double> o(fd::Shape{1});
        g.class_log_prob(xx, o, yy);
        return o[0];
      };
      CHECK(max_rel_err(finite_difference(f, x, 1e-5), s) <= 1e-6);
      CHECK(max_rel_err(finite_difference(fy, x, 1e-5), sy) <= 1e-6);
      CHECK(max_rel_err(finite_difference(fc, x, 1e-5), c) <= 1e-6);
    }
}

TEMPLATE_TEST_CASE("Endpoints: the score at t = 1 is the data score; fields are finite at t = 0, 1",
                   "[analytic]", float, double) {
  using T = TestType;
  auto g = make_mixture<T>();
  fd::Generator gen{21};
  auto x = fd::randn<T>({64, 2}, gen);
  scale(x, T(2));
  fd::Tensor<T> s(fd::Shape{64, 2}), ref(fd::Shape{64, 2}), u(fd::Shape{64, 2});
  const T tol = std::is_same_v<T, float> ? T(1e-5) : T(1e-12);
  {
    auto sc = g.score(fd::schedules::Linear{});
    sc(x, s, T(1));
    g.grad_log_density(x, ref);
    for (fd::index_t i = 0; i < s.numel(); ++i) CHECK(std::abs(s[i] - ref[i]) <= tol * (1 + std::abs(ref[i])));
  }
  // At t = 0 every component has the marginal N(0, I), so r_k = pi_k and
  // u_0(x) = d_alpha sum_k pi_k mu_k + d_beta / beta x.
  auto check_ends = [&](auto sched) {
    auto vf = g.velocity(sched);
    for (T t : {T(0), T(1)}) {
      vf(x, u, t);
      REQUIRE(fd::all_finite(u));
      for (auto q : {0, 1, 2, 3}) {
        auto yq = fd::Tensor<fd::label_t>(fd::Shape{64});
        fd::fill(yq, q);
        vf(x, u, t, yq);
        REQUIRE(fd::all_finite(u));
      }
    }
    vf(x, u, T(0));
    const auto v = sv(sched, 0.0);
    for (fd::index_t i = 0; i < 64; ++i)
      for (int j = 0; j < 2; ++j) {
        double mbar = 0;
        for (int k = 0; k < 4; ++k) mbar += g.weight(k) * g.mean(k, j);
        const double want = v.d_alpha * mbar + v.d_beta / v.beta * x(i, j);
        CHECK(std::abs(u(i, j) - want) <= tol * (1 + std::abs(want)));
      }
  };
  check_ends(fd::schedules::Linear{});
  check_ends(TestCosine{});
  // At t = 1 under the linear path, u_1(x) = d_alpha x: every component's posterior is a point.
  auto vf = g.velocity(fd::schedules::Linear{});
  vf(x, u, T(1));
  for (fd::index_t i = 0; i < u.numel(); ++i) CHECK(std::abs(u[i] - x[i]) <= tol * (1 + std::abs(x[i])));
}

TEMPLATE_TEST_CASE("Identities: u = a x + b s, x = alpha E[z|x] + beta E[eps|x], class restriction",
                   "[analytic]", float, double) {
  using T = TestType;
  auto g = make_mixture<T>();
  fd::Generator gen{33};
  const fd::index_t n = 257;
  auto x = fd::randn<T>({n, 2}, gen);
  scale(x, T(2));
  auto y = fd::Tensor<fd::label_t>(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % 4);
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-11;
  TestCosine sched;
  auto vf = g.velocity(sched);
  auto sf = g.score(sched);
  auto zf = g.data_prediction(sched);
  auto ef = g.noise_prediction(sched);
  fd::Tensor<T> u(fd::Shape{n, 2}), s(fd::Shape{n, 2}), z(fd::Shape{n, 2}), e(fd::Shape{n, 2});
  for (double t : {0.1, 0.4, 0.8}) {
    const auto v = sv(sched, t);
    const double a = v.d_alpha / v.alpha;
    const double b = (v.d_alpha * v.beta * v.beta - v.d_beta * v.beta * v.alpha) / v.alpha;
    for (int conditional = 0; conditional < 2; ++conditional) {
      if (conditional) {
        vf(x, u, T(t), y);
        sf(x, s, T(t), y);
        zf(x, z, T(t), y);
        ef(x, e, T(t), y);
      } else {
        vf(x, u, T(t));
        sf(x, s, T(t));
        zf(x, z, T(t));
        ef(x, e, T(t));
      }
      for (fd::index_t i = 0; i < u.numel(); ++i) {
        const double ua = a * x[i] + b * s[i];
        CHECK(std::abs(u[i] - ua) <= tol * (1 + std::abs(ua) + std::abs(b * s[i])));
        const double xr = v.alpha * z[i] + v.beta * e[i];
        CHECK(std::abs(xr - x[i]) <= tol * (1 + std::abs(x[i])));
        const double ur = v.d_alpha * z[i] + v.d_beta * e[i];
        CHECK(std::abs(ur - u[i]) <= tol * (1 + std::abs(u[i])));
        // E[eps|x] = -beta ∇log p_t(x)
        CHECK(std::abs(e[i] + v.beta * s[i]) <= tol * (1 + std::abs(e[i])));
      }
    }
  }
  // u_t(x|1) is the field of the mixture of class 1's components alone.
  auto means = fd::Tensor<T>::from({2, 2}, {g.mean(1, 0), g.mean(1, 1), g.mean(3, 0), g.mean(3, 1)});
  auto sds = fd::Tensor<T>::from({2, 2}, {g.stddev(1, 0), g.stddev(1, 1), g.stddev(3, 0), g.stddev(3, 1)});
  GaussianMixture<T> sub({g.weight(1), g.weight(3)}, means, sds);
  auto uf_sub = sub.velocity(sched);
  fd::Tensor<T> u1(fd::Shape{n, 2}), usub(fd::Shape{n, 2});
  fd::fill(y, 1);
  vf(x, u1, T(0.6), y);
  uf_sub(x, usub, T(0.6));
  for (fd::index_t i = 0; i < u1.numel(); ++i) CHECK(std::abs(u1[i] - usub[i]) <= tol * (1 + std::abs(usub[i])));
  // The null label is the unconditional field, bit for bit.
  fd::fill(y, 3);
  vf(x, u1, T(0.6), y);
  vf(x, usub, T(0.6));
  for (fd::index_t i = 0; i < u1.numel(); ++i) CHECK(u1[i] == usub[i]);
}

TEST_CASE("Float fields agree with double fields; large batches agree with single rows", "[analytic]") {
  auto gf = make_mixture<float>();
  auto gd = make_mixture<double>();
  fd::Generator gen{8};
  const fd::index_t n = 20000;  // many chunks: the parallel path
  auto xd = fd::randn<double>({n, 2}, gen);
  scale(xd, 2.0);
  fd::Tensor<float> xf(fd::Shape{n, 2});
  fd::transform(xf, [](double v) { return static_cast<float>(v); }, xd);
  auto y = fd::Tensor<fd::label_t>(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % 4);
  auto uf = gf.velocity(TestCosine{});
  auto ud = gd.velocity(TestCosine{});
  fd::Tensor<float> of(fd::Shape{n, 2});
  fd::Tensor<double> od(fd::Shape{n, 2});
  const float t = 0.37f;
  uf(xf, of, t, y);
  ud(xd, od, t, y);
  double worst = 0;
  for (fd::index_t i = 0; i < of.numel(); ++i)
    worst = std::max(worst, std::abs(of[i] - od[i]) / (1 + std::abs(od[i])));
  CHECK(worst <= 1e-5);
  // Rows are independent of the chunking: evaluating one row alone gives the same bits.
  for (fd::index_t i : {fd::index_t{0}, fd::index_t{31}, fd::index_t{32}, fd::index_t{12345}, n - 1}) {
    fd::Tensor<double> o1(fd::Shape{1, 2});
    ud(fd::View<const double>(xd.view().rows(i, i + 1)), o1, t, fd::View<const fd::label_t>(y.view().rows(i, i + 1)));
    CHECK(o1[0] == od(i, 0));
    CHECK(o1[1] == od(i, 1));
  }
  // Image-shaped batches work when the features per sample match d.
  auto g16 = GaussianMixture<float>::gaussian(std::vector<float>(16, 0.5f), 0.3f);
  auto x4 = fd::randn<float>({3, 1, 4, 4}, gen);
  fd::Tensor<float> o4(fd::Shape{3, 1, 4, 4});
  auto v16 = g16.velocity(fd::schedules::Linear{});
  v16(x4, o4, 0.5f);
  CHECK(fd::all_finite(o4));
}

TEST_CASE("The exact velocity transports N(0, I) to the class-conditional data", "[analytic]") {
  // Midpoint steps along u_t(x|y) from x_0 ~ N(0, I): the end points must have the moments of
  // p(.|y). This checks the field as a transport map, not just pointwise.
  auto g = make_mixture<double>();
  fd::Generator gen{1};
  const fd::index_t n = 4000;
  auto x = fd::randn<double>({n, 2}, gen);
  fd::Tensor<fd::label_t> y(fd::Shape{n});
  fd::fill(y, 1);
  auto u = g.velocity(TestCosine{});
  fd::Tensor<double> k1(fd::Shape{n, 2}), xm(fd::Shape{n, 2});
  const int steps = 200;
  for (int s = 0; s < steps; ++s) {
    const double t = double(s) / steps, h = 1.0 / steps;
    u(x, k1, t, y);
    fd::transform(xm, [h](double a, double b) { return a + 0.5 * h * b; }, x, k1);
    u(xm, k1, t + 0.5 * h, y);
    fd::axpy(x, h, k1);
  }
  REQUIRE(fd::all_finite(x));
  const double w1 = g.weight(1) / 0.35, w3 = g.weight(3) / 0.35;
  for (int j = 0; j < 2; ++j) {
    const double mu = w1 * g.mean(1, j) + w3 * g.mean(3, j);
    const double second = w1 * (g.stddev(1, j) * g.stddev(1, j) + g.mean(1, j) * g.mean(1, j)) +
                          w3 * (g.stddev(3, j) * g.stddev(3, j) + g.mean(3, j) * g.mean(3, j));
    double m = 0;
    for (fd::index_t i = 0; i < n; ++i) m += x(i, j);
    m /= n;
    CHECK(std::abs(m - mu) <= 5 * std::sqrt((second - mu * mu) / n));
  }
  // The end points are as confidently class 1 as exact samples of p(.|1) are: E[p(1|x)] agrees.
  auto exact = g.sample_class(1, n, gen);
  fd::Tensor<double> lp(fd::Shape{n}), lp_exact(fd::Shape{n});
  g.class_log_prob(x, lp, y);
  g.class_log_prob(exact.x, lp_exact, y);
  double m1 = 0, m2 = 0, v2 = 0;
  for (fd::index_t i = 0; i < n; ++i) {
    m1 += std::exp(lp[i]) / n;
    m2 += std::exp(lp_exact[i]) / n;
  }
  for (fd::index_t i = 0; i < n; ++i) v2 += (std::exp(lp_exact[i]) - m2) * (std::exp(lp_exact[i]) - m2) / n;
  CHECK(m2 > 0.9);
  CHECK(std::abs(m1 - m2) <= 5 * std::sqrt(2 * v2 / n));
}

TEST_CASE("Analytic fields check shapes, labels, times and degenerate points", "[analytic]") {
  auto g = make_mixture<float>();
  auto u = g.velocity(fd::schedules::Linear{});
  fd::Tensor<float> x(fd::Shape{4, 2}), out(fd::Shape{4, 2}), x3(fd::Shape{4, 3}), out5(fd::Shape{5, 2});
  fd::fill(x, 0.5f);
  auto y = fd::Tensor<fd::label_t>::from({4}, {0, 1, 7, 3});
  auto y3 = fd::Tensor<fd::label_t>::from({3}, {0, 1, 2});
  CHECK_THROWS_WITH(u(x3, out, 0.5f), Contains("x must have shape [N, 2]"));
  CHECK_THROWS_WITH(u(x, out5, 0.5f), Contains("x and out must have the same shape, got [4, 2] and [5, 2]"));
  CHECK_THROWS_WITH(u(x, out, 1.5f), Contains("t must lie in [0, 1], got 1.5"));
  CHECK_THROWS_WITH(u(x, out, 0.5f, y), Contains("y[2] = 7 is outside [0, 3] (3 is the null label)"));
  CHECK_THROWS_WITH(u(x, out, 0.5f, y3), Contains("labels y must have shape [4], got [3]"));
  CHECK_THROWS_AS(u(x, out, std::nanf("")), fd::config_error);
  fd::Tensor<float> lp(fd::Shape{3});
  CHECK_THROWS_WITH(g.log_density(x, lp), Contains("out: expected shape [4], got [3]"));

  // A point mass (stddev 0) has a field for t < 1 but no density, score or field at t = 1.
  auto pm = GaussianMixture<double>::isotropic({1, 1}, fd::Tensor<double>::from({2, 1}, {-1, 1}), {0.0, 0.5});
  auto upm = pm.velocity(fd::schedules::Linear{});
  fd::Tensor<double> xd = fd::Tensor<double>::from({2, 1}, {0.3, -0.2}), od(fd::Shape{2, 1});
  upm(xd, od, 0.999);
  CHECK(fd::all_finite(od));
  CHECK_THROWS_AS(upm(xd, od, 1.0), fd::numeric_error);
  CHECK_THROWS_WITH(upm(xd, od, 1.0), Contains("component 0 has marginal variance 0"));
  fd::Tensor<double> lpd(fd::Shape{2});
  CHECK_THROWS_AS(pm.log_density(xd, lpd), fd::numeric_error);
  CHECK_NOTHROW(pm.marginal(fd::schedules::Linear{}, 0.5).log_density(xd, lpd));

  // A schedule whose derivative is infinite at t = 0 makes the field undefined there: say so.
  auto us = g.velocity(TestSqrt{});
  CHECK_THROWS_AS(us(x, out, 0.0f), fd::numeric_error);
  CHECK_NOTHROW(us(x, out, 0.01f));

  // A NaN input gives a NaN output (for every quantity), never a silently finite one.
  x(1, 0) = std::nanf("");
  u(x, out, 0.5f);
  CHECK(std::isnan(out(1, 0)));
  CHECK(std::isfinite(out(0, 0)));
  auto yok = fd::Tensor<fd::label_t>::from({4}, {0, 1, 2, 3});
  auto cgrad = g.classifier_gradient(fd::schedules::Linear{});
  cgrad(x, out, 0.5f, yok);
  CHECK(std::isnan(out(1, 0)));
  fd::fill(x, 0.5f);

  // Unlabelled mixtures only know the null label 0.
  auto h = GaussianMixture<float>::gaussian({0.f, 0.f}, 1.f);
  auto uh = h.velocity(fd::schedules::Linear{});
  CHECK(uh.num_classes() == 0);
  auto y0 = fd::Tensor<fd::label_t>::from({4}, {0, 0, 0, 1});
  CHECK_THROWS_WITH(uh(x, out, 0.5f, y0), Contains("y[3] = 1 is outside [0, 0]"));
}

TEST_CASE("Schedules with d_beta(1) = -inf: the field uses beta d_beta and stays finite", "[analytic]") {
  auto g = make_mixture<double>();
  fd::Generator gen{12};
  auto x = fd::randn<double>({32, 2}, gen);
  fd::Tensor<double> u(fd::Shape{32, 2}), s(fd::Shape{32, 2}), u_near(fd::Shape{32, 2});
  auto vf = g.velocity(TestSqrtBeta{});
  auto sf = g.score(TestSqrtBeta{});
  vf(x, u, 1.0);
  sf(x, s, 1.0);
  vf(x, u_near, 1.0 - 1e-12);
  REQUIRE(fd::all_finite(u));
  // u_1 = a x + b s with a = d_alpha / alpha = 1 and b = -beta d_beta = 1/2 at t = 1.
  for (fd::index_t i = 0; i < u.numel(); ++i) {
    CHECK(std::abs(u[i] - (x[i] + 0.5 * s[i])) <= 1e-12 * (1 + std::abs(u[i])));
    CHECK(std::abs(u[i] - u_near[i]) <= 1e-9 * (1 + std::abs(u[i])));
  }
  // Without the product the schedule gives beta * d_beta = 0 * inf: an honest error, not a NaN.
  auto bad = g.velocity(TestSqrtBetaNoProduct{});
  CHECK_THROWS_WITH(bad(x, u, 1.0), Contains("velocity of component 0 is not finite at t = 1"));
  CHECK_NOTHROW(bad(x, u, 0.5));
}

TEST_CASE("Marginal mixture: t = 0 is N(0, I), t = 1 the data", "[analytic]") {
  auto g = make_mixture<double>();
  auto p0 = g.marginal(TestCosine{}, 0.0);
  auto p1 = g.marginal(fd::schedules::Linear{}, 1.0);
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 2; ++j) {
      CHECK(p0.mean(k, j) == 0.0);
      CHECK(p0.stddev(k, j) == 1.0);
      CHECK(p1.mean(k, j) == g.mean(k, j));
      CHECK(p1.stddev(k, j) == Approx(g.stddev(k, j)).epsilon(1e-15));
      CHECK(p1.weight(k) == g.weight(k));
    }
  CHECK(p1.num_classes() == 3);
}
