// flowdiff/data/batcher.hpp — shuffled mini-batches over a data set held in memory. Epoch e visits
// the N samples in the order of a permutation pi_e that is a pure function of (seed, e): a
// Fisher–Yates shuffle whose swap for position k (k = N-1 .. 1) is j = floor(r_k (k + 1) / 2^64),
// r_k a 64-bit Philox4x32-10 output at counter (k, 0, e) under the key `seed`. So a run resumed
// from a saved (epoch, position) reproduces the order exactly, and two batchers with the same seed
// agree. Batches are always full: next() with batch size B takes pi_e[position .. position + B) and
// advances position by B; when fewer than B indices remain in the epoch, those are skipped and the
// batch starts the next epoch at position 0 (so every sample of an epoch appears at most once, and
// at least N - B + 1 of them appear). Rows are copied into caller-owned outputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/data/dataset.hpp"

namespace flowdiff::data {

/// The visiting order of epoch `epoch` for N = n samples and key `seed`: a permutation of [0, n).
inline std::vector<index_t> epoch_permutation(index_t n, std::uint64_t seed, std::int64_t epoch) {
  require<config_error>(n >= 0 && n <= index_t(0xFFFFFFFF),
                        "epoch_permutation: n must be in [0, 2^32), got ", n);
  require<config_error>(epoch >= 0, "epoch_permutation: epoch must be >= 0, got ", epoch);
  std::vector<index_t> perm(static_cast<std::size_t>(n));
  for (index_t k = 0; k < n; ++k) perm[static_cast<std::size_t>(k)] = k;
  Generator gen(seed);
  gen.set_offset(static_cast<std::uint64_t>(epoch));
  const auto stream = gen.next_stream();
  for (index_t k = n - 1; k >= 1; --k) {
    const auto b = stream.block(static_cast<std::uint32_t>(k), 0);
    const std::uint64_t r = (std::uint64_t{b.v[0]} << 32) | b.v[1];
    const auto m = static_cast<std::uint64_t>(k + 1);  // < 2^32: the high half of r * m below
    const auto j = static_cast<index_t>(((r >> 32) * m + (((r & 0xFFFFFFFFu) * m) >> 32)) >> 32);
    std::swap(perm[static_cast<std::size_t>(k)], perm[static_cast<std::size_t>(j)]);
  }
  return perm;
}

/// Mini-batches of rows of items: [N, ...] (any element type T) with optional labels: [N]. Holds
/// views, not copies: the tensors it was built from must outlive it and stay where they are (moving
/// a Tensor keeps its buffer, so moving the data set is fine; resizing it is not).
template <class T = float>
class BasicBatcher {
 public:
  /// Where the batcher stands: the next batch starts at pi_epoch[position], 0 <= position <= N.
  struct State {
    std::int64_t epoch = 0;
    std::int64_t position = 0;
  };

  /// items: [N, ...] with N >= 1; labels: [N], or empty when the data set has none.
  BasicBatcher(View<const T> items, View<const label_t> labels, std::uint64_t seed)
      : items_(items), labels_(labels), seed_(seed) {
    require<shape_error>(items.rank() >= 1 && items.dim(0) >= 1 && items.dim(0) <= 0xFFFFFFFF,
                         "Batcher: items must be [N, ...] with 1 <= N < 2^32, got ", items.shape());
    require<shape_error>(labels.empty() || (labels.rank() == 1 && labels.dim(0) == items.dim(0)),
                         "Batcher: labels must be [", items.dim(0), "] (or empty), got ",
                         labels.shape());
  }

  /// Batches of an ImageDataset's images and labels (the data set must outlive the batcher).
  BasicBatcher(const ImageDataset& data, std::uint64_t seed) requires std::is_same_v<T, float>
      : BasicBatcher(data.images.view(), data.labels.view(), seed) {}
  /// A temporary data set would dangle: keep the data set in a variable.
  BasicBatcher(ImageDataset&& data, std::uint64_t seed) = delete;

  /// x: [B, ...] (the items' trailing shape, 1 <= B <= N); y: [B], or empty to skip the labels.
  /// Fills the next batch and advances the state.
  void next(View<T> x, View<label_t> y) {
    const index_t n = size();
    require<shape_error>(x.rank() == items_.rank() && x.dim(0) >= 1 && x.dim(0) <= n &&
                             x.shape().tail() == items_.shape().tail(),
                         "Batcher::next: x must be [B, ...] with 1 <= B <= ", n,
                         " and the items' trailing shape (items are ", items_.shape(), "), got ",
                         x.shape());
    const index_t b = x.dim(0);
    require<shape_error>(y.empty() || (y.rank() == 1 && y.dim(0) == b),
                         "Batcher::next: y must be [", b, "] (or empty), got ", y.shape());
    require<config_error>(y.empty() || !labels_.empty(), "Batcher::next: labels requested (y is [",
                          b, "]) but the batcher has none");
    if (position_ + b > n) {
      ++epoch_;
      position_ = 0;
    }
    if (perm_epoch_ != epoch_) {
      perm_ = epoch_permutation(n, seed_, epoch_);
      perm_epoch_ = epoch_;
    }
    const index_t row = items_.row_size();
    for (index_t k = 0; k < b; ++k) {
      const index_t i = perm_[static_cast<std::size_t>(position_ + k)];
      std::copy_n(items_.data() + i * row, row, x.data() + k * row);
      if (!y.empty()) y[k] = labels_[i];
    }
    position_ += b;
  }

  /// The number of samples N.
  index_t size() const { return items_.dim(0); }
  /// Full batches of size b in one epoch: floor(N / b).
  index_t batches_per_epoch(index_t b) const {
    require<config_error>(b >= 1 && b <= size(),
                          "Batcher::batches_per_epoch: batch must be in [1, ", size(), "], got ",
                          b);
    return size() / b;
  }

  std::int64_t epoch() const { return epoch_; }
  std::int64_t position() const { return position_; }
  std::uint64_t seed() const { return seed_; }

  /// For checkpoints: set_state(state()) in a fresh batcher with the same seed resumes exactly.
  State state() const { return {epoch_, position_}; }
  void set_state(State s) {
    require<config_error>(s.epoch >= 0, "Batcher::set_state: epoch must be >= 0, got ", s.epoch);
    require<config_error>(s.position >= 0 && s.position <= size(),
                          "Batcher::set_state: position must be in [0, ", size(), "], got ",
                          s.position);
    epoch_ = s.epoch;
    position_ = s.position;
  }

 private:
  View<const T> items_;
  View<const label_t> labels_;
  std::uint64_t seed_;
  std::int64_t epoch_ = 0, position_ = 0;
  std::vector<index_t> perm_;
  std::int64_t perm_epoch_ = -1;
};

/// The batcher of image data sets: Batcher(dataset, seed); next(x: [B, C, H, W], y: [B]).
using Batcher = BasicBatcher<float>;

}  // namespace flowdiff::data
