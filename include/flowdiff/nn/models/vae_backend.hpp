// flowdiff/nn/models/vae_backend.hpp — nn::VAE, the convolutional variational autoencoder of
// latent flow matching, on any backend B (nn/models/vae.hpp has the maths):
//   encoder  h = Conv3x3(x);  K x { h = Conv3x3/2(SiLU(GN(h))) };
//            [mu | logvar] = Conv3x3(SiLU(GN(h)))
//   sample   z = mu + exp(logvar / 2) eps,  eps ~ N(0, I) (fill_normal on B: the CPU's counters)
//   decoder  h = Conv3x3(z);  K x { h = Conv3x3(Up2(SiLU(GN(h)))) };  x^ = Conv3x3(SiLU(GN(h)))
//   loss     L = recon + beta kl,  recon = (1/N) sum (x^ - x)^2,
//            kl = (1/N) sum 1/2 (mu^2 + exp(logvar) - 1 - logvar)
//   backward dx^ = 2 (x^ - x) / N;  dmu = dz + beta mu / N;
//            dlogvar = dz eps exp(logvar / 2) / 2 + beta (exp(logvar) - 1) / (2N);
//            dx = the encoder's input gradient - dx^ (x is also the reconstruction target)
// with every tensor (input, activations, noise, gradients) on B. The layers are the
// backend-generic ones of nn/layers/spatial_kernels.hpp (BackendConv2d with stride 2 for the
// downsampling, BackendGroupNorm with the SiLU fused (its output not kept: the y-less
// backward_silu recomputes it), BackendUpsampleNearest2d); the posterior
// split, the reparameterisation and the loss's element-wise gradients are the named functors
// below, in the CPU VAE's order of operations with explicitly rounded arithmetic (no FMA
// contraction on the device); the two loss sums are B's deterministic reductions in double (one
// synchronisation each: the values go to the host). So this header has no CUDA in it: include
// backend/cuda/dispatch.cuh (nvcc) for B = Cuda. Parameters are registered under nn::VAE's names,
// shapes and order, so the flat buffers have the same layout and nn::upload_parameters moves a
// CPU model or checkpoint onto B (and download_parameters back). forward() draws eps with
// fill_normal on B from the caller's generator, one stream per call as nn::VAE does: with
// B = Cpu the noise is nn::VAE's bit for bit; on a GPU its normals are within a few ulp of the
// CPU's (docs/cuda.md, "Random numbers"). Training: train/vae_backend.hpp.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/models/vae.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace kernels {

/// [mu | logvar] = mom split along channels as torch.chunk(2, dim=1): mu[n, j] = mom[n, j],
/// logvar[n, j] = mom[n, r + j] for j < r = z h w. One thread per element of mu.
template <class T>
struct SplitChannelHalves {
  T* a;          // [N, r]
  T* b;          // [N, r]
  const T* src;  // [N, 2 r]
  index_t r;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t n = q / r, j = q % r;
    a[q] = src[2 * n * r + j];
    b[q] = src[2 * n * r + r + j];
  }
};

/// The adjoint of SplitChannelHalves: dst[n, :] = [a[n, :], b[n, :]]. One thread per element of
/// dst.
template <class T>
struct ConcatChannelHalves {
  T* dst;      // [N, 2 r]
  const T* a;  // [N, r]
  const T* b;  // [N, r]
  index_t r;
  FLOWDIFF_HOST_DEVICE void operator()(index_t q) const {
    const index_t n = q / (2 * r), j = q % (2 * r);
    dst[q] = j < r ? a[n * r + j] : b[n * r + j - r];
  }
};

/// z = mu + exp(logvar / 2) eps (z may alias mu), as VAE::reparameterize.
template <class T>
struct Reparameterize {
  T* z;
  const T* mu;
  const T* logvar;
  const T* eps;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    using std::exp;
    z[i] = add_rn(mu[i], mul_rn(exp(mul_rn(T(0.5), logvar[i])), eps[i]));
  }
};

/// (a - b)^2 in double: one term of the reconstruction error.
template <class T>
struct SquaredDifference {
  const T* a;
  const T* b;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    return d * d;
  }
};

/// 1/2 (mu^2 + exp(logvar) - 1 - logvar) in double: one term of gaussian_kl.
template <class T>
struct GaussianKlTerm {
  const T* mu;
  const T* logvar;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    using std::exp;
    const double m = static_cast<double>(mu[i]), lv = static_cast<double>(logvar[i]);
    return 0.5 * (m * m + exp(lv) - 1.0 - lv);
  }
};

/// dxhat = c (xhat - x) with c = 2 scale / N: the reconstruction term's gradient.
template <class T>
struct ReconstructionGrad {
  T* dxhat;
  const T* xhat;
  const T* x;
  T c;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    dxhat[i] = mul_rn(c, add_rn(xhat[i], -x[i]));
  }
};

/// The posterior's gradient from the KL term (weight s = beta scale / N) and the decoder's dz,
/// in nn::VAE::backward's order: dmu = s mu + dz,
/// dlogvar = s / 2 (exp(logvar) - 1) + dz eps / 2 exp(logvar / 2).
template <class T>
struct PosteriorGrad {
  T* dmu;
  T* dlogvar;
  const T* mu;
  const T* logvar;
  const T* eps;
  const T* dz;
  T s;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    using std::exp;
    const T lv = logvar[i];
    dmu[i] = add_rn(mul_rn(s, mu[i]), dz[i]);
    const T kl = mul_rn(mul_rn(s, T(0.5)), add_rn(exp(lv), T(-1)));
    const T rp = mul_rn(mul_rn(mul_rn(dz[i], eps[i]), T(0.5)), exp(mul_rn(T(0.5), lv)));
    dlogvar[i] = add_rn(kl, rp);
  }
};

/// a[i] -= b[i].
template <class T>
struct SubtractInPlace {
  T* a;
  const T* b;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const { a[i] = add_rn(a[i], -b[i]); }
};

}  // namespace kernels

template <class T, Backend B>
class BackendVAE {
  using Context = typename BackendOps<B>::Context;
  using Conv = BackendConv2d<T, B>;
  using Norm = BackendGroupNorm<T, B>;

 public:
  using value_type = T;
  using backend = B;

  /// Encoder activations, gradient buffers and a gemm context (a cuBLAS handle on the GPU, made
  /// on first use), on B; sized per input shape and reused while it repeats.
  struct EncoderCache {
    Shape in_shape;
    std::optional<Context> ctx;
    Tensor<T, B> x;                     // the input
    Tensor<T, B> a0, da0;               // conv_in out [N, base, S, S]
    std::vector<Tensor<T, B>> s, d;  // per level: SiLU(GN) out, conv out (GN out not kept)
    std::vector<Tensor<T, B>> ds, dd;   // gradients of s and d
    Tensor<T, B> so, dso;               // SiLU(GN_out) and its gradient
    Tensor<T, B> mom, dmom;             // [mu | logvar] and its gradient
    typename Conv::Cache cin, cout;
    std::vector<typename Conv::Cache> cd;
    std::vector<typename Norm::Cache> gn;
    typename Norm::Cache gno;

    Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };
  /// Decoder activations, gradient buffers and a gemm context, on B; sized per latent shape.
  struct DecoderCache {
    Shape in_shape;
    std::optional<Context> ctx;
    Tensor<T, B> z;                        // the input latent
    Tensor<T, B> b0, db0;                  // conv_in out [N, c_K, h, w]
    std::vector<Tensor<T, B>> s, u, c;  // per level: SiLU(GN), upsampled, conv out
    std::vector<Tensor<T, B>> ds, du, dc;  // gradients
    Tensor<T, B> so, dso;                  // SiLU(GN_out) and its gradient
    typename Conv::Cache cin, cout;
    std::vector<typename Conv::Cache> cu;
    std::vector<typename Norm::Cache> gn;
    typename Norm::Cache gno;

    Context& context() {
      if (!ctx) ctx.emplace();
      return *ctx;
    }
  };
  /// Everything forward() / backward() of the whole autoencoder keep, on B (two gemm contexts:
  /// one in each half, which also run on their own).
  struct Cache {
    EncoderCache enc;
    DecoderCache dec;
    Tensor<T, B> mu, logvar, eps, z, xhat;  // [N, z, h, w] x 4, [N, C, S, S]
    Tensor<T, B> dmu, dlogvar, dz, dxhat;   // their gradients
    bool has_forward = false;
  };

  /// Registers the parameters in ps (not yet allocated) exactly as nn::VAE does.
  BackendVAE(Parameters<T, B>& ps, const VAEConfig& config, const std::string& prefix = "")
      : cfg_(config), prefix_(prefix), up_(2, prefix + "decoder.up") {
    validate();
    const auto& ch = cfg_.channels;
    const index_t K = levels(), g = cfg_.groups, b = cfg_.base_channels;
    const std::string e = prefix + "encoder.", d = prefix + "decoder.";
    enc_in_.emplace_back(ps, e + "conv_in", cfg_.in_channels, b, 3, 1, 1);
    for (index_t i = 0; i < K; ++i) {
      const index_t cin = i == 0 ? b : ch[static_cast<std::size_t>(i - 1)];
      const std::string p = e + "down." + std::to_string(i);
      enc_norm_.emplace_back(ps, p + ".norm", g, cin);
      enc_down_.emplace_back(ps, p + ".conv", cin, ch[static_cast<std::size_t>(i)], 3, 2, 1);
    }
    enc_norm_out_.emplace_back(ps, e + "norm_out", g, ch.back());
    enc_out_.emplace_back(ps, e + "conv_out", ch.back(), 2 * cfg_.latent_channels, 3, 1, 1);
    dec_in_.emplace_back(ps, d + "conv_in", cfg_.latent_channels, ch.back(), 3, 1, 1);
    for (index_t j = 0; j < K; ++j) {
      const index_t cin = ch[static_cast<std::size_t>(K - 1 - j)];
      const index_t cout = K - 2 - j >= 0 ? ch[static_cast<std::size_t>(K - 2 - j)] : b;
      const std::string p = d + "up." + std::to_string(j);
      dec_norm_.emplace_back(ps, p + ".norm", g, cin);
      dec_up_.emplace_back(ps, p + ".conv", cin, cout, 3, 1, 1);
    }
    dec_norm_out_.emplace_back(ps, d + "norm_out", g, b);
    dec_out_.emplace_back(ps, d + "conv_out", b, cfg_.in_channels, 3, 1, 1);
  }

  const VAEConfig& config() const { return cfg_; }
  index_t levels() const { return static_cast<index_t>(cfg_.channels.size()); }
  index_t latent_size() const { return cfg_.image_size >> levels(); }
  /// [N, latent_channels, S / 2^K, S / 2^K]
  Shape latent_shape(index_t n) const {
    return Shape{n, cfg_.latent_channels, latent_size(), latent_size()};
  }
  Shape image_shape(index_t n) const {
    return Shape{n, cfg_.in_channels, cfg_.image_size, cfg_.image_size};
  }

  /// nn::VAE::init's draws on B, in its order (Conv2d U(±1/sqrt(fan_in)), GroupNorm 1 / 0): with
  /// B = Cpu the same values; on a GPU the uniforms may differ in the last bit (docs/cuda.md).
  void init(Parameters<T, B>& ps, Generator& gen) const {
    for (const auto* v : {&enc_in_, &enc_down_, &enc_out_, &dec_in_, &dec_up_, &dec_out_})
      for (const auto& c : *v) c.init(ps, gen);
    for (const auto* v : {&enc_norm_, &enc_norm_out_, &dec_norm_, &dec_norm_out_})
      for (const auto& n : *v) n.init(ps, gen);
  }

  // x: [N, C, S, S] -> mu, logvar: [N, z, h, w] (the encoder's Gaussian), all on B. Fills `c`.
  void encode(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> mu, View<T, B> logvar,
              EncoderCache& c) const {
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    const index_t n = x.dim(0);
    check_shape("mu", mu, latent_shape(n));
    check_shape("logvar", logvar, latent_shape(n));
    prepare(c, x.shape());
    Context& ctx = c.context();
    copy(c.x.view(), x);
    enc_in_[0].forward(ctx, ps, x, c.a0.view(), c.cin);
    View<const T, B> h = c.a0.view();
    for (std::size_t i = 0; i < c.d.size(); ++i) {
      enc_norm_[i].forward_silu(ps, h, View<T, B>{}, c.s[i].view(), c.gn[i]);
      enc_down_[i].forward(ctx, ps, c.s[i].view(), c.d[i].view(), c.cd[i]);
      h = c.d[i].view();
    }
    enc_norm_out_[0].forward_silu(ps, h, View<T, B>{}, c.so.view(), c.gno);
    enc_out_[0].forward(ctx, ps, c.so.view(), c.mom.view(), c.cout);
    const index_t r = mu.numel() / n;
    B::parallel_for(mu.numel(),
                    kernels::SplitChannelHalves<T>{mu.data(), logvar.data(), c.mom.data(), r});
  }

  // dmu, dlogvar: [N, z, h, w]; dx: like the encoded x (overwritten) or empty / {} (skipped); all
  // on B. Parameter gradients accumulate. Uses the activations of the last encode() in `c`.
  void encode_backward(Parameters<T, B>& ps, View<const T, B> dmu, View<const T, B> dlogvar,
                       View<T, B> dx, EncoderCache& c) const {
    require<config_error>(c.in_shape.rank() == 4, name(),
                          ": encode_backward() needs the cache of an encode() call first");
    const index_t n = c.in_shape[0];
    check_shape("dmu", dmu, latent_shape(n));
    check_shape("dlogvar", dlogvar, latent_shape(n));
    if (!absent(dx)) check_shape("dx", dx, c.in_shape);
    Context& ctx = c.context();
    B::parallel_for(c.dmom.numel(),
                    kernels::ConcatChannelHalves<T>{c.dmom.data(), dmu.data(), dlogvar.data(),
                                                    dmu.numel() / n});
    enc_out_[0].backward(ctx, ps, c.so.view(), c.dmom.view(), c.dso.view(), c.cout);
    const std::size_t K = c.d.size();
    enc_norm_out_[0].backward_silu(ps, K > 0 ? View<const T, B>(c.d[K - 1]) : c.a0.view(),
                                   c.dso.view(),
                                   K > 0 ? c.dd[K - 1].view() : c.da0.view(), c.gno);
    for (std::size_t i = K; i-- > 0;) {
      const View<const T, B> in = i > 0 ? View<const T, B>(c.d[i - 1]) : c.a0.view();
      const View<T, B> gin = i > 0 ? c.dd[i - 1].view() : c.da0.view();
      enc_down_[i].backward(ctx, ps, c.s[i].view(), c.dd[i].view(), c.ds[i].view(), c.cd[i]);
      enc_norm_[i].backward_silu(ps, in, c.ds[i].view(), gin, c.gn[i]);
    }
    enc_in_[0].backward(ctx, ps, c.x.view(), c.da0.view(), dx, c.cin);
  }

  // z: [N, z, h, w] -> xhat: [N, C, S, S], on B. Fills `c`.
  void decode(const Parameters<T, B>& ps, View<const T, B> z, View<T, B> xhat,
              DecoderCache& c) const {
    check_batch("z", z, cfg_.latent_channels, latent_size());
    const index_t n = z.dim(0);
    check_shape("xhat", xhat, image_shape(n));
    prepare(c, z.shape());
    Context& ctx = c.context();
    copy(c.z.view(), z);
    dec_in_[0].forward(ctx, ps, z, c.b0.view(), c.cin);
    View<const T, B> h = c.b0.view();
    for (std::size_t j = 0; j < c.c.size(); ++j) {
      dec_norm_[j].forward_silu(ps, h, View<T, B>{}, c.s[j].view(), c.gn[j]);
      up_.forward(c.s[j].view(), c.u[j].view());
      dec_up_[j].forward(ctx, ps, c.u[j].view(), c.c[j].view(), c.cu[j]);
      h = c.c[j].view();
    }
    dec_norm_out_[0].forward_silu(ps, h, View<T, B>{}, c.so.view(), c.gno);
    dec_out_[0].forward(ctx, ps, c.so.view(), xhat, c.cout);
  }

  // dxhat: [N, C, S, S]; dz: like the decoded z (overwritten) or empty / {} (skipped); on B.
  // Parameter gradients accumulate. Uses the activations of the last decode() in `c`.
  void decode_backward(Parameters<T, B>& ps, View<const T, B> dxhat, View<T, B> dz,
                       DecoderCache& c) const {
    require<config_error>(c.in_shape.rank() == 4, name(),
                          ": decode_backward() needs the cache of a decode() call first");
    const index_t n = c.in_shape[0];
    check_shape("dxhat", dxhat, image_shape(n));
    if (!absent(dz)) check_shape("dz", dz, c.in_shape);
    Context& ctx = c.context();
    dec_out_[0].backward(ctx, ps, c.so.view(), dxhat, c.dso.view(), c.cout);
    const std::size_t K = c.c.size();
    dec_norm_out_[0].backward_silu(ps, K > 0 ? View<const T, B>(c.c[K - 1]) : c.b0.view(),
                                   c.dso.view(),
                                   K > 0 ? c.dc[K - 1].view() : c.db0.view(), c.gno);
    for (std::size_t j = K; j-- > 0;) {
      const View<const T, B> in = j > 0 ? View<const T, B>(c.c[j - 1]) : c.b0.view();
      const View<T, B> gin = j > 0 ? c.dc[j - 1].view() : c.db0.view();
      dec_up_[j].backward(ctx, ps, c.u[j].view(), c.dc[j].view(), c.du[j].view(), c.cu[j]);
      up_.backward(c.s[j].view(), c.du[j].view(), c.ds[j].view());
      dec_norm_[j].backward_silu(ps, in, c.ds[j].view(), gin, c.gn[j]);
    }
    dec_in_[0].backward(ctx, ps, c.z.view(), c.db0.view(), dz, c.cin);
  }

  /// z = mu + exp(logvar / 2) eps (all [N, z, h, w] on B; z may alias mu).
  static void reparameterize(View<const T, B> mu, View<const T, B> logvar, View<const T, B> eps,
                             View<T, B> z) {
    check_same_shape("BackendVAE::reparameterize", "mu", mu, "logvar", logvar);
    check_same_shape("BackendVAE::reparameterize", "mu", mu, "eps", eps);
    check_same_shape("BackendVAE::reparameterize", "mu", mu, "z", View<const T, B>(z));
    B::parallel_for(mu.numel(),
                    kernels::Reparameterize<T>{z.data(), mu.data(), logvar.data(), eps.data()});
  }

  /// Encodes x and writes the posterior mean (`gen == nullptr`) or a sample of it into z: the
  /// latents a flow model is trained on. x: [N, C, S, S], z: [N, z, h, w], on B. It overwrites
  /// the cache's mu and logvar, so a forward() kept in `c` no longer counts for loss() /
  /// backward().
  void encode_latent(const Parameters<T, B>& ps, View<const T, B> x, View<T, B> z, Cache& c,
                     Generator* gen = nullptr) const {
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    check_shape("z", z, latent_shape(x.dim(0)));
    size_whole(c, x.dim(0));
    c.has_forward = false;
    encode(ps, x, c.mu.view(), c.logvar.view(), c.enc);
    if (gen == nullptr) {
      copy(z, View<const T, B>(c.mu.view()));
      return;
    }
    fill_normal(c.eps.view(), *gen);
    reparameterize(c.mu.view(), c.logvar.view(), c.eps.view(), z);
  }

  /// The whole autoencoder on x: [N, C, S, S] on B: encode, z = mu + exp(logvar/2) eps with eps
  /// drawn from `gen` (on B), decode into cache.xhat; returns the loss. backward() then gives its
  /// gradient.
  VAELoss forward(const Parameters<T, B>& ps, View<const T, B> x, Generator& gen, Cache& c) const {
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    size_whole(c, x.dim(0));
    fill_normal(c.eps.view(), gen);
    return forward_with_noise(ps, x, c.eps.view(), c);
  }

  /// As forward(), with the noise given (eps: [N, z, h, w] on B; copied into the cache).
  VAELoss forward_with_noise(const Parameters<T, B>& ps, View<const T, B> x, View<const T, B> eps,
                             Cache& c) const {
    c.has_forward = false;
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    const index_t n = x.dim(0);
    check_shape("eps", eps, latent_shape(n));
    size_whole(c, n);
    encode(ps, x, c.mu.view(), c.logvar.view(), c.enc);
    if (eps.data() != c.eps.data()) copy(c.eps.view(), eps);
    reparameterize(c.mu.view(), c.logvar.view(), c.eps.view(), c.z.view());
    decode(ps, c.z.view(), c.xhat.view(), c.dec);
    c.has_forward = true;
    return loss(x, c);
  }

  /// The loss of the last forward against the target x (its input), from two reductions on B.
  VAELoss loss(View<const T, B> x, const Cache& c) const {
    require<config_error>(c.has_forward, name(), ": loss() needs a forward() call first");
    check_shape("x", x, c.xhat.shape());
    const double inv_n = 1.0 / static_cast<double>(x.dim(0));
    const double se =
        B::reduce_sum(x.numel(), kernels::SquaredDifference<T>{c.xhat.data(), x.data()});
    const double kl =
        B::reduce_sum(c.mu.numel(), kernels::GaussianKlTerm<T>{c.mu.data(), c.logvar.data()});
    VAELoss l;
    l.recon = se * inv_n;
    l.kl = kl * inv_n;
    l.total = l.recon + cfg_.beta * l.kl;
    return l;
  }

  // Gradient of scale * loss().total: parameter gradients accumulate; dx (like x, overwritten, or
  // empty / {}) includes both uses of x (encoder input and reconstruction target). On B.
  void backward(Parameters<T, B>& ps, View<const T, B> x, View<T, B> dx, Cache& c,
                T scale = T(1)) const {
    require<config_error>(c.has_forward, name(), ": backward() needs a forward() call first");
    check_shape("x", x, c.xhat.shape());
    if (!absent(dx)) check_shape("dx", dx, x.shape());
    const T inv_n = scale / static_cast<T>(x.dim(0));
    B::parallel_for(x.numel(), kernels::ReconstructionGrad<T>{c.dxhat.data(), c.xhat.data(),
                                                              x.data(), T(2) * inv_n});
    decode_backward(ps, c.dxhat.view(), c.dz.view(), c.dec);
    B::parallel_for(c.z.numel(), kernels::PosteriorGrad<T>{
                                     c.dmu.data(), c.dlogvar.data(), c.mu.data(), c.logvar.data(),
                                     c.eps.data(), c.dz.data(), static_cast<T>(cfg_.beta) * inv_n});
    encode_backward(ps, c.dmu.view(), c.dlogvar.view(), dx, c.enc);
    if (!absent(dx))  // the target's share
      B::parallel_for(dx.numel(), kernels::SubtractInPlace<T>{dx.data(), c.dxhat.data()});
  }

 private:
  std::string name() const {
    return prefix_.empty() ? std::string("BackendVAE") : prefix_ + " (BackendVAE)";
  }

  // nn::VAE's checks, with this model's name in the messages.
  void validate() const {
    const auto& k = cfg_;
    const auto K = static_cast<index_t>(k.channels.size());
    require<config_error>(
        k.in_channels >= 1 && k.latent_channels >= 1 && k.groups >= 1 && k.beta >= 0 && K >= 1 &&
            K < 16,
        name(),
        ": need in_channels, latent_channels, groups >= 1, beta >= 0 and at least one level");
    require<config_error>(
        k.image_size >= (index_t{1} << K) && k.image_size % (index_t{1} << K) == 0, name(),
        ": image_size must be a positive multiple of 2^levels = ", index_t{1} << K, ", got ",
        k.image_size);
    std::vector<index_t> widths = k.channels;
    widths.push_back(k.base_channels);
    for (index_t c : widths)
      require<config_error>(c >= 1 && c % k.groups == 0, name(), ": channel count ", c,
                            " is not a positive multiple of groups = ", k.groups);
  }

  template <class U>
  static bool absent(View<U, B> v) {
    return v.data() == nullptr || v.empty();
  }

  template <class U>
  void check_shape(const char* arg, View<U, B> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }
  // v: [N, c, r, r] for any N >= 1.
  template <class U>
  void check_batch(const char* arg, View<U, B> v, index_t c, index_t r) const {
    if (v.rank() != 4 || v.dim(0) < 1 || v.dim(1) != c || v.dim(2) != r || v.dim(3) != r)
      fail<shape_error>(name(), ": ", arg, ": expected shape [N, ", c, ", ", r, ", ", r,
                        "] with N >= 1, got ", v.shape());
  }

  static void resize_if(Tensor<T, B>& t, const Shape& s) {
    if (!(t.shape() == s)) t.resize(s);
  }

  void size_whole(Cache& c, index_t n) const {
    const Shape ls = latent_shape(n), is = image_shape(n);
    for (Tensor<T, B>* t : {&c.mu, &c.logvar, &c.eps, &c.z, &c.dmu, &c.dlogvar, &c.dz})
      resize_if(*t, ls);
    for (Tensor<T, B>* t : {&c.xhat, &c.dxhat}) resize_if(*t, is);
  }

  void prepare(EncoderCache& c, const Shape& s) const {
    if (c.in_shape == s) return;
    const index_t n = s[0], S = s[2], K = levels();
    const auto& ch = cfg_.channels;
    resize_if(c.x, s);
    for (Tensor<T, B>* t : {&c.a0, &c.da0}) resize_if(*t, Shape{n, cfg_.base_channels, S, S});
    for (auto* v : {&c.s, &c.d, &c.ds, &c.dd}) v->resize(static_cast<std::size_t>(K));
    c.cd.resize(static_cast<std::size_t>(K));
    c.gn.resize(static_cast<std::size_t>(K));
    for (index_t i = 0; i < K; ++i) {
      const auto k = static_cast<std::size_t>(i);
      const index_t cin = i == 0 ? cfg_.base_channels : ch[k - 1];
      const Shape in{n, cin, S >> i, S >> i};
      for (Tensor<T, B>* t : {&c.s[k], &c.ds[k]}) resize_if(*t, in);
      for (Tensor<T, B>* t : {&c.d[k], &c.dd[k]})
        resize_if(*t, Shape{n, ch[k], S >> (i + 1), S >> (i + 1)});
    }
    const index_t h = S >> K;
    for (Tensor<T, B>* t : {&c.so, &c.dso}) resize_if(*t, Shape{n, ch.back(), h, h});
    for (Tensor<T, B>* t : {&c.mom, &c.dmom})
      resize_if(*t, Shape{n, 2 * cfg_.latent_channels, h, h});
    c.in_shape = s;
  }

  void prepare(DecoderCache& c, const Shape& s) const {
    if (c.in_shape == s) return;
    const index_t n = s[0], h = s[2], K = levels(), b = cfg_.base_channels;
    const auto& ch = cfg_.channels;
    resize_if(c.z, s);
    for (Tensor<T, B>* t : {&c.b0, &c.db0}) resize_if(*t, Shape{n, ch.back(), h, h});
    for (auto* v : {&c.s, &c.u, &c.c, &c.ds, &c.du, &c.dc})
      v->resize(static_cast<std::size_t>(K));
    c.cu.resize(static_cast<std::size_t>(K));
    c.gn.resize(static_cast<std::size_t>(K));
    for (index_t j = 0; j < K; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const index_t cin = ch[static_cast<std::size_t>(K - 1 - j)];
      const index_t cout = K - 2 - j >= 0 ? ch[static_cast<std::size_t>(K - 2 - j)] : b;
      const index_t r = h << j;
      for (Tensor<T, B>* t : {&c.s[k], &c.ds[k]}) resize_if(*t, Shape{n, cin, r, r});
      for (Tensor<T, B>* t : {&c.u[k], &c.du[k]}) resize_if(*t, Shape{n, cin, 2 * r, 2 * r});
      for (Tensor<T, B>* t : {&c.c[k], &c.dc[k]}) resize_if(*t, Shape{n, cout, 2 * r, 2 * r});
    }
    const index_t S = h << K;
    for (Tensor<T, B>* t : {&c.so, &c.dso}) resize_if(*t, Shape{n, b, S, S});
    c.in_shape = s;
  }

  VAEConfig cfg_;
  std::string prefix_;
  BackendUpsampleNearest2d<T, B> up_;
  // Layers in vectors, as nn::VAE (single layers are vectors of one).
  std::vector<Conv> enc_in_, enc_down_, enc_out_, dec_in_, dec_up_, dec_out_;
  std::vector<Norm> enc_norm_, enc_norm_out_, dec_norm_, dec_norm_out_;
};

}  // namespace flowdiff::nn
