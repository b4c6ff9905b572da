// flowdiff/nn/models/unet_backend.hpp — nn::UNet's vector field u_theta(x, t[, y]) on any backend
// B (nn/models/unet.hpp has the maths):
//   h = SiLU(GN(Conv3x3(x))); encoders: h = ResBlock^R(h), h = Conv3x3/2(h) = s_i;
//   midcoder: h = ResBlock^R(h) [, h = h + Attn(GN(h))];
//   decoders: h = Conv3x3(Upsample2x(h + s_i)), h = ResBlock^R(h);
//   u = Conv3x3(h),   ResBlock(x) = x + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + A_t(e_t) + A_y(e_y))))
// with A(e) = Linear(SiLU(Linear(e))) broadcast over H, W, and its backward (every parameter
// gradient accumulated, dx overwritten). The layers are the backend-generic ones of
// nn/layers/spatial_kernels.hpp (BackendConv2d, BackendGroupNorm with the SiLU fused,
// BackendUpsampleNearest2d, add_per_channel / sum_per_channel), the midcoder's optional
// self-attention of nn/layers/token_kernels.hpp (BackendImageSelfAttention) and the dense functors
// of nn/layers/kernels.hpp (Linear through BackendOps<B>::gemm + BiasAdd / BiasGrad, the sinusoidal
// time embedding of MlpInput, the label-embedding gradient), so this header has no CUDA in it.
// Parameters are registered under nn::UNet's names, shapes and order, so the flat buffers have
// the same layout (nn::upload_parameters moves a CPU model or checkpoint onto B). Every
// activation is kept for backward (nn::UNet's `recompute` option, which only trades memory, is
// not offered).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/layers/token_kernels.hpp"
#include "flowdiff/nn/models/unet.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

/// e[n, :] = W[y_n, :] (one thread per element of e).
template <class T>
struct EmbeddingRows {
  T* e;              // [N, d]
  const T* w;        // [K + 1, d]
  const label_t* y;  // [N]
  index_t d;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    e[q] = w[static_cast<index_t>(y[q / d]) * d + q % d];
  }
};

}  // namespace kernels

namespace unet_backend_detail {

template <class T, class B>
void resize_if(Tensor<T, B>& t, const Shape& s) {
  if (!(t.shape() == s)) t.resize(s);
}

/// nn::Linear on B: y = x W^T + b, dW += dy^T x, db += sum_rows dy, dx = dy W.
template <class T, Backend B>
struct Linear {
  index_t w, b, in, out;
  Linear(Parameters<T, B>& ps, const std::string& prefix, index_t in_f, index_t out_f)
      : w(ps.add(prefix + ".weight", Shape{out_f, in_f})),
        b(ps.add(prefix + ".bias", Shape{out_f})),
        in(in_f),
        out(out_f) {}
  // x: [N, in] -> y: [N, out]
  void forward(typename BackendOps<B>::Context& ctx, const Parameters<T, B>& ps, View<const T, B> x,
               View<T, B> y) const {
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::yes, T(1), x, ps.param(w), T(0), y);
    B::parallel_for(y.numel(), kernels::BiasAdd<T>{y.data(), ps.param(b).data(), out});
  }
  // x: [N, in], dy: [N, out], dx: [N, in] (overwritten)
  void backward(typename BackendOps<B>::Context& ctx, Parameters<T, B>& ps, View<const T, B> x,
                View<const T, B> dy, View<T, B> dx) const {
    BackendOps<B>::template gemm<T>(ctx, Trans::yes, Trans::no, T(1), dy, x, T(1), ps.grad(w));
    kernels::accumulate_bias_grad<T, B>(ps.grad(b).data(), dy.data(), x.dim(0), out);
    BackendOps<B>::template gemm<T>(ctx, Trans::no, Trans::no, T(1), dy,
                                    View<const T, B>(ps.param(w)), T(0), dx);
  }
};

/// The conditioning adapter Linear(d, d) -> SiLU -> Linear(d, C) (prefix.0, prefix.2).
template <class T, Backend B>
struct Adapter {
  Linear<T, B> l0, l2;
  struct Cache {
    Tensor<T, B> pre, act, out, dact, dout;  // [N, d], [N, d], [N, C], [N, d], [N, C]
  };
  Adapter(Parameters<T, B>& ps, const std::string& prefix, index_t d, index_t c)
      : l0(ps, prefix + ".0", d, d), l2(ps, prefix + ".2", d, c) {}
  // e: [N, d] -> c.out: [N, C]
  void forward(typename BackendOps<B>::Context& ctx, const Parameters<T, B>& ps, View<const T, B> e,
               Cache& c) const {
    const index_t n = e.dim(0);
    resize_if(c.pre, Shape{n, l0.out});
    resize_if(c.act, Shape{n, l0.out});
    resize_if(c.dact, Shape{n, l0.out});
    resize_if(c.out, Shape{n, l2.out});
    resize_if(c.dout, Shape{n, l2.out});
    l0.forward(ctx, ps, e, c.pre.view());
    B::parallel_for(c.pre.numel(), kernels::SiluOut<T>{c.act.data(), c.pre.data()});
    l2.forward(ctx, ps, c.act.view(), c.out.view());
  }
  // c.dout: the gradient of c.out (filled by the caller); de: [N, d] += dL/de, tmp: [N, d].
  void backward(typename BackendOps<B>::Context& ctx, Parameters<T, B>& ps, View<const T, B> e,
                View<T, B> de, View<T, B> tmp, Cache& c) const {
    l2.backward(ctx, ps, c.act.view(), c.dout.view(), c.dact.view());
    B::parallel_for(c.dact.numel(), kernels::SiluBackwardInPlace<T>{c.pre.data(), c.dact.data()});
    l0.backward(ctx, ps, e, c.dact.view(), tmp);
    add_in_place<T, B>(de, View<const T, B>(tmp));
  }
};

/// x + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + A_t(e_t) [+ A_y(e_y)]))) at C channels.
template <class T, Backend B>
struct ResBlock {
  BackendGroupNorm<T, B> gn1;
  BackendConv2d<T, B> conv1;
  BackendGroupNorm<T, B> gn2;
  BackendConv2d<T, B> conv2;
  Adapter<T, B> t_adapter;
  std::vector<Adapter<T, B>> y_adapter;  // one when conditional

  struct Cache {
    typename BackendGroupNorm<T, B>::Cache n1, n2;
    typename BackendConv2d<T, B>::Cache c1, c2;
    typename Adapter<T, B>::Cache at, ay;
    // [N, C, H, W]: SiLU(GN1), conv1 + adapters, SiLU(GN2); the norms' outputs are not kept
    // (backward_silu recomputes them from the norms' inputs and statistics)
    Tensor<T, B> s1, h1, s2;
  };

  ResBlock(Parameters<T, B>& ps, const std::string& p, index_t c, index_t groups, index_t td,
           index_t yd, bool conditional)
      : gn1(ps, p + ".block1.0", groups, c),
        conv1(ps, p + ".block1.2", c, c, 3, 1, 1),
        gn2(ps, p + ".block2.0", groups, c),
        conv2(ps, p + ".block2.2", c, c, 3, 1, 1),
        t_adapter(ps, p + ".time_adapter", td, c) {
    if (conditional) y_adapter.emplace_back(ps, p + ".y_adapter", yd, c);
  }

  // x, out: [N, C, H, W]; et: [N, td]; ey: [N, yd] (unused when unconditional)
  void forward(typename BackendOps<B>::Context& ctx, const Parameters<T, B>& ps, View<const T, B> x,
               View<const T, B> et, View<const T, B> ey, View<T, B> out, Cache& c) const {
    for (Tensor<T, B>* t : {&c.s1, &c.h1, &c.s2}) resize_if(*t, x.shape());
    gn1.forward_silu(ps, x, View<T, B>{}, c.s1.view(), c.n1);
    conv1.forward(ctx, ps, c.s1.view(), c.h1.view(), c.c1);
    t_adapter.forward(ctx, ps, et, c.at);
    add_per_channel<T, B>(c.h1.view(), c.at.out.view());
    if (!y_adapter.empty()) {
      y_adapter[0].forward(ctx, ps, ey, c.ay);
      add_per_channel<T, B>(c.h1.view(), c.ay.out.view());
    }
    gn2.forward_silu(ps, c.h1.view(), View<T, B>{}, c.s2.view(), c.n2);
    conv2.forward(ctx, ps, c.s2.view(), out, c.c2);
    add_in_place<T, B>(out, x);
  }

  // dout: [N, C, H, W]; dx (overwritten, not aliasing dout); det, dey accumulated (+=) with
  // scratch tmp_t / tmp_y; g1, g2: [N, C, H, W] scratch.
  void backward(typename BackendOps<B>::Context& ctx, Parameters<T, B>& ps, View<const T, B> x,
                View<const T, B> et, View<const T, B> ey, View<const T, B> dout, View<T, B> dx,
                View<T, B> det, View<T, B> dey, View<T, B> tmp_t, View<T, B> tmp_y, View<T, B> g1,
                View<T, B> g2, Cache& c) const {
    conv2.backward(ctx, ps, c.s2.view(), dout, g1, c.c2);
    gn2.backward_silu(ps, c.h1.view(), View<const T, B>(g1), g2, c.n2);  // dh1
    sum_per_channel<T, B>(View<const T, B>(g2), c.at.dout.view());
    t_adapter.backward(ctx, ps, et, det, tmp_t, c.at);
    if (!y_adapter.empty()) {
      sum_per_channel<T, B>(View<const T, B>(g2), c.ay.dout.view());
      y_adapter[0].backward(ctx, ps, ey, dey, tmp_y, c.ay);
    }
    conv1.backward(ctx, ps, c.s1.view(), View<const T, B>(g2), g1, c.c1);
    gn1.backward_silu(ps, x, View<const T, B>(g1), dx, c.n1);
    add_in_place<T, B>(dx, dout);  // the identity path
  }
};

}  // namespace unet_backend_detail

template <class T, Backend B>
class BackendUNet {
  using Block = unet_backend_detail::ResBlock<T, B>;
  using Context = typename BackendOps<B>::Context;

 public:
  using value_type = T;
  using backend = B;

  /// Every activation of the forward pass, the gradient buffers and the gemm context, on B;
  /// sized on the first call and whenever the input shape changes.
  struct Cache {
    Shape in_shape;
    bool has_forward = false;
    std::optional<Context> ctx;
    Tensor<label_t, B> labels;                    // [N]
    Tensor<T, B> et, ey, det, dey, tmp_t, tmp_y;  // [N, td] / [N, yd]
    Tensor<T, B> x, c0, a0, dc0;                  // the input; init conv, SiLU(GN), d(conv)
    typename BackendConv2d<T, B>::Cache conv0;
    typename BackendGroupNorm<T, B>::Cache norm0;
    std::vector<typename Block::Cache> rb;
    std::vector<Tensor<T, B>> rb_out, rb_grad;  // per block: output, gradient of its input
    std::vector<View<const T, B>> rb_in;        // per block: its input (a view into this cache)
    std::vector<Tensor<T, B>> g1, g2;           // per level: block backward scratch
    std::vector<Tensor<T, B>> down, ddown, ddown_in;  // per encoder
    std::vector<typename BackendConv2d<T, B>::Cache> down_c;
    std::vector<Tensor<T, B>> dec_in, up, upc, ddec_in, dup;  // per decoder
    std::vector<typename BackendConv2d<T, B>::Cache> up_c;
    Tensor<T, B> dlast;  // [N, c_0, H, W]: the gradient of the final conv's input
    // Midcoder attention (config().attention): GroupNorm out, attention out, h + attention;
    // gradients of the norm's output and of the attention's input.
    Tensor<T, B> an, ao, mid, dan, dao;
    typename BackendGroupNorm<T, B>::Cache attn_n;
    typename BackendImageSelfAttention<T, B>::Cache attn_c;
    typename BackendConv2d<T, B>::Cache final_c;

    Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };

  /// Registers the parameters in ps (not yet allocated) exactly as nn::UNet does.
  BackendUNet(Parameters<T, B>& ps, const UNetConfig& config, const std::string& prefix = "")
      : cfg_(config), prefix_(prefix), up_(2, prefix + "upsample") {
    validate();
    const auto& ch = cfg_.channels;
    const index_t levels = this->levels(), g = cfg_.groups;
    const index_t td = cfg_.t_embed_dim, yd = cfg_.y_embed_dim, R = cfg_.num_residual_layers;
    const bool cond = conditional();
    init_conv_.emplace_back(ps, prefix + "init_conv.0", cfg_.in_channels, ch[0], 3, 1, 1);
    init_norm_.emplace_back(ps, prefix + "init_conv.1", g, ch[0]);
    if (cond) y_emb_ = ps.add(prefix + "y_embedder.weight", Shape{cfg_.num_classes + 1, yd});
    blocks_.reserve(static_cast<std::size_t>((2 * levels - 1) * R));
    for (index_t i = 0; i + 1 < levels; ++i) {
      const std::string p = prefix + "encoders." + std::to_string(i);
      for (index_t r = 0; r < R; ++r)
        blocks_.emplace_back(ps, p + ".res_blocks." + std::to_string(r), ch[i], g, td, yd, cond);
      down_.emplace_back(ps, p + ".downsample", ch[i], ch[i + 1], 3, 2, 1);
    }
    for (index_t r = 0; r < R; ++r)
      blocks_.emplace_back(ps, prefix + "midcoder.res_blocks." + std::to_string(r), ch[levels - 1],
                           g, td, yd, cond);
    if (cfg_.attention) {
      attn_norm_.emplace_back(ps, prefix + "midcoder.attn_norm", g, ch[levels - 1]);
      attn_.emplace_back(ps, prefix + "midcoder.attn", ch[levels - 1], cfg_.attention_heads);
    }
    for (index_t j = 0; j + 1 < levels; ++j) {
      const index_t i = levels - 2 - j;
      const std::string p = prefix + "decoders." + std::to_string(j);
      up_conv_.emplace_back(ps, p + ".upsample.1", ch[i + 1], ch[i], 3, 1, 1);
      for (index_t r = 0; r < R; ++r)
        blocks_.emplace_back(ps, p + ".res_blocks." + std::to_string(r), ch[i], g, td, yd, cond);
    }
    final_conv_.emplace_back(ps, prefix + "final_conv", ch[0], cfg_.in_channels, 3, 1, 1);
    for (index_t i = 0; i + 1 < levels; ++i) level_of_.insert(level_of_.end(), R, i);
    level_of_.insert(level_of_.end(), R, levels - 1);
    for (index_t j = 0; j + 1 < levels; ++j) level_of_.insert(level_of_.end(), R, levels - 2 - j);
    // SinusoidalTimeEmbedding's frequencies (scale 1000, max_period 10000), on B.
    freqs_ = detail::time_frequencies<B>(td, max_period);
  }

  const UNetConfig& config() const { return cfg_; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }
  index_t levels() const { return static_cast<index_t>(cfg_.channels.size()); }

  // x: [N, in_channels, H, W] (H, W multiples of 2^(levels-1)), t: [N], y: [N] or empty / {}
  // (a conditional model then uses the null label), out: like x; all on B. Labels are checked to
  // lie in [0, num_classes] by one B::reduce_sum (the embedding gather cannot throw, and on a
  // device an out-of-range label would read outside the table). Fills `c` for backward.
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> t,
               View<const label_t, B> y, View<T, B> out, Cache& c) const {
    check_forward(x, t, y, out);
    prepare(c, x.shape());
    Context& ctx = c.context();
    const index_t n = x.dim(0), levels = this->levels(), R = cfg_.num_residual_layers;
    const index_t td = cfg_.t_embed_dim, yd = cfg_.y_embed_dim;
    B::parallel_for(n * td, kernels::MlpInput<T>{c.et.data(), nullptr, t.data(), freqs_.data(),
                                                 nullptr, nullptr, 0, td, time_scale});
    if (conditional()) {
      if (absent(y))
        fill(c.labels.view(), null_label());
      else
        copy(c.labels.view(), y);
      B::parallel_for(n * yd, kernels::EmbeddingRows<T>{c.ey.data(), ps.param(y_emb_).data(),
                                                        c.labels.data(), yd});
    }
    copy(c.x.view(), x);
    init_conv_[0].forward(ctx, ps, x, c.c0.view(), c.conv0);
    init_norm_[0].forward_silu(ps, c.c0.view(), View<T, B>{}, c.a0.view(), c.norm0);

    View<const T, B> h = c.a0.view();
    std::size_t b = 0;
    auto run_blocks = [&]() {
      for (index_t r = 0; r < R; ++r, ++b) {
        c.rb_in[b] = h;
        blocks_[b].forward(ctx, ps, h, c.et.view(), c.ey.view(), c.rb_out[b].view(), c.rb[b]);
        h = c.rb_out[b].view();
      }
    };
    for (index_t i = 0; i + 1 < levels; ++i) {
      const auto k = static_cast<std::size_t>(i);
      run_blocks();
      down_[k].forward(ctx, ps, h, c.down[k].view(), c.down_c[k]);
      h = c.down[k].view();
    }
    run_blocks();
    if (cfg_.attention) {
      attn_norm_[0].forward(ps, h, c.an.view(), c.attn_n);
      attn_[0].forward(ctx, ps, c.an.view(), c.ao.view(), c.attn_c);
      copy(c.mid.view(), h);
      add_in_place<T, B>(c.mid.view(), View<const T, B>(c.ao.view()));
      h = c.mid.view();
    }
    for (index_t j = 0; j + 1 < levels; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const auto skip = static_cast<std::size_t>(levels - 2 - j);
      copy(c.dec_in[k].view(), h);
      add_in_place<T, B>(c.dec_in[k].view(), View<const T, B>(c.down[skip].view()));
      up_.forward(c.dec_in[k].view(), c.up[k].view());
      up_conv_[k].forward(ctx, ps, c.up[k].view(), c.upc[k].view(), c.up_c[k]);
      h = c.upc[k].view();
      run_blocks();
    }
    final_conv_[0].forward(ctx, ps, h, out, c.final_c);
    c.has_forward = true;
  }

  // dout: like the last forward's x; dx: like x, or empty / {} (skipped), on B. Parameter
  // gradients accumulate (+=); dx is overwritten.
  void backward(Parameters<T, B>& ps, View<const T, B> dout, View<T, B> dx, Cache& c) const {
    require<config_error>(c.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    check_shape("dout", dout, c.in_shape);
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    Context& ctx = c.context();
    const index_t n = c.in_shape[0], levels = this->levels(), R = cfg_.num_residual_layers;
    fill(c.det.view(), T(0));
    fill(c.dey.view(), T(0));
    std::size_t b = blocks_.size();
    const auto back_blocks = [&](View<const T, B> g) -> View<const T, B> {
      for (index_t r = 0; r < R; ++r) {
        --b;
        const auto lv = static_cast<std::size_t>(level_of_[b]);
        blocks_[b].backward(ctx, ps, c.rb_in[b], c.et.view(), c.ey.view(), g, c.rb_grad[b].view(),
                            c.det.view(), c.dey.view(), c.tmp_t.view(), c.tmp_y.view(),
                            c.g1[lv].view(), c.g2[lv].view(), c.rb[b]);
        g = c.rb_grad[b].view();
      }
      return g;
    };
    // The final conv's input: the last decoder block's output (with one level, the midcoder's
    // output, after the attention when there is one).
    const View<const T, B> last =
        levels == 1 && cfg_.attention ? c.mid.view() : c.rb_out.back().view();
    final_conv_[0].backward(ctx, ps, last, dout, c.dlast.view(), c.final_c);
    View<const T, B> g = c.dlast.view();
    for (index_t j = levels - 2; j >= 0; --j) {
      const auto k = static_cast<std::size_t>(j);
      const auto skip = static_cast<std::size_t>(levels - 2 - j);
      g = back_blocks(g);
      up_conv_[k].backward(ctx, ps, c.up[k].view(), g, c.dup[k].view(), c.up_c[k]);
      up_.backward(c.dec_in[k].view(), c.dup[k].view(), c.ddec_in[k].view());
      copy(c.ddown[skip].view(), View<const T, B>(c.ddec_in[k].view()));  // the skip's share
      g = c.ddec_in[k].view();                                            // the main path's
    }
    if (cfg_.attention) {  // h = h_mid + Attn(GN(h_mid)): both paths reach h_mid
      attn_[0].backward(ctx, ps, c.an.view(), g, c.dao.view(), c.attn_c);
      attn_norm_[0].backward(ps, c.rb_out[b - 1].view(), c.dao.view(), c.dan.view(), c.attn_n);
      add_in_place<T, B>(c.dan.view(), g);
      g = c.dan.view();
    }
    g = back_blocks(g);
    for (index_t i = levels - 2; i >= 0; --i) {
      const auto k = static_cast<std::size_t>(i);
      add_in_place<T, B>(c.ddown[k].view(), g);  // s_i feeds the next stage and the skip
      down_[k].backward(ctx, ps, c.rb_out[b - 1].view(), c.ddown[k].view(), c.ddown_in[k].view(),
                        c.down_c[k]);
      g = back_blocks(c.ddown_in[k].view());
    }
    init_norm_[0].backward_silu(ps, c.c0.view(), g, c.dc0.view(), c.norm0);  // y recomputed
    init_conv_[0].backward(ctx, ps, c.x.view(), c.dc0.view(), dx, c.conv0);
    if (conditional())
      B::parallel_for((cfg_.num_classes + 1) * cfg_.y_embed_dim,
                      kernels::LabelEmbeddingGrad<T>{ps.grad(y_emb_).data(), c.dey.data(),
                                                     c.labels.data(), n, 0, cfg_.y_embed_dim});
  }

 private:
  static constexpr double time_scale = 1000.0;  // SinusoidalTimeEmbedding's defaults, as nn::UNet
  static constexpr double max_period = 10000.0;

  std::string name() const {
    return prefix_.empty() ? std::string("BackendUNet") : prefix_ + " (BackendUNet)";
  }

  void validate() const {
    const auto& ch = cfg_.channels;
    require<config_error>(cfg_.in_channels >= 1 && !ch.empty() && cfg_.num_residual_layers >= 1 &&
                              cfg_.t_embed_dim >= 2 && cfg_.y_embed_dim >= 1 &&
                              cfg_.num_classes >= 0 && cfg_.groups >= 1,
                          name(),
                          ": need in_channels >= 1, at least one level, num_residual_layers >= 1, "
                          "t_embed_dim >= 2, y_embed_dim >= 1, num_classes >= 0, groups >= 1");
    for (index_t c : ch)
      require<config_error>(c >= 1 && c % cfg_.groups == 0, name(), ": channel count ", c,
                            " is not a positive multiple of groups = ", cfg_.groups);
    if (cfg_.attention)
      require<config_error>(cfg_.attention_heads >= 1 && ch.back() % cfg_.attention_heads == 0,
                            name(), ": attention_heads = ", cfg_.attention_heads,
                            " must divide the lowest level's channels ", ch.back());
  }

  template <class U>
  void check_shape(const char* arg, View<U, B> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T, B> x, View<const T, B> t, View<const label_t, B> y,
                     View<T, B> out) const {
    const index_t m = index_t{1} << (levels() - 1);
    if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) != cfg_.in_channels || x.dim(2) < m ||
        x.dim(3) < m || x.dim(2) % m != 0 || x.dim(3) % m != 0)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.in_channels,
                        ", H, W] with N >= 1 and H, W positive multiples of ", m, ", got ",
                        x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", out, x.shape());
    if (!absent(y)) detail::check_backend_labels<B>(name(), y, n, cfg_.num_classes);
  }

  void prepare(Cache& c, const Shape& s) const {
    c.has_forward = false;
    if (c.in_shape == s && c.rb.size() == blocks_.size()) return;
    using unet_backend_detail::resize_if;
    const auto& ch = cfg_.channels;
    const index_t n = s[0], levels = this->levels();
    const auto at = [&](index_t i) {
      return Shape{n, ch[static_cast<std::size_t>(i)], s[2] >> i, s[3] >> i};
    };
    resize_if(c.labels, Shape{n});
    for (auto* e : {&c.et, &c.det, &c.tmp_t}) resize_if(*e, Shape{n, cfg_.t_embed_dim});
    for (auto* e : {&c.ey, &c.dey, &c.tmp_y}) resize_if(*e, Shape{n, cfg_.y_embed_dim});
    resize_if(c.x, s);
    for (auto* a : {&c.c0, &c.a0, &c.dc0, &c.dlast}) resize_if(*a, at(0));
    if (cfg_.attention)
      for (auto* a : {&c.an, &c.ao, &c.mid, &c.dan, &c.dao}) resize_if(*a, at(levels - 1));
    const auto nb = blocks_.size();
    c.rb.resize(nb);
    c.rb_out.resize(nb);
    c.rb_grad.resize(nb);
    c.rb_in.assign(nb, View<const T, B>{});
    for (std::size_t b = 0; b < nb; ++b) {
      resize_if(c.rb_out[b], at(level_of_[b]));
      resize_if(c.rb_grad[b], at(level_of_[b]));
    }
    c.g1.resize(static_cast<std::size_t>(levels));
    c.g2.resize(static_cast<std::size_t>(levels));
    for (index_t i = 0; i < levels; ++i) {
      resize_if(c.g1[static_cast<std::size_t>(i)], at(i));
      resize_if(c.g2[static_cast<std::size_t>(i)], at(i));
    }
    const auto L = static_cast<std::size_t>(levels - 1);
    for (auto* v : {&c.down, &c.ddown, &c.ddown_in, &c.dec_in, &c.up, &c.upc, &c.ddec_in, &c.dup})
      v->resize(L);
    c.down_c.resize(L);
    c.up_c.resize(L);
    for (index_t i = 0; i + 1 < levels; ++i) {
      const auto k = static_cast<std::size_t>(i);
      resize_if(c.down[k], at(i + 1));
      resize_if(c.ddown[k], at(i + 1));
      resize_if(c.ddown_in[k], at(i));
    }
    for (index_t j = 0; j + 1 < levels; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const index_t i = levels - 2 - j;
      resize_if(c.dec_in[k], at(i + 1));
      resize_if(c.ddec_in[k], at(i + 1));
      const Shape us{n, ch[static_cast<std::size_t>(i + 1)], s[2] >> i, s[3] >> i};
      resize_if(c.up[k], us);
      resize_if(c.dup[k], us);
      resize_if(c.upc[k], at(i));
    }
    c.in_shape = s;
  }

  template <class U>
  static bool absent(View<U, B> v) {
    return v.data() == nullptr || v.empty();
  }

  UNetConfig cfg_;
  std::string prefix_;
  BackendUpsampleNearest2d<T, B> up_;
  std::vector<BackendConv2d<T, B>> init_conv_, down_, up_conv_, final_conv_;
  std::vector<BackendGroupNorm<T, B>> init_norm_, attn_norm_;  // attn_norm_: one with attention
  std::vector<BackendImageSelfAttention<T, B>> attn_;          // the midcoder's, with attention
  index_t y_emb_ = -1;
  std::vector<Block> blocks_;          // encoders, midcoder, decoders, in forward order
  std::vector<std::size_t> level_of_;  // the resolution level of each block
  Tensor<double, B> freqs_;            // [t_embed_dim / 2]
};

}  // namespace flowdiff::nn
