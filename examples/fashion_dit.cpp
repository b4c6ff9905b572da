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
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <iostream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/cli.hpp"
#include "common/fashion.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using flowdiff::examples::parse_list;
using flowdiff::examples::seconds_since;

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "fashion_dit",
      "Class-conditional flow matching on Fashion-MNIST with a diffusion transformer (DiT, "
      "adaLN-Zero) trained here in pixel space (CFG dropout), sampled with classifier-free "
      "guidance; sample grids per guidance scale and a metrics table (classifier agreement, "
      "Frechet distance in classifier features).");
  auto& data_dir =
      cli.option<std::string>("data-dir", "",
                              "Fashion-MNIST folder (default: $FLOWDIFF_FASHION_MNIST or "
                              "/usr/share/datasets/fashion-mnist)");
  auto& out_dir = cli.option<std::string>("out", "out/fashion_dit", "output folder");
  auto& cache_dir =
      cli.option<std::string>("cache", "out/cache", "folder of the cached evaluation classifier");
  auto& train_steps = cli.option<long>("train-steps", 2000, "optimizer steps");
  auto& batch = cli.option<long>("batch", 64, "training batch size");
  auto& lr = cli.option<double>("lr", 1e-3, "peak learning rate (AdamW, warmup + cosine)");
  auto& patch = cli.option<long>("patch", 4, "patch size p (28 / p tokens a side)");
  auto& hidden = cli.option<long>("hidden", 96, "token width D (a multiple of 4 and of heads)");
  auto& depth = cli.option<long>("depth", 4, "transformer blocks");
  auto& heads = cli.option<long>("heads", 4, "attention heads");
  auto& mlp_ratio = cli.option<double>("mlp-ratio", 4.0, "MLP width / D");
  auto& eta = cli.option<double>("eta", 0.1, "CFG label-dropout probability");
  auto& ws_text = cli.option<std::string>("w", "1,3,5", "guidance scales to sample");
  auto& sample_steps = cli.option<long>("sample-steps", 10, "Heun steps from t = 0 to t = 1");
  auto& per_class =
      cli.option<long>("eval-per-class", 30, "generated images per class for the metrics");
  auto& limit = cli.option<long>("limit", 0, "use only the first N training images (0: all)");
  auto& n_real = cli.option<long>("eval-real", 5000,
                                  "real test images behind the Frechet reference statistics");
  auto& classifier_epochs =
      cli.option<long>("classifier-epochs", 2, "epochs of the evaluation classifier's training");
  auto& quick =
      cli.option<int>("quick", 0, "1: tiny smoke run (classifier not cached, no 90% bar)");
  auto& threads = cli.option<long>("threads", 0, "OpenMP threads (0: the default)");
  auto& seed = cli.option<unsigned long>("seed", 0, "random seed");
  if (!cli.parse(argc, argv)) return 0;
  const auto ws = parse_list<float>("w", ws_text);
  fd::require<fd::config_error>(train_steps >= 1, "--train-steps must be >= 1, got ", train_steps);
  fd::require<fd::config_error>(batch >= 1, "--batch must be >= 1, got ", batch);
  fd::require<fd::config_error>(patch >= 1 && 28 % patch == 0,
                                "--patch must divide the image size 28, got ", patch);
  fd::require<fd::config_error>(sample_steps >= 1, "--sample-steps must be >= 1, got ",
                                sample_steps);
  fd::require<fd::config_error>(per_class >= 2, "--eval-per-class must be >= 2, got ", per_class);
  fd::require<fd::config_error>(limit >= 0, "--limit must be >= 0, got ", limit);
  fd::require<fd::config_error>(n_real >= 2, "--eval-real must be >= 2, got ", n_real);
  fd::require<fd::config_error>(threads >= 0, "--threads must be >= 0, got ", threads);
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
  const auto t_start = std::chrono::steady_clock::now();
  const std::filesystem::path out(out_dir), cache(cache_dir);
  std::filesystem::create_directories(out);

  const auto data = fd::examples::load_fashion("fashion_dit", data_dir, limit, quick != 0);
  const fd::index_t k = data.num_classes();
  const auto classifier = fd::examples::evaluation_classifier(
      "fashion_dit", cache, data, classifier_epochs, quick != 0, 20, seed + 17);

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
  fd::Generator gen(seed);
  dit.init(ps, gen);
  std::printf(
      "fashion_dit: DiT p = %ld (%ld tokens), D = %ld, depth %ld, %ld heads, %ld "
      "parameters\n",
      patch, (28 / patch) * (28 / patch), hidden, depth, heads, static_cast<long>(ps.numel()));
  fd::data::Batcher batcher(data.train, seed + 1);
  tr::BatcherSource source(batcher, fd::Shape{1, 28, 28}, k);
  const auto result = fd::examples::train_cfm("fashion_dit", dit, ps, source,
                                              {.steps = train_steps,
                                               .batch = batch,
                                               .lr = lr,
                                               .eta = eta,
                                               .seed = seed + 2,
                                               .out = out,
                                               .weights = "dit_ema.safetensors"});

  // Sampling: a 10 x 8 grid per w from the same noise for every w, and per_class images per
  // class for the metrics.
  fd::examples::Evaluation eval(classifier, data.test, per_class, n_real);
  const fd::examples::SampleNoise noise(eval, fd::Shape{1, 28, 28}, seed + 3);
  const auto tgrid = fd::uniform_grid<float>(sample_steps);
  std::vector<fd::examples::WResult> results;
  std::vector<std::string> pictures;
  for (const float w : ws) {
    auto field = fd::cfg(nn::as_field(dit, ps), w);
    char name[64];
    std::snprintf(name, sizeof name, "samples_w%g.png", w);
    results.push_back(fd::examples::sample_and_score("fashion_dit", "", w, field, noise, eval,
                                                     tgrid, out / name));
    pictures.push_back((out / name).string());
  }

  fd::examples::print_metrics(results, eval.floor());
  std::printf(
      "(%ld generated images per w, Heun %ld steps = %ld NFE of a 2N batch; Frechet "
      "distance to %ld real test images; 'real': %ld other test images)\n",
      static_cast<long>(eval.eval_size()), sample_steps, 2 * sample_steps,
      static_cast<long>(eval.reference_size()), static_cast<long>(eval.floor_size()));
  fd::examples::write_metrics_csv("fashion_dit", out / "metrics.csv", results,
                                  {{"train_steps", fd::examples::csv_value(result.last_step)},
                                   {"train_seconds", fd::examples::csv_value(result.seconds)}},
                                  eval.floor());
  std::printf("\nfashion_dit: done in %.1f s\n", seconds_since(t_start));
  for (const auto& p : pictures) std::printf("wrote %s\n", p.c_str());
  std::printf("wrote %s, %s, %s and %s\n", (out / "metrics.csv").string().c_str(),
              (out / "loss.png").string().c_str(), (out / "dit_ema.safetensors").string().c_str(),
              (out / "checkpoint.safetensors").string().c_str());
  return 0;
} catch (const std::exception& e) {
  std::cerr << "fashion_dit: error: " << e.what() << '\n';
  return 1;
}
