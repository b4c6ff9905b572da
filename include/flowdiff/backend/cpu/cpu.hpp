// flowdiff/backend/cpu/cpu.hpp — the CPU backend: 64-byte aligned host memory, index-parallel loops
// over OpenMP threads (when the translation unit is compiled with OpenMP; serial otherwise), and
// deterministic reductions: the input is cut into fixed 4096-element blocks whose partial sums are
// accumulated in double and added in block order, so the result does not depend on thread count.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"

namespace flowdiff {

struct Cpu {
  static constexpr const char* name = "cpu";
  static constexpr bool host_accessible = true;
  static constexpr std::size_t alignment = 64;
  /// Below this many elements a loop runs on the calling thread: forking costs more than it saves.
  static constexpr index_t parallel_threshold = 1 << 15;
  static constexpr index_t reduce_block = 4096;

  template <class T>
  static T* allocate(index_t n) {
    if (n <= 0) return nullptr;
    std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    bytes = (bytes + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, bytes);
    if (p == nullptr) fail<error>("Cpu::allocate: out of memory allocating ", bytes, " bytes");
    return static_cast<T*>(p);
  }

  template <class T>
  static void deallocate(T* p) noexcept {
    std::free(const_cast<std::remove_const_t<T>*>(p));
  }

  /// Number of threads a parallel loop may use.
  static int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
  }

  /// Calls f(i) for i in [0, n). `work_per_item` scales the threshold for heavy functors.
  template <class F>
  static void parallel_for(index_t n, F&& f, [[maybe_unused]] index_t work_per_item = 1) {
#if defined(_OPENMP)
    if (n * work_per_item >= parallel_threshold && n > 1 && omp_get_max_threads() > 1 &&
        !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
      for (index_t i = 0; i < n; ++i) f(i);
      return;
    }
#endif
    for (index_t i = 0; i < n; ++i) f(i);
  }

  /// r's segmented reduction (backend/segment_reduce.hpp): r(s) for every segment s in
  /// [0, segs), each on one thread, its sums in element order. `work_per_item` as parallel_for's.
  template <class R>
  static void segment_reduce(index_t segs, const R& r, index_t work_per_item = 1) {
    parallel_for(segs, r, work_per_item);
  }

  /// Calls f(i, thread) for i in [0, n): coarse tasks shared out dynamically, one at a time, over
  /// at most `max_team` threads (one parallel region), so a thread the OS deschedules on a busy
  /// machine delays only the task it holds. `thread` is below min(max_team, max_threads()) and
  /// indexes per-thread workspaces allocated before the call. Runs serially on thread 0 for n < 2,
  /// one thread, or inside an enclosing parallel region. f must not throw.
  template <class F>
  static void parallel_tasks(index_t n, index_t max_team, F&& f) {
#if defined(_OPENMP)
    const int team = static_cast<int>(std::min<index_t>({n, max_team, omp_get_max_threads()}));
    if (team > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
      for (index_t i = 0; i < n; ++i) f(i, static_cast<index_t>(omp_get_thread_num()));
      return;
    }
#endif
    (void)max_team;
    for (index_t i = 0; i < n; ++i) f(i, index_t{0});
  }

  /// Calls f(begin, end) over contiguous chunks covering [0, n): the CPU fast path for element-wise
  /// loops, so the compiler sees a plain inner loop it can vectorise.
  template <class F>
  static void parallel_chunks(index_t n, F&& f) {
#if defined(_OPENMP)
    if (n >= parallel_threshold && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
      {
        const index_t nt = omp_get_num_threads();
        const index_t id = omp_get_thread_num();
        const index_t chunk = (n + nt - 1) / nt;
        const index_t b = std::min(n, id * chunk);
        const index_t e = std::min(n, b + chunk);
        if (b < e) f(b, e);
      }
      return;
    }
#endif
    if (n > 0) f(index_t{0}, n);
  }

  template <class T>
  static void copy(T* dst, const T* src, index_t n) {
    if (n > 0 && dst != src) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  }

  /// Deterministic sum of g(i) for i in [0, n), accumulated in double.
  template <class G>
  static double reduce_sum(index_t n, G&& g) {
    const index_t nb = (n + reduce_block - 1) / reduce_block;
    if (nb <= 1) {
      double s = 0;
      for (index_t i = 0; i < n; ++i) s += static_cast<double>(g(i));
      return s;
    }
    // The block sums on the stack, 256 blocks (a million elements) at a time: no allocation
    // (an adaptive sampler reduces once per step), and the same additions in the same order
    // as one pass over all the block sums.
    constexpr index_t on_stack = 256;
    double partial[on_stack];
    double s = 0;
    for (index_t b0 = 0; b0 < nb; b0 += on_stack) {
      const index_t count = std::min(on_stack, nb - b0);
      parallel_for(
          count,
          [&](index_t b) {
            const index_t lo = (b0 + b) * reduce_block, hi = std::min(n, lo + reduce_block);
            double bs = 0;
            for (index_t i = lo; i < hi; ++i) bs += static_cast<double>(g(i));
            partial[b] = bs;
          },
          reduce_block);
      for (index_t b = 0; b < count; ++b) s += partial[b];
    }
    return s;
  }

  template <class T>
  static T sum(const T* p, index_t n) {
    return static_cast<T>(reduce_sum(n, [p](index_t i) { return p[i]; }));
  }
};

static_assert(Backend<Cpu>);

}  // namespace flowdiff
