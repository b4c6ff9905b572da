// flowdiff/train/vae_backend.hpp — train/vae.hpp's training and measuring of a latent flow
// model's VAE for nn::BackendVAE on any backend B: train_vae minimises
// L = (1/N) sum (x^ - x)^2 + beta (1/N) sum KL(q(z|x) || N(0, I)) with AdamW over shuffled
// mini-batches, a linear warmup and cosine decay and global-norm clipping, step by step as the CPU
// train_vae does (the same options and report, the same batcher seed and order, the same
// generator calls: with B = Cpu and the same initial weights it follows the CPU run to the
// rounding of the layers' sums). The image set stays on the host: each batch is drawn there by
// data::BasicBatcher and copied to B (one upload per step); the noise, the model, the loss, the
// clipping and the optimizer run on B. Per step the host waits for the device four times: the
// batch's upload, the two loss reductions and the gradient norm. reconstruction_mse is the
// per-pixel mean squared error of D(mu(x)) against x, computed on B in batches. BackendTrainer
// (train/backend_trainer.hpp) trains path objectives, not an autoencoder; the CPU VAE has its own
// loop too, and this is that loop.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/data/batcher.hpp"
#include "flowdiff/nn/models/vae_backend.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/train/clip.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/schedule.hpp"
#include "flowdiff/train/vae.hpp"

namespace flowdiff::train {

/// Per-pixel mean of (D(mu(x)) - x)^2 over host images: [N, C, S, S], encoded and decoded on B
/// in batches of `batch` (each batch copied to B once; the squared errors summed there).
template <class T, Backend B>
double reconstruction_mse(const nn::BackendVAE<T, B>& vae, const nn::Parameters<T, B>& ps,
                          std::type_identity_t<View<const T>> images, index_t batch = 250) {
  require<config_error>(batch >= 1, "reconstruction_mse: batch must be >= 1, got ", batch);
  require<shape_error>(images.rank() == 4 && images.dim(0) >= 1,
                       "reconstruction_mse: images: expected shape [N, C, S, S] with N >= 1, got ",
                       images.shape());
  const index_t n = images.dim(0), b = std::min(batch, n);
  typename nn::BackendVAE<T, B>::Cache cache;
  Tensor<T, B> x, z, xhat;
  double se = 0;
  for (index_t b0 = 0; b0 < n; b0 += b) {
    const index_t m = std::min(n, b0 + b) - b0;
    const View<const T> rows = images.rows(b0, b0 + m);
    if (!(x.shape() == rows.shape())) {
      x.resize(rows.shape());
      z.resize(vae.latent_shape(m));
      xhat.resize(rows.shape());
    }
    BackendOps<B>::template upload<T>(x.view(), rows);
    vae.encode_latent(ps, View<const T, B>(x.view()), z.view(), cache);
    vae.decode(ps, View<const T, B>(z.view()), xhat.view(), cache.dec);
    se += B::reduce_sum(x.numel(), nn::kernels::SquaredDifference<T>{xhat.data(), x.data()});
  }
  const double mse = se / static_cast<double>(images.numel());
  require<numeric_error>(std::isfinite(mse),
                         "reconstruction_mse: the reconstruction is not finite");
  return mse;
}

/// Trains `vae` on B (parameters as they are: init or upload first) on host images:
/// [N, C, S, S], as train_vae does for nn::VAE. A non-finite loss is a numeric_error naming the
/// step (the parameters keep the last step's values). Returns steps, time and the last window's
/// loss parts.
template <class T, Backend B>
VAETrainReport train_vae(const nn::BackendVAE<T, B>& vae, nn::Parameters<T, B>& ps,
                         std::type_identity_t<View<const T>> images, const VAETrainOptions& o,
                         Generator& gen) {
  require<config_error>(o.steps >= 1 && o.batch >= 1 && o.lr > 0 && o.min_lr_ratio >= 0 &&
                            o.min_lr_ratio <= 1 && o.grad_clip >= 0,
                        "train_vae: need steps >= 1, batch >= 1, lr > 0, min_lr_ratio in [0, 1] "
                        "and grad_clip >= 0; got steps = ",
                        o.steps, ", batch = ", o.batch, ", lr = ", o.lr);
  require<shape_error>(images.rank() == 4 && images.dim(0) >= 1,
                       "train_vae: images: expected shape [N, C, S, S] with N >= 1, got ",
                       images.shape());
  require<config_error>(ps.allocated(), "train_vae: the parameters are not allocated");
  const index_t batch = std::min(o.batch, images.dim(0));
  data::BasicBatcher<T> batcher(images, View<const label_t>{}, gen.seed() + 1);
  AdamW<T, B> opt({.lr = o.lr, .weight_decay = o.weight_decay});
  typename nn::BackendVAE<T, B>::Cache cache;
  Tensor<T> xb(images.shape().with_rows(batch));
  Tensor<T, B> xd(xb.shape());
  const std::int64_t warmup = std::min<std::int64_t>(o.warmup_steps, o.steps - 1);
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  vae_detail::say(o, "vae: training " + std::to_string(ps.numel()) + " parameters on " + B::name +
                         ", " + std::to_string(o.steps) + " steps of " + std::to_string(batch));
  VAETrainReport rep;
  double win_recon = 0, win_kl = 0;
  std::int64_t win = 0;
  for (std::int64_t step = 0; step < o.steps; ++step) {
    opt.set_lr(warmup_cosine(step, o.lr, warmup, o.steps, o.lr * o.min_lr_ratio));
    batcher.next(xb.view(), {});
    BackendOps<B>::template upload<T>(xd.view(), xb.view());
    ps.zero_grad();
    const View<const T, B> x = xd.view();
    const nn::VAELoss l = vae.forward(ps, x, gen, cache);
    require<numeric_error>(std::isfinite(l.total), "train_vae: the loss is not finite (", l.total,
                           ") at step ", step + 1, "; lower the learning rate");
    vae.backward(ps, x, View<T, B>{}, cache);
    if (o.grad_clip > 0) clip_grad_norm(ps, o.grad_clip);
    opt.step(ps);
    win_recon += l.recon;
    win_kl += l.kl;
    ++win;
    const bool last = step + 1 == o.steps;
    if ((o.log_every > 0 && (step + 1) % o.log_every == 0) || last) {
      rep.final_recon = win_recon / static_cast<double>(win);
      rep.final_kl = win_kl / static_cast<double>(win);
      if (o.log_every > 0) {
        char buf[200];
        std::snprintf(
            buf, sizeof buf, "vae: step %lld/%lld recon %.3f (per pixel %.4f) kl %.2f (%.1f s)",
            static_cast<long long>(step + 1), static_cast<long long>(o.steps), rep.final_recon,
            rep.final_recon / static_cast<double>(images.row_size()), rep.final_kl, elapsed());
        vae_detail::say(o, buf);
      }
      win_recon = win_kl = 0;
      win = 0;
    }
  }
  rep.steps = o.steps;
  rep.seconds = elapsed();
  return rep;
}

}  // namespace flowdiff::train
