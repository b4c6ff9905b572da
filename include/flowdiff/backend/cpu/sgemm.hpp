// flowdiff/backend/cpu/sgemm.hpp — flowdiff's own single-precision GEMM for x86-64:
// C[m, n] = alpha op(A) op(B) + beta C on row-major matrices with leading dimensions, by the
// Goto/BLIS scheme: op(B) is packed once per [KC, NC] block into NR-column micro-panels,
// op(A) per [MC, KC] block into MR-row micro-panels, and an MR x NR register-tile
// micro-kernel (FMA) runs over them. Two kernels, chosen at run time from the CPU's features
// (the library is compiled without -march, so they are compiled with GCC/Clang target attributes):
//   AVX-512F: 8 x 32 (16 zmm accumulators), AVX2 + FMA: 6 x 16 (12 ymm accumulators).
// Either operand may pack itself instead of being stored (BPacker / APacker: a convolution's
// column matrix read straight from the images, "implicit GEMM"; APacker rows are broadcast by a
// kernel variant reading MR plain rows, the same FMAs in the same order). The AVX-512 kernel
// takes a stored row-major A as such plain rows too (copied, or in place when a row is one K
// block), so only a transposed A and a transposed B need transposing packs (8 x 8 AVX blocks).
// When A is a single MC block, B is packed one micro-panel at a time, just before its tiles.
// C may lie in blocks of columns (Problem::cblock: a batch's per-sample outputs [m, L] written
// in place by one product over all their columns) and a transposed op(B) in blocks along k
// (Problem::bblock: the per-sample [n, L] read in place); AVX-512 packed products only.
// Products with at most 4 rows or columns skip the packing (batch-1 inference: matrix-vector
// products through dot products or row updates), and so do small batches against a weight
// matrix, C = A B^T with 2 <= m <= 16 (AVX-512: 4 x 4 tiles of dot products sharing their
// loads). Determinism: the blocking (KC, MC, NC, MR, NR) is a constant of the kernel, every
// element of C is summed over k in the same order whatever the thread count, and threads only
// change which thread computes which tiles, so the result is bit-identical for 1, 2 or more
// threads (not between the kernels or paths, which shape alone picks, nor against other BLAS).
// Threads: one OpenMP region per product of at least `parallel_flops`, outside any enclosing
// parallel region, cutting C along its longer side at tile multiples into one part per thread;
// each thread packs its own operands (no shared buffers, no barriers). Inside a parallel region
// (e.g. per-sample convolution groups, attention heads) the product runs serially.
// Memory: the packing buffers are per thread (pack_buffer), grown to the largest block seen and
// kept, so a product allocates nothing once the thread has run one as large; a per-call
// allocation cost an mmap and a page fault per 4 KB for the large products and two mallocs for
// each small one (DiT training step: 729 -> 453 ms on one thread with this and pack_rows' order).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/core/config.hpp"

#if FLOWDIFF_X86_DISPATCH
#define FLOWDIFF_SGEMM_X86 1
#include <immintrin.h>
#else
#define FLOWDIFF_SGEMM_X86 0
#endif

// Full unrolling of the micro-kernel's register-tile loops (the accumulator arrays then live in
// registers). nvcc's front end (cudafe++) does not know the GCC pragma and warns (#1675) but passes
// it on to the host compiler, which unrolls: the warning is silenced around the pragma alone (a
// plain loop there cost the nvcc builds of the examples about 15 % of their CPU training speed).
#if defined(__NVCC__)
#define FLOWDIFF_SGEMM_UNROLL                                                            \
  _Pragma("nv_diagnostic push") _Pragma("nv_diag_suppress 1675") _Pragma("GCC unroll 16") \
      _Pragma("nv_diagnostic pop")
#elif defined(__clang__)
#define FLOWDIFF_SGEMM_UNROLL _Pragma("unroll")
#else
#define FLOWDIFF_SGEMM_UNROLL _Pragma("GCC unroll 16")
#endif

namespace flowdiff::sgemm {

using simd::best_isa;
using simd::Isa;
using simd::isa_name;

/// An op(B) that is never stored but packs itself (an implicit operand: a convolution's im2col
/// matrix read straight from the images). pack(ctx, p0, kc, j0, nc, dst) writes
/// op(B)[p0 : p0 + kc, j0 : j0 + nc] as `panel`-column micro-panels, panel q at dst + panel q kc,
/// row p of it at + panel p, lanes beyond nc zero: what pack_rows writes for a stored op(B), so
/// the product has the same bits as with the matrix. Only the AVX-512 kernel (32-column panels)
/// takes one; gemm() returns false for any other kernel and for thin products.
struct BPacker {
  static constexpr index_t panel = 32;
  void (*pack)(const void* ctx, index_t p0, index_t kc, index_t j0, index_t nc, float* dst);
  const void* ctx;
  /// Optional: op(B) stored already as micro-panels over the whole k (panel q, columns
  /// [32 q, 32 q + 32), at panels + 32 q k, its row p at + 32 p; 64-byte aligned): the product
  /// reads them in place and pack is not called. Lanes beyond n are read and their columns
  /// discarded.
  const float* panels = nullptr;
};

/// An op(A) that is never stored but packs itself: the column matrix of a convolution read from
/// the images as the broadcast operand of its weight gradient (dW^T = col dy^T). pack(ctx, i0,
/// mc, p0, kc, dst) writes the plain rows op(A)[i0 + r, p0 : p0 + kc], row r < mc at dst + r kc
/// (not MR-interleaved panels: each row is a contiguous run of pixels, so packing needs no
/// transposes or gathers); the product then runs the micro-kernel that broadcasts from MR rows,
/// with the same sums in the same order as from interleaved panels. Only the AVX-512 kernel takes
/// one; gemm() returns false for any other kernel and for thin products.
struct APacker {
  void (*pack)(const void* ctx, index_t i0, index_t mc, index_t p0, index_t kc, float* dst);
  const void* ctx;
};

/// Element-wise work on C fused into the product (a bias, an activation, its derivative):
/// apply(ctx, i0, i1, j0, j1) runs once for each finished block of C, rows [i0, i1) and columns
/// [j0, j1) in the product's own indices, on the thread that computed the block and while the
/// block is still in its caches; the blocks of one product cover C once, with no overlap, and
/// may run concurrently on different threads. It must not throw.
struct Epilogue {
  void (*apply)(const void* ctx, index_t i0, index_t i1, index_t j0, index_t j1);
  const void* ctx;
};

/// Problem::cblock's unit (the AVX-512 kernel's NR): block widths and the column offset must be
/// multiples of it.
inline constexpr index_t cblock_unit = 32;

/// One product C = alpha op(A) op(B) + beta C; op(A) is [m, k], op(B) [k, n], C [m, n], all
/// row-major with leading dimensions lda, ldb, ldc (elements between rows of the stored matrix).
/// With bpack set, op(B) comes from it (columns from bcol0 on) and b, ldb, tb are unused; with
/// apack set, op(A) comes from it (rows from arow0 on) and a, lda, ta are unused.
/// With epilogue set, it runs over every block of C once the block is final; row0 and col0 are
/// the offsets of this (sub-)problem's C in the product the epilogue indexes (0 for a caller).
struct Problem {
  bool ta = false, tb = false;
  index_t m = 0, n = 0, k = 0;
  float alpha = 1.f;
  const float* a = nullptr;
  index_t lda = 0;
  const float* b = nullptr;
  index_t ldb = 0;
  float beta = 0.f;
  float* c = nullptr;
  index_t ldc = 0;
  const BPacker* bpack = nullptr;
  index_t bcol0 = 0;
  const APacker* apack = nullptr;
  index_t arow0 = 0;
  const Epilogue* epilogue = nullptr;
  index_t row0 = 0, col0 = 0;
  /// C in blocks of columns (a batch's per-sample outputs, each [m, cblock] at its own place):
  /// column j of C is column (cj0 + j) % cblock of block (cj0 + j) / cblock, whose row i starts
  /// at c + block cstride + i ldc. 0 (the default): C is one matrix. Only the AVX-512 kernel's
  /// packed products take it, with cblock and cj0 multiples of cblock_unit (its NR), so that no
  /// tile crosses a block; gemm() returns false (nothing done) for anything else.
  index_t cblock = 0, cstride = 0, cj0 = 0;
  /// A transposed op(B) in blocks along k (the per-sample [n, L] matrices of a batch, such as a
  /// convolution's dy, read as one op(B) = [gn L, n] without packing them together first): with
  /// tb and bblock > 0, op(B)[p, j] = b[(p / bblock) bstride + j ldb + p % bblock]. 0 (the
  /// default): B is one matrix. The AVX-512 kernel's packed products only (gemm() returns false
  /// for anything else).
  index_t bblock = 0, bstride = 0;

  /// The epilogue (if any) over rows [i0, i1) and columns [j0, j1) of this problem's C.
  void finish(index_t i0, index_t i1, index_t j0, index_t j1) const {
    if (epilogue != nullptr && i1 > i0 && j1 > j0)
      epilogue->apply(epilogue->ctx, row0 + i0, row0 + i1, col0 + j0, col0 + j1);
  }

  /// Where element (i, j) of C is.
  float* c_at(index_t i, index_t j) const {
    if (cblock == 0) return c + i * ldc + j;
    const index_t col = cj0 + j;
    return c + col / cblock * cstride + i * ldc + col % cblock;
  }

  float A(index_t i, index_t p) const { return ta ? a[p * lda + i] : a[i * lda + p]; }
  float B(index_t p, index_t j) const {
    if (tb && bblock != 0) return b[p / bblock * bstride + j * ldb + p % bblock];
    return tb ? b[j * ldb + p] : b[p * ldb + j];
  }
};

/// Products of at least this many flops (2 m n k) use all OpenMP threads.
inline constexpr double parallel_flops = double(1 << 25);

namespace detail {

/// 64-byte aligned scratch, owned by one call (n = 0: none).
struct Scratch {
  float* p = nullptr;
  explicit Scratch(index_t n) {
    if (n <= 0) return;
    p = allocate(n);
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  static float* allocate(index_t n) {
    const std::size_t bytes = (static_cast<std::size_t>(n) * sizeof(float) + 63) / 64 * 64;
    auto* q = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (q == nullptr) throw std::bad_alloc();
    return q;
  }
};

/// The packing buffers of the calling thread (slot 0: B panels, slot 1: A panels; slots 2-4 are
/// the Winograd convolution's, nn/layers/winograd.hpp), grown on demand and kept for the thread's
/// lifetime: a pure cache, never observable in any result. 64-byte aligned.
/// Allocating them per call cost a fresh mmap (and a page fault per 4 KB on first touch) for
/// every large product and two malloc calls for every small one (the attention's per-head
/// products). Not re-entrant, and it need not be: packed_serial never calls itself.
inline float* pack_buffer(int slot, index_t n) {
  struct Buffer {
    float* p = nullptr;
    index_t capacity = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffers[5];
  Buffer& b = buffers[slot];
  if (b.capacity < n) {
    float* q = Scratch::allocate(n);
    std::free(b.p);
    b.p = q;
    b.capacity = n;
  }
  return b.p;
}

#if FLOWDIFF_SGEMM_X86
/// pack_transposed's 8 x 8 blocks (rows r0 + [0, 8), all p with p + 8 <= kc; returns the first p
/// it left): each block is four 128-bit loads of rows 0-3 joined with rows 4-7 in the upper lane
/// (the loads do the cross-lane step), then an in-lane 4 x 4 transpose (unpack, shuffle), so
/// every 256-bit result is one whole column p of the block, stored as one lane-row of the
/// panel. Eight shuffles per 32 floats, which AVX2 cores run on two ports (the 4 x 4 SSE
/// transposes took twice the shuffles and loads per float: 10 % of a U-Net training step on a
/// Xeon went to them). Called only by the AVX2 and AVX-512 kernels' packing.
template <index_t W>
__attribute__((target("avx2"))) inline index_t pack_transposed8(const float* src, index_t ld,
                                                                index_t kc, float* dst) {
  const float* s[8];
  for (int i = 0; i < 8; ++i) s[i] = src + i * ld;
  index_t p = 0;
  for (; p + 8 <= kc; p += 8) {
    __m256 t[8];
    for (int h = 0; h < 2; ++h)  // h = 0: columns p .. p+3, h = 1: p+4 .. p+7
      for (int i = 0; i < 4; ++i)
        t[4 * h + i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(s[i] + p + 4 * h)),
                                            _mm_loadu_ps(s[i + 4] + p + 4 * h), 1);
    for (int h = 0; h < 2; ++h) {
      const __m256 a0 = _mm256_unpacklo_ps(t[4 * h], t[4 * h + 1]);
      const __m256 a1 = _mm256_unpackhi_ps(t[4 * h], t[4 * h + 1]);
      const __m256 a2 = _mm256_unpacklo_ps(t[4 * h + 2], t[4 * h + 3]);
      const __m256 a3 = _mm256_unpackhi_ps(t[4 * h + 2], t[4 * h + 3]);
      float* d = dst + (p + 4 * h) * W;
      _mm256_storeu_ps(d, _mm256_shuffle_ps(a0, a2, 0x44));
      _mm256_storeu_ps(d + W, _mm256_shuffle_ps(a0, a2, 0xEE));
      _mm256_storeu_ps(d + 2 * W, _mm256_shuffle_ps(a1, a3, 0x44));
      _mm256_storeu_ps(d + 3 * W, _mm256_shuffle_ps(a1, a3, 0xEE));
    }
  }
  return p;
}
#endif

/// dst[p W + r] = src[r ld + p] for r < rows, p < kc; rows [rows, W) zero. The transposing pack
/// (rows of the stored matrix become the interleaved lanes of a micro-panel), by 8 x 8 AVX
/// transposes where the block is whole (pack_transposed8; only the AVX2 / AVX-512 kernels pack),
/// 4 x 4 SSE transposes for the rest.
template <index_t W>
inline void pack_transposed(const float* src, index_t ld, index_t rows, index_t kc, float* dst) {
  index_t r = 0;
#if FLOWDIFF_SGEMM_X86
  for (; r + 8 <= rows && kc >= 8; r += 8) {
    const index_t p8 = pack_transposed8<W>(src + r * ld, ld, kc, dst + r);
    for (index_t p = p8; p < kc; ++p)
      for (index_t i = 0; i < 8; ++i) dst[p * W + r + i] = src[(r + i) * ld + p];
  }
  for (; r + 4 <= rows; r += 4) {
    const float* s0 = src + r * ld;
    const float* s1 = s0 + ld;
    const float* s2 = s1 + ld;
    const float* s3 = s2 + ld;
    index_t p = 0;
    for (; p + 4 <= kc; p += 4) {
      __m128 x0 = _mm_loadu_ps(s0 + p), x1 = _mm_loadu_ps(s1 + p), x2 = _mm_loadu_ps(s2 + p),
             x3 = _mm_loadu_ps(s3 + p);
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      _mm_storeu_ps(dst + p * W + r, x0);
      _mm_storeu_ps(dst + (p + 1) * W + r, x1);
      _mm_storeu_ps(dst + (p + 2) * W + r, x2);
      _mm_storeu_ps(dst + (p + 3) * W + r, x3);
    }
    for (; p < kc; ++p) {
      float* d = dst + p * W + r;
      d[0] = s0[p];
      d[1] = s1[p];
      d[2] = s2[p];
      d[3] = s3[p];
    }
  }
#endif
  for (; r < rows; ++r) {
    const float* sr = src + r * ld;
    for (index_t p = 0; p < kc; ++p) dst[p * W + r] = sr[p];
  }
  if (rows < W)
    for (index_t p = 0; p < kc; ++p)
      for (index_t q = rows; q < W; ++q) dst[p * W + q] = 0.f;
}

#if FLOWDIFF_SGEMM_X86
/// pack_rows' whole groups with 256-bit moves (the baseline build copies a row's W floats with
/// 16-byte moves: an eighth of a thin product's time went to packing B that way). Called only by
/// the AVX2 and AVX-512 kernels' packing.
template <index_t W, index_t G>
__attribute__((target("avx2"))) inline void pack_rows_avx(const float* src, index_t ld,
                                                          index_t whole, index_t kc,
                                                          float* dst) {
  static_assert(W % 8 == 0);
  constexpr index_t ahead = 8;  // rows of prefetch distance
  for (index_t x = 0; x < whole; x += G * W, dst += G * W * kc) {
    const float* sp = src + x;
    for (index_t p = 0; p < kc; ++p, sp += ld) {
      if (p + ahead < kc)  // every line of the row (W = 32: two)
        for (index_t q = 0; q < G * W; q += 16) __builtin_prefetch(sp + ahead * ld + q);
      for (index_t g = 0; g < G; ++g)
        for (index_t q = 0; q < W; q += 8)
          _mm256_storeu_ps(dst + g * W * kc + p * W + q, _mm256_loadu_ps(sp + g * W + q));
    }
  }
}
#endif

/// Row-wise copy into consecutive micro-panels: for p < kc, src[p ld + x] for x < len goes to
/// panel x / W (each W kc long), lane x % W; lanes beyond len zero. Panel by panel, so the writes
/// run front to back through one panel at a time: row by row would write W floats into every
/// panel in turn, and the panels lie W kc floats apart (8 KB for W = 8, kc = 256), so all their
/// write streams fall into one L1 set (4K aliasing) and stall. The W-float runs are fixed-size
/// copies (vector moves; the element loop does not vectorise because src and dst may alias).
template <index_t W>
inline void pack_rows(const float* src, index_t ld, index_t len, index_t kc, float* dst) {
  // Panels go in pairs when two of them make one 64-byte line (W = 8), so every source line is
  // fetched once; the rows are far apart (often a page: the hardware prefetchers do not follow),
  // so the next ones are prefetched, every line of them.
  constexpr index_t G = W * sizeof(float) < 64 ? 64 / (W * sizeof(float)) : 1;
  constexpr index_t ahead = 8;  // rows of prefetch distance
  const index_t whole = len / (G * W) * (G * W);
  index_t x = 0;
#if FLOWDIFF_SGEMM_X86
  if constexpr (W % 8 == 0) {
    pack_rows_avx<W, G>(src, ld, whole, kc, dst);
    x = whole;
    dst += whole * kc;
  }
#endif
  for (; x < whole; x += G * W, dst += G * W * kc) {
    const float* sp = src + x;
    for (index_t p = 0; p < kc; ++p, sp += ld) {
      if (p + ahead < kc)  // every line of the row (W = 32: two)
        for (index_t q = 0; q < G * W; q += 16) __builtin_prefetch(sp + ahead * ld + q);
      for (index_t g = 0; g < G; ++g)
        std::memcpy(dst + g * W * kc + p * W, sp + g * W, W * sizeof(float));
    }
  }
  for (; x + W <= len; x += W, dst += W * kc) {
    const float* sp = src + x;
    for (index_t p = 0; p < kc; ++p, sp += ld) std::memcpy(dst + p * W, sp, W * sizeof(float));
  }
  if (x < len) {
    const index_t r = len - x;
    const float* sp = src + x;
    for (index_t p = 0; p < kc; ++p, sp += ld) {
      float* d = dst + p * W;
      for (index_t c = 0; c < r; ++c) d[c] = sp[c];
      for (index_t c = r; c < W; ++c) d[c] = 0.f;
    }
  }
}

/// op(A)[i0 : i0 + mc, p0 : p0 + kc] into its MR-row micro-panels (panel r at dst + r kc).
/// With an APacker: its plain rows (row r at dst + r kc), the rows up to the next multiple of MR
/// zero (a partial tile's kernel reads them; its extra rows are never stored).
/// ROWS (the kernel broadcasts from MR plain rows): a stored row-major A (not transposed) is
/// copied row by row, with no transposes.
template <index_t MR, bool ROWS = false>
inline void pack_a(const Problem& o, index_t i0, index_t mc, index_t p0, index_t kc, float* dst) {
  if constexpr (ROWS) {
    if (o.apack) {
      o.apack->pack(o.apack->ctx, o.arow0 + i0, mc, p0, kc, dst);
    } else {
      const float* src = o.a + i0 * o.lda + p0;
      for (index_t r = 0; r < mc; ++r) {  // fixed-size chunks: inline moves, no memcpy calls
        const float* sr = src + r * o.lda;
        float* dr = dst + r * kc;
        index_t p = 0;
        for (; p + 16 <= kc; p += 16) std::memcpy(dr + p, sr + p, 16 * sizeof(float));
        for (; p < kc; ++p) dr[p] = sr[p];
      }
    }
    const index_t padded = (mc + MR - 1) / MR * MR;
    if (padded > mc) std::memset(dst + mc * kc, 0, sizeof(float) * std::size_t((padded - mc) * kc));
    return;
  }
  if (o.ta) {  // rows of op(A) are columns of the stored A: contiguous along i
    pack_rows<MR>(o.a + p0 * o.lda + i0, o.lda, mc, kc, dst);
  } else {
    for (index_t ir = 0; ir < mc; ir += MR)
      pack_transposed<MR>(o.a + (i0 + ir) * o.lda + p0, o.lda, std::min(MR, mc - ir), kc,
                          dst + ir * kc);
  }
}

/// op(B)[p0 : p0 + kc, j0 : j0 + nc] into its NR-column micro-panels (panel c at dst + c kc).
template <index_t NR>
inline void pack_b(const Problem& o, index_t p0, index_t kc, index_t j0, index_t nc, float* dst) {
  if constexpr (NR == BPacker::panel) {
    if (o.bpack) {
      o.bpack->pack(o.bpack->ctx, p0, kc, o.bcol0 + j0, nc, dst);
      return;
    }
  }
  if (!o.tb) {  // rows of op(B) contiguous along j
    pack_rows<NR>(o.b + p0 * o.ldb + j0, o.ldb, nc, kc, dst);
  } else if (o.bblock == 0) {  // op(B)(p, j) = B[j, p]: a panel's columns are rows of B
    for (index_t jr = 0; jr < nc; jr += NR)
      pack_transposed<NR>(o.b + (j0 + jr) * o.ldb + p0, o.ldb, std::min(NR, nc - jr), kc,
                          dst + jr * kc);
  } else {  // the same, one stretch of p within a block at a time
    for (index_t jr = 0; jr < nc; jr += NR)
      for (index_t p = p0; p < p0 + kc;) {
        const index_t end = std::min(p0 + kc, (p / o.bblock + 1) * o.bblock);
        pack_transposed<NR>(o.b + p / o.bblock * o.bstride + (j0 + jr) * o.ldb + p % o.bblock,
                            o.ldb, std::min(NR, nc - jr), end - p, dst + jr * kc + (p - p0) * NR);
        p = end;
      }
  }
}

/// The sub-product of columns [j0, j1) or rows [i0, i1) of C.
inline Problem columns_of(const Problem& o, index_t j0, index_t j1) {
  Problem s = o;
  s.n = j1 - j0;
  if (o.bpack)
    s.bcol0 = o.bcol0 + j0;
  else
    s.b = o.tb ? o.b + j0 * o.ldb : o.b + j0;
  if (o.cblock != 0)
    s.cj0 = o.cj0 + j0;
  else
    s.c = o.c + j0;
  s.col0 = o.col0 + j0;
  return s;
}
inline Problem rows_of(const Problem& o, index_t i0, index_t i1) {
  Problem s = o;
  s.m = i1 - i0;
  if (o.apack)
    s.arow0 = o.arow0 + i0;
  else
    s.a = o.ta ? o.a + i0 : o.a + i0 * o.lda;
  s.c = o.c + i0 * o.ldc;
  s.row0 = o.row0 + i0;
  return s;
}

/// Calls f(sub-problem) for T parts of C cut along its longer side at multiples of `unit_n`
/// columns or `unit_m` rows (so every element keeps its tile and its summation), one per OpenMP
/// thread; or f(o) once on the calling thread.
template <class F>
inline void split_over_threads(const Problem& o, bool parallel, index_t unit_m, index_t unit_n,
                               F&& f) {
#if defined(_OPENMP)
  if (parallel) {
    const bool by_cols = o.n >= o.m;
    const index_t len = by_cols ? o.n : o.m, unit = by_cols ? unit_n : unit_m;
    const index_t units = (len + unit - 1) / unit;
    const int team = static_cast<int>(std::min<index_t>(omp_get_max_threads(), units));
    if (team > 1) {
      std::exception_ptr error;  // an exception (bad_alloc) must not leave the region
#pragma omp parallel num_threads(team)
      {
        const index_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const index_t lo = std::min(len, units * t / T * unit);
        const index_t hi = std::min(len, units * (t + 1) / T * unit);
        try {
          if (hi > lo) f(by_cols ? columns_of(o, lo, hi) : rows_of(o, lo, hi));
        } catch (...) {
#pragma omp critical(flowdiff_sgemm_error)
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      return;
    }
  }
#else
  (void)parallel;
  (void)unit_m;
  (void)unit_n;
#endif
  f(o);
}

#if FLOWDIFF_SGEMM_X86

// ---- micro-kernels: acc = A_panel * B_panel over kc; C = alpha acc (+ C unless overwrite) ----

__attribute__((target("avx512f"))) inline void store_avx512(float* row, __m512 x0, __m512 x1,
                                                            __m512 al, bool overwrite) {
  if (overwrite) {
    _mm512_storeu_ps(row, _mm512_mul_ps(al, x0));
    _mm512_storeu_ps(row + 16, _mm512_mul_ps(al, x1));
  } else {
    _mm512_storeu_ps(row, _mm512_fmadd_ps(al, x0, _mm512_loadu_ps(row)));
    _mm512_storeu_ps(row + 16, _mm512_fmadd_ps(al, x1, _mm512_loadu_ps(row + 16)));
  }
}

__attribute__((target("avx2,fma"))) inline void store_avx2(float* row, __m256 x0, __m256 x1,
                                                           __m256 al, bool overwrite) {
  if (overwrite) {
    _mm256_storeu_ps(row, _mm256_mul_ps(al, x0));
    _mm256_storeu_ps(row + 8, _mm256_mul_ps(al, x1));
  } else {
    _mm256_storeu_ps(row, _mm256_fmadd_ps(al, x0, _mm256_loadu_ps(row)));
    _mm256_storeu_ps(row + 8, _mm256_fmadd_ps(al, x1, _mm256_loadu_ps(row + 8)));
  }
}

/// MR x 32 tile: MR broadcasts of A against two vectors of B per k, 2 MR zmm accumulators. A's
/// panel holds AS >= MR rows per k (AS > MR: the first MR rows of a wider panel, the same bits
/// as those rows of a whole tile).
template <int MR, int AS = MR>
__attribute__((target("avx512f"))) inline void micro_avx512(index_t kc, const float* ap,
                                                            const float* bp, float* c, index_t ldc,
                                                            float alpha, bool overwrite) {
  __m512 acc0[MR], acc1[MR];
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) {  // C's tile arrives while the sums run
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 31), _MM_HINT_T0);
  }
  for (index_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
FLOWDIFF_SGEMM_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ap[r]);
      acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);
    }
    ap += AS;
    bp += 32;
  }
  const __m512 al = _mm512_set1_ps(alpha);
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) store_avx512(c + r * ldc, acc0[r], acc1[r], al, overwrite);
}

/// micro_avx512 with A as MR plain rows kc apart (an APacker's layout) instead of one
/// interleaved panel: the same FMAs in the same order, so the same bits.
template <int MR>
__attribute__((target("avx512f"))) inline void micro_avx512_rows(index_t kc, const float* ap,
                                                                 const float* bp, float* c,
                                                                 index_t ldc, float alpha,
                                                                 bool overwrite) {
  __m512 acc0[MR], acc1[MR];
  const float* a[MR];
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
    a[r] = ap + r * kc;
  }
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 31), _MM_HINT_T0);
  }
  for (index_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
FLOWDIFF_SGEMM_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r][p]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
    bp += 32;
  }
  const __m512 al = _mm512_set1_ps(alpha);
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < MR; ++r) store_avx512(c + r * ldc, acc0[r], acc1[r], al, overwrite);
}

__attribute__((target("avx2,fma"))) inline void micro_avx2(index_t kc, const float* ap,
                                                           const float* bp, float* c, index_t ldc,
                                                           float alpha, bool overwrite) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (index_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
    __m256 a = _mm256_broadcast_ss(ap);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    ap += 6;
    bp += 16;
  }
  const __m256 al = _mm256_set1_ps(alpha);
  store_avx2(c, c00, c01, al, overwrite);
  store_avx2(c + ldc, c10, c11, al, overwrite);
  store_avx2(c + 2 * ldc, c20, c21, al, overwrite);
  store_avx2(c + 3 * ldc, c30, c31, al, overwrite);
  store_avx2(c + 4 * ldc, c40, c41, al, overwrite);
  store_avx2(c + 5 * ldc, c50, c51, al, overwrite);
}

/// The first R < 6 rows of micro_avx2's tile, stored in place: the same FMAs per element in the
/// same order (the same bits as those rows of a whole tile), without the other rows' FMAs and
/// without tile()'s copy through a buffer. 6 does not divide the channel counts of convolutions
/// (32, 64, 128), so the last row tile of each of their products is one of these.
template <int R>
__attribute__((target("avx2,fma"))) inline void micro_avx2_part(index_t kc, const float* ap,
                                                                const float* bp, float* c,
                                                                index_t ldc, float alpha,
                                                                bool overwrite) {
  static_assert(R >= 1 && R < 6);
  __m256 acc[R][2];
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (index_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
FLOWDIFF_SGEMM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(ap + r);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
    ap += 6;  // the packed panel's stride stays MR
    bp += 16;
  }
  const __m256 al = _mm256_set1_ps(alpha);
FLOWDIFF_SGEMM_UNROLL
  for (int r = 0; r < R; ++r) store_avx2(c + r * ldc, acc[r][0], acc[r][1], al, overwrite);
}

/// f(std::integral_constant<int, mr>{}) for a row count mr in [1, MR).
template <int MR, class F>
inline void with_rows(index_t mr, F&& f) {
  [&]<int... R>(std::integer_sequence<int, R...>) {
    (void)((mr == R + 1 ? (f(std::integral_constant<int, R + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

struct Avx512 {
  static constexpr index_t MR = 8, NR = 32, KC = 256, MC = 128, NC = 2048;
  static void micro(index_t kc, const float* ap, const float* bp, float* c, index_t ldc,
                    float alpha, bool overwrite) {
    micro_avx512<MR>(kc, ap, bp, c, ldc, alpha, overwrite);
  }
  static constexpr bool has_rows = true;  // takes an APacker
  static void micro_rows(index_t kc, const float* ap, const float* bp, float* c, index_t ldc,
                         float alpha, bool overwrite) {
    micro_avx512_rows<MR>(kc, ap, bp, c, ldc, alpha, overwrite);
  }
  /// A tile of mr < MR valid rows and all NR columns, in place (ROWS: A as plain rows).
  template <bool ROWS>
  static void micro_part(index_t mr, index_t kc, const float* ap, const float* bp, float* c,
                         index_t ldc, float alpha, bool overwrite) {
    with_rows<MR>(mr, [&](auto r) {
      if constexpr (ROWS)
        micro_avx512_rows<decltype(r)::value>(kc, ap, bp, c, ldc, alpha, overwrite);
      else
        micro_avx512<decltype(r)::value, MR>(kc, ap, bp, c, ldc, alpha, overwrite);
    });
  }
};

struct Avx2 {
  static constexpr index_t MR = 6, NR = 16, KC = 256, MC = 144, NC = 1024;
  static void micro(index_t kc, const float* ap, const float* bp, float* c, index_t ldc,
                    float alpha, bool overwrite) {
    micro_avx2(kc, ap, bp, c, ldc, alpha, overwrite);
  }
  static constexpr bool has_rows = false;
  /// A tile of mr < MR valid rows and all NR columns, in place (micro_avx2_part).
  template <bool ROWS>
  static void micro_part(index_t mr, index_t kc, const float* ap, const float* bp, float* c,
                         index_t ldc, float alpha, bool overwrite) {
    static_assert(!ROWS, "the AVX2 kernel takes packed panels only");
    with_rows<MR>(mr, [&](auto r) {
      micro_avx2_part<decltype(r)::value>(kc, ap, bp, c, ldc, alpha, overwrite);
    });
  }
};

/// One MR x NR tile of C (rows i, columns j; mr x nr of it valid) from packed panels (ROWS: A as
/// plain rows, an APacker's layout).
template <class K, bool ROWS>
inline void tile(const Problem& o, index_t kc, const float* ap, const float* bp, index_t i,
                 index_t j, index_t mr, index_t nr, bool overwrite) {
  float* c = o.c_at(i, j);
  auto micro = [&](float* dst, index_t ld, bool ow) {
    if constexpr (ROWS)
      K::micro_rows(kc, ap, bp, dst, ld, o.alpha, ow);
    else
      K::micro(kc, ap, bp, dst, ld, o.alpha, ow);
  };
  if (mr == K::MR && nr == K::NR) {
    micro(c, o.ldc, overwrite);
    return;
  }
  if (nr == K::NR) {  // a row tile's last rows: in place, without the missing rows' FMAs
    K::template micro_part<ROWS>(mr, kc, ap, bp, c, o.ldc, o.alpha, overwrite);
    return;
  }
  alignas(64) float t[K::MR * K::NR];
  micro(t, K::NR, true);
  for (index_t r = 0; r < mr; ++r) {
    float* cr = c + r * o.ldc;
    const float* tr = t + r * K::NR;
    if (overwrite) {
      for (index_t q = 0; q < nr; ++q) cr[q] = tr[q];
    } else {
      for (index_t q = 0; q < nr; ++q) cr[q] += tr[q];
    }
  }
}

/// The packed product on the calling thread (ROWS: op(A) from an APacker).
template <class K, bool ROWS>
void packed_serial_as(const Problem& o) {
  constexpr index_t MR = K::MR, NR = K::NR, MC = K::MC, NC = K::NC, KC = K::KC;
  const index_t kcb = std::min(KC, o.k);
  // B's panels in place (BPacker::panels; column bcol0 + j starts at + j k when j % NR = 0).
  const float* const pre = NR == BPacker::panel && o.bpack != nullptr ? o.bpack->panels : nullptr;
  // When A is one MC block, each packed B micro-panel is used once, right after its packing:
  // pack one panel at a time into a buffer that stays in L1, instead of the whole [KC, NC] block
  // (a megabyte for NC = 2048, written and read back through L2 or beyond: a thin product, 32
  // rows, ran at 56 % of peak for it).
  const bool by_panel = pre == nullptr && o.m <= MC;
  float* const bbuf =
      pre != nullptr
          ? nullptr
          : pack_buffer(0, kcb * (by_panel ? NR : std::min(NC, (o.n + NR - 1) / NR * NR)));
  float* const abuf = pack_buffer(1, kcb * std::min(MC, (o.m + MR - 1) / MR * MR));
  for (index_t jc = 0; jc < o.n; jc += NC) {
    const index_t nc = std::min(NC, o.n - jc);
    for (index_t pc = 0; pc < o.k; pc += KC) {
      const index_t kc = std::min(KC, o.k - pc);
      const bool overwrite = o.beta == 0.f && pc == 0;
      if (pre == nullptr && !by_panel) pack_b<NR>(o, pc, kc, jc, nc, bbuf);
      for (index_t ic = 0; ic < o.m; ic += MC) {
        const index_t mc = std::min(MC, o.m - ic);
        // Plain rows of a stored A whose rows are kc long are already in place (whole tiles
        // only: a partial one reads MR rows).
        const bool in_place = ROWS && o.apack == nullptr && !o.ta && o.lda == kc && mc % MR == 0;
        if (!in_place) pack_a<MR, ROWS>(o, ic, mc, pc, kc, abuf);
        const float* const ablk = in_place ? o.a + ic * o.lda : abuf;
        for (index_t jr = 0; jr < nc; jr += NR) {
          const index_t nr = std::min(NR, nc - jr);
          if (by_panel) pack_b<NR>(o, pc, kc, jc + jr, nr, bbuf);
          const float* bp = pre != nullptr ? pre + (o.bcol0 + jc + jr) * o.k + pc * NR
                            : by_panel     ? bbuf
                                           : bbuf + jr * kc;
          for (index_t ir = 0; ir < mc; ir += MR)
            tile<K, ROWS>(o, kc, ablk + ir * kc, bp, ic + ir, jc + jr, std::min(MR, mc - ir), nr,
                          overwrite);
        }
        if (pc + kc == o.k) o.finish(ic, ic + mc, jc, jc + nc);  // the block is final
      }
    }
  }
}

/// A kernel that takes plain rows of A runs them for an APacker and for a stored row-major A,
/// whose micro-panels would otherwise need a transposing pack (the same bits either way).
template <class K>
void packed_serial(const Problem& o) {
  if constexpr (K::has_rows) {
    if (o.apack || !o.ta) {
      packed_serial_as<K, true>(o);
      return;
    }
  }
  packed_serial_as<K, false>(o);
}

/// The packed product, cut over the OpenMP threads when `parallel` (no shared buffers and no
/// barriers: each thread packs and multiplies its own part of C).
template <class K>
void packed(const Problem& o, bool parallel) {
  split_over_threads(o, parallel, K::MR, K::NR, [](const Problem& s) { packed_serial<K>(s); });
}

// ---- unpacked products for m <= 4 or n <= 4 (matrix-vector shapes) ----

/// 16 vectors -> one vector of their 16 horizontal sums, lane 4 e + l = sum(v[4 l + e]) (a
/// transposing tree: 256-bit halves, then 128-bit quarters across pairs, then within 128-bit
/// lanes twice; the all-lanes maskz forms because g++ 12's plain ones trip -Wuninitialized inside
/// its own header). Shared by dot16_avx512 and dots_avx512.
__attribute__((target("avx512f"))) inline __m512 reduce16_avx512(const __m512* v) {
  const __mmask16 all = 0xFFFF;
  __m512 x[8], z[4], q[2];
FLOWDIFF_SGEMM_UNROLL
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_maskz_shuffle_f32x4(all, v[2 * i], v[2 * i + 1], 0xEE));
FLOWDIFF_SGEMM_UNROLL
  for (int j = 0; j < 4; ++j)
    z[j] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, x[2 * j], x[2 * j + 1], 0x88),
                         _mm512_maskz_shuffle_f32x4(all, x[2 * j], x[2 * j + 1], 0xDD));
FLOWDIFF_SGEMM_UNROLL
  for (int j = 0; j < 2; ++j)
    q[j] = _mm512_add_ps(_mm512_maskz_shuffle_ps(all, z[2 * j], z[2 * j + 1], 0x44),
                         _mm512_maskz_shuffle_ps(all, z[2 * j], z[2 * j + 1], 0xEE));
  return _mm512_add_ps(_mm512_maskz_shuffle_ps(all, q[0], q[1], 0x88),
                       _mm512_maskz_shuffle_ps(all, q[0], q[1], 0xDD));
}

/// out[q] = <x, w[q]> over k for q < 8: eight independent accumulators share the loads of x.
__attribute__((target("avx512f"))) inline void dot8_avx512(const float* x, const float* const* w,
                                                           index_t k, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  index_t p = 0;
  for (; p + 16 <= k; p += 16) {
    const __m512 xv = _mm512_loadu_ps(x + p);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w[0] + p), xv, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w[1] + p), xv, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w[2] + p), xv, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w[3] + p), xv, a3);
    a4 = _mm512_fmadd_ps(_mm512_loadu_ps(w[4] + p), xv, a4);
    a5 = _mm512_fmadd_ps(_mm512_loadu_ps(w[5] + p), xv, a5);
    a6 = _mm512_fmadd_ps(_mm512_loadu_ps(w[6] + p), xv, a6);
    a7 = _mm512_fmadd_ps(_mm512_loadu_ps(w[7] + p), xv, a7);
  }
  if (p < k) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (k - p)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(mk, x + p);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[0] + p), xv, a0);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[1] + p), xv, a1);
    a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[2] + p), xv, a2);
    a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[3] + p), xv, a3);
    a4 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[4] + p), xv, a4);
    a5 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[5] + p), xv, a5);
    a6 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[6] + p), xv, a6);
    a7 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w[7] + p), xv, a7);
  }
  // 16 -> 8 lanes through memory (g++ 12's zmm narrowing casts trip -Wuninitialized in its own
  // headers), then the usual 8 x 8 horizontal-add reduction in ymm.
  alignas(64) float t[8 * 16];
  _mm512_store_ps(t, a0);
  _mm512_store_ps(t + 16, a1);
  _mm512_store_ps(t + 32, a2);
  _mm512_store_ps(t + 48, a3);
  _mm512_store_ps(t + 64, a4);
  _mm512_store_ps(t + 80, a5);
  _mm512_store_ps(t + 96, a6);
  _mm512_store_ps(t + 112, a7);
  __m256 v[8];
  for (int q = 0; q < 8; ++q)
    v[q] = _mm256_add_ps(_mm256_load_ps(t + 16 * q), _mm256_load_ps(t + 16 * q + 8));
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                      _mm256_permute2f128_ps(s0123, s4567, 0x31)));
}

/// out[q] = <x, w + q ld> over k for q < 16, four rows at a time: each step loads two vectors of
/// x and two of each of the four rows (128 bytes per row, 512 per step) into two accumulators per
/// row, the even and the odd 16-float vectors of k (vector p / 16 goes to accumulator (p / 16) %
/// 2, in order of p; the masked tail to the one its index picks). A row's vector is its two
/// accumulators added, and the sixteen rows' vectors are reduced in registers by
/// reduce16_avx512's transposing tree, which leaves lane 4 b + e holding the sum of vector
/// 4 e + b, so row 4 b + e goes to vector 4 e + b. Every row's arithmetic is its own, the same for
/// any grouping of rows (a thread split at multiples of 16 keeps the bits).
/// Measured on a Xeon (Emerald Rapids), a batch-1 Linear's weights in L2: one row at a time (one
/// chain per row, a software prefetch 1 KB ahead: this kernel before) streamed them at 90 GB/s,
/// sixteen interleaved rows with one accumulator each at 146, four rows with two accumulators
/// each at 172 (two rows: 111; software prefetching: slower). In the batch-1 MLP, splitting each
/// row into two halves of k with two accumulators each (so a thread could start on the half of x
/// it wrote itself) was slower still, in one loop or two: 7.7 against 7.05 us on one thread.
__attribute__((target("avx512f"))) inline void dot16_avx512(const float* x, const float* w,
                                                            index_t ld, index_t k, float* out) {
  __m512 v[16];
  const index_t kv = k & ~index_t{15}, kv2 = k & ~index_t{31};
  const __mmask16 mk = static_cast<__mmask16>((1u << (k - kv)) - 1u);
FLOWDIFF_SGEMM_UNROLL
  for (int g = 0; g < 4; ++g) {
    const float* r0 = w + 4 * g * ld;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    __m512 e0 = _mm512_setzero_ps(), e1 = e0, e2 = e0, e3 = e0;  // the rows' even vectors of k
    __m512 o0 = e0, o1 = e0, o2 = e0, o3 = e0;                    // and odd ones
    for (index_t p = 0; p < kv2; p += 32) {
      const __m512 xe = _mm512_loadu_ps(x + p), xo = _mm512_loadu_ps(x + p + 16);
      e0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + p), xe, e0);
      e1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + p), xe, e1);
      e2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + p), xe, e2);
      e3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + p), xe, e3);
      o0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + p + 16), xo, o0);
      o1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + p + 16), xo, o1);
      o2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + p + 16), xo, o2);
      o3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + p + 16), xo, o3);
    }
    if (kv2 < kv) {  // one more whole vector: an even one
      const __m512 xe = _mm512_loadu_ps(x + kv2);
      e0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + kv2), xe, e0);
      e1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + kv2), xe, e1);
      e2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + kv2), xe, e2);
      e3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + kv2), xe, e3);
    }
    if (kv < k) {  // the masked tail: vector kv / 16, odd after an extra even one
      const __m512 xt = _mm512_maskz_loadu_ps(mk, x + kv);
      if (kv2 < kv) {
        o0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r0 + kv), xt, o0);
        o1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r1 + kv), xt, o1);
        o2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r2 + kv), xt, o2);
        o3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r3 + kv), xt, o3);
      } else {
        e0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r0 + kv), xt, e0);
        e1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r1 + kv), xt, e1);
        e2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r2 + kv), xt, e2);
        e3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, r3 + kv), xt, e3);
      }
    }
    // row 4 g + j: vector 4 j + g
    v[g] = _mm512_add_ps(e0, o0);
    v[4 + g] = _mm512_add_ps(e1, o1);
    v[8 + g] = _mm512_add_ps(e2, o2);
    v[12 + g] = _mm512_add_ps(e3, o3);
  }
  _mm512_storeu_ps(out, reduce16_avx512(v));
}

__attribute__((target("avx2,fma"))) inline void dot8_avx2(const float* x, const float* const* w,
                                                          index_t k, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  index_t p = 0;
  for (; p + 8 <= k; p += 8) {
    const __m256 xv = _mm256_loadu_ps(x + p);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w[0] + p), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w[1] + p), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w[2] + p), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w[3] + p), xv, a3);
    a4 = _mm256_fmadd_ps(_mm256_loadu_ps(w[4] + p), xv, a4);
    a5 = _mm256_fmadd_ps(_mm256_loadu_ps(w[5] + p), xv, a5);
    a6 = _mm256_fmadd_ps(_mm256_loadu_ps(w[6] + p), xv, a6);
    a7 = _mm256_fmadd_ps(_mm256_loadu_ps(w[7] + p), xv, a7);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                      _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  for (; p < k; ++p)
    for (int q = 0; q < 8; ++q) out[q] += w[q][p] * x[p];
}

/// acc[0:n] = sum_p a[p * as] * B[p, 0:n] (B rows ldb apart), 64 columns at a time in registers.
__attribute__((target("avx512f"))) inline void rows_avx512(const float* a, index_t as,
                                                           const float* b, index_t ldb, index_t k,
                                                           index_t n, float* acc) {
  index_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (index_t p = 0; p < k; ++p) {
      const __m512 av = _mm512_set1_ps(a[p * as]);
      const float* bp = b + p * ldb + j;
      c0 = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp), c0);
      c1 = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp + 16), c1);
      c2 = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp + 32), c2);
      c3 = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp + 48), c3);
    }
    _mm512_storeu_ps(acc + j, c0);
    _mm512_storeu_ps(acc + j + 16, c1);
    _mm512_storeu_ps(acc + j + 32, c2);
    _mm512_storeu_ps(acc + j + 48, c3);
  }
  for (; j < n; j += 16) {
    const __mmask16 mk =
        n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 c0 = _mm512_setzero_ps();
    for (index_t p = 0; p < k; ++p)
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(a[p * as]), _mm512_maskz_loadu_ps(mk, b + p * ldb + j),
                           c0);
    _mm512_mask_storeu_ps(acc + j, mk, c0);
  }
}

__attribute__((target("avx2,fma"))) inline void rows_avx2(const float* a, index_t as,
                                                          const float* b, index_t ldb, index_t k,
                                                          index_t n, float* acc) {
  index_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (index_t p = 0; p < k; ++p) {
      const __m256 av = _mm256_set1_ps(a[p * as]);
      const float* bp = b + p * ldb + j;
      c0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(bp), c0);
      c1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(bp + 8), c1);
      c2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(bp + 16), c2);
      c3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(bp + 24), c3);
    }
    _mm256_storeu_ps(acc + j, c0);
    _mm256_storeu_ps(acc + j + 8, c1);
    _mm256_storeu_ps(acc + j + 16, c2);
    _mm256_storeu_ps(acc + j + 24, c3);
  }
  for (; j < n; ++j) {  // fused multiply-adds as in the vectors (a column's bits do not depend
    // on where it lies; a plain c += a b is not contracted under ISO C++'s -std=c++20)
    __m128 c = _mm_setzero_ps();
    for (index_t p = 0; p < k; ++p)
      c = _mm_fmadd_ss(_mm_set_ss(a[p * as]), _mm_set_ss(b[p * ldb + j]), c);
    acc[j] = _mm_cvtss_f32(c);
  }
}

/// C = alpha op(A) op(B) + beta C for m <= 4 or n <= 4, without packing.
template <Isa I>
void thin(const Problem& o, bool parallel) {
  // alpha and beta by value: read through `o` they were reloaded (and beta compared) for every
  // element, as a store to C might change them (a sixth of a batch-1 MLP forward).
  const float alpha = o.alpha;
  const bool overwrite = o.beta == 0.f;  // beta is 0 or 1 here
  auto finish = [alpha, overwrite](float* c, float v) {
    *c = overwrite ? alpha * v : alpha * v + *c;
  };
  const bool small_m = o.m <= 4;
  if (small_m && !o.tb) {
    // Row updates: C[i, :] = alpha sum_p A(i, p) B[p, :] (+ C[i, :]), columns in registers.
    Scratch acc(o.n);
    for (index_t i = 0; i < o.m; ++i) {
      const float* ai = o.ta ? o.a + i : o.a + i * o.lda;
      const index_t as = o.ta ? o.lda : 1;
      if constexpr (I == Isa::avx512)
        rows_avx512(ai, as, o.b, o.ldb, o.k, o.n, acc.p);
      else
        rows_avx2(ai, as, o.b, o.ldb, o.k, o.n, acc.p);
      float* ci = o.c + i * o.ldc;
      for (index_t j = 0; j < o.n; ++j) finish(ci + j, acc.p[j]);
    }
    o.finish(0, o.m, 0, o.n);
    return;
  }
  // Dot products of contiguous rows of op(A) with contiguous columns of op(B), sixteen (AVX-512)
  // or eight at a time along the long side; the thin side is gathered when not contiguous.
  const bool gather_a = o.ta, gather_b = !o.tb;
  Scratch ga(gather_a ? o.m * o.k : 0), gb(gather_b ? o.n * o.k : 0);
  if (gather_a)
    for (index_t i = 0; i < o.m; ++i)
      for (index_t p = 0; p < o.k; ++p) ga.p[i * o.k + p] = o.A(i, p);
  if (gather_b)
    for (index_t j = 0; j < o.n; ++j)
      for (index_t p = 0; p < o.k; ++p) gb.p[j * o.k + p] = o.B(p, j);
  const float* abase = gather_a ? ga.p : o.a;
  const float* bbase = gather_b ? gb.p : o.b;
  const index_t astride = gather_a ? o.k : o.lda, bstride = gather_b ? o.k : o.ldb;
  // Vector v (a row of A or a column of B) against rows [q0, q1) of the other side.
  auto sweep = [&](const float* v, const float* base, index_t stride, index_t q0, index_t q1,
                   float* c, index_t cstride) {
    index_t q = q0;
    if constexpr (I == Isa::avx512) {
      for (; q + 16 <= q1; q += 16) {
        float* cq = c + q * cstride;
        if (cstride == 1 && overwrite && alpha == 1.f) {  // straight into C (1 v = v)
          dot16_avx512(v, base + q * stride, stride, o.k, cq);
          continue;
        }
        float out[16];
        dot16_avx512(v, base + q * stride, stride, o.k, out);
        if (cstride == 1 && overwrite) {
          for (index_t r = 0; r < 16; ++r) cq[r] = alpha * out[r];
        } else {
          for (index_t r = 0; r < 16; ++r) finish(cq + r * cstride, out[r]);
        }
      }
    }
    for (; q < q1; q += 8) {
      const index_t cnt = std::min<index_t>(8, q1 - q);
      const float* w[8];
      for (index_t r = 0; r < 8; ++r) w[r] = base + (q + (r < cnt ? r : 0)) * stride;
      float out[8];
      if constexpr (I == Isa::avx512)
        dot8_avx512(v, w, o.k, out);
      else
        dot8_avx2(v, w, o.k, out);
      for (index_t r = 0; r < cnt; ++r) finish(c + (q + r) * cstride, out[r]);
    }
  };
  auto part = [&](index_t lo, index_t hi) {
    if (small_m) {  // each row of A against columns [lo, hi) of B
      for (index_t i = 0; i < o.m; ++i)
        sweep(abase + i * astride, bbase, bstride, lo, hi, o.c + i * o.ldc, 1);
      o.finish(0, o.m, lo, hi);
    } else {  // each column of B against rows [lo, hi) of A
      for (index_t j = 0; j < o.n; ++j)
        sweep(bbase + j * bstride, abase, astride, lo, hi, o.c + j, o.ldc);
      o.finish(lo, hi, 0, o.n);
    }
  };
  const index_t len = small_m ? o.n : o.m;
#if defined(_OPENMP)
  if (parallel) {
#pragma omp parallel
    {
      const index_t t = omp_get_thread_num(), T = omp_get_num_threads();
      // Parts at multiples of 16: the 16-row groups (AVX-512) are the same on any thread count.
      const index_t units = (len + 15) / 16;
      part(std::min(len, units * t / T * 16), std::min(len, units * (t + 1) / T * 16));
    }
    return;
  }
#else
  (void)parallel;
#endif
  part(0, len);
}

// ---- small batches against a weight matrix: C = A B^T for 2 <= m <= 16, A and B row-major ----

/// Rows per block of the small-batch kernel and the largest m it takes.
inline constexpr index_t small_rows = 4, small_m_max = 16;

/// C[r, c] (r < mr, c < nc of an R x C tile, R C = 16) = alpha <a_r, b_c> (+ C): 16 dot
/// products over k that share their loads (each row of A meets C rows of B per vector), then one
/// transposing reduction tree that leaves the tile row-major in one register. Rows r >= mr repeat
/// row 0 and columns c >= nc repeat column 0 (computed, not stored). Every element is one
/// accumulator over k in 16-float steps (the masked tail last) and the same reduction pattern, so
/// its bits do not depend on the tile's shape: 4 x 4 tiles for groups of four rows of A, 2 x 8
/// and 1 x 16 for a remainder of two rows or one (which 4 x 4 tiles computed twice or four times
/// over: a batch of 2, classifier-free guidance of one sample, took as long as a batch of 4).
template <int R, int C>
__attribute__((target("avx512f"))) inline void dots_avx512(const float* const* a,
                                                           const float* const* b, index_t k,
                                                           float* c, index_t ldc, index_t mr,
                                                           index_t nc, float alpha,
                                                           bool overwrite) {
  static_assert(R * C == 16, "one 16-lane reduction per tile");
  // Element (r, c) of the tile is lane L = C r + c of the reduction, which reduce16_avx512 takes
  // from vector 4 (L % 4) + L / 4.
  constexpr auto slot = [](int r, int cc) { return 4 * ((C * r + cc) % 4) + (C * r + cc) / 4; };
  __m512 v[16];
FLOWDIFF_SGEMM_UNROLL
  for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
  index_t p = 0;
  for (; p + 16 <= k; p += 16) {
    __m512 av[R];
FLOWDIFF_SGEMM_UNROLL
    for (int r = 0; r < R; ++r) av[r] = _mm512_loadu_ps(a[r] + p);
FLOWDIFF_SGEMM_UNROLL
    for (int cc = 0; cc < C; ++cc) {
      __m512 w = _mm512_loadu_ps(b[cc] + p);
      // In a register: g++ otherwise folds the load into each of the R FMAs as a memory operand,
      // loading the vector R times (2 x 8 tiles ran at 63 instead of 84 GB/s from L2). 4 x 4
      // tiles load it into a register by themselves, and run 2-3 % slower with the barrier.
      if constexpr (R == 2) asm("" : "+v"(w));
FLOWDIFF_SGEMM_UNROLL
      for (int r = 0; r < R; ++r) v[slot(r, cc)] = _mm512_fmadd_ps(av[r], w, v[slot(r, cc)]);
    }
  }
  if (p < k) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (k - p)) - 1u);
    __m512 av[R];
FLOWDIFF_SGEMM_UNROLL
    for (int r = 0; r < R; ++r) av[r] = _mm512_maskz_loadu_ps(mk, a[r] + p);
FLOWDIFF_SGEMM_UNROLL
    for (int cc = 0; cc < C; ++cc) {
      const __m512 w = _mm512_maskz_loadu_ps(mk, b[cc] + p);
FLOWDIFF_SGEMM_UNROLL
      for (int r = 0; r < R; ++r) v[slot(r, cc)] = _mm512_fmadd_ps(av[r], w, v[slot(r, cc)]);
    }
  }
  const __m512 sums = _mm512_mul_ps(reduce16_avx512(v), _mm512_set1_ps(alpha));
  alignas(64) float t[16];
  _mm512_store_ps(t, sums);
  for (index_t r = 0; r < mr; ++r) {
    float* cr = c + r * ldc;
    if constexpr (C == 4) {
      if (nc == 4) {  // a whole row of the tile: one 128-bit store (the loop became a memmove call)
        __m128 row = _mm_load_ps(t + 4 * r);
        if (!overwrite) row = _mm_add_ps(_mm_loadu_ps(cr), row);
        _mm_storeu_ps(cr, row);
        continue;
      }
    } else {
      if (nc == C) {  // a whole row: 256 or 512 bits
        if constexpr (C == 8) {
          __m256 row = _mm256_load_ps(t + 8 * r);
          if (!overwrite) row = _mm256_add_ps(_mm256_loadu_ps(cr), row);
          _mm256_storeu_ps(cr, row);
        } else {
          __m512 row = _mm512_load_ps(t);
          if (!overwrite) row = _mm512_add_ps(_mm512_loadu_ps(cr), row);
          _mm512_storeu_ps(cr, row);
        }
        continue;
      }
    }
    for (index_t cc = 0; cc < nc; ++cc)
      cr[cc] = overwrite ? t[C * r + cc] : cr[cc] + t[C * r + cc];
  }
}

/// C = alpha A B^T (+ C) for 2 <= m <= small_m_max with A [m, k] and B [n, k] row-major (a
/// Linear layer's forward pass on a small batch, B its [out, in] weight): tiles of dot products
/// straight from A and B, with no packing, whose per-call cost matched the product's at these
/// sizes. Serial (such products are far below parallel_flops).
inline void small_batch_avx512(const Problem& o) {
  const bool overwrite = o.beta == 0.f;
  // Sixteen rows of B at a time: B (the weight, the large operand) comes from L2 once. Within
  // them, four rows at a time against every group of four rows of A (4 x 4 tiles, A and the four
  // rows of B in L1); then a remainder of three rows of A takes 4 x 4 tiles with a row repeated,
  // of two rows 2 x 8 tiles, of one row 1 x 16 tiles, over the sixteen rows of B still in L1.
  const index_t full = o.m / small_rows * small_rows, rest = o.m - full;
  auto tiles = [&]<int R, int C>(index_t i, index_t mr, index_t j0, index_t j1) {
    for (index_t j = j0; j < j1; j += C) {
      const index_t nc = std::min<index_t>(C, j1 - j);
      const float* a[R];
      const float* b[C];
      for (index_t r = 0; r < R; ++r) a[r] = o.a + (i + (r < mr ? r : 0)) * o.lda;
      for (index_t cc = 0; cc < C; ++cc) b[cc] = o.b + (j + (cc < nc ? cc : 0)) * o.ldb;
      dots_avx512<R, C>(a, b, o.k, o.c + i * o.ldc + j, o.ldc, mr, nc, o.alpha, overwrite);
    }
  };
  for (index_t j0 = 0; j0 < o.n; j0 += 16) {
    const index_t j1 = std::min<index_t>(j0 + 16, o.n);
    // (Written out rather than through `tiles`: batch 16 ran 2-4 % slower that way.)
    for (index_t j = j0; full > 0 && j < j1; j += 4) {
      const index_t nc = std::min<index_t>(4, j1 - j);
      const float* b[4];
      for (index_t cc = 0; cc < 4; ++cc) b[cc] = o.b + (j + (cc < nc ? cc : 0)) * o.ldb;
      for (index_t i = 0; i < full; i += small_rows) {
        const float* a[4];
        for (index_t r = 0; r < 4; ++r) a[r] = o.a + (i + r) * o.lda;
        dots_avx512<4, 4>(a, b, o.k, o.c + i * o.ldc + j, o.ldc, 4, nc, o.alpha, overwrite);
      }
    }
    if (rest == 3)
      tiles.template operator()<4, 4>(full, rest, j0, j1);
    else if (rest == 2)
      tiles.template operator()<2, 8>(full, rest, j0, j1);
    else if (rest == 1)
      tiles.template operator()<1, 16>(full, rest, j0, j1);
  }
  o.finish(0, o.m, 0, o.n);
}

#endif  // FLOWDIFF_SGEMM_X86

}  // namespace detail

/// C = alpha op(A) op(B) + beta C with the given kernel (Isa::none: returns false, nothing done).
/// beta == 0 overwrites C without reading it. Shapes are the caller's to check.
/// allow_threads = false keeps the product on the calling thread.
inline bool gemm(Isa isa, const Problem& o, bool allow_threads = true) {
#if FLOWDIFF_SGEMM_X86
  if (isa == Isa::none) return false;
  if ((o.bpack || o.apack) && (isa != Isa::avx512 || o.m <= 4 || o.n <= 4)) return false;
  static_assert(cblock_unit == detail::Avx512::NR, "a tile never crosses a block of C");
  if (o.cblock != 0 &&
      (isa != Isa::avx512 || o.cblock % cblock_unit != 0 || o.cj0 % cblock_unit != 0))
    return false;
  if (o.bblock != 0 && (isa != Isa::avx512 || !o.tb || o.bpack)) return false;
  if (o.m == 0 || o.n == 0) return true;
  if (o.k == 0 || o.alpha == 0.f) {
    for (index_t i = 0; i < o.m; ++i)
      for (index_t j = 0; j < o.n; ++j) {
        float& c = *o.c_at(i, j);
        c = o.beta == 0.f ? 0.f : o.beta * c;
      }
    o.finish(0, o.m, 0, o.n);
    return true;
  }
  if (o.beta != 0.f && o.beta != 1.f) {  // scale once; the kernels then accumulate
    for (index_t i = 0; i < o.m; ++i)
      for (index_t j = 0; j < o.n; ++j) *o.c_at(i, j) *= o.beta;
  }
  Problem p = o;
  if (p.beta != 0.f) p.beta = 1.f;
  bool parallel = false;
#if defined(_OPENMP)
  const double flops = 2.0 * double(o.m) * double(o.n) * double(o.k);
  parallel =
      allow_threads && flops >= parallel_flops && omp_get_max_threads() > 1 && !omp_in_parallel();
#else
  (void)allow_threads;
#endif
  const bool thin = o.m <= 4 || o.n <= 4;
  if (isa == Isa::avx512) {
    if (o.cblock != 0 || o.bblock != 0)  // (any shape: the packed kernel takes partial tiles)
      detail::packed<detail::Avx512>(p, parallel);
    else if (!o.ta && o.tb && o.m >= 2 && o.m <= detail::small_m_max && o.n >= 4 && !o.bpack &&
             !o.apack)
      detail::small_batch_avx512(p);
    else if (thin)
      detail::thin<Isa::avx512>(p, parallel);
    else
      detail::packed<detail::Avx512>(p, parallel);
  } else {
    if (thin)
      detail::thin<Isa::avx2>(p, parallel);
    else
      detail::packed<detail::Avx2>(p, parallel);
  }
  return true;
#else
  (void)isa;
  (void)o;
  (void)allow_threads;
  return false;
#endif
}

}  // namespace flowdiff::sgemm
