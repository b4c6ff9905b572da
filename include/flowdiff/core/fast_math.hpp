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
//   sincos(x)  (double) for the sinusoidal time embeddings: fdlibm's reduction and polynomials.
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

/// Inputs |x| up to this take fast_sincos' reduction (k pi / 2 exact in two products); beyond
/// it (and for infinities) a caller uses std::sin / std::cos.
inline constexpr double fast_sincos_limit = 1.0e6;

/// sin x and cos x in double for |x| <= fast_sincos_limit, as plain arithmetic that vectorises
/// (the sinusoidal time embeddings: 32 libm sincos calls were 360 ns of a 6 us batch-1 MLP
/// forward). x = k pi / 2 + r with k = round(x 2 / pi) (the 1.5 * 2^52 shifter) and r reduced by
/// pi / 2 in three parts (fdlibm's pio2_1, pio2_2, pio2_3: 33-bit heads, so k pio2_1 and
/// k pio2_2 are exact for |k| < 2^20); sin r and cos r on |r| <= pi / 4 by fdlibm's
/// __kernel_sin / __kernel_cos polynomials (degree 13 and 14); the quadrant k mod 4 picks and
/// signs them. Within a few ulp of std::sin / std::cos in double (tests/test_nn_fast_math.cpp),
/// so rounded to float they nearly always agree bit for bit. The same result in a vector body
/// and in a scalar remainder, and in kernels::MlpInput's host path, as long as no a * b + c is
/// contracted into an FMA: vector_loop's functions are compiled without contraction and the
/// library's baseline x86-64 code has no FMA (a build with -mfma / -march=native may contract the
/// kernel's copy and break that equality, not the accuracy).
FLOWDIFF_ALWAYS_INLINE void fast_sincos(double x, double& s, double& c) {
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double k = (x * 6.36619772367581382433e-01 + shifter) - shifter;
  const double r = ((x - k * 1.57079632673412561417e+00) - k * 6.07710050630396597660e-11) -
                   k * 2.02226624871116645580e-21;
  const double z = r * r;
  const double sr =
      r + r * z *
              (-1.66666666666666324348e-01 +
               z * (8.33333333332248946124e-03 +
                    z * (-1.98412698298579493134e-04 +
                         z * (2.75573137070700676789e-06 +
                              z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)))));
  const double cr =
      1.0 - 0.5 * z +
      z * z *
          (4.16666666666666019037e-02 +
           z * (-1.38888888888741095749e-03 +
                z * (2.48015872894767294178e-05 +
                     z * (-2.75573143513906633035e-07 +
                          z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
  // q = k - 4 round(k / 4) in {-2, -1, 0, 1, 2}: the quadrant k mod 4 (-1 is 3, -2 is 2).
  const double q = k - 4.0 * ((k * 0.25 + shifter) - shifter);
  const std::uint64_t odd = 0u - static_cast<std::uint64_t>(q == 1.0 || q == -1.0);
  const std::uint64_t neg_s = static_cast<std::uint64_t>(q == 2.0 || q == -2.0 || q == -1.0) << 63;
  const std::uint64_t neg_c = static_cast<std::uint64_t>(q == 1.0 || q == 2.0 || q == -2.0) << 63;
  const std::uint64_t bs = std::bit_cast<std::uint64_t>(sr), bc = std::bit_cast<std::uint64_t>(cr);
  // quadrant 0: (sin r, cos r); 1: (cos r, -sin r); 2: (-sin r, -cos r); 3: (-cos r, sin r)
  s = std::bit_cast<double>(((bc & odd) | (bs & ~odd)) ^ neg_s);
  c = std::bit_cast<double>(((bs & odd) | (bc & ~odd)) ^ neg_c);
}

}  // namespace flowdiff
