// flowdiff/data/fashion_mnist.hpp — the Fashion-MNIST data set (Xiao, Rasul and Vollgraf, 2017:
// 60000 training and 10000 test greyscale 28x28 images of 10 clothing classes) loaded from its four
// IDX files into an ImageDataset: images [N, 1, 28, 28] (or [N, 1, 32, 32] with pad_to_32) with
// each pixel p in [0, 255] mapped to x = p / 127.5 - 1, so 0 -> -1 (background) and 255 -> 1
// exactly, and labels [N] in [0, 10). The files are looked up in FashionMnistOptions::dir, else in
// $FLOWDIFF_FASHION_MNIST, else in /usr/share/datasets/fashion-mnist (Debian's
// dataset-fashion-mnist); each may be gzip-compressed (name.gz) or raw (name). Link flowdiff::io
// (zlib) to call these loaders.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/data/dataset.hpp"
#include "flowdiff/data/idx.hpp"

namespace flowdiff::data {

enum class Split { Train, Test };

struct FashionMnistOptions {
  std::filesystem::path dir = {};  // empty: $FLOWDIFF_FASHION_MNIST if set, else the Debian path
  bool pad_to_32 = false;          // pad 28x28 with the background value -1 to 32x32, 2 px a side
  index_t limit = 0;               // 0: every image; else the first min(limit, N) images
};

/// Where Debian's dataset-fashion-mnist package puts the files.
inline constexpr const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

/// The directory the loader reads: options.dir, else $FLOWDIFF_FASHION_MNIST (when set and not
/// empty), else /usr/share/datasets/fashion-mnist.
inline std::filesystem::path fashion_mnist_dir(const FashionMnistOptions& options = {}) {
  if (!options.dir.empty()) return options.dir;
  if (const char* env = std::getenv("FLOWDIFF_FASHION_MNIST"); env != nullptr && *env != '\0')
    return env;
  return fashion_mnist_default_dir;
}

/// The ten class names, indexed by label.
inline std::span<const char* const> fashion_mnist_class_names() {
  static constexpr std::array<const char*, 10> names{
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

namespace detail {

/// dir/base.gz if it exists, else dir/base if it exists, else an io_error saying how to get it.
inline std::filesystem::path find_fashion_file(const std::filesystem::path& dir,
                                               const std::string& base) {
  namespace fs = std::filesystem;
  constexpr const char* how =
      "; install the data with `apt-get install dataset-fashion-mnist`, or set "
      "FLOWDIFF_FASHION_MNIST "
      "or FashionMnistOptions::dir to a directory holding the four IDX files";
  std::error_code ec;
  require<io_error>(fs::is_directory(dir, ec), "fashion_mnist: data directory '", dir.string(),
                    "' does not exist (looking for ", base, "[.gz])", how);
  for (const fs::path& p : {dir / (base + ".gz"), dir / base})
    if (fs::is_regular_file(p, ec)) return p;
  fail<io_error>("fashion_mnist: cannot find ", base, ".gz or ", base, " in '", dir.string(), "'",
                 how);
}

}  // namespace detail

/// Loads one split. Throws io_error for missing or corrupt files (naming them), when the images and
/// labels files disagree in count, or when a label is not in [0, 10).
inline ImageDataset fashion_mnist(Split split, const FashionMnistOptions& options = {}) {
  require<config_error>(options.limit >= 0, "fashion_mnist: options.limit must be >= 0, got ",
                        options.limit);
  const auto dir = fashion_mnist_dir(options);
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  const auto image_file = detail::find_fashion_file(dir, prefix + "-images-idx3-ubyte");
  const auto label_file = detail::find_fashion_file(dir, prefix + "-labels-idx1-ubyte");
  const IdxArray im = read_idx(image_file);
  const IdxArray lb = read_idx(label_file);
  require<io_error>(im.dims.size() == 3, "fashion_mnist: '", image_file.string(),
                    "' must hold images [N, H, W], got dims ", detail::dims_string(im.dims));
  require<io_error>(lb.dims.size() == 1, "fashion_mnist: '", label_file.string(),
                    "' must hold labels [N], got dims ", detail::dims_string(lb.dims));
  require<io_error>(im.dims[0] == lb.dims[0], "fashion_mnist: '", image_file.string(), "' holds ",
                    im.dims[0], " images but '", label_file.string(), "' holds ", lb.dims[0],
                    " labels");
  const index_t h = im.dims[1], w = im.dims[2];
  const index_t n = options.limit == 0 ? im.dims[0] : std::min(options.limit, im.dims[0]);
  const index_t side = options.pad_to_32 ? 32 : 0;
  if (options.pad_to_32)
    require<io_error>(h <= side && w <= side, "fashion_mnist: pad_to_32 needs images of at most ",
                      "32 x 32, '", image_file.string(), "' holds ", h, " x ", w);
  const index_t oh = options.pad_to_32 ? side : h, ow = options.pad_to_32 ? side : w;
  const index_t top = (oh - h) / 2, left = (ow - w) / 2;

  ImageDataset ds;
  ds.num_classes = 10;
  ds.images = Tensor<float>(Shape{n, 1, oh, ow});
  ds.labels = Tensor<label_t>(Shape{n});
  float* x = ds.images.data();
  const std::uint8_t* p = im.data.data();
  // One image per iteration (the background first, then the pixels), in parallel: most of the
  // time is the first touch of the freshly allocated output.
  Cpu::parallel_for(
      n,
      [&](index_t i) {
        float* xi = x + i * oh * ow;
        if (oh != h || ow != w) std::fill(xi, xi + oh * ow, -1.0f);
        for (index_t r = 0; r < h; ++r)
          for (index_t c = 0; c < w; ++c)
            xi[(top + r) * ow + left + c] =
                static_cast<float>(p[(i * h + r) * w + c]) / 127.5f - 1.0f;
      },
      h * w);
  for (index_t i = 0; i < n; ++i) {
    const unsigned y = lb.data[static_cast<std::size_t>(i)];
    require<io_error>(y < 10, "fashion_mnist: '", label_file.string(), "': label ", y, " at index ",
                      i, " is not in [0, 10)");
    ds.labels[i] = static_cast<label_t>(y);
  }
  return ds;
}

}  // namespace flowdiff::data
