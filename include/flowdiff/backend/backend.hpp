// flowdiff/backend/backend.hpp — the Backend concept. A backend is a stateless tag type that owns
// a memory space and knows how to allocate in it, run an index-parallel loop of a host-device
// functor over it, copy and reduce. Tensors, views and every generic algorithm are templated on
// it, so the same sampler or loss runs on the CPU (flowdiff::Cpu) or on a GPU backend.
#pragma once

#include <concepts>
#include <cstddef>

#include "flowdiff/core/config.hpp"

namespace flowdiff {

namespace detail {
struct IndexProbe {
  FLOWDIFF_HOST_DEVICE void operator()(index_t) const {}
};
/// A segmented reduction that does nothing (segment_reduce.hpp's protocol).
struct SegmentProbe {
  static constexpr int passes = 1, width = 1;
  FLOWDIFF_HOST_DEVICE index_t size() const { return 0; }
  FLOWDIFF_HOST_DEVICE void element(index_t, index_t, int, const double*, double* v) const {
    v[0] = 0;
  }
  FLOWDIFF_HOST_DEVICE void put(index_t, const double*) const {}
  FLOWDIFF_HOST_DEVICE void operator()(index_t) const {}
};
}  // namespace detail

/// A backend B provides, as static members:
///  - `name`                          a printable name ("cpu", "cuda")
///  - `host_accessible`               whether host code may dereference its pointers
///  - `allocate<T>(n)`, `deallocate(p)` raw storage for n elements
///  - `parallel_for(n, f)`            calls f(i) for every i in [0, n), in any order, in parallel
///  - `segment_reduce(segs, r)`       r's sums over each segment's elements, then r.put: the
///                                    protocol of backend/segment_reduce.hpp (deterministic)
///  - `copy(dst, src, n)`             element copy within the memory space
///  - `sum(p, n)` (float and double)  a reduction that is deterministic: the same bits for the
///                                    same input, whatever the thread count
template <class B>
concept Backend = requires(float* pf, const float* cpf, double* pd, const double* cpd, index_t n) {
  { B::name } -> std::convertible_to<const char*>;
  { B::host_accessible } -> std::convertible_to<bool>;
  { B::template allocate<float>(n) } -> std::same_as<float*>;
  B::deallocate(pf);
  B::parallel_for(n, detail::IndexProbe{});
  B::segment_reduce(n, detail::SegmentProbe{});
  B::copy(pf, cpf, n);
  { B::sum(cpf, n) } -> std::same_as<float>;
  { B::sum(cpd, n) } -> std::same_as<double>;
};

}  // namespace flowdiff
