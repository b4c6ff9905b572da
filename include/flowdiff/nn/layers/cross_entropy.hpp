// flowdiff/nn/layers/cross_entropy.hpp — softmax cross-entropy of logits z: [N, K] against
// integer labels y: [N] in [0, K), as torch.nn.functional.cross_entropy (reduction "mean"):
//   log p[n, k] = z[n, k] - m_n - log sum_j exp(z[n, j] - m_n),   m_n = max_j z[n, j]
//   L           = -(1/N) sum_n log p[n, y_n]
//   dL/dz[n, k] = (p[n, k] - [k == y_n]) / N
// The log-sum-exp subtracts the row maximum, so no exp overflows and log p <= 0 exactly; the sum
// is accumulated in double. forward() keeps log p and the labels in a caller-owned cache, so
// log_probs(cache) gives every sample's class log-probabilities (log p(y | x) for classifier
// guidance, argmax predictions) and backward() writes dz = scale (p - onehot(y)) / N, where
// `scale` is the upstream gradient of the loss. Labels outside [0, K) are a config_error and
// non-finite logits a numeric_error naming the sample.
#pragma once

#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

namespace ce_detail {

inline void check_logits(std::string_view who, const Shape& s) {
  if (s.rank() != 2 || s[0] < 1 || s[1] < 1)
    fail<shape_error>(who, ": logits: expected shape [N, K] with N, K >= 1, got ", s);
}

}  // namespace ce_detail

/// out[n, k] = log softmax(z[n])_k, computed stably (row maximum subtracted, log-sum-exp in
/// double). Throws numeric_error for a non-finite logit.   logits, out: [N, K] (out may alias)
template <class T>
void log_softmax(std::type_identity_t<View<const T>> logits, View<T> out) {
  ce_detail::check_logits("log_softmax", logits.shape());
  check_same_shape("log_softmax", "logits", logits, "out", out);
  const index_t n = logits.dim(0), k = logits.dim(1);
  const T* pz = logits.data();
  T* po = out.data();
  // Found first, serially, so the error names the first bad element whatever the thread count.
  for (index_t i = 0; i < n * k; ++i)
    if (!std::isfinite(static_cast<double>(pz[i])))
      fail<numeric_error>("log_softmax: logits[", i / k, ", ", i % k, "] is not finite (", pz[i],
                          ")");
  Cpu::parallel_for(
      n,
      [=](index_t r) {
        const T* z = pz + r * k;
        T* o = po + r * k;
        double m = static_cast<double>(z[0]);
        for (index_t j = 1; j < k; ++j) m = std::max(m, static_cast<double>(z[j]));
        double s = 0;
        for (index_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(z[j]) - m);
        const double lse = m + std::log(s);
        for (index_t j = 0; j < k; ++j) o[j] = static_cast<T>(static_cast<double>(z[j]) - lse);
      },
      4 * k);
}

/// Mean softmax cross-entropy (torch.nn.functional.cross_entropy with integer targets).
template <class T>
class SoftmaxCrossEntropy {
 public:
  /// What forward() computed; reused (no allocation) while [N, K] repeats.
  struct Cache {
    Tensor<T> log_prob;      // [N, K]
    Tensor<label_t> labels;  // [N]
    bool has_forward = false;
  };

  // logits: [N, K], labels: [N] in [0, K). Returns the mean loss (accumulated in double).
  double forward(View<const T> logits, View<const label_t> labels, Cache& cache) const {
    ce_detail::check_logits("SoftmaxCrossEntropy", logits.shape());
    const index_t n = logits.dim(0), k = logits.dim(1);
    if (!(labels.shape() == Shape{n}))
      fail<shape_error>("SoftmaxCrossEntropy: labels: expected shape ", Shape{n}, ", got ",
                        labels.shape());
    for (index_t i = 0; i < n; ++i)
      if (labels[i] < 0 || labels[i] >= k)
        fail<config_error>("SoftmaxCrossEntropy: labels[", i, "] = ", labels[i], " is outside [0, ",
                           k, ") (K = ", k, " classes)");
    cache.has_forward = false;
    if (!(cache.log_prob.shape() == logits.shape())) cache.log_prob.resize(logits.shape());
    if (!(cache.labels.shape() == labels.shape())) cache.labels.resize(labels.shape());
    log_softmax<T>(logits, cache.log_prob.view());
    copy(cache.labels.view(), labels);
    const T* lp = cache.log_prob.data();
    double loss = 0;
    for (index_t i = 0; i < n; ++i) loss -= static_cast<double>(lp[i * k + labels[i]]);
    cache.has_forward = true;
    return loss / static_cast<double>(n);
  }

  // dlogits: [N, K] of the last forward (overwritten) = scale (softmax - onehot(labels)) / N.
  void backward(View<T> dlogits, const Cache& cache, T scale = T(1)) const {
    require<config_error>(cache.has_forward,
                          "SoftmaxCrossEntropy: backward() needs the cache of a forward() call");
    if (!(dlogits.shape() == cache.log_prob.shape()))
      fail<shape_error>("SoftmaxCrossEntropy: dlogits: expected shape ", cache.log_prob.shape(),
                        ", got ", dlogits.shape());
    const index_t n = dlogits.dim(0), k = dlogits.dim(1);
    const T* lp = cache.log_prob.data();
    const label_t* y = cache.labels.data();
    T* d = dlogits.data();
    const double c = static_cast<double>(scale) / static_cast<double>(n);
    Cpu::parallel_for(
        n,
        [=](index_t r) {
          for (index_t j = 0; j < k; ++j) {
            const double p = std::exp(static_cast<double>(lp[r * k + j]));
            d[r * k + j] = static_cast<T>(c * (p - (j == y[r] ? 1.0 : 0.0)));
          }
        },
        4 * k);
  }

  /// log p[n, k] of the last forward: [N, K].
  static View<const T> log_probs(const Cache& cache) {
    require<config_error>(cache.has_forward,
                          "SoftmaxCrossEntropy: log_probs() needs the cache of a forward() call");
    return cache.log_prob.view();
  }
};

/// Per-sample log-likelihood gradient seed: dlogits[n, k] = [k == y_n] - softmax(z[n])_k, the
/// gradient of sum_n log p(y_n | x_n) w.r.t. the logits (no 1/N). Back-propagated through a
/// classifier whose samples do not interact, it gives ∇_x log p(y_n | x_n) row by row.
/// logits: [N, K], labels: [N] in [0, K), dlogits: [N, K] (may not alias logits).
template <class T>
void log_prob_seed(std::type_identity_t<View<const T>> logits, View<const label_t> labels,
                   View<T> dlogits) {
  ce_detail::check_logits("log_prob_seed", logits.shape());
  check_same_shape("log_prob_seed", "logits", logits, "dlogits", dlogits);
  const index_t n = logits.dim(0), k = logits.dim(1);
  if (!(labels.shape() == Shape{n}))
    fail<shape_error>("log_prob_seed: labels: expected shape ", Shape{n}, ", got ", labels.shape());
  for (index_t i = 0; i < n; ++i)
    if (labels[i] < 0 || labels[i] >= k)
      fail<config_error>("log_prob_seed: labels[", i, "] = ", labels[i], " is outside [0, ", k,
                         ")");
  log_softmax<T>(logits, dlogits);
  T* d = dlogits.data();
  for (index_t r = 0; r < n; ++r)
    for (index_t j = 0; j < k; ++j) {
      const double p = std::exp(static_cast<double>(d[r * k + j]));
      d[r * k + j] = static_cast<T>((j == labels[r] ? 1.0 : 0.0) - p);
    }
}

}  // namespace flowdiff::nn
