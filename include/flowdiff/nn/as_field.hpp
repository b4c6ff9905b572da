// flowdiff/nn/as_field.hpp — a trained network as a field for the samplers and guidance adapters:
// as_field(model, params) is both a Field, field(x, out, t): out = u_theta(x, t·1_N) (a conditional
// model sees the null label ∅ there), and a ConditionalField, field(x, out, t, y):
// out = u_theta(x, t·1_N, y), with num_classes() from the model. The scalar time of a sampler is
// broadcast into a [N] tensor held by the adapter (networks take per-sample times, as training
// does), and the model's forward cache lives in the adapter too, so after the first call at a
// given N nothing is allocated. fd::cfg(as_field(net, ps), w) then evaluates the network once on
// its 2N batch. The adapter holds references: the model and the parameters must outlive it.
#pragma once

#include <concepts>
#include <type_traits>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// A network with per-sample times and optional labels:
/// forward(ps, x [N, ...], t [N], y [N] or empty, out [N, ...], cache) and num_classes().
template <class M>
concept FieldModel = requires(const M& m, const Parameters<typename M::value_type>& ps,
                              View<const typename M::value_type> x,
                              View<typename M::value_type> out, View<const label_t> y,
                              typename M::Cache& cache) {
  m.forward(ps, x, x, y, out, cache);
  { m.num_classes() } -> std::convertible_to<index_t>;
};

template <FieldModel M>
class ModelField {
 public:
  using value_type = typename M::value_type;
  using backend = Cpu;
  using T = value_type;

  ModelField(const M& model, const Parameters<T>& params) : model_(&model), ps_(&params) {}

  // x, out: [N, ...]
  void operator()(View<const T> x, View<T> out, T t) {
    eval(x, out, t, View<const label_t>(nullptr, Shape{0}));
  }

  // x, out: [N, ...], y: [N] with y[i] == num_classes() meaning ∅
  void operator()(View<const T> x, View<T> out, T t, View<const label_t> y) {
    require<shape_error>(y.data() != nullptr && y.rank() == 1 && !y.empty(),
                         "as_field: labels y must have shape [N] with N >= 1, got ", y.shape());
    eval(x, out, t, y);
  }

  index_t num_classes() const { return static_cast<index_t>(model_->num_classes()); }
  const M& model() const { return *model_; }
  const Parameters<T>& params() const { return *ps_; }
  /// The model's cache of the last evaluation (its activations).
  typename M::Cache& cache() { return cache_; }

 private:
  void eval(View<const T> x, View<T> out, T t, View<const label_t> y) {
    require<shape_error>(x.rank() >= 1 && x.dim(0) >= 1,
                         "as_field: x must be a batch [N, ...] with N >= 1, got ", x.shape());
    const index_t n = x.dim(0);
    // Shape{n} keeps the element count, so resize() reuses the buffer while N repeats.
    t_.resize(Shape{n});
    fill(t_.view(), t);
    model_->forward(*ps_, x, View<const T>(t_.view()), y, out, cache_);
  }

  const M* model_;
  const Parameters<T>* ps_;
  typename M::Cache cache_;
  Tensor<T> t_;  // [N]: the sampler's time, broadcast
};

/// Wraps `model` with its parameters as a Field and ConditionalField (holds references).
template <FieldModel M>
ModelField<M> as_field(const M& model, const Parameters<typename M::value_type>& params) {
  return ModelField<M>(model, params);
}
/// A temporary model or parameter store would dangle: keep them alive in a variable.
template <FieldModel M>
void as_field(const M&& model, const Parameters<typename M::value_type>& params) = delete;
template <FieldModel M>
void as_field(const M& model, const Parameters<typename M::value_type>&& params) = delete;

}  // namespace flowdiff::nn
