// flowdiff/train/clip.hpp — global gradient-norm clipping with torch.nn.utils.clip_grad_norm_'s
// semantics: n = sqrt(sum over every gradient element of g^2) (the L2 norm of the per-tensor
// norms), c = min(1, max_norm / (n + 1e-6)), g *= c; returns n, the norm before clipping. The sum
// of squares is accumulated in double in a fixed order (deterministic whatever the thread count);
// the flat gradient buffer is scaled in one pass. Unlike PyTorch's default, a non-finite norm is
// an error (numeric_error) unless error_if_nonfinite is false: a NaN gradient should stop training
// loudly, never be written into the parameters silently. Only trainable tensors count: buffers
// (Parameters::add_buffer) lie after the trainable prefix of the flat gradient buffer and are skipped.
// Backend-generic: the sum of squares is B::reduce_sum of a named functor (on the GPU, the CUDA
// backend's fixed-order reduction) and the scaling one transform pass.
#pragma once

#include <cmath>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::train {

namespace detail {
/// g[i]^2 in double: the terms of the squared global norm.
template <class T>
struct SquareTerm {
  const T* g;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double x = static_cast<double>(g[i]);
    return x * x;
  }
};
}  // namespace detail

/// Scales all gradients of `ps` so that their global L2 norm is at most max_norm; returns the
/// norm before clipping.
template <class T, Backend B>
T clip_grad_norm(nn::Parameters<T, B>& ps, double max_norm, bool error_if_nonfinite = true) {
  require<config_error>(std::isfinite(max_norm) && max_norm > 0,
                        "clip_grad_norm: max_norm must be finite and > 0, got ", max_norm);
  auto g = ps.flat_grads().rows(0, ps.trainable_size());
  const double sq = B::reduce_sum(g.numel(), detail::SquareTerm<T>{g.data()});
  const T norm = static_cast<T>(std::sqrt(sq));
  if (error_if_nonfinite)
    require<numeric_error>(std::isfinite(norm), "clip_grad_norm: the total gradient norm is ", norm,
                           " (non-finite gradients); pass error_if_nonfinite = false to clip anyway");
  // In T, as PyTorch computes the coefficient with a tensor of the gradients' dtype.
  const T coef = static_cast<T>(max_norm) / (norm + static_cast<T>(1e-6));
  if (coef < T(1)) scale(g, coef);
  return norm;
}

}  // namespace flowdiff::train
