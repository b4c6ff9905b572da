// flowdiff/nn/models/unet.hpp — the U-Net vector field u_theta(x, t[, y]) for images
// x: [N, C, H, W], in the style of the MIT 6.S184 lab U-Net. With levels = channels.size() and
// H, W divisible by 2^(levels - 1):
//   e_t = SinusoidalTimeEmbedding(t_embed_dim)(t)  (scale 1000),  e_y = y_embedder.weight[y]
//   h   = SiLU(GroupNorm(Conv3x3(x)))                                          [N, c_0, H, W]
//   encoders i = 0 .. levels-2:  h = ResBlock^R(h);  h = Conv3x3/2(h) -> c_{i+1};  s_i = h
//   midcoder:                    h = ResBlock^R(h);  [h = h + Attn(GroupNorm(h))]
//   decoders i = levels-2 .. 0:  h = h + s_i (additive skip, as in the lab);
//                                h = Conv3x3(Upsample2x(h)) -> c_i;  h = ResBlock^R(h)
//   u   = Conv3x3(h) -> in_channels
// ResBlock(x) = x + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + A_t(e_t) + A_y(e_y)))), adapters
// A(e) = Linear(SiLU(Linear(e))) -> [N, C], broadcast over H, W. Backward runs everything in
// reverse; each skip's gradient is the sum of its two uses. Parameter names are those of the torch
// module in tools/fixtures/unet.py ("init_conv.0.weight", "encoders.0.res_blocks.1.block1.2.bias",
// "encoders.0.downsample.weight", "midcoder.attn.qkv.weight", "decoders.0.upsample.1.weight",
// "final_conv.weight", "y_embedder.weight", ...), so its state_dict loads with load_parameters.
// Departures from the lab, on purpose: GroupNorm instead of BatchNorm (a sample's output must not
// depend on its batch, or cfg's 2N batch and sampling would differ from single evaluations), a
// fixed sinusoidal time embedding instead of a learned Fourier one (nothing to checkpoint outside
// Parameters), nearest instead of bilinear upsampling, and the norm placed before the SiLU.
#pragma once

#include <string>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/attention.hpp"
#include "flowdiff/nn/layers/broadcast.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/embedding.hpp"
#include "flowdiff/nn/layers/linear.hpp"
#include "flowdiff/nn/layers/norm.hpp"
#include "flowdiff/nn/layers/upsample.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Configuration of nn::UNet.
struct UNetConfig {
  index_t in_channels = 1;                        ///< channels of x and of the output
  std::vector<index_t> channels = {32, 64, 128};  ///< channels per resolution level
  index_t num_residual_layers = 2;                ///< residual blocks per encoder/decoder/midcoder
  index_t t_embed_dim = 40;                       ///< sinusoidal time-embedding width
  index_t y_embed_dim = 40;                       ///< label-embedding width
  index_t num_classes = 10;                       ///< 0: unconditional; null label = num_classes
  bool attention = false;                         ///< self-attention at the lowest resolution
  index_t attention_heads = 4;                    ///< heads of that attention
  index_t groups = 8;  ///< GroupNorm groups (must divide every channel count)
  /// Training memory: recompute each residual block's SiLU(GroupNorm) outputs in backward
  /// from the block input and conv1's output (kept) instead of keeping two activations per
  /// block; the recomputed values are bit-identical, so are the gradients. false keeps them
  /// (a few per cent faster, more activation memory). The norms' own outputs are never kept.
  bool recompute = true;
};

namespace unet_detail {

template <class T>
void add_inplace(View<T> a, View<const T> b) {
  T* pa = a.data();
  const T* pb = b.data();
  // Over the threads (element-wise: the same bits for any thread count); serial, these passes
  // over the largest activations were ~5 % of a batch-250 step on the main thread alone.
  Cpu::parallel_chunks(a.numel(), [=](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) pa[i] += pb[i];
  });
}

// The conditioning broadcast and its backward (nn/layers/broadcast.hpp, shared with the
// classifier).
using detail::add_broadcast;
using detail::sum_spatial;

template <class T>
void resize_if(Tensor<T>& t, const Shape& s) {
  if (!(t.shape() == s)) t.resize(s);
}

// The lab's conditioning adapter: Linear(d, d) -> SiLU -> Linear(d, C), registered as
// prefix.0.* and prefix.2.* (nn.Sequential numbering).
template <class T>
struct Adapter {
  Linear<T> l0, l2;
  Adapter(Parameters<T>& ps, const std::string& prefix, index_t d, index_t c)
      : l0(ps, prefix + ".0", d, d), l2(ps, prefix + ".2", d, c) {}
  struct Cache {
    Tensor<T> pre, act, out;  // [N, d], [N, d], [N, C]
    Tensor<T> dact, dout;     // backward scratch
  };
  void init(Parameters<T>& ps, Generator& gen) const {
    l0.init(ps, gen);
    l2.init(ps, gen);
  }
  void forward(const Parameters<T>& ps, View<const T> e, Cache& c) const {
    const index_t n = e.dim(0);
    resize_if(c.pre, Shape{n, l0.out_features()});
    resize_if(c.act, Shape{n, l0.out_features()});
    resize_if(c.dact, Shape{n, l0.out_features()});
    resize_if(c.out, Shape{n, l2.out_features()});
    resize_if(c.dout, Shape{n, l2.out_features()});
    l0.forward(ps, e, c.pre.view());
    silu_forward<T>(c.pre.view(), c.act.view());
    l2.forward(ps, c.act.view(), c.out.view());
  }
  // dout: c.dout (filled by the caller). de: [N, d], accumulated (+=) with scratch `tmp`.
  void backward(Parameters<T>& ps, View<const T> e, View<T> de, View<T> tmp, Cache& c) const {
    l2.backward(ps, c.act.view(), c.dout.view(), c.dact.view());
    silu_backward<T>(c.pre.view(), c.dact.view(), c.dact.view());
    l0.backward(ps, e, c.dact.view(), tmp);
    add_inplace<T>(de, tmp);
  }
};

// x + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + A_t(e_t) [+ A_y(e_y)]))) at C channels.
template <class T>
struct ResBlock {
  GroupNorm<T> gn1;
  Conv2d<T> conv1;
  GroupNorm<T> gn2;
  Conv2d<T> conv2;
  Adapter<T> t_adapter;
  std::vector<Adapter<T>> y_adapter;  // one when conditional

  ResBlock(Parameters<T>& ps, const std::string& p, index_t c, index_t groups, index_t td,
           index_t yd, bool conditional)
      : gn1(ps, p + ".block1.0", groups, c),
        conv1(ps, p + ".block1.2", c, c, 3, 1, 1),
        gn2(ps, p + ".block2.0", groups, c),
        conv2(ps, p + ".block2.2", c, c, 3, 1, 1),
        t_adapter(ps, p + ".time_adapter", td, c) {
    if (conditional) y_adapter.emplace_back(ps, p + ".y_adapter", yd, c);
  }

  struct Cache {
    typename GroupNorm<T>::Cache n1, n2;
    typename Conv2d<T>::Cache c1, c2;
    typename Adapter<T>::Cache at, ay;
    Tensor<T> h1;  // [N, C, H, W]: conv1 + adapters
    // [N, C, H, W] each: SiLU(GN1 out), SiLU(GN2 out) (the norms' own outputs are never kept:
    // GroupNorm::backward_silu recomputes them); left empty when the block recomputes them
    // (its level's shared buffer holds them while they are needed).
    Tensor<T> s1, s2;
  };

  /// Where a block's SiLU(GroupNorm) outputs live: its own cache, or (recompute) one buffer
  /// shared by the blocks of a level, refilled in backward.
  struct Act {
    View<T> s1, s2;
  };
  static Act own(Cache& c) { return {c.s1.view(), c.s2.view()}; }
  static Act shared(View<T> s) { return {s, s}; }

  void init(Parameters<T>& ps, Generator& gen) const {
    gn1.init(ps, gen);
    conv1.init(ps, gen);
    gn2.init(ps, gen);
    conv2.init(ps, gen);
    t_adapter.init(ps, gen);
    for (const auto& a : y_adapter) a.init(ps, gen);
  }

  // x, out: [N, C, H, W]; et: [N, td]; ey: [N, yd] (unused when unconditional).
  // act: own(c) (sized here) or shared buffers of x's shape.
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> et, View<const T> ey,
               View<T> out, Cache& c, bool recompute, Act act) const {
    const Shape s = x.shape();
    resize_if(c.h1, s);
    if (!recompute) {
      for (Tensor<T>* t : {&c.s1, &c.s2}) resize_if(*t, s);
      act = own(c);
    }
    const index_t len = s[2] * s[3];
    first_half(ps, x, c, act);
    conv1.forward(ps, act.s1, c.h1.view(), c.c1);
    t_adapter.forward(ps, et, c.at);
    add_broadcast<T>(c.h1.view(), c.at.out.view(), len);
    if (!y_adapter.empty()) {
      y_adapter[0].forward(ps, ey, c.ay);
      add_broadcast<T>(c.h1.view(), c.ay.out.view(), len);
    }
    second_half(ps, c, act);
    conv2.forward(ps, act.s2, out, c.c2);
    add_inplace<T>(out, x);
  }

  // s1 = SiLU(GN1(x)) / s2 = SiLU(GN2(h1)), each norm and its SiLU in one pass
  // (GroupNorm::forward_silu, the norm's output not written; backward recomputes s with
  // GroupNorm::recompute: the same bits, and runs SiLU's backward inside the norm's,
  // GroupNorm::backward_silu, which recomputes the norm's output from x).
  void first_half(const Parameters<T>& ps, View<const T> x, Cache& c, const Act& act) const {
    gn1.forward_silu(ps, x, View<T>(), act.s1, c.n1);
  }
  void second_half(const Parameters<T>& ps, Cache& c, const Act& act) const {
    gn2.forward_silu(ps, c.h1.view(), View<T>(), act.s2, c.n2);
  }

  // dout: [N, C, H, W]; dx overwritten (must not alias dout); det, dey accumulated (+=), using
  // tmp_t [N, td] / tmp_y [N, yd] and g1, g2 [N, C, H, W] as scratch (shared by the blocks of a
  // level: only one block runs backward at a time).
  void backward(Parameters<T>& ps, View<const T> x, View<const T> et, View<const T> ey,
                View<const T> dout, View<T> dx, View<T> det, View<T> dey, View<T> tmp_t,
                View<T> tmp_y, View<T> g1, View<T> g2, Cache& c, bool recompute,
                Act act) const {
    const index_t len = x.dim(2) * x.dim(3);
    if (recompute)  // GN2 from its kept statistics, SiLU in the same pass
      gn2.recompute(ps, c.h1.view(), View<T>(), act.s2, c.n2);
    else
      act = own(c);
    conv2.backward(ps, act.s2, dout, g1, c.c2);
    gn2.backward_silu(ps, c.h1.view(), g1, g2, c.n2);  // g2 = dh1
    sum_spatial<T>(g2, c.at.dout.view(), len);
    t_adapter.backward(ps, et, det, tmp_t, c.at);
    if (!y_adapter.empty()) {
      sum_spatial<T>(g2, c.ay.dout.view(), len);
      y_adapter[0].backward(ps, ey, dey, tmp_y, c.ay);
    }
    if (recompute) gn1.recompute(ps, x, View<T>(), act.s1, c.n1);
    conv1.backward(ps, act.s1, g2, g1, c.c1);
    gn1.backward_silu(ps, x, g1, dx, c.n1, dout);  // + dout: the identity path
  }
};

}  // namespace unet_detail

template <class T>
class UNet {
  using Block = unet_detail::ResBlock<T>;

 public:
  using value_type = T;

  /// Every activation of the forward pass and a gradient buffer for each; sized on the first call
  /// and whenever the input shape changes, reused (no allocation by the model) while it repeats.
  struct Cache {
    Shape in_shape;
    const void* owner = nullptr;  // the model that sized it (a cache may move between models)
    bool has_forward = false;
    Tensor<T> x;                               // the input (init conv's backward needs it)
    Tensor<label_t> labels;                    // [N]
    Tensor<T> et, ey, det, dey, tmp_t, tmp_y;  // [N, td] / [N, yd]
    Tensor<T> c0, g0, a0;                      // init conv, its GroupNorm, SiLU: [N, c_0, H, W]
    typename Conv2d<T>::Cache conv0;
    typename GroupNorm<T>::Cache norm0;
    // Per residual block (encoders, midcoder, decoders in order): its output and its gradient.
    std::vector<Tensor<T>> rb_out;
    // Per level, two gradient buffers the blocks of a stage take in turn (block b writes the
    // gradient of its input into rb_grad[2 level + b % 2]; its dout is the other one).
    std::vector<Tensor<T>> rb_grad;
    std::vector<typename Block::Cache> rb;
    std::vector<Tensor<T>> scratch1, scratch2;  // per level: the blocks' backward scratch
    // Per level, with config().recompute: the blocks' SiLU(GroupNorm) outputs while in use.
    std::vector<Tensor<T>> act_s;
    // Per encoder level: the downsampled output s_i (also the skip) and its gradient.
    std::vector<Tensor<T>> down, ddown;
    std::vector<typename Conv2d<T>::Cache> down_c;
    // Midcoder attention: GroupNorm out, attention out, output h + attn; gradients.
    Tensor<T> an, ao, mid, dan, dao, dmid;
    typename GroupNorm<T>::Cache attn_n;
    typename ImageSelfAttention<T>::Cache attn_c;
    // Per decoder: input h + s_i, upsampled, conv output; gradients of each.
    std::vector<Tensor<T>> dec_in, up, upc, ddec_in, dup, dupc;
    std::vector<typename Conv2d<T>::Cache> up_c;
    typename Conv2d<T>::Cache final_c;
  };

  UNet(Parameters<T>& ps, const UNetConfig& config, const std::string& prefix = "")
      : cfg_(config),
        prefix_(prefix),
        temb_(config.t_embed_dim >= 2 ? config.t_embed_dim : 2),
        up_(2, prefix + "upsample") {
    validate();
    const auto& ch = cfg_.channels;
    const index_t levels = static_cast<index_t>(ch.size()), g = cfg_.groups;
    const index_t td = cfg_.t_embed_dim, yd = cfg_.y_embed_dim, R = cfg_.num_residual_layers;
    const bool cond = conditional();
    init_conv_.emplace_back(ps, prefix + "init_conv.0", cfg_.in_channels, ch[0], 3, 1, 1);
    init_norm_.emplace_back(ps, prefix + "init_conv.1", g, ch[0]);
    if (cond) y_emb_.emplace_back(ps, prefix + "y_embedder", cfg_.num_classes, yd);
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
      const index_t i = levels - 2 - j;  // the level this decoder returns to
      const std::string p = prefix + "decoders." + std::to_string(j);
      // upsample = nn.Sequential(nn.Upsample(2), nn.Conv2d(...)): the conv is index 1.
      up_conv_.emplace_back(ps, p + ".upsample.1", ch[i + 1], ch[i], 3, 1, 1);
      for (index_t r = 0; r < R; ++r)
        blocks_.emplace_back(ps, p + ".res_blocks." + std::to_string(r), ch[i], g, td, yd, cond);
    }
    final_conv_.emplace_back(ps, prefix + "final_conv", ch[0], cfg_.in_channels, 3, 1, 1);
    // Block order: encoder i at level i, the midcoder at the lowest level, decoder j at level
    // levels - 2 - j; R blocks each.
    for (index_t i = 0; i + 1 < levels; ++i) level_of_.insert(level_of_.end(), R, i);
    level_of_.insert(level_of_.end(), R, levels - 1);
    for (index_t j = 0; j + 1 < levels; ++j) level_of_.insert(level_of_.end(), R, levels - 2 - j);
  }

  const UNetConfig& config() const { return cfg_; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }
  index_t levels() const { return static_cast<index_t>(cfg_.channels.size()); }

  /// PyTorch's defaults (Conv2d / Linear U(±1/sqrt(fan_in)), GroupNorm 1 / 0, Embedding N(0, 1)).
  void init(Parameters<T>& ps, Generator& gen) const {
    init_conv_[0].init(ps, gen);
    init_norm_[0].init(ps, gen);
    for (const auto& e : y_emb_) e.init(ps, gen);
    for (const auto& b : blocks_) b.init(ps, gen);
    for (const auto& d : down_) d.init(ps, gen);
    for (const auto& n : attn_norm_) n.init(ps, gen);
    for (const auto& a : attn_) a.init(ps, gen);
    for (const auto& u : up_conv_) u.init(ps, gen);
    final_conv_[0].init(ps, gen);
  }

  // x: [N, in_channels, H, W] (H, W divisible by 2^(levels-1)), t: [N], y: [N] or empty / {}
  // (a conditional model then uses the null label), out: like x. Fills `cache` for backward.
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> t, View<const label_t> y,
               View<T> out, Cache& c) const {
    check_forward(x, t, y, out);
    prepare(c, x.shape());
    const index_t levels = this->levels(), R = cfg_.num_residual_layers;

    temb_.forward(t, c.et.view());
    if (conditional()) {
      if (absent(y))
        fill(c.labels.view(), null_label());
      else
        copy(c.labels.view(), y);
      y_emb_[0].forward(ps, c.labels.view(), c.ey.view());
    }
    copy(c.x.view(), x);
    init_conv_[0].forward(ps, x, c.c0.view(), c.conv0);
    init_norm_[0].forward_silu(ps, c.c0.view(), c.g0.view(), c.a0.view(), c.norm0);

    View<const T> h = c.a0.view();
    std::size_t b = 0;
    auto run_blocks = [&]() {
      for (index_t r = 0; r < R; ++r, ++b) {
        blocks_[b].forward(ps, h, c.et.view(), c.ey.view(), c.rb_out[b].view(), c.rb[b],
                           cfg_.recompute, shared_act(c, b));
        h = c.rb_out[b].view();
      }
    };
    for (index_t i = 0; i + 1 < levels; ++i) {
      const auto k = static_cast<std::size_t>(i);
      run_blocks();
      down_[k].forward(ps, h, c.down[k].view(), c.down_c[k]);
      h = c.down[k].view();
    }
    run_blocks();
    if (cfg_.attention) {
      attn_norm_[0].forward(ps, h, c.an.view(), c.attn_n);
      attn_[0].forward(ps, c.an.view(), c.ao.view(), c.attn_c);
      copy(c.mid.view(), h);
      unet_detail::add_inplace<T>(c.mid.view(), c.ao.view());
      h = c.mid.view();
    }
    for (index_t j = 0; j + 1 < levels; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const auto skip = static_cast<std::size_t>(levels - 2 - j);
      copy(c.dec_in[k].view(), h);
      unet_detail::add_inplace<T>(c.dec_in[k].view(), c.down[skip].view());
      up_.forward(c.dec_in[k].view(), c.up[k].view());
      up_conv_[k].forward(ps, c.up[k].view(), c.upc[k].view(), c.up_c[k]);
      h = c.upc[k].view();
      run_blocks();
    }
    final_conv_[0].forward(ps, h, out, c.final_c);
    c.has_forward = true;
  }

  // dout: like the last forward's x; dx: like x, or empty / {} (skipped). Parameter gradients
  // accumulate (+=); dx is overwritten. Uses the activations of the last forward() in `cache`.
  void backward(Parameters<T>& ps, View<const T> dout, View<T> dx, Cache& c) const {
    require<config_error>(c.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    check_shape("dout", dout, c.in_shape);
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    const index_t levels = this->levels(), R = cfg_.num_residual_layers;
    fill(c.det.view(), T(0));
    fill(c.dey.view(), T(0));

    std::size_t b = blocks_.size();
    // Input of block b: the previous block's output, or what fed the first block of its stage.
    const auto block_input = [&](std::size_t k, View<const T> stage_in) {
      return k % static_cast<std::size_t>(R) == 0 ? stage_in : View<const T>(c.rb_out[k - 1]);
    };
    // Runs the R blocks before b backwards, from g (the gradient of the last one's output);
    // returns the gradient of the stage input, which lands in the first block's grad_of.
    const auto back_blocks = [&](View<const T> stage_in, View<const T> g) -> View<const T> {
      for (index_t r = 0; r < R; ++r) {
        --b;
        blocks_[b].backward(ps, block_input(b, stage_in), c.et.view(), c.ey.view(), g,
                            grad_of(c, b), c.det.view(), c.dey.view(), c.tmp_t.view(),
                            c.tmp_y.view(), c.scratch1[level_of_[b]].view(),
                            c.scratch2[level_of_[b]].view(), c.rb[b], cfg_.recompute,
                            shared_act(c, b));
        g = grad_of(c, b);  // the gradient w.r.t. block b's input
      }
      return g;
    };

    // Final conv: its input is the last decoder block's output (with one level, the midcoder's).
    const View<const T> last =
        levels == 1 && cfg_.attention ? View<const T>(c.mid) : View<const T>(c.rb_out.back());
    View<T> glast = c.dupc.empty() ? c.dmid.view() : c.dupc.back().view();
    // glast is only scratch for d(last); it is consumed by back_blocks before being rewritten.
    final_conv_[0].backward(ps, last, dout, glast, c.final_c);
    View<const T> g = glast;
    for (index_t j = levels - 2; j >= 0; --j) {
      const auto k = static_cast<std::size_t>(j);
      const auto skip = static_cast<std::size_t>(levels - 2 - j);
      g = back_blocks(c.upc[k].view(), g);
      up_conv_[k].backward(ps, c.up[k].view(), g, c.dup[k].view(), c.up_c[k]);
      up_.backward(c.dec_in[k].view(), c.dup[k].view(), c.ddec_in[k].view());
      copy(c.ddown[skip].view(), View<const T>(c.ddec_in[k]));  // the skip's share
      g = c.ddec_in[k].view();                                  // the main path's share
    }
    const View<const T> mid_in = levels > 1 ? View<const T>(c.down.back()) : View<const T>(c.a0);
    if (cfg_.attention) {
      const View<const T> h = View<const T>(c.rb_out[b - 1]);
      attn_[0].backward(ps, c.an.view(), g, c.dao.view(), c.attn_c);
      attn_norm_[0].backward(ps, h, c.dao.view(), c.dan.view(), c.attn_n);
      unet_detail::add_inplace<T>(c.dan.view(), g);  // the residual path
      g = c.dan.view();
    }
    g = back_blocks(mid_in, g);
    for (index_t i = levels - 2; i >= 0; --i) {
      const auto k = static_cast<std::size_t>(i);
      // s_i feeds the next stage and the skip: add the next stage's gradient into ddown.
      unet_detail::add_inplace<T>(c.ddown[k].view(), g);
      const View<const T> in = View<const T>(c.rb_out[b - 1]);
      View<T> gin = c.dupc[static_cast<std::size_t>(levels - 2 - i)].view();  // a level-i buffer
      down_[k].backward(ps, in, c.ddown[k].view(), gin, c.down_c[k]);
      const View<const T> stage_in = i == 0 ? View<const T>(c.a0) : View<const T>(c.down[k - 1]);
      g = back_blocks(stage_in, gin);
    }
    // Init conv: SiLU, GroupNorm, conv; grad_of(c, 0) (free once g is consumed) holds the
    // gradient of the norm's input.
    Tensor<T>& ga = c.dupc.empty() ? c.dmid : c.dupc.back();  // [N, c_0, H, W] scratch
    silu_backward<T>(c.g0.view(), g, ga.view());
    init_norm_[0].backward(ps, c.c0.view(), ga.view(), grad_of(c, 0), c.norm0);
    init_conv_[0].backward(ps, c.x.view(), grad_of(c, 0), dx, c.conv0);
    if (conditional()) y_emb_[0].backward(ps, c.labels.view(), c.dey.view());
  }

 private:
  std::string name() const { return prefix_.empty() ? std::string("UNet") : prefix_ + " (UNet)"; }

  // Where block b's backward writes the gradient of its input: one of its level's two buffers,
  // never the one holding its dout (the next block's, same stage, same level).
  View<T> grad_of(Cache& c, std::size_t b) const {
    return c.rb_grad[2 * static_cast<std::size_t>(level_of_[b]) + b % 2].view();
  }

  // Block b's GroupNorm / SiLU buffers when recomputing: its level's shared pair (else unused).
  typename Block::Act shared_act(Cache& c, std::size_t b) const {
    if (!cfg_.recompute) return {};
    const auto level = static_cast<std::size_t>(level_of_[b]);
    return Block::shared(c.act_s[level].view());
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
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T> x, View<const T> t, View<const label_t> y, View<T> out) const {
    const index_t m = index_t{1} << (levels() - 1);
    if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) != cfg_.in_channels || x.dim(2) < m ||
        x.dim(3) < m || x.dim(2) % m != 0 || x.dim(3) % m != 0)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.in_channels,
                        ", H, W] with N >= 1 and H, W positive multiples of ", m, ", got ",
                        x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", out, x.shape());
    if (!absent(y)) {
      if (!conditional())
        fail<config_error>(name(), ": labels y were given (shape ", y.shape(),
                           ") but the model is unconditional (num_classes = 0)");
      check_shape("y", y, Shape{n});
    }
  }

  void prepare(Cache& c, const Shape& s) const {
    c.has_forward = false;
    if (c.owner == this && c.in_shape == s) return;
    using unet_detail::resize_if;
    const auto& ch = cfg_.channels;
    const index_t n = s[0], levels = this->levels(), R = cfg_.num_residual_layers;
    const auto at = [&](index_t i) {  // activation shape at level i
      return Shape{n, ch[static_cast<std::size_t>(i)], s[2] >> i, s[3] >> i};
    };
    c.labels.resize(Shape{n});
    for (Tensor<T>* e : {&c.et, &c.det, &c.tmp_t}) e->resize(Shape{n, cfg_.t_embed_dim});
    for (Tensor<T>* e : {&c.ey, &c.dey, &c.tmp_y}) e->resize(Shape{n, cfg_.y_embed_dim});
    for (Tensor<T>* a : {&c.c0, &c.g0, &c.a0}) a->resize(at(0));
    c.rb.resize(blocks_.size());
    c.rb_out.resize(blocks_.size());
    c.rb_grad.resize(2 * static_cast<std::size_t>(levels));
    for (std::size_t q = 0; q < c.rb_grad.size(); ++q)
      c.rb_grad[q].resize(at(static_cast<index_t>(q / 2)));
    c.scratch1.resize(static_cast<std::size_t>(levels));
    c.scratch2.resize(static_cast<std::size_t>(levels));
    for (index_t i = 0; i < levels; ++i) {
      c.scratch1[static_cast<std::size_t>(i)].resize(at(i));
      c.scratch2[static_cast<std::size_t>(i)].resize(at(i));
    }
    c.act_s.resize(cfg_.recompute ? static_cast<std::size_t>(levels) : 0);
    for (std::size_t i = 0; i < c.act_s.size(); ++i) c.act_s[i].resize(at(static_cast<index_t>(i)));
    std::size_t b = 0;
    const auto stage = [&](index_t level) {
      for (index_t r = 0; r < R; ++r, ++b) {
        c.rb_out[b].resize(at(level));
      }
    };
    const auto L = static_cast<std::size_t>(levels - 1);
    c.down.resize(L);
    c.ddown.resize(L);
    c.down_c.resize(L);
    for (index_t i = 0; i + 1 < levels; ++i) {
      stage(i);
      c.down[static_cast<std::size_t>(i)].resize(at(i + 1));
      c.ddown[static_cast<std::size_t>(i)].resize(at(i + 1));
    }
    stage(levels - 1);
    for (Tensor<T>* a : {&c.an, &c.ao, &c.mid, &c.dan, &c.dao, &c.dmid}) a->resize(at(levels - 1));
    for (auto* v : {&c.dec_in, &c.up, &c.upc, &c.ddec_in, &c.dup, &c.dupc}) v->resize(L);
    c.up_c.resize(L);
    for (index_t j = 0; j + 1 < levels; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const index_t i = levels - 2 - j;
      c.dec_in[k].resize(at(i + 1));
      c.ddec_in[k].resize(at(i + 1));
      const Shape us{n, ch[static_cast<std::size_t>(i + 1)], s[2] >> i, s[3] >> i};
      c.up[k].resize(us);
      c.dup[k].resize(us);
      c.upc[k].resize(at(i));
      c.dupc[k].resize(at(i));
      stage(i);
    }
    c.x.resize(s);
    c.in_shape = s;
    c.owner = this;
  }

  template <class U>
  static bool absent(View<U> v) {
    return v.data() == nullptr || v.empty();
  }

  UNetConfig cfg_;
  std::string prefix_;
  SinusoidalTimeEmbedding<T> temb_;
  UpsampleNearest2d<T> up_;
  // Layers held in vectors so the class stays default-movable and optional parts can be absent.
  std::vector<Conv2d<T>> init_conv_, down_, up_conv_, final_conv_;
  std::vector<GroupNorm<T>> init_norm_, attn_norm_;
  std::vector<Embedding<T>> y_emb_;
  std::vector<Block> blocks_;          // encoders, midcoder, decoders, in forward order
  std::vector<std::size_t> level_of_;  // the resolution level of each block
  std::vector<ImageSelfAttention<T>> attn_;
};

}  // namespace flowdiff::nn
