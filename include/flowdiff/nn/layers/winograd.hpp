// flowdiff/nn/layers/winograd.hpp — 3 x 3, stride-1, padding-1 convolutions by Winograd's minimal
// filtering F(2 x 2, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// 2016): each 2 x 2 block of outputs ("tile") of one output channel o is
//   Y = A^T [ sum_c (G g_oc G^T) . (B^T d_c B) ] A
// where d_c is the 4 x 4 input patch of channel c under the tile (zero outside the image), g_oc
// the 3 x 3 kernel, . the element-wise product, and
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// The sum over c is, for each of the 16 positions e of the 4 x 4 transformed tile, one GEMM
// M_e[O, T] = U_e[O, C] V_e[C, T] over T tiles: 16 C O products per tile instead of direct
// convolution's 36 C O (2.25 times fewer multiply-adds), plus the transforms (additions only).
// V_e is written directly as sgemm's B micro-panels (BPacker::panels: no packing pass).
// The weight gradient dW[o, c] = sum over pixels of dy[o] x[c] (shifted) is the 3 x 3 correlation
// of x with dy: F(3 x 3, 2 x 2) over the same tiles, dW_oc = A'^T [sum_t (Gs g_t Gs^T) . V_t] A'
// with g_t the 2 x 2 block of dy under tile t, Gs = [1 0; 1/2 1/2; 1/2 -1/2; 0 -1] and
// A'^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1] (Gs is F(3, 2)'s G with its last row negated, which makes
// its input transform the forward's, so V is the same): 16 GEMMs S_e[O, C] += Z_e V_e^T per block.
// The tiles of a batch are taken in blocks of whole tile rows (R rows of tw tiles, R from the
// shape only) so that a block's buffers stay in L2; blocks are shared out over the threads, each
// with its own buffers and single-threaded GEMMs (dW: contiguous runs of blocks into per-run sums
// added in run order), and every output element is computed by the same operations in the same
// order whatever the thread count: bit-identical for any number of threads. The result is not
// bit-identical to im2col + GEMM (other roundings; against a double convolution its error is of
// the same size, 1-9e-7 of the largest value in the tests); Conv2d uses it for float convolutions
// with at least 16 input and output channels on every CPU, and set_winograd(false) turns it off.
// The transforms take sixteen tiles of a tile row at a time in AVX-512 registers, or eight in
// AVX2 registers, or run as plain loops over a row's tiles on other CPUs (the same arithmetic:
// the same bits); with AVX-512, V is written as the kernel's B micro-panels, otherwise as plain
// rows that the AVX2 GEMM packs, or Eigen (or the BLAS behind it) multiplies.
#pragma once

#include <algorithm>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/tensor.hpp"

#if FLOWDIFF_X86_DISPATCH
#include <immintrin.h>
#endif

namespace flowdiff::nn::winograd_detail {

/// The shape of one Winograd convolution: x [N, C, H, W] -> y [N, O, H, W] (3 x 3, padding 1).
struct Plan {
  index_t n = 0, in = 0, out = 0, h = 0, w = 0;
  index_t th = 0, tw = 0;  // tile rows and tiles per row: ceil(h / 2), ceil(w / 2)
  index_t rows = 0;        // tile rows per block
  index_t blocks = 0;      // blocks over the n th tile rows of the batch
  index_t tiles() const { return rows * tw; }  // tiles of a whole block (the buffers' T)
  index_t panels() const { return (tiles() + 31) / 32; }
  /// Floats of one thread's workspace: V as [16] x sgemm micro-panels ([panels, C, 32]) and
  /// M [16, O, T].
  index_t workspace() const { return 16 * in * 32 * panels() + 16 * out * tiles(); }
};

/// Tile rows per block: about 4096 / max(C, O) tiles (V and M of a block together under 512 KB),
/// at least one row; and, where that leaves fewer than 4 blocks (a small batch), fewer rows, down
/// to one 32-tile micro-panel's worth, so that the blocks can keep several threads busy. From the
/// shape alone (the results do not depend on the thread count).
inline Plan plan(index_t n, index_t in, index_t out, index_t h, index_t w) {
  Plan p;
  p.n = n;
  p.in = in;
  p.out = out;
  p.h = h;
  p.w = w;
  p.th = (h + 1) / 2;
  p.tw = (w + 1) / 2;
  const index_t target = std::max<index_t>(32, 4096 / std::max(in, out));
  const index_t total = n * p.th, panel_rows = (32 + p.tw - 1) / p.tw;
  p.rows = std::max<index_t>(1, std::min(total, target / p.tw));
  p.rows = std::min(p.rows, std::max((total + 3) / 4, panel_rows));
  p.blocks = (total + p.rows - 1) / p.rows;
  return p;
}

/// The calling thread's Winograd scratch, slot 0: a block's V and M (or Z), 1: the transformed
/// kernel, 2: the weight gradient's per-run sums. Grown on demand and kept for the thread's
/// lifetime, shared by every convolution the thread runs (one layer's buffers are dead once its
/// call returns): slots 2-4 of sgemm's per-thread packing buffers.
inline float* scratch(int slot, index_t n) { return sgemm::detail::pack_buffer(2 + slot, n); }

/// U[e, o, c] = (G g_oc G^T)[e / 4, e % 4] for w [O, C, 3, 3]; u: 16 O C floats. Sixteen
/// kernels at a time into a local block, then each position's sixteen values stored together:
/// one kernel's sixteen positions are O C floats apart, and storing them one by one (sixteen
/// scattered stores per kernel) took a third of a batch-1 U-Net forward.
template <class T>
void transform_weights(const T* w, index_t out, index_t in, T* u) {
  constexpr index_t B = 16;
  const index_t oc = out * in;
  for (index_t q0 = 0; q0 < oc; q0 += B) {
    const index_t nb = std::min(B, oc - q0);
    T block[16][B];
    for (index_t j = 0; j < nb; ++j) {
      const T* g = w + 9 * (q0 + j);
      T t[4][3];  // G g: rows of the 4 x 3 intermediate
      for (index_t c = 0; c < 3; ++c) {
        t[0][c] = g[c];
        t[1][c] = T(0.5) * (g[c] + g[3 + c] + g[6 + c]);
        t[2][c] = T(0.5) * (g[c] - g[3 + c] + g[6 + c]);
        t[3][c] = g[6 + c];
      }
      for (index_t i = 0; i < 4; ++i) {  // (G g) G^T
        block[4 * i + 0][j] = t[i][0];
        block[4 * i + 1][j] = T(0.5) * (t[i][0] + t[i][1] + t[i][2]);
        block[4 * i + 2][j] = T(0.5) * (t[i][0] - t[i][1] + t[i][2]);
        block[4 * i + 3][j] = t[i][2];
      }
    }
    for (index_t e = 0; e < 16; ++e) {
      T* dst = u + e * oc + q0;
      if (nb == B) {  // a fixed-length copy: vector stores, not a string instruction
        for (index_t j = 0; j < B; ++j) dst[j] = block[e][j];
      } else {
        std::copy(block[e], block[e] + nb, dst);
      }
    }
  }
}

// ---- Portable transforms (every CPU; the path of CPUs without flowdiff's x86 kernels, such as
// AArch64, and of FLOWDIFF_NO_SGEMM builds): the vector transforms' arithmetic in plain C++, the
// same additions and halvings in the same order (the same bits), written as loops over the tiles
// of a row that compilers vectorise (stride-2 loads and stores: NEON's ld2 / st2). V and Z in
// their plain-row (ld) form, the products by gemm_strided (Eigen, or the BLAS behind it).

/// Floats of the portable transforms' row buffer for a plan: four input rows padded to 2 tw + 2
/// columns (transform_dy_portable uses two rows of 2 tw).
inline index_t portable_rows(const Plan& p) { return 4 * (2 * p.tw + 2); }

// The portable transforms' loops over a row of tiles, with restrict-qualified pointers so that
// compilers vectorise them without run-time alias checks (sixteen output streams would exceed
// GCC's limit on those checks, and the loops then stayed scalar).

/// Row q of B^T d B for tw tiles from row q of B^T d (u, 2 tw + 2 columns): positions 4 q + k.
inline void input_row(const float* __restrict u, index_t tw, float* __restrict v0,
                      float* __restrict v1, float* __restrict v2, float* __restrict v3) {
  for (index_t tx = 0; tx < tw; ++tx) {
    const float a = u[2 * tx], b = u[2 * tx + 1], cc = u[2 * tx + 2], dd = u[2 * tx + 3];
    v0[tx] = a - cc;
    v1[tx] = b + cc;
    v2[tx] = cc - b;
    v3[tx] = b - dd;
  }
}

/// Column q of g Gs^T for the two columns (ga, gb) of a row of g.
template <int Q>
inline float dy_h(float ga, float gb) {
  if constexpr (Q == 0) return ga;
  if constexpr (Q == 1) return 0.5f * (ga + gb);
  if constexpr (Q == 2) return 0.5f * (ga - gb);
  return 0.f - gb;
}

/// Positions q, 4 + q, 8 + q, 12 + q of Gs g Gs^T for tw tiles from dy's two rows g0, g1.
template <int Q>
inline void dy_column(const float* __restrict g0, const float* __restrict g1, index_t tw,
                      float* __restrict z0, float* __restrict z1, float* __restrict z2,
                      float* __restrict z3) {
  for (index_t tx = 0; tx < tw; ++tx) {
    const float h0 = dy_h<Q>(g0[2 * tx], g0[2 * tx + 1]), h1 = dy_h<Q>(g1[2 * tx], g1[2 * tx + 1]);
    z0[tx] = h0;
    z1[tx] = 0.5f * (h0 + h1);
    z2[tx] = 0.5f * (h0 - h1);
    z3[tx] = 0.f - h1;
  }
}

/// Output rows 2 ty and, with Second, 2 ty + 1 of `full` whole tiles (both columns in the
/// image) from M (m: tile 0 of position 0, eT floats between positions), + b.
template <bool Second>
inline void output_rows(const float* __restrict m, index_t eT, index_t full, float b,
                        float* __restrict y0, float* __restrict y1) {
  const float* __restrict mq[16];
  for (int e = 0; e < 16; ++e) mq[e] = m + e * eT;
  for (index_t tx = 0; tx < full; ++tx) {
    float s0[4], s1[4];
    for (int q = 0; q < 4; ++q) {
      const float m0 = mq[4 * q][tx], m1 = mq[4 * q + 1][tx], m2 = mq[4 * q + 2][tx],
                  m3 = mq[4 * q + 3][tx];
      s0[q] = (m0 + m1) + m2;
      s1[q] = (m1 - m2) - m3;
    }
    y0[2 * tx] = ((s0[0] + s0[1]) + s0[2]) + b;
    y0[2 * tx + 1] = ((s1[0] + s1[1]) + s1[2]) + b;
    if constexpr (Second) {
      y1[2 * tx] = ((s0[1] - s0[2]) - s0[3]) + b;
      y1[2 * tx + 1] = ((s1[1] - s1[2]) - s1[3]) + b;
    }
  }
}

/// transform_input in its ld form without intrinsics ((c, t) of V_e at v + e ve + c ld + t).
/// Per channel and tile row: the four input rows copied into `rows` (portable_rows(p) floats),
/// padded with zeros to 2 tw + 2 columns (column j is input column j - 1), the vertical
/// transform B^T d on them in place, then the horizontal one (tile tx: columns 2 tx .. 2 tx + 3).
inline void transform_input_portable(const Plan& p, const float* x, index_t r0, index_t r1,
                                     index_t c0, index_t c1, float* v, index_t ve, index_t ld,
                                     float* rows) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W, pw = 2 * tw + 2;
  float* const u0 = rows;
  float* const u1 = rows + pw;
  float* const u2 = rows + 2 * pw;
  float* const u3 = rows + 3 * pw;
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th, t0 = (r - r0) * tw;
    for (index_t c = c0; c < c1; ++c) {
      const float* xc = x + (s * p.in + c) * HW;
      float* const d[4] = {u0, u1, u2, u3};  // input rows 2 ty - 1 + q, then B^T d in place
      for (index_t q = 0; q < 4; ++q) {
        const index_t ih = 2 * ty - 1 + q;
        float* const row = d[q];
        if (ih < 0 || ih >= H) {
          std::fill(row, row + pw, 0.f);
          continue;
        }
        row[0] = 0.f;  // column j holds input column j - 1: W <= 2 tw < pw - 1
        std::copy(xc + ih * W, xc + ih * W + W, row + 1);
        std::fill(row + W + 1, row + pw, 0.f);
      }
      for (index_t j = 0; j < pw; ++j) {
        const float d0 = u0[j], d1 = u1[j], d2 = u2[j], d3 = u3[j];
        u0[j] = d0 - d2;
        u1[j] = d1 + d2;
        u2[j] = d2 - d1;
        u3[j] = d1 - d3;
      }
      float* const vc = v + ld * c + t0;
      const float* const u[4] = {u0, u1, u2, u3};
      for (index_t q = 0; q < 4; ++q)
        input_row(u[q], tw, vc + (4 * q) * ve, vc + (4 * q + 1) * ve, vc + (4 * q + 2) * ve,
                  vc + (4 * q + 3) * ve);
    }
  }
}

/// transform_output without intrinsics: y[s, o, 2 ty + a, 2 tx + b] = (A^T M A)[a, b] + bias[o]
/// (0 without a bias) for tile rows [r0, r1), channels [o0, o1); M[e, o, t], ldm per (e, o) row.
inline void transform_output_portable(const Plan& p, const float* m, index_t ldm, index_t r0,
                                      index_t r1, index_t o0, index_t o1, const float* bias,
                                      float* y) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W, eT = ldm * p.out;
  const index_t full = W / 2;  // tiles whose two columns are both in the image
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    const bool second = 2 * ty + 1 < H;
    for (index_t o = o0; o < o1; ++o) {
      const float* mt = m + o * ldm + (r - r0) * tw;
      const float b = bias ? bias[o] : 0.f;
      float* const y0 = y + (s * p.out + o) * HW + 2 * ty * W;
      float* const y1 = y0 + W;
      float last0[2], last1[2];  // odd width: the last tile's first column only
      if (second) {
        output_rows<true>(mt, eT, full, b, y0, y1);
        if (full < tw) output_rows<true>(mt + full, eT, 1, b, last0, last1);
      } else {
        output_rows<false>(mt, eT, full, b, y0, nullptr);
        if (full < tw) output_rows<false>(mt + full, eT, 1, b, last0, nullptr);
      }
      if (full < tw) {
        y0[2 * full] = last0[0];
        if (second) y1[2 * full] = last1[0];
      }
    }
  }
}

/// transform_dy without intrinsics: Z_e(o, t) at z + e ze + o ld + t (see transform_dy). Per
/// channel and tile row, dy's two rows are copied into `rows` (portable_rows(p) floats), padded
/// with zeros to 2 tw columns (a row below the image is zero), then each tile reads columns
/// 2 tx and 2 tx + 1 of both.
inline void transform_dy_portable(const Plan& p, const float* dy, index_t r0, index_t r1,
                                  index_t o0, index_t o1, float* z, index_t ze, index_t ld,
                                  float* rows) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  float* const g0 = rows;
  float* const g1 = rows + 2 * tw;
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th, t0 = (r - r0) * tw;
    const bool second = 2 * ty + 1 < H;
    for (index_t o = o0; o < o1; ++o) {
      const float* src = dy + (s * p.out + o) * HW + 2 * ty * W;
      std::copy(src, src + W, g0);
      std::fill(g0 + W, g0 + 2 * tw, 0.f);
      if (second) {
        std::copy(src + W, src + 2 * W, g1);
        std::fill(g1 + W, g1 + 2 * tw, 0.f);
      } else {
        std::fill(g1, g1 + 2 * tw, 0.f);
      }
      float* const zo = z + o * ld + t0;
      dy_column<0>(g0, g1, tw, zo, zo + 4 * ze, zo + 8 * ze, zo + 12 * ze);
      dy_column<1>(g0, g1, tw, zo + ze, zo + 5 * ze, zo + 9 * ze, zo + 13 * ze);
      dy_column<2>(g0, g1, tw, zo + 2 * ze, zo + 6 * ze, zo + 10 * ze, zo + 14 * ze);
      dy_column<3>(g0, g1, tw, zo + 3 * ze, zo + 7 * ze, zo + 11 * ze, zo + 15 * ze);
    }
  }
}

#if FLOWDIFF_X86_DISPATCH
// ---- AVX2 transforms (the AVX2 kernels' path): the AVX-512 ones' arithmetic, eight tiles at a
// time in 256-bit registers. V and Z are written as plain rows (the ld form). The same additions
// and halvings in the same order as the AVX-512 transforms, so the same bits.

/// Lanes j of 8 with lo <= base + j < hi, as an AVX2 load/store mask.
__attribute__((target("avx2"))) inline __m256i lane_mask8(index_t base, index_t lo, index_t hi) {
  const __m256i j = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                     _mm256_set1_epi32(static_cast<int>(base)));
  const __m256i ge = _mm256_cmpgt_epi32(j, _mm256_set1_epi32(static_cast<int>(lo) - 1));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), j);
  return _mm256_and_si256(ge, lt);
}

/// transform_weights for float with AVX2, eight kernels (o, c) at a time (the AVX-512 form's
/// scheme: the nine taps gathered, the same operations in the same order, so the same bits).
__attribute__((target("avx2"))) inline void transform_weights_avx2(const float* w, index_t out,
                                                                   index_t in, float* u) {
  const index_t oc = out * in;
  const __m256i idx = _mm256_setr_epi32(0, 9, 18, 27, 36, 45, 54, 63);
  const __m256 half = _mm256_set1_ps(0.5f);
  for (index_t q = 0; q < oc; q += 8) {
    const __m256i m = lane_mask8(0, 0, oc - q);
    const float* g = w + 9 * q;
    __m256 gv[9];
    for (int j = 0; j < 9; ++j)
      gv[j] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), g + j, idx, _mm256_castsi256_ps(m), 4);
    __m256 t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      t[0][j] = gv[j];
      t[1][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(gv[j], gv[3 + j]), gv[6 + j]));
      t[2][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(gv[j], gv[3 + j]), gv[6 + j]));
      t[3][j] = gv[6 + j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const __m256 s0 = t[i][0], s1 = t[i][1], s2 = t[i][2];
      _mm256_maskstore_ps(u + (4 * i + 0) * oc + q, m, s0);
      _mm256_maskstore_ps(u + (4 * i + 1) * oc + q, m,
                          _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(s0, s1), s2)));
      _mm256_maskstore_ps(u + (4 * i + 2) * oc + q, m,
                          _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(s0, s1), s2)));
      _mm256_maskstore_ps(u + (4 * i + 3) * oc + q, m, s2);
    }
  }
}

/// Even and odd elements of the 16 floats (x0, x1), in order.
__attribute__((target("avx2"))) inline void deinterleave8(__m256 x0, __m256 x1, __m256& even,
                                                          __m256& odd) {
  // Pairs of lanes as 64-bit units: (x0_0 x0_2 x1_0 x1_2 | x0_4 x0_6 x1_4 x1_6) -> units 0 2 1 3.
  const __m256d e = _mm256_castps_pd(_mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256d o = _mm256_castps_pd(_mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(e, _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(o, _MM_SHUFFLE(3, 1, 2, 0)));
}

/// transform_input in its ld form ((c, t) of V_e at v + e ve + c ld + t): eight tiles read the
/// 18 input columns 2 tx0 - 1 .. 2 tx0 + 16 (three masked loads per row), the vertical
/// transform on them, then even / odd lanes and their successors.
__attribute__((target("avx2"))) inline void transform_input_avx2(const Plan& p, const float* x,
                                                                 index_t r0, index_t r1,
                                                                 index_t c0, index_t c1,
                                                                 float* v, index_t ve,
                                                                 index_t ld) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const __m256i rot1 = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    bool row_in[4];
    for (index_t q = 0; q < 4; ++q) {
      const index_t ih = 2 * ty - 1 + q;
      row_in[q] = ih >= 0 && ih < H;
    }
    for (index_t tx0 = 0; tx0 < tw; tx0 += 8) {
      const index_t col0 = 2 * tx0 - 1;
      const __m256i mk[3] = {lane_mask8(col0, 0, W), lane_mask8(col0 + 8, 0, W),
                             lane_mask8(col0 + 16, 0, W)};
      const index_t t0 = (r - r0) * tw + tx0, cnt = std::min<index_t>(8, tw - tx0);
      const __m256i out = lane_mask8(0, 0, cnt);
      for (index_t c = c0; c < c1; ++c) {
        const float* xc = x + (s * p.in + c) * HW + (2 * ty - 1) * W + col0;
        __m256 d[4][3];
        for (index_t q = 0; q < 4; ++q)
          for (int h = 0; h < 3; ++h)
            d[q][h] = row_in[q] ? _mm256_maskload_ps(xc + q * W + 8 * h, mk[h])
                                : _mm256_setzero_ps();
        float* const vc = v + ld * c + t0;
        for (index_t q = 0; q < 4; ++q) {
          __m256 u[3];  // row q of B^T d over the 18 (24) columns
          for (int h = 0; h < 3; ++h) {
            switch (q) {
              case 0: u[h] = _mm256_sub_ps(d[0][h], d[2][h]); break;
              case 1: u[h] = _mm256_add_ps(d[1][h], d[2][h]); break;
              case 2: u[h] = _mm256_sub_ps(d[2][h], d[1][h]); break;
              default: u[h] = _mm256_sub_ps(d[1][h], d[3][h]); break;
            }
          }
          __m256 a, b;  // columns 2 k - 1 and 2 k of tile k (relative to col0: 2 k, 2 k + 1)
          deinterleave8(u[0], u[1], a, b);
          // 2 k + 2 and 2 k + 3: the next lane, lane 7 from u[2]'s lanes 0 and 1.
          const __m256 cc = _mm256_blend_ps(_mm256_permutevar8x32_ps(a, rot1),
                                            _mm256_permutevar8x32_ps(u[2], _mm256_setzero_si256()),
                                            0x80);
          const __m256 dd = _mm256_blend_ps(_mm256_permutevar8x32_ps(b, rot1),
                                            _mm256_permutevar8x32_ps(u[2], _mm256_set1_epi32(1)),
                                            0x80);
          const __m256 res[4] = {_mm256_sub_ps(a, cc), _mm256_add_ps(b, cc),
                                 _mm256_sub_ps(cc, b), _mm256_sub_ps(b, dd)};
          for (int k = 0; k < 4; ++k) _mm256_maskstore_ps(vc + (4 * q + k) * ve, out, res[k]);
        }
      }
    }
  }
}

/// Columns 2 k and 2 k + 1 of an output row from lane k of v0 and v1 (16 columns, masked).
__attribute__((target("avx2"))) inline void store_row8(float* row, __m256i w0, __m256i w1,
                                                       __m256 v0, __m256 v1) {
  const __m256 lo = _mm256_unpacklo_ps(v0, v1), hi = _mm256_unpackhi_ps(v0, v1);
  _mm256_maskstore_ps(row, w0, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_maskstore_ps(row + 8, w1, _mm256_permute2f128_ps(lo, hi, 0x31));
}

/// transform_output with AVX2, eight tiles at a time; the two output rows of 16 columns
/// interleaved from the tiles' two columns by unpacks.
__attribute__((target("avx2"))) inline void transform_output_avx2(const Plan& p, const float* m,
                                                                  index_t ldm, index_t r0,
                                                                  index_t r1, index_t o0,
                                                                  index_t o1, const float* bias,
                                                                  float* y) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const index_t eT = ldm * p.out;
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    const bool second = 2 * ty + 1 < H;
    for (index_t tx0 = 0; tx0 < tw; tx0 += 8) {
      const __m256i in = lane_mask8(0, 0, tw - tx0);
      const __m256i w0 = lane_mask8(2 * tx0, 0, W), w1 = lane_mask8(2 * tx0 + 8, 0, W);
      for (index_t o = o0; o < o1; ++o) {
        const float* mt = m + o * ldm + (r - r0) * tw + tx0;
        __m256 mv[16];
        for (int e = 0; e < 16; ++e) mv[e] = _mm256_maskload_ps(mt + e * eT, in);
        __m256 s0[4], s1[4];
        for (int q = 0; q < 4; ++q) {
          s0[q] = _mm256_add_ps(_mm256_add_ps(mv[4 * q], mv[4 * q + 1]), mv[4 * q + 2]);
          s1[q] = _mm256_sub_ps(_mm256_sub_ps(mv[4 * q + 1], mv[4 * q + 2]), mv[4 * q + 3]);
        }
        const __m256 b0 = _mm256_set1_ps(bias ? bias[o] : 0.f);
        float* y0 = y + (s * p.out + o) * HW + 2 * ty * W + 2 * tx0;
        store_row8(y0, w0, w1,
                   _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]), b0),
                   _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]), b0));
        if (second)
          store_row8(y0 + W, w0, w1,
                     _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3]), b0),
                     _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3]), b0));
      }
    }
  }
}

/// transform_dy with AVX2, eight tiles at a time: Z_e(o, t) at z + e ze + o ld + t.
__attribute__((target("avx2"))) inline void transform_dy_avx2(const Plan& p, const float* dy,
                                                              index_t r0, index_t r1, index_t o0,
                                                              index_t o1, float* z, index_t ze,
                                                              index_t ld) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const __m256 half = _mm256_set1_ps(0.5f);
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    const bool second = 2 * ty + 1 < H;
    for (index_t tx0 = 0; tx0 < tw; tx0 += 8) {
      const __m256i m0 = lane_mask8(2 * tx0, 0, W), m1 = lane_mask8(2 * tx0 + 8, 0, W);
      const index_t t0 = (r - r0) * tw + tx0;
      const __m256i out = lane_mask8(0, 0, tw - tx0);
      for (index_t o = o0; o < o1; ++o) {
        const float* g = dy + (s * p.out + o) * HW + 2 * ty * W + 2 * tx0;
        __m256 h[2][4];  // rows a of g Gs^T: columns q
        for (int a = 0; a < 2; ++a) {
          __m256 l0 = _mm256_setzero_ps(), l1 = _mm256_setzero_ps();
          if (a == 0 || second) {
            l0 = _mm256_maskload_ps(g + a * W, m0);
            l1 = _mm256_maskload_ps(g + a * W + 8, m1);
          }
          __m256 g0, g1;  // columns 2 tx and 2 tx + 1
          deinterleave8(l0, l1, g0, g1);
          h[a][0] = g0;
          h[a][1] = _mm256_mul_ps(half, _mm256_add_ps(g0, g1));
          h[a][2] = _mm256_mul_ps(half, _mm256_sub_ps(g0, g1));
          h[a][3] = _mm256_sub_ps(_mm256_setzero_ps(), g1);
        }
        float* zo = z + o * ld + t0;
        for (int q = 0; q < 4; ++q) {
          const __m256 zp[4] = {h[0][q], _mm256_mul_ps(half, _mm256_add_ps(h[0][q], h[1][q])),
                                _mm256_mul_ps(half, _mm256_sub_ps(h[0][q], h[1][q])),
                                _mm256_sub_ps(_mm256_setzero_ps(), h[1][q])};
          for (int pp = 0; pp < 4; ++pp) _mm256_maskstore_ps(zo + (4 * pp + q) * ze, out, zp[pp]);
        }
      }
    }
  }
}

#endif

// ---- The plain-row (ld) path: the AVX2 transforms where this CPU has flowdiff's x86 kernels
// (AVX2 or AVX-512), the portable ones elsewhere (the same bits), and plain products.

/// transform_input's ld form with this CPU's plain-row transforms; rows: portable_rows(p) floats.
inline void transform_input_rows(const Plan& p, const float* x, index_t r0, index_t r1,
                                 index_t c0, index_t c1, float* v, index_t ve, index_t ld,
                                 float* rows) {
#if FLOWDIFF_X86_DISPATCH
  if (simd::best_isa() != simd::Isa::none) {
    transform_input_avx2(p, x, r0, r1, c0, c1, v, ve, ld);
    return;
  }
#endif
  transform_input_portable(p, x, r0, r1, c0, c1, v, ve, ld, rows);
}

/// transform_dy with this CPU's plain-row transforms; rows: portable_rows(p) floats.
inline void transform_dy_rows(const Plan& p, const float* dy, index_t r0, index_t r1, index_t o0,
                              index_t o1, float* z, index_t ze, index_t ld, float* rows) {
#if FLOWDIFF_X86_DISPATCH
  if (simd::best_isa() != simd::Isa::none) {
    transform_dy_avx2(p, dy, r0, r1, o0, o1, z, ze, ld);
    return;
  }
#endif
  transform_dy_portable(p, dy, r0, r1, o0, o1, z, ze, ld, rows);
}

/// transform_output with this CPU's plain-row transforms.
inline void transform_output_rows(const Plan& p, const float* m, index_t ldm, index_t r0,
                                  index_t r1, index_t o0, index_t o1, const float* bias,
                                  float* y) {
#if FLOWDIFF_X86_DISPATCH
  if (simd::best_isa() != simd::Isa::none) {
    transform_output_avx2(p, m, ldm, r0, r1, o0, o1, bias, y);
    return;
  }
#endif
  transform_output_portable(p, m, ldm, r0, r1, o0, o1, bias, y);
}

/// y = conv3x3(x, w, padding 1) + bias over the batch with the plain-row transforms and plain
/// products (gemm_strided: the AVX2 kernel packs V itself; without flowdiff's kernels Eigen, or
/// the BLAS behind it), from u = transform_weights(w) (or a vector form of it). Blocks and
/// threads as convolve's. The AVX2 CPUs' path, and every CPU's without AVX2.
inline void convolve_rows(const Plan& p, const float* x, const float* u, const float* bias,
                          float* y, index_t team) {
  const index_t T = p.tiles(), total = p.n * p.th, ve = p.in * T;
  Cpu::parallel_tasks(p.blocks, team, [&](index_t blk, index_t tid) {
    const index_t r0 = blk * p.rows, r1 = std::min(total, r0 + p.rows);
    const index_t nt = (r1 - r0) * p.tw;
    (void)tid;
    float* v = scratch(0, p.workspace() + portable_rows(p));
    float* m = v + 16 * ve;
    transform_input_rows(p, x, r0, r1, 0, p.in, v, ve, nt, v + p.workspace());
    for (index_t e = 0; e < 16; ++e)
      gemm_strided(Trans::no, Trans::no, p.out, nt, p.in, 1.f, u + e * p.out * p.in, p.in,
                   v + e * ve, nt, 0.f, m + e * p.out * T, T);
    transform_output_rows(p, m, T, r0, r1, 0, p.out, bias, y);
  });
}

#if FLOWDIFF_X86_DISPATCH
/// transform_weights for float, sixteen kernels (o, c) at a time: the nine taps of each gathered
/// (stride 9), the same additions and halvings in the same order (the same bits), and each of the
/// sixteen positions e stored as one vector (the scalar loop scattered sixteen single floats per
/// kernel: a third of a batch-1 U-Net forward, which transforms every layer's kernel per call).
__attribute__((target("avx512f"))) inline void transform_weights_avx512(const float* w,
                                                                        index_t out, index_t in,
                                                                        float* u) {
  const index_t oc = out * in;
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(9));
  const __m512 half = _mm512_set1_ps(0.5f);
  for (index_t q = 0; q < oc; q += 16) {
    const index_t lanes = std::min<index_t>(16, oc - q);
    const __mmask16 m = static_cast<__mmask16>(lanes == 16 ? 0xFFFFu : (1u << lanes) - 1u);
    const float* g = w + 9 * q;
    __m512 gv[9];
    for (int j = 0; j < 9; ++j)
      gv[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, g + j, 4);
    __m512 t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      t[0][j] = gv[j];
      t[1][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(gv[j], gv[3 + j]), gv[6 + j]));
      t[2][j] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(gv[j], gv[3 + j]), gv[6 + j]));
      t[3][j] = gv[6 + j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const __m512 s0 = t[i][0], s1 = t[i][1], s2 = t[i][2];
      _mm512_mask_storeu_ps(u + (4 * i + 0) * oc + q, m, s0);
      _mm512_mask_storeu_ps(u + (4 * i + 1) * oc + q, m,
                            _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(s0, s1), s2)));
      _mm512_mask_storeu_ps(u + (4 * i + 2) * oc + q, m,
                            _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(s0, s1), s2)));
      _mm512_mask_storeu_ps(u + (4 * i + 3) * oc + q, m, s2);
    }
  }
}

/// Lanes [lo, hi) of 16 (clamped to [0, 16]) set.
inline __mmask16 lane_range(index_t lo, index_t hi) {
  lo = std::clamp<index_t>(lo, 0, 16);
  hi = std::clamp<index_t>(hi, 0, 16);
  if (hi <= lo) return 0;
  const unsigned bits = (hi == 16 ? 0xFFFFu : ((1u << hi) - 1u)) & ~((1u << lo) - 1u);
  return static_cast<__mmask16>(bits);
}

/// V_e(c, t) = (B^T d B)[e / 4, e % 4] for the tiles of tile rows [r0, r1) of the batch
/// (t = (r - r0) tw + tx) and channels [c0, c1), V_e at v + e ve. ld = 0: as sgemm's B
/// micro-panels, (c, t) at + (t / 32) 32 C + 32 c + t % 32 (the forward's B); ld > 0: plain rows,
/// (c, t) at + c ld + t (the weight gradient's op(B)^T). Sixteen tiles
/// at a time: tile tx reads input columns 2 tx - 1 .. 2 tx + 2 of rows 2 ty - 1 .. 2 ty + 2
/// (zero outside the image), i.e. 34 consecutive columns for 16 tiles: three masked loads per
/// row, the vertical transform on them, then even / odd lanes and their shifts (four permutes).
__attribute__((target("avx512f"))) inline void transform_input(const Plan& p, const float* x,
                                                               index_t r0, index_t r1,
                                                               index_t c0, index_t c1, float* v,
                                                               index_t ve, index_t ld = 0) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const index_t eT = ve, pstride = 32 * p.in;  // floats between positions e, between panels
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  // Lanes 1 .. 15 of the first operand, then lane 0 (next) or 1 (next2) of the second.
  const __m512i next = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
  const __m512i next2 = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17);
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    bool row_in[4];
    for (index_t q = 0; q < 4; ++q) {
      const index_t ih = 2 * ty - 1 + q;
      row_in[q] = ih >= 0 && ih < H;
    }
    for (index_t tx0 = 0; tx0 < tw; tx0 += 16) {
      const index_t col0 = 2 * tx0 - 1;  // input column of lane 0 of the first load
      const __mmask16 mk[3] = {lane_range(-col0, W - col0), lane_range(-col0 - 16, W - col0 - 16),
                               lane_range(-col0 - 32, W - col0 - 32)};
      // Tiles t0 .. t0 + cnt - 1: lanes [0, k1) in panel t0 / 32, the rest at the start of the
      // next panel (a row of tiles may cross a panel boundary when 32 % tw != 0).
      const index_t t0 = (r - r0) * tw + tx0, cnt = std::min<index_t>(16, tw - tx0);
      const index_t k1 = std::min(cnt, 32 - t0 % 32);
      const __mmask16 first = lane_range(0, ld > 0 ? cnt : k1),
                      rest = ld > 0 ? __mmask16(0) : lane_range(k1, cnt);
      const index_t at0 = ld > 0 ? t0 : (t0 / 32) * pstride + t0 % 32;
      const index_t at1 = (t0 / 32 + 1) * pstride - k1;
      const index_t cstride = ld > 0 ? ld : 32;  // floats between channels
      for (index_t c = c0; c < c1; ++c) {
        const float* xc = x + (s * p.in + c) * HW + (2 * ty - 1) * W + col0;
        __m512 d[4][3];
        for (index_t q = 0; q < 4; ++q)
          for (int h = 0; h < 3; ++h)
            d[q][h] = row_in[q] ? _mm512_maskz_loadu_ps(mk[h], xc + q * W + 16 * h)
                                : _mm512_setzero_ps();
        float* const vc = v + cstride * c;
        for (index_t q = 0; q < 4; ++q) {
          __m512 u[3];  // row q of B^T d over the 34 columns
          for (int h = 0; h < 3; ++h) {
            switch (q) {
              case 0: u[h] = _mm512_sub_ps(d[0][h], d[2][h]); break;
              case 1: u[h] = _mm512_add_ps(d[1][h], d[2][h]); break;
              case 2: u[h] = _mm512_sub_ps(d[2][h], d[1][h]); break;
              default: u[h] = _mm512_sub_ps(d[1][h], d[3][h]); break;
            }
          }
          const __m512 a = _mm512_permutex2var_ps(u[0], even, u[1]);  // columns 2 tx - 1
          const __m512 b = _mm512_permutex2var_ps(u[0], odd, u[1]);   // 2 tx
          const __m512 cc = _mm512_permutex2var_ps(a, next, u[2]);   // 2 tx + 1
          const __m512 dd = _mm512_permutex2var_ps(b, next2, u[2]);  // 2 tx + 2
          const __m512 res[4] = {_mm512_sub_ps(a, cc), _mm512_add_ps(b, cc),
                                 _mm512_sub_ps(cc, b), _mm512_sub_ps(b, dd)};
          for (int k = 0; k < 4; ++k) {
            float* ve_ = vc + (4 * q + k) * eT;
            _mm512_mask_storeu_ps(ve_ + at0, first, res[k]);
            if (rest != 0) _mm512_mask_storeu_ps(ve_ + at1, rest, res[k]);
          }
        }
      }
    }
  }
}

/// y[s, o, 2 ty + a, 2 tx + b] = (A^T M A)[a, b] (+ bias[o]) for the tiles of tile rows [r0, r1)
/// and output channels [o0, o1); M[e, o, t] with ldm floats per (e, o) row. Sixteen tiles at a
/// time; their two output rows of 32 columns are interleaved from the tiles' columns by permutes.
__attribute__((target("avx512f"))) inline void transform_output(const Plan& p, const float* m,
                                                                index_t ldm, index_t r0,
                                                                index_t r1, index_t o0,
                                                                index_t o1, const float* bias,
                                                                float* y) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const index_t eT = ldm * p.out;  // floats between positions e of M
  const __m512i lo_idx =
      _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    const bool second = 2 * ty + 1 < H;
    for (index_t tx0 = 0; tx0 < tw; tx0 += 16) {
      const __mmask16 in = lane_range(0, tw - tx0);
      const __mmask16 w0 = lane_range(0, W - 2 * tx0), w1 = lane_range(0, W - 2 * tx0 - 16);
      for (index_t o = o0; o < o1; ++o) {
        const float* mt = m + o * ldm + (r - r0) * tw + tx0;
        __m512 mv[16];
        for (int e = 0; e < 16; ++e) mv[e] = _mm512_maskz_loadu_ps(in, mt + e * eT);
        // Rows of M A: s_q0 = M_q0 + M_q1 + M_q2, s_q1 = M_q1 - M_q2 - M_q3; then A^T.
        __m512 s0[4], s1[4];
        for (int q = 0; q < 4; ++q) {
          s0[q] = _mm512_add_ps(_mm512_add_ps(mv[4 * q], mv[4 * q + 1]), mv[4 * q + 2]);
          s1[q] = _mm512_sub_ps(_mm512_sub_ps(mv[4 * q + 1], mv[4 * q + 2]), mv[4 * q + 3]);
        }
        const __m512 b0 = _mm512_set1_ps(bias ? bias[o] : 0.f);
        const __m512 v00 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]), b0);
        const __m512 v01 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]), b0);
        float* y0 = y + (s * p.out + o) * HW + 2 * ty * W + 2 * tx0;
        _mm512_mask_storeu_ps(y0, w0, _mm512_permutex2var_ps(v00, lo_idx, v01));
        _mm512_mask_storeu_ps(y0 + 16, w1, _mm512_permutex2var_ps(v00, hi_idx, v01));
        if (second) {
          const __m512 v10 =
              _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]), b0);
          const __m512 v11 =
              _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]), b0);
          _mm512_mask_storeu_ps(y0 + W, w0, _mm512_permutex2var_ps(v10, lo_idx, v11));
          _mm512_mask_storeu_ps(y0 + W + 16, w1, _mm512_permutex2var_ps(v10, hi_idx, v11));
        }
      }
    }
  }
}
#endif

#if FLOWDIFF_X86_DISPATCH
/// Z_e(o, t) = (Gs g Gs^T)[e / 4, e % 4] for the 2 x 2 blocks g of dy (dy[s, o, 2 ty + a,
/// 2 tx + b], zero outside the image) under the tiles of tile rows [r0, r1), output channels
/// [o0, o1): Z_e at z + e ze, (o, t) at + o ld + t. Gs = [1 0; 1/2 1/2; 1/2 -1/2; 0 -1] is the G
/// of F(3, 2) with its last row negated, which turns F(3, 2)'s input transform into the forward's
/// B^T d B (whose last row is the negative of F(3, 2)'s), so V is shared.
__attribute__((target("avx512f"))) inline void transform_dy(const Plan& p, const float* dy,
                                                            index_t r0, index_t r1, index_t o0,
                                                            index_t o1, float* z, index_t ze,
                                                            index_t ld) {
  const index_t tw = p.tw, W = p.w, H = p.h, HW = H * W;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 half = _mm512_set1_ps(0.5f);
  for (index_t r = r0; r < r1; ++r) {
    const index_t s = r / p.th, ty = r % p.th;
    const bool second = 2 * ty + 1 < H;
    for (index_t tx0 = 0; tx0 < tw; tx0 += 16) {
      const __mmask16 m0 = lane_range(0, W - 2 * tx0), m1 = lane_range(0, W - 2 * tx0 - 16);
      const index_t t0 = (r - r0) * tw + tx0;
      const __mmask16 out = lane_range(0, tw - tx0);
      for (index_t o = o0; o < o1; ++o) {
        const float* g = dy + (s * p.out + o) * HW + 2 * ty * W + 2 * tx0;
        __m512 h[2][4];  // rows a of g Gs^T: columns q
        for (int a = 0; a < 2; ++a) {
          __m512 l0 = _mm512_setzero_ps(), l1 = _mm512_setzero_ps();
          if (a == 0 || second) {
            l0 = _mm512_maskz_loadu_ps(m0, g + a * W);
            l1 = _mm512_maskz_loadu_ps(m1, g + a * W + 16);
          }
          const __m512 g0 = _mm512_permutex2var_ps(l0, even, l1);  // column 2 tx
          const __m512 g1 = _mm512_permutex2var_ps(l0, odd, l1);   // 2 tx + 1
          h[a][0] = g0;
          h[a][1] = _mm512_mul_ps(half, _mm512_add_ps(g0, g1));
          h[a][2] = _mm512_mul_ps(half, _mm512_sub_ps(g0, g1));
          h[a][3] = _mm512_sub_ps(_mm512_setzero_ps(), g1);
        }
        float* zo = z + o * ld + t0;
        for (int q = 0; q < 4; ++q) {
          const __m512 zp[4] = {h[0][q], _mm512_mul_ps(half, _mm512_add_ps(h[0][q], h[1][q])),
                                _mm512_mul_ps(half, _mm512_sub_ps(h[0][q], h[1][q])),
                                _mm512_sub_ps(_mm512_setzero_ps(), h[1][q])};
          for (int pp = 0; pp < 4; ++pp) _mm512_mask_storeu_ps(zo + (4 * pp + q) * ze, out, zp[pp]);
        }
      }
    }
  }
}

#endif

/// dW[o, c] += A^T S_oc A over the batch, S_oc[e] = sum_t Z_e(o, t) V_e(c, t): Winograd's
/// F(3 x 3, 2 x 2) for dW = sum over pixels of dy x (the 3 x 3 correlation of x with dy), with
/// A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1]. Per block of tile rows 16 GEMMs S_e[O, C] += Z_e V_e^T
/// over its tiles; `chunks` contiguous runs of blocks (from the shape only) each sum into their
/// own S in `sums` (chunks x 16 O C floats), which are added in chunk order: bit-identical for
/// any thread count. Workspaces: scratch() of each thread. Every CPU (the transforms of
/// transform_input_rows and transform_dy_rows where AVX-512 is missing).
inline void weight_gradient(const Plan& p, const float* x, const float* dy, float* dw,
                            index_t team, index_t chunks) {
  [[maybe_unused]] const bool avx512 = simd::best_isa() == simd::Isa::avx512;
  float* const sums = scratch(2, chunks * 16 * p.out * p.in);
  const index_t T = p.tiles(), total = p.n * p.th, oc = p.out * p.in;
  const index_t ve = p.in * T, ze = p.out * T;
  Cpu::parallel_tasks(chunks, team, [&](index_t k, index_t tid) {
    const index_t b0 = k * p.blocks / chunks, b1 = (k + 1) * p.blocks / chunks;
    (void)tid;
    float* v = scratch(0, p.workspace() + portable_rows(p));
    float* z = v + 16 * ve;
    float* sk = sums + k * 16 * oc;
    for (index_t blk = b0; blk < b1; ++blk) {
      const index_t r0 = blk * p.rows, r1 = std::min(total, r0 + p.rows);
      const index_t nt = (r1 - r0) * p.tw;
#if FLOWDIFF_X86_DISPATCH
      if (avx512) {
        transform_input(p, x, r0, r1, 0, p.in, v, ve, nt);
        transform_dy(p, dy, r0, r1, 0, p.out, z, ze, nt);
      } else
#endif
      {
        transform_input_rows(p, x, r0, r1, 0, p.in, v, ve, nt, v + p.workspace());
        transform_dy_rows(p, dy, r0, r1, 0, p.out, z, ze, nt, v + p.workspace());
      }
      for (index_t e = 0; e < 16; ++e)
        gemm_strided(Trans::no, Trans::yes, p.out, p.in, nt, 1.f, z + e * ze, nt, v + e * ve, nt,
                     blk == b0 ? 0.f : 1.f, sk + e * oc, p.in);
    }
  });
  Cpu::parallel_chunks(oc, [&](index_t lo, index_t hi) {
    for (index_t q = lo; q < hi; ++q) {
      float m[16];
      for (index_t e = 0; e < 16; ++e) {
        float acc = sums[e * oc + q];
        for (index_t k = 1; k < chunks; ++k) acc += sums[(k * 16 + e) * oc + q];
        m[e] = acc;
      }
      float t[3][4];  // A^T S
      for (int j = 0; j < 4; ++j) {
        t[0][j] = m[j] + m[4 + j] + m[8 + j];
        t[1][j] = m[4 + j] - m[8 + j];
        t[2][j] = m[4 + j] + m[8 + j] + m[12 + j];
      }
      float* d = dw + 9 * q;
      for (int i = 0; i < 3; ++i) {  // (A^T S) A
        d[3 * i + 0] += t[i][0] + t[i][1] + t[i][2];
        d[3 * i + 1] += t[i][1] - t[i][2];
        d[3 * i + 2] += t[i][1] + t[i][2] + t[i][3];
      }
    }
  });
}

#if FLOWDIFF_X86_DISPATCH
/// y = conv3x3(x, w, padding 1) + bias over the batch, from u = transform_weights(w) (AVX-512
/// only). One task per block of tile rows, `team` threads at most, each with its scratch().
inline void convolve(const Plan& p, const float* x, const float* u, const float* bias, float* y,
                     index_t team) {
  const index_t T = p.tiles(), total = p.n * p.th, ve = 32 * p.in * p.panels();
  Cpu::parallel_tasks(p.blocks, team, [&](index_t blk, index_t tid) {
    const index_t r0 = blk * p.rows, r1 = std::min(total, r0 + p.rows);
    const index_t nt = (r1 - r0) * p.tw;  // tiles of this block
    (void)tid;
    float* v = scratch(0, p.workspace());
    float* m = v + 16 * ve;
    transform_input(p, x, r0, r1, 0, p.in, v, ve);
    for (index_t e = 0; e < 16; ++e) {
      // M_e = U_e V_e with V_e's panels read in place (no packing of B).
      const sgemm::BPacker panels{nullptr, nullptr, v + e * ve};
      sgemm::Problem pr;
      pr.m = p.out;
      pr.n = nt;
      pr.k = p.in;
      pr.a = u + e * p.out * p.in;
      pr.lda = p.in;
      pr.bpack = &panels;
      pr.c = m + e * p.out * T;
      pr.ldc = T;
      if (sgemm::gemm(sgemm::Isa::avx512, pr, /*allow_threads=*/false)) continue;
      // A block of at most 4 tiles (sgemm's thin products take no panels): plain sums.
      for (index_t o = 0; o < p.out; ++o)
        for (index_t t = 0; t < nt; ++t) {
          float acc = 0.f;
          for (index_t c = 0; c < p.in; ++c)
            acc += pr.a[o * p.in + c] * panels.panels[(t / 32) * 32 * p.in + 32 * c + t % 32];
          pr.c[o * T + t] = acc;
        }
    }
    transform_output(p, m, T, r0, r1, 0, p.out, bias, y);
  });
}
#endif

}  // namespace flowdiff::nn::winograd_detail
