// flowdiff/nn/layers/batchnorm.hpp — batch normalisation over the channels of [N, C, H, W], as
// torch.nn.BatchNorm2d(C, eps, momentum, affine=True, track_running_stats=True). Per channel c,
// over the M = N H W values x_i of that channel:
//   training  mu = mean x_i, var = mean (x_i - mu)^2 (biased), xhat_i = (x_i - mu) / sqrt(var +
//   eps),
//             y_i = gamma xhat_i + beta; running_mean <- (1 - m) running_mean + m mu,
//             running_var <- (1 - m) running_var + m var M / (M - 1)   (unbiased, as PyTorch)
//   eval      xhat_i = (x_i - running_mean) / sqrt(running_var + eps), y_i = gamma xhat_i + beta
//   backward  dgamma += sum dy_i xhat_i, dbeta += sum dy_i, and
//             training: dx_i = gamma / sqrt(var + eps) (dy_i - mean dy - xhat_i mean(dy xhat))
//             eval:     dx_i = gamma / sqrt(running_var + eps) dy_i
// Parameters: prefix.weight (gamma) and prefix.bias (beta), [C]. The running statistics are
// buffers, registered in Parameters under PyTorch's names prefix.running_mean / .running_var so
// checkpoints carry them (Parameters::add_buffer: optimizers, clipping and EMA averaging skip
// them, so weight decay never shrinks them).
// PyTorch's int64 num_batches_tracked is not stored (it only matters for momentum=None).
// Backward uses the batch statistics its matching forward left in the cache.
#pragma once

#include <cmath>
#include <string>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

template <class T>
class BatchNorm2d {
 public:
  /// Registers prefix.weight, prefix.bias, prefix.running_mean, prefix.running_var, all [C].
  BatchNorm2d(Parameters<T>& ps, const std::string& prefix, index_t channels, T eps = T(1e-5),
              T momentum = T(0.1))
      : prefix_(prefix), c_(channels), eps_(eps), momentum_(momentum) {
    detail::check_batchnorm_config(prefix, "BatchNorm2d", channels, eps, momentum);
    w_ = ps.add(prefix + ".weight", Shape{channels});
    b_ = ps.add(prefix + ".bias", Shape{channels});
    rm_ = ps.add_buffer(prefix + ".running_mean", Shape{channels});
    rv_ = ps.add_buffer(prefix + ".running_var", Shape{channels});
  }

  index_t channels() const { return c_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }
  index_t running_mean_id() const { return rm_; }
  index_t running_var_id() const { return rv_; }
  const std::string& prefix() const { return prefix_; }

  /// Training mode (the default) normalises with batch statistics and updates the running ones;
  /// eval mode normalises with the running statistics.
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// PyTorch's default: gamma = 1, beta = 0, running_mean = 0, running_var = 1.
  void init(Parameters<T>& ps, Generator&) const {
    fill(ps.param(w_), T(1));
    fill(ps.param(b_), T(0));
    fill(ps.param(rm_), T(0));
    fill(ps.param(rv_), T(1));
  }

  struct Cache {
    Tensor<T> mean;     // [C] the statistics the last forward normalised with
    Tensor<T> inv_std;  // [C] 1 / sqrt(var + eps)
  };

  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4 || s[1] != c_)
      fail<shape_error>(prefix_, " (BatchNorm2d): x: expected shape [N, ", c_, ", H, W], got ", s);
    return s;
  }

  /// x: [N, C, H, W] -> y: [N, C, H, W]. In training mode also updates the running statistics
  /// (which is why ps is not const).
  void forward(Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    run_forward(ps, x, y, cache, true);
  }
  /// Read-only parameters: eval mode, or training mode without the running-statistics update
  /// (torch's track_running_stats=False behaviour for this one call).
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    run_forward(const_cast<Parameters<T>&>(ps), x, y, cache, false);
  }

  // x: [N, C, H, W], dy: [N, C, H, W], dx: [N, C, H, W] or empty.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    output_shape(x.shape());
    spatial_detail::check_exact(prefix_, "BatchNorm2d", "dy", dy, x.shape());
    const bool want_dx = !dx.empty();
    if (want_dx)
      spatial_detail::check_exact(prefix_, "BatchNorm2d", "dx", View<const T>(dx), x.shape());
    require<config_error>(cache.mean.numel() == c_, prefix_,
                          " (BatchNorm2d): backward needs the cache of a forward call");
    const index_t n = x.dim(0), C = c_, L = x.dim(2) * x.dim(3);
    const double M = static_cast<double>(n * L);
    const bool training = training_;
    const T* px = x.data();
    const T* pg = dy.data();
    T* pd = want_dx ? dx.data() : nullptr;
    const T* mean = cache.mean.data();
    const T* inv = cache.inv_std.data();
    const T* gamma = ps.param(w_).data();
    T* dgamma = ps.grad(w_).data();
    T* dbeta = ps.grad(b_).data();
    Cpu::parallel_for(
        C,
        [=](index_t c) {
          const T mu = mean[c], is = inv[c];
          double sg = 0, sgx = 0;  // sum dy, sum dy xhat
          for (index_t i = 0; i < n; ++i) {
            const T* xr = px + (i * C + c) * L;
            const T* gr = pg + (i * C + c) * L;
            for (index_t l = 0; l < L; ++l) {
              sg += gr[l];
              sgx += static_cast<double>(gr[l]) * ((xr[l] - mu) * is);
            }
          }
          dgamma[c] += static_cast<T>(sgx);
          dbeta[c] += static_cast<T>(sg);
          if (!pd) return;
          const T scale = gamma[c] * is;
          const T mg = training ? static_cast<T>(sg / M) : T(0);
          const T mgx = training ? static_cast<T>(sgx / M) : T(0);
          for (index_t i = 0; i < n; ++i) {
            const T* xr = px + (i * C + c) * L;
            const T* gr = pg + (i * C + c) * L;
            T* dr = pd + (i * C + c) * L;
            for (index_t l = 0; l < L; ++l) dr[l] = scale * (gr[l] - mg - (xr[l] - mu) * is * mgx);
          }
        },
        2 * n * L);
  }

 private:
  void run_forward(Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache, bool update) const {
    output_shape(x.shape());
    spatial_detail::check_exact(prefix_, "BatchNorm2d", "y", View<const T>(y), x.shape());
    const index_t n = x.dim(0), C = c_, L = x.dim(2) * x.dim(3);
    if (cache.mean.numel() != C) {
      cache.mean.resize(Shape{C});
      cache.inv_std.resize(Shape{C});
    }
    const bool training = training_;
    require<config_error>(!training || n * L > 1, prefix_,
                          " (BatchNorm2d): training needs more than one value per channel, got "
                          "input shape ",
                          x.shape());
    const T* px = x.data();
    T* py = y.data();
    T* mean = cache.mean.data();
    T* inv = cache.inv_std.data();
    const T* gamma = ps.param(w_).data();
    const T* beta = ps.param(b_).data();
    T* rmean = ps.param(rm_).data();
    T* rvar = ps.param(rv_).data();
    const T eps = eps_, m = momentum_;
    Cpu::parallel_for(
        C,
        [=](index_t c) {
          T mu, var;
          if (training) {
            // Two passes in double: the mean, then the squared deviations (no cancellation).
            double s = 0;
            for (index_t i = 0; i < n; ++i) {
              const T* xr = px + (i * C + c) * L;
              for (index_t l = 0; l < L; ++l) s += xr[l];
            }
            const double cnt = static_cast<double>(n * L), md = s / cnt;
            double q = 0;
            for (index_t i = 0; i < n; ++i) {
              const T* xr = px + (i * C + c) * L;
              for (index_t l = 0; l < L; ++l) q += (xr[l] - md) * (xr[l] - md);
            }
            mu = static_cast<T>(md);
            var = static_cast<T>(q / cnt);
            if (update) {
              rmean[c] = (T(1) - m) * rmean[c] + m * mu;
              rvar[c] = (T(1) - m) * rvar[c] + m * static_cast<T>(q / (cnt - 1));
            }
          } else {
            mu = rmean[c];
            var = rvar[c];
          }
          const T is = T(1) / std::sqrt(var + eps);
          mean[c] = mu;
          inv[c] = is;
          const T a = gamma[c] * is, b = beta[c] - mu * a;  // y = a x + b
          for (index_t i = 0; i < n; ++i) {
            const T* xr = px + (i * C + c) * L;
            T* yr = py + (i * C + c) * L;
            for (index_t l = 0; l < L; ++l) yr[l] = a * xr[l] + b;
          }
        },
        3 * n * L);
  }

  std::string prefix_;
  index_t c_;
  T eps_, momentum_;
  bool training_ = true;
  index_t w_ = -1, b_ = -1, rm_ = -1, rv_ = -1;
};

}  // namespace flowdiff::nn
