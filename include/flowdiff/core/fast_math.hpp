// flowdiff/core/fast_math.hpp — exp, tanh and the logistic sigmoid in float, written as plain
// branch-free arithmetic so that a loop over them vectorises (no libm call per element), with the
// same result in the vector body and in the scalar remainder (hence independent of how a loop is
// cut into chunks or threads). For double they are the std:: functions (the gradient checks run in
// double and need the exact derivatives).
//   exp(x)     = 2^n exp(r),  n = round(x / ln 2),  r = x - n ln 2 (ln 2 in two parts, Cody-Waite),
//                exp(r) by the degree-7 minimax polynomial of Cephes' expf on |r| <= ln(2)/2;
//                x is clamped to [-87, 88] first (2^n stays a normal float): outside that range
//                the result is exp(-87) = 1.6e-38 or exp(88) = 1.7e38 instead of the denormal /
//                overflowing value; NaN propagates.
//   tanh(x)    = sign(x) (1 - 2 / (exp(2|x|) + 1)) for |x| > 0.625 (no cancellation there), and
//                Cephes' tanhf odd polynomial x + x^3 P(x^2) for |x| <= 0.625.
//   sigmoid(x) = 1 / (1 + exp(-x)).
// Accuracy against std::exp / std::tanh in double, measured by tests/test_nn_fast_math.cpp on a
// dense grid of floats: exp within 2 ulp on [-87, 88], tanh within 2 ulp on [-12, 12] (and
// exactly +-1 beyond, where tanh rounds to +-1 in float).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

/// Marks a loop for vectorisation (OpenMP simd: no dependence analysis needed); nothing without
/// OpenMP. The functions below vectorise without it too: their selects are integer masks.
/// FLOWDIFF_SIMD_REDUCE_SUM(s): the same for a loop that sums into s (a vector reduction: a fixed
/// order for a given length, not the serial order); FLOWDIFF_SIMD_REDUCE_MAX(s) for a maximum.
#if defined(_OPENMP)
#define FLOWDIFF_SIMD _Pragma("omp simd")
#define FLOWDIFF_SIMD_PRAGMA_(x) _Pragma(#x)
#define FLOWDIFF_SIMD_REDUCE_SUM(s) FLOWDIFF_SIMD_PRAGMA_(omp simd reduction(+ : s))
#define FLOWDIFF_SIMD_REDUCE_MAX(s) FLOWDIFF_SIMD_PRAGMA_(omp simd reduction(max : s))
#else
#define FLOWDIFF_SIMD_REDUCE_MAX(s)
#define FLOWDIFF_SIMD
#define FLOWDIFF_SIMD_REDUCE_SUM(s)
#endif

/// Forces inlining: the element functions below must be inlined into their loops to vectorise,
/// which g++ does not always do on its own inside large callers.
#if defined(__GNUC__) || defined(__clang__)
#define FLOWDIFF_ALWAYS_INLINE inline __attribute__((always_inline))
#define FLOWDIFF_LAMBDA_INLINE __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FLOWDIFF_ALWAYS_INLINE __forceinline
#define FLOWDIFF_LAMBDA_INLINE
#else
#define FLOWDIFF_ALWAYS_INLINE inline
#define FLOWDIFF_LAMBDA_INLINE
#endif

namespace flowdiff {

namespace fast_math_detail {
// c ? a : b on the bits: a compare used as a value and integer masks, which the vectoriser takes
// as straight-line code (a float ?: under the default -ftrapping-math stays a branch in g++ 12).
FLOWDIFF_ALWAYS_INLINE float select(bool c, float a, float b) {
  const std::uint32_t m = 0u - static_cast<std::uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<std::uint32_t>(a) & m) |
                              (std::bit_cast<std::uint32_t>(b) & ~m));
}

FLOWDIFF_ALWAYS_INLINE float exp_f32(float x) {
  // Clamps to [-87, 88]; a NaN fails both tests and propagates.
  x = select(x > 88.0f, 88.0f, x);
  x = select(x < -87.0f, -87.0f, x);
  // Round x / ln 2 to the nearest integer by the 1.5 * 2^23 shifter (exact for |n| < 2^22).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as a float: the biased exponent n + 127 in bits 23..30 (n in [-126, 127] after clamping).
  const auto bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

FLOWDIFF_ALWAYS_INLINE float tanh_f32(float x) {
  // tanh is odd: evaluate at |x| and put the sign of x back (also onto -0).
  const std::uint32_t sign = std::bit_cast<std::uint32_t>(x) & 0x80000000u;
  const float a = std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) ^ sign);
  const float e = exp_f32(2.0f * a);
  const float big = 1.0f - 2.0f / (e + 1.0f);
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * a + a;
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(select(a > 0.625f, big, small)) | sign);
}
}  // namespace fast_math_detail

/// e^x: the vectorisable float approximation above (within 2 ulp on [-87, 88]); std::exp else.
template <class T>
FLOWDIFF_ALWAYS_INLINE T fast_exp(T x) {
  if constexpr (std::is_same_v<T, float>)
    return fast_math_detail::exp_f32(x);
  else
    return std::exp(x);
}

/// tanh(x): vectorisable in float (within 2 ulp); std::tanh else.
template <class T>
FLOWDIFF_ALWAYS_INLINE T fast_tanh(T x) {
  if constexpr (std::is_same_v<T, float>)
    return fast_math_detail::tanh_f32(x);
  else
    return std::tanh(x);
}

/// 1 / (1 + e^-x) through fast_exp.
template <class T>
FLOWDIFF_ALWAYS_INLINE T fast_sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

}  // namespace flowdiff
