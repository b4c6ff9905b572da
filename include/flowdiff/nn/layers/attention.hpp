// flowdiff/nn/layers/attention.hpp — multi-head self-attention over token sequences, laid out as
// timm's Attention (one qkv Linear, one output Linear), and ImageSelfAttention, which runs it on
// the H W pixels of an [N, C, H, W] image (the U-Net's lowest-resolution attention). For one
// sample x: [L, D] and head h (d = D / heads, columns h d .. h d + d - 1 of each of q, k, v):
//   forward   [q | k | v] = x Wqkv^T + bqkv                  Wqkv: [3D, D]
//             S_h = q_h k_h^T / sqrt(d),  P_h = softmax_rows(S_h),  o_h = P_h v_h     o: [L, D]
//             y = o Wproj^T + bproj                            Wproj: [D, D]
//   backward  dWproj += dy^T o, dbproj += sum dy, do = dy Wproj,
//             dP = do_h v_h^T, dv_h = P^T do_h, dS = P .* (dP - rowsum(dP .* P)) / sqrt(d),
//             dq_h = dS k_h, dk_h = dS^T q_h, dWqkv += dqkv^T x, dbqkv += sum dqkv, dx = dqkv Wqkv
// The per-(sample, head) products read q, k, v in place inside the [N L, 3D] qkv matrix through
// strided products (gemm_strided, no head split/merge copies) and run in parallel over (sample, head); the
// projections are one GEMM each over all N L tokens. The softmax subtracts the row maximum and
// takes its exponentials with fast_exp (core/fast_math.hpp; vectorised in float, in the widest
// instruction set of the CPU through simd::vector_loop, as the softmax backward). The backward
// temporaries (dqkv, dP, do) live in a Scratch that the layers of one model may share.
// Parameter names: prefix.qkv.weight [3D, D], prefix.qkv.bias [3D], prefix.proj.weight [D, D],
// prefix.proj.bias [D].
#pragma once


#include <algorithm>
#include <cmath>
#include <string>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

namespace spatial_detail {
/// y[r, j] += b[j] for every row r of a [rows, cols] matrix.
template <class T>
void add_row_bias(T* y, index_t rows, index_t cols, const T* b) {
  Cpu::parallel_for(
      rows,
      [=](index_t r) {
        T* row = y + r * cols;
        for (index_t j = 0; j < cols; ++j) row[j] += b[j];
      },
      cols);
}
/// db[j] += sum_r g[r, j]: row by row, so the inner loop is contiguous.
template <class T>
void accumulate_column_sums(const T* g, index_t rows, index_t cols, T* db) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < cols; ++j) db[j] += g[r * cols + j];
}
}  // namespace spatial_detail

template <class T>
class MultiheadSelfAttention {
 public:
  MultiheadSelfAttention(Parameters<T>& ps, const std::string& prefix, index_t dim, index_t heads,
                         bool qkv_bias = true)
      : prefix_(prefix), d_(dim), heads_(heads), qkv_bias_(qkv_bias) {
    require<config_error>(dim >= 1 && heads >= 1 && dim % heads == 0, prefix,
                          " (MultiheadSelfAttention): dim must be a positive multiple of heads, "
                          "got dim = ",
                          dim, ", heads = ", heads);
    wqkv_ = ps.add(prefix + ".qkv.weight", Shape{3 * dim, dim});
    if (qkv_bias) bqkv_ = ps.add(prefix + ".qkv.bias", Shape{3 * dim});
    wproj_ = ps.add(prefix + ".proj.weight", Shape{dim, dim});
    bproj_ = ps.add(prefix + ".proj.bias", Shape{dim});
  }

  index_t dim() const { return d_; }
  index_t heads() const { return heads_; }
  index_t head_dim() const { return d_ / heads_; }
  const std::string& prefix() const { return prefix_; }
  index_t qkv_weight_id() const { return wqkv_; }
  index_t qkv_bias_id() const { return bqkv_; }  // -1 without qkv bias
  index_t proj_weight_id() const { return wproj_; }
  index_t proj_bias_id() const { return bproj_; }

  /// PyTorch's nn.Linear default for both projections: uniform in [-1/sqrt(D), 1/sqrt(D)].
  void init(Parameters<T>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(d_));
    fill_uniform(ps.param(wqkv_), gen, -bound, bound);
    if (qkv_bias_) fill_uniform(ps.param(bqkv_), gen, -bound, bound);
    fill_uniform(ps.param(wproj_), gen, -bound, bound);
    fill_uniform(ps.param(bproj_), gen, -bound, bound);
  }

  /// Backward temporaries: a model with several attention layers shares one set between them.
  struct Scratch {
    Tensor<T> dqkv;  // [N L, 3D]
    Tensor<T> dp;    // [N, heads, L, L]
    Tensor<T> dout;  // [N L, D]
  };

  /// The forward's activations; its Scratch base holds the backward temporaries of the overload
  /// without a Scratch argument (empty when a shared Scratch is passed instead).
  struct Cache : Scratch {
    Tensor<T> qkv;  // [N L, 3D]
    Tensor<T> p;    // [N, heads, L, L] attention probabilities
    Tensor<T> o;    // [N L, D] attention output before the projection
  };

  Shape output_shape(const Shape& s) const {
    check_input(s);
    return s;
  }

  // x: [N, L, D] -> y: [N, L, D]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    using namespace spatial_detail;
    check_input(x.shape());
    check_exact(prefix_, "MultiheadSelfAttention", "y", View<const T>(y), x.shape());
    const index_t n = x.dim(0), L = x.dim(1), D = d_, rows = n * L;
    grow(cache.qkv, rows * 3 * D);
    grow(cache.p, n * heads_ * L * L);
    grow(cache.o, rows * D);
    T* qkv = cache.qkv.data();
    gemm(Trans::no, Trans::yes, T(1), x.reshape({rows, D}), ps.param(wqkv_), T(0),
         mat(qkv, rows, 3 * D));
    if (qkv_bias_) add_row_bias(qkv, rows, 3 * D, ps.param(bqkv_).data());
    attend(qkv, cache.p.data(), cache.o.data(), n, L);
    gemm(Trans::no, Trans::yes, T(1), mat(static_cast<const T*>(cache.o.data()), rows, D),
         ps.param(wproj_), T(0), y.reshape({rows, D}));
    add_row_bias(y.data(), rows, D, ps.param(bproj_).data());
  }

  // x: [N, L, D], dy: [N, L, D], dx: [N, L, D] or empty. Uses the cache of the matching forward.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    backward(ps, x, dy, dx, cache, static_cast<Scratch&>(cache));
  }

  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx, Cache& cache,
                Scratch& scratch) const {
    using namespace spatial_detail;
    check_input(x.shape());
    check_exact(prefix_, "MultiheadSelfAttention", "dy", dy, x.shape());
    const bool want_dx = !dx.empty();
    if (want_dx) check_exact(prefix_, "MultiheadSelfAttention", "dx", View<const T>(dx), x.shape());
    const index_t n = x.dim(0), L = x.dim(1), D = d_, rows = n * L;
    require<config_error>(
        cache.qkv.numel() >= rows * 3 * D && cache.p.numel() >= n * heads_ * L * L, prefix_,
        " (MultiheadSelfAttention): backward needs the cache of the "
        "matching forward call");
    grow(scratch.dqkv, rows * 3 * D);
    grow(scratch.dp, n * heads_ * L * L);
    grow(scratch.dout, rows * D);
    const auto dy2 = dy.reshape({rows, D});
    const auto o = mat(static_cast<const T*>(cache.o.data()), rows, D);
    gemm(Trans::yes, Trans::no, T(1), dy2, o, T(1), ps.grad(wproj_));
    accumulate_column_sums(dy.data(), rows, D, ps.grad(bproj_).data());
    T* dout = scratch.dout.data();
    gemm(Trans::no, Trans::no, T(1), dy2, ps.param(wproj_), T(0), mat(dout, rows, D));
    T* dqkv = scratch.dqkv.data();
    attend_backward(cache.qkv.data(), cache.p.data(), dout, scratch.dp.data(), dqkv, n, L);
    const auto dqkv2 = mat(static_cast<const T*>(dqkv), rows, 3 * D);
    gemm(Trans::yes, Trans::no, T(1), dqkv2, x.reshape({rows, D}), T(1), ps.grad(wqkv_));
    if (qkv_bias_)
      accumulate_column_sums(static_cast<const T*>(dqkv), rows, 3 * D, ps.grad(bqkv_).data());
    if (want_dx)
      gemm(Trans::no, Trans::no, T(1), dqkv2, ps.param(wqkv_), T(0), dx.reshape({rows, D}));
  }

 private:
  void check_input(const Shape& s) const {
    if (s.rank() != 3 || s[2] != d_ || s[1] < 1)
      fail<shape_error>(prefix_, " (MultiheadSelfAttention): x: expected shape [N, L, ", d_,
                        "], got ", s);
  }

  static void grow(Tensor<T>& t, index_t n) {
    if (t.numel() < n) t.resize(Shape{n});
  }

  // row[0..L) <- softmax(row): the row maximum subtracted, exponentials by fast_exp (vectorised
  // in float), the sum in a fixed-order vector reduction (the same whatever the thread count).
  FLOWDIFF_ALWAYS_INLINE static void softmax_row(T* row, index_t L) {
    T mx = row[0];
    FLOWDIFF_SIMD_REDUCE_MAX(mx)
    for (index_t c = 1; c < L; ++c) mx = row[c] > mx ? row[c] : mx;
    FLOWDIFF_SIMD
    for (index_t c = 0; c < L; ++c) row[c] = fast_exp(row[c] - mx);
    T s = T(0);
    FLOWDIFF_SIMD_REDUCE_SUM(s)
    for (index_t c = 0; c < L; ++c) s += row[c];
    const T inv = T(1) / s;
    FLOWDIFF_SIMD
    for (index_t c = 0; c < L; ++c) row[c] *= inv;
  }

  // The L x L block p: every row through softmax_row, in the widest vector instruction set of
  // this CPU (simd::vector_loop; the row sums then add in that set's lane order, the same for
  // every thread count).
  static void softmax_rows(T* p, index_t L) {
    simd::vector_loop(
        [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
          for (index_t r = lo; r < hi; ++r) softmax_row(p + r * L, L);
        },
        0, L);
  }

  // dS = scale P (dP - <dP, P>) row by row, in place of dP (dpp); vector_loop as softmax_rows.
  static void softmax_backward_rows(const T* pp, T* dpp, index_t L, T scale) {
    simd::vector_loop(
        [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
          for (index_t r = lo; r < hi; ++r) {
            T* row = dpp + r * L;
            const T* pr = pp + r * L;
            T s = T(0);
            FLOWDIFF_SIMD_REDUCE_SUM(s)
            for (index_t c = 0; c < L; ++c) s += row[c] * pr[c];
            FLOWDIFF_SIMD
            for (index_t c = 0; c < L; ++c) row[c] = scale * pr[c] * (row[c] - s);
          }
        },
        0, L);
  }

  // qkv: [N L, 3D] -> p: [N, heads, L, L], o: [N L, D]
  void attend(const T* qkv, T* p, T* o, index_t n, index_t L) const {
    const index_t D = d_, H = heads_, dh = d_ / heads_;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    Cpu::parallel_for(
        n * H,
        [=](index_t nh) {
          const index_t i = nh / H, h = nh % H;
          const T* base = qkv + i * L * 3 * D + h * dh;  // q; k at + D, v at + 2 D
          T* pp = p + nh * L * L;
          gemm_strided(Trans::no, Trans::yes, L, L, dh, scale, base, 3 * D, base + D, 3 * D, T(0),
                       pp, L);
          softmax_rows(pp, L);
          gemm_strided(Trans::no, Trans::no, L, dh, L, T(1), static_cast<const T*>(pp), L,
                       base + 2 * D, 3 * D, T(0), o + i * L * D + h * dh, D);
        },
        2 * L * L * dh);
  }

  // dout: [N L, D] -> dqkv: [N L, 3D] (overwritten); dp: [N, heads, L, L] scratch
  void attend_backward(const T* qkv, const T* p, const T* dout, T* dp, T* dqkv, index_t n,
                       index_t L) const {
    const index_t D = d_, H = heads_, dh = d_ / heads_;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    Cpu::parallel_for(
        n * H,
        [=](index_t nh) {
          const index_t i = nh / H, h = nh % H;
          const index_t off = i * L * 3 * D + h * dh;
          const T* q = qkv + off;  // k at + D, v at + 2 D; likewise in dqkv
          const T* dO = dout + i * L * D + h * dh;
          const T* pp = p + nh * L * L;
          T* dpp = dp + nh * L * L;
          gemm_strided(Trans::no, Trans::yes, L, L, dh, T(1), dO, D, q + 2 * D, 3 * D, T(0), dpp,
                       L);  // dP = dO v^T
          gemm_strided(Trans::yes, Trans::no, L, dh, L, T(1), pp, L, dO, D, T(0),
                       dqkv + off + 2 * D, 3 * D);  // dv = P^T dO
          softmax_backward_rows(pp, dpp, L, scale);  // dS = P (dP - <dP, P>) scaled
          const T* dS = dpp;
          gemm_strided(Trans::no, Trans::no, L, dh, L, T(1), dS, L, q + D, 3 * D, T(0), dqkv + off,
                       3 * D);  // dq = dS k
          gemm_strided(Trans::yes, Trans::no, L, dh, L, T(1), dS, L, q, 3 * D, T(0),
                       dqkv + off + D, 3 * D);  // dk = dS^T q
        },
        4 * L * L * dh);
  }

  std::string prefix_;
  index_t d_, heads_;
  bool qkv_bias_;
  index_t wqkv_ = -1, bqkv_ = -1, wproj_ = -1, bproj_ = -1;
};

/// Self-attention over the H W pixels of an image: x: [N, C, H, W] is read as the token sequence
/// [N, H W, C], attended with a MultiheadSelfAttention of dim C, and written back as [N, C, H, W].
/// No residual and no normalisation: the U-Net block around it adds those. Parameter names are
/// those of the inner attention (prefix.qkv.*, prefix.proj.*).
template <class T>
class ImageSelfAttention {
 public:
  ImageSelfAttention(Parameters<T>& ps, const std::string& prefix, index_t channels, index_t heads,
                     bool qkv_bias = true)
      : attn_(ps, prefix, channels, heads, qkv_bias) {}

  const MultiheadSelfAttention<T>& attention() const { return attn_; }
  void init(Parameters<T>& ps, Generator& gen) const { attn_.init(ps, gen); }

  struct Cache {
    typename MultiheadSelfAttention<T>::Cache attn;
    Tensor<T> tokens;   // [N, H W, C]
    Tensor<T> tokens2;  // [N, H W, C]: y tokens in forward, dy tokens in backward
    Tensor<T> dtokens;  // [N, H W, C]
  };

  Shape output_shape(const Shape& s) const {
    check_input(s);
    return s;
  }

  // x: [N, C, H, W] -> y: [N, C, H, W]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    check_input(x.shape());
    spatial_detail::check_exact(attn_.prefix(), "ImageSelfAttention", "y", View<const T>(y),
                                x.shape());
    const Shape ts = token_shape(x.shape());
    prepare(cache.tokens, ts);
    prepare(cache.tokens2, ts);
    to_tokens(x.data(), cache.tokens.data(), ts);
    attn_.forward(ps, cache.tokens.view(), cache.tokens2.view(), cache.attn);
    from_tokens(cache.tokens2.data(), y.data(), ts);
  }

  // x: [N, C, H, W], dy: [N, C, H, W], dx: [N, C, H, W] or empty. Uses the forward's cache.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    check_input(x.shape());
    spatial_detail::check_exact(attn_.prefix(), "ImageSelfAttention", "dy", dy, x.shape());
    const bool want_dx = !dx.empty();
    if (want_dx)
      spatial_detail::check_exact(attn_.prefix(), "ImageSelfAttention", "dx", View<const T>(dx),
                                  x.shape());
    const Shape ts = token_shape(x.shape());
    require<config_error>(
        cache.tokens.shape() == ts, attn_.prefix(),
        " (ImageSelfAttention): backward needs the cache of the matching forward");
    prepare(cache.tokens2, ts);
    to_tokens(dy.data(), cache.tokens2.data(), ts);
    if (want_dx) {
      prepare(cache.dtokens, ts);
      attn_.backward(ps, cache.tokens.view(), cache.tokens2.view(), cache.dtokens.view(),
                     cache.attn);
      from_tokens(cache.dtokens.data(), dx.data(), ts);
    } else {
      attn_.backward(ps, cache.tokens.view(), cache.tokens2.view(), View<T>(nullptr, Shape{0}),
                     cache.attn);
    }
  }

 private:
  void check_input(const Shape& s) const {
    if (s.rank() != 4 || s[1] != attn_.dim())
      fail<shape_error>(attn_.prefix(), " (ImageSelfAttention): x: expected shape [N, ",
                        attn_.dim(), ", H, W], got ", s);
  }
  static Shape token_shape(const Shape& s) { return Shape{s[0], s[2] * s[3], s[1]}; }
  static void prepare(Tensor<T>& t, const Shape& s) {
    if (!(t.shape() == s)) t.resize(s);
  }
  // [N, C, L] -> [N, L, C] per sample (a blocked transpose would be faster for large C L).
  static void to_tokens(const T* src, T* dst, const Shape& ts) {
    const index_t L = ts[1], C = ts[2];
    Cpu::parallel_for(
        ts[0] * L,
        [=](index_t q) {
          const index_t i = q / L, l = q % L;
          const T* s = src + i * C * L + l;
          T* d = dst + q * C;
          for (index_t c = 0; c < C; ++c) d[c] = s[c * L];
        },
        C);
  }
  // [N, L, C] -> [N, C, L]
  static void from_tokens(const T* src, T* dst, const Shape& ts) {
    const index_t L = ts[1], C = ts[2];
    Cpu::parallel_for(
        ts[0] * C,
        [=](index_t q) {
          const index_t i = q / C, c = q % C;
          const T* s = src + i * L * C + c;
          T* d = dst + q * L;
          for (index_t l = 0; l < L; ++l) d[l] = s[l * C];
        },
        L);
  }

  MultiheadSelfAttention<T> attn_;
};

}  // namespace flowdiff::nn
