// The convolutional VAE (nn/models/vae.hpp): the KL term against the closed form for two
// Gaussians and a Monte Carlo estimate, finite-difference gradient checks in double (fixed eps) of
// the whole loss w.r.t. x and every parameter, of the encoder and of the decoder, PyTorch parity in
// fp32 against tests/fixtures/vae.safetensors (tools/fixtures/vae.py; state_dicts loaded strictly),
// sampling / latent encoding and error messages.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/core/random.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/models/vae.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <string>
#include <vector>

#include "support/compare.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

using flowdiff::test::max_abs_diff;
using flowdiff::test::nmse;

nn::VAEConfig tiny_config(double beta) {
  return {.in_channels = 2,
          .image_size = 8,
          .channels = {4, 8},
          .base_channels = 4,
          .latent_channels = 2,
          .groups = 2,
          .beta = beta};
}

template <class T>
void perturb(nn::Parameters<T>& ps, fd::Generator& gen, double scale) {
  for (fd::index_t id = 0; id < ps.count(); ++id) {
    auto p = ps.param(id);
    for (fd::index_t i = 0; i < p.numel(); ++i)
      p.data()[i] += static_cast<T>(scale * gen.normal<double>());
  }
}

}  // namespace

TEST_CASE("VAE: the KL term equals the closed form and a Monte Carlo estimate", "[nn][vae]") {
  fd::Generator gen(1);
  auto mu = fd::randn<double>({3, 5}, gen);
  auto lv = fd::randn<double>({3, 5}, gen);
  // Closed form of KL(N(m, s^2) || N(m2, s2^2)) with m2 = 0, s2 = 1, written with sigmas.
  double ref = 0;
  for (fd::index_t i = 0; i < mu.numel(); ++i) {
    const double s = std::exp(0.5 * lv[i]);
    ref += std::log(1.0 / s) + (s * s + mu[i] * mu[i]) / 2.0 - 0.5;
  }
  const double kl = nn::gaussian_kl<double>(mu, lv);
  CHECK(std::abs(kl - ref) <= 1e-12 * std::abs(ref));
  // Monte Carlo: E_q[log q(z) - log p(z)], 2e5 draws per element; 5 sigma of the estimate.
  const fd::index_t m = 200000;
  auto eps = fd::randn<double>({m}, gen);
  double mc = 0, var = 0;
  for (fd::index_t i = 0; i < mu.numel(); ++i) {
    const double s = std::exp(0.5 * lv[i]);
    double sum = 0, sum2 = 0;
    for (fd::index_t k = 0; k < m; ++k) {
      const double z = mu[i] + s * eps[k];
      const double v = -0.5 * eps[k] * eps[k] - std::log(s) + 0.5 * z * z;
      sum += v;
      sum2 += v * v;
    }
    const double mean = sum / static_cast<double>(m);
    mc += mean;
    var += (sum2 / static_cast<double>(m) - mean * mean) / static_cast<double>(m);
  }
  CHECK(std::abs(mc - kl) <= 5 * std::sqrt(var));
  // The gradient against central differences.
  fd::Tensor<double> dmu({3, 5}), dlv({3, 5});
  nn::gaussian_kl_backward<double>(mu, lv, 0.7, dmu.view(), dlv.view());
  const double h = 1e-6;
  for (fd::index_t i = 0; i < mu.numel(); ++i) {
    const double m0 = mu[i], l0 = lv[i];
    mu[i] = m0 + h;
    const double kp = nn::gaussian_kl<double>(mu, lv);
    mu[i] = m0 - h;
    const double km = nn::gaussian_kl<double>(mu, lv);
    mu[i] = m0;
    lv[i] = l0 + h;
    const double lp = nn::gaussian_kl<double>(mu, lv);
    lv[i] = l0 - h;
    const double lm = nn::gaussian_kl<double>(mu, lv);
    lv[i] = l0;
    CHECK(std::abs(dmu[i] - 0.7 * (kp - km) / (2 * h)) <= 1e-7);
    CHECK(std::abs(dlv[i] - 0.7 * (lp - lm) / (2 * h)) <= 1e-7);
  }
}

TEST_CASE("VAE: gradients of the loss, the encoder and the decoder match central differences",
          "[nn][vae][gradcheck]") {
  fd::Generator gen(2);
  nn::Parameters<double> ps;
  nn::VAE<double> vae(ps, tiny_config(0.5));
  ps.allocate();
  vae.init(ps, gen);
  perturb(ps, gen,
          0.1);  // GroupNorm's (1, 0) init would leave its gradients special
  const fd::index_t n = 2;
  auto x = fd::randn<double>({n, 2, 8, 8}, gen);
  auto eps = fd::randn<double>(vae.latent_shape(n), gen);
  nn::VAE<double>::Cache cache;
  fd::Tensor<double> loss({1}), dx({n, 2, 8, 8});
  {  // The whole loss (fixed eps): L = dy * total.
    double scale = 0;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {loss.view()},
        [&] { loss[0] = vae.forward_with_noise(ps, x, eps, cache).total; },
        [&](const auto& dy) {
          scale = dy[0][0];
          vae.backward(ps, x, dx.view(), cache, scale);
        },
        gen);
    INFO(rep.summary());
    CHECK(rep.ok());
    WARN("VAE loss gradcheck: worst error " << rep.max_error);
  }
  // The encoder and the decoder alone, w.r.t. their inputs (their parameters share one store, so
  // each part leaves the other's gradients zero; every parameter is checked through the loss).
  {
    fd::Tensor<double> mu(vae.latent_shape(n)), lv(vae.latent_shape(n));
    fd::Tensor<double> dmu(mu.shape()), dlv(lv.shape());
    nn::VAE<double>::EncoderCache ec;
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, nullptr, {mu.view(), lv.view()},
        [&] { vae.encode(ps, x, mu.view(), lv.view(), ec); },
        [&](const auto& dy) { vae.encode_backward(ps, dy[0], dy[1], dx.view(), ec); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
  }
  {
    auto z = fd::randn<double>(vae.latent_shape(n), gen);
    fd::Tensor<double> xhat({n, 2, 8, 8}), dz(z.shape());
    nn::VAE<double>::DecoderCache dc;
    auto rep = nn::gradcheck(
        {{"z", z.view(), dz.view()}}, nullptr, {xhat.view()},
        [&] { vae.decode(ps, z, xhat.view(), dc); },
        [&](const auto& dy) { vae.decode_backward(ps, dy[0], dz.view(), dc); }, gen);
    INFO(rep.summary());
    CHECK(rep.ok());
  }
}

TEST_CASE("VAE: PyTorch state_dicts load strictly and give the same outputs, loss and gradients",
          "[nn][vae][parity]") {
  const auto path = std::filesystem::path(__FILE__).parent_path() / "fixtures" / "vae.safetensors";
  REQUIRE(std::filesystem::exists(path));
  const auto file = fd::io::SafetensorsFile::read(path);
  struct Case {
    std::string name;
    nn::VAEConfig config;
  };
  const std::vector<Case> cases = {
      {"small",
       {.in_channels = 2,
        .image_size = 12,
        .channels = {8, 16},
        .base_channels = 8,
        .latent_channels = 3,
        .groups = 4,
        .beta = 0.5}},
      {"fashion",
       {.in_channels = 1,
        .image_size = 28,
        .channels = {8, 8},
        .base_channels = 8,
        .latent_channels = 4,
        .groups = 4,
        .beta = 1e-3}},
  };
  double worst = 0;
  std::string worst_name;
  for (const auto& cs : cases) {
    INFO(cs.name);
    nn::Parameters<float> ps;
    nn::VAE<float> vae(ps, cs.config);
    ps.allocate();
    const auto rep = nn::load_parameters(ps, file, {.strict = true, .prefix = cs.name + ".model."});
    CHECK(rep.missing.empty());
    CHECK(rep.unexpected.empty());
    const auto x = file.tensor<float>(cs.name + ".x");
    const auto eps = file.tensor<float>(cs.name + ".eps");
    nn::VAE<float>::Cache cache;
    const auto l = vae.forward_with_noise(ps, x, eps, cache);
    fd::Tensor<float> dx(x.shape());
    ps.zero_grad();
    vae.backward(ps, x, dx.view(), cache);
    auto cmp = [&](const std::string& name, fd::View<const float> a) {
      INFO(name);
      const double e = nmse(a, file.tensor<float>(cs.name + "." + name));
      CHECK(e <= 1e-7);
      if (e >= worst) {
        worst = e;
        worst_name = cs.name + "." + name;
      }
    };
    cmp("mu", cache.mu);
    cmp("logvar", cache.logvar);
    cmp("z", cache.z);
    cmp("xhat", cache.xhat);
    cmp("dx", dx);
    for (fd::index_t id = 0; id < ps.count(); ++id) cmp("grad." + ps.info(id).name, ps.grad(id));
    const auto ref = file.tensor<double>(cs.name + ".loss");
    CHECK(l.recon == Approx(ref[0]).epsilon(1e-5));
    CHECK(l.kl == Approx(ref[1]).epsilon(1e-5));
    CHECK(l.total == Approx(ref[2]).epsilon(1e-5));
    CHECK(vae.latent_shape(1) == fd::Shape{1, cs.config.latent_channels, cs.config.image_size / 4,
                                           cs.config.image_size / 4});
  }
  WARN("VAE PyTorch parity: worst NMSE " << worst << " (" << worst_name << ")");
}

TEST_CASE("VAE: sampling, latent encoding and cache reuse", "[nn][vae]") {
  fd::Generator gen(3);
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, {.image_size = 28, .channels = {16, 32}, .base_channels = 16});
  ps.allocate();
  vae.init(ps, gen);
  CHECK(vae.latent_shape(5) == fd::Shape{5, 4, 7, 7});
  CHECK(ps.info(0).name == "encoder.conv_in.weight");
  CHECK(ps.find("decoder.up.1.conv.weight") >= 0);
  auto x = fd::rand<float>({5, 1, 28, 28}, gen);
  nn::VAE<float>::Cache cache;
  fd::Generator g1(9), g2(9);
  const auto l1 = vae.forward(ps, x, g1, cache);
  const float* xh = cache.xhat.data();
  const float* a0 = cache.enc.a0.data();
  fd::Tensor<float> eps1 = cache.eps.clone();
  const auto l2 = vae.forward(ps, x, g2, cache);
  CHECK(l1.total == l2.total);  // same seed, same loss
  CHECK(cache.xhat.data() == xh);
  CHECK(cache.enc.a0.data() == a0);
  CHECK(max_abs_diff(eps1, cache.eps) == 0);
  CHECK(std::isfinite(l1.total));
  CHECK(l1.total == Approx(l1.recon + 1e-3 * l1.kl));
  // encode_latent: the mean without a generator, mu + exp(logvar/2) eps with one.
  fd::Tensor<float> zm(vae.latent_shape(5)), zs(vae.latent_shape(5));
  vae.encode_latent(ps, x, zm.view(), cache);
  CHECK(max_abs_diff(zm, cache.mu) == 0);
  fd::Generator g3(4);
  vae.encode_latent(ps, x, zs.view(), cache, &g3);
  fd::Tensor<float> ref(zs.shape());
  nn::VAE<float>::reparameterize(cache.mu, cache.logvar, cache.eps, ref.view());
  CHECK(max_abs_diff(zs, ref) == 0);
  CHECK(max_abs_diff(zs, zm) > 0);
  // ... and it overwrote the posterior a kept forward() had left: loss() refuses until the next.
  CHECK_THROWS_WITH(vae.loss(x, cache), Contains("loss() needs a forward() call first"));
  // decode gives an image; skipping dx leaves the parameter gradients bit-identical.
  fd::Tensor<float> img({5, 1, 28, 28});
  vae.decode(ps, zm, img.view(), cache.dec);
  for (fd::index_t i = 0; i < img.numel(); ++i) REQUIRE(std::isfinite(img[i]));
  vae.forward(ps, x, g1, cache);
  fd::Tensor<float> dx(x.shape());
  ps.zero_grad();
  vae.backward(ps, x, dx.view(), cache);
  const auto g = ps.flat_grads();
  const std::vector<float> with_dx(g.data(), g.data() + g.numel());
  ps.zero_grad();
  vae.backward(ps, x, {}, cache);
  CHECK(std::vector<float>(g.data(), g.data() + g.numel()) == with_dx);
}

TEST_CASE("VAE: errors name the model, the argument and the shapes", "[nn][vae][errors]") {
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, {.image_size = 28, .channels = {16, 32}, .base_channels = 16});
  ps.allocate();
  nn::VAE<float>::Cache cache;
  fd::Generator gen(5);
  fd::Tensor<float> x32({2, 1, 32, 32}), x({2, 1, 28, 28}), mu({2, 4, 7, 7}), bad({2, 4, 7, 6});
  CHECK_THROWS_WITH(
      vae.forward(ps, x32, gen, cache),
      Contains("VAE: x: expected shape [N, 1, 28, 28] with N >= 1, got [2, 1, 32, 32]"));
  CHECK_THROWS_WITH(vae.encode(ps, x, mu.view(), bad.view(), cache.enc),
                    Contains("VAE: logvar: expected shape [2, 4, 7, 7], got [2, 4, 7, 6]"));
  fd::Tensor<float> img({2, 1, 28, 28}), img_bad({3, 1, 28, 28});
  CHECK_THROWS_WITH(vae.decode(ps, bad, img.view(), cache.dec),
                    Contains("VAE: z: expected shape [N, 4, 7, 7] with N >= 1, got [2, 4, 7, 6]"));
  CHECK_THROWS_WITH(vae.decode(ps, mu, img_bad.view(), cache.dec),
                    Contains("VAE: xhat: expected shape [2, 1, 28, 28], got [3, 1, 28, 28]"));
  CHECK_THROWS_WITH(vae.backward(ps, x, {}, cache), Contains("forward"));
  nn::VAE<float>::DecoderCache fresh;
  CHECK_THROWS_WITH(vae.decode_backward(ps, img, {}, fresh), Contains("decode()"));
  nn::Parameters<float> p2;
  CHECK_THROWS_WITH(nn::VAE<float>(p2, {.image_size = 30}),
                    Contains("image_size must be a positive multiple of 2^levels = 4, got 30"));
  CHECK_THROWS_WITH(nn::VAE<float>(p2, {.channels = {32, 60}}),
                    Contains("channel count 60 is not a positive multiple of groups = 8"));
  CHECK_THROWS_AS(nn::VAE<float>(p2, {.channels = {}}), fd::config_error);
  CHECK_THROWS_AS(nn::VAE<float>(p2, {.beta = -1}), fd::config_error);
}

TEST_CASE("VAE: the loss falls under Adam on a fixed batch", "[nn][vae]") {
  fd::Generator gen(6);
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, {.image_size = 8, .channels = {8, 8}, .base_channels = 8, .groups = 4});
  ps.allocate();
  vae.init(ps, gen);
  fd::train::Adam<float> opt({.lr = 3e-3});
  // Smooth images in [-1, 1]: a random phase and frequency per sample.
  fd::Tensor<float> x({8, 1, 8, 8});
  for (fd::index_t n = 0; n < 8; ++n) {
    const double ph = 6.28 * gen.uniform<double>(), f = 0.3 + 0.5 * gen.uniform<double>();
    for (fd::index_t i = 0; i < 64; ++i)
      x[n * 64 + i] = static_cast<float>(std::sin(f * static_cast<double>(i % 8 + i / 8) + ph));
  }
  nn::VAE<float>::Cache cache;
  fd::Generator noise(7);
  const double l0 = vae.forward(ps, x, noise, cache).total;
  nn::VAELoss l;
  for (int step = 0; step < 80; ++step) {
    ps.zero_grad();
    l = vae.forward(ps, x, noise, cache);
    vae.backward(ps, x, {}, cache);
    opt.step(ps);
  }
  l = vae.forward(ps, x, noise, cache);
  CHECK(l.total < 0.5 * l0);
  CHECK(l.kl > 0);
  WARN("VAE: 80 Adam steps, loss " << l0 << " -> " << l.total << " (recon " << l.recon << ", kl "
                                   << l.kl << ")");
}
