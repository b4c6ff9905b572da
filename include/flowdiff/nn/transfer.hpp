// flowdiff/nn/transfer.hpp — moving a parameter store between the host and a backend: two
// nn::Parameters with the same layout (every entry's name, shape and offset, and the flat size:
// the same model registered its tensors in the same order on both) exchange their flat value
// buffers in one copy. So a CPU checkpoint (nn::load_parameters into Parameters<T>) goes onto the
// device with upload_parameters and comes back with download_parameters, and the names stay
// PyTorch's. Gradients are not copied (they are per step).
#pragma once

#include <string_view>

#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Throws config_error naming the first difference unless `a` and `b` have the same layout.
template <class T, Backend A, Backend B>
void check_same_layout(std::string_view who, const Parameters<T, A>& a, const Parameters<T, B>& b) {
  require<config_error>(a.allocated() && b.allocated(), who,
                        ": both parameter sets must be allocated");
  const index_t common = a.count() < b.count() ? a.count() : b.count();
  for (index_t i = 0; i < common; ++i) {
    const ParameterInfo& x = a.info(i);
    const ParameterInfo& y = b.info(i);
    require<config_error>(x.name == y.name && x.shape == y.shape && x.offset == y.offset, who,
                          ": parameter ", i, " is '", x.name, "' ", x.shape, " at offset ",
                          x.offset, " in one set and '", y.name, "' ", y.shape, " at offset ",
                          y.offset, " in the other");
  }
  require<config_error>(a.count() == b.count() && a.flat_size() == b.flat_size(), who,
                        ": the parameter sets differ: ", a.count(), " tensors in ", a.flat_size(),
                        " flat entries against ", b.count(), " in ", b.flat_size(),
                        " (build the same model with the same configuration on both)");
}

/// dst (on B) takes the values of src (host), e.g. a checkpoint loaded on the CPU.
template <class T, Backend B>
void upload_parameters(Parameters<T, B>& dst, const Parameters<T, Cpu>& src) {
  check_same_layout("upload_parameters", dst, src);
  BackendOps<B>::template upload<T>(dst.flat_params(), src.flat_params());
}

/// dst (host) takes the values of src (on B), e.g. to save or to sample on the CPU.
template <class T, Backend B>
void download_parameters(Parameters<T, Cpu>& dst, const Parameters<T, B>& src) {
  check_same_layout("download_parameters", dst, src);
  BackendOps<B>::template download<T>(dst.flat_params(), src.flat_params());
}

}  // namespace flowdiff::nn
