// flowdiff/nn/layers/upsample.hpp — nearest-neighbour upsampling by an integer factor f, as
// torch.nn.Upsample(scale_factor=f, mode="nearest"):
//   forward   y[n, c, h f + i, w f + j] = x[n, c, h, w]          (i, j < f)
//   backward  dx[n, c, h, w] = sum_{i, j < f} dy[n, c, h f + i, w f + j]
// No parameters; the overloads taking Parameters and a Cache exist so the layer composes like
// every other layer.
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
class UpsampleNearest2d {
 public:
  explicit UpsampleNearest2d(index_t factor = 2, std::string name = "upsample")
      : f_(factor), name_(std::move(name)) {
    require<config_error>(factor >= 1, name_, " (UpsampleNearest2d): factor must be >= 1, got ",
                          factor);
  }

  index_t factor() const { return f_; }
  struct Cache {};

  /// [N, C, H, W] -> [N, C, H f, W f]
  Shape output_shape(const Shape& s) const {
    if (s.rank() != 4)
      fail<shape_error>(name_, " (UpsampleNearest2d): x: expected shape [N, C, H, W], got ", s);
    return Shape{s[0], s[1], s[2] * f_, s[3] * f_};
  }

  // x: [N, C, H, W] -> y: [N, C, H f, W f]
  void forward(View<const T> x, View<T> y) const {
    const Shape ys = output_shape(x.shape());
    spatial_detail::check_exact(name_, "UpsampleNearest2d", "y", View<const T>(y), ys);
    const index_t f = f_, H = x.dim(2), W = x.dim(3), Wo = ys[3];
    const T* px = x.data();
    T* py = y.data();
    // One task per input row: it writes f output rows, the first built and the rest copied.
    Cpu::parallel_for(
        x.dim(0) * x.dim(1) * H,
        [=](index_t r) {
          const T* xr = px + r * W;
          T* y0 = py + r * f * Wo;
          for (index_t w = 0; w < W; ++w)
            for (index_t j = 0; j < f; ++j) y0[w * f + j] = xr[w];
          for (index_t i = 1; i < f; ++i) std::copy(y0, y0 + Wo, y0 + i * Wo);
        },
        f * Wo);
  }

  // x: [N, C, H, W] (for its shape), dy: [N, C, H f, W f], dx: [N, C, H, W] (overwritten)
  void backward(View<const T> x, View<const T> dy, View<T> dx) const {
    const Shape ys = output_shape(x.shape());
    spatial_detail::check_exact(name_, "UpsampleNearest2d", "dy", dy, ys);
    if (dx.empty()) return;
    spatial_detail::check_exact(name_, "UpsampleNearest2d", "dx", View<const T>(dx), x.shape());
    const index_t f = f_, H = x.dim(2), W = x.dim(3), Wo = ys[3];
    const T* pg = dy.data();
    T* pd = dx.data();
    Cpu::parallel_for(
        x.dim(0) * x.dim(1) * H,
        [=](index_t r) {
          T* dr = pd + r * W;
          std::fill(dr, dr + W, T(0));
          for (index_t i = 0; i < f; ++i) {
            const T* gr = pg + (r * f + i) * Wo;
            for (index_t w = 0; w < W; ++w)
              for (index_t j = 0; j < f; ++j) dr[w] += gr[w * f + j];
          }
        },
        f * Wo);
  }

  void forward(const Parameters<T>&, View<const T> x, View<T> y, Cache&) const { forward(x, y); }
  void backward(Parameters<T>&, View<const T> x, View<const T> dy, View<T> dx, Cache&) const {
    backward(x, dy, dx);
  }

 private:
  index_t f_;
  std::string name_;
};

}  // namespace flowdiff::nn
