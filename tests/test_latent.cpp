// Latent flow matching plumbing (nn/latent.hpp, train/vae.hpp): batched encoding and decoding
// equal the one-shot VAE calls, the unit-variance scale against its definition, the codec's
// scaling round trip, VAE training lowering the reconstruction error of a small structured data
// set, the cached checkpoint (reused with its latent scale when it describes the same VAE,
// replaced when it does not or is corrupt), and error messages.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/backend/cpu/isa.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/latent.hpp>
#include <flowdiff/nn/models/vae.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/train/vae.hpp>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using Catch::Matchers::Contains;

namespace {

nn::VAEConfig latent_test_config(double beta = 1e-3) {
  return {.in_channels = 1,
          .image_size = 8,
          .channels = {4, 8},
          .base_channels = 4,
          .latent_channels = 2,
          .groups = 2,
          .beta = beta};
}

// n images [n, 1, 8, 8] in [-1, 1]: a bright horizontal or vertical bar at a random place on a
// dark background (structure a small VAE can learn in a few hundred steps).
fd::Tensor<float> latent_test_bars(fd::index_t n, std::uint64_t seed) {
  fd::Generator gen(seed);
  fd::Tensor<float> x = fd::Tensor<float>::full({n, 1, 8, 8}, -1.0f);
  for (fd::index_t i = 0; i < n; ++i) {
    const auto pos = static_cast<fd::index_t>(gen.uniform_int(8));
    const bool vertical = gen.uniform_int(2) == 1;
    for (fd::index_t j = 0; j < 8; ++j) x[i * 64 + (vertical ? j * 8 + pos : pos * 8 + j)] = 1.0f;
  }
  return x;
}

std::filesystem::path latent_test_dir(const std::string& name) {
  const auto d = std::filesystem::temp_directory_path() /
                 ("flowdiff_test_latent_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

double latent_test_max_diff(fd::View<const float> a, fd::View<const float> b) {
  REQUIRE(a.shape() == b.shape());
  double m = 0;
  for (fd::index_t i = 0; i < a.numel(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

}  // namespace

TEST_CASE("latent: batched encoding and decoding equal the one-shot VAE calls", "[latent]") {
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, latent_test_config());
  ps.allocate();
  fd::Generator gen(3);
  vae.init(ps, gen);
  const auto x = fd::randn<float>({5, 1, 8, 8}, gen);

  nn::VAE<float>::Cache cache;
  fd::Tensor<float> mu(vae.latent_shape(5)), xhat(vae.image_shape(5));
  vae.encode_latent(ps, x.view(), mu.view(), cache);
  const auto z = nn::encode_images(vae, ps, x.view(), 2);  // batches of 2, 2, 1
  REQUIRE(z.shape() == fd::Shape{5, 2, 2, 2});
  fd::check_finite("z", z);
  CHECK(latent_test_max_diff(z.view(), mu.view()) <= 1e-5);

  vae.decode(ps, mu.view(), xhat.view(), cache.dec);
  const auto xr = nn::decode_latents(vae, ps, z.view(), 3);  // batches of 3, 2
  REQUIRE(xr.shape() == x.shape());
  CHECK(latent_test_max_diff(xr.view(), xhat.view()) <= 1e-5);

  // A posterior draw differs from the mean by exp(logvar / 2) eps: not the mean, but close to it
  // in units of the spread.
  fd::Generator g2(9);
  const auto zs = nn::encode_images(vae, ps, x.view(), 5, &g2);
  CHECK(latent_test_max_diff(zs.view(), mu.view()) > 1e-3);
}

TEST_CASE("latent: moments and the unit-variance scale", "[latent]") {
  const std::vector<float> vals{1, 2, 3, 4};
  const fd::Tensor<float> v = fd::Tensor<float>::from(fd::Shape{4}, std::span<const float>(vals));
  const auto m = nn::latent_moments<float>(v.view());
  CHECK(m.mean == Approx(2.5).epsilon(1e-12));
  CHECK(m.std == Approx(std::sqrt(5.0 / 3.0)).epsilon(1e-12));  // unbiased, as torch.std
  CHECK(nn::unit_variance_scale<float>(v.view()) == Approx(1 / std::sqrt(5.0 / 3.0)));

  // z = 3 + 2 eps over 40000 values: std 2 within a few standard errors (2 / sqrt(2 n) = 0.007).
  fd::Generator gen(4);
  auto z = fd::randn<float>({100, 4, 10, 10}, gen);
  for (fd::index_t i = 0; i < z.numel(); ++i) z[i] = 3 + 2 * z[i];
  CHECK(nn::unit_variance_scale<float>(z.view()) == Approx(0.5).margin(0.5 * 0.03));

  const auto c = fd::Tensor<float>::full({3, 2}, 1.5f);
  CHECK_THROWS_WITH(nn::unit_variance_scale<float>(c.view()), Contains("zero spread"));
  CHECK_THROWS_WITH(nn::latent_moments<float>(fd::Tensor<float>({1}).view()),
                    Contains("at least 2 values"));
}

TEST_CASE("latent: the codec scales to unit variance and decodes its own latents", "[latent]") {
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, latent_test_config());
  ps.allocate();
  fd::Generator gen(5);
  vae.init(ps, gen);
  const auto x = latent_test_bars(40, 6);
  const auto z = nn::encode_images(vae, ps, x.view(), 16);
  const double s = nn::unit_variance_scale<float>(z.view());
  REQUIRE(std::isfinite(s));
  const nn::LatentCodec<float> codec(vae, ps, s, 7);
  CHECK(codec.sample_shape() == fd::Shape{2, 2, 2});
  const auto zs = codec.encode(x.view());
  CHECK(nn::latent_moments<float>(zs.view()).std == Approx(1.0).epsilon(1e-5));
  // encode_images took 16 images at a time, the codec 7: with flowdiff's own GEMM (x86) a
  // sample's latent does not depend on its batch; with Eigen's (other CPUs) a batch's size
  // changes its products' rounding, so there the bound is ten times looser.
  const bool own_gemm = fd::simd::best_isa() != fd::simd::Isa::none;
  const double eps = own_gemm ? 1e-6 : 1e-5, margin = own_gemm ? 1e-7 : 1e-6;
  for (fd::index_t i = 0; i < z.numel(); ++i)
    REQUIRE(zs[i] == Approx(s * z[i]).epsilon(eps).margin(margin));
  const auto xr = codec.decode(zs.view());
  const auto xd = nn::decode_latents(vae, ps, z.view(), 40);
  CHECK(latent_test_max_diff(xr.view(), xd.view()) <= 1e-5);

  CHECK_THROWS_WITH(nn::LatentCodec<float>(vae, ps, 0.0), Contains("finite and > 0, got 0"));
  CHECK_THROWS_WITH(nn::LatentCodec<float>(vae, ps, 1.0, 0), Contains("batch must be >= 1"));
  CHECK_THROWS_WITH(nn::encode_images<float>(vae, ps, fd::Tensor<float>({2, 1, 8, 9}).view(), 4),
                    Contains("[N, 1, 8, 8]"));
}

TEST_CASE("latent: VAE training lowers the reconstruction error; the checkpoint is reused",
          "[latent][train]") {
  const auto train = latent_test_bars(256, 11);
  const auto test = latent_test_bars(64, 12);
  const auto dir = latent_test_dir("vae");
  const auto file = dir / "vae.safetensors";
  tr::VAETrainOptions o{.steps = 150, .batch = 32, .lr = 1e-2, .warmup_steps = 10};
  o.log = nullptr;

  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, latent_test_config());
  ps.allocate();
  fd::Generator init(21);
  vae.init(ps, init);
  const double before = tr::reconstruction_mse(vae, ps, test.view(), 16);

  fd::Generator gen(21);
  const auto rep = tr::load_or_train_vae(file, vae, ps, train.view(), test.view(), o, gen);
  CHECK_FALSE(rep.loaded);
  CHECK(rep.steps == 150);
  REQUIRE(std::isfinite(rep.test_mse));
  CHECK(rep.test_mse < 0.5 * before);  // measured: about 0.9 -> 0.15 on these bars
  CHECK(rep.test_mse == Approx(tr::reconstruction_mse(vae, ps, test.view())).epsilon(1e-9));
  const auto z = nn::encode_images(vae, ps, train.view(), 64);
  CHECK(rep.latent_scale == Approx(nn::unit_variance_scale<float>(z.view())).epsilon(1e-9));
  REQUIRE(std::filesystem::exists(file));
  CHECK(fd::io::SafetensorsFile::read(file).metadata().at("latent_scale").size() > 0);

  // Same configuration: loaded, same parameters, same scale, nothing trained.
  nn::Parameters<float> ps2;
  nn::VAE<float> vae2(ps2, latent_test_config());
  ps2.allocate();
  fd::Generator gen2(99);
  const auto rep2 = tr::load_or_train_vae(file, vae2, ps2, train.view(), test.view(), o, gen2);
  CHECK(rep2.loaded);
  CHECK(rep2.latent_scale == rep.latent_scale);
  CHECK(rep2.test_mse == Approx(rep.test_mse).epsilon(1e-12));
  CHECK(latent_test_max_diff(ps2.flat_params(), ps.flat_params()) == 0);

  // Another configuration (beta): the cache is stale, reported and replaced.
  std::ostringstream log;
  tr::VAETrainOptions o3 = o;
  o3.steps = 5;
  o3.log = &log;
  nn::Parameters<float> ps3;
  nn::VAE<float> vae3(ps3, latent_test_config(0.5));
  ps3.allocate();
  fd::Generator gen3(1);
  const auto rep3 = tr::load_or_train_vae(file, vae3, ps3, train.view(), test.view(), o3, gen3);
  CHECK_FALSE(rep3.loaded);
  CHECK_THAT(log.str(), Contains("cannot use the cache") && Contains("beta=0.5"));
  CHECK(fd::io::SafetensorsFile::read(file).metadata().at("flowdiff.vae").find("beta=0.5") !=
        std::string::npos);

  // Another training recipe (steps): a different VAE, so the cache is replaced as well.
  log.str("");
  tr::VAETrainOptions o4 = o3;
  o4.steps = 6;
  o4.log = &log;
  const auto rep5 = tr::load_or_train_vae(file, vae3, ps3, train.view(), test.view(), o4, gen3);
  CHECK_FALSE(rep5.loaded);
  CHECK_THAT(log.str(), Contains("trained=6x32"));

  // A corrupt file: replaced as well.
  { std::ofstream(file, std::ios::trunc) << "not a safetensors file"; }
  log.str("");
  const auto rep4 = tr::load_or_train_vae(file, vae3, ps3, train.view(), test.view(), o3, gen3);
  CHECK_FALSE(rep4.loaded);
  CHECK_THAT(log.str(), Contains("retraining"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("latent: train_vae errors name the argument", "[latent][train]") {
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, latent_test_config());
  ps.allocate();
  fd::Generator gen(1);
  vae.init(ps, gen);
  const auto x = latent_test_bars(8, 1);
  tr::VAETrainOptions o;
  o.log = nullptr;
  o.steps = 0;
  CHECK_THROWS_WITH(tr::train_vae(vae, ps, x.view(), o, gen), Contains("steps = 0"));
  o.steps = 2;
  o.lr = std::nan("");
  CHECK_THROWS_WITH(tr::train_vae(vae, ps, x.view(), o, gen), Contains("lr > 0"));
}
