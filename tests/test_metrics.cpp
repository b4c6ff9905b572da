// Sample-quality metrics: the Fréchet distance of metrics/frechet.hpp against closed forms (equal
// sets, 1-D, commuting covariances, a non-commuting 2x2 case through the identity
// tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)) for a 2x2 matrix with non-negative eigenvalues),
// symmetry, invariance under a common rotation and translation, singular covariances and errors;
// and metrics/classifier_metrics.hpp: agreement counting, predictions, and the batched
// classifier evaluator (fixed batch with a zero-padded tail, equal to one big forward).
#include <catch2/catch.hpp>
#include <cmath>
#include <flowdiff/core/random.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/metrics/frechet.hpp>
#include <flowdiff/nn/models/classifier.hpp>
#include <vector>

#include "support/compare.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace metrics = flowdiff::metrics;
using Catch::Matchers::Contains;
using flowdiff::test::make_labels;

namespace {

fd::Tensor<double> mat(fd::Shape s, std::initializer_list<double> v) {
  return fd::Tensor<double>::from(s, v);
}

}  // namespace

TEST_CASE("feature_statistics: mean and unbiased covariance", "[metrics][frechet]") {
  auto x = fd::Tensor<float>::from({3, 2}, {1, 2, 3, 4, 5, 9});
  const auto st = metrics::feature_statistics(x);
  CHECK(st.count == 3);
  CHECK(st.dim() == 2);
  CHECK(st.mean[0] == Approx(3.0));
  CHECK(st.mean[1] == Approx(5.0));
  // deviations x: (-2, 0, 2), y: (-3, -1, 4); divisor N - 1 = 2
  CHECK(st.covariance(0, 0) == Approx(4.0));
  CHECK(st.covariance(1, 1) == Approx(13.0));
  CHECK(st.covariance(0, 1) == Approx(7.0));
  CHECK(st.covariance(1, 0) == Approx(7.0));
}

TEST_CASE("frechet_distance: closed forms", "[metrics][frechet]") {
  SECTION("identical sets give 0 to rounding") {
    fd::Generator gen(1);
    auto a = fd::randn<double>({300, 6}, gen);
    const double d = metrics::frechet_distance(a, a);
    CHECK(d >= 0.0);
    CHECK(d < 1e-10);
    auto af = fd::randn<float>({300, 6}, gen);
    CHECK(metrics::frechet_distance(af, af) < 1e-9);
  }
  SECTION("1-D: (m1 - m2)^2 + (s1 - s2)^2") {
    auto m1 = mat({1}, {0.3}), m2 = mat({1}, {-1.2});
    auto v1 = mat({1, 1}, {4.0}), v2 = mat({1, 1}, {0.25});
    const double d = metrics::frechet_distance(m1, v1, m2, v2);
    CHECK(d == Approx(1.5 * 1.5 + (2.0 - 0.5) * (2.0 - 0.5)).epsilon(1e-12));
  }
  SECTION("commuting (diagonal) covariances: sum of (sqrt a_i - sqrt b_i)^2") {
    auto m1 = mat({3}, {1, 2, 3}), m2 = mat({3}, {1, 0, 3.5});
    auto s1 = mat({3, 3}, {1, 0, 0, 0, 9, 0, 0, 0, 0.04});
    auto s2 = mat({3, 3}, {4, 0, 0, 0, 1, 0, 0, 0, 0.09});
    const double ref = 4.0 + 0.25 + 1.0 + 4.0 + 0.01;
    CHECK(metrics::frechet_distance(m1, s1, m2, s2) == Approx(ref).epsilon(1e-12));
  }
  SECTION("non-commuting 2x2 covariances, by an independent route") {
    // For 2x2 M = S_a S_b (eigenvalues l1, l2 >= 0): tr sqrt(M) = sqrt(l1) + sqrt(l2) =
    // sqrt(tr M + 2 sqrt(det M)), and det M = det S_a det S_b.
    auto m1 = mat({2}, {0.1, -0.2}), m2 = mat({2}, {1.0, 0.5});
    auto s1 = mat({2, 2}, {2.0, 0.5, 0.5, 1.0});
    auto s2 = mat({2, 2}, {1.0, -0.3, -0.3, 0.5});
    const double tr_m = 2.0 * 1.0 + 0.5 * -0.3 + 0.5 * -0.3 + 1.0 * 0.5;  // tr(S_a S_b)
    const double det = (2.0 * 1.0 - 0.25) * (0.5 - 0.09);
    const double tr_sqrt = std::sqrt(tr_m + 2.0 * std::sqrt(det));
    const double ref = 0.81 + 0.49 + 3.0 + 1.5 - 2.0 * tr_sqrt;
    CHECK(metrics::frechet_distance(m1, s1, m2, s2) == Approx(ref).epsilon(1e-12));
    CHECK(metrics::frechet_distance(m2, s2, m1, s1) == Approx(ref).epsilon(1e-12));
  }
  SECTION("symmetric, and invariant under a common rotation and translation") {
    fd::Generator gen(2);
    auto a = fd::randn<double>({400, 3}, gen);
    auto b = fd::randn<double>({250, 3}, gen);
    for (fd::index_t i = 0; i < 400; ++i) a(i, 1) = 2.0 * a(i, 1) + 0.5 * a(i, 0);
    for (fd::index_t i = 0; i < 250; ++i) b(i, 2) = 0.3 * b(i, 2) + 1.0;
    const double d = metrics::frechet_distance(a, b);
    CHECK(d > 0.1);
    CHECK(metrics::frechet_distance(b, a) == Approx(d).epsilon(1e-12));
    // Q: rotation by 0.7 rad in the (0, 1) plane then 1.1 rad in (1, 2); shift c.
    const double c1 = std::cos(0.7), s1 = std::sin(0.7), c2 = std::cos(1.1), s2 = std::sin(1.1);
    const double q[3][3] = {{c1, -s1 * c2, s1 * s2}, {s1, c1 * c2, -c1 * s2}, {0, s2, c2}};
    const double shift[3] = {5.0, -3.0, 0.25};
    auto move = [&](const fd::Tensor<double>& x) {
      fd::Tensor<double> y(x.shape());
      for (fd::index_t i = 0; i < x.dim(0); ++i)
        for (int r = 0; r < 3; ++r) {
          double s = shift[r];
          for (int k = 0; k < 3; ++k) s += q[r][k] * x(i, k);
          y(i, r) = s;
        }
      return y;
    };
    CHECK(metrics::frechet_distance(move(a), move(b)) == Approx(d).epsilon(1e-10));
  }
  SECTION("singular covariances (fewer samples than features) stay finite and >= 0") {
    fd::Generator gen(3);
    auto a = fd::randn<float>({5, 12}, gen);
    auto b = fd::randn<float>({4, 12}, gen);
    const double d = metrics::frechet_distance(a, b);
    CHECK(std::isfinite(d));
    CHECK(d > 0.0);
    CHECK(metrics::frechet_distance(a, a) < 1e-5);
    // The statistics form agrees with the sample form.
    CHECK(metrics::frechet_distance(metrics::feature_statistics(a),
                                    metrics::feature_statistics(b)) == Approx(d));
  }
}

TEST_CASE("frechet_distance: errors name what is wrong", "[metrics][frechet][errors]") {
  fd::Generator gen(4);
  auto a = fd::randn<float>({10, 3}, gen);
  auto b = fd::randn<float>({10, 4}, gen);
  auto one = fd::randn<float>({1, 3}, gen);
  CHECK_THROWS_AS(metrics::frechet_distance(a, b), fd::shape_error);
  CHECK_THROWS_WITH(metrics::frechet_distance(a, b),
                    Contains("the same D, got [10, 3] and [10, 4]"));
  CHECK_THROWS_WITH(metrics::frechet_distance(a, one), Contains("N >= 2 and D >= 1, got [1, 3]"));
  a(4, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(metrics::feature_statistics(a), fd::numeric_error);
  CHECK_THROWS_WITH(metrics::feature_statistics(a), Contains("x[4, 1] is not finite"));
  auto mu = mat({2}, {0, 0});
  auto s = mat({2, 2}, {1, 0, 0, 1});
  auto s3 = mat({3, 3}, {1, 0, 0, 0, 1, 0, 0, 0, 1});
  auto mu3 = mat({3}, {0, 0, 0});
  CHECK_THROWS_WITH(metrics::frechet_distance(mu, s3, mu, s),
                    Contains("S_a: expected shape [2, 2] (D = 2 from mu_a), got [3, 3]"));
  CHECK_THROWS_WITH(metrics::frechet_distance(mu, s, mu3, s3), Contains("have 2 and 3 features"));
  auto snan = mat({2, 2}, {1, 0, 0, std::nan("")});
  CHECK_THROWS_AS(metrics::frechet_distance(mu, s, mu, snan), fd::numeric_error);
  CHECK_THROWS_WITH(metrics::frechet_distance(mu, s, mu, snan),
                    Contains("S_b[1, 1] is not finite"));
}

TEST_CASE("agreement and predict: counting argmax against labels", "[metrics][agreement]") {
  // argmax rows: 2, 0, 1, 1 (tie between 1 and 2 -> the first), 0
  auto z = fd::Tensor<float>::from({5, 3}, {0, 1, 5,  //
                                            3, 1, 2,  //
                                            0, 4, 1,  //
                                            0, 2, 2,  //
                                            9, 0, 0});
  auto y = make_labels({2, 0, 0, 1, 1});
  const auto a = metrics::agreement<float>(z, y);
  CHECK(a.total == 5);
  CHECK(a.correct == 3);
  CHECK(a.rate() == Approx(0.6));
  CHECK(a.class_total == std::vector<fd::index_t>{2, 2, 1});
  CHECK(a.class_correct == std::vector<fd::index_t>{1, 1, 1});
  CHECK(a.class_rate(0) == Approx(0.5));
  CHECK(a.class_rate(2) == Approx(1.0));
  fd::Tensor<fd::label_t> p({5});
  metrics::predict<float>(z, p);
  CHECK(p.to_vector() == std::vector<fd::label_t>{2, 0, 1, 1, 0});

  auto y0 = make_labels({0, 0, 0, 0, 0});
  const auto b = metrics::agreement<float>(z, y0);
  CHECK(std::isnan(b.class_rate(1)));  // no samples of class 1
  auto merged = a;
  merged.merge(b);
  CHECK(merged.total == 10);
  CHECK(merged.correct == 5);

  CHECK_THROWS_WITH(metrics::agreement<float>(z, make_labels({0, 1, 3, 0, 0})),
                    Contains("labels[2] = 3 is outside [0, 3)"));
  CHECK_THROWS_AS(metrics::agreement<float>(z, make_labels({0, 1})), fd::shape_error);
  CHECK_THROWS_AS(a.class_rate(3), fd::config_error);
  z(1, 1) = std::nanf("");
  CHECK_THROWS_WITH(metrics::agreement<float>(z, y), Contains("logits[1, 1] is not finite"));
}

TEST_CASE("ClassifierEvaluator: fixed batches with a padded tail equal one forward",
          "[metrics][classifier]") {
  fd::Generator gen(6);
  nn::Parameters<float> ps;
  nn::ConvClassifier<float> net(
      ps, {.channels = {4, 8}, .feature_dim = 5, .num_classes = 3, .groups = 2});
  ps.allocate();
  net.init(ps, gen);
  const fd::index_t n = 7;
  auto x = fd::randn<float>({n, 1, 8, 8}, gen);
  fd::Tensor<float> ref({n, 3});
  nn::ConvClassifier<float>::Cache cache;
  net.forward(ps, x, {}, ref, cache);
  const auto ref_f = net.features(cache);

  metrics::ClassifierEvaluator<float> eval(net, ps, /*batch=*/3);
  fd::Tensor<float> z({n, 3}), f({n, 5});
  eval.run(x, {}, z, f);
  const float* buf = eval.cache().a[0].data();
  CHECK(eval.cache().in_shape == fd::Shape{3, 1, 8, 8});
  for (fd::index_t i = 0; i < z.numel(); ++i) CHECK(z[i] == Approx(ref[i]).margin(1e-5));
  for (fd::index_t i = 0; i < f.numel(); ++i) CHECK(f[i] == Approx(ref_f[i]).margin(1e-5));
  eval.run(x, {}, z, {});
  CHECK(eval.cache().a[0].data() == buf);  // same buffers: nothing re-allocated

  auto y = fd::Tensor<fd::label_t>({n});
  fd::Tensor<fd::label_t> pred({n});
  metrics::predict<float>(ref, pred);
  for (fd::index_t i = 0; i < n; ++i) y[i] = pred[i];
  y[0] = (y[0] + 1) % 3;  // one disagreement
  const auto a = eval.agreement(x, y);
  CHECK(a.total == n);
  CHECK(a.correct == n - 1);

  const auto st = eval.feature_statistics(x);
  const auto st_ref = metrics::feature_statistics(ref_f);
  for (fd::index_t i = 0; i < 5; ++i) CHECK(st.mean[i] == Approx(st_ref.mean[i]).margin(1e-6));
  CHECK(eval.frechet_to(x, st_ref) < 1e-6);
  CHECK_THROWS_WITH(eval.run(x, {}, fd::Tensor<float>({n, 4}), {}),
                    Contains("logits: expected [7, 3], got [7, 4]"));
  CHECK_THROWS_AS(metrics::ClassifierEvaluator<float>(net, ps, 0), fd::config_error);
}
