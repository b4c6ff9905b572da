// flowdiff/backend/cpu/isa.hpp — run-time choice of the x86 vector instruction set. The library
// is compiled without -march (baseline x86-64: SSE2), so its hot loops are also instantiated in
// functions compiled for AVX2 + FMA and for AVX-512F (GCC/Clang target attributes) and the best
// one this CPU and OS support is called. `vector_loop(body, b, e)` calls body(b, e) that way: the
// body must be a lambda marked FLOWDIFF_LAMBDA_INLINE so that it is inlined into, and compiled
// for, each target. FMA contraction is off in them, so the results are those of the baseline
// build, bit for bit, whichever instruction set runs.
// FLOWDIFF_NO_SGEMM turns the dispatch off (everything baseline), as it turns off sgemm.hpp.
#pragma once

#include "flowdiff/core/config.hpp"

#if !defined(FLOWDIFF_NO_SGEMM) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define FLOWDIFF_X86_DISPATCH 1
#else
#define FLOWDIFF_X86_DISPATCH 0
#endif

namespace flowdiff::simd {

/// Vector instruction sets flowdiff has kernels for; none: baseline code only.
enum class Isa { none, avx2, avx512 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

/// The best kernel set this CPU (and OS) supports; Isa::none off x86 or with FLOWDIFF_NO_SGEMM.
/// FLOWDIFF_MAX_ISA_AVX2 caps it at AVX2 (an AVX-512 machine then runs what a CPU without
/// AVX-512, such as most laptops', runs: bench_nn_avx2).
inline Isa best_isa() {
#if FLOWDIFF_X86_DISPATCH
#if !defined(FLOWDIFF_MAX_ISA_AVX2)
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
#endif
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::none;
}

namespace detail {
#if FLOWDIFF_X86_DISPATCH
// No FMA contraction in the dispatched loops: the element functions must give the same bits
// in a vectorised body, its remainder and the baseline build (g++ contracts a * b + c into an FMA
// under -std=gnu++, its default, once FMA is available; baseline x86-64 has none).
#if defined(__clang__)
#define FLOWDIFF_NO_CONTRACT_ATTR
#define FLOWDIFF_NO_CONTRACT_PRAGMA _Pragma("clang fp contract(off)")
#else
#define FLOWDIFF_NO_CONTRACT_ATTR , optimize("fp-contract=off")
#define FLOWDIFF_NO_CONTRACT_PRAGMA
#endif
template <class L>
__attribute__((target("avx512f") FLOWDIFF_NO_CONTRACT_ATTR)) void run_avx512(const L& body,
                                                                               index_t b,
                                                                               index_t e) {
  FLOWDIFF_NO_CONTRACT_PRAGMA
  body(b, e);
}
template <class L>
__attribute__((target("avx2,fma") FLOWDIFF_NO_CONTRACT_ATTR)) void run_avx2(const L& body,
                                                                              index_t b,
                                                                              index_t e) {
  FLOWDIFF_NO_CONTRACT_PRAGMA
  body(b, e);
}
#endif
}  // namespace detail

/// body(b, e), compiled for the best instruction set of this CPU (see the header comment).
template <class L>
void vector_loop(const L& body, index_t b, index_t e) {
#if FLOWDIFF_X86_DISPATCH
  switch (best_isa()) {
    case Isa::avx512: detail::run_avx512(body, b, e); return;
    case Isa::avx2: detail::run_avx2(body, b, e); return;
    default: break;
  }
#endif
  body(b, e);
}

}  // namespace flowdiff::simd
