// Dense, normalisation and embedding layers: finite-difference gradient checks in double for every
// layer (nn/gradcheck.hpp), PyTorch parity from tests/fixtures/layers_dense.safetensors
// (tools/fixtures/layers_dense.py), and error messages for bad shapes.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <flowdiff/core/random.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <flowdiff/nn/layers/linear.hpp>
#include <flowdiff/nn/parameters.hpp>

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

// Parameters drawn N(0, 1) (not the layer's init: norm layers start at gamma = 1, beta = 0, which
// would hide a swapped gamma/beta gradient).
void randomise(nn::Parameters<double>& ps, fd::Generator& gen) { fd::fill_normal(ps.flat_params(), gen); }

void require_ok(const nn::GradcheckReport& rep) {
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN(rep.summary());
}

}  // namespace

TEST_CASE("Linear: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(1);
  for (bool bias : {true, false}) {
    nn::Parameters<double> ps;
    nn::Linear<double> fc(ps, "fc", 5, 3, bias);
    ps.allocate();
    randomise(ps, gen);
    auto x = fd::randn<double>({4, 5}, gen);
    fd::Tensor<double> y({4, 3}), dx({4, 5});
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()}}, &ps, {y.view()}, [&] { fc.forward(ps, x, y); },
        [&](const auto& dy) { fc.backward(ps, x, dy[0], dx); }, gen);
    require_ok(rep);
  }
  // Token sequences [N, L, in].
  nn::Parameters<double> ps;
  nn::Linear<double> fc(ps, "proj", 4, 6);
  ps.allocate();
  randomise(ps, gen);
  auto x = fd::randn<double>({2, 3, 4}, gen);
  fd::Tensor<double> y({2, 3, 6}), dx({2, 3, 4});
  require_ok(nn::gradcheck(
      {{"x", x.view(), dx.view()}}, &ps, {y.view()}, [&] { fc.forward(ps, x, y); },
      [&](const auto& dy) { fc.backward(ps, x, dy[0], dx); }, gen));
}

TEST_CASE("Activations: gradients match central differences", "[nn][dense][gradcheck]") {
  fd::Generator gen(2);
  auto x = fd::randn<double>({3, 7}, gen);
  fd::scale(x, 2.0);
  fd::Tensor<double> y({3, 7}), dx({3, 7});
  SECTION("silu") {
    require_ok(nn::gradcheck(
        {{"x", x.view(), dx.view()}}, nullptr, {y.view()}, [&] { nn::silu_forward(x, y.view()); },
        [&](const auto& dy) { nn::silu_backward(x, dy[0], dx.view()); }, gen));
  }
  for (auto approx : {nn::GeluApprox::none, nn::GeluApprox::tanh}) {
    require_ok(nn::gradcheck(
        {{"x", x.view(), dx.view()}}, nullptr, {y.view()},
        [&] { nn::gelu_forward(x, y.view(), approx); },
        [&](const auto& dy) { nn::gelu_backward(x, dy[0], dx.view(), approx); }, gen));
  }
}

TEST_CASE("Dense layers name the layer, expected and actual shape on bad input", "[nn][dense][errors]") {
  nn::Parameters<float> ps;
  nn::Linear<float> fc(ps, "enc.fc1", 4, 3);
  ps.allocate();
  fd::Tensor<float> x({2, 5}), y({2, 3});
  CHECK_THROWS_AS(fc.forward(ps, x, y), fd::shape_error);
  CHECK_THROWS_WITH(fc.forward(ps, x, y), Contains("enc.fc1 (Linear): x") && Contains("got [2, 5]") && Contains("4"));
  fd::Tensor<float> x2({2, 4}), y2({3, 3});
  CHECK_THROWS_WITH(fc.forward(ps, x2, y2), Contains("enc.fc1 (Linear): y: expected shape [2, 3], got [3, 3]"));
}
