// The MLP vector field (nn/models/mlp.hpp) and the model-as-field adapter (nn/as_field.hpp):
// whole-model finite-difference gradient checks in double (w.r.t. x and every parameter,
// conditional and unconditional), PyTorch parity in fp32 against tests/fixtures/mlp.safetensors
// (tools/fixtures/mlp.py; weights loaded strictly by state_dict name), cache reuse, sampling with
// integrate(Heun) through as_field, classifier-free guidance on the 2N batch, and error messages.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/models/mlp.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <string>
#include <vector>

#include "support/compare.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

using flowdiff::test::make_labels;
using flowdiff::test::make_times;
using flowdiff::test::max_abs_diff;
using flowdiff::test::nmse;

}  // namespace

TEST_CASE("MLP: parameter names and shapes follow nn.Sequential", "[nn][mlp]") {
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 32, .depth = 3, .time_dim = 16, .num_classes = 3});
  const std::vector<std::string> names = {"net.0.weight", "net.0.bias",   "net.2.weight",
                                          "net.2.bias",   "net.4.weight", "net.4.bias",
                                          "net.6.weight", "net.6.bias",   "label_emb.weight"};
  REQUIRE(ps.count() == static_cast<fd::index_t>(names.size()));
  for (fd::index_t i = 0; i < ps.count(); ++i) CHECK(ps.info(i).name == names[std::size_t(i)]);
  CHECK(ps.info(0).shape == fd::Shape{32, 18});
  CHECK(ps.info(6).shape == fd::Shape{2, 32});
  CHECK(ps.info(8).shape == fd::Shape{4, 16});
}

TEST_CASE("MLP: gradients w.r.t. x and every parameter match central differences",
          "[nn][mlp][gradcheck]") {
  for (fd::index_t num_classes : {fd::index_t{0}, fd::index_t{4}}) {
    INFO("num_classes = " << num_classes);
    fd::Generator gen(11 + static_cast<std::uint64_t>(num_classes));
    nn::Parameters<double> ps;
    nn::MLP<double> mlp(
        ps, {.dim = 3, .width = 8, .depth = 2, .time_dim = 6, .num_classes = num_classes});
    ps.allocate();
    mlp.init(ps, gen);
    const fd::index_t n = 5;
    auto x = fd::randn<double>({n, 3}, gen);
    auto t = make_times<double>({0.0, 0.21, 0.5, 0.83, 1.0});
    auto y = num_classes > 0 ? make_labels({0, 3, 4, 3, 1}) : fd::Tensor<fd::label_t>();
    fd::Tensor<double> out({n, 3}), dx({n, 3});
    nn::MLP<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {out.view()},
        [&] { mlp.forward(ps, x, t, y, out, cache); },
        [&](const auto& dy) { mlp.backward(ps, dy[0], dx, cache); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN(rep.summary());

    // Skipping dx leaves the parameter gradients as they were.
    fd::Tensor<double> dout = fd::randn<double>({n, 3}, gen);
    ps.zero_grad();
    mlp.forward(ps, x, t, y, out, cache);
    mlp.backward(ps, dout, dx, cache);
    const auto with_dx = std::vector<double>(ps.flat_grads().data(),
                                             ps.flat_grads().data() + ps.flat_grads().numel());
    ps.zero_grad();
    mlp.backward(ps, dout, {}, cache);
    CHECK(std::vector<double>(ps.flat_grads().data(),
                              ps.flat_grads().data() + ps.flat_grads().numel()) == with_dx);
  }
}

TEST_CASE("MLP: matches PyTorch (fp32 fixture) and loads its state_dict strictly",
          "[nn][mlp][parity]") {
  const auto path = std::filesystem::path(__FILE__).parent_path() / "fixtures" / "mlp.safetensors";
  REQUIRE(std::filesystem::exists(path));
  const auto file = fd::io::SafetensorsFile::read(path);
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 32, .depth = 3, .time_dim = 16, .num_classes = 3});
  ps.allocate();
  const auto report = nn::load_parameters(ps, file, {.strict = true, .prefix = "model."});
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());

  const auto x = file.tensor<float>("x");
  const auto t = file.tensor<float>("t");
  const auto y = file.tensor<fd::label_t>("y");
  const auto dout = file.tensor<float>("dout");
  fd::Tensor<float> out(x.shape()), dx(x.shape());
  nn::MLP<float>::Cache cache;
  mlp.forward(ps, x, t, y, out, cache);
  ps.zero_grad();
  mlp.backward(ps, dout, dx, cache);

  double worst = 0;
  std::string worst_name;
  auto cmp = [&](const std::string& name, fd::View<const float> a) {
    INFO(name);
    const double e = nmse(a, file.tensor<float>(name));
    CHECK(e <= 1e-7);
    if (e >= worst) {
      worst = e;
      worst_name = name;
    }
  };
  cmp("out", out);
  cmp("dx", dx);
  for (fd::index_t id = 0; id < ps.count(); ++id) cmp("grad." + ps.info(id).name, ps.grad(id));
  WARN("MLP PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}

TEST_CASE("MLP: the cache is sized once and reused while N repeats", "[nn][mlp]") {
  fd::Generator gen(3);
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 16, .depth = 2, .time_dim = 8, .num_classes = 2});
  ps.allocate();
  mlp.init(ps, gen);
  auto x = fd::randn<float>({4, 2}, gen);
  auto t = make_times<float>({0.1, 0.2, 0.3, 0.4});
  auto y = make_labels({0, 1, 2, 1});
  fd::Tensor<float> out({4, 2}), out2({4, 2});
  nn::MLP<float>::Cache cache;
  mlp.forward(ps, x, t, y, out, cache);
  const float* h0 = cache.h0.data();
  const float* a1 = cache.act[1].data();
  mlp.forward(ps, x, t, y, out2, cache);
  CHECK(cache.h0.data() == h0);
  CHECK(cache.act[1].data() == a1);
  CHECK(max_abs_diff(out, out2) == 0);

  // No labels on a conditional model: the null label.
  auto ynull = make_labels({2, 2, 2, 2});
  mlp.forward(ps, x, t, {}, out, cache);
  mlp.forward(ps, x, t, ynull, out2, cache);
  CHECK(max_abs_diff(out, out2) == 0);
}

TEST_CASE("as_field: a Field and ConditionalField that samples with integrate(Heun)",
          "[nn][mlp][as_field]") {
  fd::Generator gen(5);
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 16, .depth = 2, .time_dim = 8, .num_classes = 3});
  ps.allocate();
  mlp.init(ps, gen);
  auto field = nn::as_field(mlp, ps);
  static_assert(fd::Field<decltype(field), float>);
  static_assert(fd::ConditionalField<decltype(field), float>);
  CHECK(field.num_classes() == 3);

  const fd::index_t n = 6;
  auto x0 = fd::randn<float>({n, 2}, gen);
  auto y = make_labels({0, 1, 2, 3, 1, 0});

  // One evaluation equals the model with t broadcast.
  fd::Tensor<float> a({n, 2}), b({n, 2});
  field(x0, a.view(), 0.3f, y);
  auto t03 = make_times<float>(std::vector<double>(n, 0.3f));
  nn::MLP<float>::Cache cache;
  mlp.forward(ps, x0, t03, y, b, cache);
  CHECK(max_abs_diff(a, b) == 0);
  const float* buf = field.cache().h0.data();
  field(x0, a.view(), 0.7f, y);
  CHECK(field.cache().h0.data() == buf);  // reused at the same N

  // Unconditional Heun sampling vs Heun written out with the model.
  auto x = x0.clone();
  const auto grid = fd::uniform_grid<float>(4);
  const auto stats = fd::integrate(fd::Heun{}, field, x, grid);
  CHECK(stats.field_evaluations == 8);
  auto xr = x0.clone();
  fd::Tensor<float> k1({n, 2}), k2({n, 2}), xp({n, 2}), tt({n});
  for (std::size_t i = 0; i + 1 < grid.size(); ++i) {
    const float t = grid[i], h = grid[i + 1] - grid[i];
    fd::fill(tt.view(), t);
    mlp.forward(ps, xr, tt, {}, k1, cache);
    for (fd::index_t j = 0; j < xr.numel(); ++j) xp.data()[j] = xr.data()[j] + h * k1.data()[j];
    fd::fill(tt.view(), t + h);
    mlp.forward(ps, xp, tt, {}, k2, cache);
    const float hh = h / 2;
    for (fd::index_t j = 0; j < xr.numel(); ++j)
      xr.data()[j] = xr.data()[j] + hh * (k1.data()[j] + k2.data()[j]);
  }
  CHECK(max_abs_diff(x, xr) == 0);
  CHECK(max_abs_diff(x, x0) > 0);  // it moved
}

namespace {
// Counts the forward calls and their batch sizes of the wrapped model.
struct CountingMLP {
  using value_type = float;
  using Cache = nn::MLP<float>::Cache;
  const nn::MLP<float>* m;
  mutable std::vector<fd::index_t> calls;
  void forward(const nn::Parameters<float>& ps, fd::View<const float> x, fd::View<const float> t,
               fd::View<const fd::label_t> y, fd::View<float> out, Cache& c) const {
    calls.push_back(x.dim(0));
    m->forward(ps, x, t, y, out, c);
  }
  fd::index_t num_classes() const { return m->num_classes(); }
};
}  // namespace

TEST_CASE("cfg(as_field): one forward of 2N rows, equal to separate evaluations",
          "[nn][mlp][as_field][cfg]") {
  fd::Generator gen(8);
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 16, .depth = 2, .time_dim = 8, .num_classes = 3});
  ps.allocate();
  mlp.init(ps, gen);
  const fd::index_t n = 5;
  auto x = fd::randn<float>({n, 2}, gen);
  auto y = make_labels({0, 1, 2, 1, 0});
  auto ynull = make_labels({3, 3, 3, 3, 3});
  auto tt = make_times<float>(std::vector<double>(n, 0.4f));
  fd::Tensor<float> cond({n, 2}), uncond({n, 2}), out({n, 2});
  nn::MLP<float>::Cache cache;
  mlp.forward(ps, x, tt, y, cond, cache);
  mlp.forward(ps, x, tt, ynull, uncond, cache);

  // w = 1: the conditional field.
  auto g1 = fd::cfg(nn::as_field(mlp, ps), 1.0f);
  g1.set_condition(y);
  g1(x, out.view(), 0.4f);
  CHECK(max_abs_diff(out, cond) == 0);

  // w = 3: one batched evaluation of 2N rows, equal to (1 - w) uncond + w cond.
  CountingMLP counting{&mlp, {}};
  auto g3 = fd::cfg(nn::as_field(counting, ps), 3.0f);
  g3.set_condition(y);
  g3(x, out.view(), 0.4f);
  REQUIRE(counting.calls.size() == 1);
  CHECK(counting.calls[0] == 2 * n);
  fd::Tensor<float> ref({n, 2});
  for (fd::index_t i = 0; i < ref.numel(); ++i)
    ref.data()[i] = -2.0f * uncond.data()[i] + 3.0f * cond.data()[i];
  const double err = max_abs_diff(out, ref);
  CHECK(err <= 1e-5);
  // The adapter's cache saw the 2N batch.
  const auto& c2 = g3.field().cache();
  REQUIRE(c2.n == 2 * n);

  // Sampling through guidance works end to end.
  auto xs = x.clone();
  fd::integrate(fd::Heun{}, g3, xs, fd::uniform_grid<float>(3));
  for (fd::index_t i = 0; i < xs.numel(); ++i) CHECK(std::isfinite(xs.data()[i]));
}

TEST_CASE("MLP: errors name the model, the argument and the shapes", "[nn][mlp][errors]") {
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 0});
  ps.allocate();
  nn::MLP<float>::Cache cache;
  fd::Tensor<float> x({3, 4}), t({3}), out({3, 2}), dout({3, 2});
  CHECK_THROWS_WITH(mlp.forward(ps, x, t, {}, out, cache),
                    Contains("MLP: x: expected shape [N, 2]") && Contains("got [3, 4]"));
  fd::Tensor<float> x2({3, 2}), t2({4});
  CHECK_THROWS_AS(mlp.forward(ps, x2, t2, {}, out, cache), fd::shape_error);
  CHECK_THROWS_WITH(mlp.forward(ps, x2, t2, {}, out, cache),
                    Contains("MLP: t: expected shape [3], got [4]"));
  fd::Tensor<float> out2({3, 3});
  CHECK_THROWS_WITH(mlp.forward(ps, x2, t, {}, out2, cache),
                    Contains("MLP: out: expected shape [3, 2], got [3, 3]"));
  auto y = make_labels({0, 0, 0});
  CHECK_THROWS_WITH(mlp.forward(ps, x2, t, y, out, cache), Contains("unconditional"));
  CHECK_THROWS_WITH(mlp.backward(ps, dout, {}, cache), Contains("forward"));
  mlp.forward(ps, x2, t, {}, out, cache);
  fd::Tensor<float> dbad({2, 2});
  CHECK_THROWS_WITH(mlp.backward(ps, dbad, {}, cache),
                    Contains("MLP: dout: expected shape [3, 2], got [2, 2]"));
  CHECK_THROWS_AS(nn::MLP<float>(ps, {.dim = 0}), fd::config_error);

  nn::Parameters<float> ps2;
  nn::MLP<float> cond(ps2, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 2},
                      "vf.");
  ps2.allocate();
  CHECK(ps2.info(0).name == "vf.net.0.weight");
  auto ybad = make_labels({0, 1, 5});
  CHECK_THROWS_AS(cond.forward(ps2, x2, t, ybad, out, cache), fd::config_error);
  auto yshort = make_labels({0, 1});
  CHECK_THROWS_WITH(cond.forward(ps2, x2, t, yshort, out, cache),
                    Contains("vf. (MLP): y: expected shape [3], got [2]"));
}
