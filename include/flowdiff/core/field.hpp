// flowdiff/core/field.hpp — what a "field" is. A field maps a batch x: [N, ...] at a time t to a
// batch of the same shape, written into a caller-owned output: `field(x, out, t)`. Vector fields,
// scores, noise and data predictions are all fields; which one a field returns is its contract
// (DESIGN.md §1). A conditional field also takes per-sample class labels y: [N] (std::int32_t),
// where the label `num_classes()` is the null label ∅ (unconditional). Guidance is an adapter
// from conditional fields to fields, so samplers only ever see plain fields. One optional
// extension lets a guidance adapter hand its two halves to the sampler (FusableGuidance), so that
// the combination and the step run as one pass (samplers/fused.hpp).
#pragma once

#include <concepts>
#include <cstdint>
#include <optional>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

using label_t = std::int32_t;

/// field(x, out, t): out = f_t(x) for a batch.
template <class F, class T, class B = Cpu>
concept Field = requires(F& f, View<const T, B> x, View<T, B> out, T t) { f(x, out, t); };

/// field(x, out, t, y): out = f_t(x | y) with per-sample labels, y[i] == num_classes() meaning ∅.
template <class F, class T, class B = Cpu>
concept ConditionalField =
    requires(F& f, View<const T, B> x, View<T, B> out, T t, View<const label_t, B> y) {
      f(x, out, t, y);
      { f.num_classes() } -> std::convertible_to<index_t>;
    };

/// The two halves of a guided field's evaluation, u(x|y) and u(x|∅) ([N, ...] each, valid until
/// the field is evaluated again), and the weight w of u~ = (1 - w) u(x|∅) + w u(x|y).
template <class T, class B = Cpu>
struct GuidedHalves {
  View<const T, B> cond, uncond;
  double w = 1;
};

/// A field (a Cfg) that can evaluate both halves for the sampler instead of combining them itself:
/// f.evaluate_halves(x, t) returns them, or nothing when its output is not that plain blend (then
/// the sampler calls f(x, out, t)). Euler and EulerMaruyama use it to fuse the combination into
/// their update (samplers/fused.hpp).
template <class F, class T, class B = Cpu>
concept FusableGuidance = Field<F, T, B> && requires(F& f, View<const T, B> x, T t) {
  { f.evaluate_halves(x, t) } -> std::same_as<std::optional<GuidedHalves<T, B>>>;
};

}  // namespace flowdiff
