// flowdiff/nn/layers/dropout.hpp — inverted dropout, as torch.nn.Dropout:
//   forward   m_i = [u_i >= p] / (1 - p),  u_i ~ U[0, 1) from a Generator;  y = m * x
//   backward  dx = m * dy
// The mask m lives in the caller's Cache (resized on demand, no allocation while the shape is
// unchanged), so backward sees exactly the mask forward drew. With p = 0 or in eval mode the layer
// is the identity and draws nothing (the generator is not advanced). Masks are drawn with
// fill_uniform, so sample i's mask depends only on (seed, call, i), not on the batch size.
#pragma once

#include <type_traits>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

template <class T>
class Dropout {
 public:
  struct Cache {
    Tensor<T> mask;        // same shape as x: 0 or 1 / (1 - p)
    bool identity = true;  // the last forward was the identity (p = 0 or eval)
  };

  /// p in [0, 1): the probability of zeroing an element.
  explicit Dropout(T p) : p_(p) {
    require<config_error>(p >= T(0) && p < T(1), "Dropout: p must lie in [0, 1), got ", p);
  }

  T p() const { return p_; }

  // x: any shape -> y: same shape. y may alias x.
  void forward(View<const T> x, View<T> y, Cache& cache, Generator& gen,
               bool training = true) const {
    check_same_shape("Dropout::forward", "x", x, "y", y);
    cache.identity = !training || p_ == T(0);
    if (cache.identity) {
      copy(y, x);
      return;
    }
    if (!(cache.mask.shape() == x.shape())) cache.mask.resize(x.shape());
    fill_uniform(cache.mask, gen);
    const T p = p_, keep = T(1) / (T(1) - p_);
    transform(
        cache.mask.view(), [p, keep](T u) { return u >= p ? keep : T(0); }, cache.mask);
    transform(
        y, [](T m, T xi) { return m * xi; }, cache.mask, x);
  }

  // dy: shape of x -> dx: same shape (overwritten; may alias dy)
  void backward(View<const T> dy, View<T> dx, const Cache& cache) const {
    check_same_shape("Dropout::backward", "dy", dy, "dx", dx);
    if (cache.identity) {
      copy(dx, dy);
      return;
    }
    require<shape_error>(cache.mask.shape() == dy.shape(), "Dropout::backward: dy has shape ",
                         dy.shape(), " but the cached mask has shape ", cache.mask.shape(),
                         " (run forward on the same batch first)");
    transform(
        dx, [](T m, T g) { return m * g; }, cache.mask, dy);
  }

 private:
  T p_;
};

}  // namespace flowdiff::nn
