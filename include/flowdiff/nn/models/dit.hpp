// flowdiff/nn/models/dit.hpp — the diffusion transformer (DiT, Peebles & Xie 2023) as a vector
// field u_theta(x, t[, y]) for images x: [N, C, S, S], laid out as the facebookresearch/DiT
// reference (learn_sigma = False: the output has C channels, it is a velocity). With patch size p,
// L = (S/p)^2 tokens of width D:
//   h_0 = PatchEmbed(x) + pos                       [N, L, D]  (pos: fixed 2-D sin-cos, or learned)
//   c   = t_mlp(freq(1000 t)) [+ y_table[y]]        [N, D]     (freq: 256 sinusoidal features)
//   block i (adaLN-Zero): [sh1, sc1, g1, sh2, sc2, g2] = Linear(SiLU(c)) -> 6 x [N, D]
//         h' = h + g1 * Attn(LN(h) (1 + sc1) + sh1);   h = h' + g2 * MLP(LN(h') (1 + sc2) + sh2)
//   final: [sh, sc] = Linear(SiLU(c));  o = Linear(LN(h) (1 + sc) + sh)  [N, L, p p C];
//         u = unpatchify(o) with o's patch vector ordered (u, v, c)   [N, C, S, S]
// with LN a LayerNorm without affine (eps 1e-6), Attn timm's multi-head self-attention,
// MLP = fc2(GELU_tanh(fc1(.))) of hidden width mlp_ratio D, t_mlp = Linear(256, D), SiLU,
// Linear(D, D), and the per-sample vectors broadcast over the L tokens. Backward runs the same
// steps in reverse: modulation gives dscale = sum_L dy LN(h), dshift = sum_L dy; a gate gives
// dg = sum_L dy f, df = g dy; the six (two) chunk gradients are gathered into the gradient of the
// modulation Linear's output, and every block's dc adds up. Time: t in [0, 1] is scaled by 1000
// before the frequency embedding (DiT's timesteps are 0..999). Parameter names are the
// reference's state_dict names ("x_embedder.proj.weight", "t_embedder.mlp.0.weight",
// "y_embedder.embedding_table.weight", "blocks.3.attn.qkv.weight", "blocks.3.mlp.fc1.bias",
// "blocks.3.adaLN_modulation.1.weight", "final_layer.linear.weight", "pos_embed" when learned);
// the fixed sin-cos table is not a parameter (the reference keeps it as a frozen "pos_embed").
#pragma once

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/attention.hpp"
#include "flowdiff/nn/layers/embedding.hpp"
#include "flowdiff/nn/layers/linear.hpp"
#include "flowdiff/nn/layers/modulation.hpp"
#include "flowdiff/nn/layers/norm.hpp"
#include "flowdiff/nn/layers/patchify.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Configuration of nn::DiT. The defaults are a small DiT for 32x32 single-channel images.
struct DiTConfig {
  index_t in_channels = 1;         ///< channels of x and of the output
  index_t image_size = 32;         ///< H = W of x
  index_t patch_size = 4;          ///< p: (image_size / p)^2 tokens
  index_t hidden = 128;            ///< token width D
  index_t depth = 6;               ///< transformer blocks
  index_t heads = 4;               ///< attention heads (must divide hidden)
  double mlp_ratio = 4.0;          ///< MLP hidden width = int(hidden * mlp_ratio)
  index_t num_classes = 10;        ///< 0: unconditional; null label = num_classes
  index_t frequency_dim = 256;     ///< sinusoidal time features fed to t_embedder.mlp.0
  double time_scale = 1000.0;      ///< t in [0, 1] is multiplied by this before the features
  bool learned_pos_embed = false;  ///< a trainable "pos_embed" [1, L, D] instead of sin-cos
};

namespace dit_detail {

template <class T>
void resize_if(Tensor<T>& t, const Shape& s) {
  if (!(t.shape() == s)) t.resize(s);
}

/// xavier_uniform_ of a weight [out, ...]: U(±sqrt(6 / (fan_in + fan_out))), fan_in = numel/out.
template <class T>
void xavier_uniform(View<T> w, Generator& gen) {
  const index_t out = w.dim(0), in = w.numel() / out;
  const T bound = static_cast<T>(std::sqrt(6.0 / static_cast<double>(in + out)));
  fill_uniform(w, gen, -bound, bound);
}

/// DiT's get_2d_sincos_pos_embed for a grid x grid image: row k = a grid + b (patch row a, column
/// b) is [sin(b w), cos(b w), sin(a w), cos(a w)], w_m = 10000^(-m / (D/4)), m < D/4.
template <class T>
void sincos_pos_embed(View<T> table,
                      index_t grid) {  // table: [grid^2, D], D % 4 == 0
  const index_t D = table.dim(1), q = D / 4;
  for (index_t a = 0; a < grid; ++a)
    for (index_t b = 0; b < grid; ++b) {
      T* row = table.data() + (a * grid + b) * D;
      for (index_t m = 0; m < q; ++m) {
        const double w = 1.0 / std::pow(10000.0, static_cast<double>(m) / static_cast<double>(q));
        row[m] = static_cast<T>(std::sin(static_cast<double>(b) * w));
        row[q + m] = static_cast<T>(std::cos(static_cast<double>(b) * w));
        row[2 * q + m] = static_cast<T>(std::sin(static_cast<double>(a) * w));
        row[3 * q + m] = static_cast<T>(std::cos(static_cast<double>(a) * w));
      }
    }
}

// y[n, l, :] = x[n, l, :] + g[n, :] f[n, l, :]    x, f, y: [N, L, D], g: [N, D]; y may alias x.
template <class T>
void gated_add(View<const T> x, View<const T> g, View<const T> f, View<T> y) {
  const index_t n = x.dim(0), L = x.dim(1), D = x.dim(2);
  const T* px = x.data();
  const T* pg = g.data();
  const T* pf = f.data();
  T* py = y.data();
  Cpu::parallel_for(
      n * L,
      [=](index_t r) {
        const T* gr = pg + (r / L) * D;
        for (index_t j = 0; j < D; ++j) py[r * D + j] = px[r * D + j] + gr[j] * pf[r * D + j];
      },
      2 * D);
}

// The backward of gated_add's gate: df = g dy (overwritten), dg[n, :] = sum_l dy f (overwritten).
template <class T>
void gate_backward(View<const T> f, View<const T> g, View<const T> dy, View<T> df, View<T> dg) {
  const index_t n = f.dim(0), L = f.dim(1), D = f.dim(2);
  const T* pf = f.data();
  const T* pg = g.data();
  const T* pd = dy.data();
  T* pdf = df.data();
  T* pdg = dg.data();
  Cpu::parallel_for(
      n,
      [=](index_t i) {
        const T* gr = pg + i * D;
        T* dgr = pdg + i * D;
        for (index_t j = 0; j < D; ++j) dgr[j] = T(0);
        for (index_t l = 0; l < L; ++l) {
          const index_t o = (i * L + l) * D;
          for (index_t j = 0; j < D; ++j) {
            pdf[o + j] = gr[j] * pd[o + j];
            dgr[j] += pd[o + j] * pf[o + j];
          }
        }
      },
      3 * L * D);
}

/// LayerNorm without affine (statistics per token) fused with the adaLN modulation of its output:
///   xn = (x - mu) rstd,  m = xn (1 + scale[n]) + shift[n]
/// x, xn, m: [N, L, D]; scale, shift: [N, D].
/// With `fresh`, mu and rstd are computed into `stats` (as LayerNorm::forward does, so
/// LayerNorm::backward can use them); otherwise the stored ones are used, which recomputes exactly
/// the forward's values (the same arithmetic) for backward instead of keeping them. xn may be null.
template <class T>
void ln_modulate(View<const T> x, T eps, detail::NormCache<T>& stats, bool fresh,
                 View<const T> scale, View<const T> shift, T* xn, T* m) {
  const index_t n = x.dim(0), L = x.dim(1), D = x.dim(2), rows = n * L;
  if (fresh) stats.ensure(rows);
  const T* px = x.data();
  const T* ps = scale.data();
  const T* pb = shift.data();
  T* mean = stats.mean.data();
  T* rstd = stats.rstd.data();
  detail::vector_rows(
      rows, 6 * D,
      [=](index_t r) FLOWDIFF_LAMBDA_INLINE {
        const T* xr = px + r * D;
        if (fresh) detail::moments(xr, D, eps, mean[r], rstd[r]);
        const T mu = mean[r], rs = rstd[r];
        const T* sc = ps + (r / L) * D;
        const T* sh = pb + (r / L) * D;
        T* mr = m + r * D;
        FLOWDIFF_SIMD
        for (index_t j = 0; j < D; ++j) mr[j] = (xr[j] - mu) * rs * (T(1) + sc[j]) + sh[j];
        if (xn) {
          T* xnr = xn + r * D;
          FLOWDIFF_SIMD
          for (index_t j = 0; j < D; ++j) xnr[j] = (xr[j] - mu) * rs;
        }
      });
}

// y = a + b element-wise (a, b, y: same size; y may alias a).
template <class T>
void add_into(const T* a, const T* b, T* y, index_t n) {
  Cpu::parallel_chunks(n, [=](index_t lo, index_t hi) {
    FLOWDIFF_SIMD
    for (index_t i = lo; i < hi; ++i) y[i] = a[i] + b[i];
  });
}

/// adaLN modulation: SiLU -> Linear(D, K D) ("<prefix>.adaLN_modulation.1"), its output split into
/// K chunks [N, D] in the order of torch.chunk(K, dim=1).
template <class T, int K>
struct AdaLN {
  Linear<T> lin;
  AdaLN(Parameters<T>& ps, const std::string& prefix, index_t d)
      : lin(ps, prefix + ".adaLN_modulation.1", d, K * d) {}
  struct Cache {
    Tensor<T> sc, dsc;                // SiLU(c) and its gradient [N, D]
    Tensor<T> mod, dmod;              // the Linear's output and its gradient [N, K D]
    std::array<Tensor<T>, K> chunk;   // [N, D] each
    std::array<Tensor<T>, K> dchunk;  // [N, D] each, filled by the caller before backward
  };
  index_t dim() const { return lin.in_features(); }
  void prepare(Cache& c, index_t n) const {
    const index_t d = dim();
    for (Tensor<T>* t : {&c.sc, &c.dsc}) resize_if(*t, Shape{n, d});
    for (Tensor<T>* t : {&c.mod, &c.dmod}) resize_if(*t, Shape{n, K * d});
    for (int k = 0; k < K; ++k) {
      resize_if(c.chunk[static_cast<std::size_t>(k)], Shape{n, d});
      resize_if(c.dchunk[static_cast<std::size_t>(k)], Shape{n, d});
    }
  }
  // c: [N, D]
  void forward(const Parameters<T>& ps, View<const T> cond, Cache& c) const {
    const index_t n = cond.dim(0), d = dim();
    prepare(c, n);
    silu_forward<T>(cond, c.sc.view());
    lin.forward(ps, c.sc.view(), c.mod.view());
    const T* m = c.mod.data();
    for (int k = 0; k < K; ++k) {
      T* dst = c.chunk[static_cast<std::size_t>(k)].data();
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < d; ++j) dst[i * d + j] = m[(i * K + k) * d + j];
    }
  }
  // Gathers c.dchunk into the Linear's output gradient; dc: [N, D] overwritten, or empty.
  void backward(Parameters<T>& ps, View<const T> cond, View<T> dc, Cache& c) const {
    const index_t n = cond.dim(0), d = dim();
    T* dm = c.dmod.data();
    for (int k = 0; k < K; ++k) {
      const T* src = c.dchunk[static_cast<std::size_t>(k)].data();
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < d; ++j) dm[(i * K + k) * d + j] = src[i * d + j];
    }
    if (dc.empty()) {
      lin.backward(ps, c.sc.view(), c.dmod.view(), View<T>());
      return;
    }
    lin.backward(ps, c.sc.view(), c.dmod.view(), c.dsc.view());
    silu_backward<T>(cond, c.dsc.view(), dc);
  }
};

}  // namespace dit_detail

/// One DiT block with adaLN-Zero conditioning (the reference's DiTBlock), registered under `prefix`
/// (e.g. "blocks.0"): prefix.attn.{qkv,proj}.*, prefix.mlp.{fc1,fc2}.*, prefix.adaLN_modulation.1.*
/// (norm1 and norm2 have no parameters).
template <class T>
class DiTBlock {
 public:
  DiTBlock(Parameters<T>& ps, const std::string& prefix, index_t hidden, index_t heads,
           double mlp_ratio = 4.0)
      : prefix_(prefix),
        d_(hidden),
        dm_(mlp_width(prefix, hidden, mlp_ratio)),
        norm1_(ps, prefix + ".norm1", hidden, T(1e-6), false),
        attn_(ps, prefix + ".attn", hidden, heads),
        norm2_(ps, prefix + ".norm2", hidden, T(1e-6), false),
        fc1_(ps, prefix + ".mlp.fc1", hidden, dm_),
        fc2_(ps, prefix + ".mlp.fc2", dm_, hidden),
        ada_(ps, prefix, hidden) {}

  index_t hidden() const { return d_; }
  index_t mlp_hidden() const { return dm_; }
  index_t heads() const { return attn_.heads(); }
  const std::string& prefix() const { return prefix_; }

  /// The reference's init: xavier_uniform weights and zero biases for every Linear (qkv as one [3D,
  /// D] matrix), then the adaLN modulation zeroed (so the block starts as the identity).
  void init(Parameters<T>& ps, Generator& gen) const {
    for (index_t id :
         {attn_.qkv_weight_id(), attn_.proj_weight_id(), fc1_.weight_id(), fc2_.weight_id()})
      dit_detail::xavier_uniform(ps.param(id), gen);
    for (index_t id : {attn_.qkv_bias_id(), attn_.proj_bias_id(), fc1_.bias_id(), fc2_.bias_id(),
                       ada_.lin.weight_id(), ada_.lin.bias_id()})
      fill(ps.param(id), T(0));
  }

  /// Temporaries of forward and backward; a model shares one set between all its blocks. The
  /// modulated LayerNorm outputs and the GELU output are kept here only while they are used and
  /// recomputed in backward (from the stored LayerNorm statistics and fc1's output), so a block's
  /// Cache holds only what cannot be recomputed cheaply.
  struct Scratch {
    Tensor<T> dmid, dh, dm, dxn, xn, m;  // [N, L, D]
    Tensor<T> dbig, big;                 // [N, L, mlp_hidden]
    typename MultiheadSelfAttention<T>::Scratch at;
  };

  struct Cache {
    typename dit_detail::AdaLN<T, 6>::Cache ada;
    typename LayerNorm<T>::Cache n1, n2;
    typename MultiheadSelfAttention<T>::Cache at;
    // attention out, x + g1 attn, fc2 out: [N, L, D]; fc1 out (bias included): [N, L, mlp_hidden]
    Tensor<T> a, xmid, h1, h2;
    Scratch scratch;  // used by the overloads without a Scratch argument
    Shape shape;      // x of the last forward
  };

  // x: [N, L, D], c: [N, D] -> out: [N, L, D] (must not alias x)
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> c, View<T> out,
               Cache& k) const {
    forward(ps, x, c, out, k, k.scratch);
  }

  void forward(const Parameters<T>& ps, View<const T> x, View<const T> c, View<T> out, Cache& k,
               Scratch& s) const {
    check_inputs(x, c);
    check_shape("out", View<const T>(out), x.shape());
    using dit_detail::resize_if;
    const Shape sh = x.shape(), sb{sh[0], sh[1], dm_};
    for (Tensor<T>* t : {&k.a, &k.xmid, &k.h2, &s.m}) resize_if(*t, sh);
    for (Tensor<T>* t : {&k.h1, &s.big}) resize_if(*t, sb);
    k.shape = sh;
    ada_.forward(ps, c, k.ada);
    // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    const auto& ch = k.ada.chunk;
    dit_detail::ln_modulate<T>(x, norm1_.eps(), k.n1, true, ch[1].view(), ch[0].view(), nullptr,
                               s.m.data());
    attn_.forward(ps, s.m.view(), k.a.view(), k.at);
    dit_detail::gated_add<T>(x, ch[2].view(), k.a.view(), k.xmid.view());
    dit_detail::ln_modulate<T>(k.xmid.view(), norm2_.eps(), k.n2, true, ch[4].view(), ch[3].view(),
                               nullptr, s.m.data());
    fc1_.forward_gelu(ps, s.m.view(), k.h1.view(), s.big.view(), GeluApprox::tanh);
    fc2_.forward(ps, s.big.view(), k.h2.view());
    dit_detail::gated_add<T>(k.xmid.view(), ch[5].view(), k.h2.view(), out);
  }

  // x, c: the forward's inputs; dout: [N, L, D]; dx: [N, L, D] or empty; dc: [N, D] or empty.
  // Parameter gradients accumulate; dx and dc are overwritten.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> c, View<const T> dout, View<T> dx,
                View<T> dc, Cache& k) const {
    backward(ps, x, c, dout, dx, dc, k, k.scratch);
  }

  void backward(Parameters<T>& ps, View<const T> x, View<const T> c, View<const T> dout, View<T> dx,
                View<T> dc, Cache& k, Scratch& s) const {
    check_inputs(x, c);
    require<config_error>(k.shape == x.shape(), prefix_,
                          " (DiTBlock): backward needs the cache of a forward() on this x");
    check_shape("dout", dout, x.shape());
    if (!dx.empty()) check_shape("dx", View<const T>(dx), x.shape());
    if (!dc.empty()) check_shape("dc", View<const T>(dc), c.shape());
    using dit_detail::resize_if;
    const Shape sh = x.shape(), sb{sh[0], sh[1], dm_};
    for (Tensor<T>* t : {&s.dmid, &s.dh, &s.dm, &s.dxn, &s.xn, &s.m}) resize_if(*t, sh);
    for (Tensor<T>* t : {&s.dbig, &s.big}) resize_if(*t, sb);
    const auto& ch = k.ada.chunk;
    auto& dch = k.ada.dchunk;
    // MLP branch: out = xmid + g2 * h2, h2 = fc2(GELU(h1)), h1 = fc1(m2).
    dit_detail::gate_backward<T>(k.h2.view(), ch[5].view(), dout, s.dh.view(), dch[5].view());
    gelu_forward<T>(k.h1.view(), s.big.view(), GeluApprox::tanh);  // recomputed GELU(h1)
    fc2_.backward_through_gelu(ps, s.big.view(), s.dh.view(), k.h1.view(), s.dbig.view(),
                               GeluApprox::tanh);
    dit_detail::ln_modulate<T>(k.xmid.view(), norm2_.eps(), k.n2, false, ch[4].view(), ch[3].view(),
                               s.xn.data(), s.m.data());  // recomputed xn2, m2
    fc1_.backward(ps, s.m.view(), s.dbig.view(), s.dm.view());
    modulate_backward<T>(s.xn.view(), ch[4].view(), s.dm.view(), s.dxn.view(), dch[4].view(),
                         dch[3].view(), ChannelAxis::last);
    norm2_.backward(ps, k.xmid.view(), s.dxn.view(), s.dh.view(), k.n2);
    dit_detail::add_into(dout.data(), s.dh.data(), s.dmid.data(), dout.numel());
    // Attention branch: xmid = x + g1 * a, a = Attn(m1).
    dit_detail::gate_backward<T>(k.a.view(), ch[2].view(), s.dmid.view(), s.dh.view(),
                                 dch[2].view());
    dit_detail::ln_modulate<T>(x, norm1_.eps(), k.n1, false, ch[1].view(), ch[0].view(),
                               s.xn.data(), s.m.data());  // recomputed xn1, m1
    attn_.backward(ps, s.m.view(), s.dh.view(), s.dm.view(), k.at, s.at);
    modulate_backward<T>(s.xn.view(), ch[1].view(), s.dm.view(), s.dxn.view(), dch[1].view(),
                         dch[0].view(), ChannelAxis::last);
    if (!dx.empty()) {
      norm1_.backward(ps, x, s.dxn.view(), dx, k.n1);
      dit_detail::add_into(dx.data(), s.dmid.data(), dx.data(), dx.numel());
    }
    ada_.backward(ps, c, dc, k.ada);
  }

 private:
  static index_t mlp_width(const std::string& prefix, index_t hidden, double ratio) {
    const auto w = static_cast<index_t>(static_cast<double>(hidden) * ratio);
    require<config_error>(
        hidden >= 1 && ratio > 0 && w >= 1, prefix,
        " (DiTBlock): need hidden >= 1 and int(hidden * mlp_ratio) >= 1, got hidden = ", hidden,
        ", mlp_ratio = ", ratio);
    return w;
  }

  template <class U>
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(prefix_, " (DiTBlock): ", arg, ": expected shape ", expected, ", got ",
                        v.shape());
  }
  void check_inputs(View<const T> x, View<const T> c) const {
    if (x.rank() != 3 || x.dim(0) < 1 || x.dim(1) < 1 || x.dim(2) != d_)
      fail<shape_error>(prefix_, " (DiTBlock): x: expected shape [N, L, ", d_, "], got ",
                        x.shape());
    check_shape("c", c, Shape{x.dim(0), d_});
  }

  std::string prefix_;
  index_t d_, dm_;
  LayerNorm<T> norm1_;
  MultiheadSelfAttention<T> attn_;
  LayerNorm<T> norm2_;
  Linear<T> fc1_, fc2_;
  dit_detail::AdaLN<T, 6> ada_;
};

template <class T>
class DiT {
  using Block = DiTBlock<T>;
  using Final = dit_detail::AdaLN<T, 2>;

 public:
  using value_type = T;

  /// Every activation of the forward pass and the gradient buffers; sized on the first call and
  /// whenever N changes, reused (no allocation by the model or its layers) while it repeats.
  struct Cache {
    Shape in_shape;
    const void* owner = nullptr;  // the model that sized it
    bool has_forward = false;
    Tensor<T> x;                            // the input [N, C, S, S]
    Tensor<label_t> labels;                 // [N]
    Tensor<T> tf;                           // time features [N, frequency_dim]
    Tensor<T> th, ts, c, dc, dtmp, dth;     // [N, D]: mlp.0 out, SiLU, c; gradients
    Tensor<T> h0;                           // tokens + pos [N, L, D]
    std::vector<Tensor<T>> hb;              // block outputs [N, L, D]
    std::vector<typename Block::Cache> bc;  // per block
    typename Block::Scratch scratch;        // shared by the blocks' forward and backward
    typename PatchEmbed<T>::Cache pe;
    typename Final::Cache fada;  // final adaLN
    typename LayerNorm<T>::Cache fnorm;
    Tensor<T> fxn, fm, dfm, dfxn;  // final LN and its modulation [N, L, D]; gradients
    Tensor<T> fo, dfo;             // final Linear output [N, L, p p C] and its gradient
    Tensor<T> g0, g1;              // token gradients [N, L, D] (ping-pong)
  };

  DiT(Parameters<T>& ps, const DiTConfig& config, const std::string& prefix = "")
      : cfg_(valid(config, prefix)),
        prefix_(prefix),
        tfreq_(config.frequency_dim, config.time_scale),
        x_emb_(ps, prefix + "x_embedder", config.in_channels, config.hidden, config.patch_size),
        t_mlp0_(ps, prefix + "t_embedder.mlp.0", config.frequency_dim, config.hidden),
        t_mlp2_(ps, prefix + "t_embedder.mlp.2", config.hidden, config.hidden),
        y_emb_(make_label_table(ps, config, prefix)),
        blocks_(make_blocks(ps, config, prefix)),
        fnorm_(ps, prefix + "final_layer.norm_final", config.hidden, T(1e-6), false),
        fada_(ps, prefix + "final_layer", config.hidden),
        flin_(ps, prefix + "final_layer.linear", config.hidden,
              config.patch_size * config.patch_size * config.in_channels) {
    if (cfg_.learned_pos_embed)
      pos_id_ = ps.add(prefix + "pos_embed", Shape{1, tokens(), hidden()});
    pos_table_.resize(Shape{tokens(), hidden()});
    // The 2-d sin-cos table needs D % 4 == 0; otherwise (only with a learned pos_embed, which
    // the constructor's check requires then) the learned embedding starts at zero.
    if (cfg_.hidden % 4 == 0)
      dit_detail::sincos_pos_embed(pos_table_.view(), grid());
    else
      fill(pos_table_.view(), T(0));
  }

  const DiTConfig& config() const { return cfg_; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }
  index_t hidden() const { return cfg_.hidden; }
  index_t grid() const { return cfg_.image_size / cfg_.patch_size; }
  /// L, the number of tokens.
  index_t tokens() const { return grid() * grid(); }
  const std::vector<Block>& blocks() const { return blocks_; }
  /// The fixed sin-cos table [L, D] (zero when hidden % 4 != 0, allowed only with learned ones).
  View<const T> sincos_table() const { return pos_table_.view(); }

  /// The reference's initialize_weights(): xavier_uniform for every Linear weight and for the patch
  /// projection viewed as [D, C p p], zero biases, t_embedder weights N(0, 0.02^2), the label table
  /// N(0, 0.02^2), adaLN modulations and the final Linear zero (adaLN-Zero: the model starts as u =
  /// 0). A learned pos_embed starts at the sin-cos table (at zero when hidden % 4 != 0).
  void init(Parameters<T>& ps, Generator& gen) const {
    dit_detail::xavier_uniform(ps.param(x_emb_.weight_id()), gen);
    fill(ps.param(x_emb_.bias_id()), T(0));
    fill_normal(ps.param(t_mlp0_.weight_id()), gen, T(0), T(0.02));
    fill(ps.param(t_mlp0_.bias_id()), T(0));
    fill_normal(ps.param(t_mlp2_.weight_id()), gen, T(0), T(0.02));
    fill(ps.param(t_mlp2_.bias_id()), T(0));
    for (const auto& e : y_emb_) fill_normal(ps.param(e.weight_id()), gen, T(0), T(0.02));
    for (const auto& b : blocks_) b.init(ps, gen);
    for (index_t id :
         {fada_.lin.weight_id(), fada_.lin.bias_id(), flin_.weight_id(), flin_.bias_id()})
      fill(ps.param(id), T(0));
    if (pos_id_ >= 0) copy(ps.param(pos_id_).reshape({tokens(), hidden()}), pos_table_.view());
  }

  // x: [N, C, S, S], t: [N], y: [N] or empty / {} (a conditional model then uses the null label),
  // out: like x. Fills `cache` for backward.
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> t, View<const label_t> y,
               View<T> out, Cache& c) const {
    check_forward(x, t, y, out);
    prepare(c, x.shape());
    // Conditioning c = t_mlp(freq(t)) [+ y_table[y]].
    tfreq_.forward(t, c.tf.view());
    t_mlp0_.forward(ps, c.tf.view(), c.th.view());
    silu_forward<T>(c.th.view(), c.ts.view());
    t_mlp2_.forward(ps, c.ts.view(), c.c.view());
    if (conditional()) {
      if (absent(y))
        fill(c.labels.view(), null_label());
      else
        copy(c.labels.view(), y);
      y_emb_[0].forward(ps, c.labels.view(), c.dtmp.view());
      accumulate<T>(c.c.view(), c.dtmp.view());
    }
    // Tokens.
    copy(c.x.view(), x);
    x_emb_.forward(ps, x, c.h0.view(), c.pe);
    add_pos(ps, c.h0.view());
    View<const T> h = c.h0.view();
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      blocks_[i].forward(ps, h, c.c.view(), c.hb[i].view(), c.bc[i], c.scratch);
      h = c.hb[i].view();
    }
    // Final layer and unpatchify.
    fada_.forward(ps, c.c.view(), c.fada);
    fnorm_.forward(ps, h, c.fxn.view(), c.fnorm);
    modulate_forward<T>(c.fxn.view(), c.fada.chunk[1].view(), c.fada.chunk[0].view(), c.fm.view(),
                        ChannelAxis::last);
    flin_.forward(ps, c.fm.view(), c.fo.view());
    unpatchify<T>(c.fo.view(), cfg_.patch_size, out, PatchLayout::channel_last);
    c.has_forward = true;
  }

  // dout: like the last forward's x; dx: like x, or empty / {} (skipped). Parameter gradients
  // accumulate (+=); dx is overwritten. Uses the activations of the last forward() in `cache`.
  // There is no gradient w.r.t. t.
  void backward(Parameters<T>& ps, View<const T> dout, View<T> dx, Cache& c) const {
    require<config_error>(c.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    check_shape("dout", dout, c.in_shape);
    if (!absent(dx)) check_shape("dx", View<const T>(dx), c.in_shape);
    // Final layer.
    patchify<T>(dout, cfg_.patch_size, c.dfo.view(), PatchLayout::channel_last);
    const View<const T> hl = blocks_.empty() ? View<const T>(c.h0) : View<const T>(c.hb.back());
    flin_.backward(ps, c.fm.view(), c.dfo.view(), c.dfm.view());
    modulate_backward<T>(c.fxn.view(), c.fada.chunk[1].view(), c.dfm.view(), c.dfxn.view(),
                         c.fada.dchunk[1].view(), c.fada.dchunk[0].view(), ChannelAxis::last);
    Tensor<T>* g = &c.g0;
    Tensor<T>* gnext = &c.g1;
    fnorm_.backward(ps, hl, c.dfxn.view(), g->view(), c.fnorm);
    fada_.backward(ps, c.c.view(), c.dc.view(), c.fada);
    // Blocks, last to first; every block's dc adds into c.dc.
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      const View<const T> in = i == 0 ? View<const T>(c.h0) : View<const T>(c.hb[i - 1]);
      blocks_[i].backward(ps, in, c.c.view(), g->view(), gnext->view(), c.dtmp.view(), c.bc[i],
                          c.scratch);
      accumulate<T>(c.dc.view(), c.dtmp.view());
      std::swap(g, gnext);
    }
    // g holds the gradient of h0 = PatchEmbed(x) + pos.
    if (pos_id_ >= 0) {
      T* dp = ps.grad(pos_id_).data();
      const T* pg = g->data();
      const index_t n = c.in_shape[0], ld = tokens() * hidden();
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < ld; ++j) dp[j] += pg[i * ld + j];
    }
    x_emb_.backward(ps, c.x.view(), g->view(), absent(dx) ? View<T>() : dx, c.pe);
    // Conditioning.
    if (conditional()) y_emb_[0].backward(ps, c.labels.view(), c.dc.view());
    t_mlp2_.backward(ps, c.ts.view(), c.dc.view(), c.dth.view());
    silu_backward<T>(c.th.view(), c.dth.view(), c.dth.view());
    t_mlp0_.backward(ps, c.tf.view(), c.dth.view(), View<T>());
  }

 private:
  std::string name() const { return prefix_.empty() ? std::string("DiT") : prefix_ + " (DiT)"; }

  // Validates the configuration before any layer registers (so errors name the model).
  static const DiTConfig& valid(const DiTConfig& k, const std::string& prefix) {
    const std::string who = prefix.empty() ? std::string("DiT") : prefix + " (DiT)";
    require<config_error>(k.in_channels >= 1 && k.patch_size >= 1 && k.image_size >= 1 &&
                              k.image_size % k.patch_size == 0,
                          who,
                          ": need in_channels >= 1 and image_size a positive multiple of "
                          "patch_size, got in_channels = ",
                          k.in_channels, ", image_size = ", k.image_size,
                          ", patch_size = ", k.patch_size);
    require<config_error>(k.hidden >= 1 && k.heads >= 1 && k.hidden % k.heads == 0, who,
                          ": hidden must be a positive multiple of heads, got hidden = ", k.hidden,
                          ", heads = ", k.heads);
    require<config_error>(
        k.learned_pos_embed || k.hidden % 4 == 0, who,
        ": the 2-D sin-cos position embedding needs hidden % 4 == 0, got hidden = ", k.hidden,
        " (or set learned_pos_embed)");
    require<config_error>(
        k.depth >= 1 && k.num_classes >= 0 && k.frequency_dim >= 2 && k.mlp_ratio > 0 &&
            static_cast<index_t>(static_cast<double>(k.hidden) * k.mlp_ratio) >= 1,
        who,
        ": need depth >= 1, num_classes >= 0, frequency_dim >= 2 and int(hidden * mlp_ratio) >= 1, "
        "got depth = ",
        k.depth, ", num_classes = ", k.num_classes, ", frequency_dim = ", k.frequency_dim,
        ", mlp_ratio = ", k.mlp_ratio);
    return k;
  }

  static std::vector<Embedding<T>> make_label_table(Parameters<T>& ps, const DiTConfig& k,
                                                    const std::string& prefix) {
    std::vector<Embedding<T>> e;
    if (k.num_classes > 0)
      e.emplace_back(ps, prefix + "y_embedder.embedding_table", k.num_classes, k.hidden);
    return e;
  }
  static std::vector<Block> make_blocks(Parameters<T>& ps, const DiTConfig& k,
                                        const std::string& prefix) {
    std::vector<Block> b;
    b.reserve(static_cast<std::size_t>(k.depth));
    for (index_t i = 0; i < k.depth; ++i)
      b.emplace_back(ps, prefix + "blocks." + std::to_string(i), k.hidden, k.heads, k.mlp_ratio);
    return b;
  }

  // h: [N, L, D] += pos (learned parameter or the fixed table), broadcast over N.
  void add_pos(const Parameters<T>& ps, View<T> h) const {
    const T* pos = pos_id_ >= 0 ? ps.param(pos_id_).data() : pos_table_.data();
    T* ph = h.data();
    const index_t ld = tokens() * hidden();
    Cpu::parallel_for(
        h.dim(0),
        [=](index_t i) {
          for (index_t j = 0; j < ld; ++j) ph[i * ld + j] += pos[j];
        },
        ld);
  }

  template <class U>
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T> x, View<const T> t, View<const label_t> y, View<T> out) const {
    const index_t s = cfg_.image_size;
    if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) != cfg_.in_channels || x.dim(2) != s ||
        x.dim(3) != s)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.in_channels, ", ", s, ", ", s,
                        "] with N >= 1, got ", x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", View<const T>(out), x.shape());
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
    const index_t n = s[0], L = tokens(), D = hidden();
    const index_t E = cfg_.patch_size * cfg_.patch_size * cfg_.in_channels;
    const Shape tok{n, L, D};
    c.x.resize(s);
    c.labels.resize(Shape{n});
    c.tf.resize(Shape{n, cfg_.frequency_dim});
    for (Tensor<T>* e : {&c.th, &c.ts, &c.c, &c.dc, &c.dtmp, &c.dth}) e->resize(Shape{n, D});
    for (Tensor<T>* e : {&c.h0, &c.fxn, &c.fm, &c.dfm, &c.dfxn, &c.g0, &c.g1}) e->resize(tok);
    for (Tensor<T>* e : {&c.fo, &c.dfo}) e->resize(Shape{n, L, E});
    c.hb.resize(blocks_.size());
    for (auto& e : c.hb) e.resize(tok);
    c.bc.resize(blocks_.size());
    c.in_shape = s;
    c.owner = this;
  }

  template <class U>
  static bool absent(View<U> v) {
    return v.data() == nullptr || v.empty();
  }

  DiTConfig cfg_;
  std::string prefix_;
  SinusoidalTimeEmbedding<T> tfreq_;
  PatchEmbed<T> x_emb_;
  Linear<T> t_mlp0_, t_mlp2_;
  std::vector<Embedding<T>> y_emb_;  // one when conditional
  std::vector<Block> blocks_;
  LayerNorm<T> fnorm_;
  Final fada_;
  Linear<T> flin_;
  index_t pos_id_ = -1;  // the learned "pos_embed" [1, L, D], or -1
  Tensor<T> pos_table_;  // the fixed sin-cos table [L, D]
};

}  // namespace flowdiff::nn
