// Thread-count independence of the network engine: the U-Net (with midcoder attention), Conv2d
// (implicit GEMM and Winograd) and the MLP give bit-identical outputs, input gradients and
// parameter gradients on 1 and on 2 OpenMP threads (omp_set_num_threads), because GEMM panels,
// convolution groups, Winograd blocks and backward chunks are cut by shape only and the
// weight-gradient partials are summed in a fixed order.
// Batches are chosen so that convolutions run several groups and backward chunks in parallel.
#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <flowdiff/backend/cpu/isa.hpp>
#include <flowdiff/backend/cpu/linalg.hpp>
#include <flowdiff/core/thread_team.hpp>
#include <flowdiff/nn/layers/conv.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/layers/conv_transpose.hpp>
#include <flowdiff/nn/models/mlp.hpp>
#include <flowdiff/nn/models/unet.hpp>

namespace fd = flowdiff;
namespace nn = flowdiff::nn;

namespace {

// Everything one run produces: output, input gradient, flat parameter gradients.
struct Result {
  std::vector<float> out, dx, grads;
};

std::vector<float> copy_of(fd::View<const float> v) {
  return std::vector<float>(v.data(), v.data() + v.numel());
}

// Runs f on `threads` threads and restores the previous setting.
Result with_threads(int threads, const std::function<Result()>& f) {
#if defined(_OPENMP)
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  Result r = f();
  omp_set_num_threads(before);
  return r;
#else
  (void)threads;
  return f();
#endif
}

void check_same(const Result& a, const Result& b) {
  REQUIRE(a.out.size() == b.out.size());
  REQUIRE(a.dx.size() == b.dx.size());
  REQUIRE(a.grads.size() == b.grads.size());
  // Not trivially zero.
  float mx = 0;
  for (float g : a.grads) mx = std::max(mx, std::abs(g));
  CHECK(mx > 0);
  // Counts, not the vectors: Catch would print every element of a failing comparison.
  auto differing = [](const std::vector<float>& u, const std::vector<float>& v) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < u.size(); ++i) n += u[i] != v[i] ? 1 : 0;
    return n;
  };
  CHECK(differing(a.out, b.out) == 0);
  CHECK(differing(a.dx, b.dx) == 0);
  CHECK(differing(a.grads, b.grads) == 0);
}

}  // namespace

TEST_CASE("U-Net forward and backward are bit-identical on 1 and 2 threads", "[nn][threads]") {
#if !defined(_OPENMP)
  WARN("built without OpenMP: one thread only");
#endif
  nn::UNetConfig cfg;
  cfg.in_channels = 1;
  cfg.channels = {8, 16};
  cfg.num_residual_layers = 1;
  cfg.t_embed_dim = 8;
  cfg.y_embed_dim = 8;
  cfg.num_classes = 3;
  cfg.attention = true;
  cfg.attention_heads = 2;
  cfg.groups = 4;
  nn::Parameters<float> ps;
  nn::UNet<float> net(ps, cfg);
  ps.allocate();
  fd::Generator gen{5};
  net.init(ps, gen);
  // 16 x 16: 4 samples per group at the top level, so a batch of 36 makes 9 groups (8 chunks).
  const fd::index_t n = 36;
  auto x = fd::randn<float>({n, 1, 16, 16}, gen);
  auto dout = fd::randn<float>(x.shape(), gen);
  fd::Tensor<float> t({n});
  fd::fill_uniform(t, gen);
  fd::Tensor<fd::label_t> y({n});
  for (fd::index_t i = 0; i < n; ++i) y.data()[i] = static_cast<fd::label_t>(i % 4);  // 3 = null
  auto run = [&] {
    nn::UNet<float>::Cache cache;
    fd::Tensor<float> out(x.shape()), dx(x.shape());
    ps.zero_grad();
    net.forward(ps, x, t, y, out, cache);
    net.backward(ps, dout, dx, cache);
    return Result{copy_of(out.view()), copy_of(dx.view()), copy_of(ps.flat_grads())};
  };
  const Result one = with_threads(1, run);
  const Result two = with_threads(2, run);
  check_same(one, two);
}

namespace {
// A 3 x 3, padding-1 Conv2d (c -> o channels, the given stride) on x of shape xs: forward and
// backward on 1 and on 2 threads give the same bits.
void check_conv_threads(fd::index_t c, fd::index_t o, fd::index_t stride, const fd::Shape& xs,
                        std::uint64_t seed) {
  nn::Parameters<float> ps;
  nn::Conv2d<float> conv(ps, "c", c, o, 3, stride, 1);
  ps.allocate();
  fd::Generator gen{seed};
  conv.init(ps, gen);
  auto x = fd::randn<float>(xs, gen);
  auto dy = fd::randn<float>(conv.output_shape(xs), gen);
  auto run = [&] {
    nn::Conv2d<float>::Cache cache;
    fd::Tensor<float> out(dy.shape()), dx(xs);
    ps.zero_grad();
    conv.forward(ps, x, out, cache);
    conv.backward(ps, x, dy, dx, cache);
    return Result{copy_of(out.view()), copy_of(dx.view()), copy_of(ps.flat_grads())};
  };
  check_same(with_threads(1, run), with_threads(2, run));
}
}  // namespace

TEST_CASE("Conv2d with many groups and chunks is bit-identical on 1 and 2 threads",
          "[nn][threads]") {
  // 32 x 32 stride 2: 256 columns per sample, 4 samples per group: 21 groups, 8 chunks. Over the
  // input's phases (forward and dW; dx too with more than 4 input channels).
  check_conv_threads(3, 5, 2, fd::Shape{81, 3, 32, 32}, 6);
  check_conv_threads(6, 8, 2, fd::Shape{23, 6, 32, 32}, 8);
}

TEST_CASE("ConvTranspose2d over phases is bit-identical on 1 and 2 threads", "[nn][threads]") {
  // 4 x 4, stride 2, padding 1, 8 x 8 -> 16 x 16: 64 columns per sample, 16 samples per group:
  // 3 groups shared out over the threads in forward, threaded products in backward.
  nn::Parameters<float> ps;
  nn::ConvTranspose2d<float> convt(ps, "t", 6, 8, 4, 2, 1);
  ps.allocate();
  fd::Generator gen{12};
  convt.init(ps, gen);
  const fd::Shape xs{37, 6, 8, 8};
  auto x = fd::randn<float>(xs, gen);
  auto dy = fd::randn<float>(convt.output_shape(xs), gen);
  auto run = [&] {
    nn::ConvTranspose2d<float>::Cache cache;
    fd::Tensor<float> out(dy.shape()), dx(xs);
    ps.zero_grad();
    convt.forward(ps, x, out, cache);
    convt.backward(ps, x, dy, dx, cache);
    return Result{copy_of(out.view()), copy_of(dx.view()), copy_of(ps.flat_grads())};
  };
  check_same(with_threads(1, run), with_threads(2, run));
}

TEST_CASE("Winograd Conv2d (3 x 3, padding 1) is bit-identical on 1 and 2 threads",
          "[nn][threads]") {
  // 4096 / 24 = 170 tiles per block, 9 tiles per row (17 wide): 18 tile rows per block, so the
  // 15 x 9 = 135 tile rows of the batch make 8 blocks (the last one short).
  check_conv_threads(16, 24, 1, fd::Shape{15, 16, 17, 17}, 7);
}

TEST_CASE("MLP training pass and a large GEMM are bit-identical on 1 and 2 threads",
          "[nn][threads]") {
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, nn::MLPConfig{.dim = 2, .width = 64, .depth = 3, .time_dim = 16});
  ps.allocate();
  fd::Generator gen{8};
  mlp.init(ps, gen);
  const fd::index_t n = 512;
  auto x = fd::randn<float>({n, 2}, gen);
  auto dout = fd::randn<float>(x.shape(), gen);
  fd::Tensor<float> t({n});
  fd::fill_uniform(t, gen);
  auto run = [&] {
    nn::MLP<float>::Cache cache;
    fd::Tensor<float> out(x.shape()), dx(x.shape());
    ps.zero_grad();
    mlp.forward(ps, x, t, {}, out, cache);
    mlp.backward(ps, dout, dx, cache);
    return Result{copy_of(out.view()), copy_of(dx.view()), copy_of(ps.flat_grads())};
  };
  check_same(with_threads(1, run), with_threads(2, run));

  // A GEMM with k > 320, where Eigen's own threading would pick a different blocking.
  auto a = fd::randn<float>({300, 700}, gen);
  auto b = fd::randn<float>({700, 200}, gen);
  auto gemm_run = [&] {
    fd::Tensor<float> c({300, 200});
    fd::gemm(fd::Trans::no, fd::Trans::no, 1.0f, a, b, 0.0f, c);
    return Result{copy_of(c.view()), {}, {1.0f}};
  };
  check_same(with_threads(1, gemm_run), with_threads(2, gemm_run));
}

TEST_CASE("MLP small-batch forward split over threads is bit-identical to the serial one",
          "[nn][threads]") {
  // Weights above split_min_weight_bytes, so 2 and 3 threads take the split path (each thread a
  // range of every layer's features) for batches of 1 to split_max_rows; widths whose tails are
  // not multiples of 16 and an output wider than one block check the ranges (an output of at
  // most 16 features, dim 2, runs on thread 0 alone); batch 1 takes the dot-product kernels, 2,
  // 5 and 16 the small-batch tiles (2: 2 x 8 tiles; 5: a group of four and a 1 x 16 row).
  // Backward after a split forward uses its cache.
  for (const auto& [width, dim] : {std::pair<fd::index_t, fd::index_t>{256, 20}, {328, 20},
                                   {256, 2}}) {
    const nn::MLPConfig cfg{.dim = dim, .width = width, .depth = 4, .time_dim = 30,
                            .num_classes = 5};
    nn::Parameters<float> ps;
    nn::MLP<float> mlp(ps, cfg);
    ps.allocate();
    std::size_t bytes = 0;
    for (fd::index_t i = 0; i < ps.count(); ++i)
      if (ps.info(i).shape.rank() == 2 && ps.info(i).name.find("net.") == 0)
        bytes += static_cast<std::size_t>(ps.info(i).shape.numel()) * sizeof(float);
    REQUIRE(bytes >= nn::MLP<float>::split_min_weight_bytes);
    fd::Generator gen{9};
    mlp.init(ps, gen);
    constexpr fd::index_t most = nn::MLP<float>::split_max_rows;
    for (const fd::index_t rows : {fd::index_t{1}, fd::index_t{2}, fd::index_t{5}, most}) {
      INFO("width " << width << ", dim " << dim << ", batch " << rows);
      auto x = fd::randn<float>({rows, cfg.dim}, gen);
      auto dout = fd::randn<float>(x.shape(), gen);
      fd::Tensor<float> t({rows});
      fd::fill_uniform(t, gen);
      fd::Tensor<fd::label_t> y({rows});
      for (fd::index_t r = 0; r < rows; ++r) y.data()[r] = static_cast<fd::label_t>((r + 3) % 6);
      fd::ThreadTeam* team = nullptr;
      bool own_team = true;
      int own_size = 0;  // the size of the team the cache made for itself (0: none)
      auto run = [&] {
        nn::MLP<float>::Cache cache;
        cache.team = team;
        cache.own_team = own_team;
        fd::Tensor<float> out(x.shape()), dx(x.shape());
        ps.zero_grad();
        mlp.forward(ps, x, t, y, out, cache);
        mlp.forward(ps, x, t, y, out, cache);  // a second call reuses the team's closure copy
        mlp.backward(ps, dout, dx, cache);
        own_size = cache.owned_team.current() ? cache.owned_team.current()->size() : 0;
        return Result{copy_of(out.view()), copy_of(dx.view()), copy_of(ps.flat_grads())};
      };
      const Result one = with_threads(1, run);
      CHECK(own_size == 0);  // one OpenMP thread: the serial forward, no team
      // By default the cache makes a team of as many threads as OpenMP would use (with
      // flowdiff's own GEMM; without it, off x86, the forward is always serial).
      check_same(one, with_threads(2, run));
#if defined(_OPENMP)
      CHECK(own_size == (fd::simd::best_isa() != fd::simd::Isa::none ? 2 : 0));
#endif
      check_same(one, with_threads(3, run));
      // OpenMP's parallel region instead (own_team = false).
      own_team = false;
      check_same(one, with_threads(2, run));
      check_same(one, with_threads(3, run));
      CHECK(own_size == 0);
      own_team = true;
      // A ThreadTeam given to the cache (the OpenMP setting then does not matter).
      for (const int size : {2, 3}) {
        INFO("ThreadTeam of " << size);
        fd::ThreadTeam threads(size, std::chrono::microseconds(50));
        team = &threads;
        check_same(one, with_threads(1, run));
        CHECK(own_size == 0);
        team = nullptr;
      }
      if (rows != 1) continue;
      // The same row inside a batch of 3 goes through other kernels: equal to rounding only.
      nn::MLP<float>::Cache cache;
      auto x3 = fd::randn<float>({3, cfg.dim}, gen);
      for (fd::index_t j = 0; j < cfg.dim; ++j) x3.data()[j] = x.data()[j];
      fd::Tensor<float> t3({3}), out3(x3.shape());
      fd::fill(t3, t.data()[0]);
      fd::Tensor<fd::label_t> y3({3});
      fd::fill(y3.view(), fd::label_t{3});
      mlp.forward(ps, x3, t3, y3, out3, cache);
      for (fd::index_t j = 0; j < cfg.dim; ++j)
        CHECK(out3.data()[j] ==
              Approx(one.out[static_cast<std::size_t>(j)]).epsilon(1e-5).margin(1e-6));
    }
  }
}

TEST_CASE("An MLP field on a ThreadTeam integrates to the same bits as on OpenMP's threads",
          "[nn][threads]") {
  // A sampler over as_field(mlp, ps): with the cache's own team (the default), with a team
  // given to it (docs/nn.md: as_field(mlp, ps).cache().team = &team) and with OpenMP's region
  // (own_team = false). Batch 1 and 16 take the split forward (weights above
  // split_min_weight_bytes), batch 17 the ordinary one.
  const nn::MLPConfig cfg{.dim = 2, .width = 256, .depth = 4};
  nn::Parameters<float> ps;
  nn::MLP<float> mlp(ps, cfg);
  ps.allocate();
  fd::Generator gen{21};
  mlp.init(ps, gen);
  fd::ThreadTeam team(2, std::chrono::microseconds(50));
  for (const fd::index_t rows : {fd::index_t{1}, fd::index_t{16}, fd::index_t{17}}) {
    INFO("batch " << rows);
    const auto x0 = fd::randn<float>({rows, cfg.dim}, gen);
    auto sample = [&](fd::ThreadTeam* t, bool own = true) {
      auto field = nn::as_field(mlp, ps);
      field.cache().team = t;
      field.cache().own_team = own;
      fd::Tensor<float> x = x0.clone();
      fd::Tensor<float> u(x.shape());
      for (int step = 0; step < 20; ++step) {  // Euler from t = 0 to 1
        field(x.view(), u.view(), 0.05f * static_cast<float>(step));
        for (fd::index_t i = 0; i < x.numel(); ++i) x.data()[i] += 0.05f * u.data()[i];
      }
      return copy_of(x.view());
    };
    const auto openmp = with_threads(2, [&] { return Result{sample(nullptr, false), {}, {}}; });
    const auto own = with_threads(2, [&] { return Result{sample(nullptr), {}, {}}; });
    const auto on_team = sample(&team);
    CHECK(on_team == openmp.out);
    CHECK(own.out == openmp.out);
    CHECK(on_team != copy_of(x0.view()));
  }
}
