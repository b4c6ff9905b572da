// tests/support/backend_vae_checks.hpp — the checks of nn::BackendVAE (nn/models/vae_backend.hpp)
// and its training (train/vae_backend.hpp), written once and templated on the backend B:
// tests/test_nn_backend_vae.cpp runs them with B = Cpu (Catch2), tests/cuda/test_cuda_vae.cu with
// B = Cpu in its host part and B = Cuda in its device part. No Catch2 and no CUDA here: every
// body appends (ok, message) entries to a spatial::Log (tests/support/backend_spatial_checks.hpp)
// that the caller turns into assertions.
//   model_checks       BackendVAE against nn::VAE from the same weights on two tiny
//                      configurations: the noise forward() draws from the same seed (bit-equal
//                      with B = Cpu, the fill_normal rule on a device) and the generator offset,
//                      mu, logvar, x^, the loss parts, dx and every parameter gradient of
//                      scale * loss (accumulated onto non-zero gradients), a posterior sample of
//                      encode_latent, a decode at another batch size (DESIGN.md §4: normalised
//                      MSE <= 1e-7 in fp32; fp64 element-wise 1e-12 + 1e-12 |ref| on the CPU,
//                      normalised MSE <= 1e-24 elsewhere; the loss parts element-wise, rtol 1e-5
//                      in fp32 and 1e-12 in fp64)
//   train_checks       train_vae on B against the CPU train_vae from the same weights and seed
//                      (AdamW, warmup + cosine, clipping, a batcher epoch boundary): parameters
//                      and the report's loss means element-wise (fp32 1e-5 + 1e-4 |ref|, fp64
//                      1e-11 + 1e-9 |ref|: the layers' sums run in another order than nn::VAE's),
//                      the generator offset exactly; reconstruction_mse on B against the CPU's
//   checkpoint_checks  a CPU checkpoint loads into BackendVAE's parameters on B and comes back
//                      bit-equal; a checkpoint written from B (after training there) loads
//                      strictly into nn::VAE, bit-equal; BackendVAE::init against nn::VAE::init
//   cache_checks       load_or_train_vae training on B through its hook (fashion_latent --device
//                      cuda's path) against load_or_train_vae on the CPU; the cache reused
//   error_checks       shapes, calls out of order, configurations and layouts, by name; the
//                      cache's buffers reused while N repeats
// Every comparison first requires finite values and a reference that is not all zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/data/batcher.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/models/vae.hpp>
#include <flowdiff/nn/models/vae_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <flowdiff/train/clip.hpp>
#include <flowdiff/train/vae.hpp>
#include <flowdiff/train/vae_backend.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "backend_spatial_checks.hpp"
#include "files.hpp"

namespace flowdiff::test::vae {

using backend_common::compare_same;
using backend_common::run_tolerance;
using backend_common::type_name;
using spatial::compare;
using spatial::compare_exact;
using spatial::device_copy;
using spatial::expect_throw;
using spatial::guard;
using spatial::host_copy;
using spatial::Log;
using spatial::none;
using spatial::str;
using spatial::Tolerance;

/// The loss parts (doubles summed from T values): element-wise, relative.
template <class T>
Tolerance loss_tolerance() {
  if constexpr (std::is_same_v<T, double>)
    return {true, 0, 1e-12, 0};
  else
    return {true, 0, 1e-5, 0};
}

/// Two tiny VAEs. Built member by member (GCC 12 warns maybe-uninitialized on braced configs).
struct VaeCase {
  std::string name;
  nn::VAEConfig cfg;
  index_t n = 3;     // batch of forward / backward
  double scale = 1;  // backward's scale
  bool dx = true;    // ask for dx
  std::uint64_t seed = 1;
};

inline nn::VAEConfig two_level_config() {
  nn::VAEConfig c;
  c.in_channels = 2;
  c.image_size = 8;
  c.channels = {4, 8};
  c.base_channels = 4;
  c.latent_channels = 2;
  c.groups = 2;
  c.beta = 1;  // large enough that the KL term's gradient shows next to the reconstruction's
  return c;
}

inline std::vector<VaeCase> vae_cases() {
  std::vector<VaeCase> v;
  VaeCase a;
  a.name = "2 levels, 2 -> {4, 8} channels, 8x8, latent 2x2x2";
  a.cfg = two_level_config();
  a.n = 3;
  a.seed = 31;
  v.push_back(a);
  VaeCase b;
  b.name = "1 level, 6x6, base 8, latent 3x3x3, scale 0.7, no dx";
  b.cfg.in_channels = 1;
  b.cfg.image_size = 6;
  b.cfg.channels = {4};
  b.cfg.base_channels = 8;
  b.cfg.latent_channels = 3;
  b.cfg.groups = 4;
  b.cfg.beta = 0.5;
  b.n = 2;
  b.scale = 0.7;
  b.dx = false;
  b.seed = 32;
  v.push_back(b);
  return v;
}

/// nn::VAE's initial weights drawn with `seed`, then the GroupNorm scales and shifts from
/// N(1, 0.3^2) / N(0, 0.3^2) so that a swapped or missing norm gradient shows.
template <class T>
void host_init(nn::Parameters<T>& ps, const nn::VAE<T>& vae, Generator& gen) {
  ps.allocate();
  vae.init(ps, gen);
  for (index_t id = 0; id < ps.count(); ++id) {
    const auto& name = ps.info(id).name;
    if (name.find("norm") != std::string::npos)
      fill_normal(ps.param(id), gen, T(name.ends_with(".weight") ? 1 : 0), T(0.3));
  }
}

/// A case's inputs on the host: the weights, gradients already holding N(0, 1) values (backward
/// must accumulate onto them), images x ~ U[-1, 1), a latent batch of another size for decode.
template <class T>
struct VaeInputs {
  nn::Parameters<T> ps;
  nn::VAE<T> vae;
  Tensor<T> x, z;
  explicit VaeInputs(const VaeCase& c) : vae(ps, c.cfg) {
    Generator gen(c.seed);
    host_init(ps, vae, gen);
    fill_normal(ps.flat_grads(), gen);
    x = Tensor<T>(vae.image_shape(c.n));
    fill_uniform(x, gen, T(-1), T(1));
    z = randn<T>(vae.latent_shape(c.n + 1), gen);
  }
};

template <class T>
struct VaeResult {
  std::vector<T> eps, mu, logvar, xhat, dx, grads, sample, decoded;
  std::vector<double> loss;  // recon, kl, total
  std::uint64_t offset = 0;  // of the forward's generator
};

/// The noise of forward() comes from Generator(seed + 100), the posterior sample's from seed + 200.
template <class T>
VaeResult<T> vae_reference(const VaeCase& c) {
  VaeInputs<T> in(c);
  typename nn::VAE<T>::Cache cache;
  Generator gen(c.seed + 100);
  const nn::VAELoss l = in.vae.forward(in.ps, in.x.view(), gen, cache);
  Tensor<T> dx(in.x.shape());
  in.vae.backward(in.ps, in.x.view(), c.dx ? dx.view() : none<T>(), cache, static_cast<T>(c.scale));
  VaeResult<T> r;
  r.eps = cache.eps.to_vector();
  r.mu = cache.mu.to_vector();
  r.logvar = cache.logvar.to_vector();
  r.xhat = cache.xhat.to_vector();
  r.loss = {l.recon, l.kl, l.total};
  if (c.dx) r.dx = dx.to_vector();
  r.grads = host_copy<T, Cpu>(in.ps.flat_grads());
  r.offset = gen.offset();
  Tensor<T> zs(in.vae.latent_shape(c.n)), xd(in.vae.image_shape(c.n + 1));
  Generator g2(c.seed + 200);
  in.vae.encode_latent(in.ps, in.x.view(), zs.view(), cache, &g2);
  r.sample = zs.to_vector();
  in.vae.decode(in.ps, in.z.view(), xd.view(), cache.dec);
  r.decoded = xd.to_vector();
  return r;
}

template <class T, Backend B>
VaeResult<T> vae_on_backend(const VaeCase& c) {
  VaeInputs<T> in(c);
  nn::Parameters<T, B> ps;
  const nn::BackendVAE<T, B> vae(ps, c.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);  // checks the layout: names, shapes, offsets
  spatial::upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  const auto x = device_copy<T, B>(in.x.view());
  const auto z = device_copy<T, B>(in.z.view());
  typename nn::BackendVAE<T, B>::Cache cache;
  Generator gen(c.seed + 100);
  const nn::VAELoss l = vae.forward(ps, x.view(), gen, cache);
  Tensor<T, B> dx(x.shape());
  vae.backward(ps, x.view(), c.dx ? dx.view() : none<T, B>(), cache, static_cast<T>(c.scale));
  VaeResult<T> r;
  r.eps = host_copy<T, B>(cache.eps.view());
  r.mu = host_copy<T, B>(cache.mu.view());
  r.logvar = host_copy<T, B>(cache.logvar.view());
  r.xhat = host_copy<T, B>(cache.xhat.view());
  r.loss = {l.recon, l.kl, l.total};
  if (c.dx) r.dx = host_copy<T, B>(dx.view());
  r.grads = host_copy<T, B>(ps.flat_grads());
  r.offset = gen.offset();
  Tensor<T, B> zs(vae.latent_shape(c.n)), xd(vae.image_shape(c.n + 1));
  Generator g2(c.seed + 200);
  vae.encode_latent(ps, x.view(), zs.view(), cache, &g2);
  r.sample = host_copy<T, B>(zs.view());
  vae.decode(ps, z.view(), xd.view(), cache.dec);
  r.decoded = host_copy<T, B>(xd.view());
  return r;
}

template <class T, Backend B>
void model_checks(Log& log) {
  const Tolerance tol = spatial::tolerance<T, B>();
  for (const auto& c : vae_cases()) {
    const std::string what = str("BackendVAE<", type_name<T>(), ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = vae_reference<T>(c);
      const auto got = vae_on_backend<T, B>(c);
      // fill_normal on B: on a device the normals go through its log / sin / cos (a few ulp).
      compare_same<T, B>(log, what + ": forward's noise eps", got.eps, ref.eps);
      log.expect(got.offset == ref.offset && ref.offset > 0,
                 str(what, ": generator offset ", got.offset, " == ", ref.offset));
      compare(log, what + ": mu", got.mu, ref.mu, tol);
      compare(log, what + ": logvar", got.logvar, ref.logvar, tol);
      compare(log, what + ": x^", got.xhat, ref.xhat, tol);
      compare(log, what + ": loss (recon, kl, total)", got.loss, ref.loss, loss_tolerance<T>());
      if (c.dx) compare(log, what + ": dx", got.dx, ref.dx, tol);
      compare(log, what + ": parameter gradients", got.grads, ref.grads, tol);
      compare(log, what + ": encode_latent's posterior sample", got.sample, ref.sample, tol);
      compare(log, what + ": decode at batch N + 1", got.decoded, ref.decoded, tol);
      // The KL term is not negligible next to the reconstruction (its gradient is exercised).
      log.expect(c.cfg.beta * ref.loss[1] > 1e-3 * ref.loss[0],
                 str(what, ": beta kl = ", c.cfg.beta * ref.loss[1], " vs recon ", ref.loss[0]));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Training.
// ---------------------------------------------------------------------------------------------

/// Smooth two-channel 8 x 8 images in [-1, 1]: a random phase and frequency per image.
template <class T>
Tensor<T> wave_images(index_t n, std::uint64_t seed) {
  Generator gen(seed);
  Tensor<T> x(Shape{n, 2, 8, 8});
  for (index_t i = 0; i < n; ++i) {
    const double ph = 6.28 * gen.uniform<double>(), f = 0.3 + 0.5 * gen.uniform<double>();
    for (index_t j = 0; j < 128; ++j) {
      const index_t ch = j / 64, p = j % 64;
      x[i * 128 + j] =
          static_cast<T>(std::sin(f * static_cast<double>(p % 8 + (ch + 1) * (p / 8)) + ph));
    }
  }
  return x;
}

/// Four steps of batch 4 over 10 images (the batcher starts a second epoch at step 3), warmup 1,
/// clipping at 50, silent. The gradient norms (the reconstruction error is summed over pixels) are
/// about 110 to 170, so every step clips, by a factor of 2 to 4. Not far more: train_vae's AdamW
/// has eps = 1e-8, and clipping every gradient down toward it makes a weight whose gradient
/// cancels to ~1e-8 move by an arbitrary share of lr under another summation order (measured
/// with a clip of 0.5: one of 1776 fp32 weights, in encoder.conv_out, at 0.71 of the rule after
/// four steps on the CPU, against about 0.01 for every weight with a clip of 50).
inline train::VAETrainOptions train_options() {
  train::VAETrainOptions o;
  o.steps = 4;
  o.batch = 4;
  o.lr = 1e-2;
  o.weight_decay = 0.01;
  o.warmup_steps = 1;
  o.grad_clip = 50;
  o.log_every = 0;
  o.log = nullptr;
  return o;
}

template <class T>
struct TrainOutcome {
  train::VAETrainReport rep;
  std::vector<T> params;
  std::uint64_t offset = 0;
  double mse = 0;  // reconstruction_mse after training
};

template <class T>
TrainOutcome<T> train_reference(const Tensor<T>& images) {
  nn::Parameters<T> ps;
  const nn::VAE<T> vae(ps, two_level_config());
  Generator init(41);
  host_init(ps, vae, init);
  Generator gen(42);
  TrainOutcome<T> r;
  r.rep = train::train_vae(vae, ps, images.view(), train_options(), gen);
  r.params = host_copy<T, Cpu>(ps.flat_params());
  r.offset = gen.offset();
  r.mse = train::reconstruction_mse(vae, ps, images.view(), 4);
  return r;
}

template <class T, Backend B>
TrainOutcome<T> train_on_backend(const Tensor<T>& images) {
  nn::Parameters<T> host;
  const nn::VAE<T> ref(host, two_level_config());
  Generator init(41);
  host_init(host, ref, init);
  nn::Parameters<T, B> ps;
  const nn::BackendVAE<T, B> vae(ps, two_level_config());
  ps.allocate();
  nn::upload_parameters(ps, host);
  Generator gen(42);
  TrainOutcome<T> r;
  r.rep = train::train_vae(vae, ps, images.view(), train_options(), gen);
  r.params = host_copy<T, B>(ps.flat_params());
  r.offset = gen.offset();
  r.mse = train::reconstruction_mse(vae, ps, images.view(), 4);
  return r;
}

template <class T, Backend B>
void train_checks(Log& log) {
  const std::string what =
      str("train_vae(BackendVAE<", type_name<T>(), ", ", B::name, ">) vs train_vae(nn::VAE)");
  guard(log, what, [&] {
    const auto images = wave_images<T>(10, 43);
    const auto ref = train_reference<T>(images);
    const auto got = train_on_backend<T, B>(images);
    const Tolerance tol = run_tolerance<T>();
    compare(log, what + ": parameters after 4 steps", got.params, ref.params, tol);
    compare(log, what + ": the report's mean recon and kl",
            std::vector<double>{got.rep.final_recon, got.rep.final_kl},
            std::vector<double>{ref.rep.final_recon, ref.rep.final_kl}, {true, 0, tol.rtol, 0});
    compare(log, what + ": reconstruction_mse after training", std::vector<double>{got.mse},
            std::vector<double>{ref.mse}, {true, 0, tol.rtol, 0});
    log.expect(got.rep.steps == 4 && got.offset == ref.offset && ref.offset == 4,
               str(what, ": 4 steps, generator offset ", got.offset, " == ", ref.offset,
                   " (one noise stream per step)"));
    // The steps moved the weights: not a comparison of two untouched initialisations.
    nn::Parameters<T> host;
    const nn::VAE<T> vae(host, two_level_config());
    Generator init(41);
    host_init(host, vae, init);
    const auto start = host_copy<T, Cpu>(host.flat_params());
    double moved = 0;
    for (std::size_t i = 0; i < start.size() && i < ref.params.size(); ++i)
      moved = std::max(moved, std::abs(static_cast<double>(ref.params[i] - start[i])));
    log.expect(moved > 1e-3,
               str(what, ": the reference moved the weights (max |change| ", moved, " > 1e-3)"));
    // The first step clips: its batch (train_vae's batcher, seed 42 + 1) has a norm above 50.
    data::BasicBatcher<T> batcher(images.view(), View<const label_t>{}, 43);
    Tensor<T> xb(Shape{4, 2, 8, 8});
    batcher.next(xb.view(), {});
    typename nn::VAE<T>::Cache cache;
    Generator noise(42);
    host.zero_grad();
    vae.forward(host, xb.view(), noise, cache);
    vae.backward(host, xb.view(), {}, cache);
    const double norm = train::clip_grad_norm(host, 1e30);
    log.expect(norm > 50, str(what, ": the first step's gradient norm ", norm,
                              " exceeds the clip 50 (clipping is exercised)"));
  });
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and initialisation.
// ---------------------------------------------------------------------------------------------

template <Backend B>
void checkpoint_checks(Log& log) {
  using T = float;
  const std::string what = str("BackendVAE<float, ", B::name, "> checkpoints");
  guard(log, what, [&] {
    TempDir dir(std::string("backend_vae_ckpt_") + B::name);
    // CPU -> file -> B: the values arrive unchanged and come back unchanged.
    nn::Parameters<T> host;
    const nn::VAE<T> ref(host, two_level_config());
    Generator init(51);
    host_init(host, ref, init);
    nn::save_parameters(host, dir / "cpu.safetensors");
    nn::Parameters<T, B> ps;
    const nn::BackendVAE<T, B> vae(ps, two_level_config());
    ps.allocate();
    nn::load_parameters(ps, dir / "cpu.safetensors", {.strict = true});
    nn::Parameters<T> back;
    const nn::VAE<T> ref2(back, two_level_config());
    back.allocate();
    nn::download_parameters(back, ps);
    compare_exact(log, what + ": CPU file -> B -> host", host_copy<T, Cpu>(back.flat_params()),
                  host_copy<T, Cpu>(host.flat_params()));

    // Trained on B, written from B, loaded strictly into nn::VAE.
    const auto images = wave_images<T>(6, 52);
    train::VAETrainOptions o = train_options();
    o.steps = 2;
    Generator gen(53);
    train::train_vae(vae, ps, images.view(), o, gen);
    nn::save_parameters(ps, dir / "backend.safetensors");
    nn::Parameters<T> loaded;
    const nn::VAE<T> cpu(loaded, two_level_config());
    loaded.allocate();
    nn::load_parameters(loaded, dir / "backend.safetensors", {.strict = true});
    compare_exact(log, what + ": B file -> nn::VAE", host_copy<T, Cpu>(loaded.flat_params()),
                  host_copy<T, B>(ps.flat_params()));
    compare(log, what + ": nn::VAE's reconstruction_mse of the loaded file vs BackendVAE's",
            std::vector<double>{train::reconstruction_mse(cpu, loaded, images.view(), 4)},
            std::vector<double>{train::reconstruction_mse(vae, ps, images.view(), 4)},
            {true, 0, 1e-5, 0});

    // BackendVAE::init draws what nn::VAE::init draws (uniforms on [lo, hi): the last bit may
    // differ on a device, as fill_uniform's).
    Generator g1(54), g2(54);
    nn::Parameters<T> hp;
    const nn::VAE<T> hv(hp, two_level_config());
    hp.allocate();
    hv.init(hp, g1);
    nn::Parameters<T, B> dp;
    const nn::BackendVAE<T, B> dv(dp, two_level_config());
    dp.allocate();
    dv.init(dp, g2);
    if constexpr (std::is_same_v<B, Cpu>)
      compare_exact(log, what + ": init vs nn::VAE::init", host_copy<T, B>(dp.flat_params()),
                    host_copy<T, Cpu>(hp.flat_params()));
    else
      compare(log, what + ": init vs nn::VAE::init", host_copy<T, B>(dp.flat_params()),
              host_copy<T, Cpu>(hp.flat_params()), {true, 1e-6, 1e-5, 0});
    log.expect(g1.offset() == g2.offset(),
               str(what, ": init's generator offset ", g2.offset(), " == ", g1.offset()));
  });
}

// ---------------------------------------------------------------------------------------------
// The VAE cache trained on B (fashion_latent --device cuda's path).
// ---------------------------------------------------------------------------------------------

/// load_or_train_vae with a `train` hook that trains on B: upload the initialised parameters to a
/// BackendVAE<float, B>, train_vae there, download. Against load_or_train_vae on the CPU from the
/// same generator: the hook runs once, on exactly the weights nn::VAE::init drew; the trained
/// parameters, the latent scale and the test error follow the CPU's (run_tolerance: the same four
/// steps in another summation order); the cache holds exactly the hook's parameters; a second call
/// loads the cache and does not train.
template <Backend B>
void cache_checks(Log& log) {
  using T = float;
  const std::string what = str("load_or_train_vae training BackendVAE<float, ", B::name, ">");
  guard(log, what, [&] {
    TempDir dir(std::string("backend_vae_cache_") + B::name);
    const auto images = wave_images<T>(10, 43);
    const auto test_images = wave_images<T>(6, 44);
    const train::VAETrainOptions o = train_options();

    // The reference: the CPU's load_or_train_vae (train_vae on nn::VAE).
    nn::Parameters<T> ref_ps;
    const nn::VAE<T> ref_vae(ref_ps, two_level_config());
    ref_ps.allocate();
    Generator ref_gen(61);
    const auto ref = train::load_or_train_vae(dir / "cpu.safetensors", ref_vae, ref_ps,
                                              images.view(), test_images.view(), o, ref_gen);

    nn::Parameters<T> ps;
    const nn::VAE<T> vae(ps, two_level_config());
    ps.allocate();
    int calls = 0;
    std::vector<T> initial, trained;
    const auto on_backend = [&](nn::Parameters<T>& p, Generator& g) {
      ++calls;
      initial = host_copy<T, Cpu>(p.flat_params());
      nn::Parameters<T, B> dps;
      const nn::BackendVAE<T, B> dvae(dps, vae.config());
      dps.allocate();
      nn::upload_parameters(dps, p);
      const auto rep = train::train_vae(dvae, dps, images.view(), o, g);
      nn::download_parameters(p, dps);
      trained = host_copy<T, Cpu>(p.flat_params());
      return rep;
    };
    Generator gen(61);
    const auto file = dir / "backend.safetensors";
    const auto got = train::load_or_train_vae(file, vae, ps, images.view(), test_images.view(), o,
                                              gen, on_backend);
    log.expect(
        calls == 1 && !got.loaded && got.steps == 4,
        str(what, ": trained through the hook once (calls ", calls, ", steps ", got.steps, ")"));
    nn::Parameters<T> init_ps;
    const nn::VAE<T> init_vae(init_ps, two_level_config());
    init_ps.allocate();
    Generator init_gen(61);
    init_vae.init(init_ps, init_gen);
    compare_exact(log, what + ": the hook received nn::VAE::init's weights", initial,
                  host_copy<T, Cpu>(init_ps.flat_params()));
    compare_exact(log, what + ": the parameters are the hook's",
                  host_copy<T, Cpu>(ps.flat_params()), trained);
    const Tolerance tol = run_tolerance<T>();
    compare(log, what + ": parameters vs the CPU's", trained,
            host_copy<T, Cpu>(ref_ps.flat_params()), tol);
    compare(log, what + ": latent scale and test MSE vs the CPU's",
            std::vector<double>{got.latent_scale, got.test_mse},
            std::vector<double>{ref.latent_scale, ref.test_mse}, {true, 0, tol.rtol, 0});
    log.expect(gen.offset() == ref_gen.offset(),
               str(what, ": generator offset ", gen.offset(), " == the CPU's ", ref_gen.offset()));

    // The cache holds the hook's parameters, and a second call loads it without training.
    nn::Parameters<T> again;
    const nn::VAE<T> again_vae(again, two_level_config());
    again.allocate();
    Generator gen2(99);
    const auto rep2 = train::load_or_train_vae(file, again_vae, again, images.view(),
                                               test_images.view(), o, gen2, on_backend);
    log.expect(calls == 1 && rep2.loaded && rep2.latent_scale == got.latent_scale,
               str(what, ": the second call loaded the cache (calls ", calls, ", scale ",
                   rep2.latent_scale, " == ", got.latent_scale, ")"));
    compare_exact(log, what + ": the cached parameters", host_copy<T, Cpu>(again.flat_params()),
                  trained);
  });
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

template <Backend B>
void error_checks(Log& log) {
  using T = float;
  using TB = Tensor<T, B>;
  const std::string pre = str("BackendVAE<", B::name, "> errors: ");
  nn::Parameters<T, B> ps;
  const nn::BackendVAE<T, B> vae(ps, two_level_config());  // x: [N, 2, 8, 8], z: [N, 2, 2, 2]
  ps.allocate();
  typename nn::BackendVAE<T, B>::Cache cache;
  Generator gen(61);
  TB x(Shape{2, 2, 8, 8}), mu(Shape{2, 2, 2, 2}), bad(Shape{2, 2, 2, 3});
  fill(x.view(), T(0.25));
  expect_throw<shape_error>(
      log, pre + "image size",
      "BackendVAE: x: expected shape [N, 2, 8, 8] with N >= 1, got [2, 2, 16, 16]", [&] {
        TB big(Shape{2, 2, 16, 16});
        vae.forward(ps, big.view(), gen, cache);
      });
  expect_throw<shape_error>(log, pre + "empty batch",
                            "BackendVAE: x: expected shape [N, 2, 8, 8] with N >= 1, got [0, 2, 8, "
                            "8]",
                            [&] {
                              TB empty(Shape{0, 2, 8, 8});
                              vae.forward(ps, empty.view(), gen, cache);
                            });
  expect_throw<shape_error>(log, pre + "logvar",
                            "BackendVAE: logvar: expected shape [2, 2, 2, 2], got [2, 2, 2, 3]",
                            [&] { vae.encode(ps, x.view(), mu.view(), bad.view(), cache.enc); });
  expect_throw<shape_error>(log, pre + "decode z",
                            "BackendVAE: z: expected shape [N, 2, 2, 2] with N >= 1, got [2, 2, "
                            "2, 3]",
                            [&] {
                              TB img(Shape{2, 2, 8, 8});
                              vae.decode(ps, bad.view(), img.view(), cache.dec);
                            });
  expect_throw<shape_error>(log, pre + "decode xhat",
                            "BackendVAE: xhat: expected shape [2, 2, 8, 8], got [3, 2, 8, 8]", [&] {
                              TB img(Shape{3, 2, 8, 8});
                              vae.decode(ps, mu.view(), img.view(), cache.dec);
                            });
  expect_throw<shape_error>(log, pre + "forward_with_noise eps",
                            "BackendVAE: eps: expected shape [2, 2, 2, 2], got [2, 2, 2, 3]",
                            [&] { vae.forward_with_noise(ps, x.view(), bad.view(), cache); });
  expect_throw<shape_error>(log, pre + "encode_latent z",
                            "BackendVAE: z: expected shape [2, 2, 2, 2], got [2, 2, 2, 3]",
                            [&] { vae.encode_latent(ps, x.view(), bad.view(), cache); });
  expect_throw<shape_error>(
      log, pre + "reparameterize", "mu and eps must have the same shape",
      [&] { nn::BackendVAE<T, B>::reparameterize(mu.view(), mu.view(), bad.view(), mu.view()); });
  {
    typename nn::BackendVAE<T, B>::Cache fresh;
    expect_throw<config_error>(log, pre + "backward before forward",
                               "BackendVAE: backward() needs a forward() call first",
                               [&] { vae.backward(ps, x.view(), TB{}.view(), fresh); });
    expect_throw<config_error>(log, pre + "loss before forward",
                               "BackendVAE: loss() needs a forward() call first",
                               [&] { (void)vae.loss(x.view(), fresh); });
    expect_throw<config_error>(
        log, pre + "decode_backward before decode",
        "BackendVAE: decode_backward() needs the cache of a decode() call first", [&] {
          TB img(Shape{2, 2, 8, 8});
          vae.decode_backward(ps, img.view(), TB{}.view(), fresh.dec);
        });
    expect_throw<config_error>(
        log, pre + "encode_backward before encode",
        "BackendVAE: encode_backward() needs the cache of an encode() call first",
        [&] { vae.encode_backward(ps, mu.view(), mu.view(), TB{}.view(), fresh.enc); });
  }
  guard(log, pre + "forward, then backward with a wrong dx", [&] {
    vae.init(ps, gen);
    const nn::VAELoss l = vae.forward(ps, x.view(), gen, cache);
    log.expect(std::isfinite(l.total), pre + "forward after init has a finite loss");
    const T* xhat = cache.xhat.data();
    const T* a0 = cache.enc.a0.data();
    const T* u0 = cache.dec.u[0].data();
    vae.forward(ps, x.view(), gen, cache);
    log.expect(
        cache.xhat.data() == xhat && cache.enc.a0.data() == a0 && cache.dec.u[0].data() == u0,
        pre + "a second forward at the same N reuses the cache's buffers");
    expect_throw<shape_error>(log, pre + "backward dx",
                              "BackendVAE: dx: expected shape [2, 2, 8, 8], got [2, 2, 8, 7]", [&] {
                                TB dx(Shape{2, 2, 8, 7});
                                vae.backward(ps, x.view(), dx.view(), cache);
                              });
    // encode_latent overwrites the posterior the forward's loss was computed from.
    expect_throw<config_error>(log, pre + "loss after encode_latent",
                               "BackendVAE: loss() needs a forward() call first", [&] {
                                 TB z(Shape{2, 2, 2, 2});
                                 vae.encode_latent(ps, x.view(), z.view(), cache);
                                 (void)vae.loss(x.view(), cache);
                               });
  });
  expect_throw<config_error>(
      log, pre + "image_size",
      "enc. (BackendVAE): image_size must be a positive multiple of 2^levels = 4, got 30", [] {
        nn::Parameters<T, B> p2;
        nn::VAEConfig c = two_level_config();
        c.image_size = 30;
        const nn::BackendVAE<T, B> v(p2, c, "enc.");
      });
  expect_throw<config_error>(log, pre + "channels and groups",
                             "BackendVAE: channel count 6 is not a positive multiple of groups = 4",
                             [] {
                               nn::Parameters<T, B> p2;
                               nn::VAEConfig c = two_level_config();
                               c.groups = 4;
                               c.channels = {8, 6};
                               c.base_channels = 8;
                               const nn::BackendVAE<T, B> v(p2, c);
                             });
  expect_throw<config_error>(log, pre + "no levels", "at least one level", [] {
    nn::Parameters<T, B> p2;
    nn::VAEConfig c = two_level_config();
    c.channels = {};
    const nn::BackendVAE<T, B> v(p2, c);
  });
  expect_throw<config_error>(log, pre + "a checkpoint of another configuration",
                             "upload_parameters: parameter 0 is 'encoder.conv_in.weight'", [] {
                               nn::Parameters<T> host;
                               nn::VAEConfig c = two_level_config();
                               c.base_channels = 8;
                               const nn::VAE<T> h(host, c);
                               host.allocate();
                               nn::Parameters<T, B> p2;
                               const nn::BackendVAE<T, B> v(p2, two_level_config());
                               p2.allocate();
                               nn::upload_parameters(p2, host);
                             });
  expect_throw<config_error>(log, pre + "train_vae steps", "train_vae: need steps >= 1", [&] {
    const auto images = wave_images<T>(4, 62);
    train::VAETrainOptions o = train_options();
    o.steps = 0;
    train::train_vae(vae, ps, images.view(), o, gen);
  });
  expect_throw<shape_error>(
      log, pre + "train_vae images of another size",
      "BackendVAE: x: expected shape [N, 2, 8, 8] with N >= 1, got [4, 1, 8, 8]", [&] {
        Tensor<T> images(Shape{4, 1, 8, 8});
        train::train_vae(vae, ps, images.view(), train_options(), gen);
      });
}

}  // namespace flowdiff::test::vae
