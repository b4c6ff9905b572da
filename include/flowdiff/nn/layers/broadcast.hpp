// flowdiff/nn/layers/broadcast.hpp — the per-(sample, channel) broadcast over spatial positions
// that conditions convolutional blocks on an embedding, and its backward, on the CPU:
//   y[n, c, l] += v[n, c]          (add_broadcast; FiLM-style shifts, the U-Net's adapters)
//   dv[n, c]    = sum_l dy[n, c, l] (sum_spatial; overwritten)
// for y, dy: [N, C, L] with L = H W and v, dv: [N, C]. Each (n, c) row is handled by one thread
// and summed in l order, so the bits do not depend on the thread count. Shared by nn::UNet and
// nn::Classifier; the backend-generic forms are nn::add_per_channel / sum_per_channel
// (nn/layers/spatial_kernels.hpp), which give the same bits (sums in kernels::sum8's order).
#pragma once

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/kernels.hpp"

namespace flowdiff::nn::detail {

// y: [N C, len] (any [N, C, H, W] with len = H W), v: [N C]; y[q, l] += v[q].
template <class T>
void add_broadcast(View<T> y, View<const T> v, index_t len) {
  T* py = y.data();
  const T* pv = v.data();
  Cpu::parallel_for(
      v.numel(),
      [=](index_t q) {
        for (index_t l = 0; l < len; ++l) py[q * len + l] += pv[q];
      },
      len);
}

// dy: [N C, len], dv: [N C]; dv[q] = sum_l dy[q, l] (kernels::sum8's order).
template <class T>
void sum_spatial(View<const T> dy, View<T> dv, index_t len) {
  const T* pd = dy.data();
  T* pv = dv.data();
  Cpu::parallel_for(
      dv.numel(), [=](index_t q) { pv[q] = kernels::sum8(pd + q * len, len); }, len);
}

}  // namespace flowdiff::nn::detail
