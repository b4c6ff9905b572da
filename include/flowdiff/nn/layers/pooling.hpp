// flowdiff/nn/layers/pooling.hpp — average pooling with kernel = stride = k, as
// torch.nn.AvgPool2d(k) (no padding; rows and columns past the last full window are dropped,
// Ho = floor(H / k)):
//   forward   y[n, c, oh, ow] = 1/k^2 sum_{i, j < k} x[n, c, oh k + i, ow k + j]
//   backward  dx[n, c, oh k + i, ow k + j] = dy[n, c, oh, ow] / k^2   (0 on dropped pixels)
// No parameters; the forward/backward overloads taking Parameters and a Cache exist only so the
// layer composes like every other layer.
#pragma once

#include <algorithm>
#include <string>
#include <utility>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

template <class T>
class AvgPool2d {
 public:
  explicit AvgPool2d(index_t kernel = 2, std::string name = "avg_pool2d")
      : k_(kernel), name_(std::move(name)) {
    require<config_error>(kernel >= 1, name_, " (AvgPool2d): kernel must be >= 1, got ", kernel);
  }

  index_t kernel() const { return k_; }
  struct Cache {};

  /// [N, C, H, W] -> [N, C, H / k, W / k]
  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4 || s[2] < k_ || s[3] < k_)
      fail<shape_error>(name_, " (AvgPool2d): x: expected shape [N, C, H, W] with H, W >= ", k_,
                        ", got ", s);
    return Shape{s[0], s[1], s[2] / k_, s[3] / k_};
  }

  // x: [N, C, H, W] -> y: [N, C, H / k, W / k]
  void forward(View<const T> x, View<T> y) const {
    const Shape ys = output_shape(x.shape());
    spatial_detail::check_exact(name_, "AvgPool2d", "y", View<const T>(y), ys);
    const index_t k = k_, H = x.dim(2), W = x.dim(3), Ho = ys[2], Wo = ys[3];
    const T inv = T(1) / static_cast<T>(k * k);
    const T* px = x.data();
    T* py = y.data();
    Cpu::parallel_for(
        ys[0] * ys[1],
        [=](index_t q) {
          const T* xp = px + q * H * W;
          T* yp = py + q * Ho * Wo;
          for (index_t oh = 0; oh < Ho; ++oh) {
            T* yr = yp + oh * Wo;
            std::fill(yr, yr + Wo, T(0));
            for (index_t i = 0; i < k; ++i) {
              const T* xr = xp + (oh * k + i) * W;
              for (index_t ow = 0; ow < Wo; ++ow)
                for (index_t j = 0; j < k; ++j) yr[ow] += xr[ow * k + j];
            }
            for (index_t ow = 0; ow < Wo; ++ow) yr[ow] *= inv;
          }
        },
        H * W);
  }

  // x: [N, C, H, W] (for its shape only), dy: [N, C, H / k, W / k], dx: [N, C, H, W] (overwritten)
  void backward(View<const T> x, View<const T> dy, View<T> dx) const {
    const Shape ys = output_shape(x.shape());
    spatial_detail::check_exact(name_, "AvgPool2d", "dy", dy, ys);
    if (dx.empty()) return;
    spatial_detail::check_exact(name_, "AvgPool2d", "dx", View<const T>(dx), x.shape());
    const index_t k = k_, H = x.dim(2), W = x.dim(3), Ho = ys[2], Wo = ys[3];
    const T inv = T(1) / static_cast<T>(k * k);
    const T* pg = dy.data();
    T* pd = dx.data();
    Cpu::parallel_for(
        ys[0] * ys[1],
        [=](index_t q) {
          T* dp = pd + q * H * W;
          const T* gp = pg + q * Ho * Wo;
          std::fill(dp, dp + H * W, T(0));  // pixels past the last window get no gradient
          for (index_t oh = 0; oh < Ho; ++oh)
            for (index_t i = 0; i < k; ++i) {
              T* dr = dp + (oh * k + i) * W;
              for (index_t ow = 0; ow < Wo; ++ow) {
                const T v = gp[oh * Wo + ow] * inv;
                for (index_t j = 0; j < k; ++j) dr[ow * k + j] = v;
              }
            }
        },
        H * W);
  }

  void forward(const Parameters<T>&, View<const T> x, View<T> y, Cache&) const { forward(x, y); }
  void backward(Parameters<T>&, View<const T> x, View<const T> dy, View<T> dx, Cache&) const {
    backward(x, dy, dx);
  }

 private:
  index_t k_;
  std::string name_;
};

}  // namespace flowdiff::nn
