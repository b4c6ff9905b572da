// flowdiff/nn/layers/conv.hpp — 2-d convolution as torch.nn.Conv2d (square kernel k, stride s,
// zero padding p, no dilation or groups), computed by im2col + GEMM. For a sample x_n: [C, H, W]
// the column matrix col(x_n): [C k k, Ho Wo] holds in row (c, i, j) and column (oh, ow) the input
// pixel x_n[c, oh s - p + i, ow s - p + j] (zero outside the image), Ho = (H + 2p - k) / s + 1, so
//   forward   y_n = W col(x_n) + b                          W: [O, C k k], y_n: [O, Ho Wo]
//   backward  dW += dy_n col(x_n)^T,  db += sum_{n,hw} dy,  dx_n = col2im(W^T dy_n)
// where col2im is the adjoint of im2col (it scatters each column entry back onto the pixel it came
// from, summing overlaps). Samples are processed in groups whose columns sit side by side in one
// [C k k, G Ho Wo] matrix, so small images (the low-resolution levels of a U-Net) still make one
// large GEMM; large images go one sample at a time to keep the workspace small. The column matrix
// is recomputed in backward (cheaper than caching it for the whole batch). Threads: when a batch
// makes several groups, one parallel region per call shares the groups out dynamically over the
// threads, each with its own workspace in the cache (allocated once) and single-threaded GEMMs
// inside; in backward the groups are cut into at most 8 contiguous chunks (by the batch shape
// only, never the thread count), chunk 0 accumulates into dW and every other chunk into its own
// partial, and the partials are added to dW in chunk order, so gradients are bit-identical for
// any thread count. A batch of one group runs serially with threaded GEMMs. Float on an AVX-512
// CPU skips the column matrix (implicit GEMM: sgemm packs its panels straight from the images,
// the same values, so the same bits), and dx of a stride-1 convolution is the convolution of dy
// with the flipped kernel (no col2im). Float 3 x 3, stride-1, padding-1 convolutions with at
// least 16 input and output channels run forward and dx by Winograd's F(2 x 2, 3 x 3) instead,
// and dW by F(3 x 3, 2 x 2) (with AVX-512 on images at least 16 wide), on every CPU
// (winograd.hpp: 2.25 times fewer multiply-adds; other roundings, as accurate;
// set_winograd(false) for the GEMM path). Float
// stride-2 convolutions of even images with an output half their size (3 x 3 padding 1, the
// U-Net's downsampling) split each group's input into its four phases and run forward and dW
// over them with plain masked loads, and dx as four phase products (conv_phases.hpp). This file
// also holds the im2col / col2im / channel-packing helpers shared with ConvTranspose2d.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/conv_phases.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/winograd.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace spatial_detail {

/// Throws shape_error "prefix (Kind): arg: expected shape <expected>, got <actual>".
template <class T>
void check_exact(std::string_view layer, std::string_view kind, std::string_view arg, View<T> x,
                 const Shape& expected) {
  if (!(x.shape() == expected))
    fail<shape_error>(layer, " (", kind, "): ", arg, ": expected shape ", expected, ", got ",
                      x.shape());
}

/// Throws shape_error unless x is [N, channels, H, W] (any N, H, W >= 1).
template <class T>
void check_nchw(std::string_view layer, std::string_view kind, std::string_view arg, View<T> x,
                index_t channels) {
  if (x.rank() != 4 || x.dim(1) != channels || x.dim(2) < 1 || x.dim(3) < 1)
    fail<shape_error>(layer, " (", kind, "): ", arg, ": expected shape [N, ", channels,
                      ", H, W], got ", x.shape());
}

/// Geometry of a convolution with a square kernel over a (height x width) image with `channels`
/// channels: its output is (out_h x out_w).
struct ConvGeometry {
  index_t channels = 0, height = 0, width = 0, kernel = 1, stride = 1, padding = 0;
  index_t out_h = 0, out_w = 0;
  index_t rows() const { return channels * kernel * kernel; }  // rows of the column matrix
  index_t cols() const { return out_h * out_w; }               // columns per sample
  bool identity() const { return kernel == 1 && stride == 1 && padding == 0; }
};

// The output columns ow whose input column ow*s - p + j lies inside [0, width): [lo, hi).
inline void valid_range(index_t j, index_t stride, index_t padding, index_t width, index_t out_w,
                        index_t& lo, index_t& hi) {
  // ow*s >= p - j  and  ow*s <= width - 1 + p - j
  const index_t a = padding - j;
  lo = a <= 0 ? 0 : (a + stride - 1) / stride;
  const index_t b = width - 1 + padding - j;
  hi = b < 0 ? 0 : std::min(out_w, b / stride + 1);
  if (lo > hi) lo = hi;
}

/// col[r, l] (row stride ld) = x[c, oh s - p + i, ow s - p + j] or 0, r = (c k + i) k + j,
/// l = oh out_w + ow.   x: [C, H, W], col: [C k k, >= Ho Wo]
template <class T>
void im2col(const T* x, const ConvGeometry& g, T* col, index_t ld) {
  const index_t k = g.kernel, s = g.stride, p = g.padding, H = g.height, W = g.width;
  const index_t oh_n = g.out_h, ow_n = g.out_w;
  // Each row in the widest vector instruction set (simd::vector_loop): pure copies, the same
  // bits in any set.
  auto row = [=](index_t r) FLOWDIFF_LAMBDA_INLINE {
    const index_t c = r / (k * k), i = (r / k) % k, j = r % k;
    index_t lo, hi;
    valid_range(j, s, p, W, ow_n, lo, hi);
    T* dst = col + r * ld;
    for (index_t oh = 0; oh < oh_n; ++oh, dst += ow_n) {
      const index_t ih = oh * s - p + i;
      if (ih < 0 || ih >= H) {
        std::fill(dst, dst + ow_n, T(0));
        continue;
      }
      const T* src = x + (c * H + ih) * W + j - p;  // src[ow * s] is pixel (ih, ow s - p + j)
      for (index_t ow = 0; ow < lo; ++ow) dst[ow] = T(0);
      if (s == 1) {
        for (index_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow];
      } else {
        for (index_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * s];
      }
      for (index_t ow = hi; ow < ow_n; ++ow) dst[ow] = T(0);
    }
  };
  Cpu::parallel_for(
      g.rows(),
      [=](index_t r) {
        simd::vector_loop(
            [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
              for (index_t q = lo; q < hi; ++q) row(q);
            },
            r, r + 1);
      },
      g.cols());
}

/// The adjoint of im2col: x (overwritten) = sum of every column entry on the pixel it reads.
/// Parallel over channels, so no two threads write the same pixel.   col: [C k k, >= Ho Wo]
template <class T>
void col2im(const T* col, index_t ld, const ConvGeometry& g, T* x) {
  const index_t k = g.kernel, s = g.stride, p = g.padding, H = g.height, W = g.width;
  const index_t oh_n = g.out_h, ow_n = g.out_w;
  // Each channel in the widest vector instruction set (simd::vector_loop); the sums onto a pixel
  // keep their (i, j, oh) order, so the bits are those of the baseline build.
  auto channel = [=](index_t c) FLOWDIFF_LAMBDA_INLINE {
    T* xc = x + c * H * W;
    std::fill(xc, xc + H * W, T(0));
    for (index_t i = 0; i < k; ++i)
      for (index_t j = 0; j < k; ++j) {
        index_t lo, hi;
        valid_range(j, s, p, W, ow_n, lo, hi);
        const T* src = col + ((c * k + i) * k + j) * ld;
        for (index_t oh = 0; oh < oh_n; ++oh, src += ow_n) {
          const index_t ih = oh * s - p + i;
          if (ih < 0 || ih >= H) continue;
          T* dst = xc + ih * W + j - p;
          if (s == 1) {
            for (index_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
          } else {
            for (index_t ow = lo; ow < hi; ++ow) dst[ow * s] += src[ow];
          }
        }
      }
  };
  Cpu::parallel_for(
      g.channels,
      [=](index_t c) {
        simd::vector_loop(
            [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
              for (index_t q = lo; q < hi; ++q) channel(q);
            },
            c, c + 1);
      },
      k * k * g.cols());
}

#if FLOWDIFF_SGEMM_X86
/// The column matrix of gn samples (columns l = sample L + oh out_w + ow, as im2col lays out a
/// group) as an implicit GEMM operand: sgemm packs its panels straight from the images.
struct ImplicitColumns {
  const float* x = nullptr;  // the group's first sample, [C, H, W] each
  ConvGeometry g;
  index_t plane = 0;  // elements per sample
};

/// d[0, 16) and d[16, 32) = the 16 floats at a0 and at a1 under masks m[0] and m[1] (zero where
/// off; masked-off lanes are not read).
__attribute__((target("avx512f"), always_inline)) inline void masked_row_pair(
    const __mmask16* m, std::intptr_t a0, std::intptr_t a1, float* d) {
  _mm512_store_ps(d, _mm512_maskz_loadu_ps(m[0], reinterpret_cast<const float*>(a0)));
  _mm512_store_ps(d + 16, _mm512_maskz_loadu_ps(m[1], reinterpret_cast<const float*>(a1)));
}

/// BPacker::pack for ImplicitColumns: rows r = (c, i, j) of columns [j0, j0 + nc) into 32-lane
/// panels. Each 16-lane half of a panel row is one masked load when its lanes are consecutive
/// pixels (stride 1, all in one output row, or in one sample of an output as wide as the input),
/// otherwise one masked gather; lanes
/// outside the image (padding) or beyond nc are zero. The values are im2col's, so the product
/// has the bits of im2col + GEMM.
__attribute__((target("avx512f"))) inline void pack_implicit_avx512(const void* ctx, index_t p0,
                                                                    index_t kc, index_t j0,
                                                                    index_t nc, float* dst) {
  constexpr index_t NR = sgemm::BPacker::panel;
  const auto& src = *static_cast<const ImplicitColumns*>(ctx);
  const ConvGeometry& g = src.g;
  const index_t k = g.kernel, kk = k * k, L = g.cols(), ow_n = g.out_w, W = g.width;
  const index_t HW = g.height * W;
  alignas(64) std::int32_t ih0[NR], iw0[NR], off[NR];
  const __m512i vh = _mm512_set1_epi32(static_cast<std::int32_t>(g.height));
  const __m512i vw = _mm512_set1_epi32(static_cast<std::int32_t>(W));
  for (index_t q = 0; q < nc; q += NR, dst += NR * kc) {
    const index_t lanes = std::min(NR, nc - q);
    // The lanes' (sample, oh, ow), stepped from the first one's (divisions once per panel).
    index_t gi = (j0 + q) / L, oh = ((j0 + q) % L) / ow_n, ow = (j0 + q) % ow_n;
    for (index_t t = 0; t < NR; ++t) {
      if (t < lanes) {
        const index_t h0 = oh * g.stride - g.padding, w0 = ow * g.stride - g.padding;
        ih0[t] = static_cast<std::int32_t>(h0);
        iw0[t] = static_cast<std::int32_t>(w0);
        off[t] = static_cast<std::int32_t>(gi * src.plane + h0 * W + w0);
        if (++ow == ow_n) {
          ow = 0;
          if (++oh == g.out_h) {
            oh = 0;
            ++gi;
          }
        }
      } else {  // never inside the image: (unsigned)(ih0 + i) >= H
        ih0[t] = std::numeric_limits<std::int32_t>::min() / 2;
        iw0[t] = 0;
        off[t] = 0;
      }
    }
    __m512i vih[2], viw[2], voff[2];
    bool run[2];  // the 16 lanes are consecutive pixels of one row
    // Stride 2: each 8-lane quarter of the half lies in one output row, so its lanes read every
    // other pixel of 16 consecutive ones: two 16-pixel masked loads (lanes 0-7 and 8-15) and one
    // permute keep the even pixels. pix[v][h]: the input column of pixel u of quarter h's load.
    bool run2[2];
    __m512i pix[2][2];
    for (int v = 0; v < 2; ++v) {
      vih[v] = _mm512_load_si512(ih0 + 16 * v);
      viw[v] = _mm512_load_si512(iw0 + 16 * v);
      voff[v] = _mm512_load_si512(off + 16 * v);
      // With stride 1 the lanes of one output row are consecutive pixels; when the output is as
      // wide as the input ("same" padding) so are those of consecutive rows of one sample.
      const index_t first = j0 + q + 16 * v;
      const bool one_row = first / ow_n == (first + 15) / ow_n;
      const bool one_sample = ow_n == W && first / L == (first + 15) / L;
      run[v] = g.stride == 1 && lanes >= 16 * (v + 1) && (one_row || one_sample);
      run2[v] = g.stride == 2 && lanes >= 16 * (v + 1) && first / ow_n == (first + 7) / ow_n &&
                (first + 8) / ow_n == (first + 15) / ow_n;
      for (int h = 0; h < 2; ++h)
        pix[v][h] = _mm512_add_epi32(_mm512_set1_epi32(iw0[16 * v + 8 * h]),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                       13, 14, 15));
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    index_t c = p0 / kk, i = (p0 % kk) / k, j = p0 % k;
    if (run[0] && run[1] && kk <= 64) {
      // Both halves are runs: the lanes' masks depend on (i, j) only, so they are computed once
      // per panel and each panel row is two masked loads.
      __mmask16 mk[64][2];
      for (index_t ij = 0; ij < kk; ++ij) {
        const __m512i vi = _mm512_set1_epi32(static_cast<std::int32_t>(ij / k));
        const __m512i vj = _mm512_set1_epi32(static_cast<std::int32_t>(ij % k));
        for (int v = 0; v < 2; ++v)
          mk[ij][v] = _mm512_cmplt_epu32_mask(_mm512_add_epi32(vih[v], vi), vh) &
                      _mm512_cmplt_epu32_mask(_mm512_add_epi32(viw[v], vj), vw);
      }
      // Row p = (c, ij) reads at the channel's base plus the tap's offset; the rows run channel
      // by channel, the k x k taps of a whole channel as one fixed-length (for 3 x 3 unrolled)
      // loop without index arithmetic.
      std::intptr_t tap[64];
      for (index_t ij = 0; ij < kk; ++ij)
        tap[ij] = std::intptr_t(sizeof(float)) * ((ij / k) * W + ij % k);
      const std::intptr_t chan = std::intptr_t(sizeof(float)) * HW;
      std::intptr_t base0 = reinterpret_cast<std::intptr_t>(src.x) +
                            std::intptr_t(sizeof(float)) * off[0] + c * chan;
      std::intptr_t base1 = reinterpret_cast<std::intptr_t>(src.x) +
                            std::intptr_t(sizeof(float)) * off[16] + c * chan;
      index_t p = 0;
      if (const index_t first = i * k + j; first > 0) {  // the rest of a channel begun earlier
        for (index_t ij = first; ij < kk && p < kc; ++ij, ++p)
          masked_row_pair(mk[ij], base0 + tap[ij], base1 + tap[ij], dst + p * NR);
        base0 += chan;
        base1 += chan;
      }
      if (kk == 9) {
        for (; p + 9 <= kc; p += 9, base0 += chan, base1 += chan) {
FLOWDIFF_SGEMM_UNROLL
          for (index_t ij = 0; ij < 9; ++ij)
            masked_row_pair(mk[ij], base0 + tap[ij], base1 + tap[ij], dst + (p + ij) * NR);
        }
      } else {
        for (; p + kk <= kc; p += kk, base0 += chan, base1 += chan)
          for (index_t ij = 0; ij < kk; ++ij)
            masked_row_pair(mk[ij], base0 + tap[ij], base1 + tap[ij], dst + (p + ij) * NR);
      }
      for (index_t ij = 0; p < kc; ++ij, ++p)  // a channel's first taps
        masked_row_pair(mk[ij], base0 + tap[ij], base1 + tap[ij], dst + p * NR);
      continue;
    }
    for (index_t p = 0; p < kc; ++p) {
      const index_t delta = c * HW + i * W + j;
      const __m512i vi = _mm512_set1_epi32(static_cast<std::int32_t>(i));
      const __m512i vj = _mm512_set1_epi32(static_cast<std::int32_t>(j));
      const __m512i vd = _mm512_set1_epi32(static_cast<std::int32_t>(delta));
      for (int v = 0; v < 2; ++v) {
        const __mmask16 inside = _mm512_cmplt_epu32_mask(_mm512_add_epi32(vih[v], vi), vh) &
                                 _mm512_cmplt_epu32_mask(_mm512_add_epi32(viw[v], vj), vw);
        __m512 val;
        if (run2[v]) {
          // Pixel u of quarter h: lane 8 h + u / 2 when u is even and inside the image.
          __m512 half[2];
          for (int h = 0; h < 2; ++h) {
            const index_t lane = 16 * v + 8 * h;
            const bool row_in = static_cast<std::uint32_t>(ih0[lane] + i) <
                                static_cast<std::uint32_t>(g.height);
            const __mmask16 m = _mm512_mask_cmplt_epu32_mask(
                row_in ? __mmask16(0x5555) : __mmask16(0), _mm512_add_epi32(pix[v][h], vj), vw);
            const std::intptr_t at = static_cast<std::intptr_t>(off[lane] + delta);
            half[h] = _mm512_maskz_loadu_ps(
                m, reinterpret_cast<const float*>(reinterpret_cast<std::intptr_t>(src.x) +
                                                  at * std::intptr_t(sizeof(float))));
          }
          val = _mm512_permutex2var_ps(half[0], even, half[1]);
        } else if (run[v]) {
          // Masked-off lanes are not read, so the address may lie in the padding.
          const std::intptr_t at = static_cast<std::intptr_t>(off[16 * v] + delta);
          val = _mm512_maskz_loadu_ps(
              inside, reinterpret_cast<const float*>(reinterpret_cast<std::intptr_t>(src.x) +
                                                     at * std::intptr_t(sizeof(float))));
        } else {
          val = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, _mm512_add_epi32(voff[v], vd),
                                         src.x, 4);
        }
        _mm512_store_ps(dst + p * NR + 16 * v, val);
      }
      if (++j == k) {
        j = 0;
        if (++i == k) {
          i = 0;
          ++c;
        }
      }
    }
  }
}

/// APacker::pack for ImplicitColumns: rows r = (c, i, j) of the column matrix, columns
/// [p0, p0 + kc), as plain rows (row r - i0 at dst + (r - i0) kc): the broadcast operand of the
/// weight gradient dW^T = col dy^T. Along a row the columns are consecutive pixels of one image
/// row within each output row, so stride 1 copies them with masked 16-lane loads (no gathers or
/// transposes), stride 2 with two masked loads and a permute that keeps every other pixel; other
/// strides gather. Padding and columns outside the image are zero: the values
/// of im2col.
__attribute__((target("avx512f"))) inline void pack_implicit_rows_avx512(const void* ctx,
                                                                         index_t i0, index_t mc,
                                                                         index_t p0, index_t kc,
                                                                         float* dst) {
  const auto& src = *static_cast<const ImplicitColumns*>(ctx);
  const ConvGeometry& g = src.g;
  const index_t k = g.kernel, kk = k * k, L = g.cols(), ow_n = g.out_w, W = g.width;
  const index_t H = g.height, HW = H * W, s = g.stride, pad = g.padding;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  if (s == 1 && ow_n == W && g.out_h == H && L % 16 == 0 && p0 % 16 == 0) {
    // "Same" convolution (stride 1, output the size of the input): output pixel l of a sample
    // reads input pixel l + (i - pad) W + (j - pad) of its channel, so 16 consecutive columns are
    // one masked load whatever rows they span; only the validity mask depends on (i, j). The
    // columns' coordinates and sample offsets are computed once per call, 256 at a time.
    constexpr index_t chunk = 256;
    alignas(64) std::int32_t voh[chunk], vow[chunk];
    std::int64_t voff[chunk / 16];
    const __m512i vh = _mm512_set1_epi32(static_cast<std::int32_t>(H));
    const __m512i vw = _mm512_set1_epi32(static_cast<std::int32_t>(W));
    for (index_t l0 = 0; l0 < kc; l0 += chunk) {
      const index_t len = std::min(chunk, kc - l0), vecs = (len + 15) / 16;
      // Stepped from the first column's coordinates (divisions once per 256 columns).
      const index_t first = p0 + l0;
      index_t gi = first / L, rem = first % L, oh = rem / W, ow = rem % W;
      for (index_t t = 0; t < len; ++t) {
        voh[t] = static_cast<std::int32_t>(oh);
        vow[t] = static_cast<std::int32_t>(ow);
        if (t % 16 == 0) voff[t / 16] = gi * src.plane + rem;
        ++rem;
        if (++ow == W) {
          ow = 0;
          if (++oh == H) {
            oh = 0;
            rem = 0;
            ++gi;
          }
        }
      }
      for (index_t t = len; t < vecs * 16; ++t) {  // never inside the image
        voh[t] = std::numeric_limits<std::int32_t>::min() / 2;
        vow[t] = 0;
      }
      index_t c = i0 / kk, i = (i0 % kk) / k, j = i0 % k;
      for (index_t r = 0; r < mc; ++r) {
        const __m512i di = _mm512_set1_epi32(static_cast<std::int32_t>(i - pad));
        const __m512i dj = _mm512_set1_epi32(static_cast<std::int32_t>(j - pad));
        const std::intptr_t base =
            reinterpret_cast<std::intptr_t>(src.x) +
            std::intptr_t(sizeof(float)) * (c * HW + (i - pad) * W + (j - pad));
        float* d = dst + r * kc + l0;
        for (index_t v = 0; v < vecs; ++v) {
          const __mmask16 inside =
              _mm512_cmplt_epu32_mask(_mm512_add_epi32(_mm512_load_si512(voh + 16 * v), di), vh) &
              _mm512_cmplt_epu32_mask(_mm512_add_epi32(_mm512_load_si512(vow + 16 * v), dj), vw);
          const __m512 val = _mm512_maskz_loadu_ps(
              inside, reinterpret_cast<const float*>(base + std::intptr_t(sizeof(float)) *
                                                                std::intptr_t(voff[v])));
          const index_t rest = len - 16 * v;
          if (rest >= 16)
            _mm512_storeu_ps(d + 16 * v, val);
          else
            _mm512_mask_storeu_ps(d + 16 * v, static_cast<__mmask16>((1u << rest) - 1u), val);
        }
        if (++j == k) {
          j = 0;
          if (++i == k) {
            i = 0;
            ++c;
          }
        }
      }
    }
    return;
  }
  // Divisions only once per call: the row (c, i, j) and the column position advance by steps.
  const index_t gi_0 = p0 / L, oh_0 = (p0 % L) / ow_n, ow_0 = p0 % ow_n;
  index_t c = i0 / kk, i = (i0 % kk) / k, j = i0 % k;
  index_t lo = 0, hi = 0;  // output columns ow whose input column lies inside the image
  valid_range(j, s, pad, W, ow_n, lo, hi);
  for (index_t r = 0; r < mc; ++r) {
    if (r > 0) {
      if (++j == k) {
        j = 0;
        if (++i == k) {
          i = 0;
          ++c;
        }
      }
      valid_range(j, s, pad, W, ow_n, lo, hi);
    }
    float* d = dst + r * kc;
    index_t l = p0, gi = gi_0, oh = oh_0, ow0 = ow_0;
    while (l < p0 + kc) {
      const index_t seg = std::min(ow_n - ow0, p0 + kc - l);  // the rest of this output row
      const index_t h = oh * s - pad + i;
      float* out = d + (l - p0);
      if (h < 0 || h >= H || hi <= lo) {
        std::memset(out, 0, sizeof(float) * static_cast<std::size_t>(seg));
      } else {
        // Input pixel of output column ow: srow[ow s - pad + j] (addresses of masked-off lanes
        // may lie outside the image: they are never read).
        const std::intptr_t srow = reinterpret_cast<std::intptr_t>(src.x) +
                                   std::intptr_t(sizeof(float)) * (gi * src.plane + c * HW + h * W);
        for (index_t q = 0; q < seg; q += 16) {
          const index_t ow = ow0 + q, n16 = std::min<index_t>(16, seg - q);
          const index_t a = std::clamp<index_t>(lo - ow, 0, n16);
          const index_t b = std::clamp<index_t>(hi - ow, 0, n16);
          const auto live = static_cast<__mmask16>((1u << n16) - 1u);
          const auto inside =
              static_cast<__mmask16>(b > a ? ((1u << b) - 1u) & ~((1u << a) - 1u) : 0u);
          __m512 v;
          if (s == 1) {
            v = _mm512_maskz_loadu_ps(
                inside, reinterpret_cast<const float*>(srow + std::intptr_t(sizeof(float)) *
                                                                  (ow - pad + j)));
          } else if (s == 2) {
            // Lane t reads pixel 2 t of the 32 from 2 ow - pad + j: two masked 16-pixel loads
            // (the even pixels of lanes [a, b)) and a permute that keeps the even ones.
            const std::uint64_t span = b > a ? ((std::uint64_t{1} << (2 * b)) - 1u) &
                                                   ~((std::uint64_t{1} << (2 * a)) - 1u)
                                             : 0u;
            const std::uint64_t m32 = span & 0x55555555u;
            const std::intptr_t at = srow + std::intptr_t(sizeof(float)) * (2 * ow - pad + j);
            const __m512 e0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m32 & 0xFFFFu),
                                                    reinterpret_cast<const float*>(at));
            const __m512 e1 = _mm512_maskz_loadu_ps(
                static_cast<__mmask16>(m32 >> 16),
                reinterpret_cast<const float*>(at + std::intptr_t(16 * sizeof(float))));
            v = _mm512_permutex2var_ps(e0, even, e1);
          } else {
            const __m512i idx = _mm512_add_epi32(
                _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(std::int32_t(ow))),
                                   _mm512_set1_epi32(std::int32_t(s))),
                _mm512_set1_epi32(std::int32_t(j - pad)));
            v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, idx,
                                         reinterpret_cast<const float*>(srow), 4);
          }
          _mm512_mask_storeu_ps(out + q, live, v);
        }
      }
      l += seg;
      ow0 += seg;
      if (ow0 == ow_n) {
        ow0 = 0;
        if (++oh == g.out_h) {
          oh = 0;
          ++gi;
        }
      }
    }
  }
}
#endif

/// Whether implicit_gemm_dwt runs: float with the AVX-512 kernel, m > 4 output channels,
/// C k k > 4 rows, offsets within 32 bits.
template <class T>
bool implicit_dwt_available(index_t m, const ConvGeometry& g, index_t plane, index_t gn) {
#if FLOWDIFF_SGEMM_X86
  if constexpr (std::is_same_v<T, float>)
    return sgemm::best_isa() == sgemm::Isa::avx512 && m > 4 && g.rows() > 4 &&
           gn * plane + g.height * g.width < (index_t{1} << 30);
#endif
  (void)m, (void)g, (void)plane, (void)gn;
  return false;
}

/// The weight gradient transposed, C[C k k, m] = col dy^T + beta C, with dy [m, gn L] and the
/// column matrix of samples x[0 .. gn) packed from the images as the product's A (plain rows:
/// no gathers for stride 1). Every element of C gets the FMAs of dy col^T in the same order, so
/// it holds exactly the transpose of what that product would. Returns false (nothing done) where
/// implicit_dwt_available is false. Threads as gemm (serial inside a parallel region).
/// bblock > 0: dy is the samples' [m, bblock] blocks one after another, read in place
/// (sgemm::Problem::bblock; bblock = L).
template <class T>
bool implicit_gemm_dwt(const T* dy, index_t m, const T* x, const ConvGeometry& g, index_t plane,
                       index_t gn, T beta, T* c, index_t ldc, index_t bblock = 0) {
#if FLOWDIFF_SGEMM_X86
  if constexpr (std::is_same_v<T, float>) {
    if (!implicit_dwt_available<T>(m, g, plane, gn)) return false;
    const ImplicitColumns cols{x, g, plane};
    const sgemm::APacker packer{&pack_implicit_rows_avx512, &cols};
    sgemm::Problem pr;
    pr.m = g.rows();
    pr.n = m;
    pr.k = gn * g.cols();
    pr.apack = &packer;
    pr.tb = true;  // op(B)[l, o] = dy[o, l]
    pr.b = dy;
    pr.ldb = bblock > 0 ? bblock : gn * g.cols();
    pr.bblock = bblock;
    pr.bstride = m * bblock;
    pr.beta = beta;
    pr.c = c;
    pr.ldc = ldc;
    return sgemm::gemm(sgemm::Isa::avx512, pr);
  }
#endif
  (void)dy, (void)m, (void)x, (void)g, (void)plane, (void)gn, (void)beta, (void)c, (void)ldc;
  (void)bblock;
  return false;
}

/// Whether implicit_gemm runs for T on this CPU (products with more than 4 rows).
template <class T>
bool implicit_available(index_t m) {
#if FLOWDIFF_SGEMM_X86
  if constexpr (std::is_same_v<T, float>) return m > 4 && sgemm::best_isa() == sgemm::Isa::avx512;
#endif
  (void)m;
  return false;
}

/// C[m, gn L] = A[m, K] * (the column matrix of samples x[0 .. gn)) without forming it (implicit
/// GEMM: sgemm packs the columns from the images), bit-identical to im2col + gemm. Float with the
/// AVX-512 kernel only, m > 4 and gn L > 4, offsets within 32 bits; returns false otherwise
/// (nothing done) and the caller takes im2col. Threads as gemm (serial inside a parallel region).
/// cblock > 0: C in blocks of cblock columns, cstride apart (sgemm::Problem::cblock; the
/// samples' outputs in place when cblock = L, a multiple of sgemm::cblock_unit).
template <class T>
bool implicit_gemm(const T* a, index_t m, const T* x, const ConvGeometry& g, index_t plane,
                   index_t gn, T* c, index_t ldc, index_t cblock = 0, index_t cstride = 0) {
#if FLOWDIFF_SGEMM_X86
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm::best_isa() != sgemm::Isa::avx512 || m <= 4 || gn * g.cols() <= 4) return false;
    const index_t reach = gn * plane + g.height * g.width;
    if (reach >= (index_t{1} << 30)) return false;
    const ImplicitColumns cols{x, g, plane};
    const sgemm::BPacker packer{&pack_implicit_avx512, &cols};
    sgemm::Problem pr;
    pr.m = m;
    pr.n = gn * g.cols();
    pr.k = g.rows();
    pr.a = a;
    pr.lda = g.rows();
    pr.c = c;
    pr.ldc = ldc;
    pr.cblock = cblock;
    pr.cstride = cstride;
    pr.bpack = &packer;
    return sgemm::gemm(sgemm::Isa::avx512, pr);
  }
#endif
  (void)a, (void)m, (void)x, (void)g, (void)plane, (void)gn, (void)c, (void)ldc, (void)cblock;
  (void)cstride;
  return false;
}

/// dst[c, g L + l] = src[g, c, l] for g < groups: the samples of a group side by side.
template <class T>
void pack_samples(const T* src, index_t groups, index_t channels, index_t len, T* dst) {
  const index_t ld = groups * len;
  Cpu::parallel_for(
      groups * channels,
      [=](index_t q) {
        const index_t g = q / channels, c = q % channels;
        std::copy(src + q * len, src + (q + 1) * len, dst + c * ld + g * len);
      },
      len);
}

/// dst[g, c, l] = src[c, g L + l] (+ bias[c] when bias is not null): the inverse of pack_samples.
template <class T>
void unpack_samples(const T* src, index_t groups, index_t channels, index_t len, T* dst,
                    const T* bias) {
  const index_t ld = groups * len;
  Cpu::parallel_for(
      groups * channels,
      [=](index_t q) {
        const index_t g = q / channels, c = q % channels;
        const T* s = src + c * ld + g * len;
        T* d = dst + q * len;
        if (bias) {
          const T bc = bias[c];
          for (index_t l = 0; l < len; ++l) d[l] = s[l] + bc;
        } else {
          std::copy(s, s + len, d);
        }
      },
      len);
}

/// y[q, l] += bias[q % channels] for q < rows: bias over the planes of an [N, C, L] tensor.
template <class T>
void add_channel_bias(T* y, index_t rows, index_t channels, index_t len, const T* bias) {
  Cpu::parallel_for(
      rows,
      [=](index_t q) {
        T* d = y + q * len;
        const T bc = bias[q % channels];
        for (index_t l = 0; l < len; ++l) d[l] += bc;
      },
      len);
}

/// db[c] += sum over n and l of dy[n, c, l].   dy: [N, C, L]
template <class T>
void accumulate_channel_sums(const T* dy, index_t n, index_t channels, index_t len, T* db) {
  Cpu::parallel_for(
      channels,
      [=](index_t c) {
        T acc = T(0);
        for (index_t i = 0; i < n; ++i) acc += kernels::sum8(dy + (i * channels + c) * len, len);
        db[c] += acc;
      },
      n * len);
}

/// How many samples share one GEMM: enough for about 1024 columns (GEMMs narrower than that run
/// well below peak), but a column workspace of at most 2^22 elements.
inline index_t group_size(index_t n, index_t rows, index_t cols) {
  index_t g = std::max<index_t>(1, 1024 / std::max<index_t>(1, cols));
  g = std::min(g, std::max<index_t>(1, (index_t{1} << 22) / std::max<index_t>(1, rows * cols)));
  return std::min(g, std::max<index_t>(1, n));
}

template <class T>
View<const T> mat(const T* p, index_t r, index_t c) {
  return View<const T>(p, Shape{r, c});
}
template <class T>
View<T> mat(T* p, index_t r, index_t c) {
  return View<T>(p, Shape{r, c});
}

}  // namespace spatial_detail

template <class T>
class Conv2d {
 public:
  /// Registers prefix.weight [out_ch, in_ch, kernel, kernel] and prefix.bias [out_ch].
  Conv2d(Parameters<T>& ps, const std::string& prefix, index_t in_ch, index_t out_ch,
         index_t kernel, index_t stride = 1, index_t padding = 0, bool bias = true)
      : prefix_(prefix),
        in_(in_ch),
        out_(out_ch),
        k_(kernel),
        s_(stride),
        p_(padding),
        bias_(bias) {
    require<config_error>(in_ch > 0 && out_ch > 0 && kernel > 0 && stride > 0 && padding >= 0,
                          prefix,
                          " (Conv2d): need in_ch, out_ch, kernel, stride >= 1 and "
                          "padding >= 0, got in_ch = ",
                          in_ch, ", out_ch = ", out_ch, ", kernel = ", kernel,
                          ", stride = ", stride, ", padding = ", padding);
    w_ = ps.add(prefix + ".weight", Shape{out_ch, in_ch, kernel, kernel});
    if (bias) b_ = ps.add(prefix + ".bias", Shape{out_ch});
  }

  index_t in_channels() const { return in_; }
  index_t out_channels() const { return out_; }
  index_t kernel() const { return k_; }
  index_t stride() const { return s_; }
  index_t padding() const { return p_; }
  bool has_bias() const { return bias_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }  // -1 without bias
  const std::string& prefix() const { return prefix_; }

  /// PyTorch's default (kaiming_uniform_ with a = sqrt(5)): W and b uniform in
  /// [-1/sqrt(fan_in), 1/sqrt(fan_in)], fan_in = in_ch k k.
  void init(Parameters<T>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(in_ * k_ * k_));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    if (bias_) fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  /// Workspaces, grown on demand and reused while shapes repeat.
  struct Cache {
    Tensor<T> col;  // [C k k, G Ho Wo] columns of a group of G samples (also dcol in backward)
    Tensor<T> out;  // [O, G Ho Wo] GEMM result / packed dy of a group (G > 1 only)
    // Threads 1, 2, ...: their own col / out (thread 0 uses the two above).
    std::vector<Tensor<T>> col_t, out_t;
    std::vector<Tensor<T>> dw;   // [O, C k k] weight-gradient partials of backward chunks 1, 2, ...
    std::vector<Tensor<T>> dwt;  // [C k k, O] per thread: a chunk's dW^T (implicit_gemm_dwt)
    Tensor<T> wf;  // [C, O k k] the flipped kernel of dx's implicit GEMM (stride 1), or the
                   // kernel's per-phase blocks of dx's phase products (stride 2)
  };

  /// Whether float 3 x 3, stride-1, padding-1 convolutions with at least 16 input and output
  /// channels run by Winograd on any CPU (winograd.hpp: forward and dx
  /// F(2 x 2, 3 x 3), dW F(3 x 3, 2 x 2), with AVX-512 on images at least 16 wide): 2.25 times
  /// fewer multiply-adds, other roundings than the GEMM path (bit-identical for any thread count
  /// either way). On by default.
  void set_winograd(bool on) { winograd_ = on; }
  bool winograd() const { return winograd_; }

  /// At most this many backward chunks (weight-gradient partials) per call.
  static constexpr index_t max_chunks = 8;

  /// [N, in, H, W] -> [N, out, Ho, Wo]; throws shape_error for a wrong input.
  Shape output_shape(const Shape& input) const {
    const auto g = geometry(input);
    return Shape{input[0], out_, g.out_h, g.out_w};
  }

  // x: [N, in, H, W] -> y: [N, out, Ho, Wo]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    using namespace spatial_detail;
    const auto g = geometry(x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows();
    check_exact(prefix_, "Conv2d", "y", View<const T>(y), Shape{n, out_, g.out_h, g.out_w});
    const T* w = ps.param(w_).data();
    const T* b = bias_ ? ps.param(b_).data() : nullptr;
    if (uses_winograd(g)) {  // (before prepare: no column workspaces)
      winograd_conv(w, x.data(), b, y.data(), in_, out_, n, g);
      return;
    }
    const index_t G = group_size(n, K, L), groups = (n + G - 1) / G;
    const index_t team = prepare(cache, G, K, L, groups, 0);
    Cpu::parallel_tasks(groups, team, [&](index_t q, index_t tid) {
      const index_t n0 = q * G, gn = std::min(G, n - n0), cols = gn * L;
      T* colw = workspace(cache, tid, false);
      T* outw = workspace(cache, tid, true);
      if (!g.identity()) {  // implicit GEMM where it runs (same bits as im2col + gemm)
        const index_t plane = in_ * g.height * g.width;
        const T* xg = x.data() + n0 * plane;
        T* yn = y.data() + n0 * out_ * L;
        // Straight into y when every sample's L columns are whole tiles of the product (no
        // unpacking of the group's [O, gn L] afterwards), else through outw.
        const bool direct = gn == 1 || L % sgemm::cblock_unit == 0;
        if (phased(g) && phase_forward(w, xg, g, gn, colw, direct ? yn : outw, direct)) {
          if (direct) {
            if (b) add_channel_bias(yn, gn * out_, out_, L, b);
          } else {
            unpack_samples(outw, gn, out_, L, yn, b);
          }
          return;
        }
        if (direct && implicit_gemm(w, out_, xg, g, plane, gn, yn, L, gn > 1 ? L : 0, out_ * L)) {
          if (b) add_channel_bias(yn, gn * out_, out_, L, b);
          return;
        }
        if (!direct && implicit_gemm(w, out_, xg, g, plane, gn, outw, cols)) {
          unpack_samples(outw, gn, out_, L, yn, b);
          return;
        }
      }
      const T* col = columns(x, g, n0, gn, colw);
      if (gn == 1) {
        T* yn = y.data() + n0 * out_ * L;
        gemm(Trans::no, Trans::no, T(1), mat(w, out_, K), mat(col, K, L), T(0), mat(yn, out_, L));
        if (b) add_channel_bias(yn, out_, out_, L, b);
      } else {
        gemm(Trans::no, Trans::no, T(1), mat(w, out_, K), mat(col, K, cols), T(0),
             mat(outw, out_, cols));
        unpack_samples(outw, gn, out_, L, y.data() + n0 * out_ * L, b);
      }
    });
  }

  // x: [N, in, H, W], dy: [N, out, Ho, Wo], dx: [N, in, H, W] or empty.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    using namespace spatial_detail;
    const auto g = geometry(x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows();
    check_exact(prefix_, "Conv2d", "dy", dy, Shape{n, out_, g.out_h, g.out_w});
    if (!dx.empty()) check_exact(prefix_, "Conv2d", "dx", View<const T>(dx), x.shape());
    const T* w = ps.param(w_).data();
    T* dw = ps.grad(w_).data();
    if (bias_) accumulate_channel_sums(dy.data(), n, out_, L, ps.grad(b_).data());
    bool want_dx = !dx.empty();
    if (uses_winograd(g)) {  // (before prepare: no column workspaces or partials)
      if (want_dx) {  // dx: the convolution of dy with the flipped kernel, O -> C channels
        flip_kernel(w, cache.wf);
        winograd_conv(cache.wf.data(), dy.data(), nullptr, dx.data(), out_, in_, n, g);
        want_dx = false;
      }
      // dW by Winograd F(3x3, 2x2) where rows have at least 8 tiles (16 pixels), or on any
      // width without AVX-512: on narrower images most of the AVX-512 transforms' 16 lanes idle
      // and the implicit GEMM is as fast, while the AVX2 path has no implicit GEMM (an 8x8
      // layer's backward, 128 channels, batch 64: 12.7 ms by im2col, 10.7 by Winograd).
      if (g.width >= 16 || simd::best_isa() != simd::Isa::avx512) {
        winograd_weight_gradient(x.data(), dy.data(), dw, n, g);
        return;
      }
    }
    const index_t G = group_size(n, K, L), groups = (n + G - 1) / G;
    const index_t chunks = std::min(groups, max_chunks);
    const index_t team = prepare(cache, G, K, L, chunks, chunks - 1);
    // dx of a stride-1 convolution is the convolution of dy with the flipped, transposed kernel
    // (padding k - 1 - p): one implicit GEMM instead of W^T dy and col2im.
    const bool flipped =
        want_dx && s_ == 1 && p_ <= k_ - 1 && !g.identity() && implicit_available<T>(in_);
    ConvGeometry gf;
    if (flipped) {
      gf.channels = out_;
      gf.height = g.out_h;
      gf.width = g.out_w;
      gf.kernel = k_;
      gf.stride = 1;
      gf.padding = k_ - 1 - p_;
      gf.out_h = g.height;
      gf.out_w = g.width;
      flip_kernel(w, cache.wf);
    }
    const T* wf = flipped ? cache.wf.data() : nullptr;
    // dx of a stride-2 convolution in phase form: four products over shifted planes of dy, one
    // per phase of dx (conv_phases.hpp), instead of W^T dy and col2im.
    const bool phased_dx = want_dx && phased(g) && in_ > 4;
    if (phased_dx) phase_weights(w, cache.wf);
    // dW^T = col dy^T with the columns packed from the images (implicit_gemm_dwt), accumulated
    // in a per-thread [K, O] buffer: chunk 0 starts from dW^T, the others from zero; the result
    // is transposed back at the chunk's end (exact copies, so dW gets the same sums as dy col^T).
    const index_t plane = in_ * g.height * g.width;
    const bool implicit_dw = !g.identity() && implicit_dwt_available<T>(out_, g, plane, G);
    if (implicit_dw) {
      if (cache.dwt.size() < static_cast<std::size_t>(team))
        cache.dwt.resize(static_cast<std::size_t>(team));
      for (auto& t : cache.dwt)
        if (t.numel() < K * out_) t.resize(Shape{K * out_});
    }
    Cpu::parallel_tasks(chunks, team, [&](index_t c, index_t tid) {
      // Chunk c: groups [c groups / chunks, (c + 1) groups / chunks), into dW or its partial.
      const index_t q0 = c * groups / chunks, q1 = (c + 1) * groups / chunks;
      T* dwc = c == 0 ? dw : cache.dw[static_cast<std::size_t>(c - 1)].data();
      T* colw = workspace(cache, tid, false);
      T* outw = workspace(cache, tid, true);
      T* dwt = implicit_dw ? cache.dwt[static_cast<std::size_t>(tid)].data() : nullptr;
      if (implicit_dw && c == 0) transpose(dw, out_, K, dwt);
      for (index_t q = q0; q < q1; ++q) {
        const index_t n0 = q * G, gn = std::min(G, n - n0), cols = gn * L;
        const T* dyg = dy.data() + n0 * out_ * L;
        // The group's dy as one [O, gn L] matrix (the columns' layout), packed only for the
        // products that need it stored so: the implicit weight gradients read the samples'
        // [O, L] blocks in place (sgemm::Problem::bblock).
        const T* dyp = gn == 1 ? dyg : nullptr;
        auto packed_dy = [&] {
          if (dyp == nullptr) {
            pack_samples(dyg, gn, out_, L, outw);
            dyp = outw;
          }
          return dyp;
        };
        const index_t bblock = gn > 1 ? L : 0;
        const T beta = c == 0 || q > q0 ? T(1) : T(0);
        if (implicit_dw) {
          const T* xg = x.data() + n0 * plane;
          if (!(phased(g) && phase_dwt(dyg, xg, g, gn, beta, colw, dwt, bblock)))
            implicit_gemm_dwt(dyg, out_, xg, g, plane, gn, beta, dwt, out_, bblock);
        } else {
          const T* col = columns(x, g, n0, gn, colw);
          gemm(Trans::no, Trans::yes, T(1), mat(packed_dy(), out_, cols), mat(col, K, cols), beta,
               mat(dwc, out_, K));
        }
        if (!want_dx) continue;
        T* dxn = dx.data() + n0 * in_ * g.height * g.width;
        if (g.identity() && gn == 1) {  // col2im is the identity: write dx directly
          gemm(Trans::yes, Trans::no, T(1), mat(w, out_, K), mat(packed_dy(), out_, cols), T(0),
               mat(dxn, K, cols));
          continue;
        }
        if (flipped) {  // dx = conv(dy, flipped kernel), each sample's block in place where
                        // it is whole tiles, else through the columns' buffer
          const index_t hw = g.height * g.width;
          const T* dyx = dy.data() + n0 * out_ * L;
          const bool direct = gn == 1 || hw % sgemm::cblock_unit == 0;
          const bool done = direct ? implicit_gemm(wf, in_, dyx, gf, out_ * L, gn, dxn, hw,
                                                   gn > 1 ? hw : 0, in_ * hw)
                                   : implicit_gemm(wf, in_, dyx, gf, out_ * L, gn, colw, gn * hw);
          if (done) {
            if (!direct) unpack_samples(colw, gn, in_, hw, dxn, static_cast<const T*>(nullptr));
            continue;
          }
        }
        // The columns are no longer needed: their buffer takes dx's phases or dcol.
        if (phased_dx && phase_dx(cache.wf.data(), dy.data() + n0 * out_ * L, g, gn, colw, dxn))
          continue;
        T* dcol = colw;
        gemm(Trans::yes, Trans::no, T(1), mat(w, out_, K), mat(packed_dy(), out_, cols), T(0),
             mat(dcol, K, cols));
        for (index_t i = 0; i < gn; ++i)
          col2im(dcol + i * L, cols, g, dxn + i * in_ * g.height * g.width);
      }
      if (implicit_dw) transpose(dwt, K, out_, dwc);
    });
    // The partials in chunk order: the same sums whatever the thread count.
    if (chunks > 1) {
      const index_t wn = out_ * K;
      Cpu::parallel_chunks(wn, [&](index_t lo, index_t hi) {
        for (index_t c = 1; c < chunks; ++c) {
          const T* p = cache.dw[static_cast<std::size_t>(c - 1)].data();
          for (index_t i = lo; i < hi; ++i) dw[i] += p[i];
        }
      });
    }
  }

 private:
  // Whether this convolution runs over the phases of its input (conv_phases.hpp): float on the
  // AVX-512 kernel, stride 2 in phase form, a kernel of at least 2 x 2 (the phases, as large as
  // the input, then fit the columns' workspace of C k k G Ho Wo floats).
  bool phased(const spatial_detail::ConvGeometry& g) const {
    if constexpr (std::is_same_v<T, float>)
      return k_ >= 2 &&
             phase_detail::phase_form(k_, s_, p_, g.height, g.width, g.out_h, g.out_w) &&
             phase_detail::shifted_available(out_, 0);
    (void)g;
    return false;
  }

  // y's group (gn samples; dst [O, gn Ho Wo], or with per_sample the samples' [gn, O, Ho Wo]
  // in place: Ho Wo a multiple of sgemm::cblock_unit) = W col(x) over the phases of x, split
  // into ws.
  bool phase_forward(const T* w, const T* xg, const spatial_detail::ConvGeometry& g, index_t gn,
                     T* ws, T* dst, bool per_sample) const {
#if FLOWDIFF_SGEMM_X86
    if constexpr (std::is_same_v<T, float>) {
      const index_t L = g.cols(), cols = gn * L;
      phase_detail::split_phases(xg, gn * in_, g.height, g.width, ws);
      const auto sp = phase_detail::forward_columns(ws, in_, k_, p_, g.out_h, g.out_w);
      if (per_sample && gn > 1)  // dst: the group's [gn, O, L]
        return phase_detail::shifted_gemm(w, g.rows(), out_, sp, in_, cols, dst, L, L, out_ * L);
      return phase_detail::shifted_gemm(w, g.rows(), out_, sp, in_, cols, dst, cols);
    }
#endif
    (void)w, (void)xg, (void)g, (void)gn, (void)ws, (void)dst, (void)per_sample;
    return false;
  }

  // dwt [C k k, O] = col(x) dy^T + beta dwt over the phases of the group's x, split into ws;
  // dyg: [O, gn Ho Wo], or with bblock = Ho Wo the samples' [O, Ho Wo] one after another.
  bool phase_dwt(const T* dyg, const T* xg, const spatial_detail::ConvGeometry& g, index_t gn,
                 T beta, T* ws, T* dwt, index_t bblock) const {
#if FLOWDIFF_SGEMM_X86
    if constexpr (std::is_same_v<T, float>) {
      phase_detail::split_phases(xg, gn * in_, g.height, g.width, ws);
      const auto sp = phase_detail::forward_columns(ws, in_, k_, p_, g.out_h, g.out_w);
      return phase_detail::shifted_gemm_at(dyg, out_, sp, in_, gn * g.cols(), beta, dwt, out_,
                                           bblock);
    }
#endif
    (void)dyg, (void)xg, (void)g, (void)gn, (void)beta, (void)ws, (void)dwt, (void)bblock;
    return false;
  }

  // The kernel's per-phase blocks of dx's phase products (phase_detail::adjoint_weights).
  void phase_weights(const T* w, Tensor<T>& wp) const {
    if (wp.numel() != in_ * out_ * k_ * k_) wp.resize(Shape{in_, out_ * k_ * k_});
    phase_detail::adjoint_weights(w, out_, in_, k_, p_, wp.data());
  }

  // The group's dx [gn, C, H, W] from dy [gn, O, Ho, Wo]: the adjoint's phase products
  // (phase_detail::adjoint_products) into ws, interleaved into dxn.
  bool phase_dx(const T* wp, const T* dyg, const spatial_detail::ConvGeometry& g, index_t gn,
                T* ws, T* dxn) const {
#if FLOWDIFF_SGEMM_X86
    if constexpr (std::is_same_v<T, float>)
      return phase_detail::adjoint_products(wp, dyg, out_, in_, k_, p_, g.out_h, g.out_w, gn, ws,
                                            dxn);
#endif
    (void)wp, (void)dyg, (void)g, (void)gn, (void)ws, (void)dxn;
    return false;
  }

  bool uses_winograd(const spatial_detail::ConvGeometry& g) const {
    if constexpr (std::is_same_v<T, float>)
      return winograd_ && k_ == 3 && s_ == 1 && p_ == 1 && in_ >= 16 && out_ >= 16 &&
             g.out_h == g.height && g.out_w == g.width;
    (void)g;
    return false;
  }

  // y = conv3x3(x, w) (+ bias) by Winograd, w: [co, ci, 3, 3] (W itself, or the flipped kernel
  // for dx), x: [n, ci, H, W], y: [n, co, H, W]; u takes the transformed kernel.
  // (Its buffers are winograd_detail::scratch(), shared by all layers, not the layer's cache.)
  void winograd_conv(const T* w, const T* x, const T* bias, T* y, index_t ci, index_t co,
                     index_t n, const spatial_detail::ConvGeometry& g) const {
    if constexpr (std::is_same_v<T, float>) {
      const auto plan = winograd_detail::plan(n, ci, co, g.height, g.width);
      float* const u = winograd_detail::scratch(1, 16 * ci * co);
      const index_t team = std::max<index_t>(1, std::min<index_t>(plan.blocks, Cpu::max_threads()));
#if FLOWDIFF_X86_DISPATCH
      if (simd::best_isa() == simd::Isa::avx512) {
        winograd_detail::transform_weights_avx512(w, co, ci, u);
        winograd_detail::convolve(plan, x, u, bias, y, team);
        return;
      }
      if (simd::best_isa() == simd::Isa::avx2)
        winograd_detail::transform_weights_avx2(w, co, ci, u);
      else
#endif
        winograd_detail::transform_weights(w, co, ci, u);
      // AVX2 and CPUs without flowdiff's kernels: plain-row transforms and products
      winograd_detail::convolve_rows(plan, x, u, bias, y, team);
      return;
    }
    (void)w, (void)x, (void)bias, (void)y, (void)ci, (void)co, (void)n, (void)g;
    fail<std::logic_error>("Conv2d: Winograd is float only");
  }

  // dW += the weight gradient of x [n, C, H, W] and dy [n, O, H, W] by Winograd F(3x3, 2x2).
  void winograd_weight_gradient(const T* x, const T* dy, T* dw, index_t n,
                                const spatial_detail::ConvGeometry& g) const {
    if constexpr (std::is_same_v<T, float>) {
      const auto plan = winograd_detail::plan(n, in_, out_, g.height, g.width);
      const index_t chunks = std::min(plan.blocks, max_chunks);
      const index_t team = std::max<index_t>(1, std::min<index_t>(chunks, Cpu::max_threads()));
      winograd_detail::weight_gradient(plan, x, dy, dw, team, chunks);
      return;
    }
    (void)x, (void)dy, (void)dw, (void)n, (void)g;
    fail<std::logic_error>("Conv2d: Winograd is float only");
  }

  spatial_detail::ConvGeometry geometry(const Shape& s) const {
    if (s.rank() != 4 || s[1] != in_ || s[2] + 2 * p_ < k_ || s[3] + 2 * p_ < k_)
      fail<shape_error>(prefix_, " (Conv2d): x: expected shape [N, ", in_,
                        ", H, W] with H, W >= ", std::max<index_t>(1, k_ - 2 * p_), ", got ", s);
    spatial_detail::ConvGeometry g;
    g.channels = in_;
    g.height = s[2];
    g.width = s[3];
    g.kernel = k_;
    g.stride = s_;
    g.padding = p_;
    g.out_h = (s[2] + 2 * p_ - k_) / s_ + 1;
    g.out_w = (s[3] + 2 * p_ - k_) / s_ + 1;
    return g;
  }

  // Sizes the workspaces of up to min(tasks, threads) threads and `partials` weight-gradient
  // partials (grow only: a smaller batch later reuses them); returns that team size.
  index_t prepare(Cache& cache, index_t G, index_t K, index_t L, index_t tasks,
                  index_t partials) const {
    const index_t team = std::max<index_t>(1, std::min<index_t>(tasks, Cpu::max_threads()));
    auto grow = [](Tensor<T>& t, index_t size) {
      if (t.numel() < size) t.resize(Shape{size});
    };
    if (cache.col_t.size() < static_cast<std::size_t>(team - 1)) {
      cache.col_t.resize(static_cast<std::size_t>(team - 1));
      cache.out_t.resize(static_cast<std::size_t>(team - 1));
    }
    for (index_t t = 0; t < team; ++t) {
      grow(t == 0 ? cache.col : cache.col_t[static_cast<std::size_t>(t - 1)], K * G * L);
      if (G > 1)
        grow(t == 0 ? cache.out : cache.out_t[static_cast<std::size_t>(t - 1)], out_ * G * L);
    }
    if (cache.dw.size() < static_cast<std::size_t>(partials))
      cache.dw.resize(static_cast<std::size_t>(partials));
    for (index_t c = 0; c < partials; ++c) grow(cache.dw[static_cast<std::size_t>(c)], out_ * K);
    return team;
  }

  // wf[c, (o k + i) k + j] = W[o, c, k - 1 - i, k - 1 - j]: dx = conv(dy, wf, padding k - 1 - p).
  void flip_kernel(const T* w, Tensor<T>& wf) const {
    if (wf.numel() != in_ * out_ * k_ * k_) wf.resize(Shape{in_, out_ * k_ * k_});
    T* f = wf.data();
    for (index_t c = 0; c < in_; ++c)
      for (index_t o = 0; o < out_; ++o)
        for (index_t i = 0; i < k_; ++i)
          for (index_t j = 0; j < k_; ++j)
            f[((c * out_ + o) * k_ + i) * k_ + j] =
                w[((o * in_ + c) * k_ + (k_ - 1 - i)) * k_ + (k_ - 1 - j)];
  }

  // dst[j, i] = src[i, j] for src [rows, cols].
  static void transpose(const T* src, index_t rows, index_t cols, T* dst) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
  }

  static T* workspace(Cache& cache, index_t tid, bool out) {
    if (tid == 0) return out ? cache.out.data() : cache.col.data();
    auto& v = out ? cache.out_t : cache.col_t;
    return v[static_cast<std::size_t>(tid - 1)].data();
  }

  // The column matrix [K, gn L] of samples n0 .. n0 + gn - 1 in `ws` (x itself for 1x1
  // convolutions of one sample).
  const T* columns(View<const T> x, const spatial_detail::ConvGeometry& g, index_t n0, index_t gn,
                   T* ws) const {
    const index_t plane = in_ * g.height * g.width, L = g.cols();
    const T* xn = x.data() + n0 * plane;
    if (g.identity()) {
      if (gn == 1) return xn;
      spatial_detail::pack_samples(xn, gn, in_, L, ws);
      return ws;
    }
    for (index_t i = 0; i < gn; ++i) spatial_detail::im2col(xn + i * plane, g, ws + i * L, gn * L);
    return ws;
  }

  std::string prefix_;
  index_t in_, out_, k_, s_, p_;
  bool bias_;
  bool winograd_ = true;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
