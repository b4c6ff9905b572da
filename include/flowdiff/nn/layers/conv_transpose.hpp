// flowdiff/nn/layers/conv_transpose.hpp — transposed 2-d convolution as torch.nn.ConvTranspose2d
// (square kernel k, stride s, padding p, output_padding op < s; no dilation or groups): the adjoint
// of Conv2d with the same k, s, p, which maps [Cin, H, W] to [Cout, Ho, Wo],
// Ho = (H - 1) s - 2p + k + op. With W: [Cin, Cout k k] (PyTorch's weight [Cin, Cout, k, k]) and
// the im2col / col2im of a convolution over the *output* image (which produces H x W columns):
//   forward   y_n = col2im(W^T x_n) + b                     x_n: [Cin, H W]
//   backward  dW += x_n im2col(dy_n)^T,  db += sum_{n,hw} dy,  dx_n = W im2col(dy_n)
// Groups of samples share one GEMM (their H W columns side by side), as in Conv2d.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include "flowdiff/nn/layers/conv.hpp"

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
    Tensor<T> col;  // [Cout k k, G H W]: W^T x in forward, im2col(dy) in backward
    Tensor<T> in;   // [Cin, G H W]: packed x (and packed dx) of a group (G > 1 only)
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
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
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
    for (index_t n0 = 0; n0 < n; n0 += G) {
      const index_t gn = std::min(G, n - n0), cols = gn * L;
      T* col = cache.col.data();
      for (index_t i = 0; i < gn; ++i) im2col(dy.data() + (n0 + i) * plane_y, g, col + i * L, cols);
      const T* xg = x.data() + n0 * in_ * L;
      if (gn > 1) {
        pack_samples(xg, gn, in_, L, cache.in.data());
        xg = cache.in.data();
      }
      gemm(Trans::no, Trans::yes, T(1), mat(xg, in_, cols), mat(col, K, cols), T(1),
           mat(dw, in_, K));
      if (!want_dx) continue;
      T* dxg = dx.data() + n0 * in_ * L;
      if (gn == 1) {
        gemm(Trans::no, Trans::no, T(1), mat(w, in_, K), mat(col, K, cols), T(0),
             mat(dxg, in_, cols));
      } else {  // the packed x is no longer needed: its buffer takes the packed dx
        gemm(Trans::no, Trans::no, T(1), mat(w, in_, K), mat(col, K, cols), T(0),
             mat(cache.in.data(), in_, cols));
        unpack_samples(cache.in.data(), gn, in_, L, dxg, static_cast<const T*>(nullptr));
      }
    }
  }

 private:
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
