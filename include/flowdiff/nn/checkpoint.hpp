// flowdiff/nn/checkpoint.hpp — saving and loading nn::Parameters (and any named tensors) as
// safetensors files. Every parameter is stored under its state_dict name ("enc.0.weight") with its
// PyTorch layout, as F32 for float and F64 for double, so a file written here loads in PyTorch
// (`safetensors.torch.load_file` + `load_state_dict`) and vice versa. Writes are atomic (temporary
// file, fsync, rename). Loads validate everything before touching a parameter: each name must
// exist (io_error), shapes must match exactly (shape_error naming the tensor and both shapes),
// values must convert exactly (F64 -> float rounds; F16/BF16/integers convert), and strict mode
// rejects tensors in the file that match no parameter (listing them). A failed load leaves the
// parameters unchanged. Parameters and tensors on a device backend (host_accessible false) are
// downloaded for writing and uploaded after validation on loading (BackendOps<B>, so the file is
// the same whichever backend wrote it); this header stays CUDA-free.
#pragma once

#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

using Metadata = std::map<std::string, std::string>;

struct LoadOptions {
  /// Reject tensors in the file that match no parameter (PyTorch's load_state_dict(strict=True)
  /// also rejects missing ones; here a missing parameter is an error in both modes unless
  /// allow_missing is set).
  bool strict = true;
  /// Leave parameters that the file lacks unchanged instead of failing (PyTorch's strict=False).
  bool allow_missing = false;
  /// Prepended to every parameter name when looking it up in the file ("model." for a file that
  /// also holds optimizer state).
  std::string prefix = {};
};

/// What a load did: parameters the file lacked (only with allow_missing) and file tensors that
/// matched no parameter (only without strict).
struct LoadReport {
  std::vector<std::string> missing;
  std::vector<std::string> unexpected;
};

namespace detail {

inline std::string join_names(const std::vector<std::string>& names, std::size_t max_listed = 10) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < max_listed; ++i) s += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > max_listed) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s;
}

}  // namespace detail

/// Tensor `name` of `file` converted to T, checked against `expected` (shape_error naming the
/// tensor and both shapes).
template <class T>
Tensor<T> load_checked(const io::SafetensorsFile& file, std::string_view name, const Shape& expected) {
  const Shape got = file.shape(name);  // io_error naming the file if the tensor is absent
  require<shape_error>(got == expected, file.source(), ": tensor '", name, "' has shape ", got,
                       " in the file but ", expected, " is expected");
  return file.template tensor<T>(name);
}

namespace detail {
// Host tensor t -> dst on B (same element count): memcpy on the host, an upload on a device.
template <class T, Backend B>
void store(View<T, B> dst, const Tensor<T>& t) {
  if (t.numel() == 0) return;
  if constexpr (B::host_accessible)
    std::memcpy(dst.data(), t.data(), static_cast<std::size_t>(t.numel()) * sizeof(T));
  else
    BackendOps<B>::template upload<T>(dst, t.view());
}
}  // namespace detail

/// Copies tensor `name` of `file` into `dst` (same shape required, any backend), converting to T.
template <class T, Backend B>
void load_into(const io::SafetensorsFile& file, std::string_view name, View<T, B> dst) {
  const Tensor<T> t = load_checked<T>(file, name, dst.shape());
  detail::store(dst, t);
}

/// Adds a copy of `v` (on any backend: a device view is downloaded first) to `w` as `name`.
template <class T, Backend B>
void add_tensor(io::SafetensorsWriter& w, std::string name, View<const T, B> v) {
  if constexpr (B::host_accessible) {
    w.add(std::move(name), View<const T>(v.data(), v.shape()));
  } else {
    Tensor<T> h(v.shape());
    BackendOps<B>::template download<T>(h.view(), v);
    w.add(std::move(name), h.view());
  }
}

/// Adds every parameter of `ps` (on any backend) to `w` under prefix + its name.
template <class T, Backend B>
void add_parameters(io::SafetensorsWriter& w, const Parameters<T, B>& ps,
                    std::string_view prefix = {}) {
  for (index_t id = 0; id < ps.count(); ++id)
    add_tensor<T, B>(w, std::string(prefix) + ps.info(id).name, ps.param(id));
}

/// Writes every parameter of `ps` (under its name, F32/F64) and `metadata` to `path`, atomically.
template <class T, Backend B>
void save_parameters(const Parameters<T, B>& ps, const std::filesystem::path& path,
                     const Metadata& metadata = {}) {
  io::SafetensorsWriter w;
  add_parameters(w, ps);
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(path);
}

/// Loads every parameter of `ps` (on any backend) from `file` (see LoadOptions). Validates and
/// converts all of them before writing any, so a failure leaves `ps` unchanged.
template <class T, Backend B>
LoadReport load_parameters(Parameters<T, B>& ps, const io::SafetensorsFile& file,
                           const LoadOptions& options = {}) {
  LoadReport report;
  std::vector<std::string> missing;
  for (const auto& e : ps.entries()) {
    const std::string key = options.prefix + e.name;
    if (!file.contains(key)) missing.push_back(key);
  }
  if (!missing.empty() && !options.allow_missing)
    fail<io_error>(file.source(), ": ", missing.size(), " parameter", missing.size() == 1 ? " is" : "s are",
                   " missing from the file: ", detail::join_names(missing));
  report.missing = std::move(missing);

  // Tensors under the prefix that match no parameter.
  std::vector<std::string> unexpected;
  for (const auto& name : file.names()) {
    if (name.compare(0, options.prefix.size(), options.prefix) != 0) continue;
    bool known = false;
    for (const auto& e : ps.entries())
      if (name.size() == options.prefix.size() + e.name.size() &&
          name.compare(options.prefix.size(), std::string::npos, e.name) == 0) {
        known = true;
        break;
      }
    if (!known) unexpected.push_back(name);
  }
  if (!unexpected.empty() && options.strict)
    fail<io_error>(file.source(), ": ", unexpected.size(), " tensor", unexpected.size() == 1 ? "" : "s",
                   " in the file match", unexpected.size() == 1 ? "es" : "", " no parameter: ",
                   detail::join_names(unexpected),
                   " (load with LoadOptions{.strict = false} to ignore them)");
  report.unexpected = std::move(unexpected);

  std::vector<std::pair<index_t, Tensor<T>>> loaded;
  for (index_t id = 0; id < ps.count(); ++id) {
    const auto& e = ps.info(id);
    const std::string key = options.prefix + e.name;
    if (!file.contains(key)) continue;
    loaded.emplace_back(id, load_checked<T>(file, key, e.shape));
  }
  for (auto& [id, t] : loaded) detail::store(ps.param(id), t);
  return report;
}

/// Loads every parameter of `ps` from the safetensors file at `path`.
template <class T, Backend B>
LoadReport load_parameters(Parameters<T, B>& ps, const std::filesystem::path& path,
                           const LoadOptions& options = {}) {
  return load_parameters(ps, io::SafetensorsFile::read(path), options);
}

/// Writes named tensors (any mix of views added by the caller) and metadata atomically: the
/// building block for optimizer and training state.
template <class T>
void save_tensors(const std::filesystem::path& path,
                  const std::vector<std::pair<std::string, View<const T>>>& tensors,
                  const Metadata& metadata = {}) {
  io::SafetensorsWriter w;
  for (const auto& [name, v] : tensors) w.add(name, v);
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(path);
}

/// Reads and validates a safetensors file (io_error naming it on any problem).
inline io::SafetensorsFile load_tensors(const std::filesystem::path& path) {
  return io::SafetensorsFile::read(path);
}

}  // namespace flowdiff::nn
