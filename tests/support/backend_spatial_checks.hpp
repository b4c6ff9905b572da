// tests/support/backend_spatial_checks.hpp — the checks of the backend-generic image layers
// (nn/layers/spatial_kernels.hpp), written once and templated on the backend B: tests/
// test_nn_backend_spatial.cpp runs them with B = Cpu (Catch2), tests/cuda/test_cuda_layers.cu with
// B = Cpu in its host part and B = Cuda in its device part. No Catch2 and no CUDA here: every body
// appends (ok, message) entries to a Log that the caller turns into its own assertions. Checked:
//   BackendConv2d / BackendGroupNorm (plain and fused with SiLU) against nn::Conv2d / nn::GroupNorm
//   (+ silu_forward / silu_backward): y, dx and every parameter gradient (accumulated onto
//   non-zero gradients), with DESIGN.md §4's tolerances: normalised MSE <= 1e-7 in fp32,
//   element-wise |a - b| <= 1e-12 + 1e-12 |ref| in fp64 on the CPU, normalised MSE <= 1e-24 in
//   fp64 elsewhere; BackendUpsampleNearest2d, add_per_channel and sum_per_channel bit-equal to
//   nn::UpsampleNearest2d and the U-Net's add_broadcast / sum_spatial (the same additions in the
//   same order); central differences in double through the backend layers (nn::gradcheck, max
//   relative error <= 1e-6); the shape and configuration errors and their messages; and
//   nn::BackendUNet (with and without the midcoder attention) against nn::UNet on tiny
//   configurations (output, dx, every
//   parameter gradient, same tolerances; the parameter layout checked on upload). Every
//   comparison first requires finite values and a reference that is not all zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <flowdiff/nn/layers/conv.hpp>
#include <flowdiff/nn/layers/norm.hpp>
#include <flowdiff/nn/layers/spatial_kernels.hpp>
#include <flowdiff/nn/layers/upsample.hpp>
#include <flowdiff/nn/models/unet.hpp>
#include <flowdiff/nn/models/unet_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend_common.hpp"

namespace flowdiff::test::spatial {

// ---------------------------------------------------------------------------------------------
// The log, comparisons and transfers (tests/support/backend_common.hpp).
// ---------------------------------------------------------------------------------------------

using backend_common::Check;
using backend_common::compare;
using backend_common::compare_exact;
using backend_common::device_copy;
using backend_common::download;
using backend_common::guard;
using backend_common::host_copy;
using backend_common::Log;
using backend_common::none;
using backend_common::str;
using backend_common::Tolerance;
using backend_common::upload;

/// How a backend's result must agree with the CPU layer's (DESIGN.md §4).
template <class T, Backend B>
Tolerance tolerance() {
  if constexpr (std::is_same_v<T, double> && std::is_same_v<B, Cpu>)
    return {true, 1e-12, 1e-12, 0};  // the same arithmetic up to summation order
  else if constexpr (std::is_same_v<T, double>)
    return {false, 0, 0, 1e-24};
  else
    return {false, 0, 0, 1e-7};
}

// ---------------------------------------------------------------------------------------------
// Conv2d.
// ---------------------------------------------------------------------------------------------

struct ConvCase {
  std::string name;
  index_t cin, cout, k, s, p;
  bool bias;
  Shape x;
  index_t limit = 0;  // workspace limit in elements (0: the default)
  bool dx = true;
  std::uint64_t seed = 1;
};

inline std::vector<ConvCase> conv_cases() {
  return {
      {"3x3 s1 p1, odd sizes", 3, 5, 3, 1, 1, true, {3, 3, 7, 9}, 0, true, 1},
      {"3x3 s2 p1 (downsample), odd sizes", 4, 6, 3, 2, 1, true, {2, 4, 9, 7}, 0, true, 2},
      {"3x3 s2 p0", 3, 2, 3, 2, 0, true, {2, 3, 11, 8}, 0, true, 3},
      {"3x3 s1 p0, groups of 3 + 1", 2, 4, 3, 1, 0, true, {4, 2, 6, 5}, 3 * 18 * 12, true, 4},
      {"3x3 s1 p1, one sample per product", 3, 4, 3, 1, 1, true, {3, 3, 5, 6}, 1, true, 5},
      {"1x1 s1 p0, no bias", 5, 3, 1, 1, 0, false, {3, 5, 5, 6}, 0, true, 6},
      {"1x1 s1 p0, one sample per product", 5, 3, 1, 1, 0, true, {3, 5, 5, 6}, 1, true, 7},
      {"1x1 s2 p0", 4, 3, 1, 2, 0, true, {2, 4, 7, 6}, 0, true, 8},
      {"4x4 s2 p1", 2, 3, 4, 2, 1, true, {2, 2, 8, 6}, 0, true, 9},
      {"5x5 s1 p2, no dx", 3, 4, 5, 1, 2, true, {2, 3, 7, 7}, 0, false, 10},
      {"3x3 s1 p1, 16 -> 16 channels at 16x16 (threaded)",
       16,
       16,
       3,
       1,
       1,
       true,
       {8, 16, 16, 16},
       0,
       true,
       11},
  };
}

template <class T>
struct LayerResult {
  std::vector<T> y, act, dx, grads;
};

/// A case's inputs on the host: an initialised nn::Conv2d, x ~ N(0, 1), dy ~ N(0, 1), and
/// gradients already holding N(0, 1) values (backward must accumulate onto them).
template <class T>
struct ConvInputs {
  nn::Parameters<T> ps;
  nn::Conv2d<T> layer;
  Tensor<T> x, dy;
  explicit ConvInputs(const ConvCase& c) : layer(ps, "conv", c.cin, c.cout, c.k, c.s, c.p, c.bias) {
    Generator gen(c.seed);
    ps.allocate();
    layer.init(ps, gen);
    x = randn<T>(c.x, gen);
    dy = randn<T>(layer.output_shape(c.x), gen);
    fill_normal(ps.flat_grads(), gen);
  }
};

template <class T>
LayerResult<T> conv_reference(const ConvCase& c) {
  ConvInputs<T> in(c);
  typename nn::Conv2d<T>::Cache cache;
  Tensor<T> y(in.dy.shape()), dx(c.x);
  in.layer.forward(in.ps, in.x.view(), y.view(), cache);
  in.layer.backward(in.ps, in.x.view(), in.dy.view(), c.dx ? dx.view() : none<T>(), cache);
  return {y.to_vector(),
          {},
          c.dx ? dx.to_vector() : std::vector<T>{},
          host_copy<T, Cpu>(in.ps.flat_grads())};
}

template <class T, Backend B>
LayerResult<T> conv_on_backend(const ConvCase& c) {
  ConvInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendConv2d<T, B> conv(ps, "conv", c.cin, c.cout, c.k, c.s, c.p, c.bias);
  ps.allocate();
  if (c.limit > 0) conv.set_workspace_limit(c.limit);
  nn::upload_parameters(ps, in.ps);
  upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  const auto x = device_copy<T, B>(in.x.view());
  const auto dy = device_copy<T, B>(in.dy.view());
  typename BackendOps<B>::Context ctx;
  typename nn::BackendConv2d<T, B>::Cache cache;
  // A one-sample forward first: the workspaces then grow for the full batch.
  Tensor<T, B> y1(conv.output_shape(x.view().rows(0, 1).shape()));
  conv.forward(ctx, ps, x.view().rows(0, 1), y1.view(), cache);
  Tensor<T, B> y(in.dy.shape()), dx(c.x);
  conv.forward(ctx, ps, x.view(), y.view(), cache);
  conv.backward(ctx, ps, x.view(), dy.view(), c.dx ? dx.view() : none<T, B>(), cache);
  return {host_copy<T, B>(y.view()),
          {},
          c.dx ? host_copy<T, B>(dx.view()) : std::vector<T>{},
          host_copy<T, B>(ps.flat_grads())};
}

template <class T, Backend B>
void conv_checks(Log& log) {
  const Tolerance tol = tolerance<T, B>();
  const std::string ty = std::is_same_v<T, float> ? "float" : "double";
  for (const auto& c : conv_cases()) {
    const std::string what = str("BackendConv2d<", ty, ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = conv_reference<T>(c);
      const auto got = conv_on_backend<T, B>(c);
      compare(log, what + ": y", got.y, ref.y, tol);
      if (c.dx) compare(log, what + ": dx", got.dx, ref.dx, tol);
      compare(log, what + ": parameter gradients", got.grads, ref.grads, tol);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (optionally followed by SiLU).
// ---------------------------------------------------------------------------------------------

struct NormCase {
  std::string name;
  index_t groups, channels;
  Shape x;
  bool affine = true, silu = false, dx = true;
  std::uint64_t seed = 1;
};

inline std::vector<NormCase> norm_cases() {
  return {
      {"1 group, odd sizes", 1, 4, {3, 4, 5, 7}, true, false, true, 21},
      {"8 groups of 2 channels", 8, 16, {2, 16, 5, 3}, true, false, true, 22},
      {"8 groups of 1 channel, SiLU", 8, 8, {3, 8, 3, 5}, true, true, true, 23},
      {"rank 3, 2 groups", 2, 6, {3, 6, 7}, true, false, true, 24},
      {"rank 2, 2 groups", 2, 8, {5, 8}, true, false, true, 25},
      {"no affine map, SiLU", 4, 8, {2, 8, 3, 3}, false, true, true, 26},
      {"no dx", 2, 4, {2, 4, 3, 3}, true, false, false, 27},
      {"8 groups, 32 channels at 16x16, SiLU (threaded)",
       8,
       32,
       {8, 32, 16, 16},
       true,
       true,
       true,
       28},
  };
}

/// A case's inputs: x ~ N(0.5, 2^2) (a mean and scale for the normalisation to remove),
/// gamma ~ N(1, 0.5^2), beta ~ N(0, 0.5^2) (neither 1 nor 0, so a swapped gradient shows),
/// dy ~ N(0, 1), gradients already holding N(0, 1) values.
template <class T>
struct NormInputs {
  nn::Parameters<T> ps;
  nn::GroupNorm<T> layer;
  Tensor<T> x, dy;
  explicit NormInputs(const NormCase& c)
      : layer(ps, "gn", c.groups, c.channels, T(1e-5), c.affine) {
    Generator gen(c.seed);
    x = Tensor<T>(c.x);
    fill_normal(x, gen, T(0.5), T(2));
    dy = randn<T>(c.x, gen);
    if (ps.count() > 0) {
      ps.allocate();
      fill_normal(ps.param(layer.weight_id()), gen, T(1), T(0.5));
      fill_normal(ps.param(layer.bias_id()), gen, T(0), T(0.5));
      fill_normal(ps.flat_grads(), gen);
    }
  }
};

template <class T, Backend B>
std::vector<T> grads_of(const nn::Parameters<T, B>& ps) {
  return ps.count() > 0 ? host_copy<T, B>(ps.flat_grads()) : std::vector<T>{};
}

template <class T>
LayerResult<T> norm_reference(const NormCase& c) {
  NormInputs<T> in(c);
  typename nn::GroupNorm<T>::Cache cache;
  Tensor<T> y(c.x), act(c.x), dpre(c.x), dx(c.x);
  in.layer.forward(in.ps, in.x.view(), y.view(), cache);
  View<const T> g = in.dy.view();
  if (c.silu) {  // dy is the gradient of act = SiLU(y)
    nn::silu_forward<T>(y.view(), act.view());
    nn::silu_backward<T>(y.view(), in.dy.view(), dpre.view());
    g = dpre.view();
  }
  in.layer.backward(in.ps, in.x.view(), g, c.dx ? dx.view() : none<T>(), cache);
  return {y.to_vector(), c.silu ? act.to_vector() : std::vector<T>{},
          c.dx ? dx.to_vector() : std::vector<T>{}, grads_of(in.ps)};
}

/// no_y: forward_silu without y and the backward_silu that recomputes it (c.silu only).
template <class T, Backend B>
LayerResult<T> norm_on_backend(const NormCase& c, bool no_y = false) {
  NormInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendGroupNorm<T, B> gn(ps, "gn", c.groups, c.channels, T(1e-5), c.affine);
  if (ps.count() > 0) {
    ps.allocate();
    nn::upload_parameters(ps, in.ps);
    upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  }
  const auto x = device_copy<T, B>(in.x.view());
  const auto dy = device_copy<T, B>(in.dy.view());
  typename nn::BackendGroupNorm<T, B>::Cache cache;
  Tensor<T, B> y(c.x), act(c.x), dx(c.x);
  if (c.silu && no_y) {
    gn.forward_silu(ps, x.view(), none<T, B>(), act.view(), cache);
    gn.backward_silu(ps, x.view(), dy.view(), c.dx ? dx.view() : none<T, B>(), cache);
  } else if (c.silu) {
    gn.forward_silu(ps, x.view(), y.view(), act.view(), cache);
    gn.backward_silu(ps, x.view(), y.view(), dy.view(), c.dx ? dx.view() : none<T, B>(), cache);
  } else {
    gn.forward(ps, x.view(), y.view(), cache);
    gn.backward(ps, x.view(), dy.view(), c.dx ? dx.view() : none<T, B>(), cache);
  }
  return {host_copy<T, B>(y.view()), c.silu ? host_copy<T, B>(act.view()) : std::vector<T>{},
          c.dx ? host_copy<T, B>(dx.view()) : std::vector<T>{}, grads_of(ps)};
}

template <class T, Backend B>
void norm_checks(Log& log) {
  const Tolerance tol = tolerance<T, B>();
  const std::string ty = std::is_same_v<T, float> ? "float" : "double";
  for (const auto& c : norm_cases()) {
    const std::string what = str("BackendGroupNorm<", ty, ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = norm_reference<T>(c);
      const auto got = norm_on_backend<T, B>(c);
      compare(log, what + ": y", got.y, ref.y, tol);
      if (c.silu) compare(log, what + ": SiLU(y)", got.act, ref.act, tol);
      if (c.dx) compare(log, what + ": dx", got.dx, ref.dx, tol);
      if (c.affine) compare(log, what + ": parameter gradients", got.grads, ref.grads, tol);
      if (c.silu) {  // without y: recomputed by the same operations, so bit for bit
        const auto re = norm_on_backend<T, B>(c, /*no_y=*/true);
        compare_exact(log, what + ", y not kept: SiLU(y)", re.act, got.act);
        if (c.dx) compare_exact(log, what + ", y not kept: dx", re.dx, got.dx);
        if (c.affine)
          compare_exact(log, what + ", y not kept: parameter gradients", re.grads, got.grads);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Upsampling and the per-channel broadcast: the same additions in the same order, so bit-equal.
// ---------------------------------------------------------------------------------------------

template <class T, Backend B>
void upsample_checks(Log& log) {
  struct Case {
    index_t factor;
    Shape x;
  };
  for (const Case& c : {Case{2, {2, 3, 5, 7}}, Case{3, {1, 2, 4, 3}}, Case{1, {2, 2, 3, 3}}}) {
    const std::string what =
        str("BackendUpsampleNearest2d<", B::name, "> factor ", c.factor, " x ", c.x);
    guard(log, what, [&] {
      Generator gen(30 + static_cast<std::uint64_t>(c.factor));
      nn::UpsampleNearest2d<T> ref_layer(c.factor);
      nn::BackendUpsampleNearest2d<T, B> layer(c.factor);
      const Shape ys = ref_layer.output_shape(c.x);
      const auto x = randn<T>(c.x, gen);
      const auto dy = randn<T>(ys, gen);
      Tensor<T> y_ref(ys), dx_ref(c.x);
      ref_layer.forward(x.view(), y_ref.view());
      ref_layer.backward(x.view(), dy.view(), dx_ref.view());
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> y(layer.output_shape(c.x)), dx(c.x);
      layer.forward(xd.view(), y.view());
      layer.backward(xd.view(), dyd.view(), dx.view());
      compare_exact(log, what + ": y", host_copy<T, B>(y.view()), y_ref.to_vector());
      compare_exact(log, what + ": dx", host_copy<T, B>(dx.view()), dx_ref.to_vector());
    });
  }
}

template <class T, Backend B>
void broadcast_checks(Log& log) {
  for (const Shape& s : {Shape{3, 5, 4, 6}, Shape{2, 7, 1, 1}, Shape{4, 3, 9, 11}}) {
    const std::string what = str("add_per_channel / sum_per_channel<", B::name, "> ", s);
    guard(log, what, [&] {
      Generator gen(40 + static_cast<std::uint64_t>(s[3]));
      const index_t len = s[2] * s[3];
      auto y_ref = randn<T>(s, gen);
      const auto v = randn<T>(Shape{s[0], s[1]}, gen);
      const auto dy = randn<T>(s, gen);
      auto y = device_copy<T, B>(y_ref.view());
      nn::unet_detail::add_broadcast<T>(y_ref.view(), v.view(), len);
      Tensor<T> dv_ref(Shape{s[0], s[1]});
      nn::unet_detail::sum_spatial<T>(dy.view(), dv_ref.view(), len);
      const auto vd = device_copy<T, B>(v.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> dv(Shape{s[0], s[1]});
      nn::add_per_channel<T, B>(y.view(), vd.view());
      nn::sum_per_channel<T, B>(dyd.view(), dv.view());
      compare_exact(log, what + ": y + v", host_copy<T, B>(y.view()), y_ref.to_vector());
      compare_exact(log, what + ": sum over H, W", host_copy<T, B>(dv.view()), dv_ref.to_vector());
      // a + b against the same additions on the host.
      auto a = device_copy<T, B>(dy.view());
      nn::add_in_place<T, B>(a.view(), View<const T, B>(y.view()));
      std::vector<T> sum = dy.to_vector();
      const std::vector<T> yv = y_ref.to_vector();
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += yv[i];
      compare_exact(log, what + ": add_in_place", host_copy<T, B>(a.view()), sum);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Central differences in double through the backend layers: the checker perturbs host copies of
// the inputs and parameters; forward uploads them and downloads the outputs, backward uploads dy
// and the gradients so far and downloads the gradients after (so parameter gradients accumulate on
// B as the checker expects).
// ---------------------------------------------------------------------------------------------

inline void expect_gradcheck(Log& log, const std::string& what, const nn::GradcheckReport& rep) {
  log.expect(rep.ok(), what + ": " + rep.summary());
}

template <Backend B>
void gradcheck_conv(Log& log) {
  struct Cfg {
    index_t cin, cout, k, s, p;
    bool bias;
    Shape x;
    index_t limit;
  };
  for (const auto& c :
       {Cfg{3, 4, 3, 1, 1, true, {2, 3, 5, 5}, 0}, Cfg{2, 3, 3, 2, 1, true, {2, 2, 7, 6}, 0},
        Cfg{3, 2, 1, 1, 0, false, {3, 3, 4, 4}, 1},
        Cfg{2, 2, 4, 2, 1, true, {3, 2, 6, 6}, 2 * 16 * 9}}) {
    const std::string what = str("gradcheck BackendConv2d<double, ", B::name, "> k ", c.k, " s ",
                                 c.s, " p ", c.p, " x ", c.x);
    guard(log, what, [&] {
      Generator gen(50 + static_cast<std::uint64_t>(c.k * 10 + c.s));
      nn::Parameters<double> hp;
      nn::Conv2d<double> mirror(hp, "conv", c.cin, c.cout, c.k, c.s, c.p, c.bias);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, 0.0, 0.5);
      nn::Parameters<double, B> dp;
      nn::BackendConv2d<double, B> conv(dp, "conv", c.cin, c.cout, c.k, c.s, c.p, c.bias);
      dp.allocate();
      if (c.limit > 0) conv.set_workspace_limit(c.limit);
      const Shape ys = conv.output_shape(c.x);
      auto x = randn<double>(c.x, gen);
      Tensor<double> y(ys), dx(c.x);
      Tensor<double, B> xd(c.x), yd(ys), dyd(ys), dxd(c.x);
      typename BackendOps<B>::Context ctx;
      typename nn::BackendConv2d<double, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, &hp, {y.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<double, B>(xd.view(), x.view());
                             conv.forward(ctx, dp, xd.view(), yd.view(), cache);
                             download<double, B>(y.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<double, B>(dyd.view(), dy[0]);
                             upload<double, B>(dp.flat_grads(), hp.flat_grads());
                             conv.backward(ctx, dp, xd.view(), dyd.view(), dxd.view(), cache);
                             download<double, B>(hp.flat_grads(), dp.flat_grads());
                             download<double, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
}

template <Backend B>
void gradcheck_norm(Log& log) {
  struct Cfg {
    Shape x;
    index_t groups;
    bool affine, silu;
  };
  for (const auto& c : {Cfg{{2, 6, 2, 3}, 3, true, false}, Cfg{{2, 8, 3, 3}, 8, true, true},
                        Cfg{{3, 4, 5}, 1, false, true}, Cfg{{3, 4}, 2, true, false}}) {
    const std::string what =
        str("gradcheck BackendGroupNorm<double, ", B::name, "> ", c.groups, " groups x ", c.x,
            c.affine ? "" : " no affine", c.silu ? " + SiLU" : "");
    guard(log, what, [&] {
      Generator gen(60 + static_cast<std::uint64_t>(c.groups));
      nn::Parameters<double> hp;
      nn::GroupNorm<double> mirror(hp, "gn", c.groups, c.x[1], 1e-5, c.affine);
      nn::Parameters<double, B> dp;
      nn::BackendGroupNorm<double, B> gn(dp, "gn", c.groups, c.x[1], 1e-5, c.affine);
      if (c.affine) {
        hp.allocate();
        dp.allocate();
        fill_normal(hp.flat_params(), gen);
      }
      auto x = randn<double>(c.x, gen);
      Tensor<double> out(c.x), dx(c.x);
      Tensor<double, B> xd(c.x), yd(c.x), actd(c.x), dyd(c.x), dxd(c.x);
      typename nn::BackendGroupNorm<double, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, c.affine ? &hp : nullptr, {out.view()},
                           [&] {
                             if (c.affine) nn::upload_parameters(dp, hp);
                             upload<double, B>(xd.view(), x.view());
                             if (c.silu) {
                               gn.forward_silu(dp, xd.view(), yd.view(), actd.view(), cache);
                               download<double, B>(out.view(), actd.view());
                             } else {
                               gn.forward(dp, xd.view(), yd.view(), cache);
                               download<double, B>(out.view(), yd.view());
                             }
                           },
                           [&](const auto& dy) {
                             upload<double, B>(dyd.view(), dy[0]);
                             if (c.affine) upload<double, B>(dp.flat_grads(), hp.flat_grads());
                             if (c.silu)
                               gn.backward_silu(dp, xd.view(), yd.view(), dyd.view(), dxd.view(),
                                                cache);
                             else
                               gn.backward(dp, xd.view(), dyd.view(), dxd.view(), cache);
                             if (c.affine) download<double, B>(hp.flat_grads(), dp.flat_grads());
                             download<double, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
}

template <Backend B>
void gradcheck_upsample_broadcast(Log& log) {
  const std::string what =
      str("gradcheck BackendUpsampleNearest2d / add_per_channel<double, ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(70);
    // out = upsample(x) + v broadcast over H, W: dx through the upsampling, dv through the sum.
    const Shape xs{2, 3, 3, 4}, ys{2, 3, 6, 8}, vs{2, 3};
    nn::BackendUpsampleNearest2d<double, B> up(2);
    auto x = randn<double>(xs, gen);
    auto v = randn<double>(vs, gen);
    Tensor<double> out(ys), dx(xs), dv(vs);
    Tensor<double, B> xd(xs), vd(vs), yd(ys), dyd(ys), dxd(xs), dvd(vs);
    expect_gradcheck(
        log, what,
        nn::gradcheck(
            {{"x", x.view(), dx.view()}, {"v", v.view(), dv.view()}}, nullptr, {out.view()},
            [&] {
              upload<double, B>(xd.view(), x.view());
              upload<double, B>(vd.view(), v.view());
              up.forward(xd.view(), yd.view());
              nn::add_per_channel<double, B>(yd.view(), vd.view());
              download<double, B>(out.view(), yd.view());
            },
            [&](const auto& dy) {
              upload<double, B>(dyd.view(), dy[0]);
              up.backward(xd.view(), dyd.view(), dxd.view());
              nn::sum_per_channel<double, B>(dyd.view(), dvd.view());
              download<double, B>(dx.view(), dxd.view());
              download<double, B>(dv.view(), dvd.view());
            },
            gen));
  });
}

// ---------------------------------------------------------------------------------------------
// Errors: the type and a message naming the layer, the argument, the expected and actual shape.
// ---------------------------------------------------------------------------------------------

template <class E, class F>
void expect_throw(Log& log, const std::string& what, const std::string& needle, F&& f) {
  try {
    f();
  } catch (const E& e) {
    const std::string m = e.what();
    log.expect(m.find(needle) != std::string::npos,
               what + ": the message \"" + m + "\" should contain \"" + needle + "\"");
    return;
  } catch (const std::exception& e) {
    log.expect(false, what + ": threw another exception type: " + e.what());
    return;
  }
  log.expect(false, what + ": did not throw");
}

template <Backend B>
void error_checks(Log& log) {
  using T = float;
  using TB = Tensor<T, B>;
  nn::Parameters<T, B> ps;
  nn::BackendConv2d<T, B> conv(ps, "enc.conv", 3, 4, 3, 1, 1);
  nn::BackendConv2d<T, B> wide(ps, "enc.wide", 3, 2, 5);
  nn::BackendGroupNorm<T, B> gn(ps, "enc.gn", 2, 6);
  ps.allocate();
  typename BackendOps<B>::Context ctx;
  typename nn::BackendConv2d<T, B>::Cache cc;
  typename nn::BackendGroupNorm<T, B>::Cache gc;
  const std::string pre = str("errors<", B::name, ">: ");

  expect_throw<shape_error>(
      log, pre + "conv x channels",
      "enc.conv (BackendConv2d): x: expected shape [N, 3, H, W] with N >= 1 and H, W >= 1, got "
      "[2, 4, 5, 5]",
      [&] {
        TB x(Shape{2, 4, 5, 5}), y(Shape{2, 4, 5, 5});
        conv.forward(ctx, ps, x.view(), y.view(), cc);
      });
  expect_throw<shape_error>(log, pre + "conv x smaller than the kernel",
                            "enc.wide (BackendConv2d): x: expected shape [N, 3, H, W] with N >= 1 "
                            "and H, W >= 5, got [1, 3, 4, 6]",
                            [&] {
                              (void)wide.output_shape(Shape{1, 3, 4, 6});
                            });
  expect_throw<shape_error>(log, pre + "conv empty batch", "got [0, 3, 5, 5]", [&] {
    (void)conv.output_shape(Shape{0, 3, 5, 5});
  });
  expect_throw<shape_error>(
      log, pre + "conv y",
      "enc.conv (BackendConv2d): y: expected shape [2, 4, 5, 5], got [2, 4, 5, 4]", [&] {
        TB x(Shape{2, 3, 5, 5}), y(Shape{2, 4, 5, 4});
        conv.forward(ctx, ps, x.view(), y.view(), cc);
      });
  expect_throw<shape_error>(
      log, pre + "conv dy",
      "enc.conv (BackendConv2d): dy: expected shape [2, 4, 5, 5], got [2, 5, 5, 5]", [&] {
        TB x(Shape{2, 3, 5, 5}), dy(Shape{2, 5, 5, 5}), dx(Shape{2, 3, 5, 5});
        conv.backward(ctx, ps, x.view(), dy.view(), dx.view(), cc);
      });
  expect_throw<shape_error>(
      log, pre + "conv dx",
      "enc.conv (BackendConv2d): dx: expected shape [2, 3, 5, 5], got [2, 3, 5, 4]", [&] {
        TB x(Shape{2, 3, 5, 5}), dy(Shape{2, 4, 5, 5}), dx(Shape{2, 3, 5, 4});
        conv.backward(ctx, ps, x.view(), dy.view(), dx.view(), cc);
      });
  expect_throw<config_error>(log, pre + "conv stride 0",
                             "bad (BackendConv2d): need in_ch, out_ch, kernel, stride >= 1", [&] {
                               nn::Parameters<T, B> p2;
                               nn::BackendConv2d<T, B> bad(p2, "bad", 3, 4, 3, 0, 1);
                             });
  expect_throw<config_error>(log, pre + "conv workspace limit", "workspace limit must be >= 1",
                             [&] { conv.set_workspace_limit(0); });

  expect_throw<shape_error>(
      log, pre + "groupnorm x",
      "enc.gn (BackendGroupNorm): x: expected shape [N, C, ...] with 6 at axis 1, got [2, 4, 3]",
      [&] {
        TB x(Shape{2, 4, 3}), y(Shape{2, 4, 3});
        gn.forward(ps, x.view(), y.view(), gc);
      });
  expect_throw<shape_error>(log, pre + "groupnorm backward before forward",
                            "enc.gn (BackendGroupNorm): cache.mean (run forward first)", [&] {
                              TB x(Shape{2, 6, 3}), dy(Shape{2, 6, 3}), dx(Shape{2, 6, 3});
                              typename nn::BackendGroupNorm<T, B>::Cache fresh;
                              gn.backward(ps, x.view(), dy.view(), dx.view(), fresh);
                            });
  expect_throw<shape_error>(log, pre + "groupnorm y",
                            "enc.gn (BackendGroupNorm): y: expected shape [2, 6, 3], got [2, 6, 4]",
                            [&] {
                              TB x(Shape{2, 6, 3}), y(Shape{2, 6, 4});
                              gn.forward(ps, x.view(), y.view(), gc);
                            });
  expect_throw<shape_error>(log, pre + "groupnorm act",
                            "enc.gn (BackendGroupNorm): act: expected shape [2, 6, 3], got [2, 6]",
                            [&] {
                              TB x(Shape{2, 6, 3}), y(Shape{2, 6, 3}), act(Shape{2, 6});
                              gn.forward_silu(ps, x.view(), y.view(), act.view(), gc);
                            });
  expect_throw<shape_error>(
      log, pre + "groupnorm dact",
      "enc.gn (BackendGroupNorm): dact: expected shape [2, 6, 3], got [2, 6, 2]", [&] {
        TB x(Shape{2, 6, 3}), y(Shape{2, 6, 3}), dact(Shape{2, 6, 2}), dx(Shape{2, 6, 3});
        gn.backward_silu(ps, x.view(), y.view(), dact.view(), dx.view(), gc);
      });
  expect_throw<config_error>(log, pre + "groupnorm groups",
                             "bad (BackendGroupNorm): channels must be a positive multiple of "
                             "groups, got groups = 4, channels = 6",
                             [&] {
                               nn::Parameters<T, B> p2;
                               nn::BackendGroupNorm<T, B> bad(p2, "bad", 4, 6);
                             });

  nn::BackendUpsampleNearest2d<T, B> up(2, "dec.up");
  expect_throw<shape_error>(
      log, pre + "upsample y",
      "dec.up (BackendUpsampleNearest2d): y: expected shape [1, 2, 6, 8], got [1, 2, 6, 6]", [&] {
        TB x(Shape{1, 2, 3, 4}), y(Shape{1, 2, 6, 6});
        up.forward(x.view(), y.view());
      });
  expect_throw<shape_error>(
      log, pre + "upsample x",
      "dec.up (BackendUpsampleNearest2d): x: expected shape [N, C, H, W], got [2, 3, 4]", [&] {
        TB x(Shape{2, 3, 4}), y(Shape{2, 3, 8});
        up.forward(x.view(), y.view());
      });
  expect_throw<shape_error>(
      log, pre + "upsample dx",
      "dec.up (BackendUpsampleNearest2d): dx: expected shape [1, 2, 3, 4], got [1, 2, 4, 3]", [&] {
        TB x(Shape{1, 2, 3, 4}), dy(Shape{1, 2, 6, 8}), dx(Shape{1, 2, 4, 3});
        up.backward(x.view(), dy.view(), dx.view());
      });
  expect_throw<config_error>(log, pre + "upsample factor",
                             "dec.up (BackendUpsampleNearest2d): factor must be >= 1, got 0",
                             [&] { nn::BackendUpsampleNearest2d<T, B> bad(0, "dec.up"); });
  expect_throw<shape_error>(log, pre + "add_per_channel v",
                            "add_per_channel (broadcast): v: expected shape [2, 3], got [3, 2]",
                            [&] {
                              TB y(Shape{2, 3, 4, 4}), v(Shape{3, 2});
                              nn::add_per_channel<T, B>(y.view(), v.view());
                            });
  expect_throw<shape_error>(log, pre + "sum_per_channel dv",
                            "sum_per_channel (broadcast): dv: expected shape [2, 3], got [2, 3, 1]",
                            [&] {
                              TB dy(Shape{2, 3, 4, 4}), dv(Shape{2, 3, 1});
                              nn::sum_per_channel<T, B>(dy.view(), dv.view());
                            });
  expect_throw<shape_error>(log, pre + "add_in_place b",
                            "add_in_place (element-wise): b: expected shape [2, 3], got [3, 2]",
                            [&] {
                              TB a(Shape{2, 3}), b(Shape{3, 2});
                              nn::add_in_place<T, B>(a.view(), b.view());
                            });
}

// ---------------------------------------------------------------------------------------------
// The U-Net, with and without the midcoder attention: nn::BackendUNet against nn::UNet.
// ---------------------------------------------------------------------------------------------

struct UNetCase {
  std::string name;
  nn::UNetConfig cfg;
  Shape x;
  bool labels = true;  // pass labels (else a conditional model uses the null label)
  bool dx = true;
  std::uint64_t seed = 1;
};

inline std::vector<UNetCase> unet_cases() {
  // Built member by member: GCC 12 warns (maybe-uninitialized) on a braced list of these.
  const auto make = [](std::string name, index_t in, std::vector<index_t> ch, index_t R, index_t td,
                       index_t yd, index_t classes, index_t groups, Shape x, bool labels, bool dx,
                       std::uint64_t seed) {
    UNetCase c;
    c.name = std::move(name);
    c.cfg.in_channels = in;
    c.cfg.channels = std::move(ch);
    c.cfg.num_residual_layers = R;
    c.cfg.t_embed_dim = td;
    c.cfg.y_embed_dim = yd;
    c.cfg.num_classes = classes;
    c.cfg.groups = groups;
    c.x = x;
    c.labels = labels;
    c.dx = dx;
    c.seed = seed;
    return c;
  };
  std::vector<UNetCase> v;
  v.push_back(make("2 levels, conditional, labels", 2, {8, 16}, 1, 6, 5, 3, 4, {3, 2, 8, 6}, true,
                   true, 81));
  v.push_back(make("3 levels, unconditional, odd t_embed_dim, 2 blocks per stage", 1, {4, 8, 8}, 2,
                   7, 4, 0, 2, {2, 1, 8, 4}, false, true, 82));
  v.push_back(make("1 level, conditional, null label, no dx", 1, {8}, 1, 4, 3, 2, 8, {2, 1, 5, 3},
                   false, false, 83));
  // The midcoder attention: at the lowest of two levels (4 x 3 = 12 tokens of 16 channels), and
  // with one level, where the final conv reads the attention's output.
  v.push_back(make("2 levels, conditional, midcoder attention (2 heads), labels", 2, {8, 16}, 1, 6,
                   5, 3, 4, {3, 2, 8, 6}, true, true, 84));
  v.back().cfg.attention = true;
  v.back().cfg.attention_heads = 2;
  v.push_back(make("1 level, unconditional, midcoder attention (4 heads)", 1, {8}, 1, 4, 3, 0, 2,
                   {2, 1, 5, 3}, false, true, 85));
  v.back().cfg.attention = true;
  v.back().cfg.attention_heads = 4;
  return v;
}

/// A case's inputs: an initialised nn::UNet whose GroupNorm scales and shifts (the midcoder
/// attention's norm included) are then drawn
/// from N(1, 0.3^2) / N(0, 0.3^2) (not 1 and 0, so a swapped gradient shows), x ~ N(0, 1),
/// t ~ U[0, 1), labels cycling over [0, K], dout ~ N(0, 1), gradients already non-zero.
template <class T>
struct UNetInputs {
  nn::Parameters<T> ps;
  nn::UNet<T> net;
  Tensor<T> x, t, dout;
  Tensor<label_t> y;
  explicit UNetInputs(const UNetCase& c) : net(ps, c.cfg) {
    Generator gen(c.seed);
    ps.allocate();
    net.init(ps, gen);
    for (index_t id = 0; id < ps.count(); ++id) {
      const auto& name = ps.info(id).name;
      const bool norm = name.find("init_conv.1.") != std::string::npos ||
                        name.find(".block1.0.") != std::string::npos ||
                        name.find(".block2.0.") != std::string::npos ||
                        name.find(".attn_norm.") != std::string::npos;
      if (norm) fill_normal(ps.param(id), gen, T(name.ends_with(".weight") ? 1 : 0), T(0.3));
    }
    fill_normal(ps.flat_grads(), gen);
    x = randn<T>(c.x, gen);
    t = Tensor<T>(Shape{c.x[0]});
    fill_uniform(t, gen);
    dout = randn<T>(c.x, gen);
    y = Tensor<label_t>(Shape{c.labels ? c.x[0] : 0});
    for (index_t i = 0; i < y.numel(); ++i)
      y[i] = static_cast<label_t>(i % (c.cfg.num_classes + 1));
  }
};

template <class T>
LayerResult<T> unet_reference(const UNetCase& c) {
  UNetInputs<T> in(c);
  typename nn::UNet<T>::Cache cache;
  Tensor<T> out(c.x), dx(c.x);
  in.net.forward(in.ps, in.x.view(), in.t.view(), in.y.view(), out.view(), cache);
  in.net.backward(in.ps, in.dout.view(), c.dx ? dx.view() : none<T>(), cache);
  return {out.to_vector(),
          {},
          c.dx ? dx.to_vector() : std::vector<T>{},
          host_copy<T, Cpu>(in.ps.flat_grads())};
}

template <class T, Backend B>
LayerResult<T> unet_on_backend(const UNetCase& c) {
  UNetInputs<T> in(c);
  nn::Parameters<T, B> ps;
  nn::BackendUNet<T, B> net(ps, c.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);  // checks the layout: names, shapes, offsets
  upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  const auto x = device_copy<T, B>(in.x.view());
  const auto t = device_copy<T, B>(in.t.view());
  const auto y = device_copy<label_t, B>(in.y.view());
  const auto dout = device_copy<T, B>(in.dout.view());
  typename nn::BackendUNet<T, B>::Cache cache;
  Tensor<T, B> out(c.x), dx(c.x);
  net.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
  net.backward(ps, dout.view(), c.dx ? dx.view() : none<T, B>(), cache);
  return {host_copy<T, B>(out.view()),
          {},
          c.dx ? host_copy<T, B>(dx.view()) : std::vector<T>{},
          host_copy<T, B>(ps.flat_grads())};
}

template <class T, Backend B>
void unet_checks(Log& log) {
  const Tolerance tol = tolerance<T, B>();
  const std::string ty = std::is_same_v<T, float> ? "float" : "double";
  for (const auto& c : unet_cases()) {
    const std::string what = str("BackendUNet<", ty, ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = unet_reference<T>(c);
      const auto got = unet_on_backend<T, B>(c);
      compare(log, what + ": u(x, t, y)", got.y, ref.y, tol);
      if (c.dx) compare(log, what + ": dx", got.dx, ref.dx, tol);
      compare(log, what + ": parameter gradients", got.grads, ref.grads, tol);
    });
  }
  expect_throw<config_error>(log, str("BackendUNet<", B::name, "> attention heads"),
                             "BackendUNet: attention_heads = 3 must divide the lowest level's "
                             "channels 8",
                             [] {
                               nn::Parameters<T, B> ps;
                               nn::UNetConfig cfg;
                               cfg.channels = {8};
                               cfg.attention = true;
                               cfg.attention_heads = 3;
                               nn::BackendUNet<T, B> net(ps, cfg);
                             });
}

/// Every body for backend B: forward / backward parity in float and double, bit-equal upsampling
/// and broadcasts, central differences, errors, the U-Net.
template <Backend B>
void all_checks(Log& log) {
  conv_checks<float, B>(log);
  conv_checks<double, B>(log);
  norm_checks<float, B>(log);
  norm_checks<double, B>(log);
  upsample_checks<float, B>(log);
  upsample_checks<double, B>(log);
  broadcast_checks<float, B>(log);
  broadcast_checks<double, B>(log);
  gradcheck_conv<B>(log);
  gradcheck_norm<B>(log);
  gradcheck_upsample_broadcast<B>(log);
  error_checks<B>(log);
  unet_checks<float, B>(log);
  unet_checks<double, B>(log);
}

}  // namespace flowdiff::test::spatial
