// flowdiff/nn/layers/conv_phases.hpp — stride-2 convolutions as products over the four
// polyphase components of an image (float, AVX-512 kernel of sgemm).
//
// With stride 2, output pixel (oh, ow) reads input pixel (2 oh - p + i, 2 ow - p + j) for tap
// (i, j). Write i - p = 2 di + ri with ri in {0, 1}: the pixel is (oh + di, ow + dj) of the phase
// x_{ri rj}[a, b] = x[2 a + ri, 2 b + rj]. When H and W are even and the output is H/2 x W/2
// (k - 2p = 1 or 2: 3 x 3 with padding 1, 4 x 4 with padding 1, 2 x 2 or 1 x 1 without), every
// phase is exactly Ho x Wo, so the pixels a tap reads for the output pixels l = oh Wo + ow of a
// sample are consecutive in its phase plane: the column matrix's row (c, i, j) is that plane
// shifted by di Wo + dj and masked at the borders. Split the images into their phases once (one
// copy of the input) and sgemm packs every row of the columns with plain masked loads: no
// gathers, no permutes, for any output width (the strided loads this replaces cost a quarter of
// the forward and needed 8-pixel output rows).
//
// The same "shifted planes" operand gives
//   forward   y = W col(x)                  rows (c, i, j) over the phases of x: im2col's values
//                                           in im2col's order, so the bits of im2col + GEMM;
//   dW^T      col(x) dy^T                   the same rows as the product's A (plain rows);
//   dx        phase (ri, rj) of dx = W_r^T-shaped [C, O T_r] times rows (o, t) of dy shifted
//             by (-di_t, -dj_t), over the T_r taps of that phase: four products whose outputs
//             interleave into dx, instead of W^T dy and col2im's scatter (other roundings).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "flowdiff/backend/cpu/sgemm.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn::phase_detail {

/// Taps per channel at most (kernels up to 8 x 8).
inline constexpr index_t max_taps = 64;

/// A column matrix whose rows are shifted, masked copies of planes of one size h x w:
/// row r = (g, t) (group g = r / taps, tap t = r % taps), column l = (sample s, oh, ow) with
/// l = s h w + oh w + ow, and
///   value = x[s sample + g group + off[t] + oh w + ow]  if 0 <= oh + dh[t] < h and
///                                                          0 <= ow + dw[t] < w,  else 0
/// (off[t] holds the tap's plane offset within its group plus the shift dh[t] w + dw[t]).
struct ShiftedPlanes {
  const float* x = nullptr;
  index_t sample = 0, group = 0;  // floats per sample, per group of taps
  index_t h = 0, w = 0, taps = 0;
  std::int32_t off[max_taps] = {}, dh[max_taps] = {}, dw[max_taps] = {};

  index_t plane() const { return h * w; }
  void add_tap(index_t plane_offset, index_t shift_h, index_t shift_w) {
    off[taps] = static_cast<std::int32_t>(plane_offset + shift_h * w + shift_w);
    dh[taps] = static_cast<std::int32_t>(shift_h);
    dw[taps] = static_cast<std::int32_t>(shift_w);
    ++taps;
  }
};

/// Whether a convolution (k x k, stride s, padding p, H x W image, Ho x Wo output) has the
/// phase form: stride 2, even image, output H/2 x W/2, at most max_taps taps.
inline bool phase_form(index_t k, index_t s, index_t p, index_t H, index_t W, index_t Ho,
                       index_t Wo) {
  return s == 2 && H % 2 == 0 && W % 2 == 0 && Ho * 2 == H && Wo * 2 == W && k >= 1 && p >= 0 &&
         k * k <= max_taps;
}

/// Tap offset i - p = 2 d + r with r in {0, 1}: its phase r and shift d.
inline void split_tap(index_t i, index_t p, index_t& r, index_t& d) {
  const index_t e = i - p;
  r = e & 1;
  d = (e - r) / 2;
}

#if FLOWDIFF_SGEMM_X86

/// xp[q, 2 ri + rj, a, b] = x[q, 2 a + ri, 2 b + rj] for the planes q < planes of x [planes, H, W]
/// (H, W even).   xp: [planes, 4, H/2, W/2]
__attribute__((target("avx512f"))) inline void split_phases(const float* x, index_t planes,
                                                            index_t H, index_t W, float* xp) {
  const index_t hp = H / 2, wp = W / 2, pp = hp * wp;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (index_t q = 0; q < planes; ++q) {
    const float* src = x + q * H * W;
    float* dst = xp + q * 4 * pp;
    for (index_t row = 0; row < H; ++row) {
      const float* s = src + row * W;
      float* d0 = dst + (2 * (row & 1)) * pp + (row / 2) * wp;  // phase (ri, 0)
      float* d1 = d0 + pp;                                      // phase (ri, 1)
      index_t b = 0;
      for (; b + 16 <= wp; b += 16) {
        const __m512 lo = _mm512_loadu_ps(s + 2 * b), hi = _mm512_loadu_ps(s + 2 * b + 16);
        _mm512_storeu_ps(d0 + b, _mm512_permutex2var_ps(lo, even, hi));
        _mm512_storeu_ps(d1 + b, _mm512_permutex2var_ps(lo, odd, hi));
      }
      if (b < wp) {
        const index_t rest = 2 * (wp - b);  // 2 .. 30 floats
        const auto m0 = static_cast<__mmask16>(rest >= 16 ? 0xFFFFu : (1u << rest) - 1u);
        const auto m1 = static_cast<__mmask16>(rest > 16 ? (1u << (rest - 16)) - 1u : 0u);
        const __m512 lo = _mm512_maskz_loadu_ps(m0, s + 2 * b);
        const __m512 hi = _mm512_maskz_loadu_ps(m1, s + 2 * b + 16);
        const auto mo = static_cast<__mmask16>((1u << (wp - b)) - 1u);
        _mm512_mask_storeu_ps(d0 + b, mo, _mm512_permutex2var_ps(lo, even, hi));
        _mm512_mask_storeu_ps(d1 + b, mo, _mm512_permutex2var_ps(lo, odd, hi));
      }
    }
  }
}

/// The inverse: x[s, c, 2 a + ri, 2 b + rj] = ph[2 ri + rj][c, s L + a wp + b] for the four
/// phase blocks ph[r] = phases + r phase_stride, each [channels, n L] (L = hp wp), and
/// x [n, channels, 2 hp, 2 wp].
__attribute__((target("avx512f"))) inline void merge_phases(const float* phases,
                                                            index_t phase_stride, index_t n,
                                                            index_t channels, index_t hp,
                                                            index_t wp, float* x) {
  const index_t L = hp * wp, W = 2 * wp, ld = n * L;
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (index_t s = 0; s < n; ++s)
    for (index_t c = 0; c < channels; ++c)
      for (index_t row = 0; row < 2 * hp; ++row) {
        const index_t ri = row & 1, a = row / 2;
        const float* e = phases + (2 * ri) * phase_stride + c * ld + s * L + a * wp;  // rj = 0
        const float* o = e + phase_stride;                                            // rj = 1
        float* d = x + ((s * channels + c) * 2 * hp + row) * W;
        index_t b = 0;
        for (; b + 16 <= wp; b += 16) {
          const __m512 ev = _mm512_loadu_ps(e + b), od = _mm512_loadu_ps(o + b);
          _mm512_storeu_ps(d + 2 * b, _mm512_permutex2var_ps(ev, lo_idx, od));
          _mm512_storeu_ps(d + 2 * b + 16, _mm512_permutex2var_ps(ev, hi_idx, od));
        }
        for (; b < wp; ++b) {
          d[2 * b] = e[b];
          d[2 * b + 1] = o[b];
        }
      }
}

/// Where the 16 columns [l0, l0 + live) of a ShiftedPlanes lie: their (oh, ow) and, when they
/// all belong to one sample, the offset of the first (they are then consecutive), otherwise each
/// column's offset (s sample + oh w + ow) for a gather.
struct Lanes16 {
  __m512i oh, ow, off;
  __mmask16 live;
  bool run;
  std::intptr_t first;
};

__attribute__((target("avx512f"))) inline Lanes16 lanes16(const ShiftedPlanes& sp, index_t l0,
                                                          index_t live) {
  alignas(64) std::int32_t voh[16], vow[16], voff[16];
  const index_t L = sp.plane();
  index_t s = l0 / L, rem = l0 % L, oh = rem / sp.w, ow = rem % sp.w;
  const index_t s0 = s;
  for (index_t u = 0; u < 16; ++u) {
    if (u < live) {
      voh[u] = static_cast<std::int32_t>(oh);
      vow[u] = static_cast<std::int32_t>(ow);
      voff[u] = static_cast<std::int32_t>(s * sp.sample + oh * sp.w + ow);
      if (++ow == sp.w) {
        ow = 0;
        if (++oh == sp.h) {
          oh = 0;
          ++s;
        }
      }
    } else {  // never inside a plane
      voh[u] = std::numeric_limits<std::int32_t>::min() / 2;
      vow[u] = 0;
      voff[u] = 0;
    }
  }
  Lanes16 r;
  r.oh = _mm512_load_si512(voh);
  r.ow = _mm512_load_si512(vow);
  r.off = _mm512_load_si512(voff);
  r.live = static_cast<__mmask16>(live >= 16 ? 0xFFFFu : (1u << live) - 1u);
  r.run = live > 0 && (l0 + live - 1) / L == s0;
  r.first = static_cast<std::intptr_t>(voff[0]);
  return r;
}

/// The lanes of tap t inside its plane.
__attribute__((target("avx512f"), always_inline)) inline __mmask16 tap_mask(const ShiftedPlanes& sp,
                                                                            const Lanes16& ln,
                                                                            index_t t) {
  const __m512i vh = _mm512_set1_epi32(static_cast<std::int32_t>(sp.h));
  const __m512i vw = _mm512_set1_epi32(static_cast<std::int32_t>(sp.w));
  return _mm512_mask_cmplt_epu32_mask(
      _mm512_mask_cmplt_epu32_mask(ln.live, _mm512_add_epi32(ln.oh, _mm512_set1_epi32(sp.dh[t])),
                                   vh),
      _mm512_add_epi32(ln.ow, _mm512_set1_epi32(sp.dw[t])), vw);
}

/// The 16 values of row (group offset go, tap t) at the lanes ln under mask m.
__attribute__((target("avx512f"), always_inline)) inline __m512 tap_load(const ShiftedPlanes& sp,
                                                                         const Lanes16& ln,
                                                                         __mmask16 m, index_t at) {
  if (ln.run)  // masked-off lanes are not read: their addresses may lie outside the planes
    return _mm512_maskz_loadu_ps(
        m, reinterpret_cast<const float*>(reinterpret_cast<std::intptr_t>(sp.x) +
                                          std::intptr_t(sizeof(float)) * (ln.first + at)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m,
                                  _mm512_add_epi32(ln.off, _mm512_set1_epi32(std::int32_t(at))),
                                  sp.x, 4);
}

/// BPacker::pack for ShiftedPlanes: rows [p0, p0 + kc) of columns [j0, j0 + nc) into 32-lane
/// panels. The tap masks are computed once per panel; each panel row is then two masked loads
/// (16 consecutive columns within one sample) or gathers (columns across samples).
__attribute__((target("avx512f"))) inline void pack_shifted_b(const void* ctx, index_t p0,
                                                              index_t kc, index_t j0, index_t nc,
                                                              float* dst) {
  constexpr index_t NR = sgemm::BPacker::panel;
  const auto& sp = *static_cast<const ShiftedPlanes*>(ctx);
  const index_t T = sp.taps;
  for (index_t q = 0; q < nc; q += NR, dst += NR * kc) {
    Lanes16 ln[2];
    for (int v = 0; v < 2; ++v)
      ln[v] = lanes16(sp, j0 + q + 16 * v, std::clamp<index_t>(nc - q - 16 * v, 0, 16));
    __mmask16 mk[max_taps][2];
    for (index_t t = 0; t < T; ++t)
      for (int v = 0; v < 2; ++v) mk[t][v] = tap_mask(sp, ln[v], t);
    index_t g = p0 / T, t = p0 % T;
    index_t base = g * sp.group;
    if (ln[0].run && ln[1].run) {
      const std::intptr_t a0 =
          reinterpret_cast<std::intptr_t>(sp.x) + std::intptr_t(sizeof(float)) * ln[0].first;
      const std::intptr_t a1 =
          reinterpret_cast<std::intptr_t>(sp.x) + std::intptr_t(sizeof(float)) * ln[1].first;
      for (index_t p = 0; p < kc; ++p) {
        const std::intptr_t at = std::intptr_t(sizeof(float)) * (base + sp.off[t]);
        _mm512_store_ps(dst + p * NR,
                        _mm512_maskz_loadu_ps(mk[t][0], reinterpret_cast<const float*>(a0 + at)));
        _mm512_store_ps(dst + p * NR + 16,
                        _mm512_maskz_loadu_ps(mk[t][1], reinterpret_cast<const float*>(a1 + at)));
        if (++t == T) {
          t = 0;
          base += sp.group;
        }
      }
      continue;
    }
    for (index_t p = 0; p < kc; ++p) {
      for (int v = 0; v < 2; ++v)
        _mm512_store_ps(dst + p * NR + 16 * v, tap_load(sp, ln[v], mk[t][v], base + sp.off[t]));
      if (++t == T) {
        t = 0;
        base += sp.group;
      }
    }
  }
}

/// APacker::pack for ShiftedPlanes: rows [i0, i0 + mc), columns [p0, p0 + kc), as plain rows
/// (row r - i0 at dst + (r - i0) kc), 16 columns per masked load (or gather across samples).
__attribute__((target("avx512f"))) inline void pack_shifted_a(const void* ctx, index_t i0,
                                                              index_t mc, index_t p0, index_t kc,
                                                              float* dst) {
  const auto& sp = *static_cast<const ShiftedPlanes*>(ctx);
  const index_t T = sp.taps;
  constexpr index_t chunk = 16;  // vectors of columns per pass over the rows
  Lanes16 ln[chunk];
  for (index_t c0 = 0; c0 < kc; c0 += 16 * chunk) {
    const index_t vecs = std::min(chunk, (kc - c0 + 15) / 16);
    for (index_t v = 0; v < vecs; ++v)
      ln[v] = lanes16(sp, p0 + c0 + 16 * v, std::min<index_t>(16, kc - c0 - 16 * v));
    index_t g = i0 / T, t = i0 % T;
    index_t base = g * sp.group;
    for (index_t r = 0; r < mc; ++r) {
      float* d = dst + r * kc + c0;
      const index_t at = base + sp.off[t];
      for (index_t v = 0; v < vecs; ++v) {
        const __m512 val = tap_load(sp, ln[v], tap_mask(sp, ln[v], t), at);
        if (ln[v].live == 0xFFFF)
          _mm512_storeu_ps(d + 16 * v, val);
        else
          _mm512_mask_storeu_ps(d + 16 * v, ln[v].live, val);
      }
      if (++t == T) {
        t = 0;
        base += sp.group;
      }
    }
  }
}

#endif  // FLOWDIFF_SGEMM_X86

/// Whether the shifted-plane products run: the AVX-512 kernel, more than 4 rows of C, and
/// every offset within 31 bits (`reach`: floats from the operand's first to past its last).
inline bool shifted_available(index_t m, index_t reach) {
#if FLOWDIFF_SGEMM_X86
  return sgemm::best_isa() == sgemm::Isa::avx512 && m > 4 && reach < (index_t{1} << 30);
#else
  (void)m, (void)reach;
  return false;
#endif
}

/// C[m, ncols] (ldc) = A[m, groups taps] (lda) * the ShiftedPlanes columns [0, ncols).
/// cblock > 0: C in blocks of cblock columns, cstride apart (sgemm::Problem::cblock; a
/// multiple of sgemm::cblock_unit). Threads as gemm (serial inside a parallel region). Returns
/// false (nothing done) where shifted_available would be false.
inline bool shifted_gemm(const float* a, index_t lda, index_t m, const ShiftedPlanes& sp,
                         index_t groups, index_t ncols, float* c, index_t ldc,
                         index_t cblock = 0, index_t cstride = 0) {
#if FLOWDIFF_SGEMM_X86
  if (!shifted_available(m, (ncols / sp.plane() + 1) * sp.sample) || ncols <= 4) return false;
  const sgemm::BPacker packer{&pack_shifted_b, &sp};
  sgemm::Problem pr;
  pr.m = m;
  pr.n = ncols;
  pr.k = groups * sp.taps;
  pr.a = a;
  pr.lda = lda;
  pr.c = c;
  pr.ldc = ldc;
  pr.cblock = cblock;
  pr.cstride = cstride;
  pr.bpack = &packer;
  return sgemm::gemm(sgemm::Isa::avx512, pr);
#else
  (void)a, (void)lda, (void)m, (void)sp, (void)groups, (void)ncols, (void)c, (void)ldc;
  (void)cblock, (void)cstride;
  return false;
#endif
}

/// C[groups taps, m] (ldc) = cols dy^T + beta C with dy [m, ncols] (row-major, ld ncols) and the
/// ShiftedPlanes columns as the product's A (plain rows): the transposed weight gradient of a
/// convolution. bblock > 0: dy is the samples' [m, bblock] blocks, one after another (ncols a
/// multiple of bblock), read in place. Returns false (nothing done) where shifted_available
/// would be false for the groups * taps rows.
inline bool shifted_gemm_at(const float* dy, index_t m, const ShiftedPlanes& sp, index_t groups,
                            index_t ncols, float beta, float* c, index_t ldc,
                            index_t bblock = 0) {
#if FLOWDIFF_SGEMM_X86
  if (!shifted_available(groups * sp.taps, (ncols / sp.plane() + 1) * sp.sample) || m <= 4)
    return false;
  const sgemm::APacker packer{&pack_shifted_a, &sp};
  sgemm::Problem pr;
  pr.m = groups * sp.taps;
  pr.n = m;
  pr.k = ncols;
  pr.apack = &packer;
  pr.tb = true;  // op(B)[l, o] = dy[o, l]
  pr.b = dy;
  pr.ldb = bblock > 0 ? bblock : ncols;
  pr.bblock = bblock;
  pr.bstride = m * bblock;
  pr.beta = beta;
  pr.c = c;
  pr.ldc = ldc;
  return sgemm::gemm(sgemm::Isa::avx512, pr);
#else
  (void)dy, (void)m, (void)sp, (void)groups, (void)ncols, (void)beta, (void)c, (void)ldc;
  (void)bblock;
  return false;
#endif
}

/// The forward / weight-gradient operand of a k x k, padding-p, stride-2 convolution over the
/// phases xp [n, C, 4, Ho, Wo] of its input (split_phases): rows (c, i, j) as im2col's.
inline ShiftedPlanes forward_columns(const float* xp, index_t channels, index_t k, index_t p,
                                     index_t ho, index_t wo) {
  ShiftedPlanes sp;
  sp.x = xp;
  sp.h = ho;
  sp.w = wo;
  sp.group = 4 * ho * wo;
  sp.sample = channels * sp.group;
  for (index_t i = 0; i < k; ++i)
    for (index_t j = 0; j < k; ++j) {
      index_t ri, di, rj, dj;
      split_tap(i, p, ri, di);
      split_tap(j, p, rj, dj);
      sp.add_tap((2 * ri + rj) * ho * wo, di, dj);
    }
  return sp;
}

/// The operand of phase (ri, rj) of dx: rows (o, t) over dy [n, O, Ho, Wo], tap t the t-th
/// (i, j) of that phase in row-major order, read at (a - di, b - dj). Returns the taps' (i, j)
/// in ij[t] (ij = i k + j).
inline ShiftedPlanes dx_columns(const float* dy, index_t out_channels, index_t k, index_t p,
                                index_t ho, index_t wo, index_t ri, index_t rj, index_t* ij) {
  ShiftedPlanes sp;
  sp.x = dy;
  sp.h = ho;
  sp.w = wo;
  sp.group = ho * wo;
  sp.sample = out_channels * sp.group;
  for (index_t i = 0; i < k; ++i)
    for (index_t j = 0; j < k; ++j) {
      index_t r1, di, r2, dj;
      split_tap(i, p, r1, di);
      split_tap(j, p, r2, dj);
      if (r1 != ri || r2 != rj) continue;
      ij[sp.taps] = i * k + j;
      sp.add_tap(0, -di, -dj);
    }
  return sp;
}

/// The kernel of a stride-2 convolution's adjoint (its dx; a ConvTranspose2d's forward) in phase
/// form, per phase r = 2 ri + rj of the adjoint's output, in order: the block [co, ci T_r] with
/// wp_r[c, o T_r + t] = w[(o co + c) k k + ij_t] over the T_r taps of the phase (dx_columns'
/// order). w holds tap (i, j) from adjoint input channel o < ci to output channel c < co at
/// (o co + c) k k + i k + j: Conv2d's weight [O, C, k, k] (ci = O, co = C) and
/// ConvTranspose2d's [Cin, Cout, k, k] (ci = Cin, co = Cout) alike.   wp: ci co k k values
template <class T>
void adjoint_weights(const T* w, index_t ci, index_t co, index_t k, index_t p, T* wp) {
  index_t ij[max_taps];
  for (index_t r = 0; r < 4; ++r) {
    const auto sp = dx_columns(nullptr, ci, k, p, 1, 1, r / 2, r % 2, ij);
    for (index_t c = 0; c < co; ++c)
      for (index_t o = 0; o < ci; ++o)
        for (index_t t = 0; t < sp.taps; ++t)
          wp[(c * ci + o) * sp.taps + t] = w[(o * co + c) * k * k + ij[t]];
    wp += ci * co * sp.taps;
  }
}

#if FLOWDIFF_SGEMM_X86
/// The adjoint of a k x k, padding-p, stride-2 convolution in phase form, for n samples:
/// out [n, co, 2h, 2w] from in [n, ci, h, w] (a Conv2d's dx from dy, a ConvTranspose2d's y
/// before its bias from x). Phase r of out is adjoint_weights' block r times the shifted planes
/// of `in` (dx_columns), into ws (4 blocks [co, n h w]); merge_phases interleaves them into out.
/// Returns false (out untouched) where a product declines (shifted_gemm).
inline bool adjoint_products(const float* wp, const float* in, index_t ci, index_t co, index_t k,
                             index_t p, index_t h, index_t w, index_t n, float* ws, float* out) {
  const index_t cols = n * h * w, block = co * cols;
  index_t ij[max_taps];
  for (index_t r = 0; r < 4; ++r) {
    const auto sp = dx_columns(in, ci, k, p, h, w, r / 2, r % 2, ij);
    float* dst = ws + r * block;
    if (sp.taps == 0)  // no tap reads this phase (1 x 1 kernels): it is zero
      std::fill(dst, dst + block, 0.0f);
    else if (!shifted_gemm(wp, ci * sp.taps, co, sp, ci, cols, dst, cols))
      return false;
    wp += ci * co * sp.taps;
  }
  merge_phases(ws, block, n, co, h, w, out);
  return true;
}
#endif

}  // namespace flowdiff::nn::phase_detail
