// tests/support/backend_dit_checks.hpp — the checks of the backend-generic token layers
// (nn/layers/token_kernels.hpp) and of nn::BackendDiT (nn/models/dit_backend.hpp), written once
// and templated on the backend B: tests/test_nn_backend_dit.cpp runs them with B = Cpu (Catch2),
// tests/cuda/test_cuda_dit.cu with B = Cpu in its host part and B = Cuda in its device part. No
// Catch2 and no CUDA here: every body appends (ok, message) entries to a spatial::Log
// (tests/support/backend_spatial_checks.hpp) that the caller turns into assertions. Checked:
//   layer_checks      BackendLinear (plain and with the GELU fused), BackendLayerNorm (affine or
//                     not), GELU (tanh), the adaLN modulation and the gate, BackendPatchEmbed,
//                     BackendMultiheadSelfAttention (with and without qkv bias) and
//                     BackendImageSelfAttention against nn::Linear,
//                     nn::LayerNorm, gelu_forward / gelu_backward, modulate_forward /
//                     modulate_backward (channels last), nn::DiT's gated_add / gate_backward,
//                     nn::PatchEmbed, nn::MultiheadSelfAttention and nn::ImageSelfAttention:
//                     outputs, dx and every
//                     parameter gradient (accumulated onto non-zero gradients) with DESIGN.md §4's
//                     tolerances (spatial::tolerance: fp32 normalised MSE <= 1e-7, fp64
//                     element-wise 1e-12 + 1e-12 |ref| on the CPU, normalised MSE <= 1e-24
//                     elsewhere); patchify / unpatchify in both layouts bit-equal (permutations)
//   gradcheck_checks  central differences in double through the backend layers (nn::gradcheck,
//                     max relative error <= 1e-6): LayerNorm, attention, the patch embedding, and
//                     a modulation -> GELU -> gate chain
//   dit_checks        nn::BackendDiT against nn::DiT on tiny configurations (output, dx, every
//                     parameter gradient; the layout checked on upload)
//   train_checks      four train::BackendTrainer steps of BackendDiT against train::Trainer with
//                     nn::DiT (tests/support/backend_unet_checks.hpp's data, objective, options and
//                     rule: fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|; the generator offset
//                     exactly)
//   sample_checks     Euler through as_field(BackendDiT), plain and under cfg w = 3, against the
//   same
//                     through nn::DiT (the same rule)
//   error_checks      shapes, labels outside [0, K], configurations, backward before forward
// Every comparison first requires finite values and a reference that is not all zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <flowdiff/nn/layers/attention.hpp>
#include <flowdiff/nn/layers/linear.hpp>
#include <flowdiff/nn/layers/modulation.hpp>
#include <flowdiff/nn/layers/norm.hpp>
#include <flowdiff/nn/layers/patchify.hpp>
#include <flowdiff/nn/layers/token_kernels.hpp>
#include <flowdiff/nn/models/dit.hpp>
#include <flowdiff/nn/models/dit_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "backend_spatial_checks.hpp"
#include "backend_unet_checks.hpp"

namespace flowdiff::test::dit {

using backend_common::type_name;
using spatial::compare;
using spatial::compare_exact;
using spatial::device_copy;
using spatial::download;
using spatial::expect_gradcheck;
using spatial::expect_throw;
using spatial::guard;
using spatial::host_copy;
using spatial::LayerResult;
using spatial::Log;
using spatial::none;
using spatial::str;
using spatial::tolerance;
using spatial::Tolerance;
using spatial::upload;

// ---------------------------------------------------------------------------------------------
// The layers against the CPU ones.
// ---------------------------------------------------------------------------------------------

/// BackendLinear against nn::Linear on x: [2, 3, 5] -> 7 features, and a transformer MLP
/// fc2(GELU(fc1(x))) (5 -> 7 -> 3) through forward_gelu / backward_through_gelu.
template <class T, Backend B>
void linear_checks(Log& log) {
  for (const bool mlp : {false, true}) {
    const std::string what =
        str("BackendLinear<", type_name<T>(), ", ", B::name, ">", mlp ? " fc2(GELU(fc1(x)))" : "");
    guard(log, what, [&] {
      Generator gen(mlp ? 2 : 1);
      const Shape xs{2, 3, 5}, hs{2, 3, 7}, ys{2, 3, mlp ? 3 : 7};
      nn::Parameters<T> hp;
      nn::Linear<T> r1(hp, "fc1", 5, 7), r2(hp, "fc2", 7, 3);
      hp.allocate();
      fill_normal(hp.flat_params(), gen);
      fill_normal(hp.flat_grads(), gen);
      nn::Parameters<T, B> dp;
      nn::BackendLinear<T, B> l1(dp, "fc1", 5, 7), l2(dp, "fc2", 7, 3);
      dp.allocate();
      nn::upload_parameters(dp, hp);
      upload<T, B>(dp.flat_grads(), hp.flat_grads());
      const auto x = randn<T>(xs, gen);
      const auto dy = randn<T>(ys, gen);
      Tensor<T> y(ys), pre(hs), act(hs), dpre(hs), dx(xs);
      typename BackendOps<B>::Context ctx;
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> yd(ys), pred(hs), actd(hs), dpred(hs), dxd(xs);
      if (mlp) {
        r1.forward_gelu(hp, x.view(), pre.view(), act.view(), nn::GeluApprox::tanh);
        r2.forward(hp, act.view(), y.view());
        r2.backward_through_gelu(hp, act.view(), dy.view(), pre.view(), dpre.view(),
                                 nn::GeluApprox::tanh);
        r1.backward(hp, x.view(), dpre.view(), dx.view());
        l1.forward_gelu(ctx, dp, xd.view(), pred.view(), actd.view());
        l2.forward(ctx, dp, actd.view(), yd.view());
        l2.backward_through_gelu(ctx, dp, actd.view(), dyd.view(), pred.view(), dpred.view());
        l1.backward(ctx, dp, xd.view(), dpred.view(), dxd.view());
      } else {
        r1.forward(hp, x.view(), y.view());
        r1.backward(hp, x.view(), dy.view(), dx.view());
        l1.forward(ctx, dp, xd.view(), yd.view());
        l1.backward(ctx, dp, xd.view(), dyd.view(), dxd.view());
      }
      compare(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector(), tolerance<T, B>());
      compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tolerance<T, B>());
      // fc2's gradients stay at their initial values in the plain case (compared all the same).
      compare(log, what + ": parameter gradients", host_copy<T, B>(dp.flat_grads()),
              host_copy<T, Cpu>(hp.flat_grads()), tolerance<T, B>());
    });
  }
}

struct NormCase {
  std::string name;
  Shape x;
  bool affine = true, dx = true;
  std::uint64_t seed = 1;
};

/// BackendLayerNorm against nn::LayerNorm.
template <class T, Backend B>
void layernorm_checks(Log& log) {
  const std::vector<NormCase> cases{{"affine, [3, 5, 7]", {3, 5, 7}, true, true, 11},
                                    {"no affine, [4, 6]", {4, 6}, false, true, 12},
                                    {"affine, no dx, [2, 3, 9]", {2, 3, 9}, true, false, 13}};
  for (const auto& c : cases) {
    const std::string what = str("BackendLayerNorm<", type_name<T>(), ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      Generator gen(c.seed);
      const index_t d = c.x[c.x.rank() - 1];
      nn::Parameters<T> hp;
      nn::LayerNorm<T> ref(hp, "ln", d, T(1e-5), c.affine);
      nn::Parameters<T, B> dp;
      nn::BackendLayerNorm<T, B> ln(dp, "ln", d, T(1e-5), c.affine);
      if (c.affine) {
        hp.allocate();
        dp.allocate();
        fill_normal(hp.flat_params(), gen, T(0.5), T(1));
        fill_normal(hp.flat_grads(), gen);
        nn::upload_parameters(dp, hp);
        upload<T, B>(dp.flat_grads(), hp.flat_grads());
      }
      auto x = randn<T>(c.x, gen);
      scale(x.view(), T(3));
      const auto dy = randn<T>(c.x, gen);
      Tensor<T> y(c.x), dx(c.x);
      typename nn::LayerNorm<T>::Cache rc;
      ref.forward(hp, x.view(), y.view(), rc);
      ref.backward(hp, x.view(), dy.view(), c.dx ? dx.view() : none<T>(), rc);
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> yd(c.x), dxd(c.x);
      typename nn::BackendLayerNorm<T, B>::Cache cache;
      ln.forward(dp, xd.view(), yd.view(), cache);
      ln.backward(dp, xd.view(), dyd.view(), c.dx ? dxd.view() : none<T, B>(), cache);
      compare(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector(), tolerance<T, B>());
      if (c.dx)
        compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tolerance<T, B>());
      if (c.affine)
        compare(log, what + ": parameter gradients", host_copy<T, B>(dp.flat_grads()),
                host_copy<T, Cpu>(hp.flat_grads()), tolerance<T, B>());
    });
  }
}

/// GELU (tanh) on 4001 points of [-8, 8] and 1000 N(0, 3^2) draws against gelu_forward /
/// gelu_backward(GeluApprox::tanh).
template <class T, Backend B>
void gelu_checks(Log& log) {
  const std::string what = str("GELU tanh <", type_name<T>(), ", ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(21);
    Tensor<T> x(Shape{5001}), dy(Shape{5001}), y(Shape{5001}), dx(Shape{5001});
    fill_normal(x.view(), gen, T(0), T(3));
    for (index_t i = 0; i < 4001; ++i) x[i] = static_cast<T>(-8.0 + 16.0 * i / 4000.0);
    fill_normal(dy.view(), gen);
    nn::gelu_forward<T>(x.view(), y.view(), nn::GeluApprox::tanh);
    nn::gelu_backward<T>(x.view(), dy.view(), dx.view(), nn::GeluApprox::tanh);
    const auto xd = device_copy<T, B>(x.view());
    const auto dyd = device_copy<T, B>(dy.view());
    Tensor<T, B> yd(x.shape()), dxd(x.shape());
    nn::gelu_tanh_forward<T, B>(xd.view(), yd.view());
    nn::gelu_tanh_backward<T, B>(xd.view(), dyd.view(), dxd.view());
    // The same function and order of operations: element-wise at fp32's / fp64's own rule.
    const Tolerance tol = std::is_same_v<T, float> ? Tolerance{true, 1e-6, 1e-5, 0}
                                                   : Tolerance{true, 1e-12, 1e-12, 0};
    compare(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector(), tol);
    compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tol);
  });
}

/// modulate_tokens / gated_add and their backward against modulation.hpp (channels last) and
/// nn::DiT's gated_add / gate_backward, on [3, 5, 6] tokens.
template <class T, Backend B>
void modulation_checks(Log& log) {
  const std::string what = str("adaLN modulation and gate <", type_name<T>(), ", ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(31);
    const Shape xs{3, 5, 6}, vs{3, 6};
    const auto x = randn<T>(xs, gen);
    const auto f = randn<T>(xs, gen);
    const auto dy = randn<T>(xs, gen);
    const auto sc = randn<T>(vs, gen);
    const auto sh = randn<T>(vs, gen);
    Tensor<T> y(xs), dx(xs), dsc(vs), dsh(vs), gy(xs), df(xs), dg(vs);
    nn::modulate_forward<T>(x.view(), sc.view(), sh.view(), y.view(), nn::ChannelAxis::last);
    nn::modulate_backward<T>(x.view(), sc.view(), dy.view(), dx.view(), dsc.view(), dsh.view(),
                             nn::ChannelAxis::last);
    nn::dit_detail::gated_add<T>(x.view(), sc.view(), f.view(), gy.view());
    nn::dit_detail::gate_backward<T>(f.view(), sc.view(), dy.view(), df.view(), dg.view());
    const auto xd = device_copy<T, B>(x.view());
    const auto fd_ = device_copy<T, B>(f.view());
    const auto dyd = device_copy<T, B>(dy.view());
    const auto scd = device_copy<T, B>(sc.view());
    const auto shd = device_copy<T, B>(sh.view());
    Tensor<T, B> yd(xs), dxd(xs), dscd(vs), dshd(vs), gyd(xs), dfd(xs), dgd(vs);
    nn::modulate_tokens<T, B>(xd.view(), scd.view(), shd.view(), yd.view());
    nn::modulate_tokens_backward<T, B>(xd.view(), scd.view(), dyd.view(), dxd.view(), dscd.view(),
                                       dshd.view());
    nn::gated_add<T, B>(xd.view(), scd.view(), fd_.view(), gyd.view());
    nn::gate_backward<T, B>(fd_.view(), scd.view(), dyd.view(), dfd.view(), dgd.view());
    const Tolerance tol = tolerance<T, B>();
    compare(log, what + ": x (1 + scale) + shift", host_copy<T, B>(yd.view()), y.to_vector(), tol);
    compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tol);
    compare(log, what + ": dscale", host_copy<T, B>(dscd.view()), dsc.to_vector(), tol);
    compare(log, what + ": dshift", host_copy<T, B>(dshd.view()), dsh.to_vector(), tol);
    compare(log, what + ": x + g f", host_copy<T, B>(gyd.view()), gy.to_vector(), tol);
    compare(log, what + ": df", host_copy<T, B>(dfd.view()), df.to_vector(), tol);
    compare(log, what + ": dg", host_copy<T, B>(dgd.view()), dg.to_vector(), tol);
  });
}

/// patchify / unpatchify in both layouts, bit-equal to patchify.hpp's (permutations).
template <class T, Backend B>
void patch_checks(Log& log) {
  for (const auto layout : {nn::PatchLayout::channel_first, nn::PatchLayout::channel_last}) {
    const std::string what =
        str("patchify / unpatchify <", type_name<T>(), ", ", B::name, "> ",
            layout == nn::PatchLayout::channel_first ? "channel first" : "channel last");
    guard(log, what, [&] {
      Generator gen(41);
      const Shape xs{2, 3, 6, 9}, ps{2, 6, 27};
      const auto x = randn<T>(xs, gen);
      const auto pin = randn<T>(ps, gen);
      Tensor<T> p(ps), back(xs);
      nn::patchify<T>(x.view(), 3, p.view(), layout);
      nn::unpatchify<T>(pin.view(), 3, back.view(), layout);
      const auto xd = device_copy<T, B>(x.view());
      const auto pind = device_copy<T, B>(pin.view());
      Tensor<T, B> pd(ps), backd(xs);
      nn::backend_patchify<T, B>(xd.view(), 3, pd.view(), layout);
      nn::backend_unpatchify<T, B>(pind.view(), 3, backd.view(), layout);
      compare_exact(log, what + ": patchify", host_copy<T, B>(pd.view()), p.to_vector());
      compare_exact(log, what + ": unpatchify", host_copy<T, B>(backd.view()), back.to_vector());
    });
  }
}

/// BackendPatchEmbed against nn::PatchEmbed (2 channels, patch 2, 8 features, 4 x 6 images).
template <class T, Backend B>
void patch_embed_checks(Log& log) {
  const std::string what = str("BackendPatchEmbed<", type_name<T>(), ", ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(45);
    const Shape xs{3, 2, 4, 6}, ys{3, 6, 8};
    nn::Parameters<T> hp;
    nn::PatchEmbed<T> ref(hp, "x_embedder", 2, 8, 2);
    hp.allocate();
    ref.init(hp, gen);
    fill_normal(hp.flat_grads(), gen);
    nn::Parameters<T, B> dp;
    nn::BackendPatchEmbed<T, B> pe(dp, "x_embedder", 2, 8, 2);
    dp.allocate();
    nn::upload_parameters(dp, hp);
    upload<T, B>(dp.flat_grads(), hp.flat_grads());
    const auto x = randn<T>(xs, gen);
    const auto dy = randn<T>(ys, gen);
    Tensor<T> y(ys), dx(xs);
    typename nn::PatchEmbed<T>::Cache rc;
    ref.forward(hp, x.view(), y.view(), rc);
    ref.backward(hp, x.view(), dy.view(), dx.view(), rc);
    const auto xd = device_copy<T, B>(x.view());
    const auto dyd = device_copy<T, B>(dy.view());
    Tensor<T, B> yd(ys), dxd(xs);
    typename BackendOps<B>::Context ctx;
    typename nn::BackendPatchEmbed<T, B>::Cache cache;
    pe.forward(ctx, dp, xd.view(), yd.view(), cache);
    pe.backward(ctx, dp, xd.view(), dyd.view(), dxd.view(), cache);
    compare(log, what + ": tokens", host_copy<T, B>(yd.view()), y.to_vector(), tolerance<T, B>());
    compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tolerance<T, B>());
    compare(log, what + ": parameter gradients", host_copy<T, B>(dp.flat_grads()),
            host_copy<T, Cpu>(hp.flat_grads()), tolerance<T, B>());
  });
}

struct AttnCase {
  std::string name;
  Shape x;
  index_t heads;
  bool qkv_bias = true, dx = true;
  std::uint64_t seed = 1;
};

inline std::vector<AttnCase> attention_cases() {
  return {{"2 heads, [2, 5, 8]", {2, 5, 8}, 2, true, true, 51},
          {"3 heads, no qkv bias, [3, 7, 6]", {3, 7, 6}, 3, false, true, 52},
          {"1 head, one token, [4, 1, 4]", {4, 1, 4}, 1, true, true, 53},
          {"4 heads, no dx, [2, 9, 8]", {2, 9, 8}, 4, true, false, 54}};
}

/// BackendMultiheadSelfAttention against nn::MultiheadSelfAttention; a smaller batch first, so
/// the workspaces then grow.
template <class T, Backend B>
void attention_checks(Log& log) {
  for (const auto& c : attention_cases()) {
    const std::string what =
        str("BackendMultiheadSelfAttention<", type_name<T>(), ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      Generator gen(c.seed);
      const index_t d = c.x[2];
      nn::Parameters<T> hp;
      nn::MultiheadSelfAttention<T> ref(hp, "attn", d, c.heads, c.qkv_bias);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, T(0), T(0.5));
      fill_normal(hp.flat_grads(), gen);
      nn::Parameters<T, B> dp;
      nn::BackendMultiheadSelfAttention<T, B> attn(dp, "attn", d, c.heads, c.qkv_bias);
      dp.allocate();
      nn::upload_parameters(dp, hp);
      upload<T, B>(dp.flat_grads(), hp.flat_grads());
      const auto x = randn<T>(c.x, gen);
      const auto dy = randn<T>(c.x, gen);
      Tensor<T> y(c.x), dx(c.x);
      typename nn::MultiheadSelfAttention<T>::Cache rc;
      ref.forward(hp, x.view(), y.view(), rc);
      ref.backward(hp, x.view(), dy.view(), c.dx ? dx.view() : none<T>(), rc);
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> yd(c.x), dxd(c.x);
      typename BackendOps<B>::Context ctx;
      typename nn::BackendMultiheadSelfAttention<T, B>::Cache cache;
      Tensor<T, B> y1(xd.view().rows(0, 1).shape());
      attn.forward(ctx, dp, xd.view().rows(0, 1), y1.view(), cache);
      attn.forward(ctx, dp, xd.view(), yd.view(), cache);
      attn.backward(ctx, dp, xd.view(), dyd.view(), c.dx ? dxd.view() : none<T, B>(), cache);
      compare(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector(), tolerance<T, B>());
      if (c.dx)
        compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tolerance<T, B>());
      compare(log, what + ": parameter gradients", host_copy<T, B>(dp.flat_grads()),
              host_copy<T, Cpu>(hp.flat_grads()), tolerance<T, B>());
    });
  }
}

/// BackendImageSelfAttention (the U-Net's midcoder attention) against nn::ImageSelfAttention on
/// [2, 6, 3, 5] images (15 tokens of 6 channels, 3 heads).
template <class T, Backend B>
void image_attention_checks(Log& log) {
  const std::string what = str("BackendImageSelfAttention<", type_name<T>(), ", ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(55);
    const Shape xs{2, 6, 3, 5};
    nn::Parameters<T> hp;
    nn::ImageSelfAttention<T> ref(hp, "midcoder.attn", 6, 3);
    hp.allocate();
    ref.init(hp, gen);
    fill_normal(hp.flat_grads(), gen);
    nn::Parameters<T, B> dp;
    nn::BackendImageSelfAttention<T, B> attn(dp, "midcoder.attn", 6, 3);
    dp.allocate();
    nn::upload_parameters(dp, hp);
    upload<T, B>(dp.flat_grads(), hp.flat_grads());
    const auto x = randn<T>(xs, gen);
    const auto dy = randn<T>(xs, gen);
    Tensor<T> y(xs), dx(xs);
    typename nn::ImageSelfAttention<T>::Cache rc;
    ref.forward(hp, x.view(), y.view(), rc);
    ref.backward(hp, x.view(), dy.view(), dx.view(), rc);
    const auto xd = device_copy<T, B>(x.view());
    const auto dyd = device_copy<T, B>(dy.view());
    Tensor<T, B> yd(xs), dxd(xs);
    typename BackendOps<B>::Context ctx;
    typename nn::BackendImageSelfAttention<T, B>::Cache cache;
    attn.forward(ctx, dp, xd.view(), yd.view(), cache);
    attn.backward(ctx, dp, xd.view(), dyd.view(), dxd.view(), cache);
    compare(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector(), tolerance<T, B>());
    compare(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector(), tolerance<T, B>());
    compare(log, what + ": parameter gradients", host_copy<T, B>(dp.flat_grads()),
            host_copy<T, Cpu>(hp.flat_grads()), tolerance<T, B>());
  });
}

template <class T, Backend B>
void layer_checks(Log& log) {
  linear_checks<T, B>(log);
  layernorm_checks<T, B>(log);
  gelu_checks<T, B>(log);
  modulation_checks<T, B>(log);
  patch_checks<T, B>(log);
  patch_embed_checks<T, B>(log);
  attention_checks<T, B>(log);
  image_attention_checks<T, B>(log);
}

// ---------------------------------------------------------------------------------------------
// Central differences in double through the backend layers (the pattern of
// backend_spatial_checks.hpp: forward uploads the perturbed host values and downloads the
// outputs; backward uploads dy and the gradients so far and downloads the gradients after).
// ---------------------------------------------------------------------------------------------

template <Backend B>
void gradcheck_checks(Log& log) {
  using D = double;
  {
    const std::string what = str("gradcheck BackendLayerNorm<double, ", B::name, "> [3, 4, 5]");
    guard(log, what, [&] {
      Generator gen(61);
      const Shape xs{3, 4, 5};
      nn::Parameters<D> hp;
      nn::LayerNorm<D> mirror(hp, "ln", 5);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, 0.5, 1.0);
      nn::Parameters<D, B> dp;
      nn::BackendLayerNorm<D, B> ln(dp, "ln", 5);
      dp.allocate();
      auto x = randn<D>(xs, gen);
      Tensor<D> out(xs), dx(xs);
      Tensor<D, B> xd(xs), yd(xs), dyd(xs), dxd(xs);
      typename nn::BackendLayerNorm<D, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, &hp, {out.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<D, B>(xd.view(), x.view());
                             ln.forward(dp, xd.view(), yd.view(), cache);
                             download<D, B>(out.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<D, B>(dyd.view(), dy[0]);
                             upload<D, B>(dp.flat_grads(), hp.flat_grads());
                             ln.backward(dp, xd.view(), dyd.view(), dxd.view(), cache);
                             download<D, B>(hp.flat_grads(), dp.flat_grads());
                             download<D, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
  {
    const std::string what =
        str("gradcheck BackendMultiheadSelfAttention<double, ", B::name, "> 2 heads [2, 4, 6]");
    guard(log, what, [&] {
      Generator gen(62);
      const Shape xs{2, 4, 6};
      nn::Parameters<D> hp;
      nn::MultiheadSelfAttention<D> mirror(hp, "attn", 6, 2);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, 0.0, 0.5);
      nn::Parameters<D, B> dp;
      nn::BackendMultiheadSelfAttention<D, B> attn(dp, "attn", 6, 2);
      dp.allocate();
      auto x = randn<D>(xs, gen);
      Tensor<D> out(xs), dx(xs);
      Tensor<D, B> xd(xs), yd(xs), dyd(xs), dxd(xs);
      typename BackendOps<B>::Context ctx;
      typename nn::BackendMultiheadSelfAttention<D, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, &hp, {out.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<D, B>(xd.view(), x.view());
                             attn.forward(ctx, dp, xd.view(), yd.view(), cache);
                             download<D, B>(out.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<D, B>(dyd.view(), dy[0]);
                             upload<D, B>(dp.flat_grads(), hp.flat_grads());
                             attn.backward(ctx, dp, xd.view(), dyd.view(), dxd.view(), cache);
                             download<D, B>(hp.flat_grads(), dp.flat_grads());
                             download<D, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
  {
    const std::string what = str("gradcheck BackendPatchEmbed<double, ", B::name, "> p 2");
    guard(log, what, [&] {
      Generator gen(63);
      const Shape xs{2, 2, 4, 4}, ys{2, 4, 5};
      nn::Parameters<D> hp;
      nn::PatchEmbed<D> mirror(hp, "pe", 2, 5, 2);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, 0.0, 0.5);
      nn::Parameters<D, B> dp;
      nn::BackendPatchEmbed<D, B> pe(dp, "pe", 2, 5, 2);
      dp.allocate();
      auto x = randn<D>(xs, gen);
      Tensor<D> out(ys), dx(xs);
      Tensor<D, B> xd(xs), yd(ys), dyd(ys), dxd(xs);
      typename BackendOps<B>::Context ctx;
      typename nn::BackendPatchEmbed<D, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, &hp, {out.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<D, B>(xd.view(), x.view());
                             pe.forward(ctx, dp, xd.view(), yd.view(), cache);
                             download<D, B>(out.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<D, B>(dyd.view(), dy[0]);
                             upload<D, B>(dp.flat_grads(), hp.flat_grads());
                             pe.backward(ctx, dp, xd.view(), dyd.view(), dxd.view(), cache);
                             download<D, B>(hp.flat_grads(), dp.flat_grads());
                             download<D, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
  {
    // out = x + g GELU(x (1 + scale) + shift): every input through the modulation, the GELU and
    // the gate.
    const std::string what =
        str("gradcheck modulate_tokens -> GELU -> gated_add <double, ", B::name, "> [2, 3, 4]");
    guard(log, what, [&] {
      Generator gen(64);
      const Shape xs{2, 3, 4}, vs{2, 4};
      auto x = randn<D>(xs, gen);
      auto sc = randn<D>(vs, gen);
      auto sh = randn<D>(vs, gen);
      auto g = randn<D>(vs, gen);
      Tensor<D> out(xs), dx(xs), dsc(vs), dsh(vs), dg(vs);
      Tensor<D, B> xd(xs), scd(vs), shd(vs), gd(vs), m(xs), a(xs), yd(xs), dyd(xs), da(xs), dm(xs),
          dxd(xs), dscd(vs), dshd(vs), dgd(vs);
      expect_gradcheck(
          log, what,
          nn::gradcheck(
              {{"x", x.view(), dx.view()},
               {"scale", sc.view(), dsc.view()},
               {"shift", sh.view(), dsh.view()},
               {"g", g.view(), dg.view()}},
              nullptr, {out.view()},
              [&] {
                upload<D, B>(xd.view(), x.view());
                upload<D, B>(scd.view(), sc.view());
                upload<D, B>(shd.view(), sh.view());
                upload<D, B>(gd.view(), g.view());
                nn::modulate_tokens<D, B>(xd.view(), scd.view(), shd.view(), m.view());
                nn::gelu_tanh_forward<D, B>(m.view(), a.view());
                nn::gated_add<D, B>(xd.view(), gd.view(), a.view(), yd.view());
                download<D, B>(out.view(), yd.view());
              },
              [&](const auto& dy) {
                upload<D, B>(dyd.view(), dy[0]);
                nn::gate_backward<D, B>(a.view(), gd.view(), dyd.view(), da.view(), dgd.view());
                nn::gelu_tanh_backward<D, B>(m.view(), da.view(), dm.view());
                nn::modulate_tokens_backward<D, B>(xd.view(), scd.view(), dm.view(), dxd.view(),
                                                   dscd.view(), dshd.view());
                nn::add_in_place<D, B>(dxd.view(), View<const D, B>(dyd.view()));  // x's path
                download<D, B>(dx.view(), dxd.view());
                download<D, B>(dsc.view(), dscd.view());
                download<D, B>(dsh.view(), dshd.view());
                download<D, B>(dg.view(), dgd.view());
              },
              gen));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The model: nn::BackendDiT against nn::DiT.
// ---------------------------------------------------------------------------------------------

struct DiTCase {
  std::string name;
  nn::DiTConfig cfg;
  index_t n = 2;
  bool labels = true, dx = true;
  std::uint64_t seed = 1;
};

inline std::vector<DiTCase> dit_cases() {
  // Built member by member: GCC 12 warns (maybe-uninitialized) on a braced list of these.
  std::vector<DiTCase> v(2);
  v[0].name = "conditional, sin-cos positions, 2 blocks, labels";
  v[0].cfg.in_channels = 1;
  v[0].cfg.image_size = 4;
  v[0].cfg.patch_size = 2;
  v[0].cfg.hidden = 8;
  v[0].cfg.depth = 2;
  v[0].cfg.heads = 2;
  v[0].cfg.mlp_ratio = 2.0;
  v[0].cfg.num_classes = 3;
  v[0].cfg.frequency_dim = 8;
  v[0].n = 4;
  v[0].seed = 71;
  v[1].name = "unconditional, learned positions, odd widths";
  v[1].cfg.in_channels = 2;
  v[1].cfg.image_size = 6;
  v[1].cfg.patch_size = 2;
  v[1].cfg.hidden = 6;
  v[1].cfg.depth = 1;
  v[1].cfg.heads = 3;
  v[1].cfg.mlp_ratio = 1.5;
  v[1].cfg.num_classes = 0;
  v[1].cfg.frequency_dim = 7;
  v[1].cfg.learned_pos_embed = true;
  v[1].n = 3;
  v[1].labels = false;
  v[1].seed = 72;
  return v;
}

/// nn::DiT's initial weights for `cfg` drawn with `seed` (the reference's initialisation), then
/// the zero-initialised adaLN modulations, final Linear and biases from N(0, 0.2^2), so that
/// the model is not the zero field and every gradient path carries a signal, and a learned
/// pos_embed from N(0, 0.2^2) as well (nn::DiT::init copies its sin-cos table there, which is
/// left unset when hidden % 4 != 0).
template <class T>
void dit_host_init(nn::Parameters<T>& ps, std::uint64_t seed, const nn::DiT<T>& net) {
  ps.allocate();
  Generator gen(seed);
  net.init(ps, gen);
  for (index_t id = 0; id < ps.count(); ++id) {
    const auto& name = ps.info(id).name;
    if (name.find("adaLN_modulation") != std::string::npos ||
        name.find("final_layer.linear") != std::string::npos || name.ends_with(".bias") ||
        name == "pos_embed")
      fill_normal(ps.param(id), gen, T(0), T(0.2));
  }
}

template <class T>
struct DiTInputs {
  nn::Parameters<T> ps;
  nn::DiT<T> net;
  Tensor<T> x, t, dout;
  Tensor<label_t> y;
  explicit DiTInputs(const DiTCase& c) : net(ps, c.cfg) {
    dit_host_init(ps, c.seed, net);
    Generator gen(c.seed + 1000);
    fill_normal(ps.flat_grads(), gen);
    const index_t s = c.cfg.image_size;
    const Shape xs{c.n, c.cfg.in_channels, s, s};
    x = randn<T>(xs, gen);
    t = Tensor<T>(Shape{c.n});
    fill_uniform(t, gen);
    dout = randn<T>(xs, gen);
    y = Tensor<label_t>(Shape{c.labels ? c.n : 0});
    for (index_t i = 0; i < y.numel(); ++i)
      y[i] = static_cast<label_t>(i % (c.cfg.num_classes + 1));
  }
};

template <class T>
LayerResult<T> dit_reference(const DiTCase& c) {
  DiTInputs<T> in(c);
  typename nn::DiT<T>::Cache cache;
  Tensor<T> out(in.x.shape()), dx(in.x.shape());
  in.net.forward(in.ps, in.x.view(), in.t.view(), in.y.view(), out.view(), cache);
  in.net.backward(in.ps, in.dout.view(), c.dx ? dx.view() : none<T>(), cache);
  return {out.to_vector(),
          {},
          c.dx ? dx.to_vector() : std::vector<T>{},
          host_copy<T, Cpu>(in.ps.flat_grads())};
}

template <class T, Backend B>
LayerResult<T> dit_on_backend(const DiTCase& c) {
  DiTInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendDiT<T, B> net(ps, c.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);  // checks the layout: names, shapes, offsets
  upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  const auto x = device_copy<T, B>(in.x.view());
  const auto t = device_copy<T, B>(in.t.view());
  const auto y = device_copy<label_t, B>(in.y.view());
  const auto dout = device_copy<T, B>(in.dout.view());
  typename nn::BackendDiT<T, B>::Cache cache;
  Tensor<T, B> out(in.x.shape()), dx(in.x.shape());
  net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
  net.backward(ps, dout.view(), c.dx ? dx.view() : none<T, B>(), cache);
  return {host_copy<T, B>(out.view()),
          {},
          c.dx ? host_copy<T, B>(dx.view()) : std::vector<T>{},
          host_copy<T, B>(ps.flat_grads())};
}

template <class T, Backend B>
void dit_checks(Log& log) {
  const Tolerance tol = tolerance<T, B>();
  for (const auto& c : dit_cases()) {
    const std::string what = str("BackendDiT<", type_name<T>(), ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = dit_reference<T>(c);
      const auto got = dit_on_backend<T, B>(c);
      compare(log, what + ": u(x, t, y)", got.y, ref.y, tol);
      if (c.dx) compare(log, what + ": dx", got.dx, ref.dx, tol);
      compare(log, what + ": parameter gradients", got.grads, ref.grads, tol);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Training and sampling (backend_unet_checks.hpp's data, objective, options and rule).
// ---------------------------------------------------------------------------------------------

/// The tiny class-conditional DiT of the training and sampling checks: 1 x 8 x 8 images in four
/// 4 x 4 patches, width 8, one block of 2 heads, 3 classes (3 = ∅).
inline nn::DiTConfig tiny_config(index_t num_classes = 3) {
  nn::DiTConfig c;
  c.in_channels = 1;
  c.image_size = 8;
  c.patch_size = 4;
  c.hidden = 8;
  c.depth = 1;
  c.heads = 2;
  c.mlp_ratio = 2.0;
  c.num_classes = num_classes;
  c.frequency_dim = 8;
  return c;
}

template <class T>
unet_train::TrainOutcome<T> train_reference(std::int64_t steps) {
  std::ostringstream log;
  nn::Parameters<T> ps;
  const nn::DiT<T> net(ps, tiny_config());
  dit_host_init(ps, 7, net);
  unet_train::ImageSource<T> source;
  train::Trainer trainer(net, ps, unet_train::train_objective<T>(), unet_train::adamw_cpu<T>(),
                         unet_train::train_options(steps, log));
  trainer.fit(source);
  return {trainer.losses(),
          host_copy<T, Cpu>(ps.flat_params()),
          host_copy<T, Cpu>(trainer.ema()->flat()),
          trainer.last_grad_norm(),
          trainer.generator().offset(),
          0,
          source.drawn};
}

template <class T, Backend B>
unet_train::TrainOutcome<T> train_on_backend(std::int64_t steps) {
  std::ostringstream out;
  nn::Parameters<T> host;
  const nn::DiT<T> ref(host, tiny_config());
  dit_host_init(host, 7, ref);
  nn::Parameters<T, B> ps;
  const nn::BackendDiT<T, B> net(ps, tiny_config());
  ps.allocate();
  nn::upload_parameters(ps, host);
  unet_train::ImageSource<T> source;
  train::BackendTrainer trainer(net, ps, unet_train::train_objective<T>(),
                                unet_train::adamw_on<T, B>(),
                                unet_train::train_options(steps, out));
  static_assert(std::is_same_v<decltype(trainer),
                               train::BackendTrainer<T, B, schedules::Linear, train::UniformTime,
                                                     train::AdamW<T, B>, nn::BackendDiT<T, B>>>);
  unet_train::TrainOutcome<T> r;
  r.first_step = trainer.fit(source).first_step;
  r.losses = trainer.losses();
  r.params = host_copy<T, B>(ps.flat_params());
  r.ema = host_copy<T, B>(trainer.ema()->flat());
  r.norm = trainer.last_grad_norm();
  r.offset = trainer.generator().offset();
  r.drawn = source.drawn;
  return r;
}

/// Four steps on B against train::Trainer + nn::DiT (batch 6, CFG dropout 0.3, AdamW with weight
/// decay, clipping at 0.5, EMA 0.9).
template <class T, Backend B>
void train_checks(Log& log) {
  const std::string what = str("BackendTrainer<", type_name<T>(), ", ", B::name,
                               "> + BackendDiT vs Trainer + nn::DiT, 4 steps");
  guard(log, what, [&] {
    const auto ref = train_reference<T>(4);
    const auto got = train_on_backend<T, B>(4);
    const Tolerance tol = unet_train::run_tolerance<T>();
    compare(log, what + ": losses", got.losses, ref.losses, {true, tol.atol, tol.rtol, 0});
    compare(log, what + ": last gradient norm", std::vector<double>{got.norm},
            std::vector<double>{ref.norm}, {true, tol.atol, tol.rtol, 0});
    compare(log, what + ": parameters", got.params, ref.params, tol);
    compare(log, what + ": EMA", got.ema, ref.ema, tol);
    log.expect(got.offset == ref.offset && got.offset > 0,
               str(what, ": generator offset ", got.offset, " == ", ref.offset));
    log.expect(ref.norm > 0.5, str(what, ": the reference gradient norm ", ref.norm,
                                   " exceeds the clip 0.5 (clipping is exercised)"));
  });
}

/// integrate(Euler) on B from x0 (host, [N, 1, 8, 8]) through `model` (its plain field, or
/// cfg(field, w) with labels cycling over [0, K], K = ∅). Returns the samples. With `log`, also
/// checks that the field's cache keeps its buffers across the sampler's calls.
template <class T, Backend B, class Model>
std::vector<T> euler_samples(const unet_train::SampleCase& c, const Model& model,
                             const nn::Parameters<T, B>& ps, const Tensor<T>& x0, Log* log) {
  auto x = device_copy<T, B>(x0.view());
  const auto grid = uniform_grid<T>(c.steps);
  auto field = nn::as_field(model, ps);
  if (c.guided) {
    Tensor<label_t> y(Shape{c.n});
    for (index_t i = 0; i < c.n; ++i) y[i] = static_cast<label_t>(i % (model.num_classes() + 1));
    const auto yd = device_copy<label_t, B>(y.view());
    auto guided = cfg(field, c.w);
    guided.set_condition(View<const label_t, B>(yd.view()));
    integrate(Euler{}, guided, x, grid);
  } else if (log != nullptr) {
    Tensor<T, B> out(x.shape());
    field(View<const T, B>(x.view()), out.view(), T(0));
    const T* first = field.cache().h0.data();
    const T* last = field.cache().hb.back().data();
    integrate(Euler{}, field, x, grid);
    log->expect(field.cache().h0.data() == first && field.cache().hb.back().data() == last,
                str("as_field(BackendDiT<", B::name, ">) ", c.name,
                    ": the cache's buffers are reused across the sampler's calls"));
  } else {
    integrate(Euler{}, field, x, grid);
  }
  return host_copy<T, B>(x.view());
}

/// Euler through as_field(nn::DiT) on the CPU and as_field(BackendDiT) on B, plain (∅) and under
/// cfg w = 3 with labels cycling over [0, K], from the same weights and start.
template <class T, Backend B>
void sample_checks(Log& log) {
  const std::vector<unet_train::SampleCase> cases{
      {"plain field (null label), Euler", false, 1, false, 3, 4},
      {"cfg w = 3, Euler", true, 3, false, 5, 4}};
  for (const auto& c : cases) {
    const std::string what = str("as_field(BackendDiT<", type_name<T>(), ", ", B::name,
                                 ">) vs as_field(nn::DiT), ", c.name);
    guard(log, what, [&] {
      nn::Parameters<T> host;
      const nn::DiT<T> ref(host, tiny_config());
      dit_host_init(host, 11, ref);
      Generator gen(12);
      const auto x0 = randn<T>(Shape{c.n, 1, 8, 8}, gen);
      const auto want = euler_samples<T, Cpu>(c, ref, host, x0, nullptr);
      nn::Parameters<T, B> ps;
      const nn::BackendDiT<T, B> net(ps, tiny_config());
      ps.allocate();
      nn::upload_parameters(ps, host);
      const auto got = euler_samples<T, B>(c, net, ps, x0, &log);
      compare(log, what + ": samples", got, want, unet_train::run_tolerance<T>());
      double moved = 0;
      for (std::size_t i = 0; i < want.size(); ++i)
        moved = std::max(moved, std::abs(static_cast<double>(want[i] - x0.data()[i])));
      log.expect(moved > 1e-2, str(what, ": the samples moved (max |x1 - x0| ", moved, ")"));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

template <Backend B>
void error_checks(Log& log) {
  using T = float;
  using TB = Tensor<T, B>;
  const std::string pre = str("BackendDiT<", B::name, "> errors: ");
  nn::Parameters<T, B> ps;
  const nn::BackendDiT<T, B> net(ps, tiny_config());
  ps.allocate();
  {
    nn::Parameters<T> host;
    const nn::DiT<T> ref(host, tiny_config());
    dit_host_init(host, 5, ref);
    nn::upload_parameters(ps, host);
  }
  const Shape s{4, 1, 8, 8};
  TB x(s), out(s), t(Shape{4});
  fill(x.view(), T(0.5));
  fill(t.view(), T(0.25));
  auto labels = [](std::vector<label_t> v) {
    Tensor<label_t> h(Shape{static_cast<index_t>(v.size())});
    for (std::size_t i = 0; i < v.size(); ++i) h[static_cast<index_t>(i)] = v[i];
    return device_copy<label_t, B>(h.view());
  };
  typename nn::BackendDiT<T, B>::Cache cache;
  expect_throw<config_error>(log, pre + "backward before forward",
                             "BackendDiT: backward() needs the cache of a forward() call first",
                             [&] { net.backward(ps, x.view(), out.view(), cache); });
  expect_throw<shape_error>(log, pre + "x of the wrong size",
                            "BackendDiT: x: expected shape [N, 1, 8, 8] with N >= 1, got "
                            "[4, 1, 8, 4]",
                            [&] {
                              TB xs(Shape{4, 1, 8, 4});
                              net.forward(ps, xs.view(), t.view(), {}, out.view(), cache);
                            });
  expect_throw<shape_error>(log, pre + "t of the wrong length",
                            "BackendDiT: t: expected shape [4], got [3]", [&] {
                              TB t3(Shape{3});
                              net.forward(ps, x.view(), t3.view(), {}, out.view(), cache);
                            });
  expect_throw<config_error>(log, pre + "a label above K",
                             "BackendDiT: 1 of the 4 labels y lie outside [0, 3] (3 is the null "
                             "label)",
                             [&] {
                               const auto y = labels({0, 1, 4, 3});
                               net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                             });
  expect_throw<config_error>(log, pre + "negative labels", "2 of the 4 labels y lie outside [0, 3]",
                             [&] {
                               const auto y = labels({-1, 1, 2, -5});
                               net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                             });
  expect_throw<shape_error>(log, pre + "labels of the wrong length",
                            "BackendDiT: y: expected shape [4], got [3]", [&] {
                              const auto y = labels({0, 1, 2});
                              net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
                            });
  guard(log, pre + "labels in [0, K] pass", [&] {
    const auto y = labels({0, 1, 2, 3});
    net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
    log.expect(all_finite(out), pre + "labels in [0, K] (3 = null) give a finite output");
    TB dx(s);
    expect_throw<shape_error>(log, pre + "dout of another shape",
                              "BackendDiT: dout: expected shape [4, 1, 8, 8], got [2, 1, 8, 8]",
                              [&] {
                                TB d2(Shape{2, 1, 8, 8});
                                net.backward(ps, d2.view(), dx.view(), cache);
                              });
  });
  expect_throw<config_error>(log, pre + "cfg(as_field) with a label above K", "outside [0, 3]",
                             [&] {
                               auto guided = cfg(nn::as_field(net, ps), 3.0);
                               const auto y = labels({0, 1, 9, 2});
                               guided.set_condition(View<const label_t, B>(y.view()));
                             });
  {
    nn::Parameters<T, B> pu;
    const nn::BackendDiT<T, B> uncond(pu, tiny_config(0));
    pu.allocate();
    expect_throw<config_error>(log, pre + "labels for an unconditional model",
                               "BackendDiT: labels y were given (shape [4]) but the model is "
                               "unconditional (num_classes = 0)",
                               [&] {
                                 const auto y = labels({0, 1, 2, 0});
                                 uncond.forward(pu, x.view(), t.view(), y.view(), out.view(),
                                                cache);
                               });
  }
  expect_throw<config_error>(log, pre + "heads not dividing hidden",
                             "BackendDiT: hidden must be a positive multiple of heads, got hidden "
                             "= 8, heads = 3",
                             [] {
                               nn::Parameters<T, B> p2;
                               nn::DiTConfig k = tiny_config();
                               k.heads = 3;
                               const nn::BackendDiT<T, B> bad(p2, k);
                             });
  expect_throw<config_error>(log, pre + "sin-cos positions with hidden % 4 != 0",
                             "needs hidden % 4 == 0, got hidden = 6 (or set learned_pos_embed)",
                             [] {
                               nn::Parameters<T, B> p2;
                               nn::DiTConfig k = tiny_config();
                               k.hidden = 6;
                               const nn::BackendDiT<T, B> bad(p2, k);
                             });

  // The layers.
  const std::string lp = str("token layers<", B::name, "> errors: ");
  nn::Parameters<T, B> lps;
  const nn::BackendMultiheadSelfAttention<T, B> attn(lps, "blocks.0.attn", 8, 2);
  const nn::BackendLayerNorm<T, B> ln(lps, "norm", 6);
  const nn::BackendLinear<T, B> fc(lps, "fc", 4, 3);
  lps.allocate();
  typename BackendOps<B>::Context ctx;
  expect_throw<config_error>(log, lp + "attention heads",
                             "bad (BackendMultiheadSelfAttention): dim must be a positive "
                             "multiple of heads, got dim = 6, heads = 4",
                             [] {
                               nn::Parameters<T, B> p2;
                               const nn::BackendMultiheadSelfAttention<T, B> bad(p2, "bad", 6, 4);
                             });
  expect_throw<shape_error>(log, lp + "attention x",
                            "blocks.0.attn (BackendMultiheadSelfAttention): x: expected shape "
                            "[N, L, 8] with N, L >= 1, got [2, 3, 6]",
                            [&] {
                              TB a(Shape{2, 3, 6}), b(Shape{2, 3, 6});
                              typename nn::BackendMultiheadSelfAttention<T, B>::Cache ac;
                              attn.forward(ctx, lps, a.view(), b.view(), ac);
                            });
  expect_throw<config_error>(log, lp + "attention backward before forward",
                             "blocks.0.attn (BackendMultiheadSelfAttention): backward needs the "
                             "cache of the matching forward call",
                             [&] {
                               TB a(Shape{2, 3, 8}), b(Shape{2, 3, 8}), c(Shape{2, 3, 8});
                               typename nn::BackendMultiheadSelfAttention<T, B>::Cache ac;
                               attn.backward(ctx, lps, a.view(), b.view(), c.view(), ac);
                             });
  expect_throw<shape_error>(log, lp + "layer norm x",
                            "norm (BackendLayerNorm): x: expected shape [..., D] with 6 at axis "
                            "-1, got [2, 5]",
                            [&] {
                              TB a(Shape{2, 5}), b(Shape{2, 5});
                              typename nn::BackendLayerNorm<T, B>::Cache lc;
                              ln.forward(lps, a.view(), b.view(), lc);
                            });
  expect_throw<shape_error>(log, lp + "layer norm backward before forward",
                            "norm (BackendLayerNorm): cache.mean (run forward first)", [&] {
                              TB a(Shape{2, 6}), b(Shape{2, 6}), c(Shape{2, 6});
                              typename nn::BackendLayerNorm<T, B>::Cache lc;
                              ln.backward(lps, a.view(), b.view(), c.view(), lc);
                            });
  expect_throw<shape_error>(log, lp + "linear y",
                            "fc (BackendLinear): y: expected shape [5, 3], got [5, 4]", [&] {
                              TB a(Shape{5, 4}), b(Shape{5, 4});
                              fc.forward(ctx, lps, a.view(), b.view());
                            });
  expect_throw<shape_error>(log, lp + "modulation scale",
                            "modulate_tokens (tokens): scale: expected shape [2, 4], got [2, 3]",
                            [&] {
                              TB a(Shape{2, 3, 4}), s3(Shape{2, 3}), s4(Shape{2, 4});
                              nn::modulate_tokens<T, B>(a.view(), s3.view(), s4.view(), a.view());
                            });
  expect_throw<shape_error>(log, lp + "patchify",
                            "patchify: image: expected shape [N, C, H, W] with H, W positive "
                            "multiples of the patch size 2, got [1, 1, 5, 4]",
                            [&] {
                              TB a(Shape{1, 1, 5, 4}), p(Shape{1, 4, 4});
                              nn::backend_patchify<T, B>(a.view(), 2, p.view());
                            });
}

}  // namespace flowdiff::test::dit
