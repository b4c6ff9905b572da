// fashion_latent — latent flow matching on Fashion-MNIST (as latent diffusion, Rombach et al.
// 2022): a convolutional VAE (nn::VAE, 28 x 28 -> 4 x 7 x 7) is trained once and cached; the
// training set is encoded once to the posterior means z = s mu(x), with s = 1 / std(mu(x)) so
// the latents have unit variance like the N(0, I) source (s is measured when the VAE is trained
// and stored in its checkpoint); a class-conditional DiT (patch size 1: 49 latent tokens) is
// trained on them by conditional flow matching with CFG label dropout eta = 0.1; samples of
// u~ = (1 - w) u(z|∅) + w u(z|y) are decoded, x = D(z / s), and scored like fashion_cfg's: a
// 10 x 8 grid per w, agreement with the conditioning class under the cached evaluation
// classifier, Fréchet distance in its features, the real-vs-real floor, printed and as CSV. Also
// the VAE's reconstruction error (per-pixel MSE of D(mu(x)) on the test set) and a picture of
// test images above their reconstructions. The posterior mean rather than a posterior draw: the
// data set is encoded once, so a draw would freeze one noise sample per image (noise without the
// augmentation a fresh draw per epoch gives); the run prints the posterior spread next to the
// latents' so the choice can be judged.
// --device cuda trains the VAE (when it is not cached) and the latent DiT on a GPU, and samples
// the DiT there: nn::BackendVAE<float, Cuda> through load_or_train_vae's training hook (upload,
// train_vae, download: the cache, the latent scale and the test error are computed on the host as
// before) and nn::BackendDiT<float, Cuda> with train::BackendTrainer and nn::as_field under cfg,
// from the same initial weights, random numbers and files as on the CPU (a checkpoint resumes on
// either device). Encoding the training set once and decoding the samples stay on the CPU (a few
// seconds). CMake compiles this file with nvcc when it finds the CUDA toolkit; without a usable
// device, or in a build without the toolkit, it says so in one line and runs on the CPU
// (examples/common/device.hpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/nn/latent.hpp>
#include <flowdiff/train/vae.hpp>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/fashion.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using flowdiff::examples::parse_list;
using flowdiff::examples::seconds_since;

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "fashion_latent",
      "Latent flow matching on Fashion-MNIST: a VAE trained here (cached) encodes the images to "
      "4x7x7 latents scaled to unit variance, a class-conditional DiT is trained on them with "
      "CFG dropout, and its guided samples are decoded; sample grids per guidance scale, the "
      "VAE's reconstruction error and a metrics table (classifier agreement, Frechet distance).");
  auto flags = fd::examples::add_fashion_flags(
      cli, {.out = "out/fashion_latent",
            .train_steps = 6000,
            .lr = 1e-3,
            .cache_help = "folder of the cached evaluation classifier and VAE",
            .train_steps_help = "optimizer steps of the latent DiT",
            .batch_help = "latent DiT training batch size",
            .quick_help = "1: tiny smoke run (classifier and VAE not cached, no 90% bar)"});
  cli.place_before("train-steps");  // the VAE's flags are listed after --cache
  auto& vae_steps = cli.option<long>("vae-steps", 2000, "VAE training steps");
  auto& vae_batch = cli.option<long>("vae-batch", 64, "VAE training batch size");
  auto& vae_lr = cli.option<double>("vae-lr", 2e-3, "VAE peak learning rate");
  auto& vae_channels_text =
      cli.option<std::string>("vae-channels", "32,64", "VAE widths after each stride-2 level");
  auto& vae_base = cli.option<long>("vae-base", 32, "VAE full-resolution width");
  auto& latent_channels = cli.option<long>("latent-channels", 4, "latent channels z");
  auto& vae_beta = cli.option<double>("vae-beta", 1e-3, "KL weight of the VAE loss");
  cli.place_before("eta");  // the DiT's flags are listed after --lr
  auto& patch = cli.option<long>("patch", 1, "DiT patch size on the latent (1 or its side)");
  auto& hidden = cli.option<long>("hidden", 96, "token width D (a multiple of 4 and of heads)");
  auto& depth = cli.option<long>("depth", 4, "transformer blocks");
  auto& heads = cli.option<long>("heads", 4, "attention heads");
  auto& mlp_ratio = cli.option<double>("mlp-ratio", 4.0, "MLP width / D");
  auto& device_flag =
      fd::examples::add_device_flag(cli, "the VAE and the latent DiT train and the DiT samples");
  if (!cli.parse(argc, argv)) return 0;
  const fd::Device device =
      fd::examples::resolve_example_device("fashion_latent", device_flag, "training and sampling");
  flags.validate();
  const auto vae_channels = parse_list<fd::index_t>("vae-channels", vae_channels_text);
  fd::require<fd::config_error>(vae_steps >= 1 && vae_batch >= 1,
                                "--vae-steps and --vae-batch must be >= 1, got ", vae_steps,
                                " and ", vae_batch);
  const auto t_start = std::chrono::steady_clock::now();
  const std::filesystem::path out(flags.out), cache(flags.cache);
  std::filesystem::create_directories(out);

  const bool quick = flags.quick != 0;
  const auto data =
      fd::examples::load_fashion("fashion_latent", flags.data_dir, flags.limit, quick);
  const fd::index_t k = data.num_classes();
  const auto classifier = fd::examples::evaluation_classifier(
      "fashion_latent", cache, data, flags.classifier_epochs, quick, 20, flags.seed + 17);

  // The VAE: loaded from the cache when it holds this configuration, else trained and cached
  // with its latent scale.
  nn::Parameters<float> vps;
  nn::VAE<float> vae(vps, {.in_channels = 1,
                           .image_size = 28,
                           .channels = vae_channels,
                           .base_channels = vae_base,
                           .latent_channels = latent_channels,
                           .beta = vae_beta});
  vps.allocate();
  const fd::Shape latent = vae.latent_shape(1).tail();
  std::printf("fashion_latent: VAE widths %s, base %ld, latent %ldx%ldx%ld, %ld parameters\n",
              vae_channels_text.c_str(), vae_base, static_cast<long>(latent[0]),
              static_cast<long>(latent[1]), static_cast<long>(latent[2]),
              static_cast<long>(vps.numel()));
  fd::Generator vgen(flags.seed + 7);
  const tr::VAETrainOptions vae_options{
      .steps = vae_steps,
      .batch = vae_batch,
      .lr = vae_lr,
      .log_every = std::max<long>(1, std::min<long>(100, vae_steps / 10))};
  // Training where --device says (the cache and the figures are the host's either way).
  const auto train_vae_here = [&](nn::Parameters<float>& p, fd::Generator& g) {
#if defined(__CUDACC__)
    if (device == fd::Device::cuda) {
      nn::Parameters<float, fd::Cuda> dps;
      const nn::BackendVAE<float, fd::Cuda> dvae(dps, vae.config());
      dps.allocate();
      nn::upload_parameters(dps, p);
      const auto rep = tr::train_vae(dvae, dps, data.train.images.view(), vae_options, g);
      nn::download_parameters(p, dps);
      return rep;
    }
#endif
    return tr::train_vae(vae, p, data.train.images.view(), vae_options, g);
  };
  const auto vae_report = tr::load_or_train_vae<float>(
      quick ? std::filesystem::path() : cache / "fashion_vae.safetensors", vae, vps,
      data.train.images, data.test.images, vae_options, vgen, train_vae_here);
  std::printf(
      "fashion_latent: VAE %s: test reconstruction MSE %.5f per pixel (on [-1, 1]), latent "
      "scale %.4f\n",
      vae_report.loaded ? "(cached)" : "trained", vae_report.test_mse, vae_report.latent_scale);
  const nn::LatentCodec<float> codec(vae, vps, vae_report.latent_scale);

  // The reconstruction picture: rows of 8 test images, each above its reconstruction D(mu(x)).
  {
    const fd::index_t m = std::min<fd::index_t>(32, data.test.size());
    const auto x = fd::View<const float>(data.test.images.view().rows(0, m));
    const auto xr = codec.decode(codec.encode(x));
    fd::Tensor<float> pic(fd::Shape{2 * ((m + 7) / 8) * 8, 1, 28, 28});
    fd::fill(pic.view(), -1.0f);
    const fd::index_t row = x.row_size();
    for (fd::index_t i = 0; i < m; ++i) {
      const fd::index_t r = i / 8, c = i % 8;
      std::copy_n(x.data() + i * row, row, pic.data() + ((2 * r) * 8 + c) * row);
      std::copy_n(xr.data() + i * row, row, pic.data() + ((2 * r + 1) * 8 + c) * row);
    }
    fd::io::write_png_grid<float>(out / "reconstruction.png", pic, 8);
  }

  // The training set encoded once: z = s mu(x). The posterior spread exp(logvar / 2), in the
  // same units, says how much a posterior draw would differ from the mean.
  const auto t_encode = std::chrono::steady_clock::now();
  fd::data::ImageDataset latents;
  latents.images = codec.encode(data.train.images);
  latents.labels = data.train.labels.clone();
  latents.num_classes = k;
  const double encode_seconds = seconds_since(t_encode);
  const auto moments = nn::latent_moments<float>(latents.images.view());
  double posterior_sd = 0;
  {
    const fd::index_t m = std::min<fd::index_t>(250, data.train.size());
    fd::Tensor<float> mu(vae.latent_shape(m)), logvar(vae.latent_shape(m));
    nn::VAE<float>::EncoderCache ec;
    vae.encode(vps, fd::View<const float>(data.train.images.view().rows(0, m)), mu.view(),
               logvar.view(), ec);
    for (fd::index_t i = 0; i < logvar.numel(); ++i) posterior_sd += std::exp(0.5 * logvar[i]);
    posterior_sd *= vae_report.latent_scale / static_cast<double>(logvar.numel());
  }
  std::printf(
      "fashion_latent: encoded %ld training images in %.1f s: scaled latents mean %.3f, std "
      "%.3f; mean posterior std %.3f (same units)\n",
      static_cast<long>(data.train.size()), encode_seconds, moments.mean, moments.std,
      posterior_sd);

  // The latent DiT and its training.
  nn::Parameters<float> ps;
  fd::require<fd::config_error>(patch >= 1 && latent[1] % patch == 0,
                                "--patch must divide the latent size ", latent[1], ", got ", patch);
  nn::DiT<float> dit(ps, {.in_channels = latent[0],
                          .image_size = latent[1],
                          .patch_size = patch,
                          .hidden = hidden,
                          .depth = depth,
                          .heads = heads,
                          .mlp_ratio = mlp_ratio,
                          .num_classes = k});
  ps.allocate();
  fd::Generator gen(flags.seed);
  dit.init(ps, gen);
  std::printf(
      "fashion_latent: latent DiT p = %ld (%ld tokens), D = %ld, depth %ld, %ld heads, "
      "%ld parameters\n",
      patch, static_cast<long>((latent[1] / patch) * (latent[1] / patch)), hidden, depth, heads,
      static_cast<long>(ps.numel()));
  fd::data::Batcher batcher(latents, flags.seed + 1);
  tr::BatcherSource source(batcher, latent, k);
  const auto training = flags.training("dit_ema.safetensors");

  // Train, then sample in latent space, decoded to images for the grid and the metrics; the table
  // (with the VAE's figures), metrics.csv (with the VAE's columns) and the files written. On the
  // device (--device cuda) the DiT is nn::BackendDiT with the same weights; the samples come back
  // to the host for the decoder.
  const auto decode = [&](const fd::Tensor<float>& z) { return codec.decode(z.view()); };
  char vae_line[128];
  std::snprintf(vae_line, sizeof vae_line,
                "VAE test reconstruction MSE %.5f per pixel; latent scale %.4f\n",
                vae_report.test_mse, vae_report.latent_scale);
  using fd::examples::csv_value;
  fd::examples::run_on_device<nn::BackendDiT>(
      device, dit, ps, [&](const auto& net, auto& net_ps, const std::string& where) {
        fd::examples::train_cfm_and_report(
            {.program = "fashion_latent",
             .started = t_start,
             .sampled_where = " in latent space" + where + ", then decoded",
             .note = vae_line,
             .csv = {{"vae_steps", csv_value(vae_report.steps)},
                     {"vae_seconds", csv_value(vae_report.seconds)},
                     {"vae_test_mse", csv_value(vae_report.test_mse)},
                     {"latent_scale", csv_value(vae_report.latent_scale)}},
             .files = {out / "reconstruction.png"}},
            flags, training, net, net_ps, source, classifier, data.test, latent, decode);
      });
  return 0;
} catch (const std::exception& e) {
  std::cerr << "fashion_latent: error: " << e.what() << '\n';
  return 1;
}
