// classifier_guidance — classifier guidance of an unconditional flow model compared with
// classifier-free guidance at the same scales, on Fashion-MNIST. The flow model is the U-Net that
// fashion_cfg trained (its EMA weights, out/fashion_cfg/unet_ema.safetensors): with the null label
// it is the unconditional field u(x|∅), with a label the conditional one. This program trains a
// time-conditioned classifier p_t(y | x_t) on noisy inputs x_t = alpha_t z + beta_t eps (the
// linear path, t ~ U[t_min, 1]) and samples with
//   CG:  u~ = u(x|∅) + w b_t ∇_x log p_t(y|x),   b_t = (d_alpha beta^2 - d_beta beta alpha)/alpha
//   CFG: u~ = (1 - w) u(x|∅) + w u(x|y)
// for each w. With exact fields the two are the same field (DESIGN.md §1, a test of
// guidance/classifier.hpp); with learned ones they differ, and the table shows how: agreement of
// the samples with their conditioning class under the separate evaluation classifier of
// fashion_cfg, and the Fréchet distance to real test images in its penultimate features.
// b_t is infinite at t = 0, so both samplers integrate over [t_min, 1] from N(0, I).
// --device cuda trains the noisy classifier (nn::BackendConvClassifier<float, Cuda>, the same
// initial weights, batches, times and noise streams as on the CPU) and samples both methods on a
// GPU (nn::BackendUNet with fashion_cfg's weights, the classifier's gradient by
// classifier_log_prob_grad on the device); the accuracies, the cache file and the metrics are
// computed on the host. CMake compiles this file with nvcc when it finds the CUDA toolkit; without
// a usable device, or in a build without the toolkit, it says so in one line and runs on the CPU
// (examples/common/device.hpp).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/nn/layers/cross_entropy.hpp>
#include <flowdiff/nn/models/classifier.hpp>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/fashion.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using Clock = std::chrono::steady_clock;
using flowdiff::examples::parse_list;
using flowdiff::examples::seconds_since;

namespace {

/// ∇_x log p_t(y | x) of the noisy classifier, as the gradient callable classifier_guidance
/// takes, on the classifier's backend (nn::ConvClassifier on the CPU, nn::BackendConvClassifier
/// on B).
template <class Net>
struct NoisyClassifierGradient {
  using B = nn::model_backend_t<Net>;
  const Net* net;
  nn::Parameters<float, B>* ps;
  typename Net::Cache cache{};
  fd::Tensor<float, B> t{}, logits{}, dlogits{};
  fd::index_t num_classes() const { return net->num_classes(); }
  void operator()(fd::View<const float, B> x, fd::View<float, B> out, float time,
                  fd::View<const fd::label_t, B> y) {
    t.resize(fd::Shape{x.dim(0)});
    fd::fill(t.view(), time);
    ps->zero_grad();  // the backward also accumulates parameter gradients; keep them bounded
    nn::classifier_log_prob_grad<float>(*net, *ps, x, fd::View<const float, B>(t.view()), y, out,
                                        {}, cache, logits, dlogits);
  }
};

/// Trains the time-conditioned classifier on x_t with t ~ U[t_min, 1]: mean cross-entropy, AdamW,
/// warmup + cosine, on the classifier's backend B (batches, times and labels drawn on the host and
/// copied over; the noise drawn on B from the same generator). Returns the seconds it took.
template <class Net>
double train_noisy_classifier(const Net& net, nn::Parameters<float, nn::model_backend_t<Net>>& ps,
                              const fd::data::ImageDataset& train, long steps, long batch,
                              double lr, double t_min, std::uint64_t seed) {
  using B = nn::model_backend_t<Net>;
  using CrossEntropy =
      std::conditional_t<std::is_same_v<B, fd::Cpu>, nn::SoftmaxCrossEntropy<float>,
                         nn::BackendSoftmaxCrossEntropy<float, B>>;
  const auto t0 = Clock::now();
  fd::Generator gen(seed);
  fd::data::Batcher batcher(train, seed + 1);
  const fd::GaussianPath path(fd::schedules::Linear{});
  tr::AdamW<float, B> opt({.lr = lr, .weight_decay = 1e-4});
  const CrossEntropy ce;
  typename CrossEntropy::Cache ce_cache;
  typename Net::Cache cache;
  const fd::Shape images{batch, 1, 28, 28};
  fd::Tensor<float> z(images), t({batch});  // host: the batcher's images and the times
  fd::Tensor<fd::label_t> y({batch});
  fd::Tensor<float, B> zb(images), eps(images), xt(images), tb({batch});
  fd::Tensor<fd::label_t, B> yb({batch});
  fd::Tensor<float, B> logits({batch, net.num_classes()}), dlogits({batch, net.num_classes()});
  const long warmup = std::min<long>(100, steps / 10);
  double window = 0;
  for (long s = 0; s < steps; ++s) {
    opt.set_lr(s < warmup ? tr::linear_warmup(s, lr, warmup)
                          : tr::cosine_decay(s - warmup, lr, steps - warmup, lr / 20));
    batcher.next(z.view(), y.view());
    tr::UniformTime{t_min, 1.0}.sample(t.view(), gen);
    fd::BackendOps<B>::template upload<float>(zb.view(), fd::View<const float>(z.view()));
    fd::BackendOps<B>::template upload<float>(tb.view(), fd::View<const float>(t.view()));
    fd::BackendOps<B>::template upload<fd::label_t>(yb.view(), y.view());
    fd::fill_normal(eps, gen);
    path.sample(zb, eps, tb, xt);
    ps.zero_grad();
    net.forward(ps, xt.view(), tb.view(), logits.view(), cache);
    const double loss = ce.forward(logits.view(), yb.view(), ce_cache);
    fd::require<fd::numeric_error>(std::isfinite(loss),
                                   "classifier_guidance: noisy classifier "
                                   "loss is not finite at step ",
                                   s + 1);
    ce.backward(dlogits.view(), ce_cache);
    net.backward(ps, dlogits.view(), {}, cache);
    tr::clip_grad_norm(ps, 1.0);
    opt.step(ps);
    window += loss;
    if ((s + 1) % std::max<long>(1, steps / 10) == 0 || s + 1 == steps) {
      std::printf("noisy classifier: step %ld/%ld loss %.4f (%.1f s)\n", s + 1, steps,
                  window / static_cast<double>(std::max<long>(1, steps / 10)), seconds_since(t0));
      std::fflush(stdout);
      window = 0;
    }
  }
  return seconds_since(t0);
}

/// Accuracy of the noisy classifier on test images noised to time t (fixed noise seed).
double noisy_accuracy(const nn::ConvClassifier<float>& net, const nn::Parameters<float>& ps,
                      const fd::data::ImageDataset& test, fd::index_t n, float t) {
  fd::Generator gen(1234);
  const auto z = fd::View<const float>(test.images.view().rows(0, n));
  auto eps = fd::randn<float>(z.shape(), gen);
  fd::Tensor<float> xt(z.shape());
  fd::GaussianPath(fd::schedules::Linear{}).sample(z, eps, t, xt);
  const auto tt = fd::Tensor<float>::full({n}, t);
  fd::metrics::ClassifierEvaluator<float> eval(net, ps, std::min<fd::index_t>(n, 250));
  return eval.agreement(xt, fd::View<const fd::label_t>(test.labels.view().rows(0, n)), tt.view())
      .rate();
}

}  // namespace

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "classifier_guidance",
      "Classifier guidance (a noisy classifier trained here) of the unconditional branch of "
      "fashion_cfg's U-Net, against classifier-free guidance at the same scales: sample grids, "
      "agreement and Frechet distance per w. Run fashion_cfg first.");
  auto& data_dir = cli.option<std::string>("data-dir", "",
                                           "Fashion-MNIST folder (default: "
                                           "$FLOWDIFF_FASHION_MNIST or the Debian one)");
  auto& model = cli.option<std::string>("model", "out/fashion_cfg/unet_ema.safetensors",
                                        "the U-Net weights fashion_cfg wrote");
  auto& channels_text =
      cli.option<std::string>("channels", "16,32,64", "U-Net channels (as fashion_cfg was run)");
  auto& res_layers = cli.option<long>("res-layers", 1, "U-Net residual blocks per stage");
  auto& out_dir = cli.option<std::string>("out", "out/classifier_guidance", "output folder");
  auto& cache_dir =
      cli.option<std::string>("cache", "out/cache", "folder of the cached evaluation classifier");
  auto& noisy_steps =
      cli.option<long>("classifier-steps", 2000, "training steps of the noisy classifier");
  auto& batch = cli.option<long>("batch", 128, "noisy-classifier batch size");
  auto& lr = cli.option<double>("lr", 2e-3, "noisy-classifier peak learning rate");
  auto& t_min = cli.option<double>("t-min", 0.02,
                                   "first time of the sampling grid (b_t is "
                                   "infinite at t = 0)");
  auto& ws_text = cli.option<std::string>("w", "1,3,5", "guidance scales");
  auto& sample_steps = cli.option<long>("sample-steps", 10, "Heun steps over [t-min, 1]");
  auto& per_class = cli.option<long>("eval-per-class", 30, "generated images per class");
  auto& n_real = cli.option<long>("eval-real", 5000, "real test images for the reference");
  auto& limit = cli.option<long>("limit", 0, "use only the first N training images (0: all)");
  auto& quick = cli.option<int>("quick", 0, "1: tiny smoke run (evaluation classifier not cached)");
  auto& threads = cli.option<long>("threads", 0, "OpenMP threads (0: the default)");
  auto& seed = cli.option<unsigned long>("seed", 0, "random seed");
  auto& device_flag = fd::examples::add_device_flag(
      cli, "the noisy classifier trains and both methods sample (the U-Net on cuda: nn::UNet "
           "without attention, as fashion_cfg trains it)");
  if (!cli.parse(argc, argv)) return 0;
  const fd::Device device = fd::examples::resolve_example_device(
      "classifier_guidance", device_flag, "training the noisy classifier and sampling");
  const auto channels = parse_list<fd::index_t>("channels", channels_text);
  const auto ws = parse_list<float>("w", ws_text);
  fd::require<fd::config_error>(noisy_steps >= 1 && batch >= 1,
                                "--classifier-steps and --batch must be >= 1");
  fd::require<fd::config_error>(t_min > 0 && t_min < 1, "--t-min must lie in (0, 1), got ", t_min);
  fd::require<fd::config_error>(sample_steps >= 1 && per_class >= 2 && n_real >= 2,
                                "--sample-steps >= 1, --eval-per-class >= 2, --eval-real >= 2");
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
  const auto t_start = Clock::now();
  const std::filesystem::path out(out_dir), cache(cache_dir);
  std::filesystem::create_directories(out);

  const auto data = fd::examples::load_fashion("classifier_guidance", data_dir, limit, quick != 0);
  const auto& train = data.train;
  const auto& test = data.test;
  const fd::index_t k = data.num_classes();

  // The flow model fashion_cfg trained.
  nn::Parameters<float> ups;
  nn::UNet<float> unet(ups, {.in_channels = 1,
                             .channels = channels,
                             .num_residual_layers = res_layers,
                             .num_classes = k});
  ups.allocate();
  fd::require<fd::io_error>(std::filesystem::exists(model),
                            "classifier_guidance: no U-Net weights at '", model,
                            "': run fashion_cfg first (bash scripts/demo.sh fashion_cfg), "
                            "or pass --model with --channels/--res-layers as it was trained");
  nn::load_parameters(ups, fd::io::SafetensorsFile::read(model));

  // The evaluation classifier (the one fashion_cfg uses, from the same cache).
  const auto classifier = fd::examples::evaluation_classifier("classifier_guidance", cache, data, 2,
                                                              quick != 0, 10, seed + 17);

  // The noisy classifier p_t(y | x_t): trained here, cached in the output folder.
  nn::Parameters<float> nps;
  // (A tiny variant in --quick smoke runs.)
  nn::ConvClassifier<float> noisy(nps, {.in_channels = 1,
                                        .channels = quick ? std::vector<fd::index_t>{8, 16}
                                                          : std::vector<fd::index_t>{32, 64, 128},
                                        .num_classes = k,
                                        .groups = 8,
                                        .time_dim = 32,
                                        .image_size = 28});
  nps.allocate();
  const auto noisy_file = out / "noisy_classifier.safetensors";
  double noisy_seconds = 0;
  if (!quick && std::filesystem::exists(noisy_file)) {
    nn::load_parameters(nps, fd::io::SafetensorsFile::read(noisy_file));
    std::printf("classifier_guidance: loaded the noisy classifier from %s\n",
                noisy_file.string().c_str());
  } else {
    fd::Generator ig(seed + 5);
    noisy.init(nps, ig);
    std::printf(
        "classifier_guidance: training the noisy classifier p_t(y | x_t), %ld steps of %ld\n",
        noisy_steps, batch);
    // Where --device says (the cache file and the accuracies below are the host's either way).
    fd::examples::run_on_device<nn::BackendConvClassifier>(
        device, noisy, nps, [&](const auto& net, auto& net_ps, const std::string&) {
          noisy_seconds =
              train_noisy_classifier(net, net_ps, train, noisy_steps, batch, lr, t_min, seed + 6);
          if constexpr (!std::is_same_v<std::remove_cvref_t<decltype(net_ps)>,
                                        nn::Parameters<float>>)
            nn::download_parameters(nps, net_ps);
        });
    if (!quick) nn::save_parameters(nps, noisy_file);
  }
  const fd::index_t n_acc = std::min<fd::index_t>(test.size(), quick ? 40 : 2000);
  std::printf("noisy classifier test accuracy:");
  for (float t : {0.25f, 0.5f, 0.75f, 1.0f})
    std::printf("  t = %.2f: %.1f%%", t, 100 * noisy_accuracy(noisy, nps, test, n_acc, t));
  std::printf("\n");

  // Reference statistics of real test images, the real-vs-real floor, and the noise of every
  // method and w.
  fd::examples::Evaluation eval(classifier, test, per_class, n_real);
  const fd::examples::SampleNoise noise(eval, fd::Shape{1, 28, 28}, seed + 3);
  const auto tgrid = fd::uniform_grid<float>(sample_steps, static_cast<float>(t_min), 1.0f);
  const fd::schedules::Linear schedule;

  std::vector<fd::examples::WResult> results;
  std::vector<std::string> pictures;
  // Both methods for each w, with the U-Net and the noisy classifier where they live (on the CPU,
  // or on the GPU with the same weights: sample_and_score copies noise, labels and samples).
  const auto sample_all = [&](const auto& flow, const auto& flow_ps, const auto& clf,
                              auto& clf_ps) {
    NoisyClassifierGradient<std::remove_cvref_t<decltype(clf)>> grad{&clf, &clf_ps};
    for (const float w : ws) {
      char file[64];
      // CG: u(x|∅) (the U-Net with its null label, as_field's plain Field call) plus the noisy
      // classifier's gradient.
      std::snprintf(file, sizeof file, "cg_w%g.png", w);
      auto cg = fd::classifier_guidance<float>(nn::as_field(flow, flow_ps), grad, schedule, w);
      results.push_back(fd::examples::sample_and_score("classifier_guidance", "CG", w, cg, noise,
                                                       eval, tgrid, out / file));
      pictures.push_back((out / file).string());
      std::snprintf(file, sizeof file, "cfg_w%g.png", w);
      auto cfg = fd::cfg(nn::as_field(flow, flow_ps), w);
      results.push_back(fd::examples::sample_and_score("classifier_guidance", "CFG", w, cfg, noise,
                                                       eval, tgrid, out / file));
      pictures.push_back((out / file).string());
    }
  };
  bool sampled = false;
#if defined(__CUDACC__)
  if (device == fd::Device::cuda) {
    nn::Parameters<float, fd::Cuda> dups, dnps;
    const nn::BackendUNet<float, fd::Cuda> dunet(dups, unet.config());
    const nn::BackendConvClassifier<float, fd::Cuda> dnoisy(dnps, noisy.config());
    dups.allocate();
    dnps.allocate();
    nn::upload_parameters(dups, ups);
    nn::upload_parameters(dnps, nps);
    sample_all(dunet, std::as_const(dups), dnoisy, dnps);
    sampled = true;
  }
#endif
  if (!sampled) sample_all(unet, std::as_const(ups), noisy, nps);

  fd::examples::print_metrics(results, eval.floor());
  fd::examples::write_metrics_csv(
      "classifier_guidance", out / "metrics.csv", results,
      {{"noisy_classifier_seconds", fd::examples::csv_value(noisy_seconds)}}, eval.floor());
  std::printf("\nclassifier_guidance: done in %.1f s\n", seconds_since(t_start));
  for (const auto& p : pictures) std::printf("wrote %s\n", p.c_str());
  std::printf("wrote %s\n", (out / "metrics.csv").string().c_str());
  return 0;
} catch (const std::exception& e) {
  std::cerr << "classifier_guidance: error: " << e.what() << '\n';
  return 1;
}
