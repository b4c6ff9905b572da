// flowdiff/nn/latent.hpp — the plumbing of latent flow matching around nn::VAE (Rombach et al.
// 2022): a flow model is trained on the latents of a data set encoded once, z = s E(x), and its
// samples are decoded, x = D(z / s). E(x) is the encoder's posterior mean mu(x) (or a draw
// mu + exp(logvar / 2) eps when a generator is given), and s is the scale that gives the
// latents unit variance as the N(0, I) source of the flow expects (latent diffusion's
// scale_factor = 1 / std(z), the standard deviation over every element of the unscaled latents,
// about their mean, unbiased as torch.std). Everything runs in batches of a fixed size, so
// memory does not grow with the data set, and a sample's latent does not depend on the batch
// (the VAE has no batch statistics; posterior draws use per-sample noise streams only when the
// batch size is fixed, which encode_images keeps).
#pragma once

#include <algorithm>
#include <cmath>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/models/vae.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// The latents of images: [N, C, S, S] -> [N, z, h, w], the posterior mean (gen == nullptr) or a
/// posterior sample, unscaled, in batches of `batch` images.
template <class T>
Tensor<T> encode_images(const VAE<T>& vae, const Parameters<T>& ps, View<const T> images,
                        index_t batch, Generator* gen = nullptr) {
  require<config_error>(batch >= 1, "encode_images: batch must be >= 1, got ", batch);
  require<shape_error>(images.rank() == 4 && images.dim(0) >= 1,
                       "encode_images: images: expected shape [N, C, S, S] with N >= 1, got ",
                       images.shape());
  const index_t n = images.dim(0);
  Tensor<T> z(vae.latent_shape(n));
  typename VAE<T>::Cache cache;
  for (index_t b0 = 0; b0 < n; b0 += batch) {
    const index_t b1 = std::min(n, b0 + batch);
    vae.encode_latent(ps, View<const T>(images.rows(b0, b1)), z.view().rows(b0, b1), cache, gen);
  }
  return z;
}

/// Images of latents: [N, z, h, w] -> [N, C, S, S] (no scaling), in batches of `batch`.
template <class T>
Tensor<T> decode_latents(const VAE<T>& vae, const Parameters<T>& ps, View<const T> z,
                         index_t batch) {
  require<config_error>(batch >= 1, "decode_latents: batch must be >= 1, got ", batch);
  require<shape_error>(z.rank() == 4 && z.dim(0) >= 1,
                       "decode_latents: z: expected shape [N, z, h, w] with N >= 1, got ",
                       z.shape());
  const index_t n = z.dim(0);
  Tensor<T> x(vae.image_shape(n));
  typename VAE<T>::DecoderCache cache;
  for (index_t b0 = 0; b0 < n; b0 += batch) {
    const index_t b1 = std::min(n, b0 + batch);
    vae.decode(ps, View<const T>(z.rows(b0, b1)), x.view().rows(b0, b1), cache);
  }
  return x;
}

/// Mean and standard deviation (unbiased, as torch.std) over every element of z, in double.
struct LatentMoments {
  double mean = 0, std = 0;
};

template <class T>
LatentMoments latent_moments(View<const T> z) {
  require<shape_error>(z.numel() >= 2, "latent_moments: need at least 2 values, got shape ",
                       z.shape());
  double s = 0;
  for (index_t i = 0; i < z.numel(); ++i) s += static_cast<double>(z[i]);
  const double m = s / static_cast<double>(z.numel());
  double q = 0;
  for (index_t i = 0; i < z.numel(); ++i) {
    const double d = static_cast<double>(z[i]) - m;
    q += d * d;
  }
  const double sd = std::sqrt(q / static_cast<double>(z.numel() - 1));
  require<numeric_error>(std::isfinite(sd), "latent_moments: the latents are not finite");
  return {m, sd};
}

/// Latent diffusion's scale factor s = 1 / std(z), so that s z has unit variance. A constant z
/// (std 0) is a numeric_error: nothing can be scaled to unit variance.
template <class T>
double unit_variance_scale(View<const T> z) {
  const auto m = latent_moments(z);
  require<numeric_error>(m.std > 0, "unit_variance_scale: the latents have zero spread (std ",
                         m.std, "); the encoder is degenerate");
  return 1.0 / m.std;
}

/// A trained VAE with its latent scale s: encode(x) = s E(x), decode(z) = D(z / s). Holds
/// pointers to the VAE and its parameters (they must outlive it).
template <class T>
class LatentCodec {
 public:
  LatentCodec(const VAE<T>& vae, const Parameters<T>& ps, double scale, index_t batch = 250)
      : vae_(&vae), ps_(&ps), scale_(scale), batch_(batch) {
    require<config_error>(std::isfinite(scale) && scale > 0,
                          "LatentCodec: the latent scale must be finite and > 0, got ", scale);
    require<config_error>(batch >= 1, "LatentCodec: batch must be >= 1, got ", batch);
  }
  LatentCodec(const VAE<T>&&, const Parameters<T>&, double, index_t = 0) = delete;

  double scale() const { return scale_; }
  const VAE<T>& vae() const { return *vae_; }
  /// The shape of one latent, [z, h, w].
  Shape sample_shape() const { return vae_->latent_shape(1).tail(); }

  /// images: [N, C, S, S] -> s E(x): [N, z, h, w] (posterior mean, or a draw with gen).
  Tensor<T> encode(View<const T> images, Generator* gen = nullptr) const {
    Tensor<T> z = encode_images(*vae_, *ps_, images, batch_, gen);
    const T s = static_cast<T>(scale_);
    for (index_t i = 0; i < z.numel(); ++i) z[i] *= s;
    return z;
  }

  /// latents s z: [N, z, h, w] -> D(z): [N, C, S, S].
  Tensor<T> decode(View<const T> latents) const {
    Tensor<T> z = Tensor<T>(latents.shape());
    const T inv = static_cast<T>(1.0 / scale_);
    for (index_t i = 0; i < z.numel(); ++i) z[i] = latents[i] * inv;
    return decode_latents(*vae_, *ps_, View<const T>(z), batch_);
  }

 private:
  const VAE<T>* vae_;
  const Parameters<T>* ps_;
  double scale_;
  index_t batch_;
};

}  // namespace flowdiff::nn
