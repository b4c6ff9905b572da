// fashion_cfg — a class-conditional U-Net on Fashion-MNIST, trained here by conditional flow
// matching with classifier-free label dropout (eta = 0.1), then sampled with classifier-free
// guidance u~ = (1 - w) u(x|∅) + w u(x|y) for several w. It writes a 10 x 8 sample grid per w
// (one row per class), the loss curve, and a metrics table (printed and as CSV): the share of
// samples that a Fashion-MNIST classifier trained by flowdiff itself
// (metrics/classifier_metrics.hpp, cached after its first run) assigns to the class they were
// conditioned on, and the Fréchet distance between generated and real test images in that
// classifier's penultimate features, with the real-vs-real value at the same sample size as the
// floor. Training checkpoints to the output folder and resumes from it, so a second run continues
// (or, when finished, goes straight to sampling).
// --device cuda trains and samples the U-Net on a GPU: nn::BackendUNet<float, Cuda> (nn::UNet
// without attention, which fashion_cfg never uses) from the same initial weights,
// train::BackendTrainer with the same steps, random numbers and files (a checkpoint resumes on
// either device), and nn::as_field of the device model under cfg for the samples; the data batches,
// the sampler's noise and labels are made on the host and copied over, the samples copied back for
// the metrics. CMake compiles this file with nvcc when it finds the CUDA toolkit; without a usable
// device, or in a build without the toolkit, it says so in one line and runs on the CPU
// (examples/common/device.hpp).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/nn/models/classifier.hpp>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/fashion.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using Clock = std::chrono::steady_clock;
using flowdiff::examples::parse_list;

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "fashion_cfg",
      "Class-conditional flow matching on Fashion-MNIST with a U-Net trained here (CFG dropout), "
      "sampled with classifier-free guidance; sample grids per guidance scale and a metrics table "
      "(classifier agreement, Frechet distance in classifier features).");
  auto flags = fd::examples::add_fashion_flags(
      cli, {.out = "out/fashion_cfg", .train_steps = 1600, .lr = 2e-3});
  cli.place_before("eta");  // the U-Net's flags are listed after --lr
  auto& channels_text =
      cli.option<std::string>("channels", "16,32,64", "U-Net channels per resolution level");
  auto& res_layers = cli.option<long>("res-layers", 1, "residual blocks per U-Net stage");
  auto& device_flag = fd::examples::add_device_flag(
      cli,
      "the U-Net trains and samples (on cuda: nn::UNet without attention, which fashion_cfg "
      "never uses)");
  if (!cli.parse(argc, argv)) return 0;
  const fd::Device device =
      fd::examples::resolve_example_device("fashion_cfg", device_flag, "training and sampling");
  flags.validate();
  const auto channels = parse_list<fd::index_t>("channels", channels_text);
  fd::require<fd::config_error>(res_layers >= 1, "--res-layers must be >= 1, got ", res_layers);
  const auto t_start = Clock::now();
  const std::filesystem::path out(flags.out), cache(flags.cache);
  std::filesystem::create_directories(out);

  // Data: 28 x 28 images in [-1, 1] (the U-Net's levels halve 28 -> 14 -> 7), and the
  // evaluation classifier (trained once, then loaded from the cache).
  const bool quick = flags.quick != 0;
  const auto data = fd::examples::load_fashion("fashion_cfg", flags.data_dir, flags.limit, quick);
  const fd::index_t k = data.num_classes();
  const auto classifier = fd::examples::evaluation_classifier(
      "fashion_cfg", cache, data, flags.classifier_epochs, quick, 20, flags.seed + 17);

  // The U-Net (initialised on the host: the same weights on either device) and its training.
  nn::Parameters<float> ps;
  nn::UNet<float> unet(ps, {.in_channels = 1,
                            .channels = channels,
                            .num_residual_layers = res_layers,
                            .num_classes = k});
  ps.allocate();
  fd::Generator gen(flags.seed);
  unet.init(ps, gen);
  std::printf("fashion_cfg: U-Net channels %s, %ld residual block(s) per stage, %ld parameters\n",
              channels_text.c_str(), res_layers, static_cast<long>(ps.numel()));
  fd::data::Batcher batcher(data.train, flags.seed + 1);
  tr::BatcherSource source(batcher, fd::Shape{1, 28, 28}, k);
  const auto training = flags.training("unet_ema.safetensors");

  // Train, then sample: a 10 x 8 grid (one row per class) per w, from the same noise for every w,
  // and --eval-per-class images per class for the metrics; the table, metrics.csv and the files
  // written. On the device (--device cuda) the model is nn::BackendUNet with the same weights.
  fd::examples::run_on_device<nn::BackendUNet>(
      device, unet, ps, [&](const auto& net, auto& net_ps, const std::string& where) {
        fd::examples::train_cfm_and_report(
            {.program = "fashion_cfg", .started = t_start, .sampled_where = where}, flags, training,
            net, net_ps, source, classifier, data.test, fd::Shape{1, 28, 28});
      });
  return 0;
} catch (const std::exception& e) {
  std::cerr << "fashion_cfg: error: " << e.what() << '\n';
  return 1;
}
