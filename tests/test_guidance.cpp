// Guidance adapters: classifier-free guidance (with interval scales and rescale), classifier
// guidance, and the identity that ties them together on the exact mixture oracles: with exact
// fields and the exact classifier, CG with scale w and CFG with scale w are the same field.
#include <catch2/catch.hpp>

#include <cmath>
#include <flowdiff/analytic/analytic.hpp>
#include <flowdiff/guidance/guidance.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/samplers/sde.hpp>
#include <limits>
#include <numbers>
#include <type_traits>
#include <vector>

#include "support/mixtures.hpp"

namespace fd = flowdiff;
using fd::analytic::GaussianMixture;
using Catch::Matchers::Contains;

namespace {

// The library's own schedules: cosine (trigonometric) and sqrt-beta (d_beta(1) = -inf with a
// finite beta d_beta = -1/2, so b_1 = 1/2).
using LibCosine = fd::schedules::Cosine;
using LibSqrtBeta = fd::schedules::SqrtBeta;

using flowdiff::test::make_mixture;

// A 6D mixture, so per-sample standard deviations over features mean something.
template <class T>
GaussianMixture<T> make_mixture_6d() {
  fd::Generator gen{99};
  auto means = fd::randn<T>({5, 6}, gen);
  scale(means, T(2));
  auto sds = fd::Tensor<T>::full({5, 6}, T(0.4));
  return GaussianMixture<T>({1, 2, 1, 1.5, 0.5}, means, sds, {0, 1, 2, 0, 1});
}

// A conditional field whose calls can be inspected: u(x|y) = (y + 1) x + t.
struct Recorder {
  using value_type = float;
  int calls = 0;
  const float* last_x = nullptr;
  const float* last_out = nullptr;
  fd::index_t last_n = 0;
  std::vector<fd::label_t> last_labels;
  fd::index_t num_classes() const { return 5; }
  void operator()(fd::View<const float> x, fd::View<float> out, float t,
                  fd::View<const fd::label_t> y) {
    ++calls;
    last_x = x.data();
    last_out = out.data();
    last_n = x.rows();
    last_labels.assign(y.data(), y.data() + y.numel());
    const fd::index_t d = x.row_size();
    for (fd::index_t i = 0; i < x.rows(); ++i)
      for (fd::index_t j = 0; j < d; ++j) out[i * d + j] = float(y[i] + 1) * x[i * d + j] + t;
  }
};

template <class T>
fd::Tensor<fd::label_t> mixed_labels(fd::index_t n, fd::label_t num_classes) {
  fd::Tensor<fd::label_t> y(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % (num_classes + 1));
  return y;
}

template <class T>
fd::Tensor<T> points(fd::index_t n, fd::index_t d, std::uint64_t seed) {
  fd::Generator gen{seed};
  auto x = fd::randn<T>({n, d}, gen);
  scale(x, T(2));
  return x;
}

}  // namespace

static_assert(fd::Field<fd::Cfg<Recorder, float>, float>);
static_assert(fd::from_plus_one_convention(2.0) == 3.0);
static_assert(fd::to_plus_one_convention(3.0f) == 2.0f);

TEMPLATE_TEST_CASE("CFG: w = 1 is the conditional field, w = 0 the unconditional, others combine",
                   "[guidance]", float, double) {
  using T = TestType;
  auto g = make_mixture<T>();
  const fd::index_t n = 50;
  auto x = points<T>(n, 2, 1);
  auto y = mixed_labels<T>(n, 3);
  auto field = g.velocity(LibCosine{});
  fd::Tensor<T> cond(fd::Shape{n, 2}), uncond(fd::Shape{n, 2}), out(fd::Shape{n, 2});
  const T t = T(0.42);
  field(x, cond, t, y);
  field(x, uncond, t);
  for (double w : {1.0, 0.0, 2.5, -0.5, 0.3}) {
    auto c = fd::cfg(g.velocity(LibCosine{}), static_cast<T>(w));
    static_assert(std::is_same_v<typename decltype(c)::value_type, T>);
    c.set_condition(y);
    c(x, out, t);
    REQUIRE(fd::all_finite(out));
    for (fd::index_t i = 0; i < out.numel(); ++i) {
      if (w == 1.0) {
        REQUIRE(out[i] == cond[i]);
      } else if (w == 0.0) {
        REQUIRE(out[i] == uncond[i]);
      } else {
        const double want = (1 - w) * uncond[i] + w * cond[i];
        CHECK(std::abs(out[i] - want) <= 1e-6 * (1 + std::abs(w * cond[i]) + std::abs((1 - w) * uncond[i])));
      }
    }
  }
  // One label for all samples.
  auto c = fd::cfg(g.velocity(LibCosine{}), T(2));
  c.set_condition(2, n);
  c(x, out, t);
  fd::Tensor<fd::label_t> y2(fd::Shape{n});
  fd::fill(y2, 2);
  field(x, cond, t, y2);
  for (fd::index_t i = 0; i < out.numel(); ++i)
    CHECK(std::abs(out[i] - (2 * cond[i] - uncond[i])) <= 1e-6 * (1 + 3 * std::abs(cond[i]) + std::abs(uncond[i])));
}

TEST_CASE("The (1 + g) convention is w = 1 + g", "[guidance]") {
  auto g = make_mixture<double>();
  const fd::index_t n = 20;
  auto x = points<double>(n, 2, 2);
  auto y = mixed_labels<double>(n, 2);  // no null labels
  auto field = g.score(fd::schedules::Linear{});
  fd::Tensor<double> cond(fd::Shape{n, 2}), uncond(fd::Shape{n, 2}), out(fd::Shape{n, 2});
  field(x, cond, 0.6, y);
  field(x, uncond, 0.6);
  const double gs = 1.5;
  auto c = fd::cfg(g.score(fd::schedules::Linear{}), fd::from_plus_one_convention(gs));
  c.set_condition(y);
  c(x, out, 0.6);
  for (fd::index_t i = 0; i < out.numel(); ++i) {
    const double want = (1 + gs) * cond[i] - gs * uncond[i];
    CHECK(std::abs(out[i] - want) <= 1e-12 * (1 + std::abs(want)));
  }
  CHECK(fd::to_plus_one_convention(fd::from_plus_one_convention(gs)) == gs);
}

namespace {

// CG(w) == CFG(w) for the exact velocity (and score) of a mixture at many (x, t, y, w).
template <class T, class S>
void check_cg_equals_cfg(const S& sched) {
  auto g = make_mixture<T>();
  const fd::index_t n = 64;
  auto x = points<T>(n, 2, 5);
  auto y = mixed_labels<T>(n, 3);  // includes the null label
  const double rtol = std::is_same_v<T, float> ? 1e-5 : 1e-10;
  const double atol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
  fd::Tensor<T> a(fd::Shape{n, 2}), b(fd::Shape{n, 2}), uc(fd::Shape{n, 2}), uu(fd::Shape{n, 2});
  int compared = 0;
  for (int velocity = 0; velocity < 2; ++velocity) {
    for (double t : {0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0}) {
      for (double w : {-0.5, 0.0, 0.5, 1.0, 2.0, 4.0}) {
        const T tt = static_cast<T>(t);
        if (velocity) {
          auto cf = fd::cfg(g.velocity(sched), static_cast<T>(w));
          auto cg = fd::classifier_guidance(g.velocity(sched), g.classifier_gradient(sched), sched,
                                            static_cast<T>(w));
          cf.set_condition(y);
          cg.set_condition(y);
          cf(x, a, tt);
          cg(x, b, tt);
          auto f = g.velocity(sched);
          f(x, uc, tt, y);
          f(x, uu, tt);
        } else {
          auto cf = fd::cfg(g.score(sched), static_cast<T>(w));
          auto cg = fd::classifier_guidance_score(g.score(sched), g.classifier_gradient(sched),
                                                  static_cast<T>(w));
          cf.set_condition(y);
          cg.set_condition(y);
          cf(x, a, tt);
          cg(x, b, tt);
          auto f = g.score(sched);
          f(x, uc, tt, y);
          f(x, uu, tt);
        }
        REQUIRE(fd::all_finite(a));
        REQUIRE(fd::all_finite(b));
        for (fd::index_t i = 0; i < a.numel(); ++i) {
          // Rounding scale: the terms each side adds up (u(x) and u(x|∅) are the same field).
          const double size = std::abs(w) * (std::abs(uc[i]) + std::abs(uu[i])) +
                              std::abs(1 - w) * std::abs(uu[i]) + std::abs(a[i]);
          INFO("velocity " << velocity << ", t = " << t << ", w = " << w << ", element " << i);
          REQUIRE(std::abs(a[i] - b[i]) <= atol + rtol * size);
          ++compared;
        }
      }
    }
  }
  CHECK(compared == 2 * 7 * 6 * n * 2);
}

}  // namespace

TEMPLATE_TEST_CASE("Classifier guidance equals CFG for exact fields and the exact classifier",
                   "[guidance]", float, double) {
  check_cg_equals_cfg<TestType>(fd::schedules::Linear{});
  check_cg_equals_cfg<TestType>(LibCosine{});
  check_cg_equals_cfg<TestType>(LibSqrtBeta{});  // b_1 = 1/2 through beta d_beta
}

TEMPLATE_TEST_CASE("CFG rescale: phi = 0 is CFG, phi = 1 matches the conditional std", "[guidance]",
                   float, double) {
  using T = TestType;
  auto g = make_mixture_6d<T>();
  const fd::index_t n = 40, d = 6;
  auto x = points<T>(n, d, 3);
  auto y = mixed_labels<T>(n, 2);
  const T t = T(0.55), w = T(3);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  fd::Tensor<T> plain(fd::Shape{n, d}), r0(fd::Shape{n, d}), r1(fd::Shape{n, d}), r7(fd::Shape{n, d}),
      cond(fd::Shape{n, d});
  auto c = fd::cfg(g.velocity(fd::schedules::Linear{}), w);
  auto c0 = fd::cfg(g.velocity(fd::schedules::Linear{}), w, {.rescale = 0.0});
  auto c1 = fd::cfg(g.velocity(fd::schedules::Linear{}), w, {.rescale = 1.0});
  auto c7 = fd::cfg(g.velocity(fd::schedules::Linear{}), w, {.rescale = 0.7});
  for (auto* cc : {&c, &c0, &c1, &c7}) cc->set_condition(y);
  c(x, plain, t);
  c0(x, r0, t);
  c1(x, r1, t);
  c7(x, r7, t);
  auto f = g.velocity(fd::schedules::Linear{});
  f(x, cond, t, y);
  auto row_std = [&](const fd::Tensor<T>& v, fd::index_t i) {
    double m = 0, s = 0;
    for (fd::index_t j = 0; j < d; ++j) m += v(i, j);
    m /= d;
    for (fd::index_t j = 0; j < d; ++j) s += (v(i, j) - m) * (v(i, j) - m);
    return std::sqrt(s / d);
  };
  for (fd::index_t i = 0; i < n; ++i) {
    const double sc = row_std(cond, i), sp = row_std(plain, i);
    REQUIRE(sc > 0);
    REQUIRE(sp > 0);
    CHECK(std::abs(row_std(r1, i) - sc) <= tol * sc);
    for (fd::index_t j = 0; j < d; ++j) {
      CHECK(r0(i, j) == plain(i, j));
      const double want7 = 0.7 * plain(i, j) * sc / sp + 0.3 * plain(i, j);
      CHECK(std::abs(r7(i, j) - want7) <= tol * (1 + std::abs(want7)));
    }
  }
  CHECK_THROWS_WITH(fd::cfg(g.velocity(fd::schedules::Linear{}), w, {.rescale = 1.5}),
                    Contains("rescale (phi) must lie in [0, 1], got 1.5"));
}

TEST_CASE("Guidance interval applies w only inside [t_lo, t_hi]", "[guidance]") {
  auto g = make_mixture<float>();
  const fd::index_t n = 30;
  auto x = points<float>(n, 2, 4);
  auto y = mixed_labels<float>(n, 3);
  auto interval = fd::guidance_interval(3.0, 0.3, 0.7);
  auto ci = fd::cfg(g.velocity(fd::schedules::Linear{}), interval);
  auto c3 = fd::cfg(g.velocity(fd::schedules::Linear{}), 3.0f);
  ci.set_condition(y);
  c3.set_condition(y);
  auto f = g.velocity(fd::schedules::Linear{});
  fd::Tensor<float> a(fd::Shape{n, 2}), b(fd::Shape{n, 2});
  for (float t : {0.0f, 0.2f, 0.3f, 0.5f, 0.7f, 0.8f, 1.0f}) {
    ci(x, a, t);
    const bool inside = t >= 0.3f && t <= 0.7f;
    if (inside)
      c3(x, b, t);
    else
      f(x, b, t, y);
    CHECK(ci.scale_at(t) == (inside ? 3.0 : 1.0));
    for (fd::index_t i = 0; i < a.numel(); ++i) REQUIRE(a[i] == b[i]);
  }
  // Any callable t -> w works; the scalar type comes from the field.
  auto ramp = fd::cfg(g.velocity(fd::schedules::Linear{}), [](double t) { return 1.0 + 2.0 * t; });
  ramp.set_condition(y);
  auto c2 = fd::cfg(g.velocity(fd::schedules::Linear{}), 2.0f);
  c2.set_condition(y);
  ramp(x, a, 0.5f);
  c2(x, b, 0.5f);
  for (fd::index_t i = 0; i < a.numel(); ++i) REQUIRE(a[i] == b[i]);

  // The paper's EDM noise-level interval (sigma_lo, sigma_hi] maps to t = 1 / (1 + sigma) under the
  // linear path (sigma = beta / alpha = (1 - t) / t).
  auto edm = fd::guidance_interval_sigma(fd::schedules::Linear{}, 2.0, 0.28, 5.42);
  CHECK(edm.t_lo == Approx(1 / 6.42).epsilon(1e-12));
  CHECK(edm.t_hi == Approx(1 / 1.28).epsilon(1e-12));
  CHECK(fd::time_of_sigma(LibCosine{}, 1.0) == Approx(0.5).epsilon(1e-12));

  CHECK_THROWS_WITH(fd::guidance_interval(2.0, 0.8, 0.2), Contains("t_lo must be <= t_hi"));
  CHECK_THROWS_WITH(fd::guidance_interval(2.0, -0.1, 0.2), Contains("t_lo must lie in [0, 1], got -0.1"));
  CHECK_THROWS_WITH(fd::guidance_interval(std::nan(""), 0.1, 0.2), Contains("w must be finite"));
  CHECK_THROWS_WITH(fd::guidance_interval_sigma(fd::schedules::Linear{}, 2.0, 3.0, 1.0),
                    Contains("need 0 < sigma_lo <= sigma_hi"));
}

TEST_CASE("CFG evaluates the field once on a 2N batch in reused scratch", "[guidance]") {
  Recorder rec;
  auto c = fd::cfg(rec, 2.0f);  // an lvalue: held by reference
  CHECK(&c.field() == &rec);
  auto owned = fd::cfg(Recorder{}, 2.0f);  // an rvalue: owned
  static_assert(std::is_same_v<decltype(owned), fd::Cfg<Recorder, float, fd::ConstantScale, fd::Cpu>>);

  const fd::index_t n = 8, d = 3;
  auto x = points<float>(n, d, 6);
  auto y = fd::Tensor<fd::label_t>::from({8}, {0, 1, 2, 3, 4, 5, 0, 1});
  fd::Tensor<float> out(fd::Shape{n, d});
  c.set_condition(y);
  c(x, out, 0.5f);
  REQUIRE(rec.calls == 1);
  CHECK(rec.last_n == 2 * n);
  for (fd::index_t i = 0; i < n; ++i) {
    CHECK(rec.last_labels[i] == y[i]);
    CHECK(rec.last_labels[n + i] == 5);  // the null label
  }
  for (fd::index_t i = 0; i < n; ++i)
    for (fd::index_t j = 0; j < d; ++j) {
      const float cond = float(y[i] + 1) * x(i, j) + 0.5f, unc = 6.0f * x(i, j) + 0.5f;
      CHECK(out(i, j) == Approx(2.0f * cond - unc).margin(1e-5));
    }
  const float* px = rec.last_x;
  const float* po = rec.last_out;
  for (int k = 0; k < 5; ++k) {
    c(x, out, 0.1f * float(k));
    CHECK(rec.last_x == px);
    CHECK(rec.last_out == po);
  }
  // New labels, same N: still no reallocation.
  fd::fill(y, 2);
  c.set_condition(y);
  c(x, out, 0.5f);
  CHECK(rec.last_x == px);
  CHECK(rec.last_out == po);
  CHECK(rec.last_labels[0] == 2);
  CHECK(c.batch_size() == n);
  // Another N works (and the output is right).
  auto x4 = points<float>(4, d, 7);
  fd::Tensor<float> out4(fd::Shape{4, d});
  c.set_condition(3, 4);
  c(x4, out4, 0.25f);
  CHECK(rec.last_n == 8);
  CHECK(out4(3, 2) == Approx(2.0f * (4.0f * x4(3, 2) + 0.25f) - (6.0f * x4(3, 2) + 0.25f)).margin(1e-5));

  // w = 1 and w = 0 evaluate only the half they need, on the caller's buffers.
  Recorder r1;
  auto one = fd::cfg(r1, 1.0f);
  one.set_condition(y);
  one(x, out, 0.5f);
  CHECK(r1.last_n == n);
  CHECK(r1.last_x == x.data());
  CHECK(r1.last_labels[0] == 2);
  auto zero = fd::cfg(r1, 0.0f);
  zero.set_condition(y);
  zero(x, out, 0.5f);
  CHECK(r1.last_n == n);
  CHECK(r1.last_labels[0] == 5);
}

namespace {

// A field that only forwards field(x, out, t): it hides Cfg::evaluate_halves, so the samplers take
// their unfused path (the combination pass, then the update pass).
template <class F>
struct Unfused {
  F& f;
  template <class T>
  void operator()(fd::View<const T> x, fd::View<T> out, T t) {
    f(x, out, t);
  }
};
template <class F>
Unfused(F&) -> Unfused<F>;

}  // namespace

static_assert(fd::FusableGuidance<fd::Cfg<Recorder, float>, float, fd::Cpu>);
static_assert(!fd::FusableGuidance<Unfused<fd::Cfg<Recorder, float>>, float, fd::Cpu>);

TEMPLATE_TEST_CASE("CFG under Euler and Euler-Maruyama: the sampler fuses the combination into "
                   "its update, bit for bit",
                   "[guidance][samplers]", float, double) {
  using T = TestType;
  auto g = make_mixture<T>();
  const fd::index_t n = 64;
  const auto x0 = points<T>(n, 2, 11);
  const auto y = mixed_labels<T>(n, 3);
  const auto grid = fd::uniform_grid<T>(12);
  // Samples with the stepper make(gen) returns, fused (the Cfg itself) and unfused (behind
  // Unfused): the same bits and the same generator offsets.
  const auto compare = [&](const char* what, auto&& guided, auto make) {
    INFO(what);
    guided.set_condition(y);
    fd::Generator g1{7}, g2{7};
    auto fused = x0.clone(), plain = x0.clone();
    fd::integrate(make(g1), guided, fused, grid);
    Unfused hidden{guided};
    fd::integrate(make(g2), hidden, plain, grid);
    REQUIRE(fd::all_finite(fused));
    CHECK(g1.offset() == g2.offset());
    fd::index_t differ = 0, moved = 0;
    for (fd::index_t i = 0; i < fused.numel(); ++i) {
      differ += fused[i] != plain[i];
      moved += fused[i] != x0[i];  // the steps moved every coordinate
    }
    CHECK(differ == 0);
    CHECK(moved == fused.numel());
  };
  const auto euler = [](fd::Generator&) { return fd::Euler{}; };
  const auto em = [](fd::Generator& gen) {
    return fd::euler_maruyama(fd::schedules::Linear{}, 0.7, gen);
  };
  const auto em_off = [](fd::Generator& gen) {  // sigma_t = 0 after t = 0.7: the ODE update
    return fd::euler_maruyama(
        fd::schedules::Linear{}, [](double t) { return t < 0.7 ? 1.0 : 0.0; }, gen);
  };
  const auto field = [&] { return g.velocity(fd::schedules::Linear{}); };
  for (double w : {3.0, -0.5, 1.0, 0.0}) {
    INFO("w = " << w);
    compare("Euler", fd::cfg(field(), static_cast<T>(w)), euler);
    compare("Euler-Maruyama", fd::cfg(field(), static_cast<T>(w)), em);
    compare("Euler-Maruyama, sigma_t", fd::cfg(field(), static_cast<T>(w)), em_off);
  }
  // Limited-interval guidance: fused where w = 3, the conditional half alone elsewhere.
  compare("Euler, guidance interval",
          fd::cfg<T>(field(), fd::guidance_interval(3.0, 0.3, 0.7)), euler);
  // CFG rescale is not fused (evaluate_halves declines it): both runs take the same path.
  compare("Euler-Maruyama, rescale", fd::cfg(field(), T(3), {.rescale = 0.7}), em);

  // evaluate_halves: both halves from one 2N evaluation and w at t; nothing, and no evaluation,
  // where operator() would not blend them.
  Recorder rec;
  auto c = fd::cfg(rec, 2.0f);
  c.set_condition(fd::Tensor<fd::label_t>::from({2}, {1, 3}));
  const auto x = points<float>(2, 3, 12);
  const auto halves = c.evaluate_halves(x.view(), 0.5f);
  REQUIRE(halves.has_value());
  CHECK(rec.calls == 1);
  CHECK(rec.last_n == 4);
  CHECK(halves->w == 2.0);
  CHECK(halves->cond(1, 2) == 4.0f * x(1, 2) + 0.5f);
  CHECK(halves->uncond(1, 2) == 6.0f * x(1, 2) + 0.5f);
  auto one = fd::cfg(rec, 1.0f);
  one.set_condition(2, 2);
  CHECK_FALSE(one.evaluate_halves(x.view(), 0.5f).has_value());
  auto rescaled = fd::cfg(rec, 2.0f, {.rescale = 0.5});
  rescaled.set_condition(2, 2);
  CHECK_FALSE(rescaled.evaluate_halves(x.view(), 0.5f).has_value());
  CHECK(rec.calls == 1);
  CHECK_THROWS_WITH(c.evaluate_halves(points<float>(3, 3, 1).view(), 0.5f),
                    Contains("x has shape [3, 3] but set_condition received 2 labels"));
}

TEST_CASE("Classifier guidance: t = 0, scratch, and label checks", "[guidance]") {
  auto g = make_mixture<double>();
  fd::schedules::Linear lin;
  const fd::index_t n = 16;
  auto x = points<double>(n, 2, 8);
  auto y = mixed_labels<double>(n, 3);
  fd::Tensor<double> out(fd::Shape{n, 2}), u(fd::Shape{n, 2});
  auto cg = fd::classifier_guidance(g.velocity(lin), g.classifier_gradient(lin), lin, 2.0);
  cg.set_condition(y);
  // b_t = (d_alpha beta^2 - d_beta beta alpha) / alpha is infinite at t = 0 for alpha_0 = 0.
  CHECK_THROWS_AS(cg(x, out, 0.0), fd::numeric_error);
  CHECK_THROWS_WITH(cg(x, out, 0.0), Contains("b_t = (d_alpha beta^2 - d_beta beta alpha) / alpha is not finite at t = 0"));
  CHECK(std::isinf(fd::score_coefficient(lin, 0.0)));
  CHECK(fd::score_coefficient(lin, 0.25) == Approx(0.75 / 0.25));  // b_t = (1 - t) / t for the linear path
  CHECK_NOTHROW(cg(x, out, 1e-3));
  CHECK(fd::all_finite(out));
  // With w(t) = 0 near t = 0 the classifier is not needed there, and the field is u(x).
  auto gated = fd::classifier_guidance(g.velocity(lin), g.classifier_gradient(lin), lin,
                                       [](double t) { return t < 0.1 ? 0.0 : 2.0; });
  gated.set_condition(y);
  gated(x, out, 0.0);
  auto f = g.velocity(lin);
  f(x, u, 0.0);
  for (fd::index_t i = 0; i < out.numel(); ++i) CHECK(out[i] == u[i]);
  // The score version is defined at t = 0 (∇ log p_0(y|x) = 0 there).
  auto cgs = fd::classifier_guidance_score(g.score(lin), g.classifier_gradient(lin), 2.0);
  cgs.set_condition(y);
  cgs(x, out, 0.0);
  for (fd::index_t i = 0; i < out.numel(); ++i) CHECK(std::abs(out[i] + x[i]) <= 1e-12);

  // The classifier writes into scratch that stays put across calls.
  struct GradRecorder {
    const double* last_out = nullptr;
    void operator()(fd::View<const double>, fd::View<double> o, double, fd::View<const fd::label_t>) {
      last_out = o.data();
      fd::fill(o, 1.0);
    }
  };
  GradRecorder gr;
  auto cgr = fd::classifier_guidance(g.velocity(lin), gr, lin, 2.0);
  cgr.set_condition(y);
  cgr(x, out, 0.5);
  const double* p = gr.last_out;
  cgr(x, out, 0.6);
  CHECK(gr.last_out == p);
  f(x, u, 0.6);
  for (fd::index_t i = 0; i < out.numel(); ++i) CHECK(out[i] == Approx(u[i] + 2.0 * 1.0 * (0.4 / 0.6)));
  // Without num_classes() on the classifier only y >= 0 is checked.
  auto neg = fd::Tensor<fd::label_t>::from({2}, {0, -3});
  CHECK_THROWS_WITH(cgr.set_condition(neg), Contains("labels[1] = -3 must be >= 0"));

  auto bad = fd::Tensor<fd::label_t>::from({3}, {0, 4, 1});
  CHECK_THROWS_WITH(cg.set_condition(bad), Contains("labels[1] = 4 is outside [0, 3] (3 is the null label)"));
  auto cg_unset = fd::classifier_guidance(g.velocity(lin), g.classifier_gradient(lin), lin, 2.0);
  CHECK_THROWS_WITH(cg_unset(x, out, 0.5), Contains("call set_condition(labels)"));
  CHECK_THROWS_WITH(fd::classifier_guidance(g.velocity(lin), g.classifier_gradient(lin), lin,
                                            std::numeric_limits<double>::infinity()),
                    Contains("w must be finite"));
}

TEST_CASE("CFG validates scales, labels and shapes", "[guidance]") {
  auto g = make_mixture<float>();
  auto x = points<float>(4, 2, 9);
  fd::Tensor<float> out(fd::Shape{4, 2}), out3(fd::Shape{4, 3});
  auto y = fd::Tensor<fd::label_t>::from({4}, {0, 1, 2, 3});
  CHECK_THROWS_WITH(fd::cfg(g.velocity(fd::schedules::Linear{}), std::nanf("")), Contains("w must be finite"));
  auto c = fd::cfg(g.velocity(fd::schedules::Linear{}), 2.0f);
  CHECK_THROWS_WITH(c(x, out, 0.5f), Contains("call set_condition(labels) before evaluating"));
  auto bad = fd::Tensor<fd::label_t>::from({4}, {0, 1, 9, 3});
  CHECK_THROWS_WITH(c.set_condition(bad), Contains("labels[2] = 9 is outside [0, 3] (3 is the null label)"));
  CHECK_THROWS_WITH(c.set_condition(-1, 4), Contains("y = -1 is outside [0, 3]"));
  c.set_condition(y);
  auto x5 = points<float>(5, 2, 10);
  fd::Tensor<float> out5(fd::Shape{5, 2});
  CHECK_THROWS_WITH(c(x5, out5, 0.5f), Contains("x has shape [5, 2] but set_condition received 4 labels"));
  CHECK_THROWS_WITH(c(x, out3, 0.5f), Contains("x and out must have the same shape"));
  CHECK_THROWS_WITH(c(x, out, 1.5f), Contains("t must lie in [0, 1], got 1.5"));
  auto blowup = fd::cfg(g.velocity(fd::schedules::Linear{}), [](double t) { return 1.0 / (t - 0.5); });
  blowup.set_condition(y);
  CHECK_NOTHROW(blowup(x, out, 0.25f));
  CHECK_THROWS_WITH(blowup(x, out, 0.5f), Contains("w(t) must be finite, got inf at t = 0.5"));
  // Negative scales are allowed: they guide away from the class.
  auto away = fd::cfg(g.velocity(fd::schedules::Linear{}), -1.0f);
  away.set_condition(y);
  CHECK_NOTHROW(away(x, out, 0.5f));
  CHECK(fd::all_finite(out));
}

TEST_CASE("Device label check: one reduction counts the labels outside [0, K]", "[guidance]") {
  // check_labels_by_count is what set_condition runs for labels on a device (B::reduce_sum of
  // LabelOutside); here through the CPU backend's reduce_sum, which is threaded above its
  // threshold. tests/cuda/test_cuda_mlp.cu runs it through Cfg with device labels.
  using fd::detail::check_labels_by_count;
  const auto good = fd::Tensor<fd::label_t>::from({5}, {0, 1, 2, 3, 3});
  CHECK_NOTHROW(check_labels_by_count<fd::Cpu>("cfg::set_condition", good.view(), 3));
  const auto bad = fd::Tensor<fd::label_t>::from({6}, {0, -1, 4, 3, 9, 2});
  CHECK_THROWS_AS(check_labels_by_count<fd::Cpu>("cfg::set_condition", bad.view(), 3),
                  fd::config_error);
  CHECK_THROWS_WITH(
      check_labels_by_count<fd::Cpu>("cfg::set_condition", bad.view(), 3),
      Contains("cfg::set_condition: 3 of the 6 labels lie outside [0, 3] (3 is the null label)"));
  // num_classes < 0 (classifier guidance without a class count): only negative labels are bad.
  CHECK_THROWS_WITH(check_labels_by_count<fd::Cpu>("cg", bad.view(), -1),
                    Contains("cg: 1 of the 6 labels are negative; labels must be >= 0"));
  CHECK_NOTHROW(check_labels_by_count<fd::Cpu>("cg", good.view(), -1));
  // A large batch: the exact count from the threaded reduction.
  fd::Tensor<fd::label_t> big(fd::Shape{200001});
  for (fd::index_t i = 0; i < big.numel(); ++i) big[i] = static_cast<fd::label_t>(i % 4);
  for (fd::index_t k = 0; k < 17; ++k)
    big[k * 11113 + 5] = k % 2 == 0 ? fd::label_t{4} : fd::label_t{-2};
  CHECK_THROWS_WITH(check_labels_by_count<fd::Cpu>("cfg::set_condition", big.view(), 3),
                    Contains("17 of the 200001 labels lie outside [0, 3]"));
  // The extremes of label_t.
  const auto ext = fd::Tensor<fd::label_t>::from(
      {3}, {std::numeric_limits<fd::label_t>::min(), std::numeric_limits<fd::label_t>::max(), 0});
  CHECK_THROWS_WITH(check_labels_by_count<fd::Cpu>("cfg", ext.view(), 3),
                    Contains("2 of the 3 labels"));
}
