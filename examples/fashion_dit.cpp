// fashion_dit — a class-conditional diffusion transformer (nn::DiT: patchify, sin-cos positions,
// adaLN-Zero blocks conditioned on time and class) trained on Fashion-MNIST in pixel space by
// conditional flow matching with classifier-free label dropout (eta = 0.1), then sampled with
// classifier-free guidance u~ = (1 - w) u(x|∅) + w u(x|y) for several w. Like fashion_cfg (same
// flags, same outputs) with a DiT instead of the U-Net: a 10 x 8 sample grid per w (one row per
// class), the loss curve, and the metrics table printed and written as CSV (agreement of the
// samples with their class under the cached evaluation classifier, Fréchet distance to real test
// images in its penultimate features, and the real-vs-real floor). The 28 x 28 images are cut
// into (28 / p)^2 patches (p = 4: 49 tokens). Training checkpoints to the output folder and
// resumes from it.
// --device cuda trains and samples the DiT on a GPU: nn::BackendDiT<float, Cuda> from the same
// initial weights, train::BackendTrainer with the same steps, random numbers and files (a
// checkpoint resumes on either device), and nn::as_field of the device model under cfg for the
// samples; the data batches, the sampler's noise and labels are made on the host and copied over,
// the samples copied back for the metrics. CMake compiles this file with nvcc when it finds the
// CUDA toolkit; without a usable device, or in a build without the toolkit, it says so in one line
// and runs on the CPU (examples/common/device.hpp).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/fashion.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "fashion_dit",
      "Class-conditional flow matching on Fashion-MNIST with a diffusion transformer (DiT, "
      "adaLN-Zero) trained here in pixel space (CFG dropout), sampled with classifier-free "
      "guidance; sample grids per guidance scale and a metrics table (classifier agreement, "
      "Frechet distance in classifier features).");
  auto flags = fd::examples::add_fashion_flags(
      cli, {.out = "out/fashion_dit", .train_steps = 6000, .lr = 1e-3});
  cli.place_before("eta");  // the DiT's flags are listed after --lr
  auto& patch = cli.option<long>("patch", 4, "patch size p (28 / p tokens a side)");
  auto& hidden = cli.option<long>("hidden", 96, "token width D (a multiple of 4 and of heads)");
  auto& depth = cli.option<long>("depth", 4, "transformer blocks");
  auto& heads = cli.option<long>("heads", 4, "attention heads");
  auto& mlp_ratio = cli.option<double>("mlp-ratio", 4.0, "MLP width / D");
  auto& device_flag = fd::examples::add_device_flag(cli, "the DiT trains and samples");
  if (!cli.parse(argc, argv)) return 0;
  const fd::Device device =
      fd::examples::resolve_example_device("fashion_dit", device_flag, "training and sampling");
  flags.validate();
  fd::require<fd::config_error>(patch >= 1 && 28 % patch == 0,
                                "--patch must divide the image size 28, got ", patch);
  const auto t_start = std::chrono::steady_clock::now();
  const std::filesystem::path out(flags.out), cache(flags.cache);
  std::filesystem::create_directories(out);

  const bool quick = flags.quick != 0;
  const auto data = fd::examples::load_fashion("fashion_dit", flags.data_dir, flags.limit, quick);
  const fd::index_t k = data.num_classes();
  const auto classifier = fd::examples::evaluation_classifier(
      "fashion_dit", cache, data, flags.classifier_epochs, quick, 20, flags.seed + 17);

  // The DiT (the configuration checks — D % heads, D % 4 — are DiTConfig's) and its training.
  nn::Parameters<float> ps;
  nn::DiT<float> dit(ps, {.in_channels = 1,
                          .image_size = 28,
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
      "fashion_dit: DiT p = %ld (%ld tokens), D = %ld, depth %ld, %ld heads, %ld "
      "parameters\n",
      patch, (28 / patch) * (28 / patch), hidden, depth, heads, static_cast<long>(ps.numel()));
  fd::data::Batcher batcher(data.train, flags.seed + 1);
  tr::BatcherSource source(batcher, fd::Shape{1, 28, 28}, k);
  const auto training = flags.training("dit_ema.safetensors");

  // Train, then sample: a 10 x 8 grid per w from the same noise for every w, and --eval-per-class
  // images per class for the metrics; the table, metrics.csv and the files written. On the device
  // (--device cuda) the model is nn::BackendDiT with the same weights.
  fd::examples::run_on_device<nn::BackendDiT>(
      device, dit, ps, [&](const auto& net, auto& net_ps, const std::string& where) {
        fd::examples::train_cfm_and_report(
            {.program = "fashion_dit", .started = t_start, .sampled_where = where}, flags, training,
            net, net_ps, source, classifier, data.test, fd::Shape{1, 28, 28});
      });
  return 0;
} catch (const std::exception& e) {
  std::cerr << "fashion_dit: error: " << e.what() << '\n';
  return 1;
}
