// flowdiff/nn/layers/conv_transpose.hpp — transposed 2-d convolution as torch.nn.ConvTranspose2d
// (square kernel k, stride s, padding p, output_padding op < s; no dilation or groups): the adjoint
// of Conv2d with the same k, s, p, which maps [Cin, H, W] to [Cout, Ho, Wo],
// Ho = (H - 1) s - 2p + k + op. With W: [Cin, Cout k k] (PyTorch's weight [Cin, Cout, k, k]) and
// the im2col / col2im of a convolution over the *output* image (which produces H x W columns):
//   forward   y_n = col2im(W^T x_n) + b                     x_n: [Cin, H W]
//   backward  dW += x_n im2col(dy_n)^T,  db += sum_{n,hw} dy,  dx_n = W im2col(dy_n)
// Groups of samples share one GEMM (their H W columns side by side), as in Conv2d. Float on an
// AVX-512 CPU, stride 2 with an output twice the input (k + op - 2p = 2: 4 x 4 with padding 1,
// 3 x 3 with padding 1 and output_padding 1, 2 x 2) and a kernel of at least 2 x 2 runs over
// phases (conv_phases.hpp): the forward is the adjoint convolution's dx, four products over
// shifted planes of x merged into y (no W^T x column matrix, no col2im); backward splits dy into
// its phases and takes dx and dW^T from them with masked loads (no im2col), dx with the bits
// of W im2col(dy), dW with those of x im2col(dy)^T.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/conv_phases.hpp"

namespace flowdiff::nn {

template <class T>
class ConvTranspose2d {
 public:
  /// Registers prefix.weight [in_ch, out_ch, kernel, kernel] and prefix.bias [out_ch].
  ConvTranspose2d(Parameters<T>& ps, const std::string& prefix, index_t in_ch, index_t out_ch,
                  index_t kernel, index_t stride = 1, index_t padding = 0,
                  index_t output_padding = 0, bool bias = true)
      : prefix_(prefix),
        in_(in_ch),
        out_(out_ch),
        k_(kernel),
        s_(stride),
        p_(padding),
        op_(output_padding),
        bias_(bias) {
    require<config_error>(in_ch > 0 && out_ch > 0 && kernel > 0 && stride > 0 && padding >= 0,
                          prefix,
                          " (ConvTranspose2d): need in_ch, out_ch, kernel, stride >= 1 "
                          "and padding >= 0, got in_ch = ",
                          in_ch, ", out_ch = ", out_ch, ", kernel = ", kernel,
                          ", stride = ", stride, ", padding = ", padding);
    require<config_error>(output_padding >= 0 && output_padding < stride, prefix,
                          " (ConvTranspose2d): output_padding must lie in [0, stride = ", stride,
                          "), got ", output_padding);
    w_ = ps.add(prefix + ".weight", Shape{in_ch, out_ch, kernel, kernel});
    if (bias) b_ = ps.add(prefix + ".bias", Shape{out_ch});
  }

  index_t in_channels() const { return in_; }
  index_t out_channels() const { return out_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }  // -1 without bias
  const std::string& prefix() const { return prefix_; }

  /// PyTorch's default: W and b uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)] where PyTorch takes
  /// fan_in from dimension 1 of the weight: fan_in = out_ch k k.
  void init(Parameters<T>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(out_ * k_ * k_));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    if (bias_) fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  struct Cache {
    Tensor<T> col;  // [Cout k k, G H W]: W^T x in forward, im2col(dy) in backward (or phases)
    Tensor<T> in;   // [Cin, G H W]: packed x (and packed dx) of a group (G > 1 only)
    Tensor<T> wp;   // phase path: the kernel's per-phase blocks of the forward's products
    Tensor<T> dwt;  // phase path: [Cout k k, Cin] the transposed weight gradient
    std::vector<Tensor<T>> col_t;  // phase path, forward: threads 1, 2, ...: their own col
  };

  /// [N, in, H, W] -> [N, out, Ho, Wo]
  Shape output_shape(const Shape& input) const {
    check_input(input);
    return Shape{input[0], out_, (input[2] - 1) * s_ - 2 * p_ + k_ + op_,
                 (input[3] - 1) * s_ - 2 * p_ + k_ + op_};
  }

  // x: [N, in, H, W] -> y: [N, out, Ho, Wo]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    using namespace spatial_detail;
    const Shape ys = output_shape(x.shape());
    check_exact(prefix_, "ConvTranspose2d", "y", View<const T>(y), ys);
    const auto g = geometry(ys, x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows(), plane_y = out_ * ys[2] * ys[3];
    const index_t G = group_size(n, K, L);
    prepare(cache, G, K, L);
    const T* w = ps.param(w_).data();
    // The phase path shares the groups out over the threads (each with its own workspace and
    // serial products: one phase's product is too small to thread); a group it declined (it
    // cannot, phased() checks what the products need) would take the explicit path below.
    const index_t groups = (n + G - 1) / G;
    std::vector<char> done(static_cast<std::size_t>(groups), 0);
    if (phased(g)) {
      phase_weights(w, cache.wp);
      const index_t team = std::max<index_t>(1, std::min<index_t>(groups, Cpu::max_threads()));
      if (cache.col_t.size() < static_cast<std::size_t>(team - 1))
        cache.col_t.resize(static_cast<std::size_t>(team - 1));
      for (auto& t : cache.col_t)
        if (t.numel() < K * G * L) t.resize(Shape{K * G * L});
      Cpu::parallel_tasks(groups, team, [&](index_t q, index_t tid) {
        T* ws = tid == 0 ? cache.col.data()
                         : cache.col_t[static_cast<std::size_t>(tid - 1)].data();
        const index_t n0 = q * G;
        done[static_cast<std::size_t>(q)] = phase_forward(
            cache.wp.data(), x.data() + n0 * in_ * L, g, std::min(G, n - n0), ws,
            y.data() + n0 * plane_y);
      });
    }
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
      if (done[static_cast<std::size_t>(n0 / G)]) continue;
      const T* xg = x.data() + n0 * in_ * L;
      if (gn > 1) {
        pack_samples(xg, gn, in_, L, cache.in.data());
        xg = cache.in.data();
      }
      gemm(Trans::yes, Trans::no, T(1), mat(w, in_, K), mat(xg, in_, cols), T(0),
           mat(cache.col.data(), K, cols));
      for (index_t i = 0; i < gn; ++i)
        col2im(cache.col.data() + i * L, cols, g, y.data() + (n0 + i) * plane_y);
    }
    if (bias_) add_channel_bias(y.data(), n * out_, out_, ys[2] * ys[3], ps.param(b_).data());
  }

  // x: [N, in, H, W], dy: [N, out, Ho, Wo], dx: [N, in, H, W] or empty.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    using namespace spatial_detail;
    const Shape ys = output_shape(x.shape());
    check_exact(prefix_, "ConvTranspose2d", "dy", dy, ys);
    const bool want_dx = !dx.empty();
    if (want_dx) check_exact(prefix_, "ConvTranspose2d", "dx", View<const T>(dx), x.shape());
    const auto g = geometry(ys, x.shape());
    const index_t n = x.dim(0), L = g.cols(), K = g.rows(), plane_y = out_ * ys[2] * ys[3];
    const index_t G = group_size(n, K, L);
    prepare(cache, G, K, L);
    const T* w = ps.param(w_).data();
    T* dw = ps.grad(w_).data();
    if (bias_) accumulate_channel_sums(dy.data(), n, out_, ys[2] * ys[3], ps.grad(b_).data());
    // The phase path accumulates dW^T [K, Cin] over the groups and transposes it back at the end
    // (exact copies: dW gets the same sums as x im2col(dy)^T).
    const bool phases = phased(g);
    if (phases) {
      if (cache.dwt.numel() < K * in_) cache.dwt.resize(Shape{K * in_});
      transpose(dw, in_, K, cache.dwt.data());
    }
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
      T* col = cache.col.data();
      const T* xg = x.data() + n0 * in_ * L;
      if (gn > 1) {
        pack_samples(xg, gn, in_, L, cache.in.data());
        xg = cache.in.data();
      }
      T* dxg = want_dx ? dx.data() + n0 * in_ * L : nullptr;
      // dx straight into place when every sample's L columns are whole tiles of the product.
      const bool direct = gn == 1 || L % sgemm::cblock_unit == 0;
      if (phases && phase_backward(w, xg, dy.data() + n0 * plane_y, g, gn, col, cache.dwt.data(),
                                   dxg == nullptr ? nullptr : direct ? dxg : cache.in.data(),
                                   direct && gn > 1 ? L : 0)) {
        if (dxg != nullptr && !direct)
          unpack_samples(cache.in.data(), gn, in_, L, dxg, static_cast<const T*>(nullptr));
        continue;
      }
      if (phases) fail<std::logic_error>(prefix_, " (ConvTranspose2d): the phase path declined");
      for (index_t i = 0; i < gn; ++i) im2col(dy.data() + (n0 + i) * plane_y, g, col + i * L, cols);
      gemm(Trans::no, Trans::yes, T(1), mat(xg, in_, cols), mat(col, K, cols), T(1),
           mat(dw, in_, K));
      if (!want_dx) continue;
      if (gn == 1) {
        gemm(Trans::no, Trans::no, T(1), mat(w, in_, K), mat(col, K, cols), T(0),
             mat(dxg, in_, cols));
      } else {  // the packed x is no longer needed: its buffer takes the packed dx
        gemm(Trans::no, Trans::no, T(1), mat(w, in_, K), mat(col, K, cols), T(0),
             mat(cache.in.data(), in_, cols));
        unpack_samples(cache.in.data(), gn, in_, L, dxg, static_cast<const T*>(nullptr));
      }
    }
    if (phases) transpose(cache.dwt.data(), K, in_, dw);
  }

 private:
  // Whether this layer runs over phases (see the file comment): float on the AVX-512 kernel, the
  // adjoint convolution (over the output image) in phase form, a kernel of at least 2 x 2, more
  // than 4 input and output channels and input pixels, and offsets within 31 bits (two samples
  // of x or of y; groups of more samples are bounded by group_size's workspace). Decided once
  // per call, so the products never decline midway.
  bool phased(const spatial_detail::ConvGeometry& g) const {
    if constexpr (std::is_same_v<T, float>)
      return k_ >= 2 && in_ > 4 && out_ > 4 && g.cols() > 4 &&
             phase_detail::phase_form(k_, s_, p_, g.height, g.width, g.out_h, g.out_w) &&
             phase_detail::shifted_available(out_, 0) &&
             2 * std::max(in_ * g.cols(), out_ * g.height * g.width) < (index_t{1} << 30);
    (void)g;
    return false;
  }

  // The kernel's per-phase blocks of the forward's phase products (phase_detail::adjoint_weights;
  // W: [Cin, Cout, k, k]).
  void phase_weights(const T* w, Tensor<T>& wp) const {
    if (wp.numel() != in_ * out_ * k_ * k_) wp.resize(Shape{out_, in_ * k_ * k_});
    phase_detail::adjoint_weights(w, in_, out_, k_, p_, wp.data());
  }

  // y of a group [gn, Cout, Ho, Wo] (before the bias) from x [gn, Cin, H, W]: the adjoint
  // convolution's phase products (phase_detail::adjoint_products) into ws, interleaved into yg.
  bool phase_forward(const T* wp, const T* xg, const spatial_detail::ConvGeometry& g, index_t gn,
                     T* ws, T* yg) const {
#if FLOWDIFF_SGEMM_X86
    if constexpr (std::is_same_v<T, float>)
      return phase_detail::adjoint_products(wp, xg, in_, out_, k_, p_, g.out_h, g.out_w, gn, ws,
                                            yg);
#endif
    (void)wp, (void)xg, (void)g, (void)gn, (void)ws, (void)yg;
    return false;
  }

  // A group's backward over the phases of dy [gn, Cout, Ho, Wo] (split into ws): dwt [K, Cin] +=
  // im2col(dy) x^T with x packed [Cin, gn H W] (xg), and, when dxp is set, dxp [Cin, gn H W] =
  // W im2col(dy).
  // dxp: [in, gn L], or with cblock = L > 0 the samples' [gn, in, L] (written in place).
  bool phase_backward(const T* w, const T* xg, const T* dyg, const spatial_detail::ConvGeometry& g,
                      index_t gn, T* ws, T* dwt, T* dxp, index_t cblock) const {
#if FLOWDIFF_SGEMM_X86
    if constexpr (std::is_same_v<T, float>) {
      const index_t cols = gn * g.cols(), K = g.rows();
      phase_detail::split_phases(dyg, gn * out_, g.height, g.width, ws);
      const auto sp = phase_detail::forward_columns(ws, out_, k_, p_, g.out_h, g.out_w);
      if (!phase_detail::shifted_gemm_at(xg, in_, sp, out_, cols, T(1), dwt, in_)) return false;
      if (dxp != nullptr &&
          !phase_detail::shifted_gemm(w, K, in_, sp, out_, cols, dxp, cblock > 0 ? cblock : cols,
                                      cblock, in_ * cblock))
        return false;
      return true;
    }
#endif
    (void)w, (void)xg, (void)dyg, (void)g, (void)gn, (void)ws, (void)dwt, (void)dxp, (void)cblock;
    return false;
  }

  // dst[j, i] = src[i, j] for src [rows, cols].
  static void transpose(const T* src, index_t rows, index_t cols, T* dst) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
  }

  void check_input(const Shape& s) const {
    if (s.rank() != 4 || s[1] != in_ || s[2] < 1 || s[3] < 1 ||
        (s[2] - 1) * s_ + k_ + op_ <= 2 * p_ || (s[3] - 1) * s_ + k_ + op_ <= 2 * p_)
      fail<shape_error>(prefix_, " (ConvTranspose2d): x: expected shape [N, ", in_,
                        ", H, W] with a non-empty output, got ", s);
  }

  // The convolution whose adjoint this layer is: over the output image (ys), giving x's H x W.
  spatial_detail::ConvGeometry geometry(const Shape& ys, const Shape& xs) const {
    spatial_detail::ConvGeometry g;
    g.channels = out_;
    g.height = ys[2];
    g.width = ys[3];
    g.kernel = k_;
    g.stride = s_;
    g.padding = p_;
    g.out_h = xs[2];
    g.out_w = xs[3];
    return g;
  }

  void prepare(Cache& cache, index_t G, index_t K, index_t L) const {
    if (cache.col.numel() < K * G * L) cache.col.resize(Shape{K * G * L});
    if (G > 1 && cache.in.numel() < in_ * G * L) cache.in.resize(Shape{in_ * G * L});
  }

  std::string prefix_;
  index_t in_, out_, k_, s_, p_, op_;
  bool bias_;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
