// examples/common/device.hpp — the --device flag of the examples that can run on a GPU (toy2d,
// fashion_cfg, fashion_dit, fashion_latent, classifier_guidance, fashion_classifier). CMake
// compiles those examples with nvcc when it finds the CUDA toolkit (examples/CMakeLists.txt);
// then --device cuda runs on the GPU when the CUDA runtime reports a usable device and otherwise
// says why in one line and runs on the CPU. A build without the toolkit is plain C++: its --device cuda says that the build
// has no CUDA and runs on the CPU. Either way a run never fails for want of a GPU.
#pragma once

#include <cstdio>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <iostream>
#include <string>

#if defined(__CUDACC__)
#include <flowdiff/backend/cuda/all.cuh>
#endif

#include "common/cli.hpp"

namespace flowdiff::examples {

/// Whether this build of the examples can use a GPU (it was compiled by nvcc).
inline constexpr bool built_with_cuda =
#if defined(__CUDACC__)
    true;
#else
    false;
#endif

/// Declares --device (default cpu); `what` says what runs there, e.g. "the U-Net trains and
/// samples".
inline std::string& add_device_flag(Cli& cli, const std::string& what) {
  return cli.option<std::string>(
      "device", "cpu",
      "where " + what +
          ": cpu or cuda (cuda needs a build with the CUDA toolkit and a GPU; "
          "without one: a one-line notice and the CPU)");
}

/// The device the run uses (see the file comment); on the GPU it prints
/// "<program>: <doing> on the GPU (<device name>)".
inline Device resolve_example_device(const std::string& program, const std::string& flag,
                                     const char* doing) {
  Device device = parse_device(flag);
#if defined(__CUDACC__)
  device = cuda::resolve_device(device, std::cout);
  if (device == Device::cuda)
    std::printf("%s: %s on the GPU (%s)\n", program.c_str(), doing,
                cuda::device_info().name.c_str());
#else
  (void)doing;
  device = resolve_device(
      device, 0,
      "this build of " + program + " has no CUDA: configure flowdiff with the CUDA toolkit",
      std::cout);
#endif
  return device;
}

/// Calls run(model, params, where) with the model where `device` (resolve_example_device's) puts
/// it: `net` and `ps` as they are, where = ""; or, for Device::cuda in an nvcc build,
/// DeviceModel<float, Cuda> built from net.config() with its parameters uploaded from `ps` (the
/// same weights), where = ", on the GPU". DeviceModel is the backend twin of the CPU model:
/// nn::BackendUNet for nn::UNet, nn::BackendDiT for nn::DiT, nn::BackendConvClassifier for
/// nn::ConvClassifier.
template <template <class, Backend> class DeviceModel, class M, class Run>
void run_on_device(Device device, const M& net, nn::Parameters<float>& ps, Run&& run) {
#if defined(__CUDACC__)
  if (device == Device::cuda) {
    nn::Parameters<float, Cuda> dps;
    const DeviceModel<float, Cuda> dnet(dps, net.config());
    dps.allocate();
    nn::upload_parameters(dps, ps);
    run(dnet, dps, std::string(", on the GPU"));
    return;
  }
#endif
  (void)device;
  run(net, ps, std::string());
}

}  // namespace flowdiff::examples
