// Gaussian paths: sampling x_t | z (exact values and moments), the conditional velocity, target and
// score, their argument checks; every conversion between the five parametrisations against an
// exact oracle (Gaussian data z ~ N(mu, s^2 I), for which E[z | x_t] is known in closed form) for
// every schedule at interior t, and at t = 0 and t = 1 either a match or the documented
// numeric_error; the parametrisation field adapter; re-targeting a velocity field between
// schedules against the exact velocity under the target schedule.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/core/ops.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/paths/paths.hpp>
#include <numbers>
#include <string>
#include <vector>

namespace fd = flowdiff;
namespace sc = flowdiff::schedules;
using Catch::Matchers::Contains;
using P = fd::Parametrization;

namespace {

// ---- the exact oracle -------------------------------------------------------------------------

constexpr fd::index_t kDim = 3;
const double kMu[kDim] = {0.5, -1.0, 2.0};
constexpr double kStd = 0.7;

// All five exact quantities at one coordinate of x, for z ~ N(mu, kStd^2): x_t ~ N(alpha mu, q) with
// q = alpha^2 s^2 + beta^2 and z_hat = mu + alpha s^2 (x - alpha mu) / q. Written in forms finite at
// both ends (eps_hat = beta m / q, d_beta eps_hat = beta_d_beta m / q).
double exact(const fd::ScheduleValues<double>& v, P p, double x, double mu) {
  const double s2 = kStd * kStd;
  const double m = x - v.alpha * mu;
  const double q = v.alpha * v.alpha * s2 + v.beta * v.beta;
  const double z_hat = mu + v.alpha * s2 * m / q;
  const double eps_hat = v.beta * m / q;
  switch (p) {
    case P::data: return z_hat;
    case P::noise: return eps_hat;
    case P::score: return -m / q;
    case P::velocity: return v.d_alpha * z_hat + v.beta_d_beta * m / q;
    case P::v: return v.alpha * eps_hat - v.beta * z_hat;
  }
  return NAN;
}

// The oracle as a field predicting parametrisation p under schedule S.
template <class S>
struct OracleField {
  S schedule;
  P p;
  template <class T>
  void operator()(fd::View<const T> x, fd::View<T> out, T t) const {
    const auto v = fd::evaluate(schedule, static_cast<double>(t));
    for (fd::index_t i = 0; i < x.rows(); ++i)
      for (fd::index_t j = 0; j < kDim; ++j)
        out(i, j) = static_cast<T>(exact(v, p, static_cast<double>(x(i, j)), kMu[j]));
  }
};

fd::Tensor<double> test_points(fd::index_t n, std::uint64_t seed) {
  fd::Generator gen{seed};
  auto x = fd::randn<double>({n, kDim}, gen);
  fd::scale(x, 1.5);
  return x;
}

// Which conversions are defined at the ends, by the rules of docs/paths.md, from four facts about
// a schedule.
struct Ends {
  bool alpha0_zero;        // alpha(0) == 0
  bool velocity_informs0;  // d_alpha(0) != 0
  bool beta1_zero;         // beta(1) == 0
  bool velocity_informs1;  // d_beta(1) != 0
  bool d_beta1_infinite;   // d_beta(1) == -inf
};

bool defined_at(const Ends& e, double t, P from, P to) {
  if (from == to) return true;
  if (t == 0 && e.alpha0_zero) {
    switch (from) {
      case P::data: return true;
      case P::noise: return to == P::score;
      case P::score: return to == P::noise;
      // p_0 = N(0, I) needs no input: the score and the noise are always known at alpha = 0.
      case P::velocity: return e.velocity_informs0 || to == P::score || to == P::noise;
      case P::v: return true;
    }
  }
  if (t == 1 && e.beta1_zero) {
    switch (from) {
      case P::data: return false;
      case P::noise: return to == P::data || to == P::v || (to == P::velocity && !e.d_beta1_infinite);
      case P::score: return true;
      case P::velocity: return e.velocity_informs1 && (to != P::score || e.d_beta1_infinite);
      case P::v: return to == P::data || to == P::noise || (to == P::velocity && !e.d_beta1_infinite);
    }
  }
  return true;
}

// Every (from, to) pair through the batch convert() at t, against the oracle.
template <class S>
void check_conversions_at(const S& s, const Ends& ends, double t) {
  const auto v = fd::evaluate(s, t);
  const auto x = test_points(16, 7);
  const fd::index_t n = x.rows();
  for (P from : fd::all_parametrizations) {
    fd::Tensor<double> in(x.shape());
    for (fd::index_t i = 0; i < n; ++i)
      for (fd::index_t j = 0; j < kDim; ++j) in(i, j) = exact(v, from, x(i, j), kMu[j]);
    REQUIRE(fd::all_finite(in));
    for (P to : fd::all_parametrizations) {
      INFO(fd::parametrization_name(from) << " -> " << fd::parametrization_name(to)
                                          << " at t = " << t);
      fd::Tensor<double> out(x.shape());
      const bool expect = defined_at(ends, t, from, to);
      if (!expect) {
        CHECK_THROWS_AS(fd::convert(s, from, to, x, in, out, t), fd::numeric_error);
        CHECK_THROWS_WITH(fd::convert(s, from, to, x, in, out, t),
                          Contains(std::string(fd::parametrization_name(from)) + " -> " +
                                   std::string(fd::parametrization_name(to)) +
                                   " is undefined at t = " + (t == 0 ? "0" : "1")));
        CHECK(std::isnan(fd::convert_value(v, from, to, x[0], in[0])));
        continue;
      }
      REQUIRE_NOTHROW(fd::convert(s, from, to, x, in, out, t));
      REQUIRE(fd::all_finite(out));
      const auto c = fd::conversion(v, from, to);
      REQUIRE(c.ok());
      double ref_max = 0;
      for (fd::index_t i = 0; i < n; ++i)
        for (fd::index_t j = 0; j < kDim; ++j) {
          const double ref = exact(v, to, x(i, j), kMu[j]);
          REQUIRE(std::isfinite(ref));
          ref_max = std::max(ref_max, std::abs(ref));
          // Relative to the size of the terms combined: cx x + cin in can cancel.
          const double scale = std::abs(ref) + std::abs(c.cx * x(i, j)) + std::abs(c.cin * in(i, j));
          if (std::abs(out(i, j) - ref) > 1e-12 * scale + 1e-300) {
            FAIL_CHECK("element (" << i << ", " << j << "): got " << out(i, j) << ", exact " << ref
                                   << ", scale " << scale);
          }
          // The scalar host-device core gives the same number.
          CHECK(fd::convert_value(v, from, to, x(i, j), in(i, j)) == Approx(out(i, j)).margin(1e-14 * scale));
        }
      // Not trivially zero (away from the ends, where e.g. eps_hat -> 0 as beta -> 0).
      if (t >= 0.05 && t <= 0.95) CHECK(ref_max > 1e-3);
    }
  }
}

template <class S>
void check_all_conversions(const S& s, const char* name, const Ends& ends) {
  INFO("schedule " << name);
  for (double t : {1e-3, 0.05, 0.25, 0.5, 0.75, 0.95, 1 - 1e-3}) check_conversions_at(s, ends, t);
  check_conversions_at(s, ends, 0.0);
  check_conversions_at(s, ends, 1.0);
}

// Exact marginal velocity of the oracle under schedule s.
template <class S>
fd::Tensor<double> exact_field(const S& s, P p, const fd::Tensor<double>& x, double t) {
  fd::Tensor<double> out(x.shape());
  OracleField<S>{s, p}(fd::View<const double>(x), out.view(), t);
  return out;
}

void check_close(const fd::Tensor<double>& got, const fd::Tensor<double>& ref, double rtol,
                 bool nontrivial = true) {
  REQUIRE(fd::all_finite(got));
  REQUIRE(fd::all_finite(ref));
  if (nontrivial) REQUIRE(fd::max_abs(ref) > 1e-3);
  for (fd::index_t i = 0; i < ref.numel(); ++i) {
    INFO("element " << i << ": got " << got[i] << ", exact " << ref[i]);
    REQUIRE(std::abs(got[i] - ref[i]) <= rtol * (1 + std::abs(ref[i])));
  }
}

}  // namespace

// ---- GaussianPath -----------------------------------------------------------------------------

TEST_CASE("GaussianPath::sample gives alpha z + beta eps with per-sample and scalar t",
          "[paths][gaussian_path]") {
  fd::Generator gen{1};
  const fd::GaussianPath path{sc::Cosine{}};
  const auto z = fd::randn<double>({5, 2, 3}, gen);
  const auto eps = fd::randn<double>({5, 2, 3}, gen);
  const auto t = fd::Tensor<double>::from({5}, {0.0, 0.2, 0.5, 0.9, 1.0});
  fd::Tensor<double> x(z.shape());
  path.sample(z, eps, t, x);
  for (fd::index_t i = 0; i < 5; ++i) {
    const double a = sc::Cosine{}.alpha(t[i]), b = sc::Cosine{}.beta(t[i]);
    for (fd::index_t j = 0; j < 6; ++j) {
      const fd::index_t k = i * 6 + j;
      CHECK(x[k] == Approx(a * z[k] + b * eps[k]).epsilon(1e-15).margin(1e-15));
    }
  }
  CHECK(fd::max_abs(x) > 0.1);
  // Endpoints: pure noise at t = 0, the data at t = 1.
  for (fd::index_t j = 0; j < 6; ++j) {
    CHECK(x[j] == eps[j]);
    CHECK(x[24 + j] == z[24 + j]);
  }
  // Scalar t agrees with a constant per-sample t.
  fd::Tensor<double> xs(z.shape()), xp(z.shape());
  path.sample(z, eps, 0.3, xs);
  path.sample(z, eps, fd::Tensor<double>::full({5}, 0.3), xp);
  for (fd::index_t k = 0; k < xs.numel(); ++k) CHECK(xs[k] == Approx(xp[k]).epsilon(1e-15));
  // In place on eps (views alias): x may alias an input.
  auto e2 = eps.clone();
  path.sample(z, e2, 0.3, e2.view());
  for (fd::index_t k = 0; k < xs.numel(); ++k) CHECK(e2[k] == xs[k]);
  // float
  auto zf = fd::Tensor<float>::full({2, 2}, 1.0f), ef = fd::Tensor<float>::full({2, 2}, 2.0f);
  fd::Tensor<float> xf(zf.shape());
  fd::GaussianPath{sc::Linear{}}.sample(zf, ef, 0.25, xf);
  CHECK(xf[3] == Approx(0.25f + 0.75f * 2.0f).epsilon(1e-6));
}

TEST_CASE("x_t | z has mean alpha z and variance beta^2", "[paths][gaussian_path]") {
  const fd::index_t per = 10000;
  const double times[] = {0.1, 0.5, 0.8, 0.97};
  const fd::index_t n = 4 * per;
  fd::Generator gen{2024};
  const fd::GaussianPath path{sc::VariancePreserving{}};
  fd::Tensor<double> z(fd::Shape{n, 2}), t(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) {
    z(i, 0) = 1.5;
    z(i, 1) = -0.5;
    t[i] = times[i % 4];
  }
  const auto eps = fd::randn<double>({n, 2}, gen);
  fd::Tensor<double> x(z.shape());
  path.sample(z, eps, t, x);
  for (int g = 0; g < 4; ++g) {
    const double a = path.schedule().alpha(times[g]), b = path.schedule().beta(times[g]);
    for (int j = 0; j < 2; ++j) {
      double s1 = 0, s2 = 0;
      for (fd::index_t i = g; i < n; i += 4) {
        s1 += x(i, j);
        s2 += x(i, j) * x(i, j);
      }
      const double mean = s1 / per, var = s2 / per - mean * mean;
      INFO("t = " << times[g] << ", dim " << j << ": mean " << mean << ", var " << var);
      REQUIRE(std::isfinite(mean));
      REQUIRE(var > 0);
      CHECK(std::abs(mean - a * z(0, j)) <= 5 * b / std::sqrt(double(per)));
      CHECK(std::abs(var - b * b) <= 5 * b * b * std::sqrt(2.0 / per));
    }
  }
}

TEST_CASE("conditional velocity, velocity target and conditional score", "[paths][gaussian_path]") {
  fd::Generator gen{3};
  const auto z = fd::randn<double>({6, 4}, gen);
  const auto eps = fd::randn<double>({6, 4}, gen);
  const auto t = fd::Tensor<double>::from({6}, {0.0, 0.105, 0.405, 0.615, 0.905, 0.985});
  auto run = [&](const auto& s, const char* name) {
    INFO("schedule " << name);
    const fd::GaussianPath path{s};
    fd::Tensor<double> x(z.shape()), u(z.shape()), target(z.shape()), score(z.shape());
    path.sample(z, eps, t, x);
    path.conditional_velocity(x, z, t, u);
    path.velocity_target(z, eps, t, target);
    path.conditional_score(x, z, t, score);
    REQUIRE(fd::max_abs(target) > 0.1);
    for (fd::index_t i = 0; i < 6; ++i) {
      const double ti = t[i];
      const auto v = fd::evaluate(s, ti);
      // d/dt x_t by central differences: the target is the time derivative of the path.
      const double h = 1e-5 * std::min({1.0, ti + 1e-3, 1 - ti});
      for (fd::index_t j = 0; j < 4; ++j) {
        const double fdv = ((s.alpha(ti + h) - s.alpha(std::max(ti - h, 0.0))) * z(i, j) +
                            (s.beta(ti + h) - s.beta(std::max(ti - h, 0.0))) * eps(i, j)) /
                           (ti + h - std::max(ti - h, 0.0));
        CHECK(target(i, j) == Approx(fdv).epsilon(1e-6).margin(1e-8));
        CHECK(u(i, j) == Approx(target(i, j)).epsilon(1e-12).margin(1e-12));
        CHECK(score(i, j) == Approx(-eps(i, j) / v.beta).epsilon(1e-12).margin(1e-12));
      }
    }
    // target(p) from (z, eps) equals converting the data target z at x_t.
    for (P p : fd::all_parametrizations) {
      INFO("target " << fd::parametrization_name(p));
      fd::Tensor<double> tp(z.shape()), conv(z.shape());
      path.target(p, z, eps, 0.35, tp);
      fd::Tensor<double> x35(z.shape());
      path.sample(z, eps, 0.35, x35);
      fd::convert(s, P::data, p, x35, z, conv, 0.35);
      for (fd::index_t k = 0; k < tp.numel(); ++k)
        CHECK(tp[k] == Approx(conv[k]).epsilon(1e-12).margin(1e-12));
    }
  };
  run(sc::Linear{}, "Linear");
  run(sc::Cosine{}, "Cosine");
  run(sc::SqrtBeta{}, "SqrtBeta");
  run(sc::VariancePreserving{}, "VP");
  run(fd::ddpm_schedule(fd::ddpm_linear_betas(100)), "DDPM");
  // Velocity target at t = 1 is finite where d_beta is: z - eps for Linear.
  const fd::GaussianPath lin{sc::Linear{}};
  fd::Tensor<double> out(z.shape());
  lin.velocity_target(z, eps, 1.0, out);
  CHECK(out[0] == z[0] - eps[0]);
}

TEST_CASE("GaussianPath checks shapes and times with clear messages", "[paths][gaussian_path]") {
  const fd::GaussianPath path{sc::Linear{}};
  auto z = fd::Tensor<double>::zeros({4, 3});
  auto eps = fd::Tensor<double>::zeros({4, 3});
  auto bad = fd::Tensor<double>::zeros({4, 2});
  fd::Tensor<double> x(fd::Shape{4, 3});
  auto t = fd::Tensor<double>::from({4}, {0.1, 1.5, 0.3, 0.2});
  CHECK_THROWS_AS(path.sample(z, bad, 0.5, x), fd::shape_error);
  CHECK_THROWS_WITH(path.sample(z, bad, 0.5, x),
                    Contains("GaussianPath::sample: z and eps must have the same shape, got [4, 3] "
                             "and [4, 2]"));
  CHECK_THROWS_WITH(path.sample(z, eps, 0.5, bad),
                    Contains("GaussianPath::sample: z and out must have the same shape"));
  CHECK_THROWS_WITH(path.sample(z, eps, fd::Tensor<double>::zeros({3}), x),
                    Contains("GaussianPath::sample: t must have shape [N] = [4]") &&
                        Contains("got [3]"));
  CHECK_THROWS_AS(path.sample(z, eps, t, x), fd::config_error);
  CHECK_THROWS_WITH(path.sample(z, eps, t, x),
                    Contains("GaussianPath::sample: t[1] must lie in [0, 1], got 1.5"));
  CHECK_THROWS_WITH(path.sample(z, eps, -0.1, x),
                    Contains("GaussianPath::sample: t must lie in [0, 1], got -0.1"));
  CHECK_THROWS_AS(path.sample(z, eps, std::nan(""), x), fd::config_error);
  // Undefined points.
  auto t1 = fd::Tensor<double>::from({4}, {0.1, 0.2, 1.0, 0.3});
  CHECK_THROWS_AS(path.conditional_velocity(x, z, t1, x), fd::numeric_error);
  CHECK_THROWS_WITH(path.conditional_velocity(x, z, t1, x),
                    Contains("GaussianPath::conditional_velocity: undefined at t[2] = 1") &&
                        Contains("beta = 0"));
  CHECK_THROWS_WITH(path.conditional_score(x, z, 1.0, x),
                    Contains("GaussianPath::conditional_score: undefined at t = 1") &&
                        Contains("beta = 0"));
  const fd::GaussianPath sqrt_path{sc::SqrtBeta{}};
  CHECK_THROWS_WITH(sqrt_path.velocity_target(z, eps, 1.0, x),
                    Contains("GaussianPath::velocity_target: undefined at t = 1") &&
                        Contains("d_beta is infinite"));
  CHECK_THROWS_WITH(path.target(P::score, z, eps, 1.0, x),
                    Contains("GaussianPath::target: undefined at t = 1"));
  CHECK_THROWS_WITH(path.values(2.0), Contains("GaussianPath::values: t must lie in [0, 1], got 2"));
}

namespace {
// The CPU backend as GaussianPath sees a device: memory it may not read on the host, so the
// per-sample time checks take the reduction path that the CUDA backend takes.
struct HostHiddenCpu : fd::Cpu {
  static constexpr bool host_accessible = false;
  static constexpr const char* name = "hidden-cpu";
};
}  // namespace

TEST_CASE("GaussianPath on a device backend: per-sample times checked by reductions",
          "[paths][gaussian_path]") {
  using HB = HostHiddenCpu;
  const fd::GaussianPath path{sc::Linear{}};
  fd::Generator gen{3};
  auto z = fd::randn<double>({4, 3}, gen);
  auto eps = fd::randn<double>({4, 3}, gen);
  std::vector<double> times{0.1, 0.5, 0.9, 1.0}, out(12), ref(12);
  const auto on = [](auto& v, fd::Shape s) { return fd::View<double, HB>(v.data(), s); };
  const fd::View<const double, HB> zd(z.data(), z.shape()), ed(eps.data(), eps.shape());
  // The values: those of the host path, bit for bit.
  path.sample(zd, ed, fd::View<const double, HB>(on(times, {4})), on(out, {4, 3}));
  fd::Tensor<double> x(fd::Shape{4, 3});
  path.sample(z, eps, fd::Tensor<double>::from({4}, times), x);
  for (fd::index_t i = 0; i < 12; ++i) CHECK(out[static_cast<std::size_t>(i)] == x[i]);
  // Bad times: counted, with the backend's name.
  std::vector<double> bad{0.1, 1.5, std::nan(""), 0.2};
  CHECK_THROWS_AS(path.sample(zd, ed, fd::View<const double, HB>(on(bad, {4})), on(out, {4, 3})),
                  fd::config_error);
  CHECK_THROWS_WITH(path.sample(zd, ed, fd::View<const double, HB>(on(bad, {4})), on(out, {4, 3})),
                    Contains("GaussianPath::sample: 2 of the 4 times t (on hidden-cpu) do not lie "
                             "in [0, 1]"));
  // Undefined points: the conditional velocity at beta = 0 (t = 1).
  CHECK_THROWS_AS(path.conditional_velocity(zd, ed, fd::View<const double, HB>(on(times, {4})),
                                            on(out, {4, 3})),
                  fd::numeric_error);
  CHECK_THROWS_WITH(path.conditional_velocity(zd, ed, fd::View<const double, HB>(on(times, {4})),
                                              on(out, {4, 3})),
                    Contains("GaussianPath::conditional_velocity: undefined at 1 of the 4 times t "
                             "(on hidden-cpu)") &&
                        Contains("beta = 0"));
}

// ---- conversions ------------------------------------------------------------------------------

TEST_CASE("every conversion matches the exact oracle, or throws where undefined",
          "[paths][convert]") {
  check_all_conversions(sc::Linear{}, "Linear", {true, true, true, true, false});
  check_all_conversions(sc::Cosine{}, "Cosine", {true, true, true, true, false});
  check_all_conversions(sc::SqrtBeta{}, "SqrtBeta", {true, true, true, true, true});
  check_all_conversions(sc::Polynomial{2}, "Polynomial{2}", {true, false, true, true, false});
  check_all_conversions(sc::Polynomial{1}, "Polynomial{1}", {true, true, true, true, false});
  check_all_conversions(sc::VariancePreserving{}, "VP", {false, true, true, true, true});
  check_all_conversions(fd::ddpm_schedule(fd::ddpm_linear_betas(1000)), "DDPM linear",
                        {false, true, true, true, true});
  check_all_conversions(fd::ddpm_schedule(fd::ddpm_cosine_betas(1000)), "DDPM cosine",
                        {false, true, true, true, true});
  check_all_conversions(fd::karras_schedule(), "EDM", {false, true, false, false, false});
  const fd::CustomSchedule quad{[](auto t) { return t * (2 - t); },
                                [](auto t) { return (1 - t) * (1 - t); },
                                [](auto t) { return 2 - 2 * t; }, [](auto t) { return 2 * t - 2; }};
  check_all_conversions(quad, "custom", {true, true, true, false, false});
}

TEST_CASE("the documented forms and special values of the conversions", "[paths][convert]") {
  // Linear: velocity -> data is x + (1 - t) u, velocity -> noise is x - t u, finite at both ends.
  for (double t : {0.0, 0.3, 1.0}) {
    const auto v = fd::evaluate(sc::Linear{}, t);
    const auto zd = fd::conversion(v, P::velocity, P::data);
    const auto ed = fd::conversion(v, P::velocity, P::noise);
    REQUIRE(zd.ok());
    REQUIRE(ed.ok());
    CHECK(zd.cx == Approx(1));
    CHECK(zd.cin == Approx(1 - t).margin(1e-15));
    CHECK(ed.cx == Approx(1));
    CHECK(ed.cin == Approx(-t).margin(1e-15));
  }
  // DESIGN §1: u = a_t x + b_t s with a_t = d_alpha / alpha, b_t = (d_alpha beta^2 - d_beta beta
  // alpha) / alpha.
  for (double t : {0.2, 0.7}) {
    const auto v = fd::evaluate(sc::Cosine{}, t);
    const auto c = fd::conversion(v, P::score, P::velocity);
    CHECK(c.cx == Approx(v.d_alpha / v.alpha).epsilon(1e-14));
    CHECK(c.cin ==
          Approx((v.d_alpha * v.beta * v.beta - v.d_beta * v.beta * v.alpha) / v.alpha).epsilon(1e-14));
  }
  // SqrtBeta at t = 1: u = x + s / 2 and back, although d_beta = -inf there.
  const auto vs = fd::evaluate(sc::SqrtBeta{}, 1.0);
  CHECK(fd::convert_value(vs, P::score, P::velocity, 2.0, 3.0) == Approx(2.0 + 1.5));
  CHECK(fd::convert_value(vs, P::velocity, P::score, 2.0, 3.5) == Approx(3.0));
  // Cosine: u = -(pi/2) v exactly (d_alpha alpha + d_beta beta = 0, alpha^2 + beta^2 = 1).
  for (double t : {0.0, 0.1, 0.5, 0.9, 1.0}) {
    INFO("t = " << t);
    const auto v = fd::evaluate(sc::Cosine{}, t);
    const auto c = fd::conversion(v, P::v, P::velocity);
    REQUIRE(c.ok());
    CHECK(c.cx == Approx(0).margin(1e-15));
    CHECK(c.cin == Approx(-std::numbers::pi / 2).epsilon(1e-14));
    const auto x = test_points(8, 11);
    const auto vpred = exact_field(sc::Cosine{}, P::v, x, t);
    const auto u = exact_field(sc::Cosine{}, P::velocity, x, t);
    for (fd::index_t k = 0; k < x.numel(); ++k)
      CHECK(u[k] == Approx(-std::numbers::pi / 2 * vpred[k]).epsilon(1e-12).margin(1e-12));
  }
  // Polynomial{0.5}: d_alpha(0) = inf makes exactly the conversions that use it undefined at t = 0.
  const auto vh = fd::evaluate(sc::Polynomial{0.5}, 0.0);
  CHECK(fd::conversion(vh, P::noise, P::score).ok());
  CHECK(fd::conversion(vh, P::data, P::noise).ok());
  CHECK(fd::conversion(vh, P::data, P::velocity).status == fd::ConversionStatus::non_finite);
  CHECK(fd::conversion(vh, P::velocity, P::data).status == fd::ConversionStatus::non_finite);
  CHECK(fd::conversion(vh, P::v, P::velocity).status == fd::ConversionStatus::infinite_d_beta);
  // Status codes name the cause.
  CHECK(fd::conversion(fd::evaluate(sc::Linear{}, 0.0), P::noise, P::data).status ==
        fd::ConversionStatus::alpha_zero);
  CHECK(fd::conversion(fd::evaluate(sc::Linear{}, 1.0), P::data, P::noise).status ==
        fd::ConversionStatus::beta_zero);
  CHECK(fd::conversion(fd::evaluate(sc::Polynomial{2}, 0.0), P::velocity, P::data).status ==
        fd::ConversionStatus::velocity_singular);
  CHECK(fd::conversion(fd::evaluate(sc::SqrtBeta{}, 1.0), P::noise, P::velocity).status ==
        fd::ConversionStatus::infinite_d_beta);
}

TEST_CASE("convert: argument checks and error messages", "[paths][convert]") {
  auto x = fd::Tensor<double>::zeros({2, 3});
  auto in = fd::Tensor<double>::zeros({2, 3});
  auto bad = fd::Tensor<double>::zeros({3, 2});
  fd::Tensor<double> out(fd::Shape{2, 3});
  CHECK_THROWS_WITH(fd::convert(sc::Linear{}, P::noise, P::data, x, bad, out, 0.5),
                    Contains("convert: x and in must have the same shape, got [2, 3] and [3, 2]"));
  CHECK_THROWS_WITH(fd::convert(sc::Linear{}, P::noise, P::data, x, in, bad, 0.5),
                    Contains("convert: x and out must have the same shape"));
  CHECK_THROWS_AS(fd::convert(sc::Linear{}, P::noise, P::data, x, in, out, 1.5), fd::config_error);
  CHECK_THROWS_WITH(fd::convert(sc::Linear{}, P::score, P::velocity, x, in, out, 0.0),
                    Contains("convert: score -> velocity is undefined at t = 0: alpha = 0"));
  CHECK_THROWS_WITH(fd::convert(sc::Linear{}, P::velocity, P::score, x, in, out, 1.0),
                    Contains("convert: velocity -> score is undefined at t = 1: beta = 0"));
  CHECK_THROWS_WITH(fd::convert(sc::Polynomial{2}, P::velocity, P::data, x, in, out, 0.0),
                    Contains("velocity carries no information"));
  CHECK_THROWS_WITH(fd::convert(sc::SqrtBeta{}, P::noise, P::velocity, x, in, out, 1.0),
                    Contains("noise -> velocity is undefined at t = 1: d_beta is infinite"));
  // Identity is always defined, and convert may run in place.
  in[0] = 4;
  CHECK_NOTHROW(fd::convert(sc::Linear{}, P::score, P::score, x, in, out, 1.0));
  CHECK(out[0] == 4);
  auto xi = fd::Tensor<double>::full({2, 3}, 2.0);
  auto io = fd::Tensor<double>::full({2, 3}, 1.0);
  fd::convert(sc::Linear{}, P::noise, P::data, xi, io, io.view(), 0.5);  // (x - 0.5 eps) / 0.5
  CHECK(io[0] == 3.0);
}

TEST_CASE("conversions in float match the double oracle to fp32 tolerance", "[paths][convert]") {
  const sc::Cosine s;
  const auto xd = test_points(8, 5);
  for (double t : {0.1, 0.5, 0.9}) {
    const auto v = fd::evaluate(s, t);
    for (P from : fd::all_parametrizations)
      for (P to : fd::all_parametrizations) {
        INFO(fd::parametrization_name(from) << " -> " << fd::parametrization_name(to) << ", t " << t);
        fd::Tensor<float> x(xd.shape()), in(xd.shape()), out(xd.shape());
        for (fd::index_t k = 0; k < x.numel(); ++k) {
          x[k] = static_cast<float>(xd[k]);
          in[k] = static_cast<float>(exact(v, from, x[k], kMu[k % kDim]));
        }
        fd::convert(s, from, to, x, in, out, static_cast<float>(t));
        const auto c = fd::conversion(fd::evaluate(s, double(static_cast<float>(t))), from, to);
        for (fd::index_t k = 0; k < x.numel(); ++k) {
          const double ref = exact(fd::evaluate(s, double(static_cast<float>(t))), to, x[k],
                                   kMu[k % kDim]);
          const double scale = std::abs(ref) + std::abs(c.cx * x[k]) + std::abs(c.cin * in[k]);
          CHECK(std::abs(out[k] - ref) <= 1e-6 + 1e-5 * scale);
        }
      }
  }
}

TEST_CASE("as_parametrization turns a noise-prediction field into a velocity field",
          "[paths][convert][field]") {
  const sc::Cosine s;
  OracleField<sc::Cosine> eps_field{s, P::noise};
  auto u_field = fd::as_parametrization(eps_field, P::noise, P::velocity, s);
  static_assert(fd::Field<decltype(u_field), double>);
  static_assert(fd::Field<decltype(u_field), float>);
  const auto x = test_points(10, 3);
  fd::Tensor<double> out(x.shape());
  for (double t : {0.1, 0.5, 0.99, 1.0}) {
    u_field(x, out, t);
    // The cosine velocity is identically 0 at t = 1 (d_alpha(1) = 0 and eps_hat(x, 1) = 0).
    check_close(out, exact_field(s, P::velocity, x, t), 1e-12, t < 1);
  }
  // Where the conversion is undefined the adapter says so before calling the field.
  CHECK_THROWS_AS(u_field(x, out, 0.0), fd::numeric_error);
  CHECK_THROWS_WITH(u_field(x, out, 0.0),
                    Contains("as_parametrization: noise -> velocity is undefined at t = 0"));
  fd::Tensor<double> wrong(fd::Shape{10, 2});
  CHECK_THROWS_WITH(u_field(x, wrong, 0.5),
                    Contains("as_parametrization: x and out must have the same shape"));
  // A v-prediction field as a score field, held by value, in float.
  auto s_field = fd::as_parametrization(OracleField<sc::Cosine>{s, P::v}, P::v, P::score, s);
  fd::Tensor<float> xf(x.shape()), of(x.shape());
  for (fd::index_t k = 0; k < x.numel(); ++k) xf[k] = static_cast<float>(x[k]);
  s_field(xf, of, 0.4f);
  for (fd::index_t k = 0; k < x.numel(); ++k) {
    const double ref =
        exact(fd::evaluate(s, double(0.4f)), P::score, double(xf[k]), kMu[k % kDim]);
    CHECK(of[k] == Approx(ref).epsilon(1e-5).margin(1e-6));
  }
}

namespace {
// A conditional field: the oracle with a per-label shift of the mean, to test forwarding.
struct ConditionalOracle {
  fd::index_t num_classes() const { return 2; }
  void operator()(fd::View<const double> x, fd::View<double> out, double t,
                  fd::View<const fd::label_t> y) const {
    OracleField<sc::Linear>{sc::Linear{}, P::noise}(x, out, t);
    for (fd::index_t i = 0; i < x.rows(); ++i)
      for (fd::index_t j = 0; j < kDim; ++j) out(i, j) += static_cast<double>(y[i]);
  }
};
}  // namespace

TEST_CASE("as_parametrization forwards labels of a conditional field", "[paths][convert][field]") {
  ConditionalOracle cond;
  auto u = fd::as_parametrization(cond, P::noise, P::velocity, sc::Linear{});
  static_assert(fd::ConditionalField<decltype(u), double>);
  CHECK(u.num_classes() == 2);
  const auto x = test_points(2, 9);
  auto y = fd::Tensor<fd::label_t>::from({2}, {0, 1});
  fd::Tensor<double> out(x.shape());
  u(x, out, 0.5, y);
  const auto ref = exact_field(sc::Linear{}, P::velocity, x, 0.5);
  // Label 1 shifts eps_hat by 1, so u = d_alpha z_hat + d_beta eps_hat changes by
  // d_beta - d_alpha beta / alpha = -1 - 1 = -2 at t = 0.5.
  for (fd::index_t j = 0; j < kDim; ++j) {
    CHECK(out(0, j) == Approx(ref(0, j)).epsilon(1e-12));
    CHECK(out(1, j) == Approx(ref(1, j) - 2).epsilon(1e-12));
  }
}

// ---- re-targeting -----------------------------------------------------------------------------

namespace {
template <class SA, class SB>
void check_retarget(const SA& a, const SB& b, const char* name, std::vector<double> rs,
                    double rtol = 1e-11, bool nontrivial = true) {
  INFO(name);
  OracleField<SA> u_a{a, P::velocity};
  auto u_b = fd::retarget<double>(u_a, a, b);
  static_assert(fd::Field<decltype(u_b), double>);
  const auto x = test_points(12, 21);
  fd::Tensor<double> out(x.shape());
  for (double r : rs) {
    INFO("r = " << r);
    u_b(x, out, r);
    check_close(out, exact_field(b, P::velocity, x, r), rtol, nontrivial);
  }
}
}  // namespace

TEST_CASE("retarget: a velocity field under schedule A sampled under schedule B",
          "[paths][retarget]") {
  const std::vector<double> interior{0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99};
  check_retarget(sc::Linear{}, sc::Cosine{}, "Linear -> Cosine", interior);
  check_retarget(sc::Cosine{}, sc::Linear{}, "Cosine -> Linear", interior);
  check_retarget(sc::Linear{}, sc::VariancePreserving{}, "Linear -> VP", interior);
  check_retarget(sc::Polynomial{2}, sc::Linear{}, "Polynomial{2} -> Linear", interior);
  check_retarget(sc::SqrtBeta{}, sc::Cosine{}, "SqrtBeta -> Cosine", interior);
  check_retarget(sc::Cosine{}, sc::Cosine{}, "Cosine -> Cosine", interior);
  // Exact endpoints are handled when both schedules reach them with finite derivatives (the
  // cosine velocity at t = 1 is identically 0: d_alpha(1) = 0 and eps_hat(x, 1) = 0).
  check_retarget(sc::Linear{}, sc::Cosine{}, "Linear -> Cosine, ends", {0.0, 1.0}, 1e-11, false);
  check_retarget(sc::Cosine{}, sc::Linear{}, "Cosine -> Linear, ends", {0.0, 1.0});
  // VP's alpha_0 > 0: its r = 0 lies inside Linear's range.
  check_retarget(sc::Linear{}, sc::VariancePreserving{}, "Linear -> VP at 0", {0.0});

  // The coefficients themselves for Linear -> Cosine: t_r = tan(pi r/2) / (1 + tan(pi r/2)).
  const double r = 0.3, tn = std::tan(std::numbers::pi * r / 2);
  const auto c = fd::retarget_coefficients(sc::Linear{}, sc::Cosine{}, r);
  CHECK(c.time == Approx(tn / (1 + tn)).epsilon(1e-14));
  CHECK(c.scale == Approx(std::cos(std::numbers::pi * r / 2) / (1 - c.time)).epsilon(1e-14));
  const auto same = fd::retarget_coefficients(sc::Cosine{}, sc::Cosine{}, r);
  CHECK(same.time == Approx(r).epsilon(1e-14));
  CHECK(same.scale == Approx(1).epsilon(1e-14));
  CHECK(same.d_time == Approx(1).epsilon(1e-12));
  CHECK(same.d_log_scale == Approx(0).margin(1e-12));
}

TEST_CASE("retarget: undefined points throw numeric_error with the reason", "[paths][retarget]") {
  // VP never reaches alpha = 0, so Linear's r near 0 has no matching VP time.
  CHECK_THROWS_AS(fd::retarget_coefficients(sc::VariancePreserving{}, sc::Linear{}, 1e-3),
                  fd::numeric_error);
  CHECK_THROWS_WITH(fd::retarget_coefficients(sc::VariancePreserving{}, sc::Linear{}, 1e-3),
                    Contains("outside the source schedule's range"));
  CHECK_NOTHROW(fd::retarget_coefficients(sc::VariancePreserving{}, sc::Linear{}, 0.5));
  // Polynomial{2}'s velocity at t = 0 is identically 0.
  CHECK_THROWS_WITH(fd::retarget_coefficients(sc::Polynomial{2}, sc::Linear{}, 0.0),
                    Contains("retarget: undefined at r = 0"));
  // VP's d_beta is infinite at t = 1.
  CHECK_THROWS_AS(fd::retarget_coefficients(sc::Linear{}, sc::VariancePreserving{}, 1.0),
                  fd::numeric_error);
  CHECK_THROWS_WITH(fd::retarget_coefficients(sc::Linear{}, sc::VariancePreserving{}, 1.0),
                    Contains("a schedule derivative is infinite there"));
  CHECK_THROWS_WITH(fd::retarget_coefficients(sc::Polynomial{2}, sc::Linear{}, 0.0),
                    Contains("the source velocity carries no information at t_r"));
  CHECK_THROWS_WITH(fd::retarget_coefficients(sc::Linear{}, sc::Linear{}, 1.5),
                    Contains("retarget: t must lie in [0, 1], got 1.5"));
  OracleField<sc::Linear> u{sc::Linear{}, P::velocity};
  auto g = fd::retarget<double>(u, sc::Linear{}, sc::Cosine{});
  const auto x = test_points(4, 1);
  fd::Tensor<double> wrong(fd::Shape{4, 2});
  CHECK_THROWS_WITH(g(x, wrong, 0.5), Contains("retarget: x and out must have the same shape"));
}
