// flowdiff/nn/models/classifier_backend.hpp — nn::ConvClassifier, the image classifier p(y | x)
// (with a time input the noisy classifier p_t(y | x_t) of classifier guidance), and the softmax
// cross-entropy on any backend B (nn/models/classifier.hpp and nn/layers/cross_entropy.hpp have
// the maths). With L blocks, h_0 = x and e = the sinusoidal embedding of t (scale 1000):
//   a_i = Conv3x3(h_i);  z_i = [GroupNorm](a_i) [+ T_i(e)];  s_i = SiLU(z_i);
//   h_{i+1} = AvgPool2(s_i) for i < L - 1;
//   g = mean_{H,W} s_{L-1} (image_size = 0) or flatten(AvgPool2(s_{L-1})) (image_size > 0);
//   f = SiLU(fc(g));  logits = head(f)
// and its backward (every parameter gradient accumulated, dx overwritten). The loss on B:
//   log p[n, k] = z[n, k] - m_n - log sum_j exp(z[n, j] - m_n)    (m_n the row maximum, double)
//   L = -(1/N) sum_n log p[n, y_n],   dL/dz = scale (p - onehot(y)) / N
//   seed of classifier guidance: dz[n, k] = [k == y_n] - p[n, k]   (no 1/N)
// so classifier_log_prob_grad gives grad[n] = ∇_{x_n} log p(y_n | x_n) on B. The layers are the
// backend-generic ones (BackendConv2d, BackendGroupNorm, BackendAvgPool2d of
// nn/layers/spatial_kernels.hpp; BackendLinear of token_kernels.hpp; the time features of
// kernels::MlpInput); the global average, the softmax rows and the label gathers are the named
// functors below, one thread per row or per element, each row's sums in double in the CPU's
// order: no atomics, deterministic on every backend. Parameters are registered under
// nn::ConvClassifier's names, shapes and order, so nn::upload_parameters moves a CPU model or
// checkpoint onto B bit-equal (and download_parameters back). Labels are checked on B by one
// reduction (detail::check_backend_labels, [0, K): a classifier has no null label) and non-finite
// logits by another; the messages give counts (a device cannot cheaply name the first one), except
// that the first non-finite logit is located on the host once the count says there is one. This
// header names no CUDA type: include backend/cuda/dispatch.cuh (nvcc) for B = Cuda.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/layers/token_kernels.hpp"
#include "flowdiff/nn/models/classifier.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

/// m + log sum_j exp(z[j] - m) over a row of k logits, m = max_j z[j], in double (log_softmax's
/// arithmetic in cross_entropy.hpp).
template <class T>
FLOWDIFF_INLINE double row_log_sum_exp(const T* z, index_t k) {
  using std::exp;
  using std::log;
  double m = static_cast<double>(z[0]);
  for (index_t j = 1; j < k; ++j) m = static_cast<double>(z[j]) > m ? static_cast<double>(z[j]) : m;
  double s = 0;
  for (index_t j = 0; j < k; ++j) s += exp(static_cast<double>(z[j]) - m);
  return m + log(s);
}

/// out[r, :] = log softmax(z[r, :]) (out may alias z). One thread per row.
template <class T>
struct LogSoftmaxRows {
  T* out;      // [N, K]
  const T* z;  // [N, K]
  index_t k;
  FLOWDIFF_HOST_DEVICE void operator()(index_t r) const {
    const double lse = row_log_sum_exp(z + r * k, k);
    for (index_t j = 0; j < k; ++j)
      out[r * k + j] = static_cast<T>(static_cast<double>(z[r * k + j]) - lse);
  }
};

/// d[r, j] = [j == y_r] - exp(log p[r, j]) with log p rounded to T first (log_prob_seed's
/// arithmetic): the gradient of sum_r log p(y_r | x_r) w.r.t. the logits. One thread per row.
template <class T>
struct LogProbSeedRows {
  T* d;              // [N, K] (not aliasing z)
  const T* z;        // [N, K]
  const label_t* y;  // [N]
  index_t k;
  FLOWDIFF_HOST_DEVICE void operator()(index_t r) const {
    using std::exp;
    const double lse = row_log_sum_exp(z + r * k, k);
    const index_t yr = static_cast<index_t>(y[r]);
    for (index_t j = 0; j < k; ++j) {
      const T lp = static_cast<T>(static_cast<double>(z[r * k + j]) - lse);
      d[r * k + j] = static_cast<T>((j == yr ? 1.0 : 0.0) - exp(static_cast<double>(lp)));
    }
  }
};

/// lp[r] = log p[r, y_r] of the logits z (rounded to T as log_softmax's output). One thread per row.
template <class T>
struct LabelLogProb {
  T* lp;             // [N]
  const T* z;        // [N, K]
  const label_t* y;  // [N]
  index_t k;
  FLOWDIFF_HOST_DEVICE void operator()(index_t r) const {
    const double lse = row_log_sum_exp(z + r * k, k);
    lp[r] = static_cast<T>(static_cast<double>(z[r * k + static_cast<index_t>(y[r])]) - lse);
  }
};

/// -log p[r, y_r] in double: one term of the cross-entropy's sum.
template <class T>
struct NegLabelLogProb {
  const T* log_prob;  // [N, K]
  const label_t* y;   // [N]
  index_t k;
  FLOWDIFF_HOST_DEVICE double operator()(index_t r) const {
    return -static_cast<double>(log_prob[r * k + static_cast<index_t>(y[r])]);
  }
};

/// d[r, j] = c (exp(log p[r, j]) - [j == y_r]) in double, rounded once (SoftmaxCrossEntropy's
/// backward, c = scale / N). One thread per element.
template <class T>
struct CrossEntropyGrad {
  T* d;               // [N, K]
  const T* log_prob;  // [N, K]
  const label_t* y;   // [N]
  index_t k;
  double c;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    using std::exp;
    const index_t r = q / k, j = q % k;
    const double p = exp(static_cast<double>(log_prob[q]));
    d[q] = static_cast<T>(c * (p - (j == static_cast<index_t>(y[r]) ? 1.0 : 0.0)));
  }
};

/// 1 where v[i] is NaN or infinite, else 0 (v - v is 0 exactly for every finite v).
template <class T>
struct NonFinite {
  const T* v;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double d = static_cast<double>(v[i]);
    return d - d == 0.0 ? 0.0 : 1.0;
  }
};

/// g[nc] = sum8(s[nc, :]) inv, inv = 1 / (H W): the global average (the CPU classifier's
/// spatial_mean: sum_spatial, then one multiply). One thread per (sample, channel).
template <class T>
struct ChannelMean {
  T* g;        // [N C]
  const T* s;  // [N C, L]
  index_t len;
  T inv;
  FLOWDIFF_HOST_DEVICE void operator()(index_t nc) const {
    g[nc] = mul_rn(sum8(s + nc * len, len), inv);
  }
};

/// ds[nc, l] = dg[nc] inv: the global average's backward. One thread per element.
template <class T>
struct ChannelMeanGrad {
  T* ds;        // [N C, L]
  const T* dg;  // [N C]
  index_t len;
  T inv;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const { ds[q] = mul_rn(dg[q / len], inv); }
};

}  // namespace kernels

namespace classifier_backend_detail {

template <class T, class B>
void resize_if(Tensor<T, B>& t, const Shape& s) {
  if (!(t.shape() == s)) t.resize(s);
}

template <class U, class B>
bool absent(View<U, B> v) {
  return v.data() == nullptr || v.empty();
}

inline void check_logits(std::string_view who, const Shape& s) {
  if (s.rank() != 2 || s[0] < 1 || s[1] < 1)
    fail<shape_error>(who, ": logits: expected shape [N, K] with N, K >= 1, got ", s);
}

/// Throws numeric_error naming the first non-finite logit: counted by one reduction on B; only
/// when there is one are the logits copied to the host to find it.
template <class T, Backend B>
void check_finite_logits(std::string_view who, View<const T, B> z) {
  if (B::reduce_sum(z.numel(), kernels::NonFinite<T>{z.data()}) == 0) return;
  Tensor<T> h(z.shape());
  BackendOps<B>::template download<T>(h.view(), z);
  const index_t k = z.dim(1);
  for (index_t i = 0; i < h.numel(); ++i)
    if (!std::isfinite(static_cast<double>(h[i])))
      fail<numeric_error>(who, ": logits[", i / k, ", ", i % k, "] is not finite (", h[i], ")");
}

}  // namespace classifier_backend_detail

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy on B.
// ---------------------------------------------------------------------------------------------

/// out = log_softmax(logits) row by row on B (nn::log_softmax's arithmetic; out may alias).
/// Throws numeric_error for a non-finite logit.   logits, out: [N, K]
template <class T, Backend B>
void backend_log_softmax(std::type_identity_t<View<const T, B>> logits, View<T, B> out) {
  classifier_backend_detail::check_logits("backend_log_softmax", logits.shape());
  check_same_shape("backend_log_softmax", "logits", logits, "out", View<const T, B>(out));
  classifier_backend_detail::check_finite_logits<T, B>("backend_log_softmax", logits);
  B::parallel_for(logits.dim(0), kernels::LogSoftmaxRows<T>{out.data(), logits.data(), logits.dim(1)},
                  4 * logits.dim(1));
}

/// nn::log_prob_seed on B: dlogits[n, k] = [k == y_n] - softmax(z[n])_k, the gradient of
/// sum_n log p(y_n | x_n) w.r.t. the logits (no 1/N). logits, dlogits: [N, K] (not aliasing),
/// labels: [N] in [0, K), all on B.
template <class T, Backend B>
void backend_log_prob_seed(std::type_identity_t<View<const T, B>> logits,
                           std::type_identity_t<View<const label_t, B>> labels, View<T, B> dlogits) {
  constexpr const char* who = "backend_log_prob_seed";
  classifier_backend_detail::check_logits(who, logits.shape());
  check_same_shape(who, "logits", logits, "dlogits", View<const T, B>(dlogits));
  const index_t n = logits.dim(0), k = logits.dim(1);
  detail::check_backend_labels<B>(who, labels, n, k, false);
  classifier_backend_detail::check_finite_logits<T, B>(who, logits);
  B::parallel_for(n, kernels::LogProbSeedRows<T>{dlogits.data(), logits.data(), labels.data(), k},
                  4 * k);
}

/// nn::SoftmaxCrossEntropy on B: the mean softmax cross-entropy of logits [N, K] against labels
/// [N] in [0, K) (torch.nn.functional.cross_entropy), with log p and the labels kept in the cache
/// on B. The loss is one deterministic reduction in double (its value goes to the host).
template <class T, Backend B>
class BackendSoftmaxCrossEntropy {
 public:
  struct Cache {
    Tensor<T, B> log_prob;      // [N, K]
    Tensor<label_t, B> labels;  // [N]
    bool has_forward = false;
  };

  // logits: [N, K], labels: [N] in [0, K), on B. Returns the mean loss.
  double forward(View<const T, B> logits, View<const label_t, B> labels, Cache& cache) const {
    using namespace classifier_backend_detail;
    check_logits(kind, logits.shape());
    const index_t n = logits.dim(0), k = logits.dim(1);
    detail::check_backend_labels<B>(kind, labels, n, k, false);
    check_finite_logits<T, B>(kind, logits);
    cache.has_forward = false;
    resize_if(cache.log_prob, logits.shape());
    resize_if(cache.labels, labels.shape());
    B::parallel_for(n, kernels::LogSoftmaxRows<T>{cache.log_prob.data(), logits.data(), k}, 4 * k);
    copy(cache.labels.view(), labels);
    const double loss =
        B::reduce_sum(n, kernels::NegLabelLogProb<T>{cache.log_prob.data(), cache.labels.data(), k});
    cache.has_forward = true;
    return loss / static_cast<double>(n);
  }

  // dlogits: [N, K] of the last forward (overwritten) = scale (softmax - onehot(labels)) / N.
  void backward(View<T, B> dlogits, const Cache& cache, T scale = T(1)) const {
    require<config_error>(cache.has_forward, kind,
                          ": backward() needs the cache of a forward() call");
    if (!(dlogits.shape() == cache.log_prob.shape()))
      fail<shape_error>(kind, ": dlogits: expected shape ", cache.log_prob.shape(), ", got ",
                        dlogits.shape());
    const index_t n = dlogits.dim(0), k = dlogits.dim(1);
    B::parallel_for(n * k, kernels::CrossEntropyGrad<T>{
                               dlogits.data(), cache.log_prob.data(), cache.labels.data(), k,
                               static_cast<double>(scale) / static_cast<double>(n)});
  }

  /// log p[n, k] of the last forward: [N, K] on B.
  static View<const T, B> log_probs(const Cache& cache) {
    require<config_error>(cache.has_forward, kind,
                          ": log_probs() needs the cache of a forward() call");
    return cache.log_prob.view();
  }

 private:
  static constexpr const char* kind = "BackendSoftmaxCrossEntropy";
};

// ---------------------------------------------------------------------------------------------
// The classifier on B.
// ---------------------------------------------------------------------------------------------

template <class T, Backend B>
class BackendConvClassifier {
  using Context = typename BackendOps<B>::Context;
  using Conv = BackendConv2d<T, B>;
  using Norm = BackendGroupNorm<T, B>;
  using Dense = BackendLinear<T, B>;

 public:
  using value_type = T;
  using backend = B;

  /// Activations of the last forward, backward's buffers and a gemm context (a cuBLAS handle on
  /// the GPU, made on first use), on B; sized on the first call and when the input shape changes.
  struct Cache {
    Shape in_shape;
    const void* owner = nullptr;
    bool has_forward = false;
    std::optional<Context> ctx;
    Tensor<T, B> x;                             // the input (the first conv's backward needs it)
    Tensor<T, B> emb;                           // [N, time_dim]
    std::vector<Tensor<T, B>> a, z, s, g1, g2;  // per block: [N, c_i, H_i, W_i]
    std::vector<Tensor<T, B>> p, dp;            // pooled outputs and their gradients
    std::vector<Tensor<T, B>> tshift, dshift;   // per block: [N, c_i] (time conditioning)
    std::vector<typename Conv::Cache> conv;
    std::vector<typename Norm::Cache> norm;
    Tensor<T, B> gap, dgap;    // [N, c_last] (global average; the flatten head reads p, dp)
    Tensor<T, B> fpre, f, df;  // [N, feature_dim]

    Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };

  /// Registers the parameters in ps (not yet allocated) exactly as nn::ConvClassifier does.
  BackendConvClassifier(Parameters<T, B>& ps, const ConvClassifierConfig& config,
                        const std::string& prefix = "")
      : cfg_(config), prefix_(prefix), pool_(2, prefix + "pool") {
    classifier_detail::validate(cfg_, name());  // nn::ConvClassifier's checks and messages
    const auto& ch = cfg_.channels;
    for (std::size_t i = 0; i < ch.size(); ++i) {
      const std::string p = prefix + "blocks." + std::to_string(i);
      const index_t in = i == 0 ? cfg_.in_channels : ch[i - 1];
      convs_.emplace_back(ps, p + ".conv", in, ch[i], 3, 1, 1);
      if (cfg_.groups > 0) norms_.emplace_back(ps, p + ".norm", cfg_.groups, ch[i]);
      if (cfg_.time_dim > 0) times_.emplace_back(ps, p + ".time", cfg_.time_dim, ch[i]);
    }
    fc_.emplace_back(ps, prefix + "fc", fc_inputs(), cfg_.feature_dim);
    head_.emplace_back(ps, prefix + "head", cfg_.feature_dim, cfg_.num_classes);
    // SinusoidalTimeEmbedding's frequencies (scale 1000, max_period 10000), on B.
    freqs_ = detail::time_frequencies<B>(cfg_.time_dim, max_period);
  }

  const ConvClassifierConfig& config() const { return cfg_; }
  index_t num_classes() const { return cfg_.num_classes; }
  index_t feature_dim() const { return cfg_.feature_dim; }
  index_t blocks() const { return static_cast<index_t>(cfg_.channels.size()); }
  bool time_conditioned() const { return cfg_.time_dim > 0; }
  bool flattens() const { return cfg_.image_size > 0; }
  /// H and W must be at least this (every pooling halves them, floor).
  index_t min_size() const { return classifier_detail::min_size(cfg_); }
  /// Side of the flattened map (image_size > 0), image_size halved blocks() times.
  index_t flat_side() const { return classifier_detail::flat_side(cfg_); }
  /// Inputs of fc: c_last (global average) or c_last S^2 (flatten).
  index_t fc_inputs() const { return classifier_detail::fc_inputs(cfg_); }

  /// nn::ConvClassifier::init's draws on B, in its order: with B = Cpu the same values; on a GPU
  /// the uniforms may differ in the last bit (docs/cuda.md, "Random numbers").
  void init(Parameters<T, B>& ps, Generator& gen) const {
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      convs_[i].init(ps, gen);
      if (!norms_.empty()) norms_[i].init(ps, gen);
      if (!times_.empty()) times_[i].init(ps, gen);
    }
    fc_[0].init(ps, gen);
    head_[0].init(ps, gen);
  }

  // x: [N, in_channels, H, W] (H, W >= min_size()), t: [N] when time_dim > 0, else empty / {},
  // logits: [N, num_classes], all on B. Fills `c` (features(c) gives f) for backward.
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> t,
               View<T, B> logits, Cache& c) const {
    check_forward(x, t, logits);
    prepare(c, x.shape());
    Context& ctx = c.context();
    const index_t n = x.dim(0), L = blocks(), td = cfg_.time_dim;
    if (time_conditioned())
      B::parallel_for(n * td, kernels::MlpInput<T>{c.emb.data(), nullptr, t.data(), freqs_.data(),
                                                   nullptr, nullptr, 0, td, time_scale});
    copy(c.x.view(), x);
    View<const T, B> h = c.x.view();
    for (index_t i = 0; i < L; ++i) {
      const auto k = static_cast<std::size_t>(i);
      convs_[k].forward(ctx, ps, h, c.a[k].view(), c.conv[k]);
      if (!norms_.empty())
        norms_[k].forward(ps, c.a[k].view(), c.z[k].view(), c.norm[k]);
      else
        copy(c.z[k].view(), View<const T, B>(c.a[k].view()));
      if (time_conditioned()) {
        times_[k].forward(ctx, ps, c.emb.view(), c.tshift[k].view());
        add_per_channel<T, B>(c.z[k].view(), View<const T, B>(c.tshift[k].view()));
      }
      B::parallel_for(c.s[k].numel(), kernels::SiluOut<T>{c.s[k].data(), c.z[k].data()}, 8);
      if (i + 1 < L || flattens()) {
        pool_.forward(c.s[k].view(), c.p[k].view());
        h = c.p[k].view();
      }
    }
    const auto last = static_cast<std::size_t>(L - 1);
    if (!flattens()) {
      const index_t len = c.s[last].dim(2) * c.s[last].dim(3);
      B::parallel_for(c.gap.numel(),
                      kernels::ChannelMean<T>{c.gap.data(), c.s[last].data(), len,
                                              T(1) / static_cast<T>(len)},
                      len);
    }
    fc_[0].forward(ctx, ps, fc_input(c), c.fpre.view());
    B::parallel_for(c.f.numel(), kernels::SiluOut<T>{c.f.data(), c.fpre.data()}, 8);
    head_[0].forward(ctx, ps, c.f.view(), logits);
    c.has_forward = true;
  }

  /// The penultimate features f: [N, feature_dim] of the last forward with this cache, on B.
  View<const T, B> features(const Cache& c) const {
    require<config_error>(c.has_forward && c.owner == this, name(),
                          ": features() needs the cache of a forward() call first");
    return c.f.view();
  }

  // dlogits: [N, num_classes] of the last forward; dx: like x, or empty / {} (skipped); on B.
  // Parameter gradients accumulate (+=); dx is overwritten. There is no gradient w.r.t. t.
  void backward(Parameters<T, B>& ps, View<const T, B> dlogits, View<T, B> dx, Cache& c) const {
    using classifier_backend_detail::absent;
    require<config_error>(c.has_forward && c.owner == this, name(),
                          ": backward() needs the cache of a forward() call first");
    const index_t n = c.in_shape[0], L = blocks();
    check_shape("dlogits", dlogits, Shape{n, cfg_.num_classes});
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    Context& ctx = c.context();
    head_[0].backward(ctx, ps, c.f.view(), dlogits, c.df.view());
    B::parallel_for(c.df.numel(), kernels::SiluBackwardInPlace<T>{c.fpre.data(), c.df.data()}, 8);
    const auto last = static_cast<std::size_t>(L - 1);
    if (flattens()) {  // fc's input gradient lands in dp (flattened); g1 = ds of the last block
      const View<T, B> dflat = c.dp[last].view().reshape(Shape{n, fc_inputs()});
      fc_[0].backward(ctx, ps, fc_input(c), View<const T, B>(c.df.view()), dflat);
      pool_.backward(c.s[last].view(), c.dp[last].view(), c.g1[last].view());
    } else {
      fc_[0].backward(ctx, ps, fc_input(c), View<const T, B>(c.df.view()), c.dgap.view());
      const index_t len = c.g1[last].dim(2) * c.g1[last].dim(3);
      B::parallel_for(c.g1[last].numel(),
                      kernels::ChannelMeanGrad<T>{c.g1[last].data(), c.dgap.data(), len,
                                                  T(1) / static_cast<T>(len)});
    }
    for (index_t i = L - 1; i >= 0; --i) {
      const auto k = static_cast<std::size_t>(i);
      View<T, B> g1 = c.g1[k].view();
      B::parallel_for(g1.numel(), kernels::SiluBackwardInPlace<T>{c.z[k].data(), g1.data()},
                      8);  // dz, in place
      if (time_conditioned()) {
        sum_per_channel<T, B>(View<const T, B>(g1), c.dshift[k].view());
        times_[k].backward(ctx, ps, c.emb.view(), View<const T, B>(c.dshift[k].view()),
                           View<T, B>{});
      }
      View<const T, B> da = g1;
      if (!norms_.empty()) {
        norms_[k].backward(ps, c.a[k].view(), View<const T, B>(g1), c.g2[k].view(), c.norm[k]);
        da = c.g2[k].view();
      }
      if (i == 0) {
        convs_[k].backward(ctx, ps, c.x.view(), da, absent(dx) ? View<T, B>{} : dx, c.conv[k]);
      } else {
        const auto j = k - 1;
        convs_[k].backward(ctx, ps, c.p[j].view(), da, c.dp[j].view(), c.conv[k]);
        pool_.backward(c.s[j].view(), c.dp[j].view(), c.g1[j].view());
      }
    }
  }

 private:
  static constexpr double time_scale = 1000.0;  // SinusoidalTimeEmbedding's defaults, as
  static constexpr double max_period = 10000.0;  // nn::ConvClassifier

  std::string name() const {
    return prefix_.empty() ? std::string("BackendConvClassifier")
                           : prefix_ + " (BackendConvClassifier)";
  }

  // fc's input [N, fc_inputs()]: the global average, or the last pooled map flattened (a view).
  View<const T, B> fc_input(const Cache& c) const {
    if (!flattens()) return c.gap.view();
    return c.p[static_cast<std::size_t>(blocks() - 1)].view().reshape(
        Shape{c.in_shape[0], fc_inputs()});
  }

  template <class U>
  void check_shape(const char* arg, View<U, B> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T, B> x, View<const T, B> t, View<T, B> logits) const {
    classifier_detail::check_forward(cfg_, name(), x.shape(),
                                     !classifier_backend_detail::absent(t), t.shape(),
                                     logits.shape());
  }

  void prepare(Cache& c, const Shape& s) const {
    using classifier_backend_detail::resize_if;
    c.has_forward = false;
    if (c.owner == this && c.in_shape == s) return;
    classifier_detail::size_block_buffers(c, cfg_, s);
    const index_t n = s[0];
    const auto& ch = cfg_.channels;
    const index_t td = cfg_.time_dim;
    resize_if(c.emb, Shape{td > 0 ? n : 0, td});
    const Shape gs{flattens() ? 0 : n, ch.back()};
    resize_if(c.gap, gs);
    resize_if(c.dgap, gs);
    for (Tensor<T, B>* e : {&c.fpre, &c.f, &c.df}) resize_if(*e, Shape{n, cfg_.feature_dim});
    resize_if(c.x, s);
    c.in_shape = s;
    c.owner = this;
  }

  ConvClassifierConfig cfg_;
  std::string prefix_;
  BackendAvgPool2d<T, B> pool_;
  std::vector<Conv> convs_;
  std::vector<Norm> norms_;    // one per block when groups > 0
  std::vector<Dense> times_;   // one per block when time_dim > 0
  std::vector<Dense> fc_, head_;
  Tensor<double, B> freqs_;    // [time_dim / 2]
};

/// nn::classifier_log_prob_grad on B: grad[n] = ∇_{x_n} log p(y_n | x_n) for every sample (the
/// classifier-guidance term, with t for a noisy classifier): one forward, dlogits = onehot(y) -
/// softmax, one backward with dx. Writes log p(y_n | x_n) to `log_prob` when it is not empty. The
/// backward also accumulates parameter gradients into `ps` (zero them before training on it).
/// x, grad: [N, C, H, W], t: [N] or {}, y: [N] in [0, K), log_prob: [N] or {}, all on B; the
/// labels are checked (one reduction) before the model runs.
template <class T, Backend B>
void classifier_log_prob_grad(const BackendConvClassifier<T, B>& net, Parameters<T, B>& ps,
                              std::type_identity_t<View<const T, B>> x,
                              std::type_identity_t<View<const T, B>> t,
                              std::type_identity_t<View<const label_t, B>> y,
                              std::type_identity_t<View<T, B>> grad,
                              std::type_identity_t<View<T, B>> log_prob,
                              typename BackendConvClassifier<T, B>::Cache& cache,
                              Tensor<T, B>& logits_scratch, Tensor<T, B>& dlogits_scratch) {
  constexpr const char* who = "classifier_log_prob_grad";
  const Shape ls{x.rank() >= 1 ? x.dim(0) : 0, net.num_classes()};
  detail::check_backend_labels<B>(who, y, ls[0], ls[1], false);
  const bool want_lp = !classifier_backend_detail::absent(log_prob);
  if (want_lp && !(log_prob.shape() == Shape{ls[0]}))
    fail<shape_error>(who, ": log_prob: expected shape ", Shape{ls[0]}, ", got ",
                      log_prob.shape());
  classifier_backend_detail::resize_if(logits_scratch, ls);
  classifier_backend_detail::resize_if(dlogits_scratch, ls);
  net.forward(ps, x, t, logits_scratch.view(), cache);
  const View<const T, B> z = logits_scratch.view();
  classifier_backend_detail::check_finite_logits<T, B>(who, z);
  B::parallel_for(ls[0],
                  kernels::LogProbSeedRows<T>{dlogits_scratch.data(), z.data(), y.data(), ls[1]},
                  4 * ls[1]);
  if (want_lp)
    B::parallel_for(ls[0], kernels::LabelLogProb<T>{log_prob.data(), z.data(), y.data(), ls[1]},
                    4 * ls[1]);
  net.backward(ps, View<const T, B>(dlogits_scratch.view()), grad, cache);
}

}  // namespace flowdiff::nn
