// flowdiff/nn/gradcheck.hpp — a finite-difference gradient checker for any forward/backward pair.
// It draws a random upstream gradient dy ~ N(0, 1) for every output and checks the analytic
// gradients of the scalar loss  L = sum_k <dy_k, y_k>  against central differences
//   dL/dv ~ (L(v + h) - L(v - h)) / (2 h)
// for every element v of every registered input and of every parameter in a Parameters store.
// The comparison rule (per element a = analytic, b = numeric, within tensor g):
//   |a - b| <= tol * max(|a|, |b|, s_g),   s_g = ||analytic gradient of g||_2 / sqrt(numel(g))
// i.e. a relative error, except that elements much smaller than the tensor's RMS gradient are
// measured relative to that RMS (their central differences carry rounding of order eps |L| / h,
// which no small-gradient element can beat). The reported error of an element is
// |a - b| / max(|a|, |b|, s_g); the check passes when the maximum over all elements is <= tol.
// Before differencing, outputs and analytic gradients must be finite and each must have a
// nonzero element (a layer that returns zeros would otherwise "pass"). The checker also checks the
// backward convention of the layers: a second backward call must leave input gradients unchanged
// (overwritten) and double the parameter gradients (accumulated).
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// An input the checker perturbs: `value` is read by forward(); backward() writes dL/d(value)
/// into `grad` (same shape).
struct GradcheckInput {
  std::string name;
  View<double> value;
  View<const double> grad;
};

struct GradcheckOptions {
  double h = 1e-6;    ///< central-difference step
  double tol = 1e-6;  ///< bound on the error rule above (DESIGN.md §4)
  /// Check that a repeated backward overwrites input gradients and accumulates parameter ones.
  bool check_accumulation = true;
};

/// Per-tensor outcome: the worst element and its error.
struct GradcheckTensorReport {
  std::string name;
  index_t numel = 0;
  double max_error = 0;              ///< max |a-b| / max(|a|, |b|, scale)
  double scale = 0;                  ///< s_g: RMS of the analytic gradient
  index_t worst = -1;                ///< flat index of the worst element
  double analytic = 0, numeric = 0;  ///< the two values at the worst element
};

struct GradcheckReport {
  std::vector<GradcheckTensorReport> tensors;
  double max_error = 0;
  double tol = 0;

  bool ok() const { return max_error <= tol; }
  /// One line per tensor, for test logs.
  std::string summary() const {
    std::ostringstream os;
    os.precision(3);
    os << "gradcheck: max error " << max_error << " (tol " << tol << ")";
    for (const auto& t : tensors)
      os << "\n  " << t.name << " [" << t.numel << "]: " << t.max_error << " at " << t.worst
         << " (analytic " << t.analytic << ", numeric " << t.numeric << ", scale " << t.scale
         << ")";
    return os.str();
  }
};

/// Runs the check. `forward()` must recompute every view in `outputs` from the current inputs and
/// parameters (deterministically: re-seed any randomness inside it). `backward(dy)` receives one
/// read-only upstream gradient per output and must write the input gradients registered in
/// `inputs` and accumulate parameter gradients into `params` (zeroed by the checker first).
/// `params` may be null. Throws numeric_error when outputs or gradients are non-finite or all
/// zero, or when the accumulation convention is broken.
template <class Forward, class Backward>
GradcheckReport gradcheck(std::vector<GradcheckInput> inputs, Parameters<double>* params,
                          std::vector<View<const double>> outputs, Forward&& forward,
                          Backward&& backward, Generator& gen, GradcheckOptions opt = {}) {
  require<config_error>(!outputs.empty(), "gradcheck: no outputs");
  for (const auto& in : inputs)
    require<shape_error>(in.value.shape() == in.grad.shape(), "gradcheck: input '", in.name,
                         "': value ", in.value.shape(), " and grad ", in.grad.shape(), " differ");

  auto finite_nonzero = [](std::string_view what, View<const double> v) {
    bool any = false;
    for (index_t i = 0; i < v.numel(); ++i) {
      require<numeric_error>(std::isfinite(v[i]), "gradcheck: ", what, "[", i,
                             "] is not finite: ", v[i]);
      any = any || v[i] != 0.0;
    }
    require<numeric_error>(any, "gradcheck: ", what, " is all zero (shape ", v.shape(), ")");
  };

  std::vector<Tensor<double>> dys;
  std::vector<View<const double>> dy_views;
  for (const auto& y : outputs) {
    dys.push_back(randn<double>(y.shape(), gen));
    dy_views.push_back(dys.back().view());
  }
  auto loss = [&] {
    forward();
    double l = 0;
    for (std::size_t k = 0; k < outputs.size(); ++k) l += dot(outputs[k], dys[k]);
    return l;
  };

  // Analytic gradients, snapshotted (forward calls during differencing must not disturb them).
  forward();
  for (std::size_t k = 0; k < outputs.size(); ++k)
    finite_nonzero("output " + std::to_string(k), outputs[k]);
  if (params) params->zero_grad();
  backward(dy_views);
  struct Target {
    std::string name;
    View<double> value;
    Tensor<double> grad;      // snapshot of the first backward
    View<const double> live;  // where backward writes it
    bool accumulates;         // parameter gradient (+=) rather than input gradient (=)
  };
  std::vector<Target> targets;
  for (const auto& in : inputs) {
    Tensor<double> g(in.grad.shape());
    copy(g.view(), in.grad);
    targets.push_back({"input " + in.name, in.value, std::move(g), in.grad, false});
  }
  if (params) {
    for (index_t id = 0; id < params->count(); ++id) {
      Tensor<double> g(params->info(id).shape);
      copy(g.view(), params->grad(id));
      targets.push_back({"param " + params->info(id).name, params->param(id), std::move(g),
                         params->grad(id), true});
    }
  }
  for (const auto& t : targets) finite_nonzero("gradient of " + t.name, t.grad.view());

  if (opt.check_accumulation) {
    backward(dy_views);
    for (std::size_t k = 0; k < targets.size(); ++k) {
      const bool is_param = targets[k].accumulates;
      const View<const double> now = targets[k].live;
      const auto& first = targets[k].grad;
      for (index_t i = 0; i < first.numel(); ++i) {
        const double want = is_param ? 2 * first[i] : first[i];
        require<numeric_error>(std::abs(now[i] - want) <= 1e-12 * (1 + std::abs(want)),
                               "gradcheck: gradient of ", targets[k].name, "[", i, "] is ", now[i],
                               " after a second backward, expected ", want,
                               is_param ? " (parameter gradients must accumulate)"
                                        : " (input gradients must be overwritten)");
      }
    }
  }

  GradcheckReport rep;
  rep.tol = opt.tol;
  for (auto& t : targets) {
    GradcheckTensorReport tr;
    tr.name = t.name;
    tr.numel = t.grad.numel();
    double ss = 0;
    for (index_t i = 0; i < tr.numel; ++i) ss += t.grad[i] * t.grad[i];
    tr.scale = std::sqrt(ss / static_cast<double>(tr.numel));
    for (index_t i = 0; i < tr.numel; ++i) {
      const double v0 = t.value[i];
      t.value[i] = v0 + opt.h;
      const double lp = loss();
      t.value[i] = v0 - opt.h;
      const double lm = loss();
      t.value[i] = v0;
      const double num = (lp - lm) / (2 * opt.h);
      const double a = t.grad[i];
      const double err = std::abs(a - num) / std::max({std::abs(a), std::abs(num), tr.scale});
      if (!(err <= tr.max_error) || tr.worst < 0) {
        tr.max_error = std::isfinite(err) ? err : HUGE_VAL;
        tr.worst = i;
        tr.analytic = a;
        tr.numeric = num;
      }
    }
    rep.max_error = std::max(rep.max_error, tr.max_error);
    rep.tensors.push_back(std::move(tr));
  }
  forward();  // leave the outputs consistent with the (restored) inputs
  return rep;
}

}  // namespace flowdiff::nn
