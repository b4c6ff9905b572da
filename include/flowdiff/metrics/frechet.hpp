// flowdiff/metrics/frechet.hpp — the Fréchet distance between Gaussians fitted to two feature
// sets a: [N, D] and b: [M, D] (the squared 2-Wasserstein distance between N(mu_a, S_a) and
// N(mu_b, S_b); FID when the features come from Inception, here from any classifier):
//   d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})
// Means and unbiased covariances (divisor N - 1) are computed in double. The trace term is
// evaluated in the symmetric form above: R = S_a^{1/2} = V diag(sqrt(max(l, 0))) V^T from the
// eigen-decomposition of S_a, then the eigenvalues m_j of the symmetric positive semi-definite
// M = R S_b R, and tr(M^{1/2}) = sum_j sqrt(max(m_j, 0)). M has the eigenvalues of S_a S_b (they
// are similar when S_a is invertible), so this equals the tr((S_a S_b)^{1/2}) of the usual
// formula, but every step is a symmetric eigen-problem (Eigen's SelfAdjointEigenSolver): real
// eigenvalues, orthogonal vectors, no complex square roots or failed iterations as with sqrtm of
// the non-symmetric S_a S_b. Rounding can make eigenvalues of a singular covariance (D >= N, or
// constant features) slightly negative; they are clamped to 0, which they are mathematically.
// Statistics can be computed once (feature_statistics) and cached for a reference set.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::metrics {

/// Mean and unbiased covariance of a feature set, in double.
struct FeatureStatistics {
  Tensor<double> mean;        // [D]
  Tensor<double> covariance;  // [D, D], divisor count - 1
  index_t count = 0;          // number of samples the statistics came from
  index_t dim() const { return mean.numel(); }
};

namespace frechet_detail {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
using Vector = Eigen::Matrix<double, Eigen::Dynamic, 1>;

inline Eigen::Map<const Matrix> as_matrix(View<const double> s) {
  return Eigen::Map<const Matrix>(s.data(), s.dim(0), s.dim(1));
}

/// V diag(sqrt(max(l, 0))) V^T for a symmetric matrix.
inline Matrix sqrt_psd(const Matrix& s) {
  Eigen::SelfAdjointEigenSolver<Matrix> es(s);
  require<numeric_error>(es.info() == Eigen::Success,
                         "frechet_distance: the eigen-decomposition of a covariance failed");
  const Vector r = es.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  return es.eigenvectors() * r.asDiagonal() * es.eigenvectors().transpose();
}

inline void check_stats(std::string_view who, std::string_view which, View<const double> mu,
                        View<const double> cov) {
  if (mu.rank() != 1 || mu.dim(0) < 1)
    fail<shape_error>(who, ": mu_", which, ": expected shape [D] with D >= 1, got ", mu.shape());
  const index_t d = mu.dim(0);
  if (!(cov.shape() == Shape{d, d}))
    fail<shape_error>(who, ": S_", which, ": expected shape ", Shape{d, d}, " (D = ", d,
                      " from mu_", which, "), got ", cov.shape());
  for (index_t i = 0; i < d; ++i)
    if (!std::isfinite(mu[i]))
      fail<numeric_error>(who, ": mu_", which, "[", i, "] is not finite (", mu[i], ")");
  for (index_t i = 0; i < d * d; ++i)
    if (!std::isfinite(cov[i]))
      fail<numeric_error>(who, ": S_", which, "[", i / d, ", ", i % d, "] is not finite (", cov[i],
                          ")");
}

template <class T>
FeatureStatistics feature_statistics_of(View<const T> x) {
  if (x.rank() != 2 || x.dim(0) < 2 || x.dim(1) < 1)
    fail<shape_error>("feature_statistics: x: expected shape [N, D] with N >= 2 and D >= 1, got ",
                      x.shape());
  const index_t n = x.dim(0), d = x.dim(1);
  const T* px = x.data();
  for (index_t i = 0; i < n * d; ++i)
    if (!std::isfinite(static_cast<double>(px[i])))
      fail<numeric_error>("feature_statistics: x[", i / d, ", ", i % d, "] is not finite (", px[i],
                          ")");
  FeatureStatistics st;
  st.count = n;
  st.mean = Tensor<double>::zeros(Shape{d});
  st.covariance = Tensor<double>(Shape{d, d});
  double* mu = st.mean.data();
  for (index_t r = 0; r < n; ++r)
    for (index_t j = 0; j < d; ++j) mu[j] += static_cast<double>(px[r * d + j]);
  for (index_t j = 0; j < d; ++j) mu[j] /= static_cast<double>(n);
  // Centred copy in double, then one symmetric rank-N product.
  frechet_detail::Matrix c(n, d);
  for (index_t r = 0; r < n; ++r)
    for (index_t j = 0; j < d; ++j) c(r, j) = static_cast<double>(px[r * d + j]) - mu[j];
  frechet_detail::Matrix s = frechet_detail::Matrix::Zero(d, d);
  s.selfadjointView<Eigen::Lower>().rankUpdate(c.transpose(), 1.0 / static_cast<double>(n - 1));
  s = s.selfadjointView<Eigen::Lower>();  // fill the upper triangle
  Eigen::Map<frechet_detail::Matrix>(st.covariance.data(), d, d) = s;
  return st;
}

inline double frechet_of(View<const double> mu_a, View<const double> cov_a, View<const double> mu_b,
                         View<const double> cov_b) {
  check_stats("frechet_distance", "a", mu_a, cov_a);
  check_stats("frechet_distance", "b", mu_b, cov_b);
  require<shape_error>(mu_a.dim(0) == mu_b.dim(0), "frechet_distance: the two sets have ",
                       mu_a.dim(0), " and ", mu_b.dim(0), " features; they must agree");
  const index_t d = mu_a.dim(0);
  const Matrix sa = 0.5 * (as_matrix(cov_a) + as_matrix(cov_a).transpose());
  const Matrix sb = 0.5 * (as_matrix(cov_b) + as_matrix(cov_b).transpose());
  double mean_term = 0;
  for (index_t i = 0; i < d; ++i) {
    const double diff = mu_a[i] - mu_b[i];
    mean_term += diff * diff;
  }
  const Matrix r = sqrt_psd(sa);
  Matrix m = r * sb * r;
  m = 0.5 * (m + m.transpose());
  Eigen::SelfAdjointEigenSolver<Matrix> es(m, Eigen::EigenvaluesOnly);
  require<numeric_error>(es.info() == Eigen::Success,
                         "frechet_distance: the eigen-decomposition of S_a^1/2 S_b S_a^1/2 failed");
  const double tr_sqrt = es.eigenvalues().cwiseMax(0.0).cwiseSqrt().sum();
  const double value = mean_term + sa.trace() + sb.trace() - 2.0 * tr_sqrt;
  require<numeric_error>(std::isfinite(value), "frechet_distance: the result is not finite (",
                         value, ")");
  // Rounding can leave a tiny negative value for (nearly) identical statistics; the distance
  // is non-negative.
  return std::max(value, 0.0);
}

}  // namespace frechet_detail

/// Mean and unbiased covariance (divisor N - 1) of x: [N, D] (N >= 2; a Tensor or View of float
/// or double), accumulated in double after centring. numeric_error for a non-finite value,
/// shape_error for N < 2.
template <class X>
requires TensorLike<X> FeatureStatistics feature_statistics(const X& x) {
  using T = value_type_of<X>;
  return frechet_detail::feature_statistics_of<T>(View<const T>(view_of(x)));
}

/// The Fréchet distance between N(mu_a, S_a) and N(mu_b, S_b).
/// mu_a, mu_b: [D]; S_a, S_b: [D, D], symmetric positive semi-definite (symmetrised here).
inline double frechet_distance(View<const double> mu_a, View<const double> cov_a,
                               View<const double> mu_b, View<const double> cov_b) {
  return frechet_detail::frechet_of(mu_a, cov_a, mu_b, cov_b);
}

inline double frechet_distance(const FeatureStatistics& a, const FeatureStatistics& b) {
  return frechet_distance(a.mean.view(), a.covariance.view(), b.mean.view(), b.covariance.view());
}

/// The Fréchet distance between Gaussians fitted to a: [N, D] and b: [M, D] (N, M >= 2; Tensors
/// or Views of the same float or double type).
template <class A, class B>
requires(TensorLike<A>&& TensorLike<B>&& std::is_same_v<
         value_type_of<A>, value_type_of<B>>) double frechet_distance(const A& a, const B& b) {
  const auto va = view_of(a);
  const auto vb = view_of(b);
  require<shape_error>(va.rank() == 2 && vb.rank() == 2 && va.dim(1) == vb.dim(1),
                       "frechet_distance: a and b must be [N, D] and [M, D] with the same D, got ",
                       va.shape(), " and ", vb.shape());
  return frechet_distance(feature_statistics(a), feature_statistics(b));
}

}  // namespace flowdiff::metrics
