// The softmax cross-entropy (nn/layers/cross_entropy.hpp), the convolutional classifier
// (nn/models/classifier.hpp) and its training / caching (metrics/classifier_metrics.hpp):
// central-difference gradient checks in double, PyTorch parity in fp32 against
// tests/fixtures/classifier.safetensors (tools/fixtures/classifier.py; weights loaded strictly by
// state_dict name), ∇_x log p(y | x), checkpoint round trip, and the load-or-train logic with its
// accuracy bar on a small synthetic data set (never the real one: that belongs to the example).
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/cross_entropy.hpp>
#include <flowdiff/nn/models/classifier.hpp>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "support/compare.hpp"
#include "support/files.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace metrics = flowdiff::metrics;
using Catch::Matchers::Contains;

namespace {

using flowdiff::test::make_labels;
using flowdiff::test::make_times;
using flowdiff::test::max_abs_diff;
using flowdiff::test::nmse;

std::filesystem::path classifier_fixture() {
  return flowdiff::test::fixture_path("classifier.safetensors");
}

std::filesystem::path scratch_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("flowdiff_test_classifier_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// A two-class toy image set a small classifier learns in a few steps: class 0 has horizontal
// stripes (rows alternate +-1), class 1 vertical ones, plus noise. labels_random scrambles the
// labels (nothing can be learned, so accuracy stays near 1/2).
void toy_images(fd::index_t n, fd::Generator& gen, fd::Tensor<float>& x, fd::Tensor<fd::label_t>& y,
                bool labels_random = false) {
  x = fd::randn<float>({n, 1, 8, 8}, gen);
  fd::scale(x, 0.3f);
  y = fd::Tensor<fd::label_t>(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) {
    const int c = static_cast<int>(i % 2);
    for (fd::index_t r = 0; r < 8; ++r)
      for (fd::index_t col = 0; col < 8; ++col)
        x(i, 0, r, col) += ((c == 0 ? r : col) % 2 == 0) ? 1.0f : -1.0f;
    y[i] = labels_random ? static_cast<fd::label_t>(gen.uniform_int(2)) : c;
  }
}

nn::ConvClassifierConfig small_config(fd::index_t in_channels, std::vector<fd::index_t> channels,
                                      fd::index_t feature_dim, fd::index_t num_classes,
                                      fd::index_t groups, fd::index_t time_dim,
                                      fd::index_t image_size = 0) {
  nn::ConvClassifierConfig c;
  c.in_channels = in_channels;
  c.channels = std::move(channels);
  c.feature_dim = feature_dim;
  c.num_classes = num_classes;
  c.groups = groups;
  c.time_dim = time_dim;
  c.image_size = image_size;
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy
// ---------------------------------------------------------------------------------------------

TEST_CASE("SoftmaxCrossEntropy: gradient matches central differences (double)",
          "[nn][cross_entropy][gradcheck]") {
  fd::Generator gen(5);
  auto z = fd::randn<double>({6, 4}, gen);
  fd::scale(z, 2.0);
  auto y = make_labels({0, 3, 1, 1, 2, 3});
  fd::Tensor<double> loss({1}), dz({6, 4});
  nn::SoftmaxCrossEntropy<double> ce;
  nn::SoftmaxCrossEntropy<double>::Cache cache;
  auto rep = nn::gradcheck(
      {{"logits", z.view(), dz.view()}}, nullptr, {loss.view()},
      [&] { loss[0] = ce.forward(z, y, cache); },
      [&](const auto& dy) { ce.backward(dz, cache, dy[0][0]); }, gen);
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN("cross-entropy gradcheck: " << rep.summary());
}

TEST_CASE("SoftmaxCrossEntropy: matches F.cross_entropy and stays finite for large logits",
          "[nn][cross_entropy][parity]") {
  REQUIRE(std::filesystem::exists(classifier_fixture()));
  const auto file = fd::io::SafetensorsFile::read(classifier_fixture());
  const auto z = file.tensor<float>("ce.logits");
  const auto y = file.tensor<fd::label_t>("ce.labels");
  const double ref = file.tensor<double>("ce.loss")[0];
  nn::SoftmaxCrossEntropy<float> ce;
  nn::SoftmaxCrossEntropy<float>::Cache cache;
  const double loss = ce.forward(z, y, cache);
  CHECK(std::abs(loss - ref) <= 1e-6 + 1e-5 * std::abs(ref));
  fd::Tensor<float> dz(z.shape());
  ce.backward(dz, cache);
  const double e = nmse(dz, file.tensor<float>("ce.dlogits"));
  CHECK(e <= 1e-7);
  WARN("cross-entropy parity: loss " << loss << " vs " << ref << ", dlogits NMSE " << e);

  // Log-probabilities: rows sum to one in probability, are <= 0, and the large row (entries of
  // 80) keeps full precision: log p = [-log 2, -1 - log 2, ~-160, -80 - log 2, -log 2] roughly.
  const auto lp = nn::SoftmaxCrossEntropy<float>::log_probs(cache);
  for (fd::index_t r = 0; r < lp.dim(0); ++r) {
    double s = 0;
    for (fd::index_t k = 0; k < lp.dim(1); ++k) {
      CHECK(lp(r, k) <= 0.0f);
      s += std::exp(double(lp(r, k)));
    }
    CHECK(s == Approx(1.0).epsilon(1e-6));
  }
  const double l0 = -std::log(2.0 + std::exp(-1.0) + std::exp(-80.0) + std::exp(-160.0));
  CHECK(lp(2, 0) == Approx(l0).epsilon(1e-6));
  CHECK(lp(2, 1) == Approx(l0 - 1.0).epsilon(1e-6));

  // Scaling: backward(scale) = scale * backward(1).
  fd::Tensor<float> dz3(z.shape());
  ce.backward(dz3, cache, 3.0f);
  for (fd::index_t i = 0; i < dz.numel(); ++i) CHECK(dz3[i] == Approx(3.0f * dz[i]));

  // Logits of 1e4 in float: no overflow.
  auto big = fd::Tensor<float>::from({1, 3}, {1e4f, -1e4f, 1e4f - 2.0f});
  auto yb = make_labels({2});
  const double lb = ce.forward(big, yb, cache);
  CHECK(lb == Approx(2.0 + std::log1p(std::exp(-2.0))).epsilon(1e-6));
}

TEST_CASE("SoftmaxCrossEntropy and log_softmax: errors name what is wrong",
          "[nn][cross_entropy][errors]") {
  nn::SoftmaxCrossEntropy<float> ce;
  nn::SoftmaxCrossEntropy<float>::Cache cache;
  auto z = fd::Tensor<float>::zeros({3, 4});
  fd::Tensor<float> dz({3, 4});
  CHECK_THROWS_WITH(ce.backward(dz, cache), Contains("backward() needs the cache"));
  CHECK_THROWS_AS(ce.forward(z, make_labels({0, 4, 1}), cache), fd::config_error);
  CHECK_THROWS_WITH(ce.forward(z, make_labels({0, 4, 1}), cache),
                    Contains("labels[1] = 4 is outside [0, 4)"));
  CHECK_THROWS_WITH(ce.forward(z, make_labels({0, -1, 1}), cache), Contains("labels[1] = -1"));
  CHECK_THROWS_AS(ce.forward(z, make_labels({0, 1}), cache), fd::shape_error);
  CHECK_THROWS_WITH(ce.forward(z, make_labels({0, 1}), cache),
                    Contains("labels: expected shape [3], got [2]"));
  auto flat = fd::Tensor<float>::zeros({4});
  CHECK_THROWS_WITH(ce.forward(flat, make_labels({0, 1, 2, 3}), cache),
                    Contains("logits: expected shape [N, K]"));
  z(1, 2) = std::nanf("");
  CHECK_THROWS_AS(ce.forward(z, make_labels({0, 1, 2}), cache), fd::numeric_error);
  CHECK_THROWS_WITH(ce.forward(z, make_labels({0, 1, 2}), cache),
                    Contains("logits[1, 2] is not finite"));
  z(1, 2) = 0.0f;
  ce.forward(z, make_labels({0, 1, 2}), cache);
  fd::Tensor<float> wrong({3, 5});
  CHECK_THROWS_WITH(ce.backward(wrong, cache), Contains("dlogits: expected shape [3, 4]"));
  fd::Tensor<float> out({3, 5});
  CHECK_THROWS_AS(nn::log_softmax<float>(z, out), fd::shape_error);
}

// ---------------------------------------------------------------------------------------------
// ConvClassifier
// ---------------------------------------------------------------------------------------------

TEST_CASE("ConvClassifier: parameter names follow the torch module", "[nn][classifier]") {
  nn::Parameters<float> ps;
  nn::ConvClassifier<float> net(ps, {.in_channels = 1,
                                     .channels = {4, 8},
                                     .feature_dim = 6,
                                     .num_classes = 3,
                                     .groups = 2,
                                     .time_dim = 6});
  const std::vector<std::string> names = {"blocks.0.conv.weight",
                                          "blocks.0.conv.bias",
                                          "blocks.0.norm.weight",
                                          "blocks.0.norm.bias",
                                          "blocks.0.time.weight",
                                          "blocks.0.time.bias",
                                          "blocks.1.conv.weight",
                                          "blocks.1.conv.bias",
                                          "blocks.1.norm.weight",
                                          "blocks.1.norm.bias",
                                          "blocks.1.time.weight",
                                          "blocks.1.time.bias",
                                          "fc.weight",
                                          "fc.bias",
                                          "head.weight",
                                          "head.bias"};
  REQUIRE(ps.count() == static_cast<fd::index_t>(names.size()));
  for (fd::index_t i = 0; i < ps.count(); ++i) CHECK(ps.info(i).name == names[std::size_t(i)]);
  CHECK(ps.info(6).shape == fd::Shape{8, 4, 3, 3});
  CHECK(ps.info(10).shape == fd::Shape{8, 6});
  CHECK(ps.info(12).shape == fd::Shape{6, 8});
  CHECK(ps.info(14).shape == fd::Shape{3, 6});
}

TEST_CASE("ConvClassifier: gradients w.r.t. x and every parameter match central differences",
          "[nn][classifier][gradcheck]") {
  struct Case {
    nn::ConvClassifierConfig cfg;
    fd::Shape x;
    double h = 1e-6;
  };
  // Built field by field: brace-initialising a vector of these trips a g++ 12
  // -Wmaybe-uninitialized false positive.
  std::vector<Case> cases(3);
  cases[0].cfg = small_config(1, {4, 4}, 5, 3, 2, 0);
  cases[0].x = fd::Shape{2, 1, 7, 5};
  cases[1].cfg = small_config(2, {2, 4, 4}, 3, 4, 0, 4);
  cases[1].x = fd::Shape{2, 2, 8, 8};
  // Its input gradient is ~1e-4 of the loss: a larger step keeps rounding (eps |L| / h) below it.
  cases[1].h = 1e-5;
  // Groups of two channels: with one channel per group the norm would cancel the conv bias
  // exactly (a zero gradient has no relative error to check).
  cases[2].cfg = small_config(1, {2, 4}, 3, 3, 1, 0, 9);  // 9 -> 4 -> 2, flattened
  cases[2].x = fd::Shape{2, 1, 9, 9};
  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    INFO("case " << ci);
    const auto& c = cases[ci];
    fd::Generator gen(100 + ci);
    nn::Parameters<double> ps;
    nn::ConvClassifier<double> net(ps, c.cfg);
    ps.allocate();
    net.init(ps, gen);
    // Non-trivial norm affine parameters, so their gradients are tested at a generic point.
    for (fd::index_t id = 0; id < ps.count(); ++id)
      if (ps.info(id).name.find(".norm.") != std::string::npos)
        fd::fill_uniform(ps.param(id), gen, 0.5, 1.5);
    auto x = fd::randn<double>(c.x, gen);
    auto t = c.cfg.time_dim > 0 ? make_times<double>({0.25, 0.9}) : fd::Tensor<double>();
    fd::Tensor<double> logits({c.x[0], c.cfg.num_classes}), dx(c.x);
    nn::ConvClassifier<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {logits.view()},
        [&] { net.forward(ps, x, t, logits, cache); },
        [&](const auto& dy) { net.backward(ps, dy[0], dx, cache); }, gen, {.h = c.h});
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("classifier gradcheck case " << ci << ": " << rep.summary());

    // Skipping dx leaves the parameter gradients bit-identical.
    auto dl = fd::randn<double>({c.x[0], c.cfg.num_classes}, gen);
    ps.zero_grad();
    net.forward(ps, x, t, logits, cache);
    net.backward(ps, dl, dx, cache);
    const auto with_dx = ps.flat_grads().span();
    const std::vector<double> a(with_dx.begin(), with_dx.end());
    ps.zero_grad();
    net.backward(ps, dl, {}, cache);
    const auto without = ps.flat_grads().span();
    CHECK(std::vector<double>(without.begin(), without.end()) == a);
  }
}

TEST_CASE("ConvClassifier: matches PyTorch (fp32 fixture), including grad log p(y | x)",
          "[nn][classifier][parity]") {
  REQUIRE(std::filesystem::exists(classifier_fixture()));
  const auto file = fd::io::SafetensorsFile::read(classifier_fixture());
  struct Case {
    std::string name;
    nn::ConvClassifierConfig cfg;
  };
  std::vector<Case> cases(3);
  cases[0].name = "plain";
  cases[0].cfg = small_config(1, {4, 8}, 6, 3, 2, 0);
  cases[1].name = "time";
  cases[1].cfg = small_config(2, {4, 8, 8}, 5, 4, 0, 6);
  cases[2].name = "flat";
  cases[2].cfg = small_config(1, {4, 8}, 6, 3, 2, 0, 10);
  double worst = 0;
  std::string worst_name;
  for (const auto& c : cases) {
    INFO(c.name);
    nn::Parameters<float> ps;
    nn::ConvClassifier<float> net(ps, c.cfg);
    ps.allocate();
    const auto report =
        nn::load_parameters(ps, file, {.strict = false, .prefix = c.name + ".model."});
    CHECK(report.missing.empty());
    const auto x = file.tensor<float>(c.name + ".x");
    const auto t = c.cfg.time_dim > 0 ? file.tensor<float>(c.name + ".t") : fd::Tensor<float>();
    const auto y = file.tensor<fd::label_t>(c.name + ".y");
    const auto dlogits = file.tensor<float>(c.name + ".dlogits");
    fd::Tensor<float> logits({x.dim(0), c.cfg.num_classes}), dx(x.shape());
    nn::ConvClassifier<float>::Cache cache;
    net.forward(ps, x, t, logits, cache);
    ps.zero_grad();
    auto cmp = [&](const std::string& name, fd::View<const float> a) {
      INFO(name);
      const double e = nmse(a, file.tensor<float>(c.name + "." + name));
      CHECK(e <= 1e-7);
      if (e >= worst) {
        worst = e;
        worst_name = c.name + "." + name;
      }
    };
    cmp("logits", logits);
    cmp("features", net.features(cache));
    net.backward(ps, dlogits, dx, cache);
    cmp("dx", dx);
    for (fd::index_t id = 0; id < ps.count(); ++id) cmp("grad." + ps.info(id).name, ps.grad(id));

    // ∇_x log p(y | x), and log p(y | x) itself against log_softmax of the logits.
    fd::Tensor<float> g(x.shape()), lp({x.dim(0)}), zs, dzs;
    nn::classifier_log_prob_grad(net, ps, x, t, y, g.view(), lp.view(), cache, zs, dzs);
    cmp("logp_grad", g);
    fd::Tensor<float> ls(logits.shape());
    nn::log_softmax<float>(logits, ls);
    for (fd::index_t i = 0; i < x.dim(0); ++i) CHECK(lp[i] == Approx(ls(i, y[i])).epsilon(1e-6));
  }
  WARN("classifier PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}

TEST_CASE("ConvClassifier: cache reuse, batch independence and errors", "[nn][classifier]") {
  fd::Generator gen(9);
  nn::Parameters<float> ps;
  nn::ConvClassifier<float> net(
      ps, {.in_channels = 1, .channels = {4, 8}, .feature_dim = 6, .num_classes = 3, .groups = 2});
  ps.allocate();
  net.init(ps, gen);
  auto x = fd::randn<float>({4, 1, 8, 8}, gen);
  fd::Tensor<float> z({4, 3}), z2({4, 3}), z1({1, 3});
  nn::ConvClassifier<float>::Cache cache, cache1;
  net.forward(ps, x, {}, z, cache);
  const float* a0 = cache.a[0].data();
  net.forward(ps, x, {}, z2, cache);
  CHECK(cache.a[0].data() == a0);
  CHECK(max_abs_diff(z, z2) == 0);
  // A sample's logits do not depend on the rest of its batch.
  net.forward(ps, x.view().rows(2, 3), {}, z1, cache1);
  for (int k = 0; k < 3; ++k) CHECK(z1(0, k) == Approx(z(2, k)).margin(1e-6));

  fd::Tensor<float> dz({4, 3}), dx({4, 1, 8, 8});
  nn::ConvClassifier<float>::Cache fresh;
  CHECK_THROWS_WITH(net.backward(ps, dz, dx, fresh), Contains("backward() needs the cache"));
  CHECK_THROWS_WITH(net.features(fresh), Contains("features() needs the cache"));
  auto bad = fd::randn<float>({4, 2, 8, 8}, gen);
  CHECK_THROWS_AS(net.forward(ps, bad, {}, z, cache), fd::shape_error);
  CHECK_THROWS_WITH(net.forward(ps, bad, {}, z, cache),
                    Contains("ConvClassifier: x: expected shape [N, 1, H, W] with N >= 1 and H, "
                             "W >= 2, got [4, 2, 8, 8]"));
  auto tiny = fd::randn<float>({4, 1, 1, 8}, gen);
  CHECK_THROWS_AS(net.forward(ps, tiny, {}, z, cache), fd::shape_error);
  fd::Tensor<float> zbad({4, 4});
  CHECK_THROWS_WITH(net.forward(ps, x, {}, zbad, cache),
                    Contains("logits: expected shape [4, 3], got [4, 4]"));
  auto t = make_times<float>({0.1, 0.2, 0.3, 0.4});
  CHECK_THROWS_AS(net.forward(ps, x, t, z, cache), fd::config_error);
  CHECK_THROWS_WITH(net.forward(ps, x, t, z, cache), Contains("no time input"));
  net.forward(ps, x, {}, z, cache);
  fd::Tensor<float> dzbad({3, 3}), dxbad({4, 1, 8, 7});
  CHECK_THROWS_WITH(net.backward(ps, dzbad, dx, cache), Contains("dlogits: expected shape [4, 3]"));
  CHECK_THROWS_WITH(net.backward(ps, dz, dxbad, cache),
                    Contains("dx: expected shape [4, 1, 8, 8]"));

  // A time-conditioned model needs t.
  nn::Parameters<float> pt;
  nn::ConvClassifier<float> timed(
      pt, {.channels = {4}, .feature_dim = 4, .num_classes = 2, .groups = 0, .time_dim = 4});
  pt.allocate();
  fd::Tensor<float> zt({4, 2});
  nn::ConvClassifier<float>::Cache ct;
  CHECK_THROWS_WITH(timed.forward(pt, x, {}, zt, ct), Contains("t: expected shape [4], got [0]"));

  // Bad configurations.
  nn::Parameters<float> pc;
  CHECK_THROWS_AS(nn::ConvClassifier<float>(pc, {.channels = {}}), fd::config_error);
  CHECK_THROWS_WITH(nn::ConvClassifier<float>(pc, {.channels = {6, 8}, .groups = 4}),
                    Contains("channel count 6 must be >= 1 and a multiple of groups = 4"));
  CHECK_THROWS_AS(nn::ConvClassifier<float>(pc, {.num_classes = 1}), fd::config_error);
  CHECK_THROWS_AS(nn::ConvClassifier<float>(pc, {.time_dim = 1}), fd::config_error);
}

TEST_CASE("ConvClassifier: checkpoint round trip gives identical logits", "[nn][classifier]") {
  const auto dir = scratch_dir("roundtrip");
  fd::Generator gen(21);
  const nn::ConvClassifierConfig cfg{
      .channels = {4, 8}, .feature_dim = 6, .num_classes = 3, .groups = 0};
  nn::Parameters<float> ps;
  nn::ConvClassifier<float> net(ps, cfg);
  ps.allocate();
  net.init(ps, gen);
  nn::save_parameters(ps, dir / "c.safetensors");
  nn::Parameters<float> ps2;
  nn::ConvClassifier<float> net2(ps2, cfg);
  ps2.allocate();
  nn::load_parameters(ps2, dir / "c.safetensors", {.strict = true});
  auto x = fd::randn<float>({3, 1, 8, 8}, gen);
  fd::Tensor<float> a({3, 3}), b({3, 3});
  nn::ConvClassifier<float>::Cache c1, c2;
  net.forward(ps, x, {}, a, c1);
  net2.forward(ps2, x, {}, b, c2);
  CHECK(max_abs_diff(a, b) == 0);
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Training, caching and the accuracy bar
// ---------------------------------------------------------------------------------------------

TEST_CASE(
    "load_or_train_classifier: trains, enforces the bar, caches, reloads, retrains on a "
    "bad cache",
    "[metrics][classifier][train]") {
  const auto dir = scratch_dir("train");
  const auto path = dir / "clf.safetensors";
  fd::Generator gen(31);
  fd::Tensor<float> xtr, xte;
  fd::Tensor<fd::label_t> ytr, yte;
  toy_images(160, gen, xtr, ytr);
  toy_images(60, gen, xte, yte);
  const nn::ConvClassifierConfig cfg{
      .channels = {4, 8}, .feature_dim = 8, .num_classes = 2, .groups = 0};
  std::ostringstream log;
  metrics::ClassifierTrainOptions o;
  o.epochs = 3;
  o.batch = 16;
  o.lr = 1e-2;
  o.warmup_steps = 5;
  o.log_every = 10;
  o.eval_batch = 25;
  o.log = &log;

  {
    nn::Parameters<float> ps;
    nn::ConvClassifier<float> net(ps, cfg);
    ps.allocate();
    const auto rep =
        metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen);
    INFO(log.str());
    CHECK_FALSE(rep.loaded);
    CHECK(rep.steps == 30);
    CHECK(rep.test_accuracy >= 0.9);
    CHECK(rep.test.total == 60);
    CHECK(rep.test.class_total[0] == 30);
    CHECK(std::filesystem::exists(path));
    CHECK_THAT(log.str(), Contains("classifier: epoch 3/3 step 30/30 loss"));
    CHECK_THAT(log.str(), Contains("test accuracy"));
    const auto file = fd::io::SafetensorsFile::read(path);
    CHECK_THAT(file.metadata().at("flowdiff.classifier"),
               Contains("channels=4,8 feature_dim=8 num_classes=2 groups=0 time_dim=0 "
                        "image_size=0 image=8x8"));
  }
  {  // Reload: same accuracy, nothing trained, the generator untouched.
    log.str("");
    nn::Parameters<float> ps;
    nn::ConvClassifier<float> net(ps, cfg);
    ps.allocate();
    const auto offset = gen.offset();
    const auto rep =
        metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen);
    CHECK(rep.loaded);
    CHECK(rep.steps == 0);
    CHECK(rep.test_accuracy >= 0.9);
    CHECK(gen.offset() == offset);
    CHECK_THAT(log.str(), Contains("classifier: loaded"));
  }
  {  // Another architecture (or geometry) does not reuse the cache: it retrains and replaces it.
    log.str("");
    const nn::ConvClassifierConfig cfg2{
        .channels = {4, 4}, .feature_dim = 8, .num_classes = 2, .groups = 0};
    nn::Parameters<float> ps;
    nn::ConvClassifier<float> net(ps, cfg2);
    ps.allocate();
    const auto rep =
        metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen);
    CHECK_FALSE(rep.loaded);
    CHECK_THAT(log.str(), Contains("cannot use the cache"));
    CHECK_THAT(log.str(), Contains("channels=4,4"));
  }
  {  // A corrupt file: reported and replaced.
    log.str("");
    { std::ofstream(path, std::ios::binary) << "not a safetensors file"; }
    nn::Parameters<float> ps;
    nn::ConvClassifier<float> net(ps, cfg);
    ps.allocate();
    const auto rep =
        metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen);
    CHECK_FALSE(rep.loaded);
    CHECK_THAT(log.str(), Contains("cannot use the cache"));
    CHECK(fd::io::SafetensorsFile::read(path).contains("head.weight"));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "load_or_train_classifier: below the bar is an error and nothing is cached; the bar "
    "can be skipped",
    "[metrics][classifier][train]") {
  const auto dir = scratch_dir("bar");
  const auto path = dir / "clf.safetensors";
  fd::Generator gen(41);
  fd::Tensor<float> xtr, xte;
  fd::Tensor<fd::label_t> ytr, yte;
  toy_images(64, gen, xtr, ytr, /*labels_random=*/true);
  toy_images(40, gen, xte, yte, /*labels_random=*/true);
  const nn::ConvClassifierConfig cfg{
      .channels = {4}, .feature_dim = 4, .num_classes = 2, .groups = 0};
  std::ostringstream log;
  metrics::ClassifierTrainOptions o;
  o.epochs = 1;
  o.batch = 16;
  o.log = &log;
  nn::Parameters<float> ps;
  nn::ConvClassifier<float> net(ps, cfg);
  ps.allocate();
  // Random labels cannot be learned; an impossible bar makes the outcome certain either way.
  o.min_accuracy = 1.01;
  CHECK_THROWS_AS(
      metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen),
      fd::config_error);
  CHECK_THROWS_WITH(
      metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen),
      Contains("is below the required 101.00%; the classifier is not cached"));
  CHECK_FALSE(std::filesystem::exists(path));

  // Skipping the bar (tiny runs): no error, nothing cached.
  o.require_accuracy = false;
  const auto rep =
      metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen);
  CHECK(std::isfinite(rep.test_accuracy));
  CHECK_FALSE(std::filesystem::exists(path));

  // A cache that no longer clears the bar is retrained (here: fails again, so it is kept out).
  o.require_accuracy = true;
  o.min_accuracy = 0.9;
  nn::save_parameters(ps, path,
                      {{"flowdiff.classifier",
                        "ConvClassifier in_channels=1 channels=4 feature_dim=4 num_classes=2 "
                        "groups=0 time_dim=0 image_size=0 image=8x8"}});
  log.str("");
  o.epochs = 1;
  CHECK_THROWS_AS(
      metrics::load_or_train_classifier<float>(path, net, ps, xtr, ytr, xte, yte, o, gen),
      fd::config_error);
  CHECK_THAT(log.str(), Contains("reaches only"));

  // Bad arguments.
  o.epochs = 0;
  CHECK_THROWS_WITH(metrics::train_classifier<float>(net, ps, xtr, ytr, xte, yte, o, gen),
                    Contains("need epochs >= 1"));
  o.epochs = 1;
  auto ybad = make_labels(std::vector<fd::label_t>(64, 2));
  CHECK_THROWS_WITH(metrics::train_classifier<float>(net, ps, xtr, ybad, xte, yte, o, gen),
                    Contains("train labels[0] = 2 is outside [0, 2)"));
  std::filesystem::remove_all(dir);
}
