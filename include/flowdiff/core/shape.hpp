// flowdiff/core/shape.hpp — a small fixed-capacity shape (up to 6 dimensions, row-major, contiguous).
// Shapes are values: cheap to copy, comparable, printable as "[64, 1, 32, 32]".
#pragma once

#include <initializer_list>
#include <ostream>
#include <sstream>
#include <string>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"

namespace flowdiff {

class Shape {
 public:
  static constexpr int max_rank = 6;

  constexpr Shape() = default;

  Shape(std::initializer_list<index_t> dims) {
    require<shape_error>(static_cast<int>(dims.size()) <= max_rank, "Shape: rank must be <= ",
                         max_rank, ", got ", dims.size());
    for (index_t d : dims) push_back(d);
  }

  template <class It>
  static Shape from_range(It first, It last) {
    Shape s;
    for (; first != last; ++first) s.push_back(static_cast<index_t>(*first));
    return s;
  }

  void push_back(index_t d) {
    require<shape_error>(rank_ < max_rank, "Shape: rank must be <= ", max_rank);
    require<shape_error>(d >= 0, "Shape: extents must be >= 0, got ", d);
    dims_[rank_++] = d;
  }

  FLOWDIFF_INLINE constexpr int rank() const { return rank_; }
  FLOWDIFF_INLINE constexpr index_t operator[](int i) const { return dims_[i]; }
  FLOWDIFF_INLINE constexpr index_t& operator[](int i) { return dims_[i]; }

  /// Number of elements (1 for rank 0).
  FLOWDIFF_INLINE constexpr index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }

  /// Leading extent: the number of samples of a batch (1 for a scalar).
  FLOWDIFF_INLINE constexpr index_t rows() const { return rank_ == 0 ? 1 : dims_[0]; }
  /// Elements per sample: numel() / rows() (the feature size d of a [N, d] batch).
  FLOWDIFF_INLINE constexpr index_t row_size() const {
    index_t n = 1;
    for (int i = 1; i < rank_; ++i) n *= dims_[i];
    return n;
  }

  /// Shape without its leading dimension.
  Shape tail() const {
    Shape s;
    for (int i = 1; i < rank_; ++i) s.push_back(dims_[i]);
    return s;
  }

  /// The same shape with dimension 0 replaced by n.
  Shape with_rows(index_t n) const {
    Shape s = *this;
    require<shape_error>(rank_ >= 1, "Shape::with_rows: rank-0 shape has no rows");
    s.dims_[0] = n;
    return s;
  }

  friend constexpr bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[i] != b.dims_[i]) return false;
    return true;
  }

  std::string str() const {
    std::ostringstream os;
    os << '[';
    for (int i = 0; i < rank_; ++i) os << (i ? ", " : "") << dims_[i];
    os << ']';
    return os.str();
  }

  friend std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.str(); }

 private:
  // A plain array, not std::array: its operator[] is host-only under nvcc without
  // --expt-relaxed-constexpr, and these accessors run on the device.
  index_t dims_[max_rank] = {};
  int rank_ = 0;
};

}  // namespace flowdiff
