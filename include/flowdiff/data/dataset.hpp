// flowdiff/data/dataset.hpp — an in-memory labelled image data set: images x: [N, C, H, W] (float,
// the [-1, 1] range the models are trained in) with class labels y: [N] in [0, num_classes). What
// the loaders (data/fashion_mnist.hpp) return and what data::Batcher draws mini-batches from.
#pragma once

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::data {

struct ImageDataset {
  Tensor<float> images;    // [N, C, H, W], values in [-1, 1]
  Tensor<label_t> labels;  // [N], values in [0, num_classes)
  index_t num_classes = 10;

  index_t size() const { return images.empty() ? 0 : images.dim(0); }
};

}  // namespace flowdiff::data
