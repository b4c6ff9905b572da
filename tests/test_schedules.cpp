// Schedules: closed-form values and endpoints, exact derivatives vs central finite differences in
// double, check_schedule (passes for every built-in schedule, names the broken property of a bad
// one), the half log-SNR lambda with its derivative and inverse, and the DDPM / VE converters.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/paths/check_schedule.hpp>
#include <flowdiff/paths/log_snr.hpp>
#include <flowdiff/paths/noise_schedules.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <numbers>
#include <string>
#include <vector>

namespace fd = flowdiff;
namespace sc = flowdiff::schedules;
using Catch::Matchers::Contains;

namespace {

const double kTimes[] = {0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99};

// Central difference (f(t+h) - f(t-h)) / 2h with a step that shrinks towards the endpoints, where
// sqrt-type schedules have large higher derivatives.
template <class F>
double central_difference(F f, double t) {
  const double h = 1e-4 * std::min(t, 1 - t);
  return (f(t + h) - f(t - h)) / (2 * h);
}

void check_derivative(const char* what, double t, double exact, double fd_value) {
  INFO(what << " at t = " << t << ": exact " << exact << ", finite difference " << fd_value);
  REQUIRE(std::isfinite(exact));
  REQUIRE(std::isfinite(fd_value));
  REQUIRE(std::abs(exact) > 1e-8);  // not trivially zero at the points used
  CHECK(std::abs(exact - fd_value) <= 1e-6 * std::abs(exact));
}

// d_alpha, d_beta and beta_d_beta of a smooth schedule vs central differences at kTimes.
template <class S>
void check_derivatives(const S& s, const char* name) {
  INFO("schedule " << name);
  for (double t : kTimes) {
    const auto v = fd::evaluate(s, t);
    check_derivative("d_alpha", t, v.d_alpha,
                     central_difference([&](double u) { return double(s.alpha(u)); }, t));
    check_derivative("d_beta", t, v.d_beta,
                     central_difference([&](double u) { return double(s.beta(u)); }, t));
    check_derivative("beta_d_beta", t, v.beta_d_beta,
                     0.5 * central_difference(
                               [&](double u) { return double(s.beta(u)) * double(s.beta(u)); }, t));
  }
}

// The float members agree with the double ones to float rounding.
template <class S>
void check_float_matches_double(const S& s, const char* name) {
  INFO("schedule " << name);
  for (double t : kTimes) {
    const auto vf = fd::evaluate(s, static_cast<float>(t));
    const double tf = static_cast<float>(t);
    const auto vt = fd::evaluate(s, tf);  // double at the rounded time
    CHECK(std::abs(vf.alpha - vt.alpha) <= 1e-6 + 1e-5 * std::abs(vt.alpha));
    CHECK(std::abs(vf.beta - vt.beta) <= 1e-6 + 1e-5 * std::abs(vt.beta));
    CHECK(std::abs(vf.d_alpha - vt.d_alpha) <= 1e-6 + 1e-5 * std::abs(vt.d_alpha));
    CHECK(std::abs(vf.d_beta - vt.d_beta) <= 1e-6 + 1e-5 * std::abs(vt.d_beta));
  }
}

auto custom_quadratic() {
  return fd::CustomSchedule{[](auto t) { return t * t; }, [](auto t) { return 1 - t * t; },
                            [](auto t) { return 2 * t; }, [](auto t) { return -2 * t; }};
}

}  // namespace

TEST_CASE("closed-form schedules: values and exact endpoints", "[paths][schedules]") {
  const double pi = std::numbers::pi;
  for (double t : kTimes) {
    CHECK(sc::Linear{}.alpha(t) == t);
    CHECK(sc::SqrtBeta{}.beta(t) == std::sqrt(1 - t));
    CHECK(sc::Cosine{}.alpha(t) == Approx(std::sin(pi * t / 2)).epsilon(1e-15));
    CHECK(sc::Cosine{}.beta(t) == Approx(std::cos(pi * t / 2)).epsilon(1e-14));
    CHECK(sc::Polynomial{3}.alpha(t) == Approx(t * t * t).epsilon(1e-15));
    const sc::VariancePreserving vp;
    const double big_t = 0.5 * (1 - t) * (1 - t) * (20 - 0.1) + (1 - t) * 0.1;
    CHECK(vp.alpha(t) == Approx(std::exp(-big_t / 2)).epsilon(1e-15));
    CHECK(vp.alpha(t) * vp.alpha(t) + vp.beta(t) * vp.beta(t) == Approx(1).epsilon(1e-15));
  }
  // Exact boundary conditions (not merely close) for the schedules that reach them.
  auto exact_ends = [](const auto& s) {
    CHECK(s.alpha(0.0) == 0.0);
    CHECK(s.beta(0.0) == 1.0);
    CHECK(s.alpha(1.0) == 1.0);
    CHECK(s.beta(1.0) == 0.0);
    CHECK(s.alpha(0.0f) == 0.0f);
    CHECK(s.beta(1.0f) == 0.0f);
    CHECK(s.alpha(1.0f) == 1.0f);
  };
  exact_ends(sc::Linear{});
  exact_ends(sc::SqrtBeta{});
  exact_ends(sc::Cosine{});
  exact_ends(sc::Polynomial{2});
  exact_ends(sc::Polynomial{0.5});
  exact_ends(custom_quadratic());
  // VP: exact at t = 1, alpha(0) = exp(-(beta_min + beta_max) / 4) at t = 0.
  const sc::VariancePreserving vp;
  CHECK(vp.alpha(1.0) == 1.0);
  CHECK(vp.beta(1.0) == 0.0);
  CHECK(vp.alpha(0.0) == Approx(std::exp(-(0.1 + 20) / 4)).epsilon(1e-15));
  CHECK(vp.alpha(0.0) > 0.006);
  CHECK(vp.beta(0.0) == Approx(std::sqrt(1 - std::exp(-(0.1 + 20) / 2))).epsilon(1e-15));
}

TEST_CASE("schedule derivatives match central finite differences", "[paths][schedules]") {
  check_derivatives(sc::Linear{}, "Linear");
  check_derivatives(sc::SqrtBeta{}, "SqrtBeta");
  check_derivatives(sc::Cosine{}, "Cosine");
  check_derivatives(sc::Polynomial{2}, "Polynomial{2}");
  check_derivatives(sc::Polynomial{0.5}, "Polynomial{0.5}");
  check_derivatives(sc::Polynomial{3.5}, "Polynomial{3.5}");
  check_derivatives(sc::VariancePreserving{}, "VP");
  check_derivatives(sc::VariancePreserving{0.05, 12}, "VP{0.05, 12}");
  check_derivatives(fd::karras_schedule(), "Karras");
  check_derivatives(fd::karras_schedule(0.01, 10, 3), "Karras{0.01, 10, 3}");
  check_derivatives(custom_quadratic(), "Custom");
  check_float_matches_double(sc::Cosine{}, "Cosine");
  check_float_matches_double(sc::VariancePreserving{}, "VP");
  check_float_matches_double(sc::Polynomial{2}, "Polynomial{2}");
  check_float_matches_double(fd::karras_schedule(), "Karras");
}

TEST_CASE("sqrt-type schedules: d_beta is -inf at t = 1 while beta * d_beta stays finite",
          "[paths][schedules]") {
  const sc::SqrtBeta sb;
  CHECK(std::isinf(sb.d_beta(1.0)));
  CHECK(sb.d_beta(1.0) < 0);
  CHECK(std::isinf(sb.d_beta(1.0f)));
  CHECK(fd::evaluate(sb, 1.0).beta_d_beta == -0.5);
  CHECK(fd::evaluate(sb, 0.3).beta_d_beta == Approx(sb.beta(0.3) * sb.d_beta(0.3)).epsilon(1e-15));

  const sc::VariancePreserving vp;
  CHECK(std::isinf(vp.d_beta(1.0)));
  CHECK(fd::evaluate(vp, 1.0).beta_d_beta == Approx(-0.1 / 2).epsilon(1e-15));
  CHECK(vp.d_alpha(1.0) == Approx(0.05).epsilon(1e-15));

  // Linear, Cosine, Polynomial: finite everywhere (for n >= 1).
  CHECK(sc::Cosine{}.d_beta(1.0) == Approx(-std::numbers::pi / 2).epsilon(1e-15));
  CHECK(sc::Cosine{}.d_alpha(1.0) == 0.0);
  CHECK(sc::Polynomial{2}.d_alpha(0.0) == 0.0);
  CHECK(std::isinf(sc::Polynomial{0.5}.d_alpha(0.0)));
}

TEST_CASE("check_schedule accepts every built-in schedule", "[paths][schedules]") {
  CHECK_NOTHROW(fd::check_schedule(sc::Linear{}, "Linear"));
  CHECK_NOTHROW(fd::check_schedule(sc::SqrtBeta{}, "SqrtBeta"));
  CHECK_NOTHROW(fd::check_schedule(sc::Cosine{}, "Cosine"));
  CHECK_NOTHROW(fd::check_schedule(sc::Polynomial{2}, "Polynomial{2}"));
  CHECK_NOTHROW(fd::check_schedule(sc::Polynomial{0.5}, "Polynomial{0.5}"));
  CHECK_NOTHROW(fd::check_schedule(custom_quadratic(), "custom"));
  CHECK_NOTHROW(fd::check_schedule(sc::VariancePreserving{}, "VP", 1e-2));
  CHECK_NOTHROW(fd::check_schedule(fd::ddpm_schedule(fd::ddpm_linear_betas(1000)), "DDPM", 1e-2));
  CHECK_NOTHROW(fd::check_schedule(fd::ddpm_schedule(fd::ddpm_cosine_betas(1000)), "DDPM-cos",
                                   1e-4));
  CHECK_NOTHROW(fd::check_schedule(fd::karras_schedule(), "EDM", 2e-2));
  // VP only approximately reaches alpha_0 = 0: the default tolerance rejects it, by name.
  CHECK_THROWS_AS(fd::check_schedule(sc::VariancePreserving{}, "VP"), fd::config_error);
  CHECK_THROWS_WITH(fd::check_schedule(sc::VariancePreserving{}, "VP"),
                    Contains("check_schedule(VP): boundary condition alpha(0) = 0 violated"));
  CHECK_THROWS_WITH(fd::check_schedule(fd::karras_schedule(), "EDM", 1e-2),
                    Contains("alpha(0) = 0 violated: got 0.0124"));
}

TEST_CASE("check_schedule names what is wrong with a bad schedule", "[paths][schedules]") {
  // Derivative off by a factor of 2.
  const fd::CustomSchedule wrong_derivative{[](auto t) { return t * t; },
                                            [](auto t) { return 1 - t * t; },
                                            [](auto t) { return t; }, [](auto t) { return -2 * t; }};
  CHECK_THROWS_AS(fd::check_schedule(wrong_derivative, "mine"), fd::config_error);
  CHECK_THROWS_WITH(fd::check_schedule(wrong_derivative, "mine"),
                    Contains("check_schedule(mine): d_alpha(") &&
                        Contains("does not match the central difference of alpha"));
  // Wrong sign of d_beta.
  const fd::CustomSchedule wrong_sign{[](auto t) { return t; }, [](auto t) { return 1 - t; },
                                      [](auto) { return 1.0; }, [](auto) { return 1.0; }};
  CHECK_THROWS_WITH(fd::check_schedule(wrong_sign, "sign"), Contains("d_beta("));
  // Boundary: beta(1) != 0.
  const fd::CustomSchedule no_end{[](auto t) { return t; }, [](auto t) { return 1.1 - t; },
                                  [](auto) { return 1.0; }, [](auto) { return -1.0; }};
  CHECK_THROWS_WITH(fd::check_schedule(no_end, "end"),
                    Contains("boundary condition beta(0) = 1 violated: got 1.1"));
  // Non-monotone alpha.
  const double pi = std::numbers::pi;
  const fd::CustomSchedule wiggle{
      [pi](auto t) { return t + 0.2 * std::sin(2 * pi * t); }, [](auto t) { return 1 - t; },
      [pi](auto t) { return 1 + 0.4 * pi * std::cos(2 * pi * t); }, [](auto) { return -1.0; }};
  CHECK_THROWS_WITH(fd::check_schedule(wiggle, "wiggle"),
                    Contains("alpha must be non-decreasing"));
  // Negative beta inside (0, 1).
  const fd::CustomSchedule negative{[](auto t) { return t; },
                                    [](auto t) { return (1 - t) * (1 - 3 * t); },
                                    [](auto) { return 1.0; }, [](auto t) { return 6 * t - 4; }};
  CHECK_THROWS_WITH(fd::check_schedule(negative, "neg"), Contains("beta(") && Contains("must be > 0"));
  // Options are validated.
  fd::ScheduleCheckOptions opt;
  opt.grid_points = 2;
  CHECK_THROWS_WITH(fd::check_schedule(sc::Linear{}, "L", opt),
                    Contains("grid_points must be >= 3, got 2"));
}

TEST_CASE("lambda = log(alpha/beta), its derivative and its inverse", "[paths][schedules]") {
  for (double t : kTimes) {
    CHECK(fd::lambda(sc::Linear{}, t) == Approx(std::log(t / (1 - t))).epsilon(1e-14));
    CHECK(fd::lambda(sc::Cosine{}, t) ==
          Approx(std::log(std::tan(std::numbers::pi * t / 2))).epsilon(1e-13).margin(1e-14));
  }
  CHECK(std::isinf(fd::lambda(sc::Linear{}, 0.0)));
  CHECK(fd::lambda(sc::Linear{}, 0.0) < 0);
  CHECK(fd::lambda(sc::Linear{}, 1.0) > 0);
  CHECK(std::isinf(fd::lambda(sc::Linear{}, 1.0)));

  auto check_lambda = [](const auto& s, const char* name) {
    INFO("schedule " << name);
    for (double t : kTimes) {
      const double dl = fd::d_lambda(s, t);
      const double fdv = central_difference([&](double u) { return fd::lambda(s, u); }, t);
      check_derivative("d_lambda", t, dl, fdv);
      const double l = fd::lambda(s, t);
      const double back = fd::lambda_inverse(s, l);
      CHECK(std::abs(back - t) <= 1e-13 * (1 + 1 / std::abs(dl)));
      const float backf = fd::lambda_inverse(s, static_cast<float>(l));
      CHECK(std::abs(backf - t) <= 1e-6);
    }
  };
  check_lambda(sc::Linear{}, "Linear");
  check_lambda(sc::SqrtBeta{}, "SqrtBeta");
  check_lambda(sc::Cosine{}, "Cosine");
  check_lambda(sc::Polynomial{2}, "Polynomial{2}");
  check_lambda(sc::VariancePreserving{}, "VP");
  check_lambda(fd::karras_schedule(), "Karras");

  // Clamping outside the covered range, NaN passes through.
  const sc::VariancePreserving vp;
  CHECK(fd::lambda_inverse(vp, fd::lambda(vp, 0.0) - 1) == 0.0);
  CHECK(fd::lambda_inverse(sc::Linear{}, -HUGE_VAL) == 0.0);
  CHECK(fd::lambda_inverse(sc::Linear{}, HUGE_VAL) == 1.0);
  CHECK(std::isnan(fd::lambda_inverse(sc::Linear{}, std::nan(""))));
  CHECK(fd::lambda_inverse(sc::Linear{}, 0.0) == 0.5);
}

TEST_CASE("DDPM tables: alpha_bar at the steps, mapping k <-> t, interpolation",
          "[paths][schedules][ddpm]") {
  const fd::index_t k_total = 1000;
  const auto betas = fd::ddpm_linear_betas(k_total, 1e-4, 0.02);
  REQUIRE(betas.size() == 1000);
  CHECK(betas.front() == 1e-4);
  CHECK(betas.back() == Approx(0.02).epsilon(1e-15));
  const auto s = fd::ddpm_schedule(betas);
  CHECK(s.steps() == k_total);

  // alpha_bar_k = prod_{i <= k} (1 - beta_i), and alpha(t_k)^2 reproduces it.
  double prod = 1;
  for (fd::index_t k = 0; k < k_total; ++k) {
    prod *= 1 - betas[static_cast<std::size_t>(k)];
    if (k % 97 != 0 && k != k_total - 1) continue;
    INFO("k = " << k);
    const double t = s.time_of_step(k);
    CHECK(t == Approx(1 - double(k + 1) / k_total).epsilon(1e-15));
    CHECK(s.step_of_time(t) == Approx(double(k)).epsilon(1e-12).margin(1e-9));
    CHECK(s.alpha_bar(k) == Approx(prod).epsilon(1e-12));
    CHECK(s.alpha(t) * s.alpha(t) == Approx(prod).epsilon(1e-12));
    CHECK(s.beta(t) * s.beta(t) == Approx(1 - prod).epsilon(1e-12));
  }
  CHECK(s.time_of_step(k_total - 1) == 0.0);
  CHECK(s.step_of_time(1.0) == -1.0);
  CHECK(fd::ddpm_step_to_time(0, 1000) == Approx(0.999).epsilon(1e-15));
  CHECK(fd::ddpm_time_to_step(0.0, 1000) == 999.0);

  // Endpoints: exact at t = 1 (with d_beta = -inf), only approximate at t = 0.
  CHECK(s.alpha(1.0) == 1.0);
  CHECK(s.beta(1.0) == 0.0);
  CHECK(std::isinf(s.d_beta(1.0)));
  CHECK(std::isfinite(s.beta_d_beta(1.0)));
  CHECK(s.beta_d_beta(1.0) ==
        Approx(0.5 * double(k_total) * std::log1p(-betas[0])).epsilon(1e-12));
  CHECK(s.alpha(0.0) == Approx(std::sqrt(prod)).epsilon(1e-12));
  CHECK(s.alpha(0.0) > 0.006);
  CHECK(s.alpha(0.0) < 0.007);

  // log(alpha_bar) is linear in t between knots: the midpoint is the mean of the neighbours.
  const double ta = s.time_of_step(500), tb = s.time_of_step(499);
  const double mid = 0.5 * (ta + tb);
  CHECK(std::log(s.alpha(mid) * s.alpha(mid)) ==
        Approx(0.5 * (std::log(s.alpha_bar(500)) + std::log(s.alpha_bar(499)))).epsilon(1e-12));

  // Derivatives of the interpolant inside a segment (step well inside it).
  for (double t : {0.0005, 0.2345, 0.5005, 0.9125, 0.9995}) {
    const double h = 1e-3 * std::min(0.5 / k_total, 1 - t);  // inside the segment
    const auto v = fd::evaluate(s, t);
    check_derivative("ddpm d_alpha", t, v.d_alpha, (s.alpha(t + h) - s.alpha(t - h)) / (2 * h));
    check_derivative("ddpm d_beta", t, v.d_beta, (s.beta(t + h) - s.beta(t - h)) / (2 * h));
  }
  // The float members agree with the double ones.
  CHECK(s.alpha(0.3f) == Approx(s.alpha(double(0.3f))).epsilon(1e-6));

  // The view is the same schedule.
  const fd::DiscreteScheduleView view = s.view();
  CHECK(view.alpha(0.42) == s.alpha(0.42));
  CHECK(view.d_beta(0.42) == s.d_beta(0.42));
}

TEST_CASE("DDPM cosine betas follow Nichol & Dhariwal", "[paths][schedules][ddpm]") {
  const auto betas = fd::ddpm_cosine_betas(1000);
  auto ab = [](double u) {
    const double c = std::cos((u + 0.008) / 1.008 * std::numbers::pi / 2);
    return c * c;
  };
  CHECK(betas[0] == Approx(1 - ab(0.001) / ab(0.0)).epsilon(1e-12));
  CHECK(betas[500] == Approx(1 - ab(0.501) / ab(0.5)).epsilon(1e-12));
  CHECK(betas[999] == 0.999);  // clipped
  const auto s = fd::ddpm_schedule(betas);
  // Away from the clipped end alpha_bar follows the continuous cosine formula.
  CHECK(s.alpha_bar(499) == Approx(ab(0.5) / ab(0.0)).epsilon(1e-10));
}

TEST_CASE("DDPM converters reject bad tables with clear messages", "[paths][schedules][ddpm]") {
  const std::vector<double> bad{0.1, 1.5, 0.2};
  CHECK_THROWS_AS(fd::ddpm_schedule(bad), fd::config_error);
  CHECK_THROWS_WITH(fd::ddpm_schedule(bad), Contains("betas[1] must lie in (0, 1), got 1.5"));
  CHECK_THROWS_WITH(fd::ddpm_schedule(std::vector<double>{}), Contains("must not be empty"));
  CHECK_THROWS_WITH(fd::ddpm_linear_betas(0), Contains("steps must be >= 1, got 0"));
  CHECK_THROWS_WITH(fd::ddpm_step_to_time(1000, 1000), Contains("k must lie in [0, 999], got 1000"));
  CHECK_THROWS_WITH(fd::ddpm_time_to_step(1.5, 1000), Contains("t must lie in [0, 1], got 1.5"));
  const std::vector<double> increasing{0.5, 0.9, 0.7};
  CHECK_THROWS_WITH(fd::DiscreteSchedule::from_alpha_bar(increasing),
                    Contains("alpha_bar must decrease strictly"));
  const auto s = fd::DiscreteSchedule::from_alpha_bar(std::vector<double>{0.9, 0.5, 0.1});
  CHECK(s.alpha_bar(2) == Approx(0.1).epsilon(1e-15));
  CHECK(s.alpha(0.0) == Approx(std::sqrt(0.1)).epsilon(1e-15));
}

TEST_CASE("VE noise levels and the EDM/Karras schedule", "[paths][schedules][ve]") {
  const auto k = fd::karras_schedule(0.002, 80, 7);
  CHECK(k.noise_level(0.0) == Approx(80).epsilon(1e-13));
  CHECK(k.noise_level(1.0) == Approx(0.002).epsilon(1e-13));
  CHECK(k.alpha(0.0) == Approx(1 / std::sqrt(1 + 80.0 * 80.0)).epsilon(1e-13));
  CHECK(k.beta(1.0) == Approx(0.002 / std::sqrt(1 + 0.002 * 0.002)).epsilon(1e-13));
  for (double t : kTimes) {
    CHECK(fd::ve_noise_level(k, t) == Approx(k.noise_level(t)).epsilon(1e-13));
    CHECK(k.alpha(t) * k.alpha(t) + k.beta(t) * k.beta(t) == Approx(1).epsilon(1e-14));
    check_derivative("d_noise_level", t, k.d_noise_level(t),
                     central_difference([&](double u) { return k.noise_level(u); }, t));
  }
  // A user's level: n(t) = 10 (1 - t) + 0.1, n' = -10.
  const fd::VeSchedule ve{[](auto t) { return 10 * (1 - t) + decltype(t)(0.1); },
                          [](auto t) { return decltype(t)(-10); }};
  check_derivatives(ve, "VE linear level");
  CHECK(ve.alpha(0.5) == Approx(1 / std::sqrt(1 + 5.1 * 5.1)).epsilon(1e-15));
  CHECK_THROWS_WITH(fd::karras_schedule(1, 0.5), Contains("need 0 < sigma_min < sigma_max"));
}
