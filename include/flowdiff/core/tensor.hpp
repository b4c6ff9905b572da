// flowdiff/core/tensor.hpp — owning tensors and non-owning views over contiguous row-major memory
// of a backend. Tensor<T, B> owns its buffer (move-only; clone() copies explicitly, so no hot loop
// copies by accident); View<T, B> is a pointer and a shape, cheap to pass by value, and
// View<const T, B> is the read-only form every input parameter takes. Dimension 0 is the batch.
#pragma once

#include <initializer_list>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/shape.hpp"

namespace flowdiff {

template <class T, Backend B = Cpu>
class View {
 public:
  using value_type = std::remove_const_t<T>;
  using element_type = T;
  using backend = B;

  /// An empty view: shape [0] and no data (so `{}` passed for an optional output means "none";
  /// a rank-0 Shape would be a scalar with numel() == 1).
  View() : shape_{Shape{0}} {}
  View(T* data, Shape shape) : data_(data), shape_(shape) {
    require<shape_error>(data != nullptr || shape.numel() == 0,
                         "View: null data pointer for a non-empty shape ", shape);
  }

  /// A mutable view converts to a read-only one.
  template <class U>
    requires(std::is_const_v<T> && std::is_same_v<const U, T>)
  View(View<U, B> other) : data_(other.data()), shape_(other.shape()) {}

  FLOWDIFF_INLINE T* data() const { return data_; }
  FLOWDIFF_INLINE const Shape& shape() const { return shape_; }
  FLOWDIFF_INLINE index_t numel() const { return shape_.numel(); }
  FLOWDIFF_INLINE int rank() const { return shape_.rank(); }
  FLOWDIFF_INLINE index_t dim(int i) const { return shape_[i]; }
  FLOWDIFF_INLINE index_t rows() const { return shape_.rows(); }
  FLOWDIFF_INLINE index_t row_size() const { return shape_.row_size(); }
  bool empty() const { return numel() == 0; }

  /// Element i of the flattened tensor (host-accessible backends only).
  T& operator[](index_t i) const
    requires(B::host_accessible)
  {
    return data_[i];
  }

  /// Multi-index access, e.g. x(n, c, h, w) (host-accessible backends only; not bounds-checked).
  template <class... I>
  T& operator()(I... idx) const
    requires(B::host_accessible)
  {
    const index_t ix[] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int k = 0; k < static_cast<int>(sizeof...(I)); ++k) off = off * shape_[k] + ix[k];
    for (int k = static_cast<int>(sizeof...(I)); k < shape_.rank(); ++k) off *= shape_[k];
    return data_[off];
  }

  /// Sample i: the sub-tensor at index i of dimension 0.
  View row(index_t i) const {
    require<shape_error>(shape_.rank() >= 1 && i >= 0 && i < shape_[0], "View::row: index ", i,
                         " out of range for shape ", shape_);
    return View(data_ + i * shape_.row_size(), shape_.tail());
  }

  /// Samples [begin, end) of dimension 0.
  View rows(index_t begin, index_t end) const {
    require<shape_error>(shape_.rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
                         "View::rows: range [", begin, ", ", end, ") out of range for shape ",
                         shape_);
    return View(data_ + begin * shape_.row_size(), shape_.with_rows(end - begin));
  }

  /// The same memory with another shape of equal element count.
  View reshape(Shape s) const {
    require<shape_error>(s.numel() == numel(), "View::reshape: cannot view ", shape_, " as ", s);
    return View(data_, s);
  }

  /// [numel] view of the same memory.
  View flat() const { return View(data_, Shape{numel()}); }

  std::span<T> span() const
    requires(B::host_accessible)
  {
    return {data_, static_cast<std::size_t>(numel())};
  }

 private:
  T* data_ = nullptr;
  Shape shape_{};
};

template <class T, Backend B = Cpu>
using ConstView = View<const T, B>;

template <class T, Backend B = Cpu>
class Tensor {
  static_assert(!std::is_const_v<T>, "Tensor<T>: T must not be const");

 public:
  using value_type = T;
  using backend = B;

  /// An empty tensor: shape [0], no storage (not a rank-0 scalar, whose numel() would be 1).
  Tensor() : shape_(empty_shape()) {}

  /// Uninitialised storage for `shape` (use zeros()/full() for defined contents).
  explicit Tensor(Shape shape) : shape_(shape), data_(B::template allocate<T>(shape.numel())) {}

  static Tensor zeros(Shape shape) { return full(shape, T(0)); }

  static Tensor full(Shape shape, T value) {
    Tensor t(shape);
    T* p = t.data();
    B::parallel_for(t.numel(), FLOWDIFF_LAMBDA(index_t i) { p[i] = value; });
    return t;
  }

  /// A host tensor from a list of values, e.g. Tensor<float>::from({2, 2}, {1, 2, 3, 4}).
  static Tensor from(Shape shape, std::initializer_list<T> values)
    requires(B::host_accessible)
  {
    return from(shape, std::span<const T>(values.begin(), values.size()));
  }

  static Tensor from(Shape shape, std::span<const T> values)
    requires(B::host_accessible)
  {
    require<shape_error>(static_cast<index_t>(values.size()) == shape.numel(),
                         "Tensor::from: shape ", shape, " needs ", shape.numel(),
                         " values, got ", values.size());
    Tensor t(shape);
    B::copy(t.data(), values.data(), shape.numel());
    return t;
  }

  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor(Tensor&& o) noexcept : shape_(o.shape_), data_(std::exchange(o.data_, nullptr)) {
    o.shape_ = empty_shape();
  }
  Tensor& operator=(Tensor&& o) noexcept {
    if (this != &o) {
      B::deallocate(data_);
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, empty_shape());
    }
    return *this;
  }
  ~Tensor() { B::deallocate(data_); }

  /// An explicit deep copy.
  Tensor clone() const {
    Tensor t(shape_);
    B::copy(t.data(), data_, numel());
    return t;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  index_t numel() const { return shape_.numel(); }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  index_t rows() const { return shape_.rows(); }
  index_t row_size() const { return shape_.row_size(); }
  bool empty() const { return numel() == 0; }

  View<T, B> view() { return {data_, shape_}; }
  View<const T, B> view() const { return {data_, shape_}; }
  operator View<T, B>() { return view(); }
  operator View<const T, B>() const { return view(); }

  T& operator[](index_t i)
    requires(B::host_accessible)
  {
    return data_[i];
  }
  const T& operator[](index_t i) const
    requires(B::host_accessible)
  {
    return data_[i];
  }
  template <class... I>
  T& operator()(I... idx)
    requires(B::host_accessible)
  {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const
    requires(B::host_accessible)
  {
    return view()(idx...);
  }

  View<T, B> row(index_t i) { return view().row(i); }
  View<const T, B> row(index_t i) const { return view().row(i); }
  View<T, B> reshape(Shape s) { return view().reshape(s); }
  View<const T, B> reshape(Shape s) const { return view().reshape(s); }

  /// Reallocates only when the element count changes; contents are unspecified afterwards.
  void resize(Shape s) {
    if (s.numel() != numel()) {
      B::deallocate(data_);
      data_ = nullptr;
      data_ = B::template allocate<T>(s.numel());
    }
    shape_ = s;
  }

  /// Host copy of the contents as a std::vector.
  std::vector<T> to_vector() const
    requires(B::host_accessible)
  {
    return std::vector<T>(data_, data_ + numel());
  }

 private:
  static Shape empty_shape() noexcept {
    Shape s;
    s.push_back(0);  // cannot throw: rank 1 < max_rank, extent 0 >= 0
    return s;
  }

  Shape shape_;
  T* data_ = nullptr;
};

// ---- view_of: one spelling for "a view of whatever tensor-like thing I was given" ----

template <class T, class B>
View<T, B> view_of(Tensor<T, B>& t) {
  return t.view();
}
template <class T, class B>
View<const T, B> view_of(const Tensor<T, B>& t) {
  return t.view();
}
template <class T, class B>
View<T, B> view_of(View<T, B> v) {
  return v;
}

namespace detail {
template <class X>
struct is_tensor_like : std::false_type {};
template <class T, class B>
struct is_tensor_like<Tensor<T, B>> : std::true_type {};
template <class T, class B>
struct is_tensor_like<View<T, B>> : std::true_type {};
}  // namespace detail

/// Tensor<T, B> or View<T, B> (const or not).
template <class X>
concept TensorLike = detail::is_tensor_like<std::remove_cvref_t<X>>::value;

/// The element type and backend of a tensor-like argument.
template <TensorLike X>
using value_type_of = typename std::remove_cvref_t<X>::value_type;
template <TensorLike X>
using backend_of = typename std::remove_cvref_t<X>::backend;

}  // namespace flowdiff
