// flowdiff/nn/layers/embedding.hpp — embeddings of labels and of time.
// Embedding (class labels, as torch.nn.Embedding with num_classes + 1 rows; the last row,
// index num_classes, is the null label of classifier-free guidance):
//   forward   y[n, :] = W[label_n, :]                  W: [num_classes + 1, dim]
//   backward  dW[label_n, :] += dy[n, :]               (labels are data: no input gradient)
// SinusoidalTimeEmbedding (DiT / ADM `timestep_embedding`, t scaled by `scale`, e.g. 1000 for
// t in [0, 1]):  f_i = exp(-log(max_period) i / half),  a_i = scale t f_i,  i < half = dim / 2,
//   y = [cos a_0 .. cos a_{half-1}, sin a_0 .. sin a_{half-1}] (+ one zero column if dim is odd)
//   dt = sum_i scale f_i (cos a_i dy_sin,i - sin a_i dy_cos,i)
// GaussianFourierFeatures (score-SDE, Song et al.): fixed frequencies w ~ N(0, sigma^2) [dim / 2],
//   y = [sin(2 pi t w), cos(2 pi t w)],  dt = sum_i 2 pi w_i (cos(.) dy_sin,i - sin(.) dy_cos,i)
// The two time embeddings have no trainable parameters; the Fourier frequencies are drawn from a
// Generator at construction and kept in the layer (not in Parameters): they are a fixed, seeded
// function of the configuration, so checkpoints need not carry them (set_frequencies() loads
// frequencies from elsewhere, e.g. a PyTorch `W` buffer).
#pragma once

#include <cmath>
#include <numbers>
#include <string>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

// ---------------------------------------------------------------------------------------------
// Class-label embedding with a null row.
// ---------------------------------------------------------------------------------------------
template <class T>
class Embedding {
 public:
  Embedding(Parameters<T>& ps, const std::string& prefix, index_t num_classes, index_t dim)
      : prefix_(prefix), k_(num_classes), d_(dim) {
    require<config_error>(num_classes >= 1 && dim >= 1, prefix,
                          " (Embedding): num_classes and dim must be >= 1, got ", num_classes,
                          " and ", dim);
    w_ = ps.add(prefix + ".weight", Shape{num_classes + 1, dim});
  }

  index_t num_classes() const { return k_; }
  /// The label that selects the null (unconditional) row.
  index_t null_label() const { return k_; }
  index_t dim() const { return d_; }
  index_t weight_id() const { return w_; }

  /// PyTorch's default: W ~ N(0, 1).
  void init(Parameters<T>& ps, Generator& gen) const { fill_normal(ps.param(w_), gen); }

  // labels: [N] in [0, num_classes] -> y: [N, dim]
  void forward(const Parameters<T>& ps, View<const label_t> labels, View<T> y) const {
    check(labels, y, "y");
    const T* w = ps.param(w_).data();
    const label_t* lab = labels.data();
    T* py = y.data();
    const index_t d = d_;
    Cpu::parallel_for(
        labels.numel(),
        [=](index_t n) {
          const T* src = w + static_cast<index_t>(lab[n]) * d;
          for (index_t j = 0; j < d; ++j) py[n * d + j] = src[j];
        },
        d);
  }

  // labels: [N], dy: [N, dim]. Accumulates into the selected rows of the weight gradient
  // (serially: two samples may share a label).
  void backward(Parameters<T>& ps, View<const label_t> labels, View<const T> dy) const {
    check(labels, dy, "dy");
    T* dw = ps.grad(w_).data();
    const T* g = dy.data();
    for (index_t n = 0; n < labels.numel(); ++n) {
      T* dst = dw + static_cast<index_t>(labels[n]) * d_;
      for (index_t j = 0; j < d_; ++j) dst[j] += g[n * d_ + j];
    }
  }

 private:
  template <class U>
  void check(View<const label_t> labels, View<U> y, const char* name) const {
    if (labels.rank() != 1)
      fail<shape_error>(prefix_, " (Embedding): labels: expected shape [N], got ", labels.shape());
    detail::check_arg(prefix_, "Embedding", name, y, Shape{labels.dim(0), d_});
    for (index_t n = 0; n < labels.numel(); ++n)
      if (labels[n] < 0 || labels[n] > k_)
        fail<config_error>(prefix_, " (Embedding): labels[", n, "] must lie in [0, ", k_, "] (", k_,
                           " is the null label), got ", labels[n]);
  }

  std::string prefix_;
  index_t k_, d_;
  index_t w_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Sinusoidal time embedding (no parameters).
// ---------------------------------------------------------------------------------------------
template <class T>
class SinusoidalTimeEmbedding {
 public:
  /// dim >= 2; t is multiplied by `scale` (1000 turns t in [0, 1] into DDPM-like step indices).
  explicit SinusoidalTimeEmbedding(index_t dim, double scale = 1000.0, double max_period = 10000.0)
      : d_(dim), half_(dim / 2), scale_(scale), freqs_(Shape{dim / 2 > 0 ? dim / 2 : 1}) {
    require<config_error>(dim >= 2, "SinusoidalTimeEmbedding: dim must be >= 2, got ", dim);
    require<config_error>(max_period > 1.0, "SinusoidalTimeEmbedding: max_period must be > 1, got ",
                          max_period);
    // Frequencies in double: the arguments reach scale * t ~ 1000, where float rounding of
    // the frequency alone would shift the phase by ~1e-4.
    for (index_t i = 0; i < half_; ++i)
      freqs_[i] =
          std::exp(-std::log(max_period) * static_cast<double>(i) / static_cast<double>(half_));
  }

  index_t dim() const { return d_; }
  double scale() const { return scale_; }

  // t: [N] -> y: [N, dim]
  void forward(View<const T> t, View<T> y) const {
    check(t, y, "y");
    const T* pt = t.data();
    T* py = y.data();
    const double* f = freqs_.data();
    const index_t d = d_, h = half_;
    const double sc = scale_;
    // sin and cos by fast_sincos (a vectorised loop), std:: beyond its range (every f_i <= 1, so
    // only rows with |tn| > fast_sincos_limit have such arguments); kernels::MlpInput, the
    // backend models' embedding, decides per argument the same way.
    Cpu::parallel_for(
        t.numel(),
        [=](index_t n) {
          const double tn = sc * static_cast<double>(pt[n]);
          T* row = py + n * d;
          simd::vector_loop(
              [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
                FLOWDIFF_SIMD
                for (index_t i = lo; i < hi; ++i) {
                  double sa, ca;
                  fast_sincos(tn * f[i], sa, ca);
                  row[i] = static_cast<T>(ca);
                  row[h + i] = static_cast<T>(sa);
                }
              },
              0, h);
          if (!(std::fabs(tn) <= fast_sincos_limit))
            for (index_t i = 0; i < h; ++i) {
              const double a = tn * f[i];
              if (std::fabs(a) <= fast_sincos_limit) continue;
              row[i] = static_cast<T>(std::cos(a));
              row[h + i] = static_cast<T>(std::sin(a));
            }
          if (d % 2) row[d - 1] = T(0);
        },
        4 * d);
  }

  // t: [N], dy: [N, dim] -> dt: [N] (overwritten)
  void backward(View<const T> t, View<const T> dy, View<T> dt) const {
    check(t, dy, "dy");
    detail::check_arg("SinusoidalTimeEmbedding", "time embedding", "dt", dt, t.shape());
    for (index_t n = 0; n < t.numel(); ++n) {
      const double tn = scale_ * static_cast<double>(t[n]);
      const T* g = dy.data() + n * d_;
      double s = 0;
      for (index_t i = 0; i < half_; ++i) {
        const double a = tn * freqs_[i];
        s += freqs_[i] * (std::cos(a) * g[half_ + i] - std::sin(a) * g[i]);
      }
      dt[n] = static_cast<T>(scale_ * s);
    }
  }

 private:
  template <class U>
  void check(View<const T> t, View<U> y, const char* name) const {
    if (t.rank() != 1)
      fail<shape_error>("SinusoidalTimeEmbedding: t: expected shape [N], got ", t.shape());
    detail::check_arg("SinusoidalTimeEmbedding", "time embedding", name, y, Shape{t.dim(0), d_});
  }

  index_t d_, half_;
  double scale_;
  Tensor<double> freqs_;  // [half]
};

// ---------------------------------------------------------------------------------------------
// Gaussian Fourier features (no trainable parameters; fixed random frequencies).
// ---------------------------------------------------------------------------------------------
template <class T>
class GaussianFourierFeatures {
 public:
  /// dim even >= 2; frequencies w ~ N(0, sigma^2), drawn once from `gen`.
  GaussianFourierFeatures(index_t dim, T sigma, Generator& gen) : d_(dim), w_(Shape{dim / 2}) {
    require<config_error>(dim >= 2 && dim % 2 == 0,
                          "GaussianFourierFeatures: dim must be even and >= 2, got ", dim);
    require<config_error>(sigma > T(0), "GaussianFourierFeatures: sigma must be > 0, got ", sigma);
    fill_normal(w_, gen, T(0), sigma);
  }

  index_t dim() const { return d_; }
  /// The frequencies w: [dim / 2].
  View<const T> frequencies() const { return w_.view(); }
  /// Replaces the frequencies (e.g. with a PyTorch model's `W` buffer).
  void set_frequencies(View<const T> w) {
    detail::check_arg("GaussianFourierFeatures", "time embedding", "w", w, w_.shape());
    copy(w_.view(), w);
  }

  // t: [N] -> y: [N, dim]
  void forward(View<const T> t, View<T> y) const {
    check(t, y, "y");
    const T* pt = t.data();
    const T* w = w_.data();
    T* py = y.data();
    const index_t d = d_, h = d_ / 2;
    Cpu::parallel_for(
        t.numel(),
        [=](index_t n) {
          T* row = py + n * d;
          for (index_t i = 0; i < h; ++i) {
            const T a = pt[n] * w[i] * T(2 * std::numbers::pi);
            row[i] = std::sin(a);
            row[h + i] = std::cos(a);
          }
        },
        4 * d);
  }

  // t: [N], dy: [N, dim] -> dt: [N] (overwritten)
  void backward(View<const T> t, View<const T> dy, View<T> dt) const {
    check(t, dy, "dy");
    detail::check_arg("GaussianFourierFeatures", "time embedding", "dt", dt, t.shape());
    const index_t h = d_ / 2;
    for (index_t n = 0; n < t.numel(); ++n) {
      const T* g = dy.data() + n * d_;
      T s = 0;
      for (index_t i = 0; i < h; ++i) {
        const T k = w_[i] * T(2 * std::numbers::pi);
        const T a = t[n] * k;
        s += k * (std::cos(a) * g[i] - std::sin(a) * g[h + i]);
      }
      dt[n] = s;
    }
  }

 private:
  template <class U>
  void check(View<const T> t, View<U> y, const char* name) const {
    if (t.rank() != 1)
      fail<shape_error>("GaussianFourierFeatures: t: expected shape [N], got ", t.shape());
    detail::check_arg("GaussianFourierFeatures", "time embedding", name, y, Shape{t.dim(0), d_});
  }

  index_t d_;
  Tensor<T> w_;  // [dim / 2]
};

}  // namespace flowdiff::nn
