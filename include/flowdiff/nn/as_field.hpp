// flowdiff/nn/as_field.hpp — a trained network as a field for the samplers and guidance adapters:
// as_field(model, params) is both a Field, field(x, out, t): out = u_theta(x, t·1_N) (a conditional
// model sees the null label ∅ there), and a ConditionalField, field(x, out, t, y):
// out = u_theta(x, t·1_N, y), with num_classes() from the model. The scalar time of a sampler is
// broadcast into a [N] tensor held by the adapter (networks take per-sample times, as training
// does), and the model's forward cache lives in the adapter too, so after the first call at a
// given N nothing is allocated. fd::cfg(as_field(net, ps), w) then evaluates the network once on
// its 2N batch. The adapter runs on the model's backend: a model with a `backend` typedef
// (nn::BackendMLP<T, B>, nn::BackendUNet<T, B>) takes Parameters<T, B> and tensors on B, and the
// adapter's time buffer is on B too, so integrate(..., cfg(as_field(net, dev_params), w), x_on_B,
// grid) never leaves B; the CPU models (no typedef) run on Cpu. This header has no CUDA in it.
// The adapter holds references: the model and the parameters must outlive it.
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

namespace detail {
template <class M>
auto model_backend_impl() {
  if constexpr (requires { typename M::backend; }) {
    return std::type_identity<typename M::backend>{};
  } else {
    return std::type_identity<Cpu>{};
  }
}
}  // namespace detail

/// Where a model's parameters and activations live: M::backend when it says, else the CPU.
template <class M>
using model_backend_t = typename decltype(detail::model_backend_impl<M>())::type;

/// A network with per-sample times and optional labels, all on its backend B = model_backend_t:
/// forward(ps, x [N, ...], t [N], y [N] or empty, out [N, ...], cache) and num_classes().
template <class M>
concept FieldModel = requires(const M& m,
                              const Parameters<typename M::value_type, model_backend_t<M>>& ps,
                              View<const typename M::value_type, model_backend_t<M>> x,
                              View<typename M::value_type, model_backend_t<M>> out,
                              View<const label_t, model_backend_t<M>> y, typename M::Cache& cache) {
  m.forward(ps, x, x, y, out, cache);
  { m.num_classes() } -> std::convertible_to<index_t>;
};

template <FieldModel M>
class ModelField {
 public:
  using value_type = typename M::value_type;
  using backend = model_backend_t<M>;
  using T = value_type;
  using B = backend;

  ModelField(const M& model, const Parameters<T, B>& params) : model_(&model), ps_(&params) {}

  // x, out: [N, ...] on B
  void operator()(View<const T, B> x, View<T, B> out, T t) {
    eval(x, out, t, View<const label_t, B>(nullptr, Shape{0}));
  }

  // x, out: [N, ...], y: [N] with y[i] == num_classes() meaning ∅; all on B
  void operator()(View<const T, B> x, View<T, B> out, T t, View<const label_t, B> y) {
    require<shape_error>(y.data() != nullptr && y.rank() == 1 && !y.empty(),
                         "as_field: labels y must have shape [N] with N >= 1, got ", y.shape());
    eval(x, out, t, y);
  }

  index_t num_classes() const { return static_cast<index_t>(model_->num_classes()); }
  const M& model() const { return *model_; }
  const Parameters<T, B>& params() const { return *ps_; }
  /// The model's cache of the last evaluation (its activations, on B).
  typename M::Cache& cache() { return cache_; }

 private:
  void eval(View<const T, B> x, View<T, B> out, T t, View<const label_t, B> y) {
    require<shape_error>(x.rank() >= 1 && x.dim(0) >= 1,
                         "as_field: x must be a batch [N, ...] with N >= 1, got ", x.shape());
    const index_t n = x.dim(0);
    // Shape{n} keeps the element count, so resize() reuses the buffer while N repeats; the fill
    // runs on B (one element-wise launch on a device), so no host copy is made per call.
    t_.resize(Shape{n});
    fill(t_.view(), t);
    model_->forward(*ps_, x, View<const T, B>(t_.view()), y, out, cache_);
  }

  const M* model_;
  const Parameters<T, B>* ps_;
  typename M::Cache cache_;
  Tensor<T, B> t_;  // [N]: the sampler's time, broadcast
};

/// Wraps `model` with its parameters as a Field and ConditionalField on the model's backend
/// (holds references).
template <FieldModel M>
ModelField<M> as_field(const M& model,
                       const Parameters<typename M::value_type, model_backend_t<M>>& params) {
  return ModelField<M>(model, params);
}
/// A temporary model or parameter store would dangle: keep them alive in a variable.
template <FieldModel M>
void as_field(const M&& model,
              const Parameters<typename M::value_type, model_backend_t<M>>& params) = delete;
template <FieldModel M>
void as_field(const M& model,
              const Parameters<typename M::value_type, model_backend_t<M>>&& params) = delete;

}  // namespace flowdiff::nn
