// flowdiff/analytic/mixture_kernel.hpp — the batched evaluation engine behind GaussianMixture
// (host-only, CPU backend). Under a Gaussian path x = alpha_t z + beta_t eps with data
// z ~ sum_k pi_k N(mu_k, diag(s_k^2)), x given component k is N(alpha mu_k, v_k) per dimension with
// v_k = alpha^2 s_k^2 + beta^2, and every posterior mean we need is linear in x per component:
//   E[f | x] = sum_k r_k(x) (a_k + b_k x),   r_k(x) = pi_k N(x; alpha mu_k, v_k) / p_t(x),
// with (a_k, b_k) per dimension for the velocity (E[d_alpha z + d_beta eps | x]), the score, the
// data prediction E[z|x] and the noise prediction E[eps|x]. The responsibilities come from a
// log-sum-exp in double; restricting them to the components of a class y gives the class-conditional
// quantities, and ∇_x log p_t(y|x) = score(x|y) - score(x) = p_t(not y|x) (score(x|y) -
// score(x|not y)), the second form being the one that keeps its precision when p_t(y|x) -> 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numbers>
#include <string_view>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::analytic {

/// Which posterior mean a mixture field returns.
enum class Quantity {
  velocity,          ///< u_t(x) = E[d_alpha z + d_beta eps | x]
  score,             ///< ∇_x log p_t(x)
  data_prediction,   ///< E[z | x] (x1-prediction)
  noise_prediction,  ///< E[eps | x] (epsilon-prediction)
};

inline const char* quantity_name(Quantity q) {
  switch (q) {
    case Quantity::velocity: return "velocity";
    case Quantity::score: return "score";
    case Quantity::data_prediction: return "data_prediction";
    case Quantity::noise_prediction: return "noise_prediction";
  }
  return "?";
}

namespace detail {

/// Immutable mixture parameters, in double whatever the tensor type, shared by a mixture and the
/// fields made from it (so a field never dangles when the mixture goes out of scope).
struct MixtureParams {
  index_t K = 0;            // components
  index_t d = 0;            // features per sample
  index_t num_classes = 0;  // 0 when unlabelled; the null label is num_classes
  std::vector<double> weight, log_weight;  // [K], normalised
  std::vector<double> mean, stddev;        // [K, d]
  std::vector<label_t> label;              // [K], empty when unlabelled
  std::vector<double> class_log_weight;    // [num_classes]: log sum of the weights of class c
};

/// The scalars of a Gaussian path at one t, in double. beta_d_beta = beta * d_beta, taken from the
/// schedule where it provides it: finite at t = 1 for schedules with beta ~ sqrt(1 - t) there, whose
/// d_beta is -inf (SqrtBeta, VP, DDPM tables).
struct PathValues {
  double t, alpha, beta, d_alpha, beta_d_beta;
};

/// Per-component coefficients of p_t, laid out [d, K] so the inner loops run over components with
/// unit stride (vectorisable), whatever d is.
struct MixtureCoeffs {
  index_t K = 0, d = 0;
  std::vector<double> center;     // [d, K]  alpha mu_kj
  std::vector<double> half_prec;  // [d, K]  1 / (2 v_kj)
  std::vector<double> a, b;       // [d, K]  the posterior mean of component k is a + b x
  std::vector<double> log_norm;   // [K]     log pi_k - 1/2 sum_j log(2 pi v_kj)

  void resize(index_t k, index_t dd) {
    K = k;
    d = dd;
    const auto n = static_cast<std::size_t>(k * dd);
    center.resize(n);
    half_prec.resize(n);
    a.resize(n);
    b.resize(n);
    log_norm.resize(static_cast<std::size_t>(k));
  }
};

/// Fills `c` for p_t at the path values `pv`. Throws numeric_error where the marginal is a point
/// mass (v = 0: a component with stddev 0 at beta_t = 0) or a coefficient is not finite (a schedule
/// whose derivative blows up at that t).
inline void prepare_coeffs(const MixtureParams& p, const PathValues& pv, Quantity q,
                           MixtureCoeffs& c, std::string_view who) {
  const index_t K = p.K, d = p.d;
  c.resize(K, d);
  const double log_2pi = std::log(2.0 * std::numbers::pi);
  const double al = pv.alpha, be = pv.beta, da = pv.d_alpha, bdb = pv.beta_d_beta;
  require<numeric_error>(std::isfinite(al) && std::isfinite(be), who,
                         ": the schedule is not finite at t = ", pv.t, " (alpha_t = ", al,
                         ", beta_t = ", be, ")");
  for (index_t k = 0; k < K; ++k) {
    double log_norm = p.log_weight[static_cast<std::size_t>(k)];
    for (index_t j = 0; j < d; ++j) {
      const auto src = static_cast<std::size_t>(k * d + j);
      const double mu = p.mean[src], s = p.stddev[src];
      const double v = al * al * s * s + be * be;
      if (!(v > 0.0) || !std::isfinite(v))
        fail<numeric_error>(who, ": component ", k, " has marginal variance ", v, " in dimension ",
                            j, " at t = ", pv.t, " (stddev ", s, ", alpha_t ", al, ", beta_t ", be,
                            "): p_t is a point mass there, so its density, score and fields are "
                            "undefined");
      const double m = al * mu;
      double A = 0, B = 0;
      switch (q) {
        case Quantity::velocity: {
          // Cov(d_alpha z + d_beta eps, x | k) / Var(x | k)
          const double gain = (da * al * s * s + bdb) / v;
          A = da * mu - gain * m;
          B = gain;
          break;
        }
        case Quantity::score:
          A = m / v;
          B = -1.0 / v;
          break;
        case Quantity::data_prediction:
          // mu + alpha s^2 / v (x - alpha mu), written so it has no cancellation as alpha -> 1.
          A = mu * be * be / v;
          B = al * s * s / v;
          break;
        case Quantity::noise_prediction:
          A = -be * m / v;
          B = be / v;
          break;
      }
      if (!std::isfinite(A) || !std::isfinite(B))
        fail<numeric_error>(who, ": the ", quantity_name(q), " of component ", k,
                            " is not finite at t = ", pv.t, " (alpha_t = ", al, ", beta_t = ", be,
                            ", d_alpha = ", da, ", beta d_beta = ", bdb, ")");
      const auto dst = static_cast<std::size_t>(j * K + k);
      c.center[dst] = m;
      c.half_prec[dst] = 0.5 / v;
      c.a[dst] = A;
      c.b[dst] = B;
      log_norm -= 0.5 * (std::log(v) + log_2pi);
    }
    c.log_norm[static_cast<std::size_t>(k)] = log_norm;
  }
}

/// What a batched evaluation writes.
enum class Mode {
  field,           // out: [N, d]  sum_k r_k (a_k + b_k x), r restricted to class y if given
  log_density,     // out: [N]     log p(x), or log p(x|y) when y is given
  class_log_prob,  // out: [N]     log p(y|x) (0 for the null label)
  class_gradient,  // out: [N, d]  ∇ log p(y|x) = p(not y|x) (score(x|y) - score(x|not y))
};

/// Throws shape_error unless x is a batch [N, ...] of d features per sample.
template <class T>
index_t check_batch(std::string_view who, View<const T> x, index_t d) {
  require<shape_error>(x.rank() >= 2 && x.row_size() == d, who, ": x must have shape [N, ", d,
                       "] (or [N, ...] with ", d, " features per sample), got ", x.shape());
  return x.rows();
}

/// Throws unless y: [n] holds labels in [0, num_classes] (num_classes being the null label).
inline void check_labels(std::string_view who, View<const label_t> y, index_t n,
                         index_t num_classes) {
  require<shape_error>(y.rank() == 1 && y.numel() == n, who, ": labels y must have shape [", n,
                       "], got ", y.shape());
  for (index_t i = 0; i < n; ++i)
    if (y[i] < 0 || y[i] > num_classes)
      fail<config_error>(who, ": y[", i, "] = ", y[i], " is outside [0, ", num_classes, "] (",
                         num_classes, " is the null label)");
}

/// Which components a softmax runs over: all, those of class y, or those of every other class.
enum class Select { all, in_class, out_of_class };

/// log sum_{k selected} exp(l_k) (-inf for an empty selection) and r_k, the normalised weights over
/// the selection (0 elsewhere).
inline double softmax(const double* l, index_t K, const label_t* labels, label_t y, Select sel,
                      double* r) {
  auto selected = [=](index_t k) {
    return sel == Select::all || ((labels[k] == y) == (sel == Select::in_class));
  };
  // Emptiness is tracked apart from the maximum so that a NaN logit (from a NaN input) propagates
  // to the output instead of being mistaken for an empty selection.
  bool any = false;
  double m = -std::numeric_limits<double>::infinity();
  for (index_t k = 0; k < K; ++k)
    if (selected(k)) {
      any = true;
      m = std::max(m, l[k]);
    }
  if (!any) {
    for (index_t k = 0; k < K; ++k) r[k] = 0.0;
    return -std::numeric_limits<double>::infinity();
  }
  double s = 0;
  for (index_t k = 0; k < K; ++k) {
    r[k] = selected(k) ? std::exp(l[k] - m) : 0.0;
    s += r[k];
  }
  const double inv = 1.0 / s;
  for (index_t k = 0; k < K; ++k) r[k] *= inv;
  return m + std::log(s);
}

/// log(1 + exp(z)) without overflow or loss of small values.
inline double softplus(double z) {
  return z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
}

/// The batched evaluation: rows are processed in chunks of `rows_per_chunk`, chunks in parallel on
/// the CPU backend, each chunk with its own slice of `scratch` (3 K doubles: logits and two sets of
/// responsibilities). `scratch` only grows,
/// so repeated calls with the same batch size allocate nothing. x: [n, d]; y: [n] or nullptr.
template <Mode mode, class T>
void evaluate_batch(const MixtureParams& p, const MixtureCoeffs& c, const T* x, index_t n, T* out,
                    const label_t* y, std::vector<double>& scratch) {
  constexpr index_t rows_per_chunk = 32;
  const index_t K = c.K, d = c.d;
  const index_t chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  const auto need = static_cast<std::size_t>(chunks * 3 * K);
  if (scratch.size() < need) scratch.resize(need);
  const label_t null_label = static_cast<label_t>(p.num_classes);
  const label_t* comp_label = p.label.empty() ? nullptr : p.label.data();
  const double* center = c.center.data();
  const double* half_prec = c.half_prec.data();
  const double* ca = c.a.data();
  const double* cb = c.b.data();
  const double* log_norm = c.log_norm.data();
  const double* class_log_weight = p.class_log_weight.data();
  double* scratch_base = scratch.data();

  // out_j = sum_k w_k (a_jk + b_jk x_j)
  auto write_mean = [=](const double* w, const T* xi, T* oi) {
    for (index_t j = 0; j < d; ++j) {
      const double* aj = ca + j * K;
      const double* bj = cb + j * K;
      double sa = 0, sb = 0;
      for (index_t k = 0; k < K; ++k) {
        sa += w[k] * aj[k];
        sb += w[k] * bj[k];
      }
      oi[j] = static_cast<T>(sa + sb * static_cast<double>(xi[j]));
    }
  };

  auto zero_row = [=](index_t i) {
    if constexpr (mode == Mode::class_log_prob) {
      out[i] = T(0);
    } else {
      for (index_t j = 0; j < d; ++j) out[i * d + j] = T(0);
    }
  };

  auto row = [=](index_t i, double* logit, double* r, double* ry) {
    const T* xi = x + i * d;
    const label_t yi = y != nullptr ? y[i] : null_label;
    const bool conditional = yi != null_label;
    if constexpr (mode == Mode::class_log_prob || mode == Mode::class_gradient) {
      if (!conditional) {  // log p(∅|x) = 0
        zero_row(i);
        return;
      }
    }
    if constexpr (mode == Mode::field) {
      if (K == 1) {  // r = 1: skip the logits
        r[0] = 1.0;
        write_mean(r, xi, out + i * d);
        return;
      }
    }
    for (index_t k = 0; k < K; ++k) logit[k] = log_norm[k];
    for (index_t j = 0; j < d; ++j) {
      const double xj = static_cast<double>(xi[j]);
      const double* cj = center + j * K;
      const double* hj = half_prec + j * K;
      for (index_t k = 0; k < K; ++k) {
        const double diff = xj - cj[k];
        logit[k] -= diff * diff * hj[k];
      }
    }
    if constexpr (mode == Mode::field || mode == Mode::log_density) {
      const double lse = conditional ? softmax(logit, K, comp_label, yi, Select::in_class, r)
                                     : softmax(logit, K, nullptr, 0, Select::all, r);
      if constexpr (mode == Mode::field)
        write_mean(r, xi, out + i * d);
      else
        out[i] = static_cast<T>(conditional ? lse - class_log_weight[yi] : lse);
    } else {
      // log p(y|x) and its gradient from the in-class and out-of-class log-sum-exps L_in, L_out
      // separately: log p(y|x) = -softplus(L_out - L_in), and with Q = p(not y|x) =
      // sigmoid(L_out - L_in), ∇ log p(y|x) = Q (score(x|y) - score(x|not y)). Unlike
      // lse_y - lse_all and r^y - r, these keep full relative precision when p(y|x) is near 1 or 0.
      const double l_in = softmax(logit, K, comp_label, yi, Select::in_class, ry);
      const double l_out = softmax(logit, K, comp_label, yi, Select::out_of_class, r);
      if (l_out == -std::numeric_limits<double>::infinity()) {  // one class owns every component
        zero_row(i);
        return;
      }
      const double z = l_out - l_in;
      if constexpr (mode == Mode::class_log_prob) {
        out[i] = static_cast<T>(-softplus(z));
      } else {
        const double q = z > 0 ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z) / (1.0 + std::exp(z));
        for (index_t k = 0; k < K; ++k) ry[k] = q * (ry[k] - r[k]);
        write_mean(ry, xi, out + i * d);
      }
    }
  };

  Cpu::parallel_for(
      chunks,
      [=](index_t ch) {
        double* logit = scratch_base + ch * 3 * K;
        const index_t end = std::min(n, (ch + 1) * rows_per_chunk);
        for (index_t i = ch * rows_per_chunk; i < end; ++i) row(i, logit, logit + K, logit + 2 * K);
      },
      rows_per_chunk * K * (d + 8));
}

}  // namespace detail
}  // namespace flowdiff::analytic
