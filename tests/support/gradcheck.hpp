// tests/support/gradcheck.hpp — helpers of the layer gradient checks: random parameters from a
// seeded generator and the Catch2 verdict on a GradcheckReport (its summary printed either way).
#pragma once

#include <catch2/catch.hpp>

#include <flowdiff/core/random.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/parameters.hpp>

namespace flowdiff::test {

/// Every parameter (buffers too) drawn from N(0, stddev^2), in flat-buffer order.
inline void randomise(nn::Parameters<double>& ps, Generator& gen, double stddev = 1.0) {
  fill_normal(ps.flat_params(), gen, 0.0, stddev);
}

inline void require_ok(const nn::GradcheckReport& rep) {
  INFO(rep.summary());
  CHECK(rep.ok());
  WARN(rep.summary());
}

}  // namespace flowdiff::test
