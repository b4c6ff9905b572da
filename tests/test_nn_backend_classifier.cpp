// nn::BackendConvClassifier<T, Cpu>, the softmax cross-entropy on B
// (nn/models/classifier_backend.hpp), nn::BackendBatchNorm2d and nn::BackendAvgPool2d
// (nn/layers/spatial_kernels.hpp) against nn::ConvClassifier, nn::SoftmaxCrossEntropy /
// log_softmax / log_prob_seed, nn::BatchNorm2d and nn::AvgPool2d: batch norm in training (with the
// running statistics' updates) and eval mode, pooling and the loss bit-equal; the classifier's
// logits, features, dx, every parameter gradient and classifier_log_prob_grad on three
// configurations (fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12 + 1e-12 |ref|); central
// differences in double; checkpoints both ways and init; the errors. The bodies are in
// tests/support/backend_classifier_checks.hpp; tests/cuda/test_cuda_layers.cu runs them with
// B = Cuda.
#include <catch2/catch.hpp>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/models/classifier_backend.hpp>

#include "support/backend_classifier_checks.hpp"

namespace fd = flowdiff;

namespace test_nn_backend_classifier_detail {

namespace cc = flowdiff::test::classifier;

// Each entry of the log is one assertion (its message says what was compared and how closely).
void report(const cc::Log& log) {
  REQUIRE(!log.checks.empty());
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK(c.ok);
  }
}

}  // namespace test_nn_backend_classifier_detail

TEST_CASE("BackendBatchNorm2d, BackendAvgPool2d and the cross-entropy on Cpu are bit-equal to "
          "the CPU layers",
          "[nn][backend][classifier]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::layer_checks<float, fd::Cpu>(log);
  cc::layer_checks<double, fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}

TEST_CASE("BackendConvClassifier<Cpu> computes nn::ConvClassifier's logits, gradients and "
          "grad log p(y | x)",
          "[nn][backend][classifier]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::model_checks<float, fd::Cpu>(log);
  cc::model_checks<double, fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}

TEST_CASE("BackendBatchNorm2d, BackendAvgPool2d and BackendConvClassifier<Cpu>: central "
          "differences",
          "[nn][backend][classifier][gradcheck]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::gradcheck_checks<fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}

TEST_CASE("BackendConvClassifier<Cpu>: checkpoints both ways and init", "[nn][backend][classifier]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::checkpoint_checks<fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}

TEST_CASE("BackendConvClassifier<Cpu>, the loss and the layers: errors name the model, the "
          "argument and the shapes",
          "[nn][backend][classifier][errors]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::error_checks<fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}

TEST_CASE("load_or_train_classifier trains BackendConvClassifier<Cpu> through its hook as the "
          "CPU model trains",
          "[nn][backend][classifier][train]") {
  namespace cc = flowdiff::test::classifier;
  cc::Log log;
  cc::training_checks<fd::Cpu>(log);
  test_nn_backend_classifier_detail::report(log);
}
