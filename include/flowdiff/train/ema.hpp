// flowdiff/train/ema.hpp — an exponential moving average of the parameters, held in its own flat
// buffer of the parameters' layout. After each optimizer step, update(ps) does (one pass)
//   shadow <- shadow - (1 - d)(shadow - p),   d = min(decay, (1 + n) / (10 + n)) with warmup,
// where n counts updates including this one (the torch_ema / TF ExponentialMovingAverage
// num_updates convention), so early averages forget the random initialisation quickly
// (d = 2/11 at the first update) and d approaches `decay` after a few hundred updates. Without
// warmup d = decay throughout. For evaluation, copy_to(ps) overwrites the parameters with the
// average, or swap(ps) exchanges them (swap again to restore the training weights). Buffers
// (Parameters::add_buffer, e.g. BatchNorm running statistics) are not averaged: update() copies
// them, so the shadow always holds the model's current buffers (as ema-pytorch and timm's
// ModelEmaV3 with buffers excluded from averaging do; the running statistics already are averages).
// save_state / load_state write and read the average per parameter name on any backend (a device
// shadow is downloaded / uploaded).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::train {

struct EmaOptions {
  double decay = 0.999;
  bool warmup = true;
};

namespace detail {

template <class T>
struct EmaKernel {
  T* shadow;
  const T* p;
  T one_minus_d;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const { shadow[i] = shadow[i] - one_minus_d * (shadow[i] - p[i]); }
};

template <class T>
struct SwapKernel {
  T* a;
  T* b;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    const T t = a[i];
    a[i] = b[i];
    b[i] = t;
  }
};

}  // namespace detail

template <class T = float, Backend B = Cpu>
class Ema {
 public:
  /// Starts the average at the current parameters of `ps` (allocated).
  explicit Ema(const nn::Parameters<T, B>& ps, EmaOptions o = {}) : o_(o) {
    require<config_error>(o.decay >= 0 && o.decay <= 1, "Ema: decay must lie in [0, 1], got ", o.decay);
    shadow_ = Tensor<T, B>(Shape{ps.flat_size()});
    copy(shadow_.view(), ps.flat_params());
  }

  /// The decay the next update will use.
  double next_decay() const {
    const double n = static_cast<double>(updates_ + 1);
    return o_.warmup ? std::min(o_.decay, (1 + n) / (10 + n)) : o_.decay;
  }

  void update(const nn::Parameters<T, B>& ps) {
    check(ps);
    const double d = next_decay();
    const index_t nt = ps.trainable_size();
    B::parallel_for(nt, detail::EmaKernel<T>{shadow_.data(), ps.flat_params().data(),
                                             static_cast<T>(1 - d)});
    copy(shadow_.view().rows(nt, ps.flat_size()), ps.flat_params().rows(nt, ps.flat_size()));
    ++updates_;
  }

  /// Overwrites the parameters of `ps` with the average.
  void copy_to(nn::Parameters<T, B>& ps) const {
    check(ps);
    copy(ps.flat_params(), shadow_.view());
  }
  /// Exchanges the parameters and the average (call twice to restore).
  void swap(nn::Parameters<T, B>& ps) {
    check(ps);
    B::parallel_for(ps.flat_size(), detail::SwapKernel<T>{shadow_.data(), ps.flat_params().data()});
  }

  /// The average as a flat [flat_size] buffer in the parameters' layout.
  View<const T, B> flat() const { return shadow_.view(); }
  std::int64_t updates() const { return updates_; }
  const EmaOptions& options() const { return o_; }

  /// Adds "<prefix><name>" per parameter and "<prefix>updates" to `w`.
  void save_state(io::SafetensorsWriter& w, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "ema.") const {
    check(ps);
    for (const auto& e : ps.entries())
      nn::add_tensor<T, B>(w, prefix + e.name,
                           shadow_.view().rows(e.offset, e.offset + e.numel()).reshape(e.shape));
    const Tensor<std::int64_t> n = Tensor<std::int64_t>::from(Shape{1}, {updates_});
    w.add(prefix + "updates", n.view());
  }
  void load_state(const io::SafetensorsFile& f, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "ema.") {
    check(ps);
    Tensor<T, B> fresh = Tensor<T, B>::zeros(Shape{ps.flat_size()});
    for (const auto& e : ps.entries())
      nn::load_into(f, prefix + e.name, fresh.view().rows(e.offset, e.offset + e.numel()).reshape(e.shape));
    const auto n = nn::load_checked<std::int64_t>(f, prefix + "updates", Shape{1});
    require<io_error>(n[0] >= 0, f.source(), ": tensor '", prefix, "updates' is negative");
    shadow_ = std::move(fresh);
    updates_ = n[0];
  }

 private:
  void check(const nn::Parameters<T, B>& ps) const {
    require<config_error>(ps.flat_size() == shadow_.numel(), "Ema: built for ", shadow_.numel(),
                          " flat parameters, got a parameter set of ", ps.flat_size());
  }

  EmaOptions o_;
  Tensor<T, B> shadow_;
  std::int64_t updates_ = 0;
};

}  // namespace flowdiff::train
