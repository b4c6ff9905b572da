// flowdiff/core/error.hpp — the one exception hierarchy of the library. Every check at a public
// boundary throws a subclass of flowdiff::error whose message names the argument, what was
// expected and what was found, e.g. "gaussian_path::sample: t[3] must lie in [0, 1], got 1.5".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace flowdiff {

/// Base of every exception flowdiff throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor has the wrong rank, extent, or does not match another tensor.
class shape_error : public error {
 public:
  using error::error;
};

/// An argument or configuration value is out of range or inconsistent (bad t, bad flag, w < 0 ...).
class config_error : public error {
 public:
  using error::error;
};

/// A file is missing, truncated, corrupt, or cannot be written.
class io_error : public error {
 public:
  using error::error;
};

/// A computation produced or received a non-finite value, or is undefined at the requested point.
class numeric_error : public error {
 public:
  using error::error;
};

/// A CUDA runtime, cuBLAS or kernel-launch failure.
class cuda_error : public error {
 public:
  using error::error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << std::forward<Args>(args));
  return os.str();
}

}  // namespace detail

/// Throws E with a message built by streaming every argument, e.g.
/// `fail<config_error>("euler: steps must be >= 1, got ", steps)`.
template <class E = error, class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw E(detail::concat(std::forward<Args>(args)...));
}

/// Throws E unless `cond` holds; the message is only built on failure.
template <class E = error, class... Args>
void require(bool cond, Args&&... args) {
  if (!cond) fail<E>(std::forward<Args>(args)...);
}

}  // namespace flowdiff
