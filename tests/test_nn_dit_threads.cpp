// Thread-count independence of the DiT (models/dit.hpp): forward output, input gradient and every
// parameter gradient are bit-identical on 1 and on 2 OpenMP threads. The shapes put every GEMM,
// element-wise pass (the vectorised GELU / softmax of core/fast_math.hpp) and row loop above its
// parallel threshold, so both threads really share the work; parameters are random (the adaLN-Zero
// init would make most gradients zero).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <flowdiff/core/random.hpp>
#include <flowdiff/nn/models/dit.hpp>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fd = flowdiff;
namespace nn = flowdiff::nn;

TEST_CASE("DiT forward and backward are bit-identical on 1 and 2 threads", "[nn][dit][threads]") {
#if !defined(_OPENMP)
  WARN("built without OpenMP: one thread only");
#endif
  nn::DiTConfig cfg;
  cfg.image_size = 16;
  cfg.patch_size = 2;  // 64 tokens
  cfg.hidden = 64;
  cfg.depth = 2;
  cfg.heads = 4;
  cfg.num_classes = 3;
  nn::Parameters<float> ps;
  nn::DiT<float> net(ps, cfg);
  ps.allocate();
  fd::Generator gen{9};
  fd::fill_normal(ps.flat_params(), gen, 0.0f, 0.2f);
  const fd::index_t n = 8;  // 512 token rows: qkv GEMM 12.6 MFLOP, GELU 131 k elements
  auto x = fd::randn<float>({n, 1, 16, 16}, gen);
  auto dout = fd::randn<float>(x.shape(), gen);
  fd::Tensor<float> t({n});
  fd::fill_uniform(t, gen);
  fd::Tensor<fd::label_t> y({n});
  for (fd::index_t i = 0; i < n; ++i) y.data()[i] = static_cast<fd::label_t>(i % 4);  // 3 = null
  auto run = [&](int threads) {
#if defined(_OPENMP)
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    nn::DiT<float>::Cache cache;
    fd::Tensor<float> out(x.shape()), dx(x.shape());
    ps.zero_grad();
    net.forward(ps, x, t, y, out, cache);
    net.backward(ps, dout, dx, cache);
#if defined(_OPENMP)
    omp_set_num_threads(before);
#endif
    std::vector<float> r(out.data(), out.data() + out.numel());
    r.insert(r.end(), dx.data(), dx.data() + dx.numel());
    const auto g = ps.flat_grads();
    r.insert(r.end(), g.data(), g.data() + g.numel());
    return r;
  };
  const auto one = run(1), two = run(2);
  REQUIRE(one.size() == two.size());
  float mx = 0;
  for (float v : one) {
    REQUIRE(std::isfinite(v));
    mx = std::max(mx, std::abs(v));
  }
  CHECK(mx > 0);
  CHECK(one == two);
}
