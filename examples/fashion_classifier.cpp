// fashion_classifier — trains (or loads from its cache) the Fashion-MNIST classifier that the
// sample-quality metrics use (metrics/classifier_metrics.hpp: AdamW on the mean cross-entropy,
// cached only when its test accuracy reaches 90%), then prints its test accuracy per class and
// the Fréchet distance d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between
// Gaussians fitted to its penultimate features of two image sets: the two halves of the test set
// (the floor at that sample size), then the test set against copies of the other half with
// Gaussian noise of growing sigma added (the distance should grow with sigma). It writes a grid of
// misclassified test images (misclassified.png) to --out. With --device cuda the classifier
// trains on the GPU (nn::BackendConvClassifier through load_or_train_fashion_classifier's training
// hook; the test accuracy and the metrics are computed on the CPU with the downloaded weights).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;

int main(int argc, char** argv) try {
  fd::examples::Cli cli("fashion_classifier",
                        "Train or load the Fashion-MNIST evaluation classifier; print its test "
                        "accuracy and Frechet distances in its features (a floor and a noise "
                        "sweep); write a grid of misclassified test images.");
  auto& data_dir = cli.option<std::string>(
      "data-dir", "", "Fashion-MNIST folder (empty: $FLOWDIFF_FASHION_MNIST or the Debian path)");
  auto& cache = cli.option<std::string>("cache", "out/fashion_classifier/classifier.safetensors",
                                        "checkpoint to load, or to write after training");
  auto& epochs = cli.option<long>("epochs", 2, "training epochs");
  auto& batch = cli.option<long>("batch", 128, "training batch size");
  auto& lr = cli.option<double>("lr", 3e-3, "peak AdamW learning rate");
  auto& pad = cli.option<long>("pad", 1, "1: pad the images to 32x32 (the generators' geometry)");
  auto& limit = cli.option<long>("limit", 0, "use only the first N training/test images (0: all)");
  auto& tiny =
      cli.option<long>("tiny", 0, "1: smoke run (--steps steps, no 90% bar, nothing cached)");
  auto& steps = cli.option<long>("steps", 0, "stop training after this many steps (0: epochs)");
  auto& seed = cli.option<long>("seed", 1, "random seed");
  auto& threads = cli.option<long>("threads", 0, "OpenMP threads (0: the default)");
  auto& out = cli.option<std::string>("out", "out/fashion_classifier", "output folder");
  auto& device_flag = fd::examples::add_device_flag(cli, "the classifier trains");
  if (!cli.parse(argc, argv)) return 0;
  fd::require<fd::config_error>(threads >= 0, "--threads must be >= 0, got ", threads);
  fd::require<fd::config_error>(limit >= 0 && steps >= 0, "--limit and --steps must be >= 0");
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  std::filesystem::create_directories(out);

  fd::data::FashionMnistOptions dopt{.dir = data_dir, .pad_to_32 = pad != 0, .limit = limit};
  const auto train = fd::data::fashion_mnist(fd::data::Split::Train, dopt);
  const auto test = fd::data::fashion_mnist(fd::data::Split::Test, dopt);
  std::printf("fashion_classifier: %ld training and %ld test images of %ldx%ld\n",
              static_cast<long>(train.size()), static_cast<long>(test.size()),
              static_cast<long>(test.images.dim(2)), static_cast<long>(test.images.dim(3)));

  fd::metrics::ClassifierTrainOptions o;
  o.epochs = epochs;
  o.batch = batch;
  o.lr = lr;
  o.max_steps = steps;
  if (tiny != 0) {
    o.require_accuracy = false;
    o.write_cache = false;
    o.log_every = 5;
    o.warmup_steps = 2;
  }
  const fd::Device device =
      fd::examples::resolve_example_device("fashion_classifier", device_flag, "training");
  // Training where --device says: fit_classifier on the CPU model, or on BackendConvClassifier
  // with the same initial weights uploaded and the trained ones downloaded.
  const auto fit = [&](const nn::ConvClassifier<float>& net, nn::Parameters<float>& ps,
                       fd::View<const float> x, fd::View<const fd::label_t> y,
                       const fd::metrics::ClassifierTrainOptions& opt, fd::Generator& g) {
    fd::metrics::ClassifierTrainReport rep;
    fd::examples::run_on_device<nn::BackendConvClassifier>(
        device, net, ps, [&](const auto& dnet, auto& dps, const std::string&) {
          rep = fd::metrics::fit_classifier(dnet, dps, x, y, opt, g);
          if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(dps)>, nn::Parameters<float>>)
            nn::download_parameters(ps, dps);
        });
    return rep;
  };
  fd::Generator gen(static_cast<std::uint64_t>(seed));
  const auto t0 = std::chrono::steady_clock::now();
  const auto clf = fd::metrics::load_or_train_fashion_classifier(
      tiny != 0 ? std::filesystem::path() : std::filesystem::path(cache), train, test, o, gen, fit);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto& rep = clf.report;
  std::printf("fashion_classifier: %s in %.1f s (%ld steps): test accuracy %.2f%%\n",
              rep.loaded ? "loaded" : "trained", secs, static_cast<long>(rep.steps),
              100.0 * rep.test_accuracy);
  static const char* names[] = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  for (fd::index_t k = 0; k < test.num_classes; ++k)
    std::printf("  class %ld %-12s %6.2f%% of %ld\n", static_cast<long>(k), k < 10 ? names[k] : "",
                100.0 * rep.test.class_rate(k),
                static_cast<long>(rep.test.class_total[static_cast<std::size_t>(k)]));

  // Fréchet distances in the classifier's penultimate features.
  auto eval = clf.evaluator(250);
  const fd::index_t n = test.size(), half = n / 2;
  const auto a = test.images.view().rows(0, half);
  const auto b = test.images.view().rows(half, 2 * half);
  const auto stats_a = eval.feature_statistics(a);
  std::printf("fashion_classifier: Frechet distance, features of %ld vs %ld test images\n",
              static_cast<long>(half), static_cast<long>(half));
  std::printf("  other half (floor)      %10.4f\n", eval.frechet_to(b, stats_a));
  fd::Tensor<float> noisy(b.shape());
  for (double sigma : {0.1, 0.2, 0.5, 1.0}) {
    fd::Generator ng(static_cast<std::uint64_t>(seed) + 1000);
    fd::fill_normal(noisy, ng, 0.0f, static_cast<float>(sigma));
    fd::transform(
        noisy, [](float e, float x) { return x + e; }, noisy, b);
    std::printf("  other half + N(0, %.1f^2) %10.4f\n", sigma, eval.frechet_to(noisy, stats_a));
  }

  // Misclassified test images (up to 64), in test-set order.
  fd::Tensor<float> logits({n, test.num_classes});
  eval.run(test.images, {}, logits, {});
  fd::Tensor<fd::label_t> pred({n});
  fd::metrics::predict<float>(logits, pred);
  std::vector<fd::index_t> wrong;
  for (fd::index_t i = 0; i < n && wrong.size() < 64; ++i)
    if (pred[i] != test.labels[i]) wrong.push_back(i);
  if (!wrong.empty()) {
    fd::Tensor<float> grid(test.images.shape().with_rows(static_cast<fd::index_t>(wrong.size())));
    const fd::index_t row = test.images.row_size();
    for (std::size_t j = 0; j < wrong.size(); ++j)
      std::copy(test.images.data() + wrong[j] * row, test.images.data() + (wrong[j] + 1) * row,
                grid.data() + static_cast<fd::index_t>(j) * row);
    const auto path = std::filesystem::path(out) / "misclassified.png";
    fd::io::write_png_grid<float>(path, grid.view(), 8);
    std::printf("fashion_classifier: wrote %s (%zu misclassified test images, first 8:",
                path.string().c_str(), wrong.size());
    for (std::size_t j = 0; j < std::min<std::size_t>(8, wrong.size()); ++j)
      std::printf(" %d->%d", test.labels[wrong[j]], pred[wrong[j]]);
    std::printf(")\n");
  } else {
    std::printf("fashion_classifier: no misclassified test images\n");
  }
  return 0;
} catch (const fd::error& e) {
  std::fprintf(stderr, "fashion_classifier: error: %s\n", e.what());
  return 1;
}
