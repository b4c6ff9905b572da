// tests/cuda/test_cuda_layers.cu — the backend-generic image layers of
// nn/layers/spatial_kernels.hpp (BackendConv2d, BackendGroupNorm with and without the fused SiLU,
// BackendUpsampleNearest2d, add_per_channel / sum_per_channel / add_in_place) on the CUDA backend,
// with the check bodies of tests/support/backend_spatial_checks.hpp (shared with
// tests/test_nn_backend_spatial.cpp, which runs them with B = Cpu):
//   host part (always): the bodies with B = Cpu compiled by nvcc's host pass, against nn::Conv2d,
//   nn::GroupNorm (+ silu_forward / silu_backward), nn::UpsampleNearest2d and the U-Net's
//   add_broadcast / sum_spatial (fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12, upsampling
//   and broadcasts bit-equal); central differences in double; shape and configuration errors.
//   device part (with a GPU): the same bodies with B = Cuda against the same CPU references
//   (fp32 normalised MSE <= 1e-7 and fp64 <= 1e-24: the products are cuBLAS's, DESIGN.md §4;
//   upsampling and broadcasts bit-equal: the same explicitly rounded additions in the same order),
//   central differences through the device layers, the errors with device tensors, and
//   nn::BackendUNet<T, Cuda> (with and without the midcoder attention) against nn::UNet (same
//   tolerances).
// The classifier's layers run here too, from tests/support/backend_classifier_checks.hpp (shared
// with tests/test_nn_backend_classifier.cpp; in this program rather than one of its own, which
// would cost CI another nvcc compilation): BackendBatchNorm2d, BackendAvgPool2d and the softmax
// cross-entropy on B against nn::BatchNorm2d, nn::AvgPool2d and nn::SoftmaxCrossEntropy
// (bit-equal with B = Cpu; on the device fp32 1e-6 + 1e-5 |ref|, fp64 1e-12 + 1e-12 |ref|),
// nn::BackendConvClassifier and classifier_log_prob_grad against nn::ConvClassifier (fp32 NMSE
// <= 1e-7, fp64 <= 1e-24 on the device), central differences, checkpoints and errors. Compiled,
// never yet run on a GPU.
// A part of the one CUDA test program (test_cuda.cu includes it): `test_cuda layers` runs it, as
// ctest's cuda_layers. Without a device: prints "SKIPPED" and returns 77 after the host part
// (ctest: skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <string>

#include "../support/backend_classifier_checks.hpp"
#include "../support/backend_spatial_checks.hpp"
#include "harness.hpp"

namespace flowdiff::test::cuda_layers {

namespace fd = flowdiff;
namespace sc = flowdiff::test::spatial;
namespace cc = flowdiff::test::classifier;
using fd::Cpu;
using fd::Cuda;

namespace {

// The shared section (tests/cuda/harness.hpp) with this program's Log type.
template <class F>
void section(const char* name, bool verbose, F&& body) {
  flowdiff::test::cuda_harness::log_section<sc::Log>(name, verbose, body);
}

void host_checks() {
  section("conv, B = Cpu under nvcc", false, [](sc::Log& log) {
    sc::conv_checks<float, Cpu>(log);
    sc::conv_checks<double, Cpu>(log);
  });
  section("group norm, B = Cpu under nvcc", false, [](sc::Log& log) {
    sc::norm_checks<float, Cpu>(log);
    sc::norm_checks<double, Cpu>(log);
  });
  section("upsampling, broadcasts, B = Cpu under nvcc", false, [](sc::Log& log) {
    sc::upsample_checks<float, Cpu>(log);
    sc::upsample_checks<double, Cpu>(log);
    sc::broadcast_checks<float, Cpu>(log);
    sc::broadcast_checks<double, Cpu>(log);
  });
  section("central differences, B = Cpu under nvcc", false, [](sc::Log& log) {
    sc::gradcheck_conv<Cpu>(log);
    sc::gradcheck_norm<Cpu>(log);
    sc::gradcheck_upsample_broadcast<Cpu>(log);
  });
  section("errors, B = Cpu under nvcc", false, [](sc::Log& log) { sc::error_checks<Cpu>(log); });
  section("BackendUNet, B = Cpu under nvcc", false, [](sc::Log& log) {
    sc::unet_checks<float, Cpu>(log);
    sc::unet_checks<double, Cpu>(log);
  });
  section("classifier layers and BackendConvClassifier, B = Cpu", false, [](sc::Log& log) {
    cc::layer_checks<float, Cpu>(log);
    cc::model_checks<float, Cpu>(log);
    cc::error_checks<Cpu>(log);
    cc::training_checks<Cpu>(log);
  });
}

void device_checks() {
  section("BackendConv2d<Cuda> vs nn::Conv2d", true, [](sc::Log& log) {
    sc::conv_checks<float, Cuda>(log);
    sc::conv_checks<double, Cuda>(log);
  });
  section("BackendGroupNorm<Cuda> vs nn::GroupNorm", true, [](sc::Log& log) {
    sc::norm_checks<float, Cuda>(log);
    sc::norm_checks<double, Cuda>(log);
  });
  section("upsampling, broadcasts on Cuda (bit-equal)", true, [](sc::Log& log) {
    sc::upsample_checks<float, Cuda>(log);
    sc::upsample_checks<double, Cuda>(log);
    sc::broadcast_checks<float, Cuda>(log);
    sc::broadcast_checks<double, Cuda>(log);
  });
  section("central differences on Cuda", true, [](sc::Log& log) {
    sc::gradcheck_conv<Cuda>(log);
    sc::gradcheck_norm<Cuda>(log);
    sc::gradcheck_upsample_broadcast<Cuda>(log);
  });
  section("errors on Cuda", false, [](sc::Log& log) { sc::error_checks<Cuda>(log); });
  section("BackendUNet<Cuda> vs nn::UNet", true, [](sc::Log& log) {
    sc::unet_checks<float, Cuda>(log);
    sc::unet_checks<double, Cuda>(log);
  });
  section("BatchNorm2d, AvgPool2d, cross-entropy on Cuda", true, [](sc::Log& log) {
    cc::layer_checks<float, Cuda>(log);
    cc::layer_checks<double, Cuda>(log);
  });
  section("BackendConvClassifier<Cuda> vs nn::ConvClassifier", true, [](sc::Log& log) {
    cc::model_checks<float, Cuda>(log);
    cc::model_checks<double, Cuda>(log);
  });
  section("classifier: central differences, checkpoints on Cuda", true, [](sc::Log& log) {
    cc::gradcheck_checks<Cuda>(log);
    cc::checkpoint_checks<Cuda>(log);
  });
  section("classifier errors on Cuda", false, [](sc::Log& log) { cc::error_checks<Cuda>(log); });
  section("load_or_train_classifier training BackendConvClassifier<Cuda>", true,
          [](sc::Log& log) { cc::training_checks<Cuda>(log); });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA image-layer tests\n");
  host_checks();
  return flowdiff::test::cuda_harness::finish([] { device_checks(); });
}

}  // namespace flowdiff::test::cuda_layers
