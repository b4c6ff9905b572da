// flowdiff/core/field.hpp — what a "field" is. A field maps a batch x: [N, ...] at a time t to a
// batch of the same shape, written into a caller-owned output: `field(x, out, t)`. Vector fields,
// scores, noise and data predictions are all fields; which one a field returns is its contract
// (DESIGN.md §1). A conditional field also takes per-sample class labels y: [N] (std::int32_t),
// where the label `num_classes()` is the null label ∅ (unconditional). Guidance is an adapter
// from conditional fields to fields, so samplers only ever see plain fields.
#pragma once

#include <concepts>
#include <cstdint>

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

}  // namespace flowdiff
