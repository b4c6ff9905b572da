// flowdiff/train/vae.hpp — training, measuring and caching the nn::VAE of a latent flow model.
// train_vae minimises the VAE's loss L = (1/N) sum (x^ - x)^2 + beta (1/N) sum KL(q(z|x) || N(0,
// I)) (nn/models/vae.hpp) with AdamW over shuffled mini-batches (data::BasicBatcher), a linear
// warmup and cosine decay, and global-norm clipping. reconstruction_mse is the per-pixel mean
// squared error of D(mu(x)) against x (the posterior mean, no sampling: what a decoded latent
// sample goes through). load_or_train_vae reuses a checkpoint when its metadata describes exactly
// this VAE (and its parameters load strictly), else trains and writes one atomically; the
// checkpoint also records the latent scale s = 1 / std(mu(x)) over the first options.scale_images
// training images (nn/latent.hpp) and the measured test MSE, so a latent flow model trained on s
// mu(x) can be decoded with the same s later.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <string>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/data/batcher.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/latent.hpp"
#include "flowdiff/nn/models/vae.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/train/clip.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/schedule.hpp"

namespace flowdiff::train {

struct VAETrainOptions {
  std::int64_t steps = 2000;        ///< optimizer steps
  index_t batch = 64;               ///< images per step
  double lr = 2e-3;                 ///< peak AdamW learning rate
  double weight_decay = 0;          ///< AdamW decoupled weight decay
  std::int64_t warmup_steps = 100;  ///< linear warmup, then cosine decay to lr * min_lr_ratio
  double min_lr_ratio = 0.05;
  double grad_clip = 1.0;          ///< global-norm clipping (0: off)
  index_t eval_batch = 250;        ///< batch of the test MSE and the encoding
  index_t scale_images = 5000;     ///< training images whose latents give the scale
  std::int64_t log_every = 100;    ///< steps between progress lines (0: none)
  std::ostream* log = &std::cout;  ///< progress lines (nullptr: silent)
};

struct VAETrainReport {
  bool loaded = false;  ///< read from the cache, not trained
  std::int64_t steps = 0;
  double seconds = 0;  ///< training wall time (0 when loaded)
  double final_recon = std::numeric_limits<double>::quiet_NaN();   ///< last log window's mean
  double final_kl = std::numeric_limits<double>::quiet_NaN();      ///< (per image, as VAELoss)
  double test_mse = std::numeric_limits<double>::quiet_NaN();      ///< per pixel, D(mu(x)) vs x
  double latent_scale = std::numeric_limits<double>::quiet_NaN();  ///< 1 / std(mu(x))
  double latent_mean = std::numeric_limits<double>::quiet_NaN();   ///< mean of mu(x)
};

namespace vae_detail {

inline void say(const VAETrainOptions& o, const std::string& line) {
  if (o.log != nullptr) *o.log << line << std::endl;
}

/// The string a checkpoint's metadata must match to be reused: the architecture, beta and the
/// training recipe (steps, batch, lr), so asking for another training gives another VAE.
inline std::string describe(const nn::VAEConfig& c, const VAETrainOptions& o) {
  std::ostringstream os;
  os << "VAE in_channels=" << c.in_channels << " image_size=" << c.image_size << " channels=";
  for (std::size_t i = 0; i < c.channels.size(); ++i) os << (i ? "," : "") << c.channels[i];
  os << " base_channels=" << c.base_channels << " latent_channels=" << c.latent_channels
     << " groups=" << c.groups << " beta=" << c.beta << " trained=" << o.steps << "x" << o.batch
     << " lr=" << o.lr;
  return os.str();
}

/// A number with every digit a double round-trips through.
inline std::string number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline double parse_number(const std::map<std::string, std::string>& meta, const std::string& key,
                           const std::filesystem::path& file) {
  const auto it = meta.find(key);
  require<io_error>(it != meta.end(), file.string(), ": VAE checkpoint metadata lacks '", key, "'");
  std::istringstream is(it->second);
  double v = 0;
  is >> v;
  require<io_error>(!is.fail() && std::isfinite(v), file.string(), ": metadata '", key, "' = '",
                    it->second, "' is not a finite number");
  return v;
}

}  // namespace vae_detail

/// Per-pixel mean of (D(mu(x)) - x)^2 over images: [N, C, S, S], in batches of `batch`.
template <class T>
double reconstruction_mse(const nn::VAE<T>& vae, const nn::Parameters<T>& ps, View<const T> images,
                          index_t batch = 250) {
  const Tensor<T> z = nn::encode_images(vae, ps, images, batch);
  const Tensor<T> x = nn::decode_latents(vae, ps, z.view(), batch);
  double se = 0;
  for (index_t i = 0; i < x.numel(); ++i) {
    const double d = static_cast<double>(x[i]) - static_cast<double>(images[i]);
    se += d * d;
  }
  const double mse = se / static_cast<double>(x.numel());
  require<numeric_error>(std::isfinite(mse),
                         "reconstruction_mse: the reconstruction is not finite");
  return mse;
}

/// Trains `vae` (parameters as they are: init first) on images: [N, C, S, S]. A non-finite loss
/// is a numeric_error naming the step. Returns steps, time and the last window's loss parts.
template <class T>
VAETrainReport train_vae(const nn::VAE<T>& vae, nn::Parameters<T>& ps, View<const T> images,
                         const VAETrainOptions& o, Generator& gen) {
  require<config_error>(o.steps >= 1 && o.batch >= 1 && o.lr > 0 && o.min_lr_ratio >= 0 &&
                            o.min_lr_ratio <= 1 && o.grad_clip >= 0,
                        "train_vae: need steps >= 1, batch >= 1, lr > 0, min_lr_ratio in [0, 1] "
                        "and grad_clip >= 0; got steps = ",
                        o.steps, ", batch = ", o.batch, ", lr = ", o.lr);
  require<shape_error>(images.rank() == 4 && images.dim(0) >= 1,
                       "train_vae: images: expected shape [N, C, S, S] with N >= 1, got ",
                       images.shape());
  const index_t batch = std::min(o.batch, images.dim(0));
  data::BasicBatcher<T> batcher(images, View<const label_t>{}, gen.seed() + 1);
  AdamW<T> opt({.lr = o.lr, .weight_decay = o.weight_decay});
  typename nn::VAE<T>::Cache cache;
  Tensor<T> xb(images.shape().with_rows(batch));
  const std::int64_t warmup = std::min<std::int64_t>(o.warmup_steps, o.steps - 1);
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  vae_detail::say(o, "vae: training " + std::to_string(ps.numel()) + " parameters, " +
                         std::to_string(o.steps) + " steps of " + std::to_string(batch));
  VAETrainReport rep;
  double win_recon = 0, win_kl = 0;
  std::int64_t win = 0;
  for (std::int64_t step = 0; step < o.steps; ++step) {
    opt.set_lr(warmup_cosine(step, o.lr, warmup, o.steps, o.lr * o.min_lr_ratio));
    batcher.next(xb.view(), {});
    ps.zero_grad();
    const nn::VAELoss l = vae.forward(ps, xb.view(), gen, cache);
    require<numeric_error>(std::isfinite(l.total), "train_vae: the loss is not finite (", l.total,
                           ") at step ", step + 1, "; lower the learning rate");
    vae.backward(ps, xb.view(), {}, cache);
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

/// Loads the VAE at `cache_path` when its metadata describes exactly this configuration and
/// training recipe (vae_detail::describe) and its parameters load strictly (a stale or corrupt file
/// is reported on options.log and replaced); otherwise initialises from `gen`, trains on
/// train_images and writes the checkpoint with its latent scale and test MSE. Either way the test
/// MSE is measured on test_images and the latent scale is the checkpoint's (it was measured when
/// the VAE was trained). An empty cache_path trains and writes nothing. train_images, test_images:
/// [N, C, S, S].
///
/// `train(ps, gen)`, when given, does the training instead of train_vae(vae, ps, train_images, o,
/// gen): it receives the initialised parameters and the generator, leaves the trained parameters
/// in `ps` and returns the report (steps, seconds, final loss parts). This is how the VAE trains
/// elsewhere, e.g. on a GPU (upload to an nn::BackendVAE, train_vae there, download: the examples'
/// fashion_latent --device cuda), while the cache, the latent scale and the test error stay here.
template <class T, class Train>
VAETrainReport load_or_train_vae(const std::filesystem::path& cache_path, const nn::VAE<T>& vae,
                                 nn::Parameters<T>& ps, View<const T> train_images,
                                 View<const T> test_images, const VAETrainOptions& o,
                                 Generator& gen, Train&& train) {
  const std::string desc = vae_detail::describe(vae.config(), o);
  if (!cache_path.empty() && std::filesystem::exists(cache_path)) {
    try {
      const auto file = io::SafetensorsFile::read(cache_path);
      const auto& meta = file.metadata();
      const auto it = meta.find("flowdiff.vae");
      require<io_error>(
          it != meta.end() && it->second == desc, cache_path.string(), ": the checkpoint is for '",
          it == meta.end() ? std::string("(no description)") : it->second, "', not '", desc, "'");
      VAETrainReport rep;
      rep.latent_scale = vae_detail::parse_number(meta, "latent_scale", cache_path);
      rep.latent_mean = vae_detail::parse_number(meta, "latent_mean", cache_path);
      require<io_error>(rep.latent_scale > 0, cache_path.string(), ": latent_scale ",
                        rep.latent_scale, " is not positive");
      nn::load_parameters(ps, file, {.strict = true});
      rep.loaded = true;
      rep.steps = static_cast<std::int64_t>(vae_detail::parse_number(meta, "steps", cache_path));
      rep.test_mse = reconstruction_mse(vae, ps, test_images, o.eval_batch);
      vae_detail::say(o, "vae: loaded " + cache_path.string());
      return rep;
    } catch (const error& e) {
      vae_detail::say(o, std::string("vae: cannot use the cache (") + e.what() + "); retraining");
    }
  }
  vae.init(ps, gen);
  VAETrainReport rep = train(ps, gen);
  const index_t m = std::min<index_t>(train_images.dim(0), std::max<index_t>(2, o.scale_images));
  const Tensor<T> z =
      nn::encode_images(vae, ps, View<const T>(train_images.rows(0, m)), o.eval_batch);
  const auto moments = nn::latent_moments(z.view());
  rep.latent_scale = nn::unit_variance_scale(z.view());
  rep.latent_mean = moments.mean;
  rep.test_mse = reconstruction_mse(vae, ps, test_images, o.eval_batch);
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "vae: trained in %.1f s; test reconstruction MSE %.5f per pixel; latent mean "
                "%.3f, std %.3f (scale %.4f)",
                rep.seconds, rep.test_mse, moments.mean, moments.std, rep.latent_scale);
  vae_detail::say(o, buf);
  if (!cache_path.empty()) {
    if (cache_path.has_parent_path()) std::filesystem::create_directories(cache_path.parent_path());
    nn::save_parameters(ps, cache_path,
                        {{"flowdiff.vae", desc},
                         {"latent_scale", vae_detail::number(rep.latent_scale)},
                         {"latent_mean", vae_detail::number(rep.latent_mean)},
                         {"latent_scale_images", std::to_string(m)},
                         {"test_mse", vae_detail::number(rep.test_mse)},
                         {"train_seconds", std::to_string(rep.seconds)},
                         {"steps", std::to_string(rep.steps)}});
    vae_detail::say(o, "vae: wrote " + cache_path.string());
  }
  return rep;
}

/// load_or_train_vae training with train_vae on the CPU.
template <class T>
VAETrainReport load_or_train_vae(const std::filesystem::path& cache_path, const nn::VAE<T>& vae,
                                 nn::Parameters<T>& ps, View<const T> train_images,
                                 View<const T> test_images, const VAETrainOptions& o,
                                 Generator& gen) {
  return load_or_train_vae(
      cache_path, vae, ps, train_images, test_images, o, gen,
      [&](nn::Parameters<T>& p, Generator& g) { return train_vae(vae, p, train_images, o, g); });
}

}  // namespace flowdiff::train
