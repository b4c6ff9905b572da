// tests/support/compare.hpp — comparison and input helpers shared by the network tests: the
// normalised MSE of DESIGN.md §4 (sum (a - b)^2 / sum b^2, after requiring finite values and a
// non-zero reference), the largest absolute difference, and small label / time tensors.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <flowdiff/core/field.hpp>
#include <flowdiff/core/tensor.hpp>
#include <vector>

namespace flowdiff::test {

inline double nmse(View<const float> a, View<const float> b) {
  REQUIRE(a.shape() == b.shape());
  double num = 0, den = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    REQUIRE(std::isfinite(a[i]));
    REQUIRE(std::isfinite(b[i]));
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  REQUIRE(den > 0);
  return num / den;
}

inline double max_abs_diff(View<const float> a, View<const float> b) {
  REQUIRE(a.shape() == b.shape());
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    REQUIRE(std::isfinite(a[i]));
    m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  }
  return m;
}

inline Tensor<label_t> make_labels(const std::vector<label_t>& v) {
  Tensor<label_t> y(Shape{static_cast<index_t>(v.size())});
  for (std::size_t i = 0; i < v.size(); ++i) y[static_cast<index_t>(i)] = v[i];
  return y;
}

template <class T>
Tensor<T> make_times(const std::vector<double>& v) {
  Tensor<T> t(Shape{static_cast<index_t>(v.size())});
  for (std::size_t i = 0; i < v.size(); ++i) t[static_cast<index_t>(i)] = static_cast<T>(v[i]);
  return t;
}

}  // namespace flowdiff::test
