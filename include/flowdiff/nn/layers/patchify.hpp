// flowdiff/nn/layers/patchify.hpp — cutting images into non-overlapping p x p patches and back,
// and the patch embedding of a vision transformer (timm's PatchEmbed: a Conv2d with
// kernel = stride = p, then flatten(2).transpose(1, 2)). With h = H / p, w = W / p, token
// k = a w + b for patch row a, column b, and pixel (u, v) inside the patch:
//   patchify    P[n, k, e] = x[n, c, a p + u, b p + v],   x: [N, C, H, W] -> P: [N, h w, C p p]
//               e = (c p + u) p + v  (PatchLayout::channel_first: the Conv2d weight layout), or
//               e = (u p + v) C + c  (PatchLayout::channel_last: DiT's unpatchify layout)
//   unpatchify  the inverse permutation, P -> x. Both are permutations, so each one's backward is
//               the other (the adjoint of a permutation is its inverse).
//   PatchEmbed  y[n, k, :] = W P[n, k, :] + b,  W: [D, C, p, p] as [D, C p p],  y: [N, h w, D]
//               backward  dW += dy^T P,  db += sum dy,  dx = unpatchify(dy W)
// PatchEmbed registers prefix.proj.weight [D, C, p, p] and prefix.proj.bias [D] (timm / DiT's
// "x_embedder.proj.*"), so a PyTorch Conv2d's state_dict loads unchanged; its product is one GEMM
// over all N h w patches, and the tokens come out already in [N, L, D] order (no transpose).
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Order of the C p p values of one patch vector (see the file comment).
enum class PatchLayout { channel_first, channel_last };

namespace patch_detail {

// Checks x: [N, C, H, W] with H, W positive multiples of p, and P: [N, (H/p)(W/p), C p p].
template <class U, class V>
void check_patches(const char* who, View<U> x, View<V> patches, index_t p) {
  require<config_error>(p >= 1, who, ": patch size must be >= 1, got ", p);
  if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) < 1 || x.dim(2) < p || x.dim(3) < p ||
      x.dim(2) % p != 0 || x.dim(3) % p != 0)
    fail<shape_error>(who, ": image: expected shape [N, C, H, W] with H, W positive multiples of ",
                      "the patch size ", p, ", got ", x.shape());
  const Shape ps{x.dim(0), (x.dim(2) / p) * (x.dim(3) / p), x.dim(1) * p * p};
  if (!(patches.shape() == ps))
    fail<shape_error>(who, ": patches: expected shape ", ps, " for an image of shape ", x.shape(),
                      " and patch size ", p, ", got ", patches.shape());
}

// Moves between image and patch layout; to_patches selects the direction.
template <class T>
void permute(const T* src, T* dst, const Shape& xs, index_t p, PatchLayout layout,
             bool to_patches) {
  const index_t C = xs[1], H = xs[2], W = xs[3], h = H / p, w = W / p, E = C * p * p;
  const bool first = layout == PatchLayout::channel_first;
  // One task per (sample, patch row): it owns p full image rows and w tokens.
  Cpu::parallel_for(
      xs[0] * h,
      [=](index_t na) {
        const index_t n = na / h, a = na % h;
        for (index_t b = 0; b < w; ++b) {
          const index_t tok = (n * h + a) * w + b;
          for (index_t c = 0; c < C; ++c)
            for (index_t u = 0; u < p; ++u)
              for (index_t v = 0; v < p; ++v) {
                const index_t e = first ? (c * p + u) * p + v : (u * p + v) * C + c;
                const index_t pix = ((n * C + c) * H + a * p + u) * W + b * p + v;
                if (to_patches)
                  dst[tok * E + e] = src[pix];
                else
                  dst[pix] = src[tok * E + e];
              }
        }
      },
      w * E);
}

}  // namespace patch_detail

// x: [N, C, H, W] -> patches: [N, (H/p)(W/p), C p p] (overwritten)
template <class T>
void patchify(std::type_identity_t<View<const T>> x, index_t p, View<T> patches,
              PatchLayout layout = PatchLayout::channel_first) {
  patch_detail::check_patches("patchify", x, patches, p);
  patch_detail::permute(x.data(), patches.data(), x.shape(), p, layout, true);
}

// patches: [N, (H/p)(W/p), C p p] -> x: [N, C, H, W] (overwritten; its shape gives C, H, W)
template <class T>
void unpatchify(std::type_identity_t<View<const T>> patches, index_t p, View<T> x,
                PatchLayout layout = PatchLayout::channel_first) {
  patch_detail::check_patches("unpatchify", x, patches, p);
  patch_detail::permute(patches.data(), x.data(), x.shape(), p, layout, false);
}

/// timm's PatchEmbed (Conv2d(C, D, kernel = stride = p), flattened to tokens), as one GEMM over the
/// patches of the whole batch.
template <class T>
class PatchEmbed {
 public:
  /// Registers prefix.proj.weight [dim, in_ch, p, p] and prefix.proj.bias [dim].
  PatchEmbed(Parameters<T>& ps, const std::string& prefix, index_t in_ch, index_t dim,
             index_t patch)
      : prefix_(prefix), c_(in_ch), d_(dim), p_(patch) {
    require<config_error>(in_ch >= 1 && dim >= 1 && patch >= 1, prefix,
                          " (PatchEmbed): in_ch, dim and patch must be >= 1, got in_ch = ", in_ch,
                          ", dim = ", dim, ", patch = ", patch);
    w_ = ps.add(prefix + ".proj.weight", Shape{dim, in_ch, patch, patch});
    b_ = ps.add(prefix + ".proj.bias", Shape{dim});
  }

  index_t in_channels() const { return c_; }
  index_t dim() const { return d_; }
  index_t patch_size() const { return p_; }
  index_t patch_dim() const { return c_ * p_ * p_; }
  index_t weight_id() const { return w_; }
  index_t bias_id() const { return b_; }
  const std::string& prefix() const { return prefix_; }

  /// PyTorch's Conv2d default: W and b uniform in [-1/sqrt(C p p), 1/sqrt(C p p)].
  void init(Parameters<T>& ps, Generator& gen) const {
    const T bound = T(1) / std::sqrt(static_cast<T>(patch_dim()));
    fill_uniform(ps.param(w_), gen, -bound, bound);
    fill_uniform(ps.param(b_), gen, -bound, bound);
  }

  struct Cache {
    Tensor<T> patches;   // [N, L, C p p] of the last forward
    Tensor<T> dpatches;  // [N, L, C p p] backward scratch
  };

  /// [N, C, H, W] -> [N, (H/p)(W/p), D]
  Shape output_shape(const Shape& s) const {
    check_input(s);
    return Shape{s[0], (s[2] / p_) * (s[3] / p_), d_};
  }

  // x: [N, C, H, W] -> y: [N, (H/p)(W/p), D]
  void forward(const Parameters<T>& ps, View<const T> x, View<T> y, Cache& cache) const {
    const Shape ys = output_shape(x.shape());
    detail::check_arg(prefix_, "PatchEmbed", "y", y, ys);
    const Shape pshape{ys[0], ys[1], patch_dim()};
    if (!(cache.patches.shape() == pshape)) cache.patches.resize(pshape);
    patchify<T>(x, p_, cache.patches.view(), PatchLayout::channel_first);
    const index_t rows = ys[0] * ys[1];
    gemm(Trans::no, Trans::yes, T(1), cache.patches.reshape({rows, patch_dim()}), weight(ps), T(0),
         y.reshape({rows, d_}));
    const T* b = ps.param(b_).data();
    T* py = y.data();
    const index_t d = d_;
    Cpu::parallel_for(
        rows,
        [=](index_t r) {
          for (index_t j = 0; j < d; ++j) py[r * d + j] += b[j];
        },
        d);
  }

  // x: [N, C, H, W] (the forward's input), dy: [N, L, D], dx: like x or empty. Uses the patches the
  // matching forward left in the cache.
  void backward(Parameters<T>& ps, View<const T> x, View<const T> dy, View<T> dx,
                Cache& cache) const {
    const Shape ys = output_shape(x.shape());
    detail::check_arg(prefix_, "PatchEmbed", "dy", dy, ys);
    const Shape pshape{ys[0], ys[1], patch_dim()};
    require<config_error>(cache.patches.shape() == pshape, prefix_,
                          " (PatchEmbed): backward needs the cache of the matching forward call");
    const index_t rows = ys[0] * ys[1];
    const auto dy2 = dy.reshape({rows, d_});
    gemm(Trans::yes, Trans::no, T(1), dy2,
         View<const T>(cache.patches.reshape({rows, patch_dim()})), T(1),
         ps.grad(w_).reshape({d_, patch_dim()}));
    T* db = ps.grad(b_).data();
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < d_; ++j) db[j] += dy.data()[r * d_ + j];
    if (dx.empty()) return;
    detail::check_arg(prefix_, "PatchEmbed", "dx", dx, x.shape());
    if (!(cache.dpatches.shape() == pshape)) cache.dpatches.resize(pshape);
    gemm(Trans::no, Trans::no, T(1), dy2, weight(ps), T(0),
         cache.dpatches.reshape({rows, patch_dim()}));
    unpatchify<T>(cache.dpatches.view(), p_, dx, PatchLayout::channel_first);
  }

 private:
  View<const T> weight(const Parameters<T>& ps) const {
    return ps.param(w_).reshape({d_, patch_dim()});
  }

  void check_input(const Shape& s) const {
    if (s.rank() != 4 || s[0] < 1 || s[1] != c_ || s[2] < p_ || s[3] < p_ || s[2] % p_ != 0 ||
        s[3] % p_ != 0)
      fail<shape_error>(prefix_, " (PatchEmbed): x: expected shape [N, ", c_,
                        ", H, W] with H, W positive multiples of ", p_, ", got ", s);
  }

  std::string prefix_;
  index_t c_, d_, p_;
  index_t w_ = -1, b_ = -1;
};

}  // namespace flowdiff::nn
