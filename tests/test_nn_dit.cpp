// The diffusion transformer (nn/models/dit.hpp) and the patch layers
// (nn/layers/patchify.hpp): finite-difference gradient checks in double (patch
// embedding, one adaLN-Zero block, whole models with sin-cos and learned
// positions, conditional and unconditional), PyTorch parity in fp32 against
// tests/fixtures/dit.safetensors (tools/fixtures/dit.py; state_dicts loaded
// strictly by name), the reference's zero init, cache reuse, as_field + cfg,
// and error messages.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/patchify.hpp>
#include <flowdiff/nn/models/dit.hpp>
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

// Moves every parameter to a random value: the zero-initialised adaLN and final
// layers would otherwise hide most gradients (a zero gate passes no gradient
// into its branch).
template <class T>
void randomise(nn::Parameters<T> &ps, fd::Generator &gen, double scale) {
  for (fd::index_t id = 0; id < ps.count(); ++id) {
    auto p = ps.param(id);
    for (fd::index_t i = 0; i < p.numel(); ++i)
      p.data()[i] = static_cast<T>(scale * gen.normal<double>());
  }
}

nn::DiTConfig tiny_config(fd::index_t num_classes, bool learned,
                          fd::index_t patch) {
  return {.in_channels = 2,
          .image_size = 8,
          .patch_size = patch,
          .hidden = 8,
          .depth = 2,
          .heads = 2,
          .mlp_ratio = 2.0,
          .num_classes = num_classes,
          .frequency_dim = 8,
          .learned_pos_embed = learned};
}

std::filesystem::path fixture() {
  return std::filesystem::path(__FILE__).parent_path() / "fixtures" /
         "dit.safetensors";
}

} // namespace

TEST_CASE("patchify / unpatchify: inverse permutations in both layouts",
          "[nn][dit][patchify]") {
  fd::Generator gen(1);
  auto x =
      fd::randn<double>({2, 3, 6, 4}, gen); // p = 2: 3 x 2 patches of 12 values
  for (auto layout :
       {nn::PatchLayout::channel_first, nn::PatchLayout::channel_last}) {
    fd::Tensor<double> p({2, 6, 12}), back({2, 3, 6, 4});
    nn::patchify<double>(x, 2, p.view(), layout);
    nn::unpatchify<double>(p, 2, back.view(), layout);
    for (fd::index_t i = 0; i < x.numel(); ++i)
      REQUIRE(back.data()[i] == x.data()[i]);
    // Spot values: token 4 = patch row 2, column 0; pixel (c = 1, u = 1, v =
    // 0).
    const double v = x.data()[((0 * 3 + 1) * 6 + 2 * 2 + 1) * 4 + 0];
    const fd::index_t e = layout == nn::PatchLayout::channel_first
                              ? (1 * 2 + 1) * 2 + 0
                              : (1 * 2 + 0) * 3 + 1;
    CHECK(p.data()[4 * 12 + e] == v);
  }
  // Gradient check of both directions (each is the other's adjoint).
  fd::Tensor<double> p({2, 6, 12}), dx({2, 3, 6, 4}), dp({2, 6, 12}),
      y({2, 3, 6, 4});
  auto r1 = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, nullptr, {p.view()},
      [&] {
        nn::patchify<double>(x, 2, p.view(), nn::PatchLayout::channel_last);
      },
      [&](const auto &dy) {
        nn::unpatchify<double>(dy[0], 2, dx.view(),
                               nn::PatchLayout::channel_last);
      },
      gen);
  CHECK(r1.ok());
  auto pin = fd::randn<double>({2, 6, 12}, gen);
  auto r2 = nn::gradcheck(
      {{"patches", pin.view(), dp.view()}}, nullptr, {y.view()},
      [&] {
        nn::unpatchify<double>(pin, 2, y.view(),
                               nn::PatchLayout::channel_first);
      },
      [&](const auto &dy) {
        nn::patchify<double>(dy[0], 2, dp.view(),
                             nn::PatchLayout::channel_first);
      },
      gen);
  CHECK(r2.ok());
  fd::Tensor<double> bad({2, 6, 11});
  CHECK_THROWS_WITH(nn::patchify<double>(x, 2, bad.view()),
                    Contains("patchify: patches: expected shape [2, 6, 12]"));
  fd::Tensor<double> odd({2, 3, 5, 4});
  CHECK_THROWS_AS(nn::patchify<double>(odd, 2, p.view()), fd::shape_error);
}

TEST_CASE("PatchEmbed: gradients and equality with a stride-p convolution",
          "[nn][dit][patchify][gradcheck]") {
  fd::Generator gen(2);
  nn::Parameters<double> ps;
  nn::PatchEmbed<double> pe(ps, "x_embedder", 3, 5, 2);
  ps.allocate();
  pe.init(ps, gen);
  CHECK(ps.info(0).name == "x_embedder.proj.weight");
  CHECK(ps.info(0).shape == fd::Shape{5, 3, 2, 2});
  nn::Parameters<double>
      pc; // the same weights in a Conv2d(3, 5, kernel 2, stride 2)
  nn::Conv2d<double> conv(pc, "conv", 3, 5, 2, 2, 0);
  pc.allocate();
  fd::copy(pc.param(conv.weight_id()),
           fd::View<const double>(ps.param(pe.weight_id())));
  fd::copy(pc.param(conv.bias_id()),
           fd::View<const double>(ps.param(pe.bias_id())));
  auto x = fd::randn<double>({2, 3, 4, 6}, gen);
  fd::Tensor<double> y({2, 6, 5}), dx({2, 3, 4, 6}), yc({2, 5, 2, 3});
  nn::PatchEmbed<double>::Cache cache;
  nn::Conv2d<double>::Cache cc;
  pe.forward(ps, x, y.view(), cache);
  conv.forward(pc, x, yc.view(), cc);
  double err = 0;
  for (fd::index_t n = 0; n < 2; ++n)
    for (fd::index_t k = 0; k < 6; ++k)
      for (fd::index_t d = 0; d < 5; ++d)
        err = std::max(err, std::abs(y.data()[(n * 6 + k) * 5 + d] -
                                     yc.data()[(n * 5 + d) * 6 + k]));
  CHECK(err < 1e-13);
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {y.view()},
      [&] { pe.forward(ps, x, y.view(), cache); },
      [&](const auto &dy) { pe.backward(ps, x, dy[0], dx.view(), cache); },
      gen);
  INFO(rep.summary());
  CHECK(rep.ok());
}

TEST_CASE("DiTBlock: gradients w.r.t. x, c and every parameter match central "
          "differences",
          "[nn][dit][gradcheck]") {
  fd::Generator gen(3);
  nn::Parameters<double> ps;
  nn::DiTBlock<double> block(ps, "blocks.0", 8, 2, 4.0);
  ps.allocate();
  randomise(ps, gen, 0.3);
  auto x = fd::randn<double>({2, 5, 8}, gen);
  auto c = fd::randn<double>({2, 8}, gen);
  fd::Tensor<double> out({2, 5, 8}), dx({2, 5, 8}), dc({2, 8});
  nn::DiTBlock<double>::Cache cache;
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}, {"c", c.view(), dc.view()}}, &ps,
      {out.view()}, [&] { block.forward(ps, x, c, out.view(), cache); },
      [&](const auto &dy) {
        block.backward(ps, x, c, dy[0], dx.view(), dc.view(), cache);
      },
      gen);
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN("DiTBlock gradcheck: worst error " << rep.max_error);
}

TEST_CASE(
    "DiT: gradients w.r.t. x and every parameter match central differences",
    "[nn][dit][gradcheck]") {
  struct Case {
    fd::index_t num_classes;
    bool learned;
    fd::index_t patch;
  };
  for (const Case cs : {Case{3, false, 2}, Case{0, true, 4}}) {
    INFO("num_classes = " << cs.num_classes << ", learned = " << cs.learned
                          << ", patch = " << cs.patch);
    fd::Generator gen(11 + static_cast<std::uint64_t>(cs.patch));
    nn::Parameters<double> ps;
    nn::DiT<double> net(ps, tiny_config(cs.num_classes, cs.learned, cs.patch));
    ps.allocate();
    randomise(ps, gen, 0.3);
    const fd::index_t n = 2;
    auto x = fd::randn<double>({n, 2, 8, 8}, gen);
    auto t = make_times<double>({0.13, 0.71});
    auto y =
        cs.num_classes > 0 ? make_labels({1, 3}) : fd::Tensor<fd::label_t>();
    fd::Tensor<double> out({n, 2, 8, 8}), dx({n, 2, 8, 8});
    nn::DiT<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {out.view()},
        [&] { net.forward(ps, x, t, y, out, cache); },
        [&](const auto &dy) { net.backward(ps, dy[0], dx, cache); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("DiT gradcheck (classes = " << cs.num_classes << ", learned = "
                                     << cs.learned << ", p = " << cs.patch
                                     << "): worst error " << rep.max_error);
  }
}

TEST_CASE("DiT: PyTorch state_dicts load strictly and give the same outputs "
          "and gradients",
          "[nn][dit][parity]") {
  REQUIRE(std::filesystem::exists(fixture()));
  const auto file = fd::io::SafetensorsFile::read(fixture());
  double worst = 0;
  std::string worst_name;
  auto cmp = [&](const std::string &name, fd::View<const float> a) {
    INFO(name);
    const double e = nmse(a, file.tensor<float>(name));
    CHECK(e <= 1e-7);
    if (e >= worst) {
      worst = e;
      worst_name = name;
    }
  };

  { // One block, registered under the name a DiT gives its first block.
    nn::Parameters<float> ps;
    nn::DiTBlock<float> block(ps, "blocks.0", 16, 2);
    ps.allocate();
    const auto rep = nn::load_parameters(
        ps, file, {.strict = true, .prefix = "block.model."});
    CHECK(rep.missing.empty());
    CHECK(rep.unexpected.empty());
    const auto x = file.tensor<float>("block.x");
    const auto c = file.tensor<float>("block.c");
    const auto dout = file.tensor<float>("block.dout");
    fd::Tensor<float> out(x.shape()), dx(x.shape()), dc(c.shape());
    nn::DiTBlock<float>::Cache cache;
    block.forward(ps, x, c, out.view(), cache);
    ps.zero_grad();
    block.backward(ps, x, c, dout, dx.view(), dc.view(), cache);
    cmp("block.out", out);
    cmp("block.dx", dx);
    cmp("block.dc", dc);
    for (fd::index_t id = 0; id < ps.count(); ++id)
      cmp("block.grad." + ps.info(id).name, ps.grad(id));
  }
  struct Case {
    std::string name;
    nn::DiTConfig config;
  };
  const std::vector<Case> cases = {
      {"dit",
       {.in_channels = 2,
        .image_size = 8,
        .patch_size = 2,
        .hidden = 16,
        .depth = 2,
        .heads = 2,
        .mlp_ratio = 4.0,
        .num_classes = 3,
        .frequency_dim = 32}},
      {"learned",
       {.in_channels = 1,
        .image_size = 8,
        .patch_size = 4,
        .hidden = 12,
        .depth = 1,
        .heads = 3,
        .mlp_ratio = 2.0,
        .num_classes = 0,
        .frequency_dim = 256,
        .learned_pos_embed = true}},
  };
  for (const auto &cs : cases) {
    INFO(cs.name);
    nn::Parameters<float> ps;
    nn::DiT<float> net(ps, cs.config);
    ps.allocate();
    const auto rep = nn::load_parameters(
        ps, file, {.strict = true, .prefix = cs.name + ".model."});
    CHECK(rep.missing.empty());
    CHECK(rep.unexpected.empty());
    const auto x = file.tensor<float>(cs.name + ".x");
    const auto t = file.tensor<float>(cs.name + ".t");
    const auto y = net.conditional() ? file.tensor<fd::label_t>(cs.name + ".y")
                                     : fd::Tensor<fd::label_t>();
    const auto dout = file.tensor<float>(cs.name + ".dout");
    fd::Tensor<float> out(x.shape()), dx(x.shape());
    nn::DiT<float>::Cache cache;
    net.forward(ps, x, t, y, out, cache);
    ps.zero_grad();
    net.backward(ps, dout, dx, cache);
    cmp(cs.name + ".out", out);
    cmp(cs.name + ".dx", dx);
    for (fd::index_t id = 0; id < ps.count(); ++id)
      cmp(cs.name + ".grad." + ps.info(id).name, ps.grad(id));
  }
  { // The fixed 2-D sin-cos table equals the reference's
    // get_2d_sincos_pos_embed.
    nn::Parameters<float> ps;
    nn::DiT<float> net(ps, {.image_size = 16,
                            .patch_size = 2,
                            .hidden = 16,
                            .depth = 1,
                            .heads = 2});
    cmp("sincos.8x8.d16", net.sincos_table());
  }
  WARN("DiT PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}
