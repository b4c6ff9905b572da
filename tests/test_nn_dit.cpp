// The diffusion transformer (nn/models/dit.hpp) and the patch layers (nn/layers/patchify.hpp):
// finite-difference gradient checks in double (patch embedding, one adaLN-Zero block, whole
// models with sin-cos and learned positions, conditional and unconditional), PyTorch parity in
// fp32 against tests/fixtures/dit.safetensors (tools/fixtures/dit.py; state_dicts loaded strictly
// by name), the reference's zero init, cache reuse, as_field + cfg, and error messages.
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
#include <flowdiff/train/optimizer.hpp>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/files.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

using flowdiff::test::make_labels;
using flowdiff::test::make_times;
using flowdiff::test::max_abs_diff;
using flowdiff::test::nmse;

// Moves every parameter to a random value: the zero-initialised adaLN and final layers would
// otherwise hide most gradients (a zero gate passes no gradient into its branch).
template <class T>
void randomise_all(nn::Parameters<T>& ps, fd::Generator& gen, double scale) {
  for (fd::index_t id = 0; id < ps.count(); ++id) {
    auto p = ps.param(id);
    for (fd::index_t i = 0; i < p.numel(); ++i)
      p.data()[i] = static_cast<T>(scale * gen.normal<double>());
  }
}

nn::DiTConfig tiny_config(fd::index_t num_classes, bool learned, fd::index_t patch) {
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

std::filesystem::path dit_fixture() { return flowdiff::test::fixture_path("dit.safetensors"); }

}  // namespace

TEST_CASE("patchify / unpatchify: inverse permutations in both layouts", "[nn][dit][patchify]") {
  fd::Generator gen(1);
  auto x = fd::randn<double>({2, 3, 6, 4}, gen);  // p = 2: 3 x 2 patches of 12 values
  for (auto layout : {nn::PatchLayout::channel_first, nn::PatchLayout::channel_last}) {
    fd::Tensor<double> p({2, 6, 12}), back({2, 3, 6, 4});
    nn::patchify<double>(x, 2, p.view(), layout);
    nn::unpatchify<double>(p, 2, back.view(), layout);
    for (fd::index_t i = 0; i < x.numel(); ++i) REQUIRE(back.data()[i] == x.data()[i]);
    // Spot values: token 4 = patch row 2, column 0; pixel (c = 1, u = 1, v = 0).
    const double v = x.data()[((0 * 3 + 1) * 6 + 2 * 2 + 1) * 4 + 0];
    const fd::index_t e =
        layout == nn::PatchLayout::channel_first ? (1 * 2 + 1) * 2 + 0 : (1 * 2 + 0) * 3 + 1;
    CHECK(p.data()[4 * 12 + e] == v);
  }
  // Gradient check of both directions (each is the other's adjoint).
  fd::Tensor<double> p({2, 6, 12}), dx({2, 3, 6, 4}), dp({2, 6, 12}), y({2, 3, 6, 4});
  auto r1 = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, nullptr, {p.view()},
      [&] { nn::patchify<double>(x, 2, p.view(), nn::PatchLayout::channel_last); },
      [&](const auto& dy) {
        nn::unpatchify<double>(dy[0], 2, dx.view(), nn::PatchLayout::channel_last);
      },
      gen);
  CHECK(r1.ok());
  auto pin = fd::randn<double>({2, 6, 12}, gen);
  auto r2 = nn::gradcheck(
      {{"patches", pin.view(), dp.view()}}, nullptr, {y.view()},
      [&] { nn::unpatchify<double>(pin, 2, y.view(), nn::PatchLayout::channel_first); },
      [&](const auto& dy) {
        nn::patchify<double>(dy[0], 2, dp.view(), nn::PatchLayout::channel_first);
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
  nn::Parameters<double> pc;  // the same weights in a Conv2d(3, 5, kernel 2, stride 2)
  nn::Conv2d<double> conv(pc, "conv", 3, 5, 2, 2, 0);
  pc.allocate();
  fd::copy(pc.param(conv.weight_id()), fd::View<const double>(ps.param(pe.weight_id())));
  fd::copy(pc.param(conv.bias_id()), fd::View<const double>(ps.param(pe.bias_id())));
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
        err =
            std::max(err, std::abs(y.data()[(n * 6 + k) * 5 + d] - yc.data()[(n * 5 + d) * 6 + k]));
  CHECK(err < 1e-13);
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {y.view()}, [&] { pe.forward(ps, x, y.view(), cache); },
      [&](const auto& dy) { pe.backward(ps, x, dy[0], dx.view(), cache); }, gen);
  INFO(rep.summary());
  CHECK(rep.ok());
}

TEST_CASE("DiTBlock: gradients w.r.t. x, c and every parameter match central differences",
          "[nn][dit][gradcheck]") {
  fd::Generator gen(3);
  nn::Parameters<double> ps;
  nn::DiTBlock<double> block(ps, "blocks.0", 8, 2, 4.0);
  ps.allocate();
  randomise_all(ps, gen, 0.3);
  auto x = fd::randn<double>({2, 5, 8}, gen);
  auto c = fd::randn<double>({2, 8}, gen);
  fd::Tensor<double> out({2, 5, 8}), dx({2, 5, 8}), dc({2, 8});
  nn::DiTBlock<double>::Cache cache;
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}, {"c", c.view(), dc.view()}}, &ps, {out.view()},
      [&] { block.forward(ps, x, c, out.view(), cache); },
      [&](const auto& dy) { block.backward(ps, x, c, dy[0], dx.view(), dc.view(), cache); }, gen);
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN("DiTBlock gradcheck: worst error " << rep.max_error);
}

TEST_CASE("DiT: gradients w.r.t. x and every parameter match central differences",
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
    randomise_all(ps, gen, 0.3);
    const fd::index_t n = 2;
    auto x = fd::randn<double>({n, 2, 8, 8}, gen);
    auto t = make_times<double>({0.13, 0.71});
    auto y = cs.num_classes > 0 ? make_labels({1, 3}) : fd::Tensor<fd::label_t>();
    fd::Tensor<double> out({n, 2, 8, 8}), dx({n, 2, 8, 8});
    nn::DiT<double>::Cache cache;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {out.view()},
        [&] { net.forward(ps, x, t, y, out, cache); },
        [&](const auto& dy) { net.backward(ps, dy[0], dx, cache); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("DiT gradcheck (classes = " << cs.num_classes << ", learned = " << cs.learned
                                     << ", p = " << cs.patch << "): worst error " << rep.max_error);
  }
}

TEST_CASE("DiT: PyTorch state_dicts load strictly and give the same outputs and gradients",
          "[nn][dit][parity]") {
  REQUIRE(std::filesystem::exists(dit_fixture()));
  const auto file = fd::io::SafetensorsFile::read(dit_fixture());
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

  {  // One block, registered under the name a DiT gives its first block.
    nn::Parameters<float> ps;
    nn::DiTBlock<float> block(ps, "blocks.0", 16, 2);
    ps.allocate();
    const auto rep = nn::load_parameters(ps, file, {.strict = true, .prefix = "block.model."});
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
  for (const auto& cs : cases) {
    INFO(cs.name);
    nn::Parameters<float> ps;
    nn::DiT<float> net(ps, cs.config);
    ps.allocate();
    const auto rep = nn::load_parameters(ps, file, {.strict = true, .prefix = cs.name + ".model."});
    CHECK(rep.missing.empty());
    CHECK(rep.unexpected.empty());
    const auto x = file.tensor<float>(cs.name + ".x");
    const auto t = file.tensor<float>(cs.name + ".t");
    const auto y =
        net.conditional() ? file.tensor<fd::label_t>(cs.name + ".y") : fd::Tensor<fd::label_t>();
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
  {  // The fixed 2-D sin-cos table equals the reference's get_2d_sincos_pos_embed.
    nn::Parameters<float> ps;
    nn::DiT<float> net(ps,
                       {.image_size = 16, .patch_size = 2, .hidden = 16, .depth = 1, .heads = 2});
    cmp("sincos.8x8.d16", net.sincos_table());
  }
  WARN("DiT PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}

TEST_CASE("DiT: the reference's init (adaLN-Zero: u = 0) and parameter names", "[nn][dit]") {
  fd::Generator gen(4);
  nn::Parameters<float> ps;
  nn::DiT<float> net(
      ps,
      {.image_size = 16, .patch_size = 4, .hidden = 32, .depth = 2, .heads = 4, .num_classes = 10});
  ps.allocate();
  net.init(ps, gen);
  CHECK(net.tokens() == 16);
  CHECK(net.null_label() == 10);
  const auto& p = ps;
  const auto shape = [&](const char* n) { return p.info(p.find(n)).shape; };
  CHECK(shape("x_embedder.proj.weight") == fd::Shape{32, 1, 4, 4});
  CHECK(shape("t_embedder.mlp.0.weight") == fd::Shape{32, 256});
  CHECK(shape("y_embedder.embedding_table.weight") == fd::Shape{11, 32});
  CHECK(shape("blocks.1.attn.qkv.weight") == fd::Shape{96, 32});
  CHECK(shape("blocks.1.mlp.fc1.weight") == fd::Shape{128, 32});
  CHECK(shape("blocks.0.adaLN_modulation.1.weight") == fd::Shape{192, 32});
  CHECK(shape("final_layer.adaLN_modulation.1.weight") == fd::Shape{64, 32});
  CHECK(shape("final_layer.linear.weight") == fd::Shape{16, 32});
  CHECK_THROWS_AS(ps.find("pos_embed"),
                  fd::config_error);  // sin-cos: not a parameter
  // xavier_uniform bound sqrt(6 / (fan_in + fan_out)) on qkv [96, 32]: 0.2165.
  const auto qkv = ps.param(ps.find("blocks.1.attn.qkv.weight"));
  double mx = 0;
  for (fd::index_t i = 0; i < qkv.numel(); ++i) mx = std::max(mx, double(std::abs(qkv[i])));
  CHECK(mx <= std::sqrt(6.0 / 128) + 1e-6);
  CHECK(mx > 0.9 * std::sqrt(6.0 / 128));
  for (const char* zero :
       {"blocks.0.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.bias",
        "final_layer.linear.weight", "final_layer.linear.bias", "blocks.0.attn.qkv.bias"}) {
    const auto v = ps.param(ps.find(zero));
    for (fd::index_t i = 0; i < v.numel(); ++i) REQUIRE(v[i] == 0.0f);
  }
  // At init every block is the identity and the output is exactly zero.
  auto x = fd::randn<float>({2, 1, 16, 16}, gen);
  auto t = make_times<float>({0.3, 0.8});
  fd::Tensor<float> out({2, 1, 16, 16});
  fill(out.view(), 1.0f);
  nn::DiT<float>::Cache cache;
  net.forward(ps, x, t, make_labels({3, 10}), out, cache);
  for (fd::index_t i = 0; i < out.numel(); ++i) REQUIRE(out[i] == 0.0f);
  // ... yet the final layer's weights get a gradient (the first training step moves them).
  auto dout = fd::randn<float>({2, 1, 16, 16}, gen);
  ps.zero_grad();
  net.backward(ps, dout, {}, cache);
  double g = 0;
  const auto gw = ps.grad(ps.find("final_layer.linear.weight"));
  for (fd::index_t i = 0; i < gw.numel(); ++i) g += std::abs(gw[i]);
  CHECK(g > 0);

  // A learned position embedding is the parameter "pos_embed" [1, L, D], started at sin-cos.
  nn::Parameters<float> ps2;
  nn::DiT<float> net2(ps2, {.image_size = 16,
                            .patch_size = 4,
                            .hidden = 32,
                            .depth = 1,
                            .heads = 4,
                            .learned_pos_embed = true});
  ps2.allocate();
  net2.init(ps2, gen);
  const auto pe = ps2.param(ps2.find("pos_embed"));
  CHECK(pe.shape() == fd::Shape{1, 16, 32});
  CHECK(max_abs_diff(pe.reshape({16, 32}), net2.sincos_table()) == 0);
}

TEST_CASE("DiT: the cache is reused while N repeats; empty labels are the null label",
          "[nn][dit]") {
  fd::Generator gen(5);
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, {.image_size = 8,
                          .patch_size = 2,
                          .hidden = 16,
                          .depth = 2,
                          .heads = 2,
                          .num_classes = 4,
                          .frequency_dim = 16});
  ps.allocate();
  randomise_all(ps, gen, 0.2);
  auto x = fd::randn<float>({3, 1, 8, 8}, gen);
  auto t = make_times<float>({0.1, 0.5, 0.9});
  fd::Tensor<float> out({3, 1, 8, 8}), out2({3, 1, 8, 8});
  nn::DiT<float>::Cache cache;
  net.forward(ps, x, t, {}, out, cache);
  auto dout = fd::randn<float>({3, 1, 8, 8}, gen);
  fd::Tensor<float> dx({3, 1, 8, 8});
  net.backward(ps, dout, dx, cache);
  const float* h0 = cache.h0.data();
  const float* qkv = cache.bc[1].at.qkv.data();
  const float* dbig = cache.scratch.dbig.data();
  net.forward(ps, x, t, make_labels({4, 4, 4}), out2, cache);
  CHECK(max_abs_diff(out, out2) == 0);
  CHECK(max_abs_diff(out, fd::Tensor<float>::zeros(out.shape())) > 0);
  // Skipping dx leaves the parameter gradients bit-identical; no buffer was re-allocated.
  ps.zero_grad();
  net.backward(ps, dout, dx, cache);
  const auto g = ps.flat_grads();
  const std::vector<float> with_dx(g.data(), g.data() + g.numel());
  ps.zero_grad();
  net.backward(ps, dout, {}, cache);
  CHECK(std::vector<float>(g.data(), g.data() + g.numel()) == with_dx);
  CHECK(cache.h0.data() == h0);
  CHECK(cache.bc[1].at.qkv.data() == qkv);
  CHECK(cache.scratch.dbig.data() == dbig);
  // A sample's output does not depend on the rest of its batch.
  fd::Tensor<float> x1({1, 1, 8, 8}), o1({1, 1, 8, 8});
  fd::copy(x1.view(), fd::View<const float>(x.view().rows(2, 3)));
  nn::DiT<float>::Cache c1;
  net.forward(ps, x1, make_times<float>({0.9}), {}, o1, c1);
  CHECK(max_abs_diff(o1, out.view().rows(2, 3)) <= 1e-6);
}

namespace {
// Counts the forward calls and their batch sizes of the wrapped model.
struct CountingDiT {
  using value_type = float;
  using Cache = nn::DiT<float>::Cache;
  const nn::DiT<float>* m;
  mutable std::vector<fd::index_t> calls;
  void forward(const nn::Parameters<float>& ps, fd::View<const float> x, fd::View<const float> t,
               fd::View<const fd::label_t> y, fd::View<float> out, Cache& c) const {
    calls.push_back(x.dim(0));
    m->forward(ps, x, t, y, out, c);
  }
  fd::index_t num_classes() const { return m->num_classes(); }
};
}  // namespace

TEST_CASE("DiT: as_field samples with Heun; cfg evaluates one 2N batch equal to separate calls",
          "[nn][dit][as_field][cfg]") {
  fd::Generator gen(6);
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, {.image_size = 8,
                          .patch_size = 2,
                          .hidden = 16,
                          .depth = 2,
                          .heads = 2,
                          .num_classes = 3,
                          .frequency_dim = 16});
  ps.allocate();
  net.init(ps, gen);
  randomise_all(ps, gen, 0.2);
  auto field = nn::as_field(net, ps);
  static_assert(fd::Field<decltype(field), float>);
  static_assert(fd::ConditionalField<decltype(field), float>);
  const fd::index_t n = 3;
  const fd::Shape s{n, 1, 8, 8};
  auto x0 = fd::randn<float>(s, gen);
  auto x = x0.clone();
  const auto stats = fd::integrate(fd::Heun{}, field, x, fd::uniform_grid<float>(2));
  CHECK(stats.field_evaluations == 4);
  for (fd::index_t i = 0; i < x.numel(); ++i) REQUIRE(std::isfinite(x.data()[i]));
  CHECK(max_abs_diff(x, x0) > 0);

  auto y = make_labels({0, 2, 1});
  auto tt = make_times<float>(std::vector<double>(n, 0.4));
  fd::Tensor<float> cond(s), uncond(s), out(s);
  nn::DiT<float>::Cache cache;
  net.forward(ps, x0, tt, y, cond, cache);
  net.forward(ps, x0, tt, make_labels({3, 3, 3}), uncond, cache);
  CountingDiT counting{&net, {}};
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
  WARN("DiT cfg: 2N batch vs (1 - w) u(x|null) + w u(x|y) from separate calls, max abs difference "
       << err);
}

TEST_CASE("DiT: errors name the model, the argument and the shapes", "[nn][dit][errors]") {
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, {.image_size = 8,
                          .patch_size = 2,
                          .hidden = 16,
                          .depth = 1,
                          .heads = 2,
                          .num_classes = 0,
                          .frequency_dim = 16});
  ps.allocate();
  nn::DiT<float>::Cache cache;
  fd::Tensor<float> x({2, 1, 8, 8}), t({2}), out({2, 1, 8, 8});
  fd::Tensor<float> x16({2, 1, 16, 16});
  CHECK_THROWS_AS(net.forward(ps, x16, t, {}, out, cache), fd::shape_error);
  CHECK_THROWS_WITH(
      net.forward(ps, x16, t, {}, out, cache),
      Contains("DiT: x: expected shape [N, 1, 8, 8] with N >= 1, got [2, 1, 16, 16]"));
  fd::Tensor<float> t3({3});
  CHECK_THROWS_WITH(net.forward(ps, x, t3, {}, out, cache),
                    Contains("DiT: t: expected shape [2], got [3]"));
  fd::Tensor<float> out2({2, 1, 8, 4});
  CHECK_THROWS_WITH(net.forward(ps, x, t, {}, out2, cache),
                    Contains("DiT: out: expected shape [2, 1, 8, 8], got [2, 1, 8, 4]"));
  CHECK_THROWS_WITH(net.forward(ps, x, t, make_labels({0, 0}), out, cache),
                    Contains("unconditional"));
  CHECK_THROWS_WITH(net.backward(ps, out, {}, cache), Contains("forward"));
  net.forward(ps, x, t, {}, out, cache);
  fd::Tensor<float> dbad({1, 1, 8, 8});
  CHECK_THROWS_WITH(net.backward(ps, dbad, {}, cache),
                    Contains("DiT: dout: expected shape [2, 1, 8, 8], got [1, 1, 8, 8]"));

  nn::Parameters<float> ps2;
  nn::DiT<float> cond(
      ps2,
      {.image_size = 8, .patch_size = 2, .hidden = 16, .depth = 1, .heads = 2, .num_classes = 2},
      "vf.");
  ps2.allocate();
  nn::DiT<float>::Cache c2;
  CHECK(ps2.info(0).name == "vf.x_embedder.proj.weight");
  CHECK_THROWS_WITH(cond.forward(ps2, x, t, make_labels({0}), out, c2),
                    Contains("vf. (DiT): y: expected shape [2], got [1]"));
  CHECK_THROWS_AS(cond.forward(ps2, x, t, make_labels({0, 5}), out, c2), fd::config_error);

  nn::Parameters<float> p3;
  CHECK_THROWS_WITH(
      nn::DiT<float>(p3, {.image_size = 10, .patch_size = 4}),
      Contains("DiT: need in_channels >= 1 and image_size a positive multiple of patch_size"));
  CHECK_THROWS_WITH(nn::DiT<float>(p3, {.hidden = 30, .heads = 4}),
                    Contains("hidden must be a positive multiple of heads"));
  CHECK_THROWS_WITH(nn::DiT<float>(p3, {.hidden = 6, .heads = 2}), Contains("hidden % 4 == 0"));
  CHECK_NOTHROW(nn::DiT<float>(p3, {.hidden = 6, .heads = 2, .learned_pos_embed = true}, "ok."));
  {  // no sin-cos table for hidden % 4 != 0: the learned embedding starts at zero
    nn::Parameters<float> p5;
    nn::DiT<float> net5(p5, {.hidden = 6, .heads = 2, .learned_pos_embed = true});
    p5.allocate();
    fd::fill(p5.param(p5.find("pos_embed")), 1.0f);
    fd::Generator g5(3);
    net5.init(p5, g5);
    const auto& pe = p5.param(p5.find("pos_embed"));
    for (fd::index_t i = 0; i < pe.numel(); ++i) REQUIRE(pe[i] == 0.0f);
  }
  CHECK_THROWS_AS(nn::DiT<float>(p3, {.depth = 0}), fd::config_error);
  CHECK_THROWS_AS(nn::DiT<float>(p3, {.mlp_ratio = 0.0}), fd::config_error);

  nn::Parameters<float> p4;
  nn::DiTBlock<float> block(p4, "blocks.0", 8, 2);
  p4.allocate();
  nn::DiTBlock<float>::Cache bc;
  fd::Tensor<float> bx({2, 3, 8}), bcond({2, 8}), bout({2, 3, 8}), bbad({2, 3, 7});
  CHECK_THROWS_WITH(block.forward(p4, bbad, bcond, bout, bc),
                    Contains("blocks.0 (DiTBlock): x: expected shape [N, L, 8], got [2, 3, 7]"));
  CHECK_THROWS_WITH(block.forward(p4, bx, bx, bout, bc),
                    Contains("blocks.0 (DiTBlock): c: expected shape [2, 8], got [2, 3, 8]"));
  CHECK_THROWS_WITH(block.backward(p4, bx, bcond, bout, {}, {}, bc), Contains("forward"));
}

TEST_CASE("DiT: runs on a VAE latent (4x7x7, patch size 1)", "[nn][dit]") {
  fd::Generator gen(7);
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, {.in_channels = 4,
                          .image_size = 7,
                          .patch_size = 1,
                          .hidden = 32,
                          .depth = 2,
                          .heads = 4,
                          .num_classes = 10});
  ps.allocate();
  net.init(ps, gen);
  randomise_all(ps, gen, 0.05);
  CHECK(net.tokens() == 49);
  auto z = fd::randn<float>({3, 4, 7, 7}, gen);
  fd::Tensor<float> out(z.shape()), dz(z.shape());
  nn::DiT<float>::Cache cache;
  net.forward(ps, z, make_times<float>({0.0, 0.5, 1.0}), make_labels({1, 10, 9}), out, cache);
  net.backward(ps, z, dz, cache);
  for (fd::index_t i = 0; i < out.numel(); ++i) REQUIRE(std::isfinite(out[i]));
  for (fd::index_t i = 0; i < dz.numel(); ++i) REQUIRE(std::isfinite(dz[i]));
  CHECK(max_abs_diff(out, fd::Tensor<float>::zeros(out.shape())) > 0);
}

TEST_CASE("DiT: trains from the adaLN-Zero init (Adam on a fixed regression batch)", "[nn][dit]") {
  // u = 0 at init and only the final Linear has a gradient at first; a few Adam steps must open
  // the gates and fit a simple target (u = -x), so training from the reference's init works.
  fd::Generator gen(8);
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, {.image_size = 8,
                          .patch_size = 2,
                          .hidden = 32,
                          .depth = 2,
                          .heads = 2,
                          .num_classes = 3,
                          .frequency_dim = 32});
  ps.allocate();
  net.init(ps, gen);
  fd::train::Adam<float> opt({.lr = 3e-3});
  auto x = fd::randn<float>({8, 1, 8, 8}, gen);
  auto t = fd::rand<float>({8}, gen);
  auto y = make_labels({0, 1, 2, 3, 0, 1, 2, 3});
  fd::Tensor<float> out(x.shape()), dout(x.shape());
  nn::DiT<float>::Cache cache;
  const auto loss_and_grad = [&] {
    net.forward(ps, x, t, y, out, cache);
    double l = 0;
    for (fd::index_t i = 0; i < x.numel(); ++i) {
      const float r = out[i] + x[i];
      l += double(r) * r;
      dout[i] = 2.0f * r / static_cast<float>(x.numel());
    }
    return l / static_cast<double>(x.numel());
  };
  const double l0 = loss_and_grad();
  double l = l0;
  for (int step = 0; step < 60; ++step) {
    ps.zero_grad();
    l = loss_and_grad();
    net.backward(ps, dout, {}, cache);
    opt.step(ps);
  }
  l = loss_and_grad();
  CHECK(l < 0.3 * l0);
  const auto gate = ps.param(ps.find("blocks.1.adaLN_modulation.1.weight"));
  double moved = 0;
  for (fd::index_t i = 0; i < gate.numel(); ++i) moved = std::max(moved, double(std::abs(gate[i])));
  CHECK(moved > 0);
  WARN("DiT: 60 Adam steps from init, regression loss " << l0 << " -> " << l);
}
