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
// --device cuda trains and samples the U-Net on a GPU in the nvcc build of this file,
// fashion_cfg_cuda (examples/fashion_cfg_cuda.cu): nn::BackendUNet<float, Cuda> (nn::UNet without
// attention, which fashion_cfg never uses) from the same initial weights, train::BackendTrainer
// with the same steps, random numbers and files (a checkpoint resumes on either device), and
// nn::as_field of the device model under cfg for the samples; the data batches, the sampler's
// noise and labels are made on the host and copied over, the samples copied back for the
// metrics. Without a usable device, and always in the plain C++ build, it says so in one line and
// runs on the CPU.
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

#if defined(__CUDACC__)
#include <flowdiff/backend/cuda/all.cuh>
#endif

#include "common/cli.hpp"
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
  auto& device_flag = cli.option<std::string>(
      "device", "cpu",
      "where the U-Net trains and samples: cpu or cuda (cuda needs the nvcc build, "
      "fashion_cfg_cuda; the device U-Net is nn::UNet without attention, which fashion_cfg "
      "never uses, so every configuration runs there; without a GPU: a notice and the CPU)");
  if (!cli.parse(argc, argv)) return 0;
  fd::Device device = fd::parse_device(device_flag);
#if defined(__CUDACC__)
  device = fd::cuda::resolve_device(device, std::cout);
  if (device == fd::Device::cuda)
    std::printf("fashion_cfg: training and sampling on the GPU (%s)\n",
                fd::cuda::device_info().name.c_str());
#else
  device = fd::resolve_device(
      device, 0, "this build of fashion_cfg has no CUDA; use fashion_cfg_cuda", std::cout);
#endif
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
  // written. `net` / `net_ps` are the model where it lives (nn::UNet on the CPU, or BackendUNet
  // with its parameters on the device).
  auto train_and_report = [&](const auto& net, auto& net_ps, const std::string& where) {
    const auto result = fd::examples::train_cfm("fashion_cfg", net, net_ps, source, training);
    fd::examples::sample_cfg_and_report({.program = "fashion_cfg",
                                         .started = t_start,
                                         .training = result,
                                         .weights = training.weights,
                                         .sampled_where = where},
                                        flags, net, std::as_const(net_ps), classifier, data.test,
                                        fd::Shape{1, 28, 28});
  };
#if defined(__CUDACC__)
  if (device == fd::Device::cuda) {
    nn::Parameters<float, fd::Cuda> dps;
    const nn::BackendUNet<float, fd::Cuda> dnet(dps, unet.config());
    dps.allocate();
    nn::upload_parameters(dps, ps);
    train_and_report(dnet, dps, ", on the GPU");
    return 0;
  }
#endif
  (void)device;
  train_and_report(unet, ps, "");
  return 0;
} catch (const std::exception& e) {
  std::cerr << "fashion_cfg: error: " << e.what() << '\n';
  return 1;
}
