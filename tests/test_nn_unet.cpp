// The U-Net vector field (nn/models/unet.hpp): whole-model finite-difference gradient checks in
// double (w.r.t. x and every parameter, with and without midcoder attention, conditional and
// unconditional), PyTorch parity in fp32 against tests/fixtures/unet.safetensors
// (tools/fixtures/unet.py; the torch state_dict loaded strictly by name), sampling through
// as_field + Heun, classifier-free guidance on the 2N batch, and error messages.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/models/unet.hpp>
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

// The gradcheck configuration: two levels (8x8 and 4x4), one residual layer, 2 groups.
nn::UNetConfig tiny_config(bool attention, fd::index_t num_classes) {
  return {.in_channels = 2,
          .channels = {4, 8},
          .num_residual_layers = 1,
          .t_embed_dim = 6,
          .y_embed_dim = 5,
          .num_classes = num_classes,
          .attention = attention,
          .attention_heads = 2,
          .groups = 2};
}

}  // namespace

TEST_CASE("UNet: gradients w.r.t. x and every parameter match central differences",
          "[nn][unet][gradcheck]") {
  struct Case {
    bool attention;
    fd::index_t num_classes;
  };
  for (const Case cs : {Case{false, 3}, Case{true, 3}, Case{false, 0}}) {
    INFO("attention = " << cs.attention << ", num_classes = " << cs.num_classes);
    fd::Generator gen(21 + static_cast<std::uint64_t>(cs.attention));
    nn::Parameters<double> ps;
    nn::UNet<double> net(ps, tiny_config(cs.attention, cs.num_classes));
    ps.allocate();
    net.init(ps, gen);
    // GroupNorm's default affine (1, 0) would leave its parameter gradients special; perturb.
    for (fd::index_t id = 0; id < ps.count(); ++id) {
      auto p = ps.param(id);
      for (fd::index_t i = 0; i < p.numel(); ++i)
        p.data()[i] += 0.1 * fd::randn<double>({1}, gen)[0];
    }
    const fd::index_t n = 2;
    auto x = fd::randn<double>({n, 2, 8, 8}, gen);
    auto t = make_times<double>({0.13, 0.71});
    auto y = cs.num_classes > 0 ? make_labels({1, 3}) : fd::Tensor<fd::label_t>();
    fd::Tensor<double> out({n, 2, 8, 8}), dx({n, 2, 8, 8});
    nn::UNet<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {out.view()},
        [&] { net.forward(ps, x, t, y, out, cache); },
        [&](const auto& dy) { net.backward(ps, dy[0], dx, cache); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("UNet gradcheck (attention = " << cs.attention << ", classes = " << cs.num_classes
                                        << "): worst error " << rep.max_error);
  }
}

TEST_CASE("UNet: three levels, two residual layers (every skip path) pass the gradient check",
          "[nn][unet][gradcheck]") {
  fd::Generator gen(5);
  nn::Parameters<double> ps;
  nn::UNet<double> net(ps, {.in_channels = 1,
                            .channels = {4, 4, 8},
                            .num_residual_layers = 2,
                            .t_embed_dim = 4,
                            .y_embed_dim = 3,
                            .num_classes = 2,
                            .attention = true,
                            .attention_heads = 1,
                            .groups = 2});
  ps.allocate();
  net.init(ps, gen);
  const fd::index_t n = 2;
  auto x = fd::randn<double>({n, 1, 8, 4}, gen);  // non-square: 8x4 -> 4x2 -> 2x1
  auto t = make_times<double>({0.4, 0.9});
  fd::Tensor<double> out({n, 1, 8, 4}), dx({n, 1, 8, 4});
  nn::UNet<double>::Cache cache;
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {out.view()},
      [&] { net.forward(ps, x, t, {}, out, cache); },  // null labels
      [&](const auto& dy) { net.backward(ps, dy[0], dx, cache); }, gen,
      // The deepest adapters' gradients are ~1e-3 of the rest (GroupNorm removes most of a
      // per-channel shift), so the default step's rounding noise (eps |L| / h) reaches them; a
      // larger step keeps it below the tolerance while truncation (h^2 f'''/6) stays ~1e-10.
      {.h = 1e-5});
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN("3-level UNet gradcheck: worst error " << rep.max_error);
}

TEST_CASE("UNet: a PyTorch state_dict loads strictly and gives the same outputs and gradients",
          "[nn][unet][parity]") {
  const auto path = std::filesystem::path(__FILE__).parent_path() / "fixtures" / "unet.safetensors";
  REQUIRE(std::filesystem::exists(path));
  const auto file = fd::io::SafetensorsFile::read(path);
  struct Case {
    std::string name;
    nn::UNetConfig config;
  };
  const std::vector<Case> cases = {
      {"plain",
       {.in_channels = 1,
        .channels = {8, 16},
        .num_residual_layers = 2,
        .t_embed_dim = 8,
        .y_embed_dim = 8,
        .num_classes = 3,
        .attention = false,
        .groups = 4}},
      {"attn",
       {.in_channels = 2,
        .channels = {8, 8},
        .num_residual_layers = 1,
        .t_embed_dim = 8,
        .y_embed_dim = 6,
        .num_classes = 3,
        .attention = true,
        .attention_heads = 2,
        .groups = 4}},
  };
  double worst = 0;
  std::string worst_name;
  for (const auto& cs : cases) {
    INFO(cs.name);
    nn::Parameters<float> ps;
    nn::UNet<float> net(ps, cs.config);
    ps.allocate();
    const auto report =
        nn::load_parameters(ps, file, {.strict = true, .prefix = cs.name + ".model."});
    CHECK(report.missing.empty());
    CHECK(report.unexpected.empty());

    const auto x = file.tensor<float>(cs.name + ".x");
    const auto t = file.tensor<float>(cs.name + ".t");
    const auto y = file.tensor<fd::label_t>(cs.name + ".y");
    const auto dout = file.tensor<float>(cs.name + ".dout");
    fd::Tensor<float> out(x.shape()), dx(x.shape());
    nn::UNet<float>::Cache cache;
    net.forward(ps, x, t, y, out, cache);
    ps.zero_grad();
    net.backward(ps, dout, dx, cache);

    auto cmp = [&](const std::string& name, fd::View<const float> a) {
      INFO(name);
      const double e = nmse(a, file.tensor<float>(cs.name + "." + name));
      CHECK(e <= 1e-6);
      if (e >= worst) {
        worst = e;
        worst_name = cs.name + "." + name;
      }
    };
    cmp("out", out);
    cmp("dx", dx);
    for (fd::index_t id = 0; id < ps.count(); ++id) cmp("grad." + ps.info(id).name, ps.grad(id));
  }
  WARN("UNet PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}

TEST_CASE("UNet: the cache is reused while N repeats; empty labels are the null label",
          "[nn][unet]") {
  fd::Generator gen(3);
  nn::Parameters<float> ps;
  nn::UNet<float> net(ps, {.channels = {8, 16},
                           .num_residual_layers = 1,
                           .t_embed_dim = 8,
                           .y_embed_dim = 8,
                           .num_classes = 4,
                           .attention = true});
  ps.allocate();
  net.init(ps, gen);
  auto x = fd::randn<float>({3, 1, 8, 8}, gen);
  auto t = make_times<float>({0.1, 0.5, 0.9});
  fd::Tensor<float> out({3, 1, 8, 8}), out2({3, 1, 8, 8});
  nn::UNet<float>::Cache cache;
  net.forward(ps, x, t, {}, out, cache);
  const float* a0 = cache.a0.data();
  const float* r1 = cache.rb_out[1].data();
  auto ynull = make_labels({4, 4, 4});
  net.forward(ps, x, t, ynull, out2, cache);
  CHECK(cache.a0.data() == a0);
  CHECK(cache.rb_out[1].data() == r1);
  CHECK(max_abs_diff(out, out2) == 0);

  // Skipping dx leaves the parameter gradients bit-identical.
  auto dout = fd::randn<float>({3, 1, 8, 8}, gen);
  fd::Tensor<float> dx({3, 1, 8, 8});
  ps.zero_grad();
  net.backward(ps, dout, dx, cache);
  const auto g = ps.flat_grads();
  const std::vector<float> with_dx(g.data(), g.data() + g.numel());
  ps.zero_grad();
  net.backward(ps, dout, {}, cache);
  CHECK(std::vector<float>(g.data(), g.data() + g.numel()) == with_dx);
}

TEST_CASE("UNet: recomputing the blocks' GroupNorm / SiLU outputs gives the same bits",
          "[nn][unet]") {
  // Two levels, two residual layers, attention, labels: every block kind recomputes; the
  // outputs, dx and every parameter gradient must equal the caching model's bit for bit, and the
  // recomputing cache keeps no per-block GroupNorm / SiLU tensors.
  nn::UNetConfig cfg{.channels = {8, 16},
                     .num_residual_layers = 2,
                     .t_embed_dim = 8,
                     .y_embed_dim = 8,
                     .num_classes = 4,
                     .attention = true,
                     .attention_heads = 2,
                     .groups = 4};
  std::vector<float> outs[2], grads[2], dxs[2];
  for (int mode = 0; mode < 2; ++mode) {
    cfg.recompute = mode == 1;
    fd::Generator gen(5);
    nn::Parameters<float> ps;
    nn::UNet<float> net(ps, cfg);
    ps.allocate();
    net.init(ps, gen);
    auto x = fd::randn<float>({5, 1, 8, 8}, gen);
    auto t = make_times<float>({0.1, 0.3, 0.5, 0.7, 0.9});
    auto y = make_labels({0, 1, 2, 3, 4});
    fd::Tensor<float> out({5, 1, 8, 8}), dx({5, 1, 8, 8});
    auto dout = fd::randn<float>({5, 1, 8, 8}, gen);
    nn::UNet<float>::Cache cache;
    ps.zero_grad();
    for (int rep = 0; rep < 2; ++rep) {  // twice: the shared buffers are refilled correctly
      net.forward(ps, x, t, y, out, cache);
      net.backward(ps, dout, dx, cache);
    }
    const auto g = ps.flat_grads();
    outs[mode].assign(out.data(), out.data() + out.numel());
    dxs[mode].assign(dx.data(), dx.data() + dx.numel());
    grads[mode].assign(g.data(), g.data() + g.numel());
    for (const auto& b : cache.rb) CHECK((b.s1.numel() == 0) == cfg.recompute);
  }
  CHECK(outs[0] == outs[1]);
  CHECK(dxs[0] == dxs[1]);
  CHECK(grads[0] == grads[1]);
}

namespace {
// Counts the forward calls and their batch sizes of the wrapped model.
struct CountingUNet {
  using value_type = float;
  using Cache = nn::UNet<float>::Cache;
  const nn::UNet<float>* m;
  mutable std::vector<fd::index_t> calls;
  void forward(const nn::Parameters<float>& ps, fd::View<const float> x, fd::View<const float> t,
               fd::View<const fd::label_t> y, fd::View<float> out, Cache& c) const {
    calls.push_back(x.dim(0));
    m->forward(ps, x, t, y, out, c);
  }
  fd::index_t num_classes() const { return m->num_classes(); }
};
}  // namespace

TEST_CASE("UNet: as_field samples with Heun; cfg evaluates one 2N batch equal to separate calls",
          "[nn][unet][as_field][cfg]") {
  fd::Generator gen(8);
  nn::Parameters<float> ps;
  nn::UNet<float> net(ps, {.channels = {8, 16},
                           .num_residual_layers = 1,
                           .t_embed_dim = 8,
                           .y_embed_dim = 8,
                           .num_classes = 3,
                           .attention = true});
  ps.allocate();
  net.init(ps, gen);
  auto field = nn::as_field(net, ps);
  static_assert(fd::Field<decltype(field), float>);
  static_assert(fd::ConditionalField<decltype(field), float>);
  const fd::index_t n = 3;
  const fd::Shape s{n, 1, 16, 16};
  auto x0 = fd::randn<float>(s, gen);

  // One Heun step (two evaluations) stays finite and moves x.
  auto x = x0.clone();
  const auto stats = fd::integrate(fd::Heun{}, field, x, fd::uniform_grid<float>(1));
  CHECK(stats.field_evaluations == 2);
  for (fd::index_t i = 0; i < x.numel(); ++i) REQUIRE(std::isfinite(x.data()[i]));
  CHECK(max_abs_diff(x, x0) > 0);

  // cfg at w = 3: one call with 2N rows, equal to -2 u(x|null) + 3 u(x|y).
  auto y = make_labels({0, 2, 1});
  auto ynull = make_labels({3, 3, 3});
  auto tt = make_times<float>(std::vector<double>(n, 0.4f));
  fd::Tensor<float> cond(s), uncond(s), out(s);
  nn::UNet<float>::Cache cache;
  net.forward(ps, x0, tt, y, cond, cache);
  net.forward(ps, x0, tt, ynull, uncond, cache);
  CountingUNet counting{&net, {}};
  auto g3 = fd::cfg(nn::as_field(counting, ps), 3.0f);
  g3.set_condition(y);
  g3(x0, out.view(), 0.4f);
  REQUIRE(counting.calls.size() == 1);
  CHECK(counting.calls[0] == 2 * n);
  fd::Tensor<float> ref(s);
  for (fd::index_t i = 0; i < ref.numel(); ++i)
    ref.data()[i] = -2.0f * uncond.data()[i] + 3.0f * cond.data()[i];
  const double err = max_abs_diff(out, ref);
  CHECK(err <= 1e-5);
  WARN("UNet cfg: 2N batch vs separate evaluations, max abs difference " << err);
}

TEST_CASE("UNet: errors name the model, the argument and the shapes", "[nn][unet][errors]") {
  nn::Parameters<float> ps;
  nn::UNet<float> net(ps, {.channels = {8, 16},
                           .num_residual_layers = 1,
                           .t_embed_dim = 8,
                           .y_embed_dim = 8,
                           .num_classes = 0});
  ps.allocate();
  nn::UNet<float>::Cache cache;
  fd::Tensor<float> x({2, 1, 8, 8}), t({2}), out({2, 1, 8, 8});
  fd::Tensor<float> xodd({2, 1, 7, 8});
  CHECK_THROWS_AS(net.forward(ps, xodd, t, {}, out, cache), fd::shape_error);
  CHECK_THROWS_WITH(net.forward(ps, xodd, t, {}, out, cache),
                    Contains("UNet: x: expected shape [N, 1, H, W]") &&
                        Contains("multiples of 2") && Contains("got [2, 1, 7, 8]"));
  fd::Tensor<float> x3({2, 3, 8, 8});
  CHECK_THROWS_WITH(net.forward(ps, x3, t, {}, out, cache), Contains("got [2, 3, 8, 8]"));
  fd::Tensor<float> t3({3});
  CHECK_THROWS_WITH(net.forward(ps, x, t3, {}, out, cache),
                    Contains("UNet: t: expected shape [2], got [3]"));
  fd::Tensor<float> out2({2, 1, 8, 4});
  CHECK_THROWS_WITH(net.forward(ps, x, t, {}, out2, cache),
                    Contains("UNet: out: expected shape [2, 1, 8, 8], got [2, 1, 8, 4]"));
  auto y = make_labels({0, 0});
  CHECK_THROWS_WITH(net.forward(ps, x, t, y, out, cache), Contains("unconditional"));
  CHECK_THROWS_WITH(net.backward(ps, out, {}, cache), Contains("forward"));
  net.forward(ps, x, t, {}, out, cache);
  fd::Tensor<float> dbad({1, 1, 8, 8});
  CHECK_THROWS_WITH(net.backward(ps, dbad, {}, cache),
                    Contains("UNet: dout: expected shape [2, 1, 8, 8], got [1, 1, 8, 8]"));
  CHECK_THROWS_AS(nn::UNet<float>(ps, {.channels = {8, 12}}), fd::config_error);  // groups 8
  CHECK_THROWS_AS(nn::UNet<float>(ps, {.channels = {}}), fd::config_error);

  nn::Parameters<float> ps2;
  nn::UNet<float>::Cache cache2;
  nn::UNet<float> cond(ps2, {.channels = {8, 16}, .num_residual_layers = 1, .num_classes = 2},
                       "vf.");
  ps2.allocate();
  CHECK(ps2.info(0).name == "vf.init_conv.0.weight");
  auto yshort = make_labels({0});
  CHECK_THROWS_WITH(cond.forward(ps2, x, t, yshort, out, cache2),
                    Contains("vf. (UNet): y: expected shape [2], got [1]"));
  auto ybad = make_labels({0, 5});
  CHECK_THROWS_AS(cond.forward(ps2, x, t, ybad, out, cache2), fd::config_error);
}

TEST_CASE("UNet: a single level (midcoder only) passes the gradient check",
          "[nn][unet][gradcheck]") {
  for (bool attention : {false, true}) {
    INFO("attention = " << attention);
    fd::Generator gen(9);
    nn::Parameters<double> ps;
    nn::UNet<double> net(ps, {.in_channels = 1,
                              .channels = {4},
                              .num_residual_layers = 2,
                              .t_embed_dim = 4,
                              .y_embed_dim = 3,
                              .num_classes = 2,
                              .attention = attention,
                              .attention_heads = 2,
                              .groups = 2});
    ps.allocate();
    net.init(ps, gen);
    auto x = fd::randn<double>({2, 1, 3, 5}, gen);  // no downsampling: any H, W
    auto t = make_times<double>({0.2, 0.6});
    auto y = make_labels({0, 2});
    fd::Tensor<double> out({2, 1, 3, 5}), dx({2, 1, 3, 5});
    nn::UNet<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {out.view()},
        [&] { net.forward(ps, x, t, y, out, cache); },
        [&](const auto& dy) { net.backward(ps, dy[0], dx, cache); }, gen, {.h = 1e-5});
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("1-level UNet gradcheck (attention = " << attention << "): worst error " << rep.max_error);
  }
}
