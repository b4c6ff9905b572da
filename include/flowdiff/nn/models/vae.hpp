// flowdiff/nn/models/vae.hpp — a small convolutional variational autoencoder for latent flow
// matching on 28x28 / 32x32 images (x: [N, C, S, S], data in [-1, 1]), with K = channels.size()
// stride-2 levels, so the latent is [N, z, S / 2^K, S / 2^K] (4x7x7 for 28x28 and K = 2):
//   encoder  h = Conv3x3(x);  K x { h = Conv3x3/2(SiLU(GN(h))) };
//            [mu | logvar] = Conv3x3(SiLU(GN(h)))
//   sample   z = mu + exp(logvar / 2) eps,  eps ~ N(0, I) from a Generator (reparameterisation)
//   decoder  h = Conv3x3(z);  K x { h = Conv3x3(Up2(SiLU(GN(h)))) };  x^ = Conv3x3(SiLU(GN(h)))
//   loss     L = recon + beta kl,  recon = (1/N) sum (x^ - x)^2   (a Gaussian decoder; MSE summed
//            over the pixels of a sample, averaged over the batch),
//            kl = (1/N) sum 1/2 (mu^2 + exp(logvar) - 1 - logvar) = mean KL(N(mu, s^2) || N(0, I))
//   backward dx^ = 2 (x^ - x) / N;  dz from the decoder;  dmu = dz + beta mu / N,
//            dlogvar = dz eps exp(logvar / 2) / 2 + beta (exp(logvar) - 1) / (2N);  the encoder
//            gives dx, to which the reconstruction target adds -2 (x^ - x) / N.
// [mu | logvar] is split along channels as torch.chunk(2, dim=1) (diffusers' DiagonalGaussian).
// No residual blocks and no attention: the network only has to move Fashion-MNIST into a small
// latent and back. Parameter names are those of the torch module in tools/fixtures/vae.py:
// encoder.conv_in.*, encoder.down.<i>.{norm,conv}.*, encoder.norm_out.*, encoder.conv_out.*,
// decoder.conv_in.*, decoder.up.<j>.{norm,conv}.*, decoder.norm_out.*, decoder.conv_out.*.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/modulation.hpp"
#include "flowdiff/nn/layers/norm.hpp"
#include "flowdiff/nn/layers/upsample.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Configuration of nn::VAE.
struct VAEConfig {
  index_t in_channels = 1;                   ///< image channels
  index_t image_size = 28;                   ///< H = W; a multiple of 2^channels.size()
  std::vector<index_t> channels = {32, 64};  ///< width after each stride-2 level (K = size)
  index_t base_channels = 32;                ///< width of the full-resolution conv_in / conv_out
  index_t latent_channels = 4;               ///< z channels
  index_t groups = 8;                        ///< GroupNorm groups (divide every width)
  double beta = 1e-3;                        ///< weight of the KL term in the loss
};

/// The parts of the VAE loss (each averaged over the batch).
struct VAELoss {
  double recon = 0;  ///< (1/N) sum (x^ - x)^2
  double kl = 0;     ///< (1/N) sum KL(N(mu, exp(logvar)) || N(0, I))
  double total = 0;  ///< recon + beta kl
};

/// sum over all elements of 1/2 (mu^2 + exp(logvar) - 1 - logvar): KL(N(mu, e^logvar) || N(0, I)).
template <class T>
double gaussian_kl(View<const T> mu, View<const T> logvar) {
  check_same_shape("gaussian_kl", "mu", mu, "logvar", logvar);
  double s = 0;
  for (index_t i = 0; i < mu.numel(); ++i) {
    const double m = mu[i], lv = logvar[i];
    s += 0.5 * (m * m + std::exp(lv) - 1.0 - lv);
  }
  return s;
}

/// dmu = scale mu, dlogvar = scale (exp(logvar) - 1) / 2 (overwritten): the gradient of scale *
/// gaussian_kl.
template <class T>
void gaussian_kl_backward(View<const T> mu, View<const T> logvar, T scale, View<T> dmu,
                          View<T> dlogvar) {
  check_same_shape("gaussian_kl_backward", "mu", mu, "logvar", logvar);
  check_same_shape("gaussian_kl_backward", "mu", mu, "dmu", View<const T>(dmu));
  check_same_shape("gaussian_kl_backward", "mu", mu, "dlogvar", View<const T>(dlogvar));
  for (index_t i = 0; i < mu.numel(); ++i) {
    dmu[i] = scale * mu[i];
    dlogvar[i] = scale * T(0.5) * (std::exp(logvar[i]) - T(1));
  }
}

template <class T>
class VAE {
 public:
  using value_type = T;

  /// Encoder activations (and gradient buffers), sized per input shape.
  struct EncoderCache {
    Shape in_shape;
    Tensor<T> x;                     // the input
    Tensor<T> a0, da0;               // conv_in out [N, base, S, S]
    std::vector<Tensor<T>> s, d;     // per level: SiLU(GN) out (GN out not kept), conv out
    std::vector<Tensor<T>> ds, dd;   // gradients of s and d
    Tensor<T> so, dso;               // SiLU(GN_out) and its gradient
    Tensor<T> mom, dmom;             // [mu | logvar] and its gradient
    typename Conv2d<T>::Cache cin, cout;
    std::vector<typename Conv2d<T>::Cache> cd;
    std::vector<typename GroupNorm<T>::Cache> gn;
    typename GroupNorm<T>::Cache gno;
  };
  /// Decoder activations (and gradient buffers), sized per latent shape.
  struct DecoderCache {
    Shape in_shape;
    Tensor<T> z;                        // the input latent
    Tensor<T> b0, db0;                  // conv_in out [N, c_K, h, w]
    std::vector<Tensor<T>> s, u, c;     // per level: SiLU(GN) (not GN), upsampled, conv out
    std::vector<Tensor<T>> ds, du, dc;  // gradients
    Tensor<T> so, dso;                  // SiLU(GN_out) and its gradient
    typename Conv2d<T>::Cache cin, cout;
    std::vector<typename Conv2d<T>::Cache> cu;
    std::vector<typename GroupNorm<T>::Cache> gn;
    typename GroupNorm<T>::Cache gno;
  };
  /// Everything forward() / backward() of the whole autoencoder keep.
  struct Cache {
    EncoderCache enc;
    DecoderCache dec;
    Tensor<T> mu, logvar, eps, z, xhat;  // [N, z, h, w] x 4, [N, C, S, S]
    Tensor<T> dmu, dlogvar, dz, dxhat;   // their gradients
    bool has_forward = false;
  };

  VAE(Parameters<T>& ps, const VAEConfig& config, const std::string& prefix = "")
      : cfg_(valid(config, prefix)), prefix_(prefix), up_(2, prefix + "decoder.up") {
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

  /// PyTorch's defaults (Conv2d U(±1/sqrt(fan_in)), GroupNorm 1 / 0).
  void init(Parameters<T>& ps, Generator& gen) const {
    for (const auto* v : {&enc_in_, &enc_down_, &enc_out_, &dec_in_, &dec_up_, &dec_out_})
      for (const auto& c : *v) c.init(ps, gen);
    for (const auto* v : {&enc_norm_, &enc_norm_out_, &dec_norm_, &dec_norm_out_})
      for (const auto& n : *v) n.init(ps, gen);
  }

  // x: [N, C, S, S] -> mu, logvar: [N, z, h, w] (the encoder's Gaussian). Fills `c`.
  void encode(const Parameters<T>& ps, View<const T> x, View<T> mu, View<T> logvar,
              EncoderCache& c) const {
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    const index_t n = x.dim(0);
    check_shape("mu", View<const T>(mu), latent_shape(n));
    check_shape("logvar", View<const T>(logvar), latent_shape(n));
    prepare(c, x.shape());
    copy(c.x.view(), x);
    enc_in_[0].forward(ps, x, c.a0.view(), c.cin);
    View<const T> h = c.a0.view();
    for (std::size_t i = 0; i < c.d.size(); ++i) {
      enc_norm_[i].forward_silu(ps, h, View<T>(), c.s[i].view(), c.gn[i]);
      enc_down_[i].forward(ps, c.s[i].view(), c.d[i].view(), c.cd[i]);
      h = c.d[i].view();
    }
    enc_norm_out_[0].forward_silu(ps, h, View<T>(), c.so.view(), c.gno);
    enc_out_[0].forward(ps, c.so.view(), c.mom.view(), c.cout);
    split_channels<T>(c.mom.view(), mu, logvar);
  }

  // dmu, dlogvar: [N, z, h, w]; dx: like the encoded x (overwritten) or empty. Parameter gradients
  // accumulate. Uses the activations of the last encode() in `c`.
  void encode_backward(Parameters<T>& ps, View<const T> dmu, View<const T> dlogvar, View<T> dx,
                       EncoderCache& c) const {
    require<config_error>(c.in_shape.rank() == 4, name(),
                          ": encode_backward() needs the cache of an encode() call first");
    const index_t n = c.in_shape[0];
    check_shape("dmu", dmu, latent_shape(n));
    check_shape("dlogvar", dlogvar, latent_shape(n));
    if (!dx.empty()) check_shape("dx", View<const T>(dx), c.in_shape);
    concat_channels<T>(dmu, dlogvar, c.dmom.view());
    enc_out_[0].backward(ps, c.so.view(), c.dmom.view(), c.dso.view(), c.cout);
    const std::size_t K = c.d.size();
    View<T> g = K > 0 ? c.dd[K - 1].view() : c.da0.view();
    enc_norm_out_[0].backward_silu(ps, K > 0 ? View<const T>(c.d[K - 1]) : View<const T>(c.a0),
                                   c.dso.view(), g, c.gno);
    for (std::size_t i = K; i-- > 0;) {
      const View<const T> in = i > 0 ? View<const T>(c.d[i - 1]) : View<const T>(c.a0);
      View<T> gin = i > 0 ? c.dd[i - 1].view() : c.da0.view();
      enc_down_[i].backward(ps, c.s[i].view(), c.dd[i].view(), c.ds[i].view(), c.cd[i]);
      enc_norm_[i].backward_silu(ps, in, c.ds[i].view(), gin, c.gn[i]);
    }
    enc_in_[0].backward(ps, c.x.view(), c.da0.view(), dx, c.cin);
  }

  // z: [N, z, h, w] -> xhat: [N, C, S, S]. Fills `c`.
  void decode(const Parameters<T>& ps, View<const T> z, View<T> xhat, DecoderCache& c) const {
    check_batch("z", z, cfg_.latent_channels, latent_size());
    const index_t n = z.dim(0);
    check_shape("xhat", View<const T>(xhat), image_shape(n));
    prepare(c, z.shape());
    copy(c.z.view(), z);
    dec_in_[0].forward(ps, z, c.b0.view(), c.cin);
    View<const T> h = c.b0.view();
    for (std::size_t j = 0; j < c.c.size(); ++j) {
      dec_norm_[j].forward_silu(ps, h, View<T>(), c.s[j].view(), c.gn[j]);
      up_.forward(c.s[j].view(), c.u[j].view());
      dec_up_[j].forward(ps, c.u[j].view(), c.c[j].view(), c.cu[j]);
      h = c.c[j].view();
    }
    dec_norm_out_[0].forward_silu(ps, h, View<T>(), c.so.view(), c.gno);
    dec_out_[0].forward(ps, c.so.view(), xhat, c.cout);
  }

  // dxhat: [N, C, S, S]; dz: like the decoded z (overwritten) or empty. Parameter gradients
  // accumulate. Uses the activations of the last decode() in `c`.
  void decode_backward(Parameters<T>& ps, View<const T> dxhat, View<T> dz, DecoderCache& c) const {
    require<config_error>(c.in_shape.rank() == 4, name(),
                          ": decode_backward() needs the cache of a decode() call first");
    const index_t n = c.in_shape[0];
    check_shape("dxhat", dxhat, image_shape(n));
    if (!dz.empty()) check_shape("dz", View<const T>(dz), c.in_shape);
    dec_out_[0].backward(ps, c.so.view(), dxhat, c.dso.view(), c.cout);
    const std::size_t K = c.c.size();
    View<T> g = K > 0 ? c.dc[K - 1].view() : c.db0.view();
    dec_norm_out_[0].backward_silu(ps, K > 0 ? View<const T>(c.c[K - 1]) : View<const T>(c.b0),
                                   c.dso.view(), g, c.gno);
    for (std::size_t j = K; j-- > 0;) {
      const View<const T> in = j > 0 ? View<const T>(c.c[j - 1]) : View<const T>(c.b0);
      View<T> gin = j > 0 ? c.dc[j - 1].view() : c.db0.view();
      dec_up_[j].backward(ps, c.u[j].view(), c.dc[j].view(), c.du[j].view(), c.cu[j]);
      up_.backward(c.s[j].view(), c.du[j].view(), c.ds[j].view());
      dec_norm_[j].backward_silu(ps, in, c.ds[j].view(), gin, c.gn[j]);
    }
    dec_in_[0].backward(ps, c.z.view(), c.db0.view(), dz, c.cin);
  }

  /// z = mu + exp(logvar / 2) eps (all [N, z, h, w]; z may alias mu).
  static void reparameterize(View<const T> mu, View<const T> logvar, View<const T> eps, View<T> z) {
    check_same_shape("VAE::reparameterize", "mu", mu, "logvar", logvar);
    check_same_shape("VAE::reparameterize", "mu", mu, "eps", eps);
    check_same_shape("VAE::reparameterize", "mu", mu, "z", View<const T>(z));
    for (index_t i = 0; i < mu.numel(); ++i) z[i] = mu[i] + std::exp(T(0.5) * logvar[i]) * eps[i];
  }

  /// Encodes x and returns the posterior mean (`gen == nullptr`) or a sample z of it: the latents a
  /// flow model is trained on. z: [N, z, h, w]. It overwrites the cache's posterior, so a kept
  /// forward() is no longer valid: loss() / backward() then need a new forward().
  void encode_latent(const Parameters<T>& ps, View<const T> x, View<T> z, Cache& c,
                     Generator* gen = nullptr) const {
    c.has_forward = false;
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    size_whole(c, x.dim(0));
    encode(ps, x, c.mu.view(), c.logvar.view(), c.enc);
    if (gen == nullptr) {
      check_shape("z", View<const T>(z), c.mu.shape());
      copy(z, View<const T>(c.mu));
      return;
    }
    fill_normal(c.eps.view(), *gen);
    reparameterize(c.mu.view(), c.logvar.view(), c.eps.view(), z);
  }

  /// The whole autoencoder on x: [N, C, S, S]: encode, z = mu + exp(logvar/2) eps with eps drawn
  /// from `gen`, decode into cache.xhat; returns the loss. backward() then gives its gradient.
  VAELoss forward(const Parameters<T>& ps, View<const T> x, Generator& gen, Cache& c) const {
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    size_whole(c, x.dim(0));
    fill_normal(c.eps.view(), gen);
    return forward_with_noise(ps, x, c.eps.view(), c);
  }

  /// As forward(), with the noise given (eps: [N, z, h, w]; copied into the cache).
  VAELoss forward_with_noise(const Parameters<T>& ps, View<const T> x, View<const T> eps,
                             Cache& c) const {
    c.has_forward = false;
    check_batch("x", x, cfg_.in_channels, cfg_.image_size);
    const index_t n = x.dim(0);
    size_whole(c, n);
    encode(ps, x, c.mu.view(), c.logvar.view(), c.enc);
    check_shape("eps", eps, latent_shape(n));
    if (eps.data() != c.eps.data()) copy(c.eps.view(), eps);
    reparameterize(c.mu.view(), c.logvar.view(), c.eps.view(), c.z.view());
    decode(ps, c.z.view(), c.xhat.view(), c.dec);
    c.has_forward = true;
    return loss(x, c);
  }

  /// The loss of the last forward against the target x (its input).
  VAELoss loss(View<const T> x, const Cache& c) const {
    require<config_error>(c.has_forward, name(), ": loss() needs a forward() call first");
    check_shape("x", x, c.xhat.shape());
    const double inv_n = 1.0 / static_cast<double>(x.dim(0));
    double se = 0;
    for (index_t i = 0; i < x.numel(); ++i) {
      const double d = static_cast<double>(c.xhat[i]) - static_cast<double>(x[i]);
      se += d * d;
    }
    VAELoss l;
    l.recon = se * inv_n;
    l.kl = gaussian_kl<T>(c.mu.view(), c.logvar.view()) * inv_n;
    l.total = l.recon + cfg_.beta * l.kl;
    return l;
  }

  // Gradient of scale * loss().total: parameter gradients accumulate; dx (like x, overwritten, or
  // empty) includes both uses of x (encoder input and reconstruction target).
  void backward(Parameters<T>& ps, View<const T> x, View<T> dx, Cache& c, T scale = T(1)) const {
    require<config_error>(c.has_forward, name(), ": backward() needs a forward() call first");
    check_shape("x", x, c.xhat.shape());
    if (!dx.empty()) check_shape("dx", View<const T>(dx), x.shape());
    const T inv_n = scale / static_cast<T>(x.dim(0));
    for (index_t i = 0; i < x.numel(); ++i) c.dxhat[i] = T(2) * inv_n * (c.xhat[i] - x[i]);
    decode_backward(ps, c.dxhat.view(), c.dz.view(), c.dec);
    gaussian_kl_backward<T>(c.mu.view(), c.logvar.view(), static_cast<T>(cfg_.beta) * inv_n,
                            c.dmu.view(), c.dlogvar.view());
    for (index_t i = 0; i < c.z.numel(); ++i) {
      c.dmu[i] += c.dz[i];
      c.dlogvar[i] += c.dz[i] * c.eps[i] * T(0.5) * std::exp(T(0.5) * c.logvar[i]);
    }
    if (dx.empty()) {
      encode_backward(ps, c.dmu.view(), c.dlogvar.view(), View<T>(), c.enc);
      return;
    }
    encode_backward(ps, c.dmu.view(), c.dlogvar.view(), dx, c.enc);
    for (index_t i = 0; i < x.numel(); ++i) dx[i] -= c.dxhat[i];  // the target's share
  }

 private:
  std::string name() const { return prefix_.empty() ? std::string("VAE") : prefix_ + " (VAE)"; }

  static const VAEConfig& valid(const VAEConfig& k, const std::string& prefix) {
    const std::string who = prefix.empty() ? std::string("VAE") : prefix + " (VAE)";
    const auto K = static_cast<index_t>(k.channels.size());
    require<config_error>(
        k.in_channels >= 1 && k.latent_channels >= 1 && k.groups >= 1 && k.beta >= 0 && K >= 1 &&
            K < 16,
        who, ": need in_channels, latent_channels, groups >= 1, beta >= 0 and at least one level");
    require<config_error>(
        k.image_size >= (index_t{1} << K) && k.image_size % (index_t{1} << K) == 0, who,
        ": image_size must be a positive multiple of 2^levels = ", index_t{1} << K, ", got ",
        k.image_size);
    std::vector<index_t> widths = k.channels;
    widths.push_back(k.base_channels);
    for (index_t c : widths)
      require<config_error>(c >= 1 && c % k.groups == 0, who, ": channel count ", c,
                            " is not a positive multiple of groups = ", k.groups);
    return k;
  }

  template <class U>
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }
  // v: [N, c, r, r] for any N >= 1.
  template <class U>
  void check_batch(const char* arg, View<U> v, index_t c, index_t r) const {
    if (v.rank() != 4 || v.dim(0) < 1 || v.dim(1) != c || v.dim(2) != r || v.dim(3) != r)
      fail<shape_error>(name(), ": ", arg, ": expected shape [N, ", c, ", ", r, ", ", r,
                        "] with N >= 1, got ", v.shape());
  }

  void size_whole(Cache& c, index_t n) const {
    const Shape ls = latent_shape(n), is = image_shape(n);
    if (c.mu.shape() == ls && c.xhat.shape() == is) return;
    for (Tensor<T>* t : {&c.mu, &c.logvar, &c.eps, &c.z, &c.dmu, &c.dlogvar, &c.dz}) t->resize(ls);
    for (Tensor<T>* t : {&c.xhat, &c.dxhat}) t->resize(is);
  }

  void prepare(EncoderCache& c, const Shape& s) const {
    if (c.in_shape == s) return;
    const index_t n = s[0], S = s[2], K = levels();
    const auto& ch = cfg_.channels;
    c.x.resize(s);
    for (Tensor<T>* t : {&c.a0, &c.da0}) t->resize(Shape{n, cfg_.base_channels, S, S});
    for (auto* v : {&c.s, &c.d, &c.ds, &c.dd}) v->resize(static_cast<std::size_t>(K));
    c.cd.resize(static_cast<std::size_t>(K));
    c.gn.resize(static_cast<std::size_t>(K));
    for (index_t i = 0; i < K; ++i) {
      const auto k = static_cast<std::size_t>(i);
      const index_t cin = i == 0 ? cfg_.base_channels : ch[k - 1];
      const Shape in{n, cin, S >> i, S >> i};
      for (Tensor<T>* t : {&c.s[k], &c.ds[k]}) t->resize(in);
      for (Tensor<T>* t : {&c.d[k], &c.dd[k]})
        t->resize(Shape{n, ch[k], S >> (i + 1), S >> (i + 1)});
    }
    const index_t h = S >> K;
    for (Tensor<T>* t : {&c.so, &c.dso}) t->resize(Shape{n, ch.back(), h, h});
    for (Tensor<T>* t : {&c.mom, &c.dmom}) t->resize(Shape{n, 2 * cfg_.latent_channels, h, h});
    c.in_shape = s;
  }

  void prepare(DecoderCache& c, const Shape& s) const {
    if (c.in_shape == s) return;
    const index_t n = s[0], h = s[2], K = levels(), b = cfg_.base_channels;
    const auto& ch = cfg_.channels;
    c.z.resize(s);
    for (Tensor<T>* t : {&c.b0, &c.db0}) t->resize(Shape{n, ch.back(), h, h});
    for (auto* v : {&c.s, &c.u, &c.c, &c.ds, &c.du, &c.dc})
      v->resize(static_cast<std::size_t>(K));
    c.cu.resize(static_cast<std::size_t>(K));
    c.gn.resize(static_cast<std::size_t>(K));
    for (index_t j = 0; j < K; ++j) {
      const auto k = static_cast<std::size_t>(j);
      const index_t cin = ch[static_cast<std::size_t>(K - 1 - j)];
      const index_t cout = K - 2 - j >= 0 ? ch[static_cast<std::size_t>(K - 2 - j)] : b;
      const index_t r = h << j;
      for (Tensor<T>* t : {&c.s[k], &c.ds[k]}) t->resize(Shape{n, cin, r, r});
      for (Tensor<T>* t : {&c.u[k], &c.du[k]}) t->resize(Shape{n, cin, 2 * r, 2 * r});
      for (Tensor<T>* t : {&c.c[k], &c.dc[k]}) t->resize(Shape{n, cout, 2 * r, 2 * r});
    }
    const index_t S = h << K;
    for (Tensor<T>* t : {&c.so, &c.dso}) t->resize(Shape{n, b, S, S});
    c.in_shape = s;
  }

  VAEConfig cfg_;
  std::string prefix_;
  UpsampleNearest2d<T> up_;
  // Layers in vectors so the class stays default-movable (single layers are vectors of one).
  std::vector<Conv2d<T>> enc_in_, enc_down_, enc_out_, dec_in_, dec_up_, dec_out_;
  std::vector<GroupNorm<T>> enc_norm_, enc_norm_out_, dec_norm_, dec_norm_out_;
};

}  // namespace flowdiff::nn
