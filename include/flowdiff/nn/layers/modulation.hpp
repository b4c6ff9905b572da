// flowdiff/nn/layers/modulation.hpp — the glue between layers: adaptive scale/shift modulation
// (FiLM / adaLN), residual addition and channel concatenation, each with its backward.
// Modulation, with per-sample, per-channel scale and shift s, b: [N, C] broadcast over the S
// other positions of x ([N, C, ...] channels-first as in a U-Net, or [N, ..., C] channels-last as
// in DiT's tokens):
//   forward   y = x (1 + s) + b
//   backward  dx = dy (1 + s),  ds[n, c] = sum_S dy x,  db[n, c] = sum_S dy
// Residual add: y = a + b; backward da = db = dy. Concatenation along axis 1 (channels):
//   y = [a, b] for a: [N, Ca, ...], b: [N, Cb, ...]; backward splits dy into da and db.
// Backward functions overwrite their outputs; an empty gradient view is skipped. To fan a gradient
// into a tensor that already holds one (a skip connection), use accumulate(dst, src).
#pragma once

#include <type_traits>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

/// Where the channel axis of a modulated tensor is.
enum class ChannelAxis { first, last };  // [N, C, ...] or [N, ..., C]

namespace detail {
// Validates x against scale/shift [N, C] and returns (C, S).
template <class T>
void modulation_dims(const char* what, View<const T> x, const Shape& ss, ChannelAxis axis,
                     index_t& c, index_t& s) {
  require<shape_error>(ss.rank() == 2, what, ": scale/shift: expected shape [N, C], got ", ss);
  c = ss[1];
  const int ax = axis == ChannelAxis::first ? 1 : x.rank() - 1;
  require<shape_error>(x.rank() >= 2 && x.dim(0) == ss[0] && x.dim(ax) == c, what,
                       ": x: expected shape ",
                       axis == ChannelAxis::first ? "[N, C, ...]" : "[N, ..., C]",
                       " with N = ", ss[0], ", C = ", c, ", got ", x.shape());
  s = x.row_size() / c;
}
}  // namespace detail

// x: [N, C, ...] (first) or [N, ..., C] (last); scale, shift: [N, C]; y: shape of x (may alias x)
template <class T>
void modulate_forward(std::type_identity_t<View<const T>> x,
                      std::type_identity_t<View<const T>> scale,
                      std::type_identity_t<View<const T>> shift, View<T> y,
                      ChannelAxis axis = ChannelAxis::first) {
  index_t c = 0, s = 0;
  detail::modulation_dims("modulate_forward", x, scale.shape(), axis, c, s);
  check_same_shape("modulate_forward", "scale", scale, "shift", shift);
  check_same_shape("modulate_forward", "x", x, "y", y);
  const T* px = x.data();
  const T* ps = scale.data();
  const T* pb = shift.data();
  T* py = y.data();
  const bool first = axis == ChannelAxis::first;
  // Row by row over the contiguous axis (positions for channels-first, channels for -last), so
  // the inner loops vectorise and no index is divided per element.
  Cpu::parallel_for(
      x.dim(0),
      [=](index_t n) {
        const index_t o = n * c * s;
        const T* sc = ps + n * c;
        const T* sh = pb + n * c;
        if (first) {
          for (index_t ch = 0; ch < c; ++ch) {
            const T a = T(1) + sc[ch], b = sh[ch];
            const T* xr = px + o + ch * s;
            T* yr = py + o + ch * s;
            FLOWDIFF_SIMD
            for (index_t j = 0; j < s; ++j) yr[j] = xr[j] * a + b;
          }
        } else {
          for (index_t p = 0; p < s; ++p) {
            const T* xr = px + o + p * c;
            T* yr = py + o + p * c;
            FLOWDIFF_SIMD
            for (index_t j = 0; j < c; ++j) yr[j] = xr[j] * (T(1) + sc[j]) + sh[j];
          }
        }
      },
      2 * c * s);
}

// x, dy: shape of x; scale: [N, C]; dx: shape of x or empty; dscale, dshift: [N, C] or empty.
template <class T>
void modulate_backward(std::type_identity_t<View<const T>> x,
                       std::type_identity_t<View<const T>> scale,
                       std::type_identity_t<View<const T>> dy, View<T> dx, View<T> dscale,
                       View<T> dshift, ChannelAxis axis = ChannelAxis::first) {
  index_t c = 0, s = 0;
  detail::modulation_dims("modulate_backward", x, scale.shape(), axis, c, s);
  check_same_shape("modulate_backward", "x", x, "dy", dy);
  if (!dx.empty()) check_same_shape("modulate_backward", "x", x, "dx", dx);
  if (!dscale.empty()) check_same_shape("modulate_backward", "scale", scale, "dscale", dscale);
  if (!dshift.empty()) check_same_shape("modulate_backward", "scale", scale, "dshift", dshift);
  const T* px = x.data();
  const T* ps = scale.data();
  const T* pg = dy.data();
  T* pdx = dx.empty() ? nullptr : dx.data();
  T* pds = dscale.empty() ? nullptr : dscale.data();
  T* pdb = dshift.empty() ? nullptr : dshift.data();
  const bool first = axis == ChannelAxis::first;
  Cpu::parallel_for(
      x.dim(0),
      [=](index_t n) {
        const index_t o = n * c * s;
        const T* sc = ps + n * c;
        T* dsr = pds ? pds + n * c : nullptr;
        T* dbr = pdb ? pdb + n * c : nullptr;
        if (first) {
          for (index_t ch = 0; ch < c; ++ch) {
            const T a = T(1) + sc[ch];
            const T* xr = px + o + ch * s;
            const T* gr = pg + o + ch * s;
            T sg = T(0), sb = T(0);
            for (index_t j = 0; j < s; ++j) {
              sg += gr[j] * xr[j];
              sb += gr[j];
            }
            if (dsr) dsr[ch] = sg;
            if (dbr) dbr[ch] = sb;
            if (pdx) {  // after the sums: dx may alias dy
              T* dxr = pdx + o + ch * s;
              FLOWDIFF_SIMD
              for (index_t j = 0; j < s; ++j) dxr[j] = gr[j] * a;
            }
          }
        } else {
          if (dsr)
            for (index_t ch = 0; ch < c; ++ch) dsr[ch] = T(0);
          if (dbr)
            for (index_t ch = 0; ch < c; ++ch) dbr[ch] = T(0);
          for (index_t p = 0; p < s; ++p) {
            const T* xr = px + o + p * c;
            const T* gr = pg + o + p * c;
            if (dsr) {
              FLOWDIFF_SIMD
              for (index_t j = 0; j < c; ++j) dsr[j] += gr[j] * xr[j];
            }
            if (dbr) {
              FLOWDIFF_SIMD
              for (index_t j = 0; j < c; ++j) dbr[j] += gr[j];
            }
            if (pdx) {  // after the sums: dx may alias dy
              T* dxr = pdx + o + p * c;
              FLOWDIFF_SIMD
              for (index_t j = 0; j < c; ++j) dxr[j] = gr[j] * (T(1) + sc[j]);
            }
          }
        }
      },
      3 * c * s);
}

// a, b, y: same shape (y may alias a or b)
template <class T>
void add_forward(std::type_identity_t<View<const T>> a, std::type_identity_t<View<const T>> b,
                 View<T> y) {
  transform(
      y, [](T u, T v) { return u + v; }, a, b);
}

// dy -> da, db (each overwritten with dy; either may be empty)
template <class T>
void add_backward(std::type_identity_t<View<const T>> dy, View<T> da, View<T> db) {
  if (!da.empty()) {
    check_same_shape("add_backward", "dy", dy, "da", da);
    copy(da, dy);
  }
  if (!db.empty()) {
    check_same_shape("add_backward", "dy", dy, "db", db);
    copy(db, dy);
  }
}

/// dst += src: fan-in of gradients (e.g. the skip branch of a residual block).
template <class T>
void accumulate(View<T> dst, std::type_identity_t<View<const T>> src) {
  transform(
      dst, [](T u, T v) { return u + v; }, dst, src);
}

namespace detail {
// Checks a: [N, Ca, ...], b: [N, Cb, ...], y: [N, Ca + Cb, ...] with equal trailing dimensions;
// returns the per-sample sizes of a and b.
template <class T, class U, class V>
void concat_dims(const char* what, View<T> a, View<U> b, View<V> y, index_t& ra, index_t& rb) {
  bool ok = a.rank() >= 2 && a.rank() == b.rank() && a.rank() == y.rank() && a.dim(0) == b.dim(0) &&
            a.dim(0) == y.dim(0) && y.dim(1) == a.dim(1) + b.dim(1);
  for (int k = 2; ok && k < a.rank(); ++k) ok = a.dim(k) == b.dim(k) && a.dim(k) == y.dim(k);
  if (!ok) {
    Shape want = a.shape();
    if (a.rank() >= 2 && b.rank() >= 2) want[1] = a.dim(1) + b.dim(1);
    fail<shape_error>(what, ": expected a: [N, Ca, ...], b: [N, Cb, ...] and y: ", want,
                      " (the concatenation along axis 1), got a: ", a.shape(), ", b: ", b.shape(),
                      ", y: ", y.shape());
  }
  ra = a.row_size();
  rb = b.row_size();
}
}  // namespace detail

// a: [N, Ca, ...], b: [N, Cb, ...] -> y: [N, Ca + Cb, ...]
template <class T>
void concat_channels(std::type_identity_t<View<const T>> a, std::type_identity_t<View<const T>> b,
                     View<T> y) {
  index_t ra = 0, rb = 0;
  detail::concat_dims("concat_channels", a, b, y, ra, rb);
  const T* pa = a.data();
  const T* pb = b.data();
  T* py = y.data();
  Cpu::parallel_for(
      a.dim(0),
      [=](index_t n) {
        Cpu::copy(py + n * (ra + rb), pa + n * ra, ra);
        Cpu::copy(py + n * (ra + rb) + ra, pb + n * rb, rb);
      },
      ra + rb);
}

// dy: [N, Ca + Cb, ...] -> da: [N, Ca, ...], db: [N, Cb, ...] (the backward of concat_channels;
// overwritten). Neither may be empty: their shapes define the split.
template <class T>
void split_channels(std::type_identity_t<View<const T>> dy, View<T> da, View<T> db) {
  index_t ra = 0, rb = 0;
  detail::concat_dims("split_channels", da, db, dy, ra, rb);
  const T* py = dy.data();
  T* pa = da.data();
  T* pb = db.data();
  Cpu::parallel_for(
      dy.dim(0),
      [=](index_t n) {
        Cpu::copy(pa + n * ra, py + n * (ra + rb), ra);
        Cpu::copy(pb + n * rb, py + n * (ra + rb) + ra, rb);
      },
      ra + rb);
}

}  // namespace flowdiff::nn
