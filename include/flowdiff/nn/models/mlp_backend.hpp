// flowdiff/nn/models/mlp_backend.hpp — nn::MLP's vector field u_theta(x, t[, y]) on any backend B
// (nn/models/mlp.hpp has the maths):
//   h_0 = [x, e(t) (+ W_y[y])],  a_i = h_i W_i^T + b_i,  h_{i+1} = silu(a_i),  u = h_depth W^T + b
// and its backward (dW_i += da_i^T h_i, db_i += sum_rows da_i, da_i = silu'(a_i) (da_{i+1} W_{i+1}),
// dx and the label rows from dh_0), with the tensors of x, t, y, u and the cache on B. The
// products go through BackendOps<B>::gemm (the CPU gemm; cuBLAS), everything else through the
// named functors of nn/layers/kernels.hpp run by B::parallel_for, so this header has no CUDA in
// it: include backend/cuda/dispatch.cuh (nvcc) for B = Cuda. The parameters are registered under
// nn::MLP's names, shapes and order ("net.0.weight", ..., "label_emb.weight"), so the flat
// buffers have the same layout: nn::upload_parameters / download_parameters (nn/transfer.hpp)
// move a CPU model or checkpoint onto B and back. With B = Cpu the same calls produce nn::MLP's
// bits (the same gemm calls, the same element operations in the same order; tested).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/models/mlp.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

template <class T, Backend B>
class BackendMLP {
 public:
  using value_type = T;
  using backend = B;

  /// The forward activations backward needs, backward's scratch and the backend's gemm context
  /// (a cuBLAS handle on the GPU, created on first use), all on B. Sized on the first call and
  /// whenever N changes; reused while N repeats.
  struct Cache {
    index_t n = 0;
    bool has_forward = false;
    std::optional<typename BackendOps<B>::Context> ctx;
    Tensor<label_t, B> labels;        // [N]: the labels forward used (conditional models)
    Tensor<T, B> h0;                  // [N, d + time_dim]
    std::vector<Tensor<T, B>> pre;    // depth × [N, width]: a_i
    std::vector<Tensor<T, B>> act;    // depth × [N, width]: silu(a_i)
    Tensor<T, B> g0, g1;              // [N, width]: backward ping-pong buffers
    Tensor<T, B> dh0;                 // [N, d + time_dim]

    typename BackendOps<B>::Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };

  /// Registers the parameters in ps (not yet allocated) exactly as nn::MLP does.
  BackendMLP(Parameters<T, B>& ps, const MLPConfig& config, const std::string& prefix = "")
      : cfg_(config), prefix_(prefix) {
    require<config_error>(config.dim >= 1 && config.width >= 1 && config.depth >= 1 &&
                              config.time_dim >= 2 && config.num_classes >= 0,
                          name(),
                          ": need dim >= 1, width >= 1, depth >= 1, time_dim >= 2, num_classes >= "
                          "0; got dim = ",
                          config.dim, ", width = ", config.width, ", depth = ", config.depth,
                          ", time_dim = ", config.time_dim, ", num_classes = ", config.num_classes);
    for (index_t i = 0; i <= config.depth; ++i) {
      const index_t in = i == 0 ? config.dim + config.time_dim : config.width;
      const index_t out = i == config.depth ? config.dim : config.width;
      const std::string p = prefix + "net." + std::to_string(2 * i);
      layers_.push_back({ps.add(p + ".weight", Shape{out, in}), ps.add(p + ".bias", Shape{out}),
                         in, out});
    }
    if (config.num_classes > 0)
      label_w_ = ps.add(prefix + "label_emb.weight",
                        Shape{config.num_classes + 1, config.time_dim});
    // SinusoidalTimeEmbedding's frequencies (scale 1000, max_period 10000), in double on the host
    // by the same expression, then on B.
    freqs_ = detail::time_frequencies<B>(config.time_dim, max_period);
  }

  const MLPConfig& config() const { return cfg_; }
  index_t dim() const { return cfg_.dim; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }

  /// nn::MLP::init's draws, in its order, on B: Linear U(±1/sqrt(in)), Embedding N(0, 1).
  /// (Uniforms on [lo, hi) may differ from the CPU's in the last bit on a GPU; for the CPU's exact
  /// values initialise an nn::MLP and upload_parameters.)
  void init(Parameters<T, B>& ps, Generator& gen) const {
    for (const auto& l : layers_) {
      const T bound = T(1) / std::sqrt(static_cast<T>(l.in));
      fill_uniform(ps.param(l.w), gen, -bound, bound);
      fill_uniform(ps.param(l.b), gen, -bound, bound);
    }
    if (conditional()) fill_normal(ps.param(label_w_), gen);
  }

  // x: [N, d], t: [N], y: [N] or empty / {} (a conditional model then uses the null label), out:
  // [N, d], all on B. Fills `cache` for backward. Labels are checked to lie in [0, num_classes]
  // (one reduction).
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> t,
               View<const label_t, B> y, View<T, B> out, Cache& cache) const {
    const index_t n = check_forward(x, t, y, out);
    prepare(cache, n);
    const index_t d = cfg_.dim, td = cfg_.time_dim;
    const T* label_w = nullptr;
    if (conditional()) {
      if (absent(y))
        fill(cache.labels.view(), null_label());
      else
        copy(cache.labels.view(), y);
      label_w = ps.param(label_w_).data();
    }
    B::parallel_for(n * (d + td),
                    kernels::MlpInput<T>{cache.h0.data(), x.data(), t.data(), freqs_.data(),
                                         label_w, cache.labels.data(), d, td, time_scale});
    auto& ctx = cache.context();
    View<const T, B> h = cache.h0.view();
    for (std::size_t i = 0; i < cache.pre.size(); ++i) {
      const Layer& l = layers_[i];
      BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), h, ps.param(l.w), T(0),
                                      cache.pre[i].view());
      B::parallel_for(n * l.out, kernels::BiasSilu<T>{cache.pre[i].data(), cache.act[i].data(),
                                                      ps.param(l.b).data(), l.out});
      h = cache.act[i].view();
    }
    const Layer& last = layers_.back();
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), h, ps.param(last.w), T(0),
                                    out);
    B::parallel_for(n * last.out, kernels::BiasAdd<T>{out.data(), ps.param(last.b).data(),
                                                      last.out});
    cache.has_forward = true;
  }

  // dout: [N, d] (N of the last forward), dx: [N, d] or empty / {} (skipped), on B. Parameter
  // gradients accumulate (+=); dx is overwritten.
  void backward(Parameters<T, B>& ps, View<const T, B> dout, View<T, B> dx, Cache& cache) const {
    require<config_error>(cache.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    const index_t n = cache.n, d = cfg_.dim, td = cfg_.time_dim;
    check_shape("dout", dout, Shape{n, d});
    if (!absent(dx)) check_shape("dx", dx, Shape{n, d});
    auto& ctx = cache.context();
    const index_t depth = cfg_.depth;
    View<const T, B> g = dout;
    Tensor<T, B>* bufs[2] = {&cache.g0, &cache.g1};
    for (index_t i = depth; i >= 0; --i) {
      const Layer& l = layers_[static_cast<std::size_t>(i)];
      const View<const T, B> input =
          i == 0 ? View<const T, B>(cache.h0.view())
                 : View<const T, B>(cache.act[static_cast<std::size_t>(i - 1)].view());
      // Linear backward: dW += dy^T x, db += sum_rows dy, dx = dy W (nn::Linear's calls).
      BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), g, input, T(1),
                                      ps.grad(l.w));
      kernels::accumulate_bias_grad<T, B>(ps.grad(l.b).data(), g.data(), n, l.out);
      if (i == 0) break;
      View<T, B> dh = bufs[i % 2]->view();
      BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), g,
                                      View<const T, B>(ps.param(l.w)), T(0), dh);
      B::parallel_for(n * l.in, kernels::SiluBackwardInPlace<T>{
                                    cache.pre[static_cast<std::size_t>(i - 1)].data(), dh.data()});
      g = dh;
    }
    // The first layer's input gradient is needed only for dx or the label embedding.
    if (absent(dx) && !conditional()) return;
    const Layer& first = layers_.front();
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), g,
                                    View<const T, B>(ps.param(first.w)), T(0), cache.dh0.view());
    if (!absent(dx))
      B::parallel_for(n * d, kernels::MlpInputGrad<T>{dx.data(), cache.dh0.data(), d, td});
    if (conditional())
      B::parallel_for((cfg_.num_classes + 1) * td,
                      kernels::LabelEmbeddingGrad<T>{ps.grad(label_w_).data(), cache.dh0.data(),
                                                     cache.labels.data(), n, d, td});
  }

 private:
  struct Layer {
    index_t w, b;  // parameter ids
    index_t in, out;
  };
  static constexpr double time_scale = 1000.0;  // SinusoidalTimeEmbedding's defaults, as nn::MLP
  static constexpr double max_period = 10000.0;

  std::string name() const {
    return prefix_.empty() ? std::string("BackendMLP") : prefix_ + " (BackendMLP)";
  }

  template <class U>
  void check_shape(const char* arg, View<U, B> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  index_t check_forward(View<const T, B> x, View<const T, B> t, View<const label_t, B> y,
                        View<T, B> out) const {
    if (x.rank() != 2 || x.dim(1) != cfg_.dim || x.dim(0) < 1)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.dim, "] with N >= 1, got ",
                        x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", out, Shape{n, cfg_.dim});
    if (!absent(y)) detail::check_backend_labels<B>(name(), y, n, cfg_.num_classes);
    return n;
  }

  void prepare(Cache& c, index_t n) const {
    const index_t w = cfg_.width, in0 = cfg_.dim + cfg_.time_dim;
    const auto depth = static_cast<std::size_t>(cfg_.depth);
    c.has_forward = false;
    if (c.n == n && c.pre.size() == depth) return;
    c.labels.resize(Shape{n});
    c.h0.resize(Shape{n, in0});
    c.pre.resize(depth);
    c.act.resize(depth);
    for (std::size_t i = 0; i < depth; ++i) {
      c.pre[i].resize(Shape{n, w});
      c.act[i].resize(Shape{n, w});
    }
    c.g0.resize(Shape{n, w});
    c.g1.resize(Shape{n, w});
    c.dh0.resize(Shape{n, in0});
    c.n = n;
  }

  template <class U>
  static bool absent(View<U, B> v) {
    return v.data() == nullptr || v.empty();
  }

  MLPConfig cfg_;
  std::string prefix_;
  std::vector<Layer> layers_;  // depth + 1 Linear layers
  index_t label_w_ = -1;
  Tensor<double, B> freqs_;  // [time_dim / 2]
};

}  // namespace flowdiff::nn
