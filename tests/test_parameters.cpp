// nn::Parameters: registration, aligned flat layout, named access, gradients, errors.
#include <catch2/catch.hpp>

#include <flowdiff/nn/parameters.hpp>

namespace fd = flowdiff;
using Catch::Matchers::Contains;

TEST_CASE("Parameters lay named tensors out in aligned flat buffers", "[nn][parameters]") {
  fd::nn::Parameters<float> ps;
  const auto w = ps.add("fc.weight", {3, 5});
  const auto b = ps.add("fc.bias", {3});
  CHECK_THROWS_WITH(ps.param(w), Contains("call allocate()"));
  ps.allocate();
  CHECK(ps.count() == 2);
  CHECK(ps.numel() == 18);
  CHECK(ps.flat_size() == 32);  // 15 -> 16, 3 -> 16
  CHECK(ps.info(b).offset == 16);
  CHECK(ps.find("fc.bias") == b);
  CHECK(ps.param(w).shape() == fd::Shape{3, 5});
  CHECK(fd::sum(ps.flat_params()) == 0.0f);
  ps.param(w)(2, 4) = 1.5f;
  ps.grad(b)[1] = 2.0f;
  CHECK(ps.flat_params()[14] == 1.5f);
  CHECK(ps.flat_grads()[17] == 2.0f);
  CHECK(reinterpret_cast<std::uintptr_t>(ps.param(b).data()) % 64 == 0);
  ps.zero_grad();
  CHECK(fd::sum(ps.flat_grads()) == 0.0f);
  CHECK(ps.param(w)(2, 4) == 1.5f);
}

TEST_CASE("Parameters report bad registrations and lookups", "[nn][parameters]") {
  fd::nn::Parameters<double> ps;
  ps.add("a", {2});
  CHECK_THROWS_WITH(ps.add("a", {3}), Contains("duplicate parameter name 'a'"));
  CHECK_THROWS_WITH(ps.add("", {3}), Contains("empty parameter name"));
  CHECK_THROWS_WITH(ps.add("z", {0, 3}), Contains("empty shape"));
  ps.allocate();
  CHECK_THROWS_WITH(ps.add("b", {2}), Contains("already allocated"));
  CHECK_THROWS_WITH(ps.find("nope"), Contains("no parameter named 'nope'"));
  CHECK_THROWS_WITH(ps.param(5), Contains("id 5 out of range"));
}
