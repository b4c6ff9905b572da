// flowdiff/metrics/classifier_metrics.hpp — sample-quality metrics computed with a trained image
// classifier (nn::ConvClassifier), and the training / caching of that classifier:
//  - agreement: the share of samples whose predicted class argmax_k z[n, k] equals the label they
//    were generated for, A = (1/N) sum_n [argmax_k z[n, k] == y_n], overall and per class;
//  - the Fréchet distance (metrics/frechet.hpp) between Gaussians fitted to the classifier's
//    penultimate features f(x) of generated and of real images (an FID with this classifier in
//    the place of Inception);
//  - ClassifierEvaluator runs the classifier over any number of images in batches of one fixed
//    size (the last partial batch is zero-padded), so after the first batch nothing is allocated;
//  - fit_classifier / train_classifier / load_or_train_classifier: AdamW on the mean cross-entropy
//    over shuffled mini-batches (warm-up + cosine learning rate; fit_classifier on the CPU's
//    nn::ConvClassifier or on any backend's nn::BackendConvClassifier), test accuracy measured at
//    the end, a bar the classifier must clear before it is cached (an atomic safetensors
//    checkpoint whose metadata records the configuration and image geometry it was trained for);
//  - load_or_train_fashion_classifier: the same for a data::ImageDataset with the measured
//    Fashion-MNIST architecture (docs/metrics.md), returning the parameters and the model together.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <numeric>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/data/dataset.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/metrics/frechet.hpp"
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/layers/cross_entropy.hpp"
#include "flowdiff/nn/as_field.hpp"
#include "flowdiff/nn/models/classifier.hpp"
#include "flowdiff/nn/models/classifier_backend.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/schedule.hpp"

namespace flowdiff::metrics {

/// How often the predicted class agrees with the label, overall and per class.
struct Agreement {
  index_t total = 0, correct = 0;
  std::vector<index_t> class_total, class_correct;  // [K]
  /// correct / total (NaN when total = 0).
  double rate() const {
    return total > 0 ? static_cast<double>(correct) / static_cast<double>(total)
                     : std::numeric_limits<double>::quiet_NaN();
  }
  /// class_correct[k] / class_total[k] (NaN for a class with no samples).
  double class_rate(index_t k) const {
    const auto i = static_cast<std::size_t>(k);
    require<config_error>(k >= 0 && i < class_total.size(), "Agreement::class_rate: class ", k,
                          " outside [0, ", class_total.size(), ")");
    return class_total[i] > 0
               ? static_cast<double>(class_correct[i]) / static_cast<double>(class_total[i])
               : std::numeric_limits<double>::quiet_NaN();
  }
  /// Adds another batch's counts (same K).
  void merge(const Agreement& o) {
    require<shape_error>(o.class_total.size() == class_total.size(),
                         "Agreement::merge: ", o.class_total.size(), " classes vs ",
                         class_total.size());
    total += o.total;
    correct += o.correct;
    for (std::size_t k = 0; k < class_total.size(); ++k) {
      class_total[k] += o.class_total[k];
      class_correct[k] += o.class_correct[k];
    }
  }
};

/// argmax_k z[n, k] for every row (the first maximum on ties).   logits: [N, K], out: [N]
template <class T>
void predict(std::type_identity_t<View<const T>> logits, View<label_t> out) {
  require<shape_error>(logits.rank() == 2 && logits.dim(1) >= 1,
                       "predict: logits: expected shape [N, K] with K >= 1, got ", logits.shape());
  require<shape_error>(out.shape() == Shape{logits.dim(0)}, "predict: out: expected shape ",
                       Shape{logits.dim(0)}, ", got ", out.shape());
  const index_t n = logits.dim(0), k = logits.dim(1);
  for (index_t i = 0; i < n; ++i) {
    const T* z = logits.data() + i * k;
    index_t best = 0;
    for (index_t j = 1; j < k; ++j)
      if (z[j] > z[best]) best = j;
    out[i] = static_cast<label_t>(best);
  }
}

/// Counts argmax_k z[n, k] == y_n. logits: [N, K] (finite), labels: [N] in [0, K).
template <class T>
Agreement agreement(std::type_identity_t<View<const T>> logits, View<const label_t> labels) {
  require<shape_error>(logits.rank() == 2 && logits.dim(1) >= 1,
                       "agreement: logits: expected shape [N, K] with K >= 1, got ",
                       logits.shape());
  const index_t n = logits.dim(0), k = logits.dim(1);
  require<shape_error>(labels.shape() == Shape{n}, "agreement: labels: expected shape ", Shape{n},
                       ", got ", labels.shape());
  Agreement a;
  a.class_total.assign(static_cast<std::size_t>(k), 0);
  a.class_correct.assign(static_cast<std::size_t>(k), 0);
  for (index_t i = 0; i < n; ++i) {
    const label_t y = labels[i];
    require<config_error>(y >= 0 && y < k, "agreement: labels[", i, "] = ", y, " is outside [0, ",
                          k, ")");
    const T* z = logits.data() + i * k;
    index_t best = 0;
    for (index_t j = 0; j < k; ++j) {
      if (!std::isfinite(static_cast<double>(z[j])))
        fail<numeric_error>("agreement: logits[", i, ", ", j, "] is not finite (", z[j], ")");
      if (z[j] > z[best]) best = j;
    }
    ++a.total;
    ++a.class_total[static_cast<std::size_t>(y)];
    if (best == y) {
      ++a.correct;
      ++a.class_correct[static_cast<std::size_t>(y)];
    }
  }
  return a;
}

/// Runs a classifier over image sets of any size in batches of exactly `batch` images: the last
/// partial batch is copied into a zero-padded staging buffer, so the model's cache keeps one
/// shape and nothing is allocated after the first batch. Holds pointers to the model and its
/// parameters (both must outlive it).
template <class T>
class ClassifierEvaluator {
 public:
  ClassifierEvaluator(const nn::ConvClassifier<T>& net, const nn::Parameters<T>& ps,
                      index_t batch = 250)
      : net_(&net), ps_(&ps), batch_(batch) {
    require<config_error>(batch >= 1, "ClassifierEvaluator: batch must be >= 1, got ", batch);
  }
  ClassifierEvaluator(const nn::ConvClassifier<T>&&, const nn::Parameters<T>&,
                      index_t = 0) = delete;

  index_t batch() const { return batch_; }
  const typename nn::ConvClassifier<T>::Cache& cache() const { return cache_; }

  // images: [N, C, H, W]; t: [N] for a time-conditioned classifier, else {}; logits: [N, K] or
  // {}; features: [N, feature_dim] or {}. Writes the logits / penultimate features of each image.
  void run(View<const T> images, View<const T> t, View<T> logits, View<T> features) {
    require<shape_error>(images.rank() == 4 && images.dim(0) >= 1,
                         "ClassifierEvaluator: images: expected shape [N, C, H, W] with N >= 1, "
                         "got ",
                         images.shape());
    const index_t n = images.dim(0), k = net_->num_classes(), f = net_->feature_dim();
    const bool want_logits = !logits.empty(), want_features = !features.empty();
    if (want_logits)
      require<shape_error>(logits.shape() == Shape{n, k}, "ClassifierEvaluator: logits: expected ",
                           Shape{n, k}, ", got ", logits.shape());
    if (want_features)
      require<shape_error>(features.shape() == Shape{n, f},
                           "ClassifierEvaluator: features: expected ", Shape{n, f}, ", got ",
                           features.shape());
    const bool timed = net_->time_conditioned();
    if (timed)
      require<shape_error>(t.shape() == Shape{n}, "ClassifierEvaluator: t: expected shape ",
                           Shape{n}, ", got ", t.shape());
    const Shape bs = images.shape().with_rows(batch_);
    if (!(xb_.shape() == bs)) xb_ = Tensor<T>::zeros(bs);
    if (!(zb_.shape() == Shape{batch_, k})) zb_.resize(Shape{batch_, k});
    if (timed && !(tb_.shape() == Shape{batch_})) tb_ = Tensor<T>::full(Shape{batch_}, T(1));
    const index_t row = images.row_size();
    for (index_t b0 = 0; b0 < n; b0 += batch_) {
      const index_t m = std::min(batch_, n - b0);
      std::copy(images.data() + b0 * row, images.data() + (b0 + m) * row, xb_.data());
      if (m < batch_) std::fill(xb_.data() + m * row, xb_.data() + batch_ * row, T(0));
      if (timed) {
        std::copy(t.data() + b0, t.data() + b0 + m, tb_.data());
        std::fill(tb_.data() + m, tb_.data() + batch_, T(1));
      }
      net_->forward(*ps_, xb_.view(), timed ? View<const T>(tb_) : View<const T>(), zb_.view(),
                    cache_);
      if (want_logits) std::copy(zb_.data(), zb_.data() + m * k, logits.data() + b0 * k);
      if (want_features) {
        const View<const T> fv = net_->features(cache_);
        std::copy(fv.data(), fv.data() + m * f, features.data() + b0 * f);
      }
    }
  }

  /// Agreement of the predictions with `labels` ([N]); t as in run().
  Agreement agreement(View<const T> images, View<const label_t> labels, View<const T> t = {}) {
    ensure_logits(images.dim(0));
    run(images, t, logits_.view(), {});
    return metrics::agreement<T>(logits_.view(), labels);
  }

  /// Mean and covariance of the penultimate features of `images`.
  FeatureStatistics feature_statistics(View<const T> images, View<const T> t = {}) {
    const index_t n = images.rank() >= 1 ? images.dim(0) : 0;
    if (!(features_.shape() == Shape{n, net_->feature_dim()}))
      features_.resize(Shape{n, net_->feature_dim()});
    run(images, t, {}, features_.view());
    return metrics::feature_statistics(features_);
  }

  /// Fréchet distance between the feature Gaussians of `images` and of a reference set.
  double frechet_to(View<const T> images, const FeatureStatistics& reference,
                    View<const T> t = {}) {
    return frechet_distance(feature_statistics(images, t), reference);
  }

 private:
  void ensure_logits(index_t n) {
    if (!(logits_.shape() == Shape{n, net_->num_classes()}))
      logits_.resize(Shape{n, net_->num_classes()});
  }

  const nn::ConvClassifier<T>* net_;
  const nn::Parameters<T>* ps_;
  index_t batch_;
  typename nn::ConvClassifier<T>::Cache cache_;
  Tensor<T> xb_, tb_, zb_, logits_, features_;
};

/// Options of train_classifier / load_or_train_classifier.
struct ClassifierTrainOptions {
  index_t epochs = 3;            ///< passes over the shuffled training set
  index_t batch = 128;           ///< images per optimizer step
  index_t max_steps = 0;         ///< > 0: stop after this many steps (quick runs)
  double lr = 2e-3;              ///< peak AdamW learning rate
  double weight_decay = 1e-4;    ///< AdamW decoupled weight decay
  index_t warmup_steps = 100;    ///< linear warm-up, then cosine decay to lr / 100
  double min_accuracy = 0.90;    ///< test accuracy a classifier must reach to be cached / accepted
  bool require_accuracy = true;  ///< false: skip the bar (tiny runs); nothing is cached then
  bool write_cache = true;       ///< write the checkpoint after a successful training
  index_t eval_batch = 250;      ///< batch of the test-set evaluation
  index_t log_every = 100;       ///< steps between progress lines (0: none)
  std::ostream* log = &std::cout;  ///< progress lines go here (nullptr: silent)
};

/// What train_classifier / load_or_train_classifier did.
struct ClassifierTrainReport {
  bool loaded = false;  ///< true: read from the cache, not trained
  index_t steps = 0;
  double seconds = 0;  ///< training wall time (0 when loaded)
  double final_loss = std::numeric_limits<double>::quiet_NaN();  ///< mean loss of the last epoch
  double test_accuracy = std::numeric_limits<double>::quiet_NaN();
  Agreement test;  ///< per-class test counts
};

namespace classifier_detail {

inline void say(const ClassifierTrainOptions& o, const std::string& line) {
  if (o.log != nullptr) *o.log << line << std::endl;
}

template <class T>
void check_dataset(const char* which, View<const T> x, View<const label_t> y, index_t k) {
  require<shape_error>(x.rank() == 4 && x.dim(0) >= 1, "train_classifier: ", which,
                       " images: expected shape [N, C, H, W] with "
                       "N >= 1, got ",
                       x.shape());
  require<shape_error>(y.shape() == Shape{x.dim(0)}, "train_classifier: ", which,
                       " labels: expected shape ", Shape{x.dim(0)}, ", got ", y.shape());
  for (index_t i = 0; i < y.numel(); ++i)
    require<config_error>(y[i] >= 0 && y[i] < k, "train_classifier: ", which, " labels[", i,
                          "] = ", y[i], " is outside [0, ", k, ")");
}

/// The string a checkpoint's metadata must match to be reused: architecture and image geometry.
inline std::string describe(const nn::ConvClassifierConfig& c, index_t h, index_t w) {
  std::ostringstream os;
  os << "ConvClassifier in_channels=" << c.in_channels << " channels=";
  for (std::size_t i = 0; i < c.channels.size(); ++i) os << (i ? "," : "") << c.channels[i];
  os << " feature_dim=" << c.feature_dim << " num_classes=" << c.num_classes
     << " groups=" << c.groups << " time_dim=" << c.time_dim << " image_size=" << c.image_size
     << " image=" << h << "x" << w;
  return os.str();
}

inline std::string percent(double a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f%%", 100.0 * a);
  return buf;
}

}  // namespace classifier_detail

/// The training loop of train_classifier on the model's backend: `net` is nn::ConvClassifier<T>
/// (the CPU) or nn::BackendConvClassifier<T, B> (e.g. B = Cuda), `ps` its parameters on that
/// backend as they are (call net.init or upload them first). AdamW on the mean cross-entropy over
/// shuffled mini-batches (a fresh permutation per epoch drawn from `gen`; the last partial batch
/// of an epoch is dropped), linear warm-up then cosine decay to lr / 100. The images stay on the
/// host: each batch is gathered there and uploaded (on the CPU gathered in place). A
/// time-conditioned classifier is trained at t = 1 (clean data). Progress lines go to options.log.
/// Fills steps, seconds and final_loss of the report, not the test accuracy (train_classifier
/// and load_or_train_classifier measure it on the CPU).   train_x: [N, C, H, W], train_y: [N]
template <class Net>
ClassifierTrainReport fit_classifier(
    const Net& net, nn::Parameters<typename Net::value_type, nn::model_backend_t<Net>>& ps,
    View<const typename Net::value_type> train_x, View<const label_t> train_y,
    const ClassifierTrainOptions& o, Generator& gen) {
  using T = typename Net::value_type;
  using B = nn::model_backend_t<Net>;
  using CrossEntropy = std::conditional_t<std::is_same_v<B, Cpu>, nn::SoftmaxCrossEntropy<T>,
                                          nn::BackendSoftmaxCrossEntropy<T, B>>;
  using classifier_detail::say;
  const index_t k = net.num_classes();
  classifier_detail::check_dataset<T>("train", train_x, train_y, k);
  require<config_error>(o.epochs >= 1 && o.batch >= 1 && o.max_steps >= 0 && o.lr > 0,
                        "train_classifier: need epochs >= 1, batch >= 1, max_steps >= 0 and "
                        "lr > 0, got epochs = ",
                        o.epochs, ", batch = ", o.batch, ", max_steps = ", o.max_steps,
                        ", lr = ", o.lr);
  const index_t n = train_x.dim(0);
  const index_t batch = std::min(o.batch, n);
  const index_t per_epoch = n / batch;
  index_t total = per_epoch * o.epochs;
  if (o.max_steps > 0) total = std::min(total, o.max_steps);
  const index_t row = train_x.row_size();
  const Shape images = train_x.shape().with_rows(batch);

  train::AdamW<T, B> opt({.lr = o.lr, .weight_decay = o.weight_decay});
  const CrossEntropy ce;
  typename CrossEntropy::Cache ce_cache;
  typename Net::Cache cache;
  Tensor<T, B> xb(images), logits(Shape{batch, k}), dlogits(Shape{batch, k});
  Tensor<label_t, B> yb(Shape{batch});
  Tensor<T, B> tb = Tensor<T, B>::full(Shape{batch}, T(1));
  const View<const T, B> tv = net.time_conditioned() ? View<const T, B>(tb) : View<const T, B>();
  // The host side of a batch: the device tensors themselves on the CPU, staging copies elsewhere.
  constexpr bool host = std::is_same_v<B, Cpu>;
  Tensor<T> xh(host ? Shape{0} : images);
  Tensor<label_t> yh(host ? Shape{0} : Shape{batch});
  T* const xdst = host ? reinterpret_cast<T*>(xb.data()) : xh.data();
  label_t* const ydst = host ? reinterpret_cast<label_t*>(yb.data()) : yh.data();
  std::vector<index_t> perm(static_cast<std::size_t>(n));

  ClassifierTrainReport rep;
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  say(o, "classifier: training " + std::to_string(ps.numel()) + " parameters on " +
             std::to_string(n) + " images, " + std::to_string(total) + " steps of " +
             std::to_string(batch));
  index_t step = 0;
  double epoch_loss = 0, window_loss = 0;
  index_t epoch_steps = 0, window_steps = 0;
  for (index_t epoch = 0; epoch < o.epochs && step < total; ++epoch) {
    std::iota(perm.begin(), perm.end(), index_t{0});
    for (index_t i = n - 1; i > 0; --i)  // Fisher-Yates
      std::swap(perm[static_cast<std::size_t>(i)],
                perm[static_cast<std::size_t>(gen.uniform_int(static_cast<std::uint64_t>(i + 1)))]);
    epoch_loss = 0;
    epoch_steps = 0;
    for (index_t b = 0; b < per_epoch && step < total; ++b, ++step) {
      for (index_t j = 0; j < batch; ++j) {
        const index_t src = perm[static_cast<std::size_t>(b * batch + j)];
        std::copy(train_x.data() + src * row, train_x.data() + (src + 1) * row, xdst + j * row);
        ydst[j] = train_y[src];
      }
      if constexpr (!host) {
        BackendOps<B>::template upload<T>(xb.view(), View<const T>(xh.view()));
        BackendOps<B>::template upload<label_t>(yb.view(), View<const label_t>(yh.view()));
      }
      net.forward(ps, xb.view(), tv, logits.view(), cache);
      const double loss = ce.forward(logits.view(), yb.view(), ce_cache);
      require<numeric_error>(std::isfinite(loss), "train_classifier: the loss is not finite (",
                             loss, ") at step ", step);
      ce.backward(dlogits.view(), ce_cache);
      ps.zero_grad();
      net.backward(ps, dlogits.view(), {}, cache);
      opt.set_lr(train::warmup_cosine(step, o.lr, std::min<index_t>(o.warmup_steps, total - 1),
                                      total, o.lr / 100));
      opt.step(ps);
      epoch_loss += loss;
      window_loss += loss;
      ++epoch_steps;
      ++window_steps;
      if (o.log_every > 0 && ((step + 1) % o.log_every == 0 || step + 1 == total)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "classifier: epoch %ld/%ld step %ld/%ld loss %.4f (%.1f s)",
                      static_cast<long>(epoch + 1), static_cast<long>(o.epochs),
                      static_cast<long>(step + 1), static_cast<long>(total),
                      window_loss / static_cast<double>(window_steps), elapsed());
        say(o, buf);
        window_loss = 0;
        window_steps = 0;
      }
    }
  }
  rep.steps = step;
  rep.seconds = elapsed();
  rep.final_loss = epoch_steps > 0 ? epoch_loss / static_cast<double>(epoch_steps) : rep.final_loss;
  return rep;
}

namespace classifier_detail {

/// The test accuracy of a trained classifier (on the CPU), into `rep`, and its line on the log.
template <class T>
void measure_test(const nn::ConvClassifier<T>& net, const nn::Parameters<T>& ps,
                  View<const T> test_x, View<const label_t> test_y,
                  const ClassifierTrainOptions& o, ClassifierTrainReport& rep) {
  ClassifierEvaluator<T> eval(net, ps, std::min(o.eval_batch, test_x.dim(0)));
  Tensor<T> tt;
  if (net.time_conditioned()) tt = Tensor<T>::full(Shape{test_x.dim(0)}, T(1));
  rep.test = eval.agreement(test_x, test_y, tt.view());
  rep.test_accuracy = rep.test.rate();
}

}  // namespace classifier_detail

/// Trains `net` (its parameters `ps` as they are: call net.init first) on the CPU by
/// fit_classifier, then measures the test accuracy. Progress lines go to options.log. Does not
/// enforce the accuracy bar (load_or_train_classifier does).
/// train_x: [N, C, H, W], train_y: [N], test_x: [M, C, H, W], test_y: [M].
template <class T>
ClassifierTrainReport train_classifier(const nn::ConvClassifier<T>& net, nn::Parameters<T>& ps,
                                       View<const T> train_x, View<const label_t> train_y,
                                       View<const T> test_x, View<const label_t> test_y,
                                       const ClassifierTrainOptions& o, Generator& gen) {
  classifier_detail::check_dataset<T>("test", test_x, test_y, net.num_classes());
  ClassifierTrainReport rep = fit_classifier(net, ps, train_x, train_y, o, gen);
  classifier_detail::measure_test(net, ps, test_x, test_y, o, rep);
  classifier_detail::say(o, "classifier: trained in " + std::to_string(rep.seconds) +
                                " s, test accuracy " +
                                classifier_detail::percent(rep.test_accuracy) + " on " +
                                std::to_string(test_x.dim(0)) + " images");
  return rep;
}

/// Loads `net`'s parameters from `cache_path` when the file exists, holds exactly this
/// architecture (strict names and shapes), was trained on images of this geometry (checkpoint
/// metadata) and still clears options.min_accuracy on the test set; otherwise (no file, or a
/// file that fails any of these checks: a corrupt or stale cache is reported on options.log and
/// replaced) initialises the parameters from `gen`, trains, measures the test accuracy and
/// writes the checkpoint atomically. With options.require_accuracy a classifier below
/// options.min_accuracy is a config_error naming the accuracy and nothing is written; without
/// it the bar is skipped and nothing is cached (tiny runs). An empty cache_path disables the
/// cache. Arguments as train_classifier; `fit` (optional) does the training:
///   fit(net, ps, train_x, train_y, options, gen) -> ClassifierTrainReport (steps, seconds,
///   final_loss) trains the host parameters `ps` in place, already initialised from `gen`;
/// the default is fit_classifier on the CPU. A program with a GPU passes one that uploads `ps`,
/// runs fit_classifier with nn::BackendConvClassifier there and downloads the result (the
/// fashion_classifier example's --device cuda). The test accuracy is measured on the CPU either
/// way.
template <class T, class Fit>
ClassifierTrainReport load_or_train_classifier(const std::filesystem::path& cache_path,
                                               const nn::ConvClassifier<T>& net,
                                               nn::Parameters<T>& ps, View<const T> train_x,
                                               View<const label_t> train_y, View<const T> test_x,
                                               View<const label_t> test_y,
                                               const ClassifierTrainOptions& o, Generator& gen,
                                               Fit&& fit) {
  using classifier_detail::say;
  classifier_detail::check_dataset<T>("test", test_x, test_y, net.num_classes());
  const std::string desc = classifier_detail::describe(net.config(), test_x.dim(2), test_x.dim(3));
  const auto accept = [&](double acc) { return !o.require_accuracy || acc >= o.min_accuracy; };
  if (!cache_path.empty() && std::filesystem::exists(cache_path)) {
    try {
      const auto file = io::SafetensorsFile::read(cache_path);
      const auto it = file.metadata().find("flowdiff.classifier");
      require<io_error>(it != file.metadata().end() && it->second == desc, cache_path.string(),
                        ": the checkpoint is for '",
                        it == file.metadata().end() ? std::string("(no description)") : it->second,
                        "', not '", desc, "'");
      nn::load_parameters(ps, file, {.strict = true});
      ClassifierEvaluator<T> eval(net, ps, std::min(o.eval_batch, test_x.dim(0)));
      Tensor<T> tt;
      if (net.time_conditioned()) tt = Tensor<T>::full(Shape{test_x.dim(0)}, T(1));
      ClassifierTrainReport rep;
      rep.loaded = true;
      rep.test = eval.agreement(test_x, test_y, tt.view());
      rep.test_accuracy = rep.test.rate();
      if (accept(rep.test_accuracy)) {
        say(o, "classifier: loaded " + cache_path.string() + ", test accuracy " +
                   classifier_detail::percent(rep.test_accuracy));
        return rep;
      }
      say(o, "classifier: cached " + cache_path.string() + " reaches only " +
                 classifier_detail::percent(rep.test_accuracy) + "; retraining");
    } catch (const error& e) {
      say(o, std::string("classifier: cannot use the cache (") + e.what() + "); retraining");
    }
  }
  net.init(ps, gen);
  classifier_detail::check_dataset<T>("train", train_x, train_y, net.num_classes());
  ClassifierTrainReport rep = fit(net, ps, train_x, train_y, o, gen);
  classifier_detail::measure_test(net, ps, test_x, test_y, o, rep);
  say(o, "classifier: trained in " + std::to_string(rep.seconds) + " s, test accuracy " +
             classifier_detail::percent(rep.test_accuracy) + " on " +
             std::to_string(test_x.dim(0)) + " images");
  if (!o.require_accuracy) return rep;
  require<config_error>(rep.test_accuracy >= o.min_accuracy,
                        "load_or_train_classifier: test accuracy ",
                        classifier_detail::percent(rep.test_accuracy), " is below the required ",
                        classifier_detail::percent(o.min_accuracy),
                        "; the classifier is not cached (train longer: more epochs)");
  if (o.write_cache && !cache_path.empty()) {
    nn::save_parameters(ps, cache_path,
                        {{"flowdiff.classifier", desc},
                         {"test_accuracy", std::to_string(rep.test_accuracy)},
                         {"train_seconds", std::to_string(rep.seconds)},
                         {"steps", std::to_string(rep.steps)}});
    say(o, "classifier: wrote " + cache_path.string());
  }
  return rep;
}

/// load_or_train_classifier training on the CPU (fit_classifier).
template <class T>
ClassifierTrainReport load_or_train_classifier(const std::filesystem::path& cache_path,
                                               const nn::ConvClassifier<T>& net,
                                               nn::Parameters<T>& ps, View<const T> train_x,
                                               View<const label_t> train_y, View<const T> test_x,
                                               View<const label_t> test_y,
                                               const ClassifierTrainOptions& o, Generator& gen) {
  return load_or_train_classifier(
      cache_path, net, ps, train_x, train_y, test_x, test_y, o, gen,
      [](const nn::ConvClassifier<T>& n, nn::Parameters<T>& p, View<const T> x,
         View<const label_t> y, const ClassifierTrainOptions& opt, Generator& g) {
        return fit_classifier(n, p, x, y, opt, g);
      });
}

/// The classifier architecture measured on Fashion-MNIST (docs/metrics.md) for images of
/// `channels` x `image_size` x `image_size` and `num_classes` classes: ConvClassifierConfig's
/// defaults with a flatten head (image_size 28, or 32 for the padded images the pixel-space
/// generative models produce).
inline nn::ConvClassifierConfig fashion_classifier_config(index_t image_size = 32,
                                                          index_t num_classes = 10,
                                                          index_t channels = 1) {
  nn::ConvClassifierConfig c;
  c.in_channels = channels;
  c.num_classes = num_classes;
  c.image_size = image_size;
  return c;
}

/// A classifier with its own parameters (the model refers to them by id, so the two travel
/// together; the struct is movable).
template <class T = float>
struct TrainedClassifier {
  nn::Parameters<T> params;
  nn::ConvClassifier<T> net;
  ClassifierTrainReport report;

  explicit TrainedClassifier(const nn::ConvClassifierConfig& config) : net(params, config) {
    params.allocate();
  }
  /// A batched evaluator over this classifier (it must outlive the evaluator).
  ClassifierEvaluator<T> evaluator(index_t batch = 250) const {
    return ClassifierEvaluator<T>(net, params, batch);
  }
};

/// load_or_train_classifier for Fashion-MNIST-like data sets (train and test of the same square
/// geometry [N, C, S, S], S = 28, or 32 with FashionMnistOptions::pad_to_32 — train on the
/// geometry the generative model produces): builds fashion_classifier_config(S, num_classes, C),
/// then loads the cache at `cache_path` or trains and caches (see load_or_train_classifier for
/// what is checked and when the cache is replaced).
template <class Fit>
TrainedClassifier<float> load_or_train_fashion_classifier(const std::filesystem::path& cache_path,
                                                          const data::ImageDataset& train,
                                                          const data::ImageDataset& test,
                                                          const ClassifierTrainOptions& options,
                                                          Generator& gen, Fit&& fit) {
  const Shape s = test.images.shape();
  require<shape_error>(s.rank() == 4 && s[2] == s[3] && s[2] >= 4,
                       "load_or_train_fashion_classifier: test images: expected shape [N, C, S, "
                       "S] (square, S >= 4), got ",
                       s);
  require<shape_error>(train.images.rank() == 4 && train.images.shape().tail() == s.tail(),
                       "load_or_train_fashion_classifier: train images ", train.images.shape(),
                       " and test images ", s, " differ in geometry");
  require<config_error>(train.num_classes == test.num_classes,
                        "load_or_train_fashion_classifier: train has ", train.num_classes,
                        " classes, test ", test.num_classes);
  TrainedClassifier<float> c(fashion_classifier_config(s[2], test.num_classes, s[1]));
  c.report = load_or_train_classifier<float>(cache_path, c.net, c.params, train.images,
                                             train.labels, test.images, test.labels, options, gen,
                                             std::forward<Fit>(fit));
  return c;
}

/// load_or_train_fashion_classifier training on the CPU (fit_classifier).
inline TrainedClassifier<float> load_or_train_fashion_classifier(
    const std::filesystem::path& cache_path, const data::ImageDataset& train,
    const data::ImageDataset& test, const ClassifierTrainOptions& options, Generator& gen) {
  return load_or_train_fashion_classifier(
      cache_path, train, test, options, gen,
      [](const nn::ConvClassifier<float>& n, nn::Parameters<float>& p, View<const float> x,
         View<const label_t> y, const ClassifierTrainOptions& opt, Generator& g) {
        return fit_classifier(n, p, x, y, opt, g);
      });
}

}  // namespace flowdiff::metrics
