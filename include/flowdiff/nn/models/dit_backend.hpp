// flowdiff/nn/models/dit_backend.hpp — nn::DiT's vector field u_theta(x, t[, y]) on any backend B
// (nn/models/dit.hpp has the maths and the reference layout): with patch size p, L = (S/p)^2
// tokens of width D,
//   h_0 = PatchEmbed(x) + pos;   c = t_mlp(freq(1000 t)) [+ y_table[y]]
//   block (adaLN-Zero): [sh1, sc1, g1, sh2, sc2, g2] = Linear(SiLU(c)),
//         h' = h + g1 Attn(LN(h) (1 + sc1) + sh1);   h = h' + g2 MLP(LN(h') (1 + sc2) + sh2)
//   final: [sh, sc] = Linear(SiLU(c));  u = unpatchify(Linear(LN(h) (1 + sc) + sh))
// and its backward (every parameter gradient accumulated, dx overwritten). The layers are the
// backend-generic ones of nn/layers/token_kernels.hpp (BackendLinear with the GELU fused,
// LayerNorm statistics and the modulation fused into one pass, the gates, patches and
// BackendMultiheadSelfAttention on strided-batched products) and the dense functors of
// nn/layers/kernels.hpp (the sinusoidal time features of MlpInput, SiLU, the label-embedding
// gradient), so this header has no CUDA in it. The six (two) adaLN chunks are read in place in
// the modulation Linear's [N, 6D] output and their gradients written in place into its gradient,
// with no split or gather copies. As nn::DiTBlock, a block keeps its attention output, x + g1
// attn, fc1's pre-activation and fc2's output, and backward recomputes the modulated LayerNorm
// outputs (from the stored statistics) and the GELU. Parameters are registered under nn::DiT's
// names, shapes and order, so the flat buffers have the same layout: nn::upload_parameters moves a
// CPU model or checkpoint onto B (initialise nn::DiT on the host: there is no init() here).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/layers/token_kernels.hpp"
#include "flowdiff/nn/models/dit.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

/// c[n, :] += W[y_n, :] (one thread per element of c).
template <class T>
struct AddEmbeddingRows {
  T* c;              // [N, d]
  const T* w;        // [K + 1, d]
  const label_t* y;  // [N]
  index_t d;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    c[q] = add_rn(c[q], w[static_cast<index_t>(y[q / d]) * d + q % d]);
  }
};

}  // namespace kernels

namespace dit_backend_detail {

using token_detail::resize_if;

/// The adaLN modulation SiLU -> Linear(D, K D) ("<prefix>.adaLN_modulation.1"); chunk k of
/// sample n is mod[n, k D .. k D + D) (torch.chunk(K, dim=1)'s order).
template <class T, Backend B, int K>
struct AdaLN {
  BackendLinear<T, B> lin;
  AdaLN(Parameters<T, B>& ps, const std::string& prefix, index_t d)
      : lin(ps, prefix + ".adaLN_modulation.1", d, K * d) {}
  struct Cache {
    Tensor<T, B> sc;         // SiLU(c) [N, D]
    Tensor<T, B> mod, dmod;  // the Linear's output [N, K D] and its gradient
    Tensor<T, B> dsc;        // [N, D]
  };
  // c: [N, D]
  void forward(typename BackendOps<B>::Context& ctx, const Parameters<T, B>& ps, View<const T, B> c,
               Cache& k) const {
    const index_t n = c.dim(0), d = lin.in_features();
    resize_if(k.sc, Shape{n, d});
    resize_if(k.dsc, Shape{n, d});
    resize_if(k.mod, Shape{n, K * d});
    resize_if(k.dmod, Shape{n, K * d});
    B::parallel_for(c.numel(), kernels::SiluOut<T>{k.sc.data(), c.data()}, 8);
    lin.forward(ctx, ps, k.sc.view(), k.mod.view());
  }
  const T* chunk(const Cache& k, int i) const { return k.mod.data() + i * lin.in_features(); }
  T* dchunk(Cache& k, int i) const { return k.dmod.data() + i * lin.in_features(); }
  // k.dmod (filled by the caller through dchunk) -> dc: [N, D] (overwritten)
  void backward(typename BackendOps<B>::Context& ctx, Parameters<T, B>& ps, View<const T, B> c,
                View<T, B> dc, Cache& k) const {
    lin.backward(ctx, ps, k.sc.view(), k.dmod.view(), k.dsc.view());
    B::parallel_for(c.numel(), kernels::SiluGradOut<T>{dc.data(), c.data(), k.dsc.data()}, 8);
  }
};

/// nn::DiTBlock on B, registered under `prefix` exactly as nn::DiTBlock (attn.{qkv,proj},
/// mlp.{fc1,fc2}, adaLN_modulation.1; the two LayerNorms have no parameters).
template <class T, Backend B>
struct Block {
  using Context = typename BackendOps<B>::Context;
  using Attn = BackendMultiheadSelfAttention<T, B>;

  BackendLayerNorm<T, B> norm1;
  Attn attn;
  BackendLayerNorm<T, B> norm2;
  BackendLinear<T, B> fc1, fc2;
  AdaLN<T, B, 6> ada;

  Block(Parameters<T, B>& ps, const std::string& prefix, index_t d, index_t heads, index_t dm)
      : norm1(ps, prefix + ".norm1", d, T(1e-6), false),
        attn(ps, prefix + ".attn", d, heads),
        norm2(ps, prefix + ".norm2", d, T(1e-6), false),
        fc1(ps, prefix + ".mlp.fc1", d, dm),
        fc2(ps, prefix + ".mlp.fc2", dm, d),
        ada(ps, prefix, d) {}

  /// Temporaries shared by every block of a model.
  struct Scratch {
    Tensor<T, B> m, xn, dm, dxn, dh, dmid;  // [N, L, D]
    Tensor<T, B> big, dbig;                 // [N, L, mlp hidden]
    typename Attn::Scratch at;
  };

  struct Cache {
    typename AdaLN<T, B, 6>::Cache ada;
    typename BackendLayerNorm<T, B>::Cache n1, n2;
    typename Attn::Cache at;
    Tensor<T, B> a, xmid, h2;  // attention out, x + g1 a, fc2 out: [N, L, D]
    Tensor<T, B> h1;           // fc1's pre-activation [N, L, mlp hidden]
  };

  void prepare(Cache& k, Scratch& s, const Shape& sh) const {
    const Shape sb{sh[0], sh[1], fc1.out_features()};
    for (Tensor<T, B>* t : {&k.a, &k.xmid, &k.h2, &s.m, &s.xn, &s.dm, &s.dxn, &s.dh, &s.dmid})
      resize_if(*t, sh);
    for (Tensor<T, B>* t : {&k.h1, &s.big, &s.dbig}) resize_if(*t, sb);
  }

  // x: [N, L, D], c: [N, D] -> out: [N, L, D] (not aliasing x)
  void forward(Context& ctx, const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> c,
               View<T, B> out, Cache& k, Scratch& s) const {
    const index_t L = x.dim(1), d = x.dim(2), ld = 6 * d;
    prepare(k, s, x.shape());
    ada.forward(ctx, ps, c, k.ada);
    // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    norm1.forward_modulated(ps, x, ada.chunk(k.ada, 1), ada.chunk(k.ada, 0), ld, s.m.view(),
                            View<T, B>{}, k.n1);
    attn.forward(ctx, ps, s.m.view(), k.a.view(), k.at);
    B::parallel_for(x.numel(), kernels::GatedAdd<T>{k.xmid.data(), x.data(), ada.chunk(k.ada, 2),
                                                    k.a.data(), d, L, ld});
    norm2.forward_modulated(ps, k.xmid.view(), ada.chunk(k.ada, 4), ada.chunk(k.ada, 3), ld,
                            s.m.view(), View<T, B>{}, k.n2);
    fc1.forward_gelu(ctx, ps, s.m.view(), k.h1.view(), s.big.view());
    fc2.forward(ctx, ps, s.big.view(), k.h2.view());
    B::parallel_for(x.numel(), kernels::GatedAdd<T>{out.data(), k.xmid.data(), ada.chunk(k.ada, 5),
                                                    k.h2.data(), d, L, ld});
  }

  // x, c: the forward's inputs; dout: [N, L, D]; dx: [N, L, D] and dc: [N, D], overwritten.
  // Parameter gradients accumulate.
  void backward(Context& ctx, Parameters<T, B>& ps, View<const T, B> x, View<const T, B> c,
                View<const T, B> dout, View<T, B> dx, View<T, B> dc, Cache& k, Scratch& s) const {
    const index_t n = x.dim(0), L = x.dim(1), d = x.dim(2), ld = 6 * d, cnt = x.numel();
    const auto sums = [&](T* sx, T* s1, const T* dy, const T* v) {
      B::parallel_for(n * d, kernels::TokenSums<T>{sx, s1, dy, v, d, L, ld}, 2 * L);
    };
    const auto scale = [&](T* dst, const T* dy, const T* by, bool one_plus) {
      B::parallel_for(cnt, kernels::ScaleTokens<T>{dst, dy, by, d, L, ld, one_plus});
    };
    // MLP branch: out = xmid + g2 h2, h2 = fc2(GELU(h1)), h1 = fc1(m2).
    sums(ada.dchunk(k.ada, 5), nullptr, dout.data(), k.h2.data());
    scale(s.dh.data(), dout.data(), ada.chunk(k.ada, 5), false);
    B::parallel_for(k.h1.numel(), kernels::GeluTanhOut<T>{s.big.data(), k.h1.data()}, 16);
    fc2.backward_through_gelu(ctx, ps, s.big.view(), s.dh.view(), k.h1.view(), s.dbig.view());
    norm2.forward_modulated(ps, k.xmid.view(), ada.chunk(k.ada, 4), ada.chunk(k.ada, 3), ld,
                            s.m.view(), s.xn.view(), k.n2, false);  // recomputed xn2, m2
    fc1.backward(ctx, ps, s.m.view(), s.dbig.view(), s.dm.view());
    sums(ada.dchunk(k.ada, 4), ada.dchunk(k.ada, 3), s.dm.data(), s.xn.data());
    scale(s.dxn.data(), s.dm.data(), ada.chunk(k.ada, 4), true);
    norm2.backward(ps, k.xmid.view(), s.dxn.view(), s.dh.view(), k.n2);
    B::parallel_for(cnt, kernels::AddOut<T>{s.dmid.data(), dout.data(), s.dh.data()});
    // Attention branch: xmid = x + g1 a, a = Attn(m1).
    sums(ada.dchunk(k.ada, 2), nullptr, s.dmid.data(), k.a.data());
    scale(s.dh.data(), s.dmid.data(), ada.chunk(k.ada, 2), false);
    norm1.forward_modulated(ps, x, ada.chunk(k.ada, 1), ada.chunk(k.ada, 0), ld, s.m.view(),
                            s.xn.view(), k.n1, false);  // recomputed xn1, m1
    attn.backward(ctx, ps, s.m.view(), s.dh.view(), s.dm.view(), k.at, s.at);
    sums(ada.dchunk(k.ada, 1), ada.dchunk(k.ada, 0), s.dm.data(), s.xn.data());
    scale(s.dxn.data(), s.dm.data(), ada.chunk(k.ada, 1), true);
    norm1.backward(ps, x, s.dxn.view(), dx, k.n1);
    add_in_place<T, B>(dx, View<const T, B>(s.dmid.view()));
    ada.backward(ctx, ps, c, dc, k.ada);
  }
};

}  // namespace dit_backend_detail

/// nn::DiT on backend B (same DiTConfig, parameter names, shapes and order): forward, backward,
/// the null label; a train::BackendTrainable model and an nn::FieldModel for as_field.
template <class T, Backend B>
class BackendDiT {
  using Block = dit_backend_detail::Block<T, B>;
  using Final = dit_backend_detail::AdaLN<T, B, 2>;
  using Context = typename BackendOps<B>::Context;

 public:
  using value_type = T;
  using backend = B;

  /// Every activation of the forward pass, the gradient buffers and the gemm context, on B;
  /// sized on the first call and whenever the input shape changes, reused while it repeats.
  struct Cache {
    Shape in_shape;
    bool has_forward = false;
    std::optional<Context> ctx;
    Tensor<label_t, B> labels;                     // [N]
    Tensor<T, B> tf;                               // time features [N, frequency_dim]
    Tensor<T, B> th, ts, c, dc, dtmp, dth;         // [N, D]: mlp.0 out, SiLU, c; gradients
    Tensor<T, B> x;                                // the input [N, C, S, S]
    typename BackendPatchEmbed<T, B>::Cache pe;    // the patches of x
    Tensor<T, B> h0;                               // tokens + pos [N, L, D]
    std::vector<Tensor<T, B>> hb;                  // block outputs [N, L, D]
    std::vector<typename Block::Cache> bc;         // per block
    typename Block::Scratch scratch;               // shared by the blocks
    typename Final::Cache fada;                    // final adaLN
    typename BackendLayerNorm<T, B>::Cache fnorm;  // final LayerNorm
    Tensor<T, B> fxn, fm, dfm, dfxn;               // final LN, its modulation; gradients
    Tensor<T, B> fo, dfo;                          // final Linear output [N, L, p p C], gradient
    Tensor<T, B> g0, g1;                           // token gradients [N, L, D] (ping-pong)

    Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };

  /// Registers the parameters in ps (not yet allocated) exactly as nn::DiT does.
  BackendDiT(Parameters<T, B>& ps, const DiTConfig& config, const std::string& prefix = "")
      : cfg_(valid(config, prefix)),
        prefix_(prefix),
        x_emb_(ps, prefix + "x_embedder", config.in_channels, config.hidden, config.patch_size),
        t_mlp0_(ps, prefix + "t_embedder.mlp.0", config.frequency_dim, config.hidden),
        t_mlp2_(ps, prefix + "t_embedder.mlp.2", config.hidden, config.hidden),
        y_emb_(config.num_classes > 0 ? ps.add(prefix + "y_embedder.embedding_table.weight",
                                               Shape{config.num_classes + 1, config.hidden})
                                      : -1),
        blocks_(make_blocks(ps, config, prefix)),
        fnorm_(ps, prefix + "final_layer.norm_final", config.hidden, T(1e-6), false),
        fada_(ps, prefix + "final_layer", config.hidden),
        flin_(ps, prefix + "final_layer.linear", config.hidden,
              config.patch_size * config.patch_size * config.in_channels) {
    const index_t L = tokens(), D = hidden();
    if (cfg_.learned_pos_embed) pos_id_ = ps.add(prefix + "pos_embed", Shape{1, L, D});
    // The fixed sin-cos table and SinusoidalTimeEmbedding's frequencies, computed on the host as
    // nn::DiT does and copied to B.
    Tensor<T> table(Shape{L, D});
    fill(table.view(), T(0));
    if (D % 4 == 0) dit_detail::sincos_pos_embed(table.view(), grid());
    pos_table_ = Tensor<T, B>(Shape{L, D});
    BackendOps<B>::template upload<T>(pos_table_.view(), View<const T>(table.view()));
    freqs_ = detail::time_frequencies<B>(cfg_.frequency_dim, max_period);
  }

  const DiTConfig& config() const { return cfg_; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }
  index_t hidden() const { return cfg_.hidden; }
  index_t grid() const { return cfg_.image_size / cfg_.patch_size; }
  /// L, the number of tokens.
  index_t tokens() const { return grid() * grid(); }
  index_t depth() const { return static_cast<index_t>(blocks_.size()); }

  // x: [N, C, S, S], t: [N], y: [N] or empty / {} (a conditional model then uses the null label),
  // out: like x; all on B. Labels are checked to lie in [0, num_classes] by one B::reduce_sum (the
  // embedding gather cannot throw, and on a device an out-of-range label would read outside the
  // table). Fills `c` for backward.
  void forward(const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> t,
               View<const label_t, B> y, View<T, B> out, Cache& c) const {
    check_forward(x, t, y, out);
    prepare(c, x.shape());
    Context& ctx = c.context();
    const index_t n = x.dim(0), L = tokens(), D = hidden(), F = cfg_.frequency_dim;
    const index_t p = cfg_.patch_size;
    // Conditioning c = t_mlp(freq(t)) [+ y_table[y]].
    B::parallel_for(n * F, kernels::MlpInput<T>{c.tf.data(), nullptr, t.data(), freqs_.data(),
                                                nullptr, nullptr, 0, F, cfg_.time_scale});
    t_mlp0_.forward(ctx, ps, c.tf.view(), c.th.view());
    B::parallel_for(n * D, kernels::SiluOut<T>{c.ts.data(), c.th.data()}, 8);
    t_mlp2_.forward(ctx, ps, c.ts.view(), c.c.view());
    if (conditional()) {
      if (absent(y))
        fill(c.labels.view(), null_label());
      else
        copy(c.labels.view(), y);
      B::parallel_for(n * D, kernels::AddEmbeddingRows<T>{c.c.data(), ps.param(y_emb_).data(),
                                                          c.labels.data(), D});
    }
    // Tokens: the patch embedding (a Conv2d with kernel = stride = p) as one product.
    copy(c.x.view(), x);
    x_emb_.forward(ctx, ps, x, c.h0.view(), c.pe);
    const T* pos = pos_id_ >= 0 ? ps.param(pos_id_).data() : pos_table_.data();
    B::parallel_for(n * L * D, kernels::BiasAdd<T>{c.h0.data(), pos, L * D});
    View<const T, B> h = c.h0.view();
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      blocks_[i].forward(ctx, ps, h, c.c.view(), c.hb[i].view(), c.bc[i], c.scratch);
      h = c.hb[i].view();
    }
    // Final layer and unpatchify.
    fada_.forward(ctx, ps, c.c.view(), c.fada);
    fnorm_.forward_modulated(ps, h, fada_.chunk(c.fada, 1), fada_.chunk(c.fada, 0), 2 * D,
                             c.fm.view(), c.fxn.view(), c.fnorm);
    flin_.forward(ctx, ps, c.fm.view(), c.fo.view());
    backend_unpatchify<T, B>(c.fo.view(), p, out, PatchLayout::channel_last);
    c.has_forward = true;
  }

  // dout: like the last forward's x; dx: like x, or empty / {} (skipped), on B. Parameter
  // gradients accumulate (+=); dx is overwritten. There is no gradient w.r.t. t.
  void backward(Parameters<T, B>& ps, View<const T, B> dout, View<T, B> dx, Cache& c) const {
    require<config_error>(c.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    check_shape("dout", dout, c.in_shape);
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    Context& ctx = c.context();
    const index_t n = c.in_shape[0], L = tokens(), D = hidden(), p = cfg_.patch_size;
    // Final layer.
    backend_patchify<T, B>(dout, p, c.dfo.view(), PatchLayout::channel_last);
    const View<const T, B> hl = c.hb.back().view();
    flin_.backward(ctx, ps, c.fm.view(), c.dfo.view(), c.dfm.view());
    B::parallel_for(n * D,
                    kernels::TokenSums<T>{fada_.dchunk(c.fada, 1), fada_.dchunk(c.fada, 0),
                                          c.dfm.data(), c.fxn.data(), D, L, 2 * D},
                    2 * L);
    B::parallel_for(n * L * D, kernels::ScaleTokens<T>{c.dfxn.data(), c.dfm.data(),
                                                       fada_.chunk(c.fada, 1), D, L, 2 * D, true});
    Tensor<T, B>* g = &c.g0;
    Tensor<T, B>* gnext = &c.g1;
    fnorm_.backward(ps, hl, c.dfxn.view(), g->view(), c.fnorm);
    fada_.backward(ctx, ps, c.c.view(), c.dc.view(), c.fada);
    // Blocks, last to first; every block's dc adds into c.dc.
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      const View<const T, B> in = i == 0 ? c.h0.view() : c.hb[i - 1].view();
      blocks_[i].backward(ctx, ps, in, c.c.view(), g->view(), gnext->view(), c.dtmp.view(), c.bc[i],
                          c.scratch);
      add_in_place<T, B>(c.dc.view(), View<const T, B>(c.dtmp.view()));
      std::swap(g, gnext);
    }
    // g holds the gradient of h0 = PatchEmbed(x) + pos.
    if (pos_id_ >= 0)
      B::parallel_for(L * D, kernels::BiasGrad<T>{ps.grad(pos_id_).data(), g->data(), n, L * D}, n);
    x_emb_.backward(ctx, ps, c.x.view(), g->view(), dx, c.pe);
    // Conditioning.
    if (conditional())
      B::parallel_for((cfg_.num_classes + 1) * D,
                      kernels::LabelEmbeddingGrad<T>{ps.grad(y_emb_).data(), c.dc.data(),
                                                     c.labels.data(), n, 0, D},
                      n);
    t_mlp2_.backward(ctx, ps, c.ts.view(), c.dc.view(), c.dth.view());
    B::parallel_for(n * D, kernels::SiluBackwardInPlace<T>{c.th.data(), c.dth.data()}, 8);
    t_mlp0_.backward(ctx, ps, c.tf.view(), c.dth.view(), View<T, B>{});
  }

 private:
  static constexpr double max_period = 10000.0;  // SinusoidalTimeEmbedding's default, as nn::DiT

  std::string name() const {
    return prefix_.empty() ? std::string("BackendDiT") : prefix_ + " (BackendDiT)";
  }

  // nn::DiT's checks, before any layer registers (so errors name the model).
  static const DiTConfig& valid(const DiTConfig& k, const std::string& prefix) {
    const std::string who = prefix.empty() ? std::string("BackendDiT") : prefix + " (BackendDiT)";
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

  static std::vector<Block> make_blocks(Parameters<T, B>& ps, const DiTConfig& k,
                                        const std::string& prefix) {
    const auto dm = static_cast<index_t>(static_cast<double>(k.hidden) * k.mlp_ratio);
    std::vector<Block> b;
    b.reserve(static_cast<std::size_t>(k.depth));
    for (index_t i = 0; i < k.depth; ++i)
      b.emplace_back(ps, prefix + "blocks." + std::to_string(i), k.hidden, k.heads, dm);
    return b;
  }

  template <class U>
  void check_shape(const char* arg, View<U, B> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  void check_forward(View<const T, B> x, View<const T, B> t, View<const label_t, B> y,
                     View<T, B> out) const {
    const index_t s = cfg_.image_size;
    if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) != cfg_.in_channels || x.dim(2) != s ||
        x.dim(3) != s)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.in_channels, ", ", s, ", ", s,
                        "] with N >= 1, got ", x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", out, x.shape());
    if (!absent(y)) detail::check_backend_labels<B>(name(), y, n, cfg_.num_classes);
  }

  void prepare(Cache& c, const Shape& s) const {
    using dit_backend_detail::resize_if;
    c.has_forward = false;
    if (c.in_shape == s && c.bc.size() == blocks_.size()) return;
    const index_t n = s[0], L = tokens(), D = hidden();
    const index_t E = cfg_.patch_size * cfg_.patch_size * cfg_.in_channels;
    const Shape tok{n, L, D};
    resize_if(c.labels, Shape{n});
    resize_if(c.x, s);
    resize_if(c.tf, Shape{n, cfg_.frequency_dim});
    for (Tensor<T, B>* e : {&c.th, &c.ts, &c.c, &c.dc, &c.dtmp, &c.dth}) resize_if(*e, Shape{n, D});
    for (Tensor<T, B>* e : {&c.h0, &c.fxn, &c.fm, &c.dfm, &c.dfxn, &c.g0, &c.g1})
      resize_if(*e, tok);
    for (Tensor<T, B>* e : {&c.fo, &c.dfo}) resize_if(*e, Shape{n, L, E});
    c.hb.resize(blocks_.size());
    for (auto& e : c.hb) resize_if(e, tok);
    c.bc.resize(blocks_.size());
    c.in_shape = s;
  }

  template <class U>
  static bool absent(View<U, B> v) {
    return v.data() == nullptr || v.empty();
  }

  DiTConfig cfg_;
  std::string prefix_;
  BackendPatchEmbed<T, B> x_emb_;
  BackendLinear<T, B> t_mlp0_, t_mlp2_;
  index_t y_emb_ = -1;  // "y_embedder.embedding_table.weight" [K + 1, D] when conditional
  std::vector<Block> blocks_;
  BackendLayerNorm<T, B> fnorm_;
  Final fada_;
  BackendLinear<T, B> flin_;
  index_t pos_id_ = -1;      // the learned "pos_embed" [1, L, D], or -1
  Tensor<T, B> pos_table_;   // the fixed sin-cos table [L, D]
  Tensor<double, B> freqs_;  // [frequency_dim / 2]
};

}  // namespace flowdiff::nn
