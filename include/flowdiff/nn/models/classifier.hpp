// flowdiff/nn/models/classifier.hpp — a small convolutional image classifier p(y | x) (or, with
// time conditioning, the noisy classifier p_t(y | x_t) of classifier guidance) for x: [N, C, H, W].
// With L = channels.size() blocks, h_0 = x and e = SinusoidalTimeEmbedding(time_dim)(t):
//   a_i = Conv3x3(h_i)                      (c_{i-1} -> c_i, padding 1)
//   z_i = [GroupNorm](a_i) [+ T_i(e)]       (T_i = Linear(time_dim -> c_i), broadcast over H, W)
//   s_i = SiLU(z_i);   h_{i+1} = AvgPool2(s_i) for i < L - 1
//   g   = mean_{H,W} s_{L-1}                [N, c_{L-1}]        (image_size = 0: global average)
//   g   = flatten(AvgPool2(s_{L-1}))        [N, c_{L-1} S S]    (image_size > 0: S = image_size
//                                                                 halved L times, floor)
//   f   = SiLU(Linear(g))                   [N, feature_dim]    (the penultimate features)
//   z   = Linear(f)                         [N, num_classes]    (logits)
// Backward runs it in reverse and, when asked, returns dx = dL/dx (with dlogits from
// log_prob_seed, dx = ∇_x log p(y | x) per sample, the classifier-guidance term; see
// classifier_log_prob_grad). The time shift is added after the norm so GroupNorm cannot remove
// it. Samples never interact (no batch norm), so a sample's logits do not depend on its batch.
// Parameter names are those of the torch module in tools/fixtures/classifier.py:
// "blocks.<i>.conv.*", "blocks.<i>.norm.*", "blocks.<i>.time.*", "fc.*", "head.*".
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/broadcast.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/cross_entropy.hpp"
#include "flowdiff/nn/layers/embedding.hpp"
#include "flowdiff/nn/layers/linear.hpp"
#include "flowdiff/nn/layers/norm.hpp"
#include "flowdiff/nn/layers/pooling.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Configuration of nn::ConvClassifier.
struct ConvClassifierConfig {
  // The defaults (with image_size = 28 or 32) are the Fashion-MNIST classifier measured in
  // docs/metrics.md: two blocks of 16 and 32 channels, GroupNorm(8), a flatten head.
  index_t in_channels = 1;                   ///< channels of x
  std::vector<index_t> channels = {16, 32};  ///< one conv block each; 2x2 pooling between
  index_t feature_dim = 128;                 ///< width of the penultimate features
  index_t num_classes = 10;                  ///< K: logits per sample
  index_t groups = 8;    ///< GroupNorm groups in every block (must divide each count); 0: none
  index_t time_dim = 0;  ///< sinusoidal time-embedding width; 0: no time input
  /// 0: global average pooling after the last block (any H, W). > 0: square images of exactly
  /// this size; the last block is pooled 2x2 too and its map flattened into fc (keeps where
  /// things are, so it learns faster; ties the model to one image size).
  index_t image_size = 0;
};

namespace classifier_detail {

/// The configuration checks of nn::ConvClassifier and nn::BackendConvClassifier; `name` is the
/// model's name in the messages.
inline void validate(const ConvClassifierConfig& cfg, const std::string& name) {
  const auto& ch = cfg.channels;
  require<config_error>(cfg.in_channels >= 1 && !ch.empty() && ch.size() <= 16 &&
                            cfg.feature_dim >= 1 && cfg.num_classes >= 2 && cfg.groups >= 0 &&
                            (cfg.time_dim == 0 || cfg.time_dim >= 2) && cfg.image_size >= 0,
                        name,
                        ": need in_channels >= 1, 1 to 16 conv blocks, feature_dim >= 1, "
                        "num_classes >= 2, groups >= 0 and time_dim = 0 or >= 2; got "
                        "in_channels = ",
                        cfg.in_channels, ", ", ch.size(), " blocks, feature_dim = ", cfg.feature_dim,
                        ", num_classes = ", cfg.num_classes, ", groups = ", cfg.groups,
                        ", time_dim = ", cfg.time_dim, ", image_size = ", cfg.image_size);
  if (cfg.image_size > 0)
    require<config_error>(
        (cfg.image_size >> ch.size()) >= 1, name, ": image_size = ", cfg.image_size,
        " is too small for ", ch.size(),
        " blocks, each followed by 2x2 pooling (need >= ", index_t{1} << ch.size(), ")");
  for (index_t c : ch)
    require<config_error>(c >= 1 && (cfg.groups == 0 || c % cfg.groups == 0), name,
                          ": channel count ", c, " must be >= 1",
                          cfg.groups > 0 ? " and a multiple of groups = " : "",
                          cfg.groups > 0 ? std::to_string(cfg.groups) : std::string());
}

/// H and W must be at least this: every pooling halves them (floor).
inline index_t min_size(const ConvClassifierConfig& cfg) {
  const auto L = static_cast<index_t>(cfg.channels.size());
  return index_t{1} << (cfg.image_size > 0 ? L : L - 1);
}

/// Side of the flattened map (image_size > 0: image_size halved once per block), else 0.
inline index_t flat_side(const ConvClassifierConfig& cfg) {
  return cfg.image_size > 0 ? cfg.image_size >> static_cast<index_t>(cfg.channels.size()) : 0;
}

/// Inputs of fc: c_last (global average) or c_last S^2 (flatten).
inline index_t fc_inputs(const ConvClassifierConfig& cfg) {
  const index_t side = flat_side(cfg);
  return cfg.image_size > 0 ? cfg.channels.back() * side * side : cfg.channels.back();
}

/// The shape checks of forward (x, t, logits), for any backend's views; `t_given` is whether t
/// is present (not empty).
inline void check_forward(const ConvClassifierConfig& cfg, const std::string& name, const Shape& x,
                          bool t_given, const Shape& t, const Shape& logits) {
  const index_t m = min_size(cfg);
  if (cfg.image_size > 0) {
    if (x.rank() != 4 || x[0] < 1 || x[1] != cfg.in_channels || x[2] != cfg.image_size ||
        x[3] != cfg.image_size)
      fail<shape_error>(name, ": x: expected shape [N, ", cfg.in_channels, ", ", cfg.image_size,
                        ", ", cfg.image_size, "] with N >= 1 (image_size = ", cfg.image_size,
                        "), got ", x);
  } else if (x.rank() != 4 || x[0] < 1 || x[1] != cfg.in_channels || x[2] < m || x[3] < m) {
    fail<shape_error>(name, ": x: expected shape [N, ", cfg.in_channels,
                      ", H, W] with N >= 1 and H, W >= ", m, ", got ", x);
  }
  const index_t n = x[0];
  if (cfg.time_dim > 0) {
    if (!(t == Shape{n}))
      fail<shape_error>(name, ": t: expected shape ", Shape{n}, ", got ", t);
  } else if (t_given) {
    fail<config_error>(name, ": times t were given (shape ", t,
                       ") but the model has no time input (time_dim = 0)");
  }
  if (!(logits == Shape{n, cfg.num_classes}))
    fail<shape_error>(name, ": logits: expected shape ", Shape{n, cfg.num_classes}, ", got ",
                      logits);
}

/// Sizes the per-block buffers of a classifier cache for input shape s: a, z, s, g1 (and g2 with
/// groups > 0) [N, c_i, H_i, W_i], the time shifts [N, c_i], the pooled maps p, dp, and the layer
/// caches. nn::ConvClassifier::Cache and nn::BackendConvClassifier::Cache share these members.
template <class Cache>
void size_block_buffers(Cache& c, const ConvClassifierConfig& cfg, const Shape& s) {
  const auto& ch = cfg.channels;
  const auto L = ch.size();
  const index_t n = s[0];
  const bool timed = cfg.time_dim > 0;
  for (auto* v : {&c.a, &c.z, &c.s, &c.g1, &c.g2, &c.tshift, &c.dshift}) v->resize(L);
  const std::size_t pools = cfg.image_size > 0 ? L : L - 1;
  c.p.resize(pools);
  c.dp.resize(pools);
  c.conv.resize(L);
  c.norm.resize(L);
  const auto resize_if = [](auto& t, const Shape& shape) {
    if (!(t.shape() == shape)) t.resize(shape);
  };
  index_t h = s[2], w = s[3];
  for (std::size_t i = 0; i < L; ++i) {
    const Shape as{n, ch[i], h, w};
    for (auto* v : {&c.a, &c.z, &c.s, &c.g1}) resize_if((*v)[i], as);
    resize_if(c.g2[i], cfg.groups > 0 ? as : Shape{0});
    resize_if(c.tshift[i], timed ? Shape{n, ch[i]} : Shape{0});
    resize_if(c.dshift[i], timed ? Shape{n, ch[i]} : Shape{0});
    if (i < pools) {
      h /= 2;
      w /= 2;
      resize_if(c.p[i], Shape{n, ch[i], h, w});
      resize_if(c.dp[i], Shape{n, ch[i], h, w});
    }
  }
}

}  // namespace classifier_detail

template <class T>
class ConvClassifier {
 public:
  using value_type = T;

  /// Activations of the last forward and backward's buffers; sized on the first call and when
  /// the input shape changes, reused (no allocation by the model) while it repeats.
  struct Cache {
    Shape in_shape;
    const void* owner = nullptr;
    bool has_forward = false;
    Tensor<T> x;                             // the input (the first conv's backward needs it)
    Tensor<T> emb, demb, tmp_e;              // [N, time_dim]
    std::vector<Tensor<T>> a, z, s, g1, g2;  // per block: [N, c_i, H_i, W_i]
    std::vector<Tensor<T>> p, dp;            // pooled outputs and their gradients
    std::vector<Tensor<T>> tshift, dshift;   // per block: [N, c_i] (time conditioning)
    std::vector<typename Conv2d<T>::Cache> conv;
    std::vector<typename GroupNorm<T>::Cache> norm;
    Tensor<T> gap, dgap;    // [N, fc_inputs()]
    Tensor<T> fpre, f, df;  // [N, feature_dim]
  };

  ConvClassifier(Parameters<T>& ps, const ConvClassifierConfig& config,
                 const std::string& prefix = "")
      : cfg_(config),
        prefix_(prefix),
        temb_(config.time_dim >= 2 ? config.time_dim : 2),
        pool_(2, prefix + "pool") {
    classifier_detail::validate(cfg_, name());
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

  /// PyTorch's defaults: Conv2d / Linear U(±1/sqrt(fan_in)), GroupNorm weight 1, bias 0.
  void init(Parameters<T>& ps, Generator& gen) const {
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      convs_[i].init(ps, gen);
      if (!norms_.empty()) norms_[i].init(ps, gen);
      if (!times_.empty()) times_[i].init(ps, gen);
    }
    fc_[0].init(ps, gen);
    head_[0].init(ps, gen);
  }

  // x: [N, in_channels, H, W] (H, W >= min_size()), t: [N] when time_dim > 0, else empty / {},
  // logits: [N, num_classes]. Fills `cache` (features(cache) gives f) for backward.
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> t, View<T> logits,
               Cache& c) const {
    check_forward(x, t, logits);
    prepare(c, x.shape());
    const index_t L = blocks();
    if (time_conditioned()) temb_.forward(t, c.emb.view());
    copy(c.x.view(), x);
    View<const T> h = c.x.view();
    for (index_t i = 0; i < L; ++i) {
      const auto k = static_cast<std::size_t>(i);
      const index_t len = c.a[k].dim(2) * c.a[k].dim(3);
      convs_[k].forward(ps, h, c.a[k].view(), c.conv[k]);
      if (!norms_.empty())
        norms_[k].forward(ps, c.a[k].view(), c.z[k].view(), c.norm[k]);
      else
        copy(c.z[k].view(), View<const T>(c.a[k]));
      if (time_conditioned()) {
        times_[k].forward(ps, c.emb.view(), c.tshift[k].view());
        detail::add_broadcast<T>(c.z[k].view(), c.tshift[k].view(), len);
      }
      silu_forward<T>(c.z[k].view(), c.s[k].view());
      if (i + 1 < L || flattens()) {
        pool_.forward(c.s[k].view(), c.p[k].view());
        h = c.p[k].view();
      }
    }
    const auto last = static_cast<std::size_t>(L - 1);
    if (flattens())
      copy(c.gap.view(), View<const T>(c.p[last]));
    else
      spatial_mean(c.s[last].view(), c.gap.view());
    fc_[0].forward(ps, c.gap.view(), c.fpre.view());
    silu_forward<T>(c.fpre.view(), c.f.view());
    head_[0].forward(ps, c.f.view(), logits);
    c.has_forward = true;
  }

  /// The penultimate features f: [N, feature_dim] of the last forward with this cache.
  View<const T> features(const Cache& c) const {
    require<config_error>(c.has_forward && c.owner == this, name(),
                          ": features() needs the cache of a forward() call first");
    return c.f.view();
  }

  // dlogits: [N, num_classes] of the last forward; dx: like x, or empty / {} (skipped). Parameter
  // gradients accumulate (+=); dx is overwritten. There is no gradient w.r.t. t.
  void backward(Parameters<T>& ps, View<const T> dlogits, View<T> dx, Cache& c) const {
    require<config_error>(c.has_forward && c.owner == this, name(),
                          ": backward() needs the cache of a forward() call first");
    const index_t n = c.in_shape[0], L = blocks();
    check_shape("dlogits", dlogits, Shape{n, cfg_.num_classes});
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    head_[0].backward(ps, c.f.view(), dlogits, c.df.view());
    silu_backward<T>(c.fpre.view(), c.df.view(), c.df.view());
    fc_[0].backward(ps, c.gap.view(), c.df.view(), c.dgap.view());
    const auto last = static_cast<std::size_t>(L - 1);
    if (flattens()) {  // g1 = ds of the last block
      copy(c.dp[last].view(), View<const T>(c.dgap));
      pool_.backward(c.s[last].view(), c.dp[last].view(), c.g1[last].view());
    } else {
      spatial_mean_backward(c.dgap.view(), c.g1[last].view());
    }
    if (time_conditioned()) fill(c.demb.view(), T(0));
    for (index_t i = L - 1; i >= 0; --i) {
      const auto k = static_cast<std::size_t>(i);
      const index_t len = c.a[k].dim(2) * c.a[k].dim(3);
      View<T> g1 = c.g1[k].view();
      silu_backward<T>(c.z[k].view(), g1, g1);  // dz, in place
      if (time_conditioned()) {
        detail::sum_spatial<T>(g1, c.dshift[k].view(), len);
        times_[k].backward(ps, c.emb.view(), c.dshift[k].view(), c.tmp_e.view());
      }
      View<const T> da = g1;
      if (!norms_.empty()) {
        norms_[k].backward(ps, c.a[k].view(), g1, c.g2[k].view(), c.norm[k]);
        da = c.g2[k].view();
      }
      if (i == 0) {
        convs_[k].backward(ps, c.x.view(), da, absent(dx) ? View<T>() : dx, c.conv[k]);
      } else {
        const auto j = k - 1;
        convs_[k].backward(ps, c.p[j].view(), da, c.dp[j].view(), c.conv[k]);
        pool_.backward(c.s[j].view(), c.dp[j].view(), c.g1[j].view());
      }
    }
  }

 private:
  std::string name() const {
    return prefix_.empty() ? std::string("ConvClassifier") : prefix_ + " (ConvClassifier)";
  }

  template <class U>
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T> x, View<const T> t, View<T> logits) const {
    classifier_detail::check_forward(cfg_, name(), x.shape(), !absent(t), t.shape(),
                                     logits.shape());
  }

  void prepare(Cache& c, const Shape& s) const {
    c.has_forward = false;
    if (c.owner == this && c.in_shape == s) return;
    classifier_detail::size_block_buffers(c, cfg_, s);
    const index_t n = s[0];
    const index_t td = time_conditioned() ? cfg_.time_dim : 0;
    for (Tensor<T>* e : {&c.emb, &c.demb, &c.tmp_e}) e->resize(Shape{td > 0 ? n : 0, td});
    c.gap.resize(Shape{n, fc_inputs()});
    c.dgap.resize(Shape{n, fc_inputs()});
    for (Tensor<T>* e : {&c.fpre, &c.f, &c.df}) e->resize(Shape{n, cfg_.feature_dim});
    c.x.resize(s);
    c.in_shape = s;
    c.owner = this;
  }

  // g[n, c] = mean_{h, w} s[n, c, h, w].
  static void spatial_mean(View<const T> s, View<T> g) {
    const index_t len = s.dim(2) * s.dim(3);
    detail::sum_spatial<T>(s, g, len);
    const T inv = T(1) / static_cast<T>(len);
    transform(
        g, [inv](T v) { return v * inv; }, g);
  }

  // ds[n, c, h, w] = dg[n, c] / (H W).
  static void spatial_mean_backward(View<const T> dg, View<T> ds) {
    const index_t len = ds.dim(2) * ds.dim(3);
    const T inv = T(1) / static_cast<T>(len);
    const T* pg = dg.data();
    T* pd = ds.data();
    Cpu::parallel_for(
        dg.numel(),
        [=](index_t q) {
          const T v = pg[q] * inv;
          for (index_t l = 0; l < len; ++l) pd[q * len + l] = v;
        },
        len);
  }

  template <class U>
  static bool absent(View<U> v) {
    return v.data() == nullptr || v.empty();
  }

  ConvClassifierConfig cfg_;
  std::string prefix_;
  SinusoidalTimeEmbedding<T> temb_;
  AvgPool2d<T> pool_;
  std::vector<Conv2d<T>> convs_;
  std::vector<GroupNorm<T>> norms_;  // one per block when groups > 0
  std::vector<Linear<T>> times_;     // one per block when time_dim > 0
  std::vector<Linear<T>> fc_, head_;
};

/// ∇_x log p(y_n | x_n) for every sample (the classifier-guidance term, with t for a noisy
/// classifier): one forward, dlogits = onehot(y) - softmax (log_prob_seed), one backward with dx.
/// Writes the per-sample log-probabilities log p(y_n | x_n) to `log_prob` when it is not empty.
/// The backward also accumulates parameter gradients into `ps` (call ps.zero_grad() before
/// training on it again). x, grad: [N, C, H, W], t: [N] or {}, y: [N], log_prob: [N] or {}.
template <class T>
void classifier_log_prob_grad(const ConvClassifier<T>& net, Parameters<T>& ps,
                              std::type_identity_t<View<const T>> x,
                              std::type_identity_t<View<const T>> t, View<const label_t> y,
                              std::type_identity_t<View<T>> grad,
                              std::type_identity_t<View<T>> log_prob,
                              typename ConvClassifier<T>::Cache& cache, Tensor<T>& logits_scratch,
                              Tensor<T>& dlogits_scratch) {
  const Shape ls{x.rank() >= 1 ? x.dim(0) : 0, net.num_classes()};
  if (!(logits_scratch.shape() == ls)) logits_scratch.resize(ls);
  if (!(dlogits_scratch.shape() == ls)) dlogits_scratch.resize(ls);
  net.forward(ps, x, t, logits_scratch.view(), cache);
  log_prob_seed<T>(logits_scratch.view(), y, dlogits_scratch.view());
  if (!(log_prob.data() == nullptr || log_prob.empty())) {
    if (!(log_prob.shape() == Shape{ls[0]}))
      fail<shape_error>("classifier_log_prob_grad: log_prob: expected shape ", Shape{ls[0]},
                        ", got ", log_prob.shape());
    // log p(y_n | x_n) from a stable log-softmax of the logits (the seed no longer needs them).
    log_softmax<T>(logits_scratch.view(), logits_scratch.view());
    for (index_t i = 0; i < ls[0]; ++i) log_prob[i] = logits_scratch(i, y[i]);
  }
  net.backward(ps, dlogits_scratch.view(), grad, cache);
}

}  // namespace flowdiff::nn
