// flowdiff/nn/parameters.hpp — the flat parameter store every network uses (tiny-cuda-nn style):
// layers register named parameter tensors at construction, then one allocation holds all
// parameters contiguously, with gradients in a second flat buffer of the same layout. Optimizers,
// gradient clipping, EMA and checkpoints each make a single pass over the flat buffers; a layer
// reaches its own tensors through the id it got at registration. Names follow PyTorch's
// state_dict conventions ("enc.0.conv1.weight"), and layouts PyTorch's (Linear weight [out, in],
// Conv2d weight [out, in, kh, kw]), so checkpoints interoperate with safetensors files from
// PyTorch. Buffers (add_buffer: BatchNorm's running statistics, PyTorch's register_buffer) are
// state that is saved and loaded with the parameters but never trained: allocate() places them
// after every trainable tensor, so the trainable ones fill [0, trainable_size()) of the flat
// buffers and optimizers and gradient clipping act on that range only (weight decay never shrinks a
// buffer).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

/// One registered parameter tensor: its state_dict name, shape and offset in the flat buffers.
struct ParameterInfo {
  std::string name;
  Shape shape;
  index_t offset = 0;   ///< final once the store is allocated (buffers go after trainables)
  bool buffer = false;  ///< true for add_buffer() tensors: saved and loaded, never trained
  index_t numel() const { return shape.numel(); }
};

/// Named parameters and their gradients in two flat buffers. Register with add() (before
/// allocate()), then read and write through param(id) / grad(id) or the flat views.
template <class T, Backend B = Cpu>
class Parameters {
 public:
  /// Offsets are aligned to this many elements (64 bytes for float), so every parameter tensor
  /// starts on a cache line / vector boundary.
  static constexpr index_t alignment = 16;

  /// Registers a trainable tensor called `name` of `shape`; returns its id. Names must be unique.
  index_t add(std::string name, Shape shape) {
    return add_entry("add", std::move(name), shape, false);
  }

  /// Registers a buffer: a tensor saved and loaded like a parameter (it has a gradient slot, which
  /// stays zero) that optimizers, gradient clipping and EMA averaging leave alone.
  index_t add_buffer(std::string name, Shape shape) {
    return add_entry("add_buffer", std::move(name), shape, true);
  }

  /// Allocates both flat buffers (trainable tensors first, in registration order, then the
  /// buffers); parameters and gradients start at zero.
  void allocate() {
    require<config_error>(!allocated(), "Parameters::allocate: already allocated");
    index_t offset = 0;
    for (int pass = 0; pass < 2; ++pass)
      for (auto& e : entries_)
        if (e.buffer == (pass == 1)) {
          if (pass == 1 && trainable_size_ < 0) trainable_size_ = offset;
          e.offset = offset;
          offset += padded(e.numel());
        }
    if (trainable_size_ < 0) trainable_size_ = offset;
    values_ = Tensor<T, B>::zeros(Shape{size_});
    grads_ = Tensor<T, B>::zeros(Shape{size_});
  }

  bool allocated() const { return values_.numel() == size_ && size_ > 0; }
  /// Number of parameter tensors.
  index_t count() const { return static_cast<index_t>(entries_.size()); }
  /// Length of the flat buffers (sum of sizes plus alignment padding).
  index_t flat_size() const { return size_; }
  /// Length of the trainable prefix [0, trainable_size()) of the flat buffers (after allocate());
  /// the buffers occupy [trainable_size(), flat_size()).
  index_t trainable_size() const {
    require<config_error>(allocated(), "Parameters: call allocate() before using the parameters");
    return trainable_size_;
  }
  bool is_buffer(index_t id) const { return info(id).buffer; }
  /// Number of scalar parameters (without padding).
  index_t numel() const {
    index_t n = 0;
    for (const auto& e : entries_) n += e.numel();
    return n;
  }

  const std::vector<ParameterInfo>& entries() const { return entries_; }
  const ParameterInfo& info(index_t id) const { return entries_.at(static_cast<std::size_t>(id)); }

  /// Id of the parameter called `name`; throws config_error naming it if there is none.
  index_t find(std::string_view name) const {
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i].name == name) return static_cast<index_t>(i);
    fail<config_error>("Parameters: no parameter named '", name, "'");
  }

  View<T, B> param(index_t id) { return slice(values_, id); }
  View<const T, B> param(index_t id) const { return slice(values_, id); }
  View<T, B> grad(index_t id) { return slice(grads_, id); }
  View<const T, B> grad(index_t id) const { return slice(grads_, id); }

  /// All parameters / gradients as one [flat_size] view (padding entries stay zero).
  View<T, B> flat_params() { return checked(values_).view(); }
  View<const T, B> flat_params() const { return checked(values_).view(); }
  View<T, B> flat_grads() { return checked(grads_).view(); }
  View<const T, B> flat_grads() const { return checked(grads_).view(); }

  void zero_grad() { fill(checked(grads_).view(), T(0)); }

 private:
  static index_t padded(index_t n) { return (n + alignment - 1) / alignment * alignment; }

  index_t add_entry(const char* who, std::string name, const Shape& shape, bool buffer) {
    require<config_error>(!allocated(), "Parameters::", who, "('", name,
                          "'): parameters are already allocated; register every tensor first");
    require<config_error>(!name.empty(), "Parameters::", who, ": empty parameter name");
    require<config_error>(shape.numel() > 0, "Parameters::", who, "('", name, "'): empty shape ",
                          shape);
    for (const auto& e : entries_)
      require<config_error>(e.name != name, "Parameters::", who, ": duplicate parameter name '",
                            name, "'");
    entries_.push_back({std::move(name), shape, size_, buffer});
    size_ += padded(shape.numel());
    return static_cast<index_t>(entries_.size()) - 1;
  }

  template <class Tn>
  Tn& checked(Tn& t) const {
    require<config_error>(allocated(), "Parameters: call allocate() before using the parameters");
    return t;
  }
  template <class Tn>
  auto slice(Tn& t, index_t id) const {
    require<config_error>(id >= 0 && id < count(), "Parameters: id ", id, " out of range [0, ",
                          count(), ")");
    const auto& e = entries_[static_cast<std::size_t>(id)];
    // The entry lies inside the allocated buffer by construction (offsets and sizes are fixed at
    // registration), so the view is built directly: layers call this per pass, per parameter.
    using V = decltype(view_of(t));
    return V(checked(t).data() + e.offset, e.shape);
  }

  std::vector<ParameterInfo> entries_;
  index_t size_ = 0;
  index_t trainable_size_ = -1;
  Tensor<T, B> values_, grads_;
};

}  // namespace flowdiff::nn
