// flowdiff/backend/segment_reduce.hpp — segmented reductions: for every segment s of a layer
// (a GroupNorm set, a channel), a few sums over the segment's elements, then a write of what they
// give (a mean and 1 / std, a parameter gradient). The protocol a reduction functor R follows:
//
//   static constexpr int passes;    1, or 2 when pass 1 needs pass 0's sums (a mean, then the
//                                   squared deviations from it: no cancellation)
//   static constexpr int width;     values per element and pass (1 or 2 sums at once)
//   index_t size() const;           elements per segment (the same for every segment)
//   void element(index_t s, index_t i, int pass, const double* prev, double* v) const;
//                                   v[0, width) = element i of segment s in `pass`; prev holds
//                                   the sums of the earlier passes, prev[p * width + k]
//   void put(index_t s, const double* sums) const;
//                                   writes segment s's results from sums[p * width + k]
//   void operator()(index_t s) const;
//                                   the whole of segment s on one thread: every sum in double in
//                                   element order, then what put() writes (the CPU's form)
//
// B::segment_reduce(segs, r, work) runs it: the CPU calls r(s) for each segment over its threads
// (bit for bit the CPU layers' order); CUDA gives each segment a block of Threads threads, thread
// t summing elements t, t + Threads, ... in double and the block adding the Threads partial sums
// in a fixed tree (segment_reduce_reference below is that order on the host, which the tests
// compare with r(s)). Neither uses atomics: every result is deterministic on its backend; the two
// backends differ by the order of the double additions only.
#pragma once

#include <cstddef>
#include <vector>

#include "flowdiff/core/config.hpp"

namespace flowdiff {

/// The most values a segment_reduce functor may produce per segment (passes * width).
inline constexpr int segment_reduce_max_sums = 4;

/// The CUDA block's order of segment_reduce on the host, serially: for each segment and pass,
/// Threads partial sums over elements t, t + Threads, ..., then the pairwise tree
/// (s[t] += s[t + w] for w = Threads / 2, ..., 1), then r.put. The CPU reference of the device
/// kernel (cuda.cuh, cuda::kernels::segment_reduce), for tests.
template <int Threads, class R>
void segment_reduce_reference(index_t segs, const R& r) {
  static_assert((Threads & (Threads - 1)) == 0, "segment_reduce: Threads must be a power of two");
  static_assert(R::passes * R::width <= segment_reduce_max_sums, "segment_reduce: too many sums");
  constexpr int K = R::width;
  std::vector<double> part(static_cast<std::size_t>(Threads) * K);
  const index_t len = r.size();
  for (index_t s = 0; s < segs; ++s) {
    double sums[segment_reduce_max_sums] = {};
    for (int p = 0; p < R::passes; ++p) {
      for (int t = 0; t < Threads; ++t) {
        double acc[K] = {};
        for (index_t i = t; i < len; i += Threads) {
          double v[K];
          r.element(s, i, p, sums, v);
          for (int k = 0; k < K; ++k) acc[k] += v[k];
        }
        for (int k = 0; k < K; ++k) part[static_cast<std::size_t>(k * Threads + t)] = acc[k];
      }
      for (int w = Threads / 2; w > 0; w /= 2)
        for (int t = 0; t < w; ++t)
          for (int k = 0; k < K; ++k)
            part[static_cast<std::size_t>(k * Threads + t)] +=
                part[static_cast<std::size_t>(k * Threads + t + w)];
      for (int k = 0; k < K; ++k) sums[p * K + k] = part[static_cast<std::size_t>(k * Threads)];
    }
    r.put(s, sums);
  }
}

}  // namespace flowdiff
