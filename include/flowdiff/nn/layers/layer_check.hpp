// flowdiff/nn/layers/layer_check.hpp — argument checks shared by the dense layers. A layer checks
// every tensor it is handed against the shape its configuration implies and throws shape_error
// naming the layer (its parameter prefix), the argument, the expected and the actual shape, e.g.
// "fc1 (Linear): x: expected shape [N, 4] (N = batch), got [8, 5]". The message is only built on
// failure, so a passing check costs a shape comparison and allocates nothing.
#pragma once

#include <string_view>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/shape.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn::detail {

/// Throws shape_error unless x has exactly `expected`.
template <class T, class B>
void check_arg(std::string_view layer, std::string_view kind, std::string_view arg, View<T, B> x,
               const Shape& expected) {
  if (!(x.shape() == expected))
    fail<shape_error>(layer, " (", kind, "): ", arg, ": expected shape ", expected, ", got ",
                      x.shape());
}

/// Throws shape_error unless x has rank >= min_rank and dim(axis) == extent (the feature or
/// channel axis a layer is configured for); `form` describes the accepted shapes in the message.
template <class T, class B>
void check_arg_axis(std::string_view layer, std::string_view kind, std::string_view arg,
                    View<T, B> x, int min_rank, int axis, index_t extent, std::string_view form) {
  const int a = axis < 0 ? x.rank() + axis : axis;
  if (x.rank() < min_rank || a < 0 || a >= x.rank() || x.dim(a) != extent)
    fail<shape_error>(layer, " (", kind, "): ", arg, ": expected shape ", form, " with ", extent,
                      " at axis ", axis, ", got ", x.shape());
}

/// The configuration checks of BatchNorm2d and BackendBatchNorm2d (`kind` names the layer):
/// channels >= 1, eps > 0 and momentum in [0, 1]; config_error otherwise.
template <class T>
void check_batchnorm_config(std::string_view prefix, std::string_view kind, index_t channels, T eps,
                            T momentum) {
  require<config_error>(channels >= 1, prefix, " (", kind, "): channels must be >= 1, got ",
                        channels);
  require<config_error>(eps > T(0), prefix, " (", kind, "): eps must be > 0, got ", eps);
  require<config_error>(momentum >= T(0) && momentum <= T(1), prefix, " (", kind,
                        "): momentum must lie in [0, 1], got ", momentum);
}

}  // namespace flowdiff::nn::detail
