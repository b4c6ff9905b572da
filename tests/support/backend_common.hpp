// tests/support/backend_common.hpp — the helpers shared by the backend checks (tests/support/
// backend_*_checks.hpp): the Log of (ok, message) entries that a caller turns into its own
// assertions, str / guard, the comparisons with DESIGN.md §4's rules (compare, compare_exact,
// compare_same), host / device copies and transfers, type_name, and the file helpers of the
// checkpoint checks (file_bytes, csv_without_seconds). No Catch2 and no CUDA here: the headers
// that include it are compiled by g++ (tests/test_nn_backend*.cpp) and by nvcc (tests/cuda/
// test_cuda_*.cu) alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/tensor.hpp>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace flowdiff::test::backend_common {

// ---------------------------------------------------------------------------------------------
// The log, comparisons and transfers.
// ---------------------------------------------------------------------------------------------

struct Check {
  bool ok;
  std::string what;
};

struct Log {
  std::vector<Check> checks;
  void expect(bool ok, std::string what) { checks.push_back({ok, std::move(what)}); }
  int failures() const {
    return static_cast<int>(
        std::count_if(checks.begin(), checks.end(), [](const Check& c) { return !c.ok; }));
  }
};

template <class... A>
std::string str(const A&... a) {
  std::ostringstream os;
  os.precision(4);
  (os << ... << a);
  return os.str();
}

/// Runs body; an exception it throws is a failed check naming `what`.
template <class F>
void guard(Log& log, const std::string& what, F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    log.expect(false, what + ": unexpected exception: " + e.what());
  }
}

/// How a backend's result must agree with the CPU layer's (DESIGN.md §4).
struct Tolerance {
  bool elementwise = false;  // |a - b| <= atol + rtol |ref|, else normalised MSE <= nmse
  double atol = 0, rtol = 0, nmse = 0;
};

/// Values finite and the reference not all zero; then the tolerance rule.
template <class T>
void compare(Log& log, const std::string& what, const std::vector<T>& got,
             const std::vector<T>& ref, const Tolerance& tol) {
  if (got.size() != ref.size() || ref.empty()) {
    log.expect(false, str(what, ": sizes ", got.size(), " vs ", ref.size()));
    return;
  }
  double num = 0, den = 0, worst = 0, ref_max = 0;
  std::size_t at = 0, equal = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double a = static_cast<double>(got[i]), b = static_cast<double>(ref[i]);
    if (!std::isfinite(a) || !std::isfinite(b)) {
      log.expect(false, str(what, ": non-finite value at ", i, " (got ", a, ", ref ", b, ")"));
      return;
    }
    ref_max = std::max(ref_max, std::abs(b));
    num += (a - b) * (a - b);
    den += b * b;
    equal += got[i] == ref[i];
    const double r = std::abs(a - b) / (tol.atol + tol.rtol * std::abs(b));
    if (tol.elementwise && r > worst) {
      worst = r;
      at = i;
    }
  }
  if (ref_max == 0) {
    log.expect(false, what + ": the reference is all zero");
    return;
  }
  if (tol.elementwise)
    log.expect(worst <= 1,
               str(what, ": |got - ref| <= ", tol.atol, " + ", tol.rtol, " |ref|: worst ratio ",
                   worst, " at ", at, " (", equal, " of ", ref.size(), " bit-equal)"));
  else
    log.expect(num / den <= tol.nmse, str(what, ": normalised MSE ", num / den, " <= ", tol.nmse,
                                          " (", equal, " of ", ref.size(), " bit-equal)"));
}

/// Values finite, the reference not all zero, and every element bit-equal.
template <class T>
void compare_exact(Log& log, const std::string& what, const std::vector<T>& got,
                   const std::vector<T>& ref) {
  bool finite = got.size() == ref.size() && !ref.empty(), nonzero = false;
  for (std::size_t i = 0; finite && i < ref.size(); ++i) {
    finite =
        std::isfinite(static_cast<double>(got[i])) && std::isfinite(static_cast<double>(ref[i]));
    nonzero = nonzero || ref[i] != T(0);
  }
  std::size_t differ = 0;
  if (finite)
    for (std::size_t i = 0; i < ref.size(); ++i)
      differ += std::memcmp(&got[i], &ref[i], sizeof(T)) != 0;
  log.expect(finite && nonzero && differ == 0,
             str(what, ": bit-equal (finite ", finite, ", non-zero ", nonzero, ", ", differ,
                 " elements differ)"));
}

template <class T, Backend B>
std::vector<T> host_copy(View<const T, B> v) {
  Tensor<T> h(v.shape());
  BackendOps<B>::template download<T>(h.view(), v);
  return h.to_vector();
}

template <class T, Backend B>
Tensor<T, B> device_copy(View<const T> v) {
  Tensor<T, B> d(v.shape());
  BackendOps<B>::template upload<T>(d.view(), v);
  return d;
}

template <class T, Backend B>
void upload(View<T, B> dst, View<const T> src) {
  BackendOps<B>::template upload<T>(dst, src);
}

template <class T, Backend B>
void download(View<T> dst, View<const T, B> src) {
  BackendOps<B>::template download<T>(dst, src);
}

/// A view with no elements: "leave this output out".
template <class T, Backend B = Cpu>
View<T, B> none() {
  return View<T, B>(nullptr, Shape{0});
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : "double";
}

/// Arithmetic that is the CPU's, operation for operation (or draws that go through a device's
/// log / sin / cos, a few ulp): bit-equal with B = Cpu; on a device DESIGN.md §4's element-wise
/// rule.
template <class T, Backend B>
void compare_same(Log& log, const std::string& what, const std::vector<T>& got,
                  const std::vector<T>& ref) {
  if constexpr (std::is_same_v<B, Cpu>)
    compare_exact(log, what, got, ref);
  else if constexpr (std::is_same_v<T, double>)
    compare(log, what, got, ref, {true, 1e-12, 1e-12, 0});
  else
    compare(log, what, got, ref, {true, 1e-6, 1e-5, 0});
}

/// A trained or sampled model on B against the CPU's: per-step rounding compounded through AdamW
/// (the U-Net's, the DiT's and the VAE's training and sampling checks).
template <class T>
Tolerance run_tolerance() {
  if constexpr (std::is_same_v<T, double>)
    return {true, 1e-11, 1e-9, 0};
  else
    return {true, 1e-5, 1e-4, 0};
}

// ---------------------------------------------------------------------------------------------
// Files of the checkpoint checks.
// ---------------------------------------------------------------------------------------------

inline std::string file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// The CSV without its last column (the seconds differ between runs).
inline std::string csv_without_seconds(const std::filesystem::path& p) {
  std::stringstream in(file_bytes(p)), out;
  std::string line;
  while (std::getline(in, line)) out << line.substr(0, line.rfind(',')) << '\n';
  return out.str();
}

}  // namespace flowdiff::test::backend_common
