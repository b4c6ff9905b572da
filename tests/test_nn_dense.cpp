// Dense, normalisation and embedding layers: finite-difference gradient checks in double for every
// layer (nn/gradcheck.hpp), PyTorch parity from tests/fixtures/layers_dense.safetensors
// (tools/fixtures/layers_dense.py), and error messages for bad shapes.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <flowdiff/nn/layers/dropout.hpp>
#include <flowdiff/nn/layers/embedding.hpp>
#include <flowdiff/nn/layers/linear.hpp>
#include <flowdiff/nn/layers/modulation.hpp>
#include <flowdiff/nn/layers/norm.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <numbers>
#include <string>
#include <tuple>
#include <vector>

#include "support/files.hpp"
#include "support/gradcheck.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

// Parameters drawn N(0, 1) (not the layer's init: norm layers start at gamma = 1, beta = 0, which
// would hide a swapped gamma/beta gradient).
using flowdiff::test::randomise;
using flowdiff::test::require_ok;

}  // namespace

TEST_CASE("Linear: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(1);
  for (bool bias : {true, false}) {
    nn::Parameters<double> ps;
    nn::Linear<double> fc(ps, "fc", 5, 3, bias);
    ps.allocate();
    randomise(ps, gen);
    auto x = fd::randn<double>({4, 5}, gen);
    fd::Tensor<double> y({4, 3}), dx({4, 5});
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {y.view()}, [&] { fc.forward(ps, x, y); },
        [&](const auto& dy) { fc.backward(ps, x, dy[0], dx); }, gen);
    require_ok(rep);
  }
  // Token sequences [N, L, in].
  nn::Parameters<double> ps;
  nn::Linear<double> fc(ps, "proj", 4, 6);
  ps.allocate();
  randomise(ps, gen);
  auto x = fd::randn<double>({2, 3, 4}, gen);
  fd::Tensor<double> y({2, 3, 6}), dx({2, 3, 4});
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {y.view()}, [&] { fc.forward(ps, x, y); },
      [&](const auto& dy) { fc.backward(ps, x, dy[0], dx); }, gen));
}

TEST_CASE("Linear: fused SiLU / GELU forward and backward give the separate passes' bits",
          "[nn][dense]") {
  // Packed and threaded (1024 rows), thin (3 rows; 2 outputs), and a ragged shape; float takes
  // flowdiff's sgemm (epilogue per finished block), double Eigen (epilogue per panel).
  const fd::index_t shapes[][3] = {{1024, 256, 256}, {3, 40, 50}, {300, 37, 2}, {77, 2, 45}};
  fd::Generator gen(3);
  for (const auto& sh : shapes) {
    const fd::index_t n = sh[0], in = sh[1], out = sh[2];
    INFO("rows " << n << " in " << in << " out " << out);
    nn::Parameters<float> ps;
    nn::Linear<float> a(ps, "a", in, out), b(ps, "b", out, in);
    ps.allocate();
    fd::fill_normal(ps.flat_params(), gen);
    auto x = fd::randn<float>({n, in}, gen);
    auto g = fd::randn<float>({n, in}, gen);
    // forward: pre = a(x), act = silu(pre)
    fd::Tensor<float> pre1({n, out}), act1({n, out}), pre2({n, out}), act2({n, out});
    a.forward(ps, x, pre1);
    nn::silu_forward<float>(pre1, act1);
    a.forward_silu(ps, x, pre2, act2);
    CHECK(std::memcmp(pre1.data(), pre2.data(), sizeof(float) * pre1.numel()) == 0);
    CHECK(std::memcmp(act1.data(), act2.data(), sizeof(float) * act1.numel()) == 0);
    // backward of b (input act = silu(pre)): dpre = silu'(pre) (g W_b)
    fd::Tensor<float> d1({n, out}), d2({n, out});
    ps.zero_grad();
    b.backward(ps, act1, g, d1);
    nn::silu_backward<float>(pre1, d1, d1);
    const auto flat = ps.flat_grads();
    const std::vector<float> grads1(flat.data(), flat.data() + flat.numel());
    ps.zero_grad();
    b.backward_through_silu(ps, act1, g, pre1, d2);
    CHECK(std::memcmp(d1.data(), d2.data(), sizeof(float) * d1.numel()) == 0);
    CHECK(std::memcmp(grads1.data(), ps.flat_grads().data(), sizeof(float) * grads1.size()) == 0);
    // GELU, both forms: forward_gelu = forward + gelu_forward, backward_through_gelu =
    // backward + gelu_backward.
    for (auto approx : {nn::GeluApprox::tanh, nn::GeluApprox::none}) {
      INFO("GELU " << (approx == nn::GeluApprox::tanh ? "tanh" : "erf"));
      a.forward(ps, x, pre1);
      nn::gelu_forward<float>(pre1, act1, approx);
      a.forward_gelu(ps, x, pre2, act2, approx);
      CHECK(std::memcmp(pre1.data(), pre2.data(), sizeof(float) * pre1.numel()) == 0);
      CHECK(std::memcmp(act1.data(), act2.data(), sizeof(float) * act1.numel()) == 0);
      ps.zero_grad();
      b.backward(ps, act1, g, d1);
      nn::gelu_backward<float>(pre1, d1, d1, approx);
      b.backward_through_gelu(ps, act1, g, pre1, d2, approx);
      CHECK(std::memcmp(d1.data(), d2.data(), sizeof(float) * d1.numel()) == 0);
    }
  }
  // The fused pair in double: fc2(silu(fc1(x))) against central differences.
  nn::Parameters<double> ps;
  nn::Linear<double> fc1(ps, "fc1", 5, 7), fc2(ps, "fc2", 7, 3);
  ps.allocate();
  randomise(ps, gen);
  auto x = fd::randn<double>({4, 5}, gen);
  fd::Tensor<double> pre({4, 7}), act({4, 7}), dpre({4, 7}), y({4, 3}), dx({4, 5});
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {y.view()},
      [&] {
        fc1.forward_silu(ps, x, pre, act);
        fc2.forward(ps, act, y);
      },
      [&](const auto& dy) {
        fc2.backward_through_silu(ps, act, dy[0], pre, dpre);
        fc1.backward(ps, x, dpre, dx);
      },
      gen));
  CHECK_THROWS_WITH(fc1.forward_silu(ps, x, pre, pre), Contains("different arrays"));
  // Outputs that share memory with an input of the same backward product are refused.
  CHECK_THROWS_WITH(fc2.backward_through_silu(ps, act, y, pre, pre),
                    Contains("fc2 (Linear): dpre must not share memory with pre"));
  fd::Tensor<double> big({4, 10});
  fd::View<double> dy_part(big.data(), fd::Shape{4, 3});         // dy in the first 12 values
  fd::View<double> dpre_part(big.data() + 10, fd::Shape{4, 7});  // dpre overlaps dy's tail
  CHECK_THROWS_WITH(fc2.backward_through_silu(ps, act, dy_part, pre, dpre_part),
                    Contains("fc2 (Linear): dpre must not share memory with dy"));
  fd::View<double> dx_part(big.data() + 8, fd::Shape{4, 7});
  CHECK_THROWS_WITH(fc2.backward(ps, act, dy_part, dx_part),
                    Contains("fc2 (Linear): dx must not share memory with dy"));
}

TEST_CASE("Activations: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(2);
  auto x = fd::randn<double>({3, 7}, gen);
  fd::scale(x, 2.0);
  fd::Tensor<double> y({3, 7}), dx({3, 7});
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, [&] { nn::silu_forward(x, y.view()); },
      [&](const auto& dy) { nn::silu_backward(x, dy[0], dx.view()); }, gen));
  for (auto approx : {nn::GeluApprox::none, nn::GeluApprox::tanh}) {
    require_ok(nn::gradcheck(
        {{"x", x.view(), dx.view()}}, nullptr, {y.view()},
        [&] { nn::gelu_forward(x, y.view(), approx); },
        [&](const auto& dy) { nn::gelu_backward(x, dy[0], dx.view(), approx); }, gen));
  }
}

TEST_CASE("LayerNorm: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(3);
  for (bool affine : {true, false}) {
    for (fd::Shape shape : {fd::Shape{3, 5}, fd::Shape{2, 3, 4}}) {
      const auto c = shape[shape.rank() - 1];
      nn::Parameters<double> ps;
      nn::LayerNorm<double> ln(ps, "ln", c, 1e-5, affine);
      if (ps.count() > 0) {
        ps.allocate();
        randomise(ps, gen);
      }
      nn::LayerNorm<double>::Cache cache;
      auto x = fd::randn<double>(shape, gen);
      fd::Tensor<double> y(shape), dx(shape);
      require_ok(nn::gradcheck(
          {{"x", x.view(), dx.view()}}, affine ? &ps : nullptr, {y.view()},
          [&] { ln.forward(ps, x, y, cache); },
          [&](const auto& dy) { ln.backward(ps, x, dy[0], dx, cache); }, gen));
    }
  }
}

TEST_CASE("GroupNorm: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(4);
  struct Case {
    fd::Shape shape;
    fd::index_t groups;
    bool affine;
  };
  for (const Case& k : {Case{{2, 6, 2, 3}, 3, true}, Case{{2, 4, 5}, 1, true},
                        Case{{3, 4}, 2, true}, Case{{2, 6, 3}, 6, false}}) {
    nn::Parameters<double> ps;
    nn::GroupNorm<double> gn(ps, "gn", k.groups, k.shape[1], 1e-5, k.affine);
    if (k.affine) {
      ps.allocate();
      randomise(ps, gen);
    }
    nn::GroupNorm<double>::Cache cache;
    auto x = fd::randn<double>(k.shape, gen);
    fd::Tensor<double> y(k.shape), dx(k.shape);
    require_ok(nn::gradcheck(
        {{"x", x.view(), dx.view()}}, k.affine ? &ps : nullptr, {y.view()},
        [&] { gn.forward(ps, x, y, cache); },
        [&](const auto& dy) { gn.backward(ps, x, dy[0], dx, cache); }, gen));
  }
}

TEST_CASE("GroupNorm + SiLU fused: forward_silu and backward_through_silu", "[nn][dense]") {
  // forward_silu == forward then silu_forward, bit for bit; backward_through_silu == silu_backward
  // (in place) then backward, bit for bit; backward_silu (y recomputed from x, dact left alone)
  // the same bits again; forward_silu / recompute without y the same act; and the fused pair
  // passes central differences. The second shape's sets are larger than the first's (the
  // per-thread scratch of backward_silu grows).
  fd::Generator gen(14);
  for (const auto& shape : {fd::Shape{3, 8, 5, 7}, fd::Shape{2, 8, 33, 40}})
  for (const bool affine : {true, false}) {
    nn::Parameters<float> ps;
    nn::GroupNorm<float> gn(ps, "gn", 4, 8, 1e-5f, affine);
    if (affine) {
      ps.allocate();
      fd::fill_normal(ps.flat_params(), gen);
    }
    auto x = fd::randn<float>(shape, gen);
    auto dact = fd::randn<float>(shape, gen);
    nn::GroupNorm<float>::Cache c1, c2;
    fd::Tensor<float> y1(shape), a1(shape), y2(shape), a2(shape);
    gn.forward(ps, x, y1, c1);
    nn::silu_forward<float>(y1, a1);
    gn.forward_silu(ps, x, y2, a2, c2);
    CHECK(std::equal(y1.data(), y1.data() + y1.numel(), y2.data()));
    CHECK(std::equal(a1.data(), a1.data() + a1.numel(), a2.data()));
    {  // act alone: forward_silu and recompute without y
      nn::GroupNorm<float>::Cache c3;
      fd::Tensor<float> a3(shape), a4(shape);
      gn.forward_silu(ps, x, fd::View<float>(), a3, c3);
      CHECK(std::equal(a1.data(), a1.data() + a1.numel(), a3.data()));
      CHECK(std::equal(c1.mean.data(), c1.mean.data() + c1.mean.numel(), c3.mean.data()));
      gn.recompute(ps, x, fd::View<float>(), a4, c1);
      CHECK(std::equal(a1.data(), a1.data() + a1.numel(), a4.data()));
      CHECK_THROWS_WITH(gn.recompute(ps, x, fd::View<float>(), fd::View<float>(), c1),
                        Catch::Contains("y"));
    }

    // mode 0: silu_backward then backward; 1: backward_through_silu; 2: backward_silu
    auto run = [&](int mode, fd::Tensor<float>& dy, fd::Tensor<float>& dx) {
      dy = dact.clone();
      dx = fd::Tensor<float>(shape);
      if (affine) ps.zero_grad();
      if (mode == 2) {
        gn.backward_silu(ps, x, dy, dx, c1);
      } else if (mode == 1) {
        gn.backward_through_silu(ps, x, y1, dy, dx, c1);
      } else {
        nn::silu_backward<float>(y1, dy, dy);
        gn.backward(ps, x, dy, dx, c1);
      }
      return affine ? std::vector<float>(ps.flat_grads().data(),
                                         ps.flat_grads().data() + ps.flat_grads().numel())
                    : std::vector<float>{};
    };
    fd::Tensor<float> dy_sep, dx_sep, dy_fused, dx_fused, dact_x, dx_x;
    const auto g_sep = run(0, dy_sep, dx_sep);
    const auto g_fused = run(1, dy_fused, dx_fused);
    const auto g_x = run(2, dact_x, dx_x);
    CHECK(std::equal(dy_sep.data(), dy_sep.data() + dy_sep.numel(), dy_fused.data()));
    CHECK(std::equal(dx_sep.data(), dx_sep.data() + dx_sep.numel(), dx_fused.data()));
    CHECK(g_sep == g_fused);
    CHECK(std::equal(dx_sep.data(), dx_sep.data() + dx_sep.numel(), dx_x.data()));
    CHECK(g_sep == g_x);
    CHECK(std::equal(dact.data(), dact.data() + dact.numel(), dact_x.data()));  // untouched
    {  // with a residual: dx + r in the same pass, the bits of a separate add
      auto r = fd::randn<float>(shape, gen);
      fd::Tensor<float> dxr(shape);
      gn.backward_silu(ps, x, dact, dxr, c1, r);
      bool same = true;
      for (fd::index_t i = 0; i < r.numel(); ++i) same = same && dxr[i] == dx_x[i] + r[i];
      CHECK(same);
      CHECK_THROWS_WITH(gn.backward_silu(ps, x, dact, r, c1, r), Catch::Contains("residual"));
    }
    CHECK_THROWS_WITH(gn.backward_through_silu(ps, x, y1, dy_fused, dy_fused, c1),
                      Catch::Contains("dact and dx must be different arrays"));
  }
  // Central differences through act = SiLU(GN(x)) with the fused pair (double).
  nn::Parameters<double> ps;
  nn::GroupNorm<double> gn(ps, "gn", 2, 4, 1e-5, true);
  ps.allocate();
  randomise(ps, gen);
  nn::GroupNorm<double>::Cache cache;
  const fd::Shape shape{2, 4, 3, 2};
  auto x = fd::randn<double>(shape, gen);
  fd::Tensor<double> y(shape), act(shape), dx(shape), g(shape);
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {act.view()},
      [&] { gn.forward_silu(ps, x, y, act, cache); },
      [&](const auto& dy) {
        fd::copy(g.view(), dy[0]);
        gn.backward_through_silu(ps, x, y, g, dx, cache);
      },
      gen));
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {act.view()},
      [&] { gn.forward_silu(ps, x, fd::View<double>(), act, cache); },
      [&](const auto& dy) { gn.backward_silu(ps, x, dy[0], dx, cache); }, gen));
}

TEST_CASE("Embedding: gradients match central differences; the null row is the last",
          "[nn][dense][gradcheck]") {
  fd::Generator gen(5);
  nn::Parameters<double> ps;
  nn::Embedding<double> emb(ps, "y_embedder.embedding_table", 4, 3);
  ps.allocate();
  emb.init(ps, gen);
  CHECK(ps.param(emb.weight_id()).shape() == fd::Shape{5, 3});
  CHECK(emb.null_label() == 4);
  // Repeated labels (accumulation into one row) and the null label; row 2 is unused.
  auto labels = fd::Tensor<fd::label_t>::from({6}, {0, 3, 3, 4, 1, 0});
  fd::Tensor<double> y({6, 3});
  emb.forward(ps, labels, y);
  CHECK(y(3, 1) == ps.param(emb.weight_id())(4, 1));
  require_ok(nn::gradcheck(
      {}, &ps, {y.view()}, [&] { emb.forward(ps, labels, y); },
      [&](const auto& dy) { emb.backward(ps, labels, dy[0]); }, gen));
  CHECK(fd::sum(ps.grad(emb.weight_id()).row(2)) == 0.0);
}

TEST_CASE("Time embeddings: DiT values and d/dt match central differences",
          "[nn][dense][gradcheck]") {
  fd::Generator gen(6);
  auto t = fd::rand<double>({5}, gen);
  fd::Tensor<double> dt({5});
  for (fd::index_t dim : {8, 7}) {
    nn::SinusoidalTimeEmbedding<double> te(dim);
    fd::Tensor<double> y({5, dim});
    te.forward(t, y);
    // DiT's timestep_embedding by hand: cos block then sin block, zero-padded when dim is odd.
    const fd::index_t half = dim / 2;
    for (fd::index_t i = 0; i < half; ++i) {
      const double f = std::exp(-std::log(10000.0) * double(i) / double(half));
      CHECK(y(2, i) == Approx(std::cos(1000.0 * t[2] * f)).epsilon(1e-12));
      CHECK(y(2, half + i) == Approx(std::sin(1000.0 * t[2] * f)).epsilon(1e-12));
    }
    if (dim % 2) CHECK(y(4, dim - 1) == 0.0);
    // The phases move 1000x faster than t, so the third derivative that sets the truncation
    // error h^2 f'''/6 is ~1e9: a smaller step keeps that well below the tolerance.
    require_ok(nn::gradcheck(
        {{"t", t.view(), dt.view()}}, nullptr, {y.view()}, [&] { te.forward(t, y); },
        [&](const auto& dy) { te.backward(t, dy[0], dt); }, gen, {.h = 2e-7}));
  }
  nn::GaussianFourierFeatures<double> ff(6, 4.0, gen);
  fd::Tensor<double> y({5, 6});
  require_ok(nn::gradcheck(
      {{"t", t.view(), dt.view()}}, nullptr, {y.view()}, [&] { ff.forward(t, y); },
      [&](const auto& dy) { ff.backward(t, dy[0], dt); }, gen));
  ff.forward(t, y);
  const double a = 2 * std::numbers::pi * t[1] * ff.frequencies()[2];
  CHECK(y(1, 2) == Approx(std::sin(a)).epsilon(1e-12));
  CHECK(y(1, 5) == Approx(std::cos(a)).epsilon(1e-12));
}

TEST_CASE("SinusoidalTimeEmbedding (float): std::cos / std::sin's values, in and beyond "
          "fast_sincos' range",
          "[nn][dense]") {
  // fast_sincos for arguments up to fast_sincos_limit, std:: beyond (t = 2000: 1000 t = 2e6, so
  // the first frequencies' arguments exceed it and the last ones do not); every value rounded to
  // float equals float(std::cos(a)) / float(std::sin(a)), odd and even dims, ragged halves.
  for (const fd::index_t dim : {64, 41}) {
    nn::SinusoidalTimeEmbedding<float> te(dim);
    const std::vector<float> ts = {0.f, 1e-4f, 0.37f, 1.f, -0.25f, 2000.f, -1500.f};
    fd::Tensor<float> t({fd::index_t(ts.size())}), y({fd::index_t(ts.size()), dim});
    for (std::size_t n = 0; n < ts.size(); ++n) t.data()[n] = ts[n];
    te.forward(t, y);
    const fd::index_t half = dim / 2;
    for (fd::index_t n = 0; n < t.numel(); ++n)
      for (fd::index_t i = 0; i < half; ++i) {
        const double f = std::exp(-std::log(10000.0) * double(i) / double(half));
        const double a = 1000.0 * static_cast<double>(ts[static_cast<std::size_t>(n)]) * f;
        INFO("t " << ts[static_cast<std::size_t>(n)] << ", i " << i << ", a " << a);
        CHECK(y(n, i) == static_cast<float>(std::cos(a)));
        CHECK(y(n, half + i) == static_cast<float>(std::sin(a)));
      }
  }
}

TEST_CASE("Dropout: inverted scaling, reproducible mask, identity at p = 0 and in eval",
          "[nn][dense][gradcheck]") {
  fd::Generator gen(7);
  nn::Dropout<double> drop(0.25);
  nn::Dropout<double>::Cache cache;
  auto x = fd::randn<double>({4, 6}, gen);
  fd::Tensor<double> y({4, 6}), dx({4, 6});
  const fd::Generator seed(99);
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, nullptr, {y.view()},
      [&] {
        fd::Generator g = seed;  // the same mask on every call
        drop.forward(x, y, cache, g);
      },
      [&](const auto& dy) { drop.backward(dy[0], dx, cache); }, gen));

  // Mask statistics on a large tensor: kept fraction ~ 1 - p, kept values scaled by 1 / (1 - p).
  auto ones = fd::Tensor<double>::full({200, 100}, 1.0);
  fd::Tensor<double> out({200, 100});
  fd::Generator g(5);
  drop.forward(ones, out, cache, g);
  fd::index_t kept = 0;
  for (fd::index_t i = 0; i < out.numel(); ++i) {
    REQUIRE((out[i] == 0.0 || out[i] == Approx(1.0 / 0.75).epsilon(1e-15)));
    kept += out[i] != 0.0;
  }
  // 20000 Bernoulli(0.75) draws: sd = sqrt(20000 * 0.1875) ~ 61; allow 5 sd.
  CHECK(std::abs(double(kept) - 15000.0) < 5 * 61.3);
  // Same generator state, same mask; sample i's mask does not depend on the batch size.
  fd::Tensor<double> out2({200, 100}), out_half({100, 100});
  fd::Generator g2(5), g3(5);
  drop.forward(ones, out2, cache, g2);
  drop.forward(ones.reshape({200, 100}).rows(0, 100), out_half, cache, g3);
  CHECK(out2.to_vector() == out.to_vector());
  for (fd::index_t i = 0; i < out_half.numel(); ++i) REQUIRE(out_half[i] == out[i]);

  // Eval mode and p = 0: identity, generator untouched.
  fd::Generator g4(1);
  drop.forward(x, y, cache, g4, /*training=*/false);
  CHECK(y.to_vector() == x.to_vector());
  CHECK(g4.offset() == 0);
  nn::Dropout<double> none(0.0);
  none.forward(x, y, cache, g4);
  CHECK(y.to_vector() == x.to_vector());
  none.backward(x, dx, cache);
  CHECK(dx.to_vector() == x.to_vector());
  CHECK(g4.offset() == 0);
  CHECK_THROWS_AS(nn::Dropout<double>(1.0), fd::config_error);
}

TEST_CASE("Modulation, residual add and channel concatenation: gradients match central differences",
          "[nn][dense][gradcheck]") {
  fd::Generator gen(8);
  for (auto axis : {nn::ChannelAxis::first, nn::ChannelAxis::last}) {
    const fd::Shape xs =
        axis == nn::ChannelAxis::first ? fd::Shape{2, 3, 2, 2} : fd::Shape{2, 5, 3};
    auto x = fd::randn<double>(xs, gen);
    auto sc = fd::randn<double>({2, 3}, gen);
    auto sh = fd::randn<double>({2, 3}, gen);
    fd::Tensor<double> y(xs), dx(xs), dsc({2, 3}), dsh({2, 3});
    require_ok(nn::gradcheck(
        {{"x", x.view(), dx.view()},
         {"scale", sc.view(), dsc.view()},
         {"shift", sh.view(), dsh.view()}},
        nullptr, {y.view()}, [&] { nn::modulate_forward(x, sc, sh, y.view(), axis); },
        [&](const auto& dy) {
          nn::modulate_backward(x, sc, dy[0], dx.view(), dsc.view(), dsh.view(), axis);
        },
        gen));
  }
  {
    // [N, C] is [N, C, ...] with no trailing positions.
    auto x = fd::randn<double>({3, 4}, gen);
    auto sc = fd::randn<double>({3, 4}, gen);
    auto sh = fd::randn<double>({3, 4}, gen);
    fd::Tensor<double> y({3, 4});
    nn::modulate_forward(x, sc, sh, y.view());
    CHECK(y(1, 2) == Approx(x(1, 2) * (1 + sc(1, 2)) + sh(1, 2)).epsilon(1e-15));
  }
  auto a = fd::randn<double>({2, 3, 2}, gen);
  auto b = fd::randn<double>({2, 3, 2}, gen);
  fd::Tensor<double> y({2, 3, 2}), da({2, 3, 2}), db({2, 3, 2});
  require_ok(nn::gradcheck(
      {{"a", a.view(), da.view()}, {"b", b.view(), db.view()}}, nullptr, {y.view()},
      [&] { nn::add_forward(a, b, y.view()); },
      [&](const auto& dy) { nn::add_backward(dy[0], da.view(), db.view()); }, gen));
  auto c = fd::randn<double>({2, 1, 2}, gen);
  fd::Tensor<double> yc({2, 4, 2}), dc({2, 1, 2});
  require_ok(nn::gradcheck(
      {{"a", a.view(), da.view()}, {"c", c.view(), dc.view()}}, nullptr, {yc.view()},
      [&] { nn::concat_channels(a, c, yc.view()); },
      [&](const auto& dy) { nn::split_channels(dy[0], da.view(), dc.view()); }, gen));
  CHECK(yc(1, 3, 1) == c(1, 0, 1));
  CHECK(yc(1, 2, 0) == a(1, 2, 0));
  fd::copy(da, db);
  nn::accumulate(da.view(), db);
  CHECK(da(0, 0, 0) == 2 * db(0, 0, 0));
}

TEST_CASE("The gradient checker rejects wrong, zero and non-finite gradients", "[nn][gradcheck]") {
  fd::Generator gen(9);
  auto x = fd::randn<double>({2, 3}, gen);
  fd::Tensor<double> y({2, 3}), dx({2, 3});
  auto fwd = [&] { nn::silu_forward(x, y.view()); };
  // A backward that is off by 1e-4 relative fails.
  auto rep = nn::gradcheck(
      {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, fwd,
      [&](const auto& dy) {
        nn::silu_backward(x, dy[0], dx.view());
        fd::scale(dx, 1.0001);
      },
      gen);
  CHECK_FALSE(rep.ok());
  CHECK(rep.max_error == Approx(1e-4).epsilon(1e-3));
  CHECK_THROWS_WITH(nn::gradcheck(
                        {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, fwd,
                        [&](const auto&) { fd::fill(dx, 0.0); }, gen),
                    Contains("all zero"));
  CHECK_THROWS_WITH(nn::gradcheck(
                        {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, fwd,
                        [&](const auto&) { fd::fill(dx, std::nan("")); }, gen),
                    Contains("not finite"));
  // A backward that accumulates into an input gradient breaks the convention.
  fd::fill(dx, 0.0);
  CHECK_THROWS_WITH(nn::gradcheck(
                        {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, fwd,
                        [&](const auto& dy) {
                          fd::Tensor<double> t({2, 3});
                          nn::silu_backward(x, dy[0], t.view());
                          nn::accumulate(dx.view(), t);
                        },
                        gen),
                    Contains("must be overwritten"));
}

// ---------------------------------------------------------------------------------------------
// PyTorch parity (fp32): tests/fixtures/layers_dense.safetensors from
// tools/fixtures/layers_dense.py
// ---------------------------------------------------------------------------------------------
namespace {

std::filesystem::path dense_fixture() {
  return flowdiff::test::fixture_path("layers_dense.safetensors");
}

// Compares against a PyTorch reference by normalised MSE sum((a-b)^2) / sum(b^2) <= 1e-7
// (DESIGN §4), after checking both are finite and the reference is not all zero.
struct Parity {
  fd::io::SafetensorsFile file = fd::io::SafetensorsFile::read(dense_fixture());
  double worst = 0;
  std::string worst_name;

  fd::Tensor<float> get(const std::string& name) const { return file.tensor<float>(name); }

  void compare(const std::string& name, fd::View<const float> a) {
    const auto ref = get(name);
    INFO(name);
    REQUIRE(a.shape() == ref.shape());
    double num = 0, den = 0;
    for (fd::index_t i = 0; i < ref.numel(); ++i) {
      REQUIRE(std::isfinite(a[i]));
      REQUIRE(std::isfinite(ref[i]));
      const double d = double(a[i]) - double(ref[i]);
      num += d * d;
      den += double(ref[i]) * double(ref[i]);
    }
    REQUIRE(den > 0);
    const double e = num / den;
    CHECK(e <= 1e-7);
    if (e >= worst) {
      worst = e;
      worst_name = name;
    }
  }

  // Loads every registered parameter from its state_dict name.
  void load(nn::Parameters<float>& ps) const {
    for (fd::index_t id = 0; id < ps.count(); ++id) {
      INFO(ps.info(id).name);
      auto t = get(ps.info(id).name);
      REQUIRE(t.shape() == ps.info(id).shape);
      fd::copy(ps.param(id), t);
    }
  }

  // Compares every parameter gradient with "<case>:grad.<name without the case prefix>".
  void compare_grads(const nn::Parameters<float>& ps, const std::string& kase) {
    for (fd::index_t id = 0; id < ps.count(); ++id)
      compare(kase + ":grad." + ps.info(id).name.substr(kase.size() + 1), ps.grad(id));
  }
};

}  // namespace

TEST_CASE("Dense layers match PyTorch (fp32 fixtures)", "[nn][dense][parity]") {
  REQUIRE(std::filesystem::exists(dense_fixture()));
  Parity P;

  for (auto [kase, in, out, bias] :
       {std::tuple{"linear", 5, 3, true}, std::tuple{"linear_tokens", 6, 4, false}}) {
    nn::Parameters<float> ps;
    nn::Linear<float> fc(ps, kase, in, out, bias);
    ps.allocate();
    P.load(ps);
    const std::string k = kase;
    auto x = P.get(k + ":x");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(dy.shape()), dx(x.shape());
    fc.forward(ps, x, y);
    fc.backward(ps, x, dy, dx);
    P.compare(k + ":y", y);
    P.compare(k + ":dx", dx);
    P.compare_grads(ps, k);
  }

  for (std::string k : {"silu", "gelu", "gelu_tanh"}) {
    auto x = P.get(k + ":x");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(x.shape()), dx(x.shape());
    if (k == "silu") {
      nn::silu_forward(x, y.view());
      nn::silu_backward(x, dy, dx.view());
    } else {
      const auto a = k == "gelu" ? nn::GeluApprox::none : nn::GeluApprox::tanh;
      nn::gelu_forward(x, y.view(), a);
      nn::gelu_backward(x, dy, dx.view(), a);
    }
    P.compare(k + ":y", y);
    P.compare(k + ":dx", dx);
  }

  for (auto [kase, c, eps, affine] : {std::tuple{"layernorm", 8, 1e-5f, true},
                                      std::tuple{"layernorm_noaffine", 6, 1e-6f, false}}) {
    const std::string k = kase;
    nn::Parameters<float> ps;
    nn::LayerNorm<float> ln(ps, k, c, eps, affine);
    if (affine) ps.allocate();
    P.load(ps);
    nn::LayerNorm<float>::Cache cache;
    auto x = P.get(k + ":x");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(x.shape()), dx(x.shape());
    ln.forward(ps, x, y, cache);
    ln.backward(ps, x, dy, dx, cache);
    P.compare(k + ":y", y);
    P.compare(k + ":dx", dx);
    P.compare_grads(ps, k);
  }

  for (auto [kase, groups, c] :
       {std::tuple{"groupnorm", 4, 8}, std::tuple{"groupnorm_2d", 3, 12}}) {
    const std::string k = kase;
    nn::Parameters<float> ps;
    nn::GroupNorm<float> gn(ps, k, groups, c);
    ps.allocate();
    P.load(ps);
    nn::GroupNorm<float>::Cache cache;
    auto x = P.get(k + ":x");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(x.shape()), dx(x.shape());
    gn.forward(ps, x, y, cache);
    gn.backward(ps, x, dy, dx, cache);
    P.compare(k + ":y", y);
    P.compare(k + ":dx", dx);
    P.compare_grads(ps, k);
  }

  {
    nn::Parameters<float> ps;
    nn::Embedding<float> emb(ps, "embedding", 5, 4);
    ps.allocate();
    P.load(ps);
    auto labels = P.file.tensor<fd::label_t>("embedding:labels");
    auto dy = P.get("embedding:dy");
    fd::Tensor<float> y(dy.shape());
    emb.forward(ps, labels, y);
    emb.backward(ps, labels, dy);
    P.compare("embedding:y", y);
    P.compare_grads(ps, "embedding");
  }

  for (auto [kase, dim] : {std::tuple{"timestep", 16}, std::tuple{"timestep_odd", 9}}) {
    const std::string k = kase;
    nn::SinusoidalTimeEmbedding<float> te(dim, 1000.0);
    auto t = P.get(k + ":t");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(dy.shape()), dt(t.shape());
    te.forward(t, y);
    te.backward(t, dy, dt);
    P.compare(k + ":y", y);
    P.compare(k + ":dt", dt);
  }
  {
    fd::Generator gen(0);
    auto w = P.get("fourier:W");
    nn::GaussianFourierFeatures<float> ff(2 * w.numel(), 4.0f, gen);
    ff.set_frequencies(w);
    auto t = P.get("fourier:t");
    auto dy = P.get("fourier:dy");
    fd::Tensor<float> y(dy.shape()), dt(t.shape());
    ff.forward(t, y);
    ff.backward(t, dy, dt);
    P.compare("fourier:y", y);
    P.compare("fourier:dt", dt);
  }

  for (std::string k : {"film", "adaln"}) {
    const auto axis = k == "film" ? nn::ChannelAxis::first : nn::ChannelAxis::last;
    auto x = P.get(k + ":x");
    auto sc = P.get(k + ":scale");
    auto sh = P.get(k + ":shift");
    auto dy = P.get(k + ":dy");
    fd::Tensor<float> y(x.shape()), dx(x.shape()), dsc(sc.shape()), dsh(sh.shape());
    nn::modulate_forward(x, sc, sh, y.view(), axis);
    nn::modulate_backward(x, sc, dy, dx.view(), dsc.view(), dsh.view(), axis);
    P.compare(k + ":y", y);
    P.compare(k + ":dx", dx);
    P.compare(k + ":dscale", dsc);
    P.compare(k + ":dshift", dsh);
  }
  WARN("PyTorch parity: worst normalised MSE " << P.worst << " (" << P.worst_name
                                               << "), bound 1e-7");
}

TEST_CASE("Dense layers name the layer, expected and actual shape on bad input",
          "[nn][dense][errors]") {
  nn::Parameters<float> ps;
  nn::Linear<float> fc(ps, "enc.fc1", 4, 3);
  nn::LayerNorm<float> ln(ps, "enc.norm1", 4);
  nn::GroupNorm<float> gn(ps, "enc.gn", 2, 6);
  nn::Embedding<float> emb(ps, "y_embedder", 3, 5);
  ps.allocate();

  fd::Tensor<float> x({2, 5}), y({2, 3});
  CHECK_THROWS_AS(fc.forward(ps, x, y), fd::shape_error);
  CHECK_THROWS_WITH(
      fc.forward(ps, x, y),
      Contains("enc.fc1 (Linear): x: expected shape [N, ..., in] with 4 at axis -1, got [2, 5]"));
  fd::Tensor<float> x2({2, 4}), y2({3, 3}), dx2({2, 3});
  CHECK_THROWS_WITH(fc.forward(ps, x2, y2),
                    Contains("enc.fc1 (Linear): y: expected shape [2, 3], got [3, 3]"));
  fd::Tensor<float> dy2({2, 3});
  CHECK_THROWS_WITH(fc.backward(ps, x2, dy2, dx2),
                    Contains("enc.fc1 (Linear): dx: expected shape [2, 4], got [2, 3]"));

  nn::LayerNorm<float>::Cache lc;
  fd::Tensor<float> z({3, 5}), z2({3, 4}), z3({3, 4});
  CHECK_THROWS_WITH(ln.forward(ps, z, z, lc),
                    Contains("enc.norm1 (LayerNorm): x: expected shape [..., C] with 4") &&
                        Contains("got [3, 5]"));
  CHECK_THROWS_WITH(
      ln.backward(ps, z2, z3, z3, lc),
      Contains(
          "enc.norm1 (LayerNorm): cache.mean (run forward first): expected shape [3], got [0]"));
  fd::Tensor<float> z4({2, 4});
  CHECK_THROWS_WITH(ln.forward(ps, z2, z4, lc),
                    Contains("enc.norm1 (LayerNorm): y: expected shape [3, 4], got [2, 4]"));

  nn::GroupNorm<float>::Cache gc;
  fd::Tensor<float> g1({2, 4, 3}), g2({2, 6, 3}), g3({2, 6, 4});
  CHECK_THROWS_WITH(
      gn.forward(ps, g1, g1, gc),
      Contains(
          "enc.gn (GroupNorm): x: expected shape [N, C, ...] with 6 at axis 1, got [2, 4, 3]"));
  CHECK_THROWS_WITH(gn.forward(ps, g2, g3, gc),
                    Contains("enc.gn (GroupNorm): y: expected shape [2, 6, 3], got [2, 6, 4]"));
  CHECK_THROWS_AS(nn::GroupNorm<float>(ps, "bad", 4, 6), fd::config_error);

  auto labels = fd::Tensor<fd::label_t>::from({2}, {0, 4});
  fd::Tensor<float> e1({2, 5}), e2({2, 4});
  CHECK_THROWS_WITH(
      emb.forward(ps, labels, e1),
      Contains(
          "y_embedder (Embedding): labels[1] must lie in [0, 3] (3 is the null label), got 4"));
  auto ok_labels = fd::Tensor<fd::label_t>::from({2}, {0, 3});
  CHECK_THROWS_WITH(emb.forward(ps, ok_labels, e2),
                    Contains("y_embedder (Embedding): y: expected shape [2, 5], got [2, 4]"));

  nn::SinusoidalTimeEmbedding<float> te(8);
  fd::Tensor<float> t({3}), ty({3, 6});
  CHECK_THROWS_WITH(
      te.forward(t, ty),
      Contains("SinusoidalTimeEmbedding (time embedding): y: expected shape [3, 8], got [3, 6]"));

  fd::Tensor<float> mx({2, 3, 4}), ms({2, 4}), my({2, 3, 4});
  CHECK_THROWS_WITH(
      nn::modulate_forward(mx, ms, ms, my.view()),
      Contains("modulate_forward: x: expected shape [N, C, ...] with N = 2, C = 4, got [2, 3, 4]"));
  CHECK_NOTHROW(nn::modulate_forward(mx, ms, ms, my.view(), nn::ChannelAxis::last));
  fd::Tensor<float> ca({2, 3, 4}), cb({2, 1, 5}), cy({2, 4, 4});
  CHECK_THROWS_WITH(nn::concat_channels(ca, cb, cy.view()),
                    Contains("concat_channels: expected") &&
                        Contains("got a: [2, 3, 4], b: [2, 1, 5], y: [2, 4, 4]"));
}

TEST_CASE("Norm caches keep their storage while the batch shape is unchanged", "[nn][dense]") {
  fd::Generator gen(10);
  nn::Parameters<float> ps;
  nn::GroupNorm<float> gn(ps, "gn", 2, 4);
  ps.allocate();
  gn.init(ps, gen);
  nn::GroupNorm<float>::Cache cache;
  auto x = fd::randn<float>({3, 4, 5}, gen);
  fd::Tensor<float> y({3, 4, 5});
  gn.forward(ps, x, y, cache);
  const float* m0 = cache.mean.data();
  gn.forward(ps, x, y, cache);
  CHECK(cache.mean.data() == m0);
  CHECK(cache.mean.shape() == fd::Shape{6});
  // Default init (gamma = 1, beta = 0): every group has mean 0 and variance ~1 after the layer.
  double s = 0, ss = 0;
  for (fd::index_t j = 0; j < 10; ++j) {
    s += y[j];
    ss += double(y[j]) * y[j];
  }
  CHECK(std::abs(s) < 1e-5);
  CHECK(ss / 10 == Approx(1.0).epsilon(1e-4));
}
