// flowdiff/io/image.hpp — 8-bit RGB images and PNG output. Encoding is stb_image_write's (Debian's
// libstb: link flowdiff::io); files are written atomically (io/file.hpp). image_grid() tiles a
// batch of images x: [N, C, H, W] with values in [lo, hi] (default [-1, 1], the range models are
// trained in) into one picture, `columns` images per row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/file.hpp"

extern "C" int stbi_write_png_to_func(void (*func)(void* context, void* data, int size),
                                      void* context, int w, int h, int comp, const void* data,
                                      int stride_in_bytes);

namespace flowdiff::io {

struct Rgb {
  std::uint8_t r = 0, g = 0, b = 0;
};

/// A width × height RGB image, row-major, top row first.
struct Image {
  int width = 0, height = 0;
  std::vector<std::uint8_t> pixels;  // [height, width, 3]

  Image() = default;
  Image(int w, int h, Rgb fill = {255, 255, 255}) : width(w), height(h) {
    require<config_error>(w > 0 && h > 0 && w <= 1 << 15 && h <= 1 << 15,
                          "Image: size must be in [1, 32768]^2, got ", w, " x ", h);
    pixels.resize(static_cast<std::size_t>(w) * h * 3);
    for (std::size_t i = 0; i < pixels.size(); i += 3) {
      pixels[i] = fill.r;
      pixels[i + 1] = fill.g;
      pixels[i + 2] = fill.b;
    }
  }

  bool inside(int x, int y) const { return x >= 0 && y >= 0 && x < width && y < height; }

  void set(int x, int y, Rgb c) {
    if (!inside(x, y)) return;
    auto* p = &pixels[(static_cast<std::size_t>(y) * width + x) * 3];
    p[0] = c.r, p[1] = c.g, p[2] = c.b;
  }

  /// Alpha-blends colour c over pixel (x, y) with opacity a in [0, 1].
  void blend(int x, int y, Rgb c, float a) {
    if (!inside(x, y)) return;
    auto* p = &pixels[(static_cast<std::size_t>(y) * width + x) * 3];
    auto mix = [a](std::uint8_t dst, std::uint8_t src) {
      return static_cast<std::uint8_t>(std::lround(dst + a * (float(src) - float(dst))));
    };
    p[0] = mix(p[0], c.r), p[1] = mix(p[1], c.g), p[2] = mix(p[2], c.b);
  }

  Rgb get(int x, int y) const {
    const auto* p = &pixels[(static_cast<std::size_t>(y) * width + x) * 3];
    return {p[0], p[1], p[2]};
  }
};

/// PNG bytes of an image.
inline std::vector<unsigned char> encode_png(const Image& img) {
  require<config_error>(img.width > 0 && img.height > 0 &&
                            img.pixels.size() == static_cast<std::size_t>(img.width) * img.height * 3,
                        "encode_png: image of ", img.width, " x ", img.height,
                        " has inconsistent pixel storage");
  std::vector<unsigned char> out;
  auto sink = [](void* ctx, void* data, int size) {
    auto* v = static_cast<std::vector<unsigned char>*>(ctx);
    const auto* d = static_cast<const unsigned char*>(data);
    v->insert(v->end(), d, d + size);
  };
  const int ok = stbi_write_png_to_func(sink, &out, img.width, img.height, 3, img.pixels.data(),
                                        img.width * 3);
  require<io_error>(ok != 0 && !out.empty(), "encode_png: stb failed to encode a ", img.width,
                    " x ", img.height, " image");
  return out;
}

/// Writes img as a PNG file, atomically.
inline void write_png(const std::filesystem::path& path, const Image& img) {
  const auto bytes = encode_png(img);
  write_file_atomic(path, bytes);
}

/// Tiles images x: [N, C, H, W] (C = 1 grey or 3 RGB; values in [lo, hi]) into a grid with
/// `columns` images per row and a `pad`-pixel border.
template <class T>
Image image_grid(View<const T, Cpu> x, int columns, T lo = T(-1), T hi = T(1), int pad = 2) {
  require<shape_error>(x.rank() == 4 && (x.dim(1) == 1 || x.dim(1) == 3),
                       "image_grid: x must be [N, C, H, W] with C = 1 or 3, got ", x.shape());
  require<config_error>(columns >= 1, "image_grid: columns must be >= 1, got ", columns);
  require<config_error>(hi > lo, "image_grid: need hi > lo, got [", lo, ", ", hi, "]");
  const int n = static_cast<int>(x.dim(0)), c = static_cast<int>(x.dim(1));
  const int h = static_cast<int>(x.dim(2)), w = static_cast<int>(x.dim(3));
  const int cols = std::min(columns, std::max(n, 1));
  const int rows = (n + cols - 1) / cols;
  Image img(cols * (w + pad) + pad, std::max(rows, 1) * (h + pad) + pad, {40, 40, 40});
  auto to8 = [&](T v) {
    if (!std::isfinite(static_cast<double>(v))) return std::uint8_t{255};
    const double u = (static_cast<double>(v) - lo) / (static_cast<double>(hi) - lo);
    return static_cast<std::uint8_t>(std::lround(std::clamp(u, 0.0, 1.0) * 255.0));
  };
  for (int i = 0; i < n; ++i) {
    const int ox = pad + (i % cols) * (w + pad), oy = pad + (i / cols) * (h + pad);
    for (int yy = 0; yy < h; ++yy)
      for (int xx = 0; xx < w; ++xx) {
        const auto r = to8(x(i, 0, yy, xx));
        const auto g = c == 3 ? to8(x(i, 1, yy, xx)) : r;
        const auto b = c == 3 ? to8(x(i, 2, yy, xx)) : r;
        img.set(ox + xx, oy + yy, {r, g, b});
      }
  }
  return img;
}

/// image_grid written to a PNG file.
template <class T>
void write_png_grid(const std::filesystem::path& path, View<const T, Cpu> x, int columns,
                    T lo = T(-1), T hi = T(1)) {
  write_png(path, image_grid(x, columns, lo, hi));
}

}  // namespace flowdiff::io
