// flowdiff/core/random.hpp — counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel
// random numbers: as easy as 1, 2, 3", SC'11), checked against the Random123 known-answer vectors.
// A Generator is a 64-bit seed (the Philox key) and a 64-bit call counter. Every fill consumes one
// counter value and maps element j of sample i to the Philox block with counter
// (j / per_block, i, call_lo, call_hi): sample i gets the same numbers whatever the batch size,
// the thread count or the backend. No global state: every random call takes a Generator.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <type_traits>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

struct Philox4x32 {
  using Counter = std::uint32_t[4];
  struct Block {
    std::uint32_t v[4];
  };

  static constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  static constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;

  /// Philox4x32 with `rounds` rounds (10 is the standard, crush-resistant choice).
  FLOWDIFF_INLINE static constexpr Block hash(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2,
                                              std::uint32_t c3, std::uint32_t k0, std::uint32_t k1,
                                              int rounds = 10) {
    for (int r = 0; r < rounds; ++r) {
      if (r > 0) {
        k0 += W0;
        k1 += W1;
      }
      const std::uint64_t p0 = static_cast<std::uint64_t>(M0) * c0;
      const std::uint64_t p1 = static_cast<std::uint64_t>(M1) * c2;
      const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
    }
    return Block{{c0, c1, c2, c3}};
  }
};

namespace rng_detail {

/// Uniform in (0, 1]: never 0, so log() is always finite.
FLOWDIFF_INLINE float u01_open0(std::uint32_t x) {
  return static_cast<float>((x >> 8) + 1u) * (1.0f / 16777216.0f);
}
FLOWDIFF_INLINE double u01_open0(std::uint32_t hi, std::uint32_t lo) {
  const std::uint64_t m = ((static_cast<std::uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(m + 1u) * (1.0 / 9007199254740992.0);
}
/// Uniform in [0, 1).
FLOWDIFF_INLINE float u01(std::uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}
FLOWDIFF_INLINE double u01(std::uint32_t hi, std::uint32_t lo) {
  const std::uint64_t m = ((static_cast<std::uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(m) * (1.0 / 9007199254740992.0);
}

/// Values of type T one Philox block yields: 4 floats or 2 doubles.
template <class T>
inline constexpr int per_block = std::is_same_v<T, double> ? 2 : 4;

/// The Philox key and call counter a fill uses; a plain value so it can be captured by a kernel.
struct Stream {
  std::uint32_t k0, k1, c2, c3;

  FLOWDIFF_INLINE Philox4x32::Block block(std::uint32_t j_block, std::uint32_t sample) const {
    return Philox4x32::hash(j_block, sample, c2, c3, k0, k1);
  }
};

/// Uniform [0,1) values `lane` of block b.
template <class T>
FLOWDIFF_INLINE T uniform_lane(const Philox4x32::Block& b, int lane) {
  if constexpr (std::is_same_v<T, double>) {
    return u01(b.v[2 * lane], b.v[2 * lane + 1]);
  } else {
    return static_cast<T>(u01(b.v[lane]));
  }
}

/// Standard normal value `lane` of block b (Box–Muller on consecutive pairs).
template <class T>
FLOWDIFF_INLINE T normal_lane(const Philox4x32::Block& b, int lane) {
  if constexpr (std::is_same_v<T, double>) {
    const double u1 = u01_open0(b.v[0], b.v[1]);
    const double u2 = u01(b.v[2], b.v[3]);
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double a = 2.0 * std::numbers::pi * u2;
    return lane == 0 ? r * std::cos(a) : r * std::sin(a);
  } else {
    const int p = lane & ~1;
    const float u1 = u01_open0(b.v[p]);
    const float u2 = u01(b.v[p + 1]);
    const float r = std::sqrt(-2.0f * std::log(u1));
    const float a = 2.0f * std::numbers::pi_v<float> * u2;
    return static_cast<T>((lane & 1) ? r * std::sin(a) : r * std::cos(a));
  }
}

}  // namespace rng_detail

/// A seeded source of independent random streams. Copyable; copies replay the same numbers.
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0) : seed_(seed) {}

  std::uint64_t seed() const { return seed_; }
  /// How many fills/draws this generator has made; restoring it (set_offset) resumes the sequence.
  std::uint64_t offset() const { return offset_; }
  void set_offset(std::uint64_t off) { offset_ = off; }

  /// Reserves the next call counter and returns the stream a fill uses with it.
  rng_detail::Stream next_stream() {
    const std::uint64_t c = offset_++;
    return {static_cast<std::uint32_t>(seed_), static_cast<std::uint32_t>(seed_ >> 32),
            static_cast<std::uint32_t>(c), static_cast<std::uint32_t>(c >> 32)};
  }

  /// A generator with an independent seed derived from this one (for handing to a component).
  Generator fork() {
    const auto b = next_stream().block(0xFFFFFFFFu, 0xFFFFFFFFu);
    return Generator((static_cast<std::uint64_t>(b.v[0]) << 32) | b.v[1]);
  }

  /// One uniform value in [0, 1).
  template <class T = double>
  T uniform() {
    return rng_detail::uniform_lane<T>(next_stream().block(0, 0), 0);
  }
  /// One standard normal value.
  template <class T = double>
  T normal() {
    return rng_detail::normal_lane<T>(next_stream().block(0, 0), 0);
  }
  /// One integer uniform in [0, n) (n >= 1), without modulo bias worth measuring (64-bit draw).
  std::uint64_t uniform_int(std::uint64_t n) {
    require<config_error>(n >= 1, "Generator::uniform_int: n must be >= 1, got ", n);
    const auto b = next_stream().block(0, 0);
    const std::uint64_t r = (static_cast<std::uint64_t>(b.v[0]) << 32) | b.v[1];
    // High 64 bits of the 128-bit product r * n (Lemire's multiply-shift), in portable arithmetic.
    const std::uint64_t r_lo = r & 0xFFFFFFFFu, r_hi = r >> 32, n_lo = n & 0xFFFFFFFFu, n_hi = n >> 32;
    const std::uint64_t lo_lo = r_lo * n_lo, hi_lo = r_hi * n_lo, lo_hi = r_lo * n_hi;
    const std::uint64_t mid = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFu) + (lo_hi & 0xFFFFFFFFu);
    return r_hi * n_hi + (hi_lo >> 32) + (lo_hi >> 32) + (mid >> 32);
  }

 private:
  std::uint64_t seed_;
  std::uint64_t offset_ = 0;
};

namespace rng_detail {
template <class T, class B, class Lane>
void fill_blocks(View<T, B> x, Stream s, Lane lane_fn) {
  static_assert(!std::is_const_v<T>);
  const index_t rows = x.rows();
  const index_t d = x.row_size();
  require<config_error>(rows <= index_t(0xFFFFFFFF) && d / per_block<T> < index_t(0xFFFFFFFF),
                        "random fill: tensor of shape ", x.shape(), " is too large for one fill");
  constexpr int pb = per_block<T>;
  const index_t nb = (d + pb - 1) / pb;
  T* p = x.data();
  B::parallel_for(
      rows * nb,
      FLOWDIFF_LAMBDA(index_t k) {
        const index_t i = k / nb, jb = k % nb;
        const auto blk = s.block(static_cast<std::uint32_t>(jb), static_cast<std::uint32_t>(i));
        for (int l = 0; l < pb; ++l) {
          const index_t j = jb * pb + l;
          if (j < d) p[i * d + j] = lane_fn(blk, l);
        }
      },
      16);
}

template <class T>
struct NormalLane {
  T mean, stddev;
  FLOWDIFF_HOST_DEVICE T operator()(const Philox4x32::Block& b, int l) const {
    return mean + stddev * normal_lane<T>(b, l);
  }
};
template <class T>
struct UniformLane {
  T lo, hi;
  FLOWDIFF_HOST_DEVICE T operator()(const Philox4x32::Block& b, int l) const {
    return lo + (hi - lo) * uniform_lane<T>(b, l);
  }
};
}  // namespace rng_detail

/// Fills x with N(mean, stddev^2) values. Sample i (row i of dimension 0) is a function of
/// (seed, call counter, i) only.
template <class X>
  requires TensorLike<X>
void fill_normal(X&& x, Generator& gen, value_type_of<X> mean = 0, value_type_of<X> stddev = 1) {
  using T = value_type_of<X>;
  static_assert(std::is_floating_point_v<T>, "fill_normal: floating-point tensors only");
  rng_detail::fill_blocks(view_of(x), gen.next_stream(), rng_detail::NormalLane<T>{mean, stddev});
}

/// Fills x with values uniform in [lo, hi).
template <class X>
  requires TensorLike<X>
void fill_uniform(X&& x, Generator& gen, value_type_of<X> lo = 0, value_type_of<X> hi = 1) {
  using T = value_type_of<X>;
  static_assert(std::is_floating_point_v<T>, "fill_uniform: floating-point tensors only");
  rng_detail::fill_blocks(view_of(x), gen.next_stream(), rng_detail::UniformLane<T>{lo, hi});
}

/// A new tensor of standard normal values: `auto x = randn<float>({64, 2}, gen);`
template <class T, Backend B = Cpu>
Tensor<T, B> randn(Shape shape, Generator& gen) {
  Tensor<T, B> t(shape);
  fill_normal(t, gen);
  return t;
}

/// A new tensor of values uniform in [0, 1).
template <class T, Backend B = Cpu>
Tensor<T, B> rand(Shape shape, Generator& gen) {
  Tensor<T, B> t(shape);
  fill_uniform(t, gen);
  return t;
}

}  // namespace flowdiff
