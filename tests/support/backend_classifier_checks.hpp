// tests/support/backend_classifier_checks.hpp — the checks of nn::BackendConvClassifier, the
// softmax cross-entropy on B (nn/models/classifier_backend.hpp), nn::BackendBatchNorm2d and
// nn::BackendAvgPool2d (nn/layers/spatial_kernels.hpp), written once and templated on the backend
// B: tests/test_nn_backend_classifier.cpp runs them with B = Cpu (Catch2), tests/cuda/
// test_cuda_layers.cu with B = Cpu in its host part and B = Cuda in its device part. No Catch2 and
// no CUDA here: every body appends (ok, message) entries to a spatial::Log
// (tests/support/backend_spatial_checks.hpp) that the caller turns into assertions.
//   layer_checks       BackendBatchNorm2d against nn::BatchNorm2d: training (y, the running
//                      statistics after two updates, dx, dgamma, dbeta accumulated onto non-zero
//                      gradients), the read-only forward (no update), eval mode (y, dx, grads);
//                      BackendAvgPool2d against nn::AvgPool2d (k = 2 with a dropped row and
//                      column, k = 3); the cross-entropy, log-softmax and log-probability seed
//                      against nn::SoftmaxCrossEntropy / log_softmax / log_prob_seed. With B = Cpu
//                      all of these are bit-equal (the same operations in the same order); on a
//                      device DESIGN.md §4's element-wise rule (fp32 1e-6 + 1e-5 |ref|, fp64
//                      1e-12 + 1e-12 |ref|: its exp / log / double sums may differ in the last bit)
//   model_checks       BackendConvClassifier against nn::ConvClassifier from the same weights on
//                      three configurations (GroupNorm + global average on 7 x 5; three blocks
//                      with a time input and no norm; a flatten head on 9 x 9): logits, features,
//                      dx, every parameter gradient (accumulated onto non-zero gradients),
//                      classifier_log_prob_grad's grad, log p and parameter gradients, a forward at
//                      another batch size, and skipping dx leaving the parameter gradients
//                      bit-equal (fp32 NMSE <= 1e-7; fp64 element-wise 1e-12 + 1e-12 |ref| on the
//                      CPU, NMSE <= 1e-24 elsewhere: spatial::tolerance)
//   gradcheck_checks   central differences in double through BackendBatchNorm2d (training and
//                      eval), BackendAvgPool2d and the whole BackendConvClassifier with a time
//                      input (nn::gradcheck: max relative error <= 1e-6)
//   checkpoint_checks  a CPU checkpoint loads strictly into BackendConvClassifier's parameters on B
//                      and comes back bit-equal; a file written from B loads strictly into
//                      nn::ConvClassifier; BatchNorm's running statistics travel with the weights;
//                      init against nn::ConvClassifier::init
//   training_checks    metrics::fit_classifier on BackendConvClassifier<float, B> through
//                      load_or_train_classifier's training hook (fashion_classifier --device
//                      cuda's path) against the CPU's load_or_train_classifier: the hook gets
//                      ConvClassifier::init's weights, the trained parameters, final loss and
//                      test accuracy against the CPU's (run tolerance), the same generator
//                      offset, the cache reused without training
//   error_checks       shapes, labels, non-finite logits, calls out of order and configurations,
//                      by their messages
// Every comparison first requires finite values and a reference that is not all zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/batchnorm.hpp>
#include <flowdiff/nn/layers/cross_entropy.hpp>
#include <flowdiff/nn/layers/pooling.hpp>
#include <flowdiff/nn/layers/spatial_kernels.hpp>
#include <flowdiff/nn/models/classifier.hpp>
#include <flowdiff/nn/models/classifier_backend.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend_spatial_checks.hpp"
#include "files.hpp"

namespace flowdiff::test::classifier {

using backend_common::compare_same;
using backend_common::run_tolerance;
using backend_common::type_name;
using spatial::compare;
using spatial::compare_exact;
using spatial::device_copy;
using spatial::download;
using spatial::expect_gradcheck;
using spatial::expect_throw;
using spatial::guard;
using spatial::host_copy;
using spatial::Log;
using spatial::none;
using spatial::str;
using spatial::Tolerance;
using spatial::upload;

template <class T>
std::vector<T> to_vec(View<const T> v) {
  return std::vector<T>(v.data(), v.data() + v.numel());
}

/// Every tensor of ps ~ N(mean, sd^2), one by one (not the flat buffer: its alignment padding is
/// not part of a checkpoint).
template <class T, Backend B>
void fill_each(nn::Parameters<T, B>& ps, Generator& gen, T mean, T sd) {
  for (index_t id = 0; id < ps.count(); ++id) fill_normal(ps.param(id), gen, mean, sd);
}

// ---------------------------------------------------------------------------------------------
// Layers: BatchNorm2d, AvgPool2d, the cross-entropy.
// ---------------------------------------------------------------------------------------------

template <class T, Backend B>
void batchnorm_checks(Log& log) {
  for (const Shape& xs : {Shape{3, 4, 5, 6}, Shape{2, 3, 1, 1}}) {
    const std::string what = str("BackendBatchNorm2d<", type_name<T>(), ", ", B::name, "> x ", xs);
    guard(log, what, [&] {
      const index_t C = xs[1];
      Generator gen(80 + static_cast<std::uint64_t>(xs[2]));
      nn::Parameters<T> hp;
      nn::BatchNorm2d<T> ref(hp, "enc.bn", C, T(1e-5), T(0.2));
      hp.allocate();
      fill_normal(hp.flat_params(), gen, T(0.5), T(0.4));  // gamma, beta, running stats
      fill_uniform(hp.param(ref.running_var_id()), gen, T(0.5), T(2));
      fill_normal(hp.flat_grads(), gen);
      nn::Parameters<T, B> dp;
      nn::BackendBatchNorm2d<T, B> bn(dp, "enc.bn", C, T(1e-5), T(0.2));
      dp.allocate();
      nn::upload_parameters(dp, hp);  // the layout: names, shapes, buffers, offsets
      upload<T, B>(dp.flat_grads(), hp.flat_grads());
      log.expect(dp.is_buffer(bn.running_mean_id()) && dp.is_buffer(bn.running_var_id()) &&
                     !dp.is_buffer(bn.weight_id()),
                 what + ": running statistics registered as buffers");
      Tensor<T> x = randn<T>(xs, gen), dy = randn<T>(xs, gen);
      fill_uniform(x, gen, T(-2), T(3));  // a non-zero mean per channel
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T> y(xs), dx(xs);
      Tensor<T, B> yd(xs), dxd(xs);
      typename nn::BatchNorm2d<T>::Cache hc;
      typename nn::BackendBatchNorm2d<T, B>::Cache dc;
      // Training: two updating forwards (the running statistics move twice), then backward.
      for (int rep = 0; rep < 2; ++rep) {
        ref.forward(hp, x.view(), y.view(), hc);
        bn.forward(dp, xd.view(), yd.view(), dc);
      }
      compare_same<T, B>(log, what + ": training y", host_copy<T, B>(yd.view()), y.to_vector());
      compare_same<T, B>(log, what + ": running statistics after two updates",
                         host_copy<T, B>(dp.flat_params()), host_copy<T, Cpu>(hp.flat_params()));
      ref.backward(hp, x.view(), dy.view(), dx.view(), hc);
      bn.backward(dp, xd.view(), dyd.view(), dxd.view(), dc);
      compare_same<T, B>(log, what + ": training dx", host_copy<T, B>(dxd.view()), dx.to_vector());
      compare_same<T, B>(log, what + ": training dgamma, dbeta (accumulated)",
                         host_copy<T, B>(dp.flat_grads()), host_copy<T, Cpu>(hp.flat_grads()));
      // The read-only forward normalises with the batch and leaves the running statistics.
      const auto before = host_copy<T, B>(dp.flat_params());
      bn.forward(static_cast<const nn::Parameters<T, B>&>(dp), xd.view(), yd.view(), dc);
      compare_exact(log, what + ": the const forward leaves the running statistics",
                    host_copy<T, B>(dp.flat_params()), before);
      compare_same<T, B>(log, what + ": the const forward's y", host_copy<T, B>(yd.view()),
                         y.to_vector());
      // Eval: the running statistics normalise; dx = gamma rstd dy.
      ref.eval();
      bn.eval();
      ref.forward(hp, x.view(), y.view(), hc);
      bn.forward(dp, xd.view(), yd.view(), dc);
      compare_same<T, B>(log, what + ": eval y", host_copy<T, B>(yd.view()), y.to_vector());
      ref.backward(hp, x.view(), dy.view(), dx.view(), hc);
      bn.backward(dp, xd.view(), dyd.view(), dxd.view(), dc);
      compare_same<T, B>(log, what + ": eval dx", host_copy<T, B>(dxd.view()), dx.to_vector());
      compare_same<T, B>(log, what + ": eval parameter gradients",
                         host_copy<T, B>(dp.flat_grads()), host_copy<T, Cpu>(hp.flat_grads()));
      compare_exact(log, what + ": eval leaves the running statistics",
                    host_copy<T, B>(dp.flat_params()), host_copy<T, Cpu>(hp.flat_params()));
    });
  }
}

template <class T, Backend B>
void pool_checks(Log& log) {
  struct Case {
    index_t k;
    Shape x;
  };
  for (const auto& c : {Case{2, {2, 3, 6, 8}}, Case{2, {2, 3, 7, 5}}, Case{3, {1, 2, 7, 9}}}) {
    const std::string what =
        str("BackendAvgPool2d<", type_name<T>(), ", ", B::name, "> k ", c.k, " x ", c.x);
    guard(log, what, [&] {
      Generator gen(90 + static_cast<std::uint64_t>(c.x[2]));
      nn::AvgPool2d<T> ref(c.k);
      nn::BackendAvgPool2d<T, B> pool(c.k);
      const Shape ys = ref.output_shape(c.x);
      log.expect(pool.output_shape(c.x) == ys, what + ": output shape");
      const Tensor<T> x = randn<T>(c.x, gen), dy = randn<T>(ys, gen);
      Tensor<T> y(ys), dx(c.x);
      const auto xd = device_copy<T, B>(x.view());
      const auto dyd = device_copy<T, B>(dy.view());
      Tensor<T, B> yd(ys), dxd(c.x);
      fill(dxd.view(), T(7));  // backward overwrites every element (the dropped ones with 0)
      ref.forward(x.view(), y.view());
      pool.forward(xd.view(), yd.view());
      ref.backward(x.view(), dy.view(), dx.view());
      pool.backward(xd.view(), dyd.view(), dxd.view());
      compare_same<T, B>(log, what + ": y", host_copy<T, B>(yd.view()), y.to_vector());
      compare_same<T, B>(log, what + ": dx", host_copy<T, B>(dxd.view()), dx.to_vector());
    });
  }
}

template <class T, Backend B>
void cross_entropy_checks(Log& log) {
  const std::string what = str("BackendSoftmaxCrossEntropy<", type_name<T>(), ", ", B::name, ">");
  guard(log, what, [&] {
    Generator gen(95);
    const index_t n = 5, k = 4;
    Tensor<T> z = randn<T>(Shape{n, k}, gen);
    scale(z, T(3));
    z(2, 1) = T(80);  // a row whose exponentials would overflow without the maximum subtracted
    Tensor<label_t> y(Shape{n});
    for (index_t i = 0; i < n; ++i) y[i] = static_cast<label_t>((3 * i + 1) % k);
    const auto zd = device_copy<T, B>(z.view());
    const auto yd = device_copy<label_t, B>(y.view());
    nn::SoftmaxCrossEntropy<T> ref;
    typename nn::SoftmaxCrossEntropy<T>::Cache hc;
    nn::BackendSoftmaxCrossEntropy<T, B> ce;
    typename nn::BackendSoftmaxCrossEntropy<T, B>::Cache dc;
    const double lr = ref.forward(z.view(), y.view(), hc);
    const double ld = ce.forward(zd.view(), yd.view(), dc);
    compare_same<double, B>(log, what + ": mean loss", {ld}, {lr});
    compare_same<T, B>(log, what + ": log_probs", host_copy<T, B>(ce.log_probs(dc)),
                       to_vec<T>(ref.log_probs(hc)));
    Tensor<T> g(Shape{n, k});
    Tensor<T, B> gd(Shape{n, k});
    ref.backward(g.view(), hc, T(0.7));
    ce.backward(gd.view(), dc, T(0.7));
    compare_same<T, B>(log, what + ": dlogits (scale 0.7)", host_copy<T, B>(gd.view()),
                       g.to_vector());
    nn::log_softmax<T>(z.view(), g.view());
    nn::backend_log_softmax<T, B>(zd.view(), gd.view());
    compare_same<T, B>(log, what + ": backend_log_softmax", host_copy<T, B>(gd.view()),
                       g.to_vector());
    nn::log_prob_seed<T>(z.view(), y.view(), g.view());
    nn::backend_log_prob_seed<T, B>(zd.view(), yd.view(), gd.view());
    compare_same<T, B>(log, what + ": backend_log_prob_seed", host_copy<T, B>(gd.view()),
                       g.to_vector());
  });
}

template <class T, Backend B>
void layer_checks(Log& log) {
  batchnorm_checks<T, B>(log);
  pool_checks<T, B>(log);
  cross_entropy_checks<T, B>(log);
}

// ---------------------------------------------------------------------------------------------
// The classifier.
// ---------------------------------------------------------------------------------------------

inline nn::ConvClassifierConfig config(index_t in_channels, std::vector<index_t> channels,
                                       index_t feature_dim, index_t num_classes, index_t groups,
                                       index_t time_dim, index_t image_size = 0) {
  nn::ConvClassifierConfig c;
  c.in_channels = in_channels;
  c.channels = std::move(channels);
  c.feature_dim = feature_dim;
  c.num_classes = num_classes;
  c.groups = groups;
  c.time_dim = time_dim;
  c.image_size = image_size;
  return c;
}

struct ClassifierCase {
  std::string name;
  nn::ConvClassifierConfig cfg;
  Shape x;
  std::uint64_t seed = 1;
};

/// The configurations of tests/test_classifier.cpp's gradient checks (time_dim 5: an odd width,
/// whose last feature is the zero column).
inline std::vector<ClassifierCase> classifier_cases() {
  std::vector<ClassifierCase> v(3);
  v[0].name = "GroupNorm(2), global average, 7x5";
  v[0].cfg = config(1, {4, 4}, 5, 3, 2, 0);
  v[0].x = Shape{3, 1, 7, 5};
  v[0].seed = 61;
  v[1].name = "3 blocks, time input (dim 5), no norm, 8x8";
  v[1].cfg = config(2, {2, 4, 4}, 3, 4, 0, 5);
  v[1].x = Shape{2, 2, 8, 8};
  v[1].seed = 62;
  v[2].name = "GroupNorm(1) + time (dim 4), flatten head on 9x9";
  v[2].cfg = config(1, {2, 4}, 3, 3, 1, 4, 9);
  v[2].x = Shape{2, 1, 9, 9};
  v[2].seed = 63;
  return v;
}

/// A case's inputs on the host: nn::ConvClassifier's init with the norms' affine parameters off
/// (1, 0), gradients holding N(0, 1) values (backward must accumulate onto them), x ~ N(0, 1),
/// t in (0, 1), labels, the upstream gradient dlogits.
template <class T>
struct ClassifierInputs {
  nn::Parameters<T> ps;
  nn::ConvClassifier<T> net;
  Tensor<T> x, t, dlogits, x2, t2;
  Tensor<label_t> y;
  explicit ClassifierInputs(const ClassifierCase& c) : net(ps, c.cfg) {
    Generator gen(c.seed);
    ps.allocate();
    net.init(ps, gen);
    for (index_t id = 0; id < ps.count(); ++id)
      if (ps.info(id).name.find(".norm.") != std::string::npos)
        fill_uniform(ps.param(id), gen, T(0.5), T(1.5));
    fill_normal(ps.flat_grads(), gen);
    const index_t n = c.x[0], K = c.cfg.num_classes;
    x = randn<T>(c.x, gen);
    dlogits = randn<T>(Shape{n, K}, gen);
    y = Tensor<label_t>(Shape{n});
    for (index_t i = 0; i < n; ++i) y[i] = static_cast<label_t>((i + 1) % K);
    Shape s2 = c.x;
    s2[0] = n + 2;
    x2 = randn<T>(s2, gen);
    if (c.cfg.time_dim > 0) {
      t = Tensor<T>(Shape{n});
      fill_uniform(t, gen, T(0.05), T(0.95));
      t2 = Tensor<T>(Shape{n + 2});
      fill_uniform(t2, gen, T(0.05), T(0.95));
    }
  }
};

template <class T>
struct ClassifierResult {
  std::vector<T> logits, features, dx, grads, lp_grad, log_prob, lp_param_grads, logits2;
};

template <class T>
ClassifierResult<T> classifier_reference(const ClassifierCase& c) {
  ClassifierInputs<T> in(c);
  const index_t n = c.x[0];
  typename nn::ConvClassifier<T>::Cache cache;
  Tensor<T> logits(Shape{n, c.cfg.num_classes}), dx(c.x), grad(c.x), lp(Shape{n});
  ClassifierResult<T> r;
  in.net.forward(in.ps, in.x.view(), in.t.view(), logits.view(), cache);
  r.logits = logits.to_vector();
  r.features = to_vec<T>(in.net.features(cache));
  in.net.backward(in.ps, in.dlogits.view(), dx.view(), cache);
  r.dx = dx.to_vector();
  r.grads = host_copy<T, Cpu>(in.ps.flat_grads());
  in.ps.zero_grad();
  Tensor<T> s1, s2;
  nn::classifier_log_prob_grad(in.net, in.ps, in.x.view(), in.t.view(), in.y.view(), grad.view(),
                               lp.view(), cache, s1, s2);
  r.lp_grad = grad.to_vector();
  r.log_prob = lp.to_vector();
  r.lp_param_grads = host_copy<T, Cpu>(in.ps.flat_grads());
  Tensor<T> l2(Shape{n + 2, c.cfg.num_classes});
  in.net.forward(in.ps, in.x2.view(), in.t2.view(), l2.view(), cache);
  r.logits2 = l2.to_vector();
  return r;
}

template <class T, Backend B>
ClassifierResult<T> classifier_on_backend(Log& log, const std::string& what,
                                          const ClassifierCase& c) {
  ClassifierInputs<T> in(c);
  const index_t n = c.x[0];
  nn::Parameters<T, B> ps;
  const nn::BackendConvClassifier<T, B> net(ps, c.cfg);
  ps.allocate();
  nn::upload_parameters(ps, in.ps);  // checks the layout: names, shapes, offsets
  upload<T, B>(ps.flat_grads(), in.ps.flat_grads());
  const auto x = device_copy<T, B>(in.x.view());
  const auto t = device_copy<T, B>(in.t.view());
  const auto y = device_copy<label_t, B>(in.y.view());
  const auto dl = device_copy<T, B>(in.dlogits.view());
  typename nn::BackendConvClassifier<T, B>::Cache cache;
  Tensor<T, B> logits(Shape{n, c.cfg.num_classes}), dx(c.x), grad(c.x), lp(Shape{n});
  ClassifierResult<T> r;
  net.forward(ps, x.view(), t.view(), logits.view(), cache);
  r.logits = host_copy<T, B>(logits.view());
  r.features = host_copy<T, B>(net.features(cache));
  net.backward(ps, dl.view(), dx.view(), cache);
  r.dx = host_copy<T, B>(dx.view());
  r.grads = host_copy<T, B>(ps.flat_grads());
  // Skipping dx leaves the parameter gradients bit-equal.
  ps.zero_grad();
  net.backward(ps, dl.view(), none<T, B>(), cache);
  const auto without = host_copy<T, B>(ps.flat_grads());
  ps.zero_grad();
  net.backward(ps, dl.view(), dx.view(), cache);
  compare_exact(log, what + ": parameter gradients without dx", without,
                host_copy<T, B>(ps.flat_grads()));
  ps.zero_grad();
  Tensor<T, B> s1, s2;
  nn::classifier_log_prob_grad(net, ps, x.view(), t.view(), y.view(), grad.view(), lp.view(),
                               cache, s1, s2);
  r.lp_grad = host_copy<T, B>(grad.view());
  r.log_prob = host_copy<T, B>(lp.view());
  r.lp_param_grads = host_copy<T, B>(ps.flat_grads());
  const auto x2 = device_copy<T, B>(in.x2.view());
  const auto t2 = device_copy<T, B>(in.t2.view());
  Tensor<T, B> l2(Shape{n + 2, c.cfg.num_classes});
  net.forward(ps, x2.view(), t2.view(), l2.view(), cache);
  r.logits2 = host_copy<T, B>(l2.view());
  return r;
}

template <class T, Backend B>
void model_checks(Log& log) {
  const Tolerance tol = spatial::tolerance<T, B>();
  for (const auto& c : classifier_cases()) {
    const std::string what =
        str("BackendConvClassifier<", type_name<T>(), ", ", B::name, "> ", c.name);
    guard(log, what, [&] {
      const auto ref = classifier_reference<T>(c);
      const auto got = classifier_on_backend<T, B>(log, what, c);
      compare(log, what + ": logits", got.logits, ref.logits, tol);
      compare(log, what + ": features", got.features, ref.features, tol);
      compare(log, what + ": dx", got.dx, ref.dx, tol);
      compare(log, what + ": parameter gradients (accumulated)", got.grads, ref.grads, tol);
      compare(log, what + ": classifier_log_prob_grad's grad", got.lp_grad, ref.lp_grad, tol);
      compare(log, what + ": classifier_log_prob_grad's log p", got.log_prob, ref.log_prob, tol);
      compare(log, what + ": classifier_log_prob_grad's parameter gradients", got.lp_param_grads,
              ref.lp_param_grads, tol);
      compare(log, what + ": logits at batch N + 2", got.logits2, ref.logits2, tol);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Central differences in double through the backend layers (the pattern of
// backend_spatial_checks.hpp: host copies perturbed, uploaded for forward, gradients downloaded).
// ---------------------------------------------------------------------------------------------

template <Backend B>
void gradcheck_checks(Log& log) {
  for (const bool training : {true, false}) {
    const std::string what =
        str("gradcheck BackendBatchNorm2d<double, ", B::name, "> ", training ? "training" : "eval");
    guard(log, what, [&] {
      Generator gen(training ? 71 : 72);
      const Shape xs{3, 2, 3, 2};
      nn::Parameters<double> hp;
      nn::BatchNorm2d<double> mirror(hp, "bn", 2);
      hp.allocate();
      fill_normal(hp.flat_params(), gen, 0.5, 0.5);
      fill_uniform(hp.param(mirror.running_var_id()), gen, 0.5, 2.0);
      nn::Parameters<double, B> dp;
      nn::BackendBatchNorm2d<double, B> bn(dp, "bn", 2);
      dp.allocate();
      bn.train(training);
      auto x = randn<double>(xs, gen);
      Tensor<double> y(xs), dx(xs);
      Tensor<double, B> xd(xs), yd(xs), dyd(xs), dxd(xs);
      typename nn::BackendBatchNorm2d<double, B>::Cache cache;
      // gamma and beta are checked as inputs (the running statistics are buffers without a
      // gradient, which the parameter check would perturb too), so backward overwrites them.
      const index_t w = mirror.weight_id(), b = mirror.bias_id();
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()},
                            {"weight", hp.param(w), hp.grad(w)},
                            {"bias", hp.param(b), hp.grad(b)}},
                           nullptr, {y.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<double, B>(xd.view(), x.view());
                             bn.forward(dp, xd.view(), yd.view(), cache);
                             download<double, B>(y.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<double, B>(dyd.view(), dy[0]);
                             dp.zero_grad();
                             bn.backward(dp, xd.view(), dyd.view(), dxd.view(), cache);
                             download<double, B>(hp.flat_grads(), dp.flat_grads());
                             download<double, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
  {
    const std::string what = str("gradcheck BackendAvgPool2d<double, ", B::name, "> 2x2 on 5x6");
    guard(log, what, [&] {
      Generator gen(73);
      const Shape xs{2, 2, 5, 6}, ys{2, 2, 2, 3};
      nn::BackendAvgPool2d<double, B> pool(2);
      auto x = randn<double>(xs, gen);
      Tensor<double> y(ys), dx(xs);
      Tensor<double, B> xd(xs), yd(ys), dyd(ys), dxd(xs);
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, nullptr, {y.view()},
                           [&] {
                             upload<double, B>(xd.view(), x.view());
                             pool.forward(xd.view(), yd.view());
                             download<double, B>(y.view(), yd.view());
                           },
                           [&](const auto& dy) {
                             upload<double, B>(dyd.view(), dy[0]);
                             pool.backward(xd.view(), dyd.view(), dxd.view());
                             download<double, B>(dx.view(), dxd.view());
                           },
                           gen));
    });
  }
  {
    const std::string what =
        str("gradcheck BackendConvClassifier<double, ", B::name, "> GroupNorm + time, 6x5");
    guard(log, what, [&] {
      Generator gen(74);
      const auto cfg = config(2, {2, 4}, 3, 3, 1, 4);
      const Shape xs{2, 2, 6, 5};
      nn::Parameters<double> hp;
      const nn::ConvClassifier<double> mirror(hp, cfg);
      hp.allocate();
      mirror.init(hp, gen);
      for (index_t id = 0; id < hp.count(); ++id)
        if (hp.info(id).name.find(".norm.") != std::string::npos)
          fill_uniform(hp.param(id), gen, 0.5, 1.5);
      nn::Parameters<double, B> dp;
      const nn::BackendConvClassifier<double, B> net(dp, cfg);
      dp.allocate();
      auto x = randn<double>(xs, gen);
      Tensor<double> t(Shape{2}), logits(Shape{2, 3}), dx(xs);
      t[0] = 0.3;
      t[1] = 0.8;
      const auto td = device_copy<double, B>(t.view());
      Tensor<double, B> xd(xs), ld(Shape{2, 3}), dld(Shape{2, 3}), dxd(xs);
      typename nn::BackendConvClassifier<double, B>::Cache cache;
      expect_gradcheck(log, what,
                       nn::gradcheck(
                           {{"x", x.view(), dx.view()}}, &hp, {logits.view()},
                           [&] {
                             nn::upload_parameters(dp, hp);
                             upload<double, B>(xd.view(), x.view());
                             net.forward(dp, xd.view(), td.view(), ld.view(), cache);
                             download<double, B>(logits.view(), ld.view());
                           },
                           [&](const auto& dy) {
                             upload<double, B>(dld.view(), dy[0]);
                             upload<double, B>(dp.flat_grads(), hp.flat_grads());
                             net.backward(dp, dld.view(), dxd.view(), cache);
                             download<double, B>(hp.flat_grads(), dp.flat_grads());
                             download<double, B>(dx.view(), dxd.view());
                           },
                           gen, {.h = 1e-5}));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and initialisation.
// ---------------------------------------------------------------------------------------------

template <Backend B>
void checkpoint_checks(Log& log) {
  using T = float;
  const std::string what = str("BackendConvClassifier<float, ", B::name, "> checkpoints");
  guard(log, what, [&] {
    TempDir dir(std::string("backend_classifier_ckpt_") + B::name);
    const auto cfg = config(1, {4, 8}, 6, 3, 2, 4, 8);
    Generator g1(81), g2(81);
    nn::Parameters<T> host;
    const nn::ConvClassifier<T> ref(host, cfg);
    host.allocate();
    ref.init(host, g1);
    nn::Parameters<T, B> ps;
    const nn::BackendConvClassifier<T, B> net(ps, cfg);
    ps.allocate();
    net.init(ps, g2);
    // BackendConvClassifier::init draws what nn::ConvClassifier::init draws (uniforms on [lo, hi):
    // the last bit may differ on a device, as fill_uniform's).
    compare_same<T, B>(log, what + ": init vs nn::ConvClassifier::init",
                       host_copy<T, B>(ps.flat_params()), host_copy<T, Cpu>(host.flat_params()));
    log.expect(g1.offset() == g2.offset(),
               str(what, ": init's generator offset ", g2.offset(), " == ", g1.offset()));
    // CPU -> file -> B -> host, bit-equal.
    fill_each(host, g1, T(0), T(1));
    nn::save_parameters(host, dir / "cpu.safetensors");
    nn::load_parameters(ps, dir / "cpu.safetensors", {.strict = true});
    nn::Parameters<T> back;
    const nn::ConvClassifier<T> ref2(back, cfg);
    back.allocate();
    nn::download_parameters(back, ps);
    compare_exact(log, what + ": CPU file -> B -> host", host_copy<T, Cpu>(back.flat_params()),
                  host_copy<T, Cpu>(host.flat_params()));
    // B -> file -> nn::ConvClassifier (strict), and the same logits.
    fill_each(ps, g2, T(0), T(0.3));
    nn::save_parameters(ps, dir / "backend.safetensors");
    nn::Parameters<T> loaded;
    const nn::ConvClassifier<T> cpu(loaded, cfg);
    loaded.allocate();
    nn::load_parameters(loaded, dir / "backend.safetensors", {.strict = true});
    compare_exact(log, what + ": B file -> nn::ConvClassifier",
                  host_copy<T, Cpu>(loaded.flat_params()), host_copy<T, B>(ps.flat_params()));
    Generator gx(82);
    const Tensor<T> x = randn<T>(Shape{2, 1, 8, 8}, gx);
    Tensor<T> t(Shape{2}), l(Shape{2, 3});
    t[0] = T(0.2);
    t[1] = T(0.6);
    typename nn::ConvClassifier<T>::Cache hc;
    cpu.forward(loaded, x.view(), t.view(), l.view(), hc);
    const auto xd = device_copy<T, B>(x.view());
    const auto tdev = device_copy<T, B>(t.view());
    Tensor<T, B> ld(Shape{2, 3});
    typename nn::BackendConvClassifier<T, B>::Cache dc;
    net.forward(ps, xd.view(), tdev.view(), ld.view(), dc);
    compare(log, what + ": logits of the loaded file", host_copy<T, B>(ld.view()), l.to_vector(),
            spatial::tolerance<T, B>());
    // BatchNorm's running statistics are buffers that travel with the weights.
    nn::Parameters<T> hb;
    nn::BatchNorm2d<T> hbn(hb, "bn", 3);
    hb.allocate();
    fill_each(hb, g1, T(0), T(1));
    nn::save_parameters(hb, dir / "bn.safetensors");
    nn::Parameters<T, B> db;
    const nn::BackendBatchNorm2d<T, B> dbn(db, "bn", 3);
    db.allocate();
    nn::load_parameters(db, dir / "bn.safetensors", {.strict = true});
    compare_exact(log, what + ": BatchNorm2d file (weights and running statistics) -> B",
                  host_copy<T, B>(db.flat_params()), host_copy<T, Cpu>(hb.flat_params()));
  });
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Training on B: fit_classifier through load_or_train_classifier's hook.
// ---------------------------------------------------------------------------------------------

/// Two classes a small classifier learns in a few steps: horizontal stripes (class 0) or vertical
/// ones (class 1) of +-1 on 8 x 8 images, plus N(0, 0.3^2) noise.
inline void stripe_images(index_t n, std::uint64_t seed, Tensor<float>& x, Tensor<label_t>& y) {
  Generator gen(seed);
  x = randn<float>({n, 1, 8, 8}, gen);
  y = Tensor<label_t>(Shape{n});
  float* p = x.data();
  for (index_t i = 0; i < n; ++i) {
    const index_t c = i % 2;
    for (index_t r = 0; r < 8; ++r)
      for (index_t q = 0; q < 8; ++q)
        p[(i * 8 + r) * 8 + q] =
            0.3f * p[(i * 8 + r) * 8 + q] + (((c == 0 ? r : q) % 2 == 0) ? 1.0f : -1.0f);
    y[i] = static_cast<label_t>(c);
  }
}

template <Backend B>
void training_checks(Log& log) {
  using T = float;
  const std::string what =
      str("load_or_train_classifier training BackendConvClassifier<float, ", B::name, ">");
  guard(log, what, [&] {
    TempDir dir(std::string("backend_classifier_train_") + B::name);
    Tensor<T> xtr, xte;
    Tensor<label_t> ytr, yte;
    stripe_images(64, 5, xtr, ytr);
    stripe_images(40, 6, xte, yte);
    nn::ConvClassifierConfig cfg;  // GroupNorm blocks and a time input (trained at t = 1)
    cfg.channels = {4, 8};
    cfg.feature_dim = 8;
    cfg.num_classes = 2;
    cfg.groups = 2;
    cfg.time_dim = 4;
    metrics::ClassifierTrainOptions o;
    o.epochs = 2;
    o.batch = 16;
    o.lr = 1e-2;
    o.warmup_steps = 2;
    o.eval_batch = 20;
    o.log = nullptr;

    // The reference: the CPU's load_or_train_classifier (fit_classifier on nn::ConvClassifier).
    nn::Parameters<T> ref_ps;
    const nn::ConvClassifier<T> ref_net(ref_ps, cfg);
    ref_ps.allocate();
    Generator ref_gen(61);
    const auto ref = metrics::load_or_train_classifier<T>(dir.path / "cpu.safetensors", ref_net,
                                                          ref_ps, xtr, ytr, xte, yte, o, ref_gen);

    nn::Parameters<T> ps;
    const nn::ConvClassifier<T> net(ps, cfg);
    ps.allocate();
    int calls = 0;
    std::vector<T> initial, trained;
    const auto on_backend = [&](const nn::ConvClassifier<T>& n, nn::Parameters<T>& p,
                                View<const T> x, View<const label_t> y,
                                const metrics::ClassifierTrainOptions& opt, Generator& g) {
      ++calls;
      initial = host_copy<T, Cpu>(p.flat_params());
      nn::Parameters<T, B> dps;
      const nn::BackendConvClassifier<T, B> dnet(dps, n.config());
      dps.allocate();
      nn::upload_parameters(dps, p);
      const auto rep = metrics::fit_classifier(dnet, dps, x, y, opt, g);
      nn::download_parameters(p, dps);
      trained = host_copy<T, Cpu>(p.flat_params());
      return rep;
    };
    Generator gen(61);
    const auto file = dir.path / "backend.safetensors";
    const auto got = metrics::load_or_train_classifier<T>(file, net, ps, xtr, ytr, xte, yte, o,
                                                          gen, on_backend);
    log.expect(calls == 1 && !got.loaded && got.steps == 8 && ref.steps == 8,
               str(what, ": trained through the hook once (calls ", calls, ", steps ", got.steps,
                   ", the CPU's ", ref.steps, ")"));
    nn::Parameters<T> init_ps;
    const nn::ConvClassifier<T> init_net(init_ps, cfg);
    init_ps.allocate();
    Generator init_gen(61);
    init_net.init(init_ps, init_gen);
    compare_exact(log, what + ": the hook received nn::ConvClassifier::init's weights", initial,
                  host_copy<T, Cpu>(init_ps.flat_params()));
    compare_exact(log, what + ": the parameters are the hook's",
                  host_copy<T, Cpu>(ps.flat_params()), trained);
    const Tolerance tol = run_tolerance<T>();
    compare(log, what + ": parameters vs the CPU's", trained,
            host_copy<T, Cpu>(ref_ps.flat_params()), tol);
    compare(log, what + ": final loss and test accuracy vs the CPU's",
            std::vector<double>{got.final_loss, got.test_accuracy},
            std::vector<double>{ref.final_loss, ref.test_accuracy}, {true, 0, tol.rtol, 0});
    log.expect(got.test_accuracy >= 0.9 && std::filesystem::exists(file),
               str(what, ": test accuracy ", got.test_accuracy, " >= 0.9, cached"));
    log.expect(gen.offset() == ref_gen.offset(),
               str(what, ": generator offset ", gen.offset(), " == the CPU's ", ref_gen.offset()));

    // The cache holds the hook's parameters, and a second call loads it without training.
    nn::Parameters<T> again;
    const nn::ConvClassifier<T> again_net(again, cfg);
    again.allocate();
    Generator gen2(99);
    const auto rep2 = metrics::load_or_train_classifier<T>(file, again_net, again, xtr, ytr, xte,
                                                           yte, o, gen2, on_backend);
    log.expect(calls == 1 && rep2.loaded && rep2.test_accuracy == got.test_accuracy,
               str(what, ": the second call loaded the cache (calls ", calls, ", accuracy ",
                   rep2.test_accuracy, " == ", got.test_accuracy, ")"));
    compare_exact(log, what + ": the cached parameters", host_copy<T, Cpu>(again.flat_params()),
                  trained);
  });
}

template <Backend B>
void error_checks(Log& log) {
  using T = float;
  using TB = Tensor<T, B>;
  const std::string pre = str("errors<", B::name, ">: ");
  nn::Parameters<T, B> ps;
  const nn::BackendConvClassifier<T, B> net(ps, config(1, {4, 4}, 5, 3, 2, 0), "clf.");
  const nn::BackendConvClassifier<T, B> timed(ps, config(1, {4}, 5, 3, 0, 4, 8), "tc.");
  nn::BackendBatchNorm2d<T, B> bn(ps, "enc.bn", 3);
  ps.allocate();
  Generator gen(99);
  fill_normal(ps.flat_params(), gen, T(0), T(0.3));
  fill(ps.param(bn.running_var_id()), T(1));
  typename nn::BackendConvClassifier<T, B>::Cache c, ct;
  TB x(Shape{2, 1, 4, 4}), logits(Shape{2, 3}), dx(Shape{2, 1, 4, 4});
  fill(x.view(), T(0.5));

  expect_throw<shape_error>(
      log, pre + "x channels",
      "clf. (BackendConvClassifier): x: expected shape [N, 1, H, W] with N >= 1 and H, W >= 2, got "
      "[2, 2, 4, 4]",
      [&] {
        TB xb(Shape{2, 2, 4, 4});
        net.forward(ps, xb.view(), {}, logits.view(), c);
      });
  expect_throw<shape_error>(log, pre + "x too small", "H, W >= 2, got [2, 1, 1, 4]", [&] {
    TB xb(Shape{2, 1, 1, 4});
    net.forward(ps, xb.view(), {}, logits.view(), c);
  });
  expect_throw<shape_error>(
      log, pre + "x not image_size",
      "tc. (BackendConvClassifier): x: expected shape [N, 1, 8, 8] with N >= 1 (image_size = 8), "
      "got [2, 1, 4, 4]",
      [&] {
        TB t(Shape{2});
        timed.forward(ps, x.view(), t.view(), logits.view(), ct);
      });
  expect_throw<config_error>(
      log, pre + "t without a time input",
      "clf. (BackendConvClassifier): times t were given (shape [2]) but the model has no time "
      "input (time_dim = 0)",
      [&] {
        TB t(Shape{2});
        net.forward(ps, x.view(), t.view(), logits.view(), c);
      });
  expect_throw<shape_error>(log, pre + "t missing",
                            "tc. (BackendConvClassifier): t: expected shape [2], got [0]", [&] {
                              TB xb(Shape{2, 1, 8, 8});
                              timed.forward(ps, xb.view(), {}, logits.view(), ct);
                            });
  expect_throw<shape_error>(
      log, pre + "logits", "clf. (BackendConvClassifier): logits: expected shape [2, 3], got [2, 4]",
      [&] {
        TB lb(Shape{2, 4});
        net.forward(ps, x.view(), {}, lb.view(), c);
      });
  expect_throw<config_error>(
      log, pre + "backward before forward",
      "clf. (BackendConvClassifier): backward() needs the cache of a forward() call first", [&] {
        typename nn::BackendConvClassifier<T, B>::Cache fresh;
        net.backward(ps, logits.view(), dx.view(), fresh);
      });
  expect_throw<config_error>(
      log, pre + "features before forward",
      "clf. (BackendConvClassifier): features() needs the cache of a forward() call first", [&] {
        typename nn::BackendConvClassifier<T, B>::Cache fresh;
        (void)net.features(fresh);
      });
  net.forward(ps, x.view(), {}, logits.view(), c);
  expect_throw<shape_error>(
      log, pre + "dlogits",
      "clf. (BackendConvClassifier): dlogits: expected shape [2, 3], got [3, 3]", [&] {
        TB d(Shape{3, 3});
        net.backward(ps, d.view(), dx.view(), c);
      });
  expect_throw<shape_error>(
      log, pre + "dx", "clf. (BackendConvClassifier): dx: expected shape [2, 1, 4, 4], got [2, 1, 4, 5]",
      [&] {
        TB d(Shape{2, 1, 4, 5});
        net.backward(ps, logits.view(), d.view(), c);
      });
  expect_throw<config_error>(log, pre + "backward with another model's cache",
                             "tc. (BackendConvClassifier): backward() needs the cache", [&] {
                               timed.backward(ps, logits.view(), dx.view(), c);
                             });
  expect_throw<config_error>(
      log, pre + "channels not a multiple of groups",
      "BackendConvClassifier: channel count 3 must be >= 1 and a multiple of groups = 2", [&] {
        nn::Parameters<T, B> p2;
        const nn::BackendConvClassifier<T, B> bad(p2, config(1, {4, 3}, 5, 3, 2, 0));
      });
  expect_throw<config_error>(log, pre + "one class", "num_classes >= 2", [&] {
    nn::Parameters<T, B> p2;
    const nn::BackendConvClassifier<T, B> bad(p2, config(1, {4}, 5, 1, 0, 0));
  });

  // Labels and logits.
  Tensor<label_t> yh(Shape{2});
  yh[0] = 3;
  yh[1] = -1;
  const auto ybad = device_copy<label_t, B>(yh.view());
  yh[0] = 0;
  yh[1] = 2;
  const auto ygood = device_copy<label_t, B>(yh.view());
  TB s1, s2, grad(Shape{2, 1, 4, 4}), lp(Shape{2});
  expect_throw<config_error>(
      log, pre + "classifier_log_prob_grad labels",
      "classifier_log_prob_grad: 2 of the 2 labels y lie outside [0, 3) (K = 3 classes)", [&] {
        nn::classifier_log_prob_grad(net, ps, x.view(), {}, ybad.view(), grad.view(), lp.view(), c,
                                     s1, s2);
      });
  expect_throw<shape_error>(log, pre + "classifier_log_prob_grad label shape",
                            "classifier_log_prob_grad: y: expected shape [2], got [1]", [&] {
                              Tensor<label_t, B> y1(Shape{1});
                              fill(y1.view(), label_t{0});
                              nn::classifier_log_prob_grad(net, ps, x.view(), {}, y1.view(),
                                                           grad.view(), lp.view(), c, s1, s2);
                            });
  expect_throw<shape_error>(log, pre + "classifier_log_prob_grad log_prob",
                            "classifier_log_prob_grad: log_prob: expected shape [2], got [3]",
                            [&] {
                              TB l3(Shape{3});
                              nn::classifier_log_prob_grad(net, ps, x.view(), {}, ygood.view(),
                                                           grad.view(), l3.view(), c, s1, s2);
                            });
  nn::BackendSoftmaxCrossEntropy<T, B> ce;
  typename nn::BackendSoftmaxCrossEntropy<T, B>::Cache cc;
  Tensor<T> zh(Shape{2, 3});
  fill(zh, T(0.5));
  zh(1, 2) = std::numeric_limits<T>::infinity();
  const auto zinf = device_copy<T, B>(zh.view());
  expect_throw<numeric_error>(
      log, pre + "non-finite logit",
      "BackendSoftmaxCrossEntropy: logits[1, 2] is not finite (inf)",
      [&] { ce.forward(zinf.view(), ygood.view(), cc); });
  expect_throw<config_error>(
      log, pre + "cross-entropy labels",
      "BackendSoftmaxCrossEntropy: 2 of the 2 labels y lie outside [0, 3) (K = 3 classes)",
      [&] { ce.forward(logits.view(), ybad.view(), cc); });
  expect_throw<shape_error>(log, pre + "cross-entropy logits rank",
                            "BackendSoftmaxCrossEntropy: logits: expected shape [N, K] with N, K "
                            ">= 1, got [6]",
                            [&] {
                              TB z1(Shape{6});
                              ce.forward(z1.view(), ygood.view(), cc);
                            });
  expect_throw<config_error>(
      log, pre + "cross-entropy backward before forward",
      "BackendSoftmaxCrossEntropy: backward() needs the cache of a forward() call",
      [&] { ce.backward(logits.view(), cc); });
  expect_throw<numeric_error>(log, pre + "log_prob_seed non-finite logit",
                              "backend_log_prob_seed: logits[1, 2] is not finite (inf)", [&] {
                                TB d(Shape{2, 3});
                                nn::backend_log_prob_seed<T, B>(zinf.view(), ygood.view(),
                                                                d.view());
                              });
  expect_throw<shape_error>(
      log, pre + "log_softmax out shape",
      "backend_log_softmax: logits and out must have the same shape, got [2, 3] and [3, 2]", [&] {
        TB o(Shape{3, 2});
        nn::backend_log_softmax<T, B>(logits.view(), o.view());
      });

  // BatchNorm2d and AvgPool2d.
  typename nn::BackendBatchNorm2d<T, B>::Cache bc;
  expect_throw<shape_error>(
      log, pre + "batch norm x",
      "enc.bn (BackendBatchNorm2d): x: expected shape [N, 3, H, W], got [2, 4, 3, 3]", [&] {
        TB xb(Shape{2, 4, 3, 3});
        bn.forward(ps, xb.view(), xb.view(), bc);
      });
  expect_throw<shape_error>(
      log, pre + "batch norm y",
      "enc.bn (BackendBatchNorm2d): y: expected shape [2, 3, 3, 3], got [2, 3, 3, 2]", [&] {
        TB xb(Shape{2, 3, 3, 3}), yb(Shape{2, 3, 3, 2});
        bn.forward(ps, xb.view(), yb.view(), bc);
      });
  expect_throw<config_error>(
      log, pre + "batch norm training on one value per channel",
      "enc.bn (BackendBatchNorm2d): training needs more than one value per channel, got input "
      "shape [1, 3, 1, 1]",
      [&] {
        TB xb(Shape{1, 3, 1, 1});
        bn.forward(ps, xb.view(), xb.view(), bc);
      });
  expect_throw<config_error>(log, pre + "batch norm backward before forward",
                             "enc.bn (BackendBatchNorm2d): backward needs the cache of a forward "
                             "call",
                             [&] {
                               TB xb(Shape{2, 3, 3, 3});
                               bn.backward(ps, xb.view(), xb.view(), xb.view(), bc);
                             });
  expect_throw<config_error>(log, pre + "batch norm momentum",
                             "bn2 (BackendBatchNorm2d): momentum must lie in [0, 1], got 1.5", [&] {
                               nn::Parameters<T, B> p2;
                               nn::BackendBatchNorm2d<T, B> b2(p2, "bn2", 3, T(1e-5), T(1.5));
                             });
  nn::BackendAvgPool2d<T, B> pool(2, "clf.pool");
  expect_throw<shape_error>(
      log, pre + "pool x too small",
      "clf.pool (BackendAvgPool2d): x: expected shape [N, C, H, W] with H, W >= 2, got [1, 2, 1, 4]",
      [&] {
        TB xb(Shape{1, 2, 1, 4}), yb(Shape{1, 2, 0, 2});
        pool.forward(xb.view(), yb.view());
      });
  expect_throw<shape_error>(
      log, pre + "pool dy",
      "clf.pool (BackendAvgPool2d): dy: expected shape [1, 2, 2, 2], got [1, 2, 2, 3]", [&] {
        TB xb(Shape{1, 2, 5, 4}), g(Shape{1, 2, 2, 3}), d(Shape{1, 2, 5, 4});
        pool.backward(xb.view(), g.view(), d.view());
      });
}

}  // namespace flowdiff::test::classifier
