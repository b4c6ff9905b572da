// tests/support/mixtures.hpp — the small Gaussian mixtures several tests use as exact references.
#pragma once

#include <flowdiff/analytic/gaussian_mixture.hpp>
#include <flowdiff/core/tensor.hpp>

namespace flowdiff::test {

/// 2D, four anisotropic components, three classes (class 1 owns two components).
template <class T>
analytic::GaussianMixture<T> make_mixture() {
  auto means = Tensor<T>::from({4, 2}, {-2, 0, 1.5, 1, 2, -1.5, 0, 2.5});
  auto sds = Tensor<T>::from({4, 2}, {0.5, 0.3, 0.4, 0.6, 0.7, 0.5, 0.3, 0.35});
  return analytic::GaussianMixture<T>({0.3, 0.2, 0.35, 0.15}, means, sds, {0, 1, 2, 1});
}

}  // namespace flowdiff::test
