// Convolution, pooling, upsampling, batch-norm and attention layers: finite-difference gradient
// checks in double for every layer (nn/gradcheck.hpp), PyTorch parity against
// tests/fixtures/layers_spatial.safetensors (tools/fixtures/layers_spatial.py) by normalised MSE,
// error messages for bad shapes, and workspace reuse.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/backend/cpu/isa.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/gradcheck.hpp>
#include <flowdiff/nn/layers/attention.hpp>
#include <flowdiff/nn/layers/batchnorm.hpp>
#include <flowdiff/nn/layers/conv.hpp>
#include <flowdiff/nn/layers/conv_transpose.hpp>
#include <flowdiff/nn/layers/pooling.hpp>
#include <flowdiff/nn/layers/upsample.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <string>
#include <utility>
#include <vector>

#include "support/compare.hpp"
#include "support/files.hpp"
#include "support/gradcheck.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

// Parameters N(0, 0.5^2): large enough that attention softmaxes are far from uniform, and no
// gamma = 1 / beta = 0 that could hide a swapped gradient.
using flowdiff::test::randomise;
using flowdiff::test::require_ok;

fd::View<double> empty_view() { return fd::View<double>(nullptr, fd::Shape{0}); }

// Checks d(layer)/d(x) and d(layer)/d(every parameter) for an input of shape xs.
template <class Layer>
nn::GradcheckReport check_layer(const Layer& layer, nn::Parameters<double>& ps, fd::Shape xs,
                                fd::Generator& gen, bool with_params = true) {
  auto x = fd::randn<double>(xs, gen);
  fd::Tensor<double> y(layer.output_shape(xs)), dx(xs);
  typename Layer::Cache cache;
  return nn::gradcheck(
      {{"x", x.view(), dx.view()}}, with_params ? &ps : nullptr, {y.view()},
      [&] { layer.forward(ps, x.view(), y.view(), cache); },
      [&](const auto& dy) { layer.backward(ps, x.view(), dy[0], dx.view(), cache); }, gen);
}

// ---- PyTorch parity ----

const fd::io::SafetensorsFile& spatial_fixture() {
  static const auto f =
      fd::io::SafetensorsFile::read(flowdiff::test::fixture_path("layers_spatial.safetensors"));
  return f;
}

using flowdiff::test::nmse;

void check_close(const std::string& what, fd::View<const float> got, const std::string& ref_name) {
  const auto ref = spatial_fixture().tensor<float>(ref_name);
  const double e = nmse(got, ref.view());
  INFO(what << " vs " << ref_name << ": nmse " << e);
  CHECK(e <= 1e-7);
  WARN(what << ": nmse " << e);
}

void load_params(nn::Parameters<float>& ps) {
  for (fd::index_t id = 0; id < ps.count(); ++id) {
    const auto t = spatial_fixture().tensor<float>(ps.info(id).name);
    REQUIRE(t.shape() == ps.info(id).shape);
    fd::copy(ps.param(id), t.view());
  }
}

// Runs forward and backward on the fixture's x and dy and compares y, dx and every gradient
// (parameters without a stored gradient, e.g. running statistics, are skipped).
template <class Layer>
void check_parity(const std::string& name, const Layer& layer, nn::Parameters<float>& ps) {
  if (ps.count() > 0) {  // parameter-free layers come with an empty, unallocated store
    load_params(ps);
    ps.zero_grad();
  }
  const auto x = spatial_fixture().tensor<float>(name + ".x");
  const auto dy = spatial_fixture().tensor<float>(name + ".dy");
  fd::Tensor<float> y(layer.output_shape(x.shape())), dx(x.shape());
  typename Layer::Cache cache;
  layer.forward(ps, x.view(), y.view(), cache);
  check_close(name + " y", y.view(), name + ".y");
  layer.backward(ps, x.view(), dy.view(), dx.view(), cache);
  check_close(name + " dx", dx.view(), name + ".dx");
  for (fd::index_t id = 0; id < ps.count(); ++id) {
    const auto& pn = ps.info(id).name;
    if (spatial_fixture().contains("grad." + pn)) check_close("d " + pn, ps.grad(id), "grad." + pn);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Finite differences (double)
// ------------------------------------------------------------------------------------------------

TEST_CASE("Conv2d: gradients match central differences", "[nn][spatial][gradcheck]") {
  fd::Generator gen(11);
  struct Cfg {
    fd::index_t cin, cout, k, s, p;
    bool bias;
    fd::Shape x;
  };
  for (const auto& c :
       {Cfg{3, 4, 3, 1, 1, true, {2, 3, 5, 5}}, Cfg{2, 3, 3, 2, 1, true, {2, 2, 7, 6}},
        Cfg{3, 2, 1, 1, 0, false, {3, 3, 4, 4}}, Cfg{2, 2, 4, 2, 1, true, {2, 2, 6, 6}},
        Cfg{2, 2, 2, 1, 0, true, {1, 2, 5, 4}},
        Cfg{1, 2, 3, 1, 1, true, {1, 1, 32, 32}},     // one sample per GEMM
        Cfg{2, 2, 1, 1, 0, true, {1, 2, 32, 32}}}) {  // 1x1: no im2col copy
    nn::Parameters<double> ps;
    nn::Conv2d<double> conv(ps, "conv", c.cin, c.cout, c.k, c.s, c.p, c.bias);
    ps.allocate();
    randomise(ps, gen, 0.5);
    INFO("k " << c.k << " s " << c.s << " p " << c.p << " x " << c.x);
    require_ok(check_layer(conv, ps, c.x, gen));
  }
}

TEST_CASE("ConvTranspose2d: gradients match central differences", "[nn][spatial][gradcheck]") {
  fd::Generator gen(12);
  struct Cfg {
    fd::index_t cin, cout, k, s, p, op;
    fd::Shape x;
  };
  for (const auto& c :
       {Cfg{3, 2, 4, 2, 1, 0, {2, 3, 3, 3}}, Cfg{2, 3, 3, 2, 1, 1, {2, 2, 3, 4}},
        Cfg{2, 2, 3, 1, 1, 0, {1, 2, 4, 4}}, Cfg{2, 2, 2, 2, 0, 0, {1, 2, 16, 32}}}) {
    nn::Parameters<double> ps;
    nn::ConvTranspose2d<double> convt(ps, "up", c.cin, c.cout, c.k, c.s, c.p, c.op);
    ps.allocate();
    randomise(ps, gen, 0.5);
    INFO("k " << c.k << " s " << c.s << " p " << c.p << " op " << c.op << " x " << c.x);
    require_ok(check_layer(convt, ps, c.x, gen));
  }
}

TEST_CASE("AvgPool2d and UpsampleNearest2d: gradients match central differences",
          "[nn][spatial][gradcheck]") {
  fd::Generator gen(13);
  nn::Parameters<double> ps;
  for (fd::index_t k : {2, 3}) {
    nn::AvgPool2d<double> pool(k);
    require_ok(check_layer(pool, ps, {2, 2, 7, 6}, gen, false));
    nn::UpsampleNearest2d<double> up(k);
    require_ok(check_layer(up, ps, {2, 2, 3, 4}, gen, false));
  }
}

TEST_CASE("BatchNorm2d: gradients match central differences in training and eval mode",
          "[nn][spatial][gradcheck]") {
  fd::Generator gen(14);
  nn::Parameters<double> ps;
  nn::BatchNorm2d<double> bn(ps, "bn", 3);
  ps.allocate();
  randomise(ps, gen, 0.5);
  fd::fill_uniform(ps.param(bn.running_var_id()), gen, 0.5, 1.5);
  for (bool training : {true, false}) {
    bn.train(training);
    auto x = fd::randn<double>({3, 3, 2, 3}, gen);
    fd::Tensor<double> y(x.shape()), dx(x.shape());
    nn::BatchNorm2d<double>::Cache cache;
    // gamma and beta are checked as inputs (the running statistics are buffers without gradient),
    // so the backward here overwrites them rather than accumulating.
    auto rep = nn::gradcheck(
        {{"x", x.view(), dx.view()},
         {"weight", ps.param(bn.weight_id()), ps.grad(bn.weight_id())},
         {"bias", ps.param(bn.bias_id()), ps.grad(bn.bias_id())}},
        nullptr, {y.view()}, [&] { bn.forward(ps, x.view(), y.view(), cache); },
        [&](const auto& dy) {
          ps.zero_grad();
          bn.backward(ps, x.view(), dy[0], dx.view(), cache);
        },
        gen);
    INFO("training " << training);
    require_ok(rep);
  }
}

TEST_CASE("MultiheadSelfAttention and ImageSelfAttention: gradients match central differences",
          "[nn][spatial][gradcheck]") {
  fd::Generator gen(15);
  for (fd::index_t heads : {1, 2, 4}) {
    nn::Parameters<double> ps;
    nn::MultiheadSelfAttention<double> attn(ps, "attn", 8, heads, heads != 4);
    ps.allocate();
    randomise(ps, gen, 0.5);
    INFO("heads " << heads);
    require_ok(check_layer(attn, ps, {2, 5, 8}, gen));
  }
  nn::Parameters<double> ps;
  nn::ImageSelfAttention<double> attn(ps, "mid.attn", 4, 2);
  ps.allocate();
  randomise(ps, gen, 0.5);
  require_ok(check_layer(attn, ps, {2, 4, 3, 2}, gen));
}

TEST_CASE("Layers without dx skip the input gradient and still accumulate parameter gradients",
          "[nn][spatial]") {
  fd::Generator gen(16);
  nn::Parameters<double> ps;
  nn::Conv2d<double> conv(ps, "c", 2, 3, 3, 1, 1);
  nn::MultiheadSelfAttention<double> attn(ps, "a", 4, 2);
  ps.allocate();
  randomise(ps, gen, 0.5);
  auto x = fd::randn<double>({2, 2, 4, 4}, gen);
  auto t = fd::randn<double>({2, 3, 4}, gen);
  fd::Tensor<double> y({2, 3, 4, 4}), yt({2, 3, 4}), dx({2, 2, 4, 4}), dt({2, 3, 4});
  auto dy = fd::randn<double>(y.shape(), gen);
  auto dyt = fd::randn<double>(yt.shape(), gen);
  nn::Conv2d<double>::Cache cc;
  nn::MultiheadSelfAttention<double>::Cache ac;
  conv.forward(ps, x.view(), y.view(), cc);
  attn.forward(ps, t.view(), yt.view(), ac);
  conv.backward(ps, x.view(), dy.view(), dx.view(), cc);
  attn.backward(ps, t.view(), dyt.view(), dt.view(), ac);
  auto with_dx = ps.flat_grads();
  std::vector<double> g1(with_dx.data(), with_dx.data() + with_dx.numel());
  ps.zero_grad();
  conv.backward(ps, x.view(), dy.view(), empty_view(), cc);
  attn.backward(ps, t.view(), dyt.view(), empty_view(), ac);
  for (fd::index_t i = 0; i < with_dx.numel(); ++i) CHECK(with_dx[i] == g1[static_cast<size_t>(i)]);
}

// ------------------------------------------------------------------------------------------------
// PyTorch parity (float32)
// ------------------------------------------------------------------------------------------------

TEST_CASE("Conv2d and ConvTranspose2d match PyTorch", "[nn][spatial][parity]") {
  struct Conv {
    const char* name;
    fd::index_t cin, cout, k, s, p;
  };
  for (const auto& c :
       {Conv{"conv_a", 3, 4, 3, 1, 1}, Conv{"conv_b", 3, 4, 3, 2, 1}, Conv{"conv_c", 4, 5, 1, 1, 0},
        Conv{"conv_d", 2, 3, 4, 2, 1}, Conv{"conv_e", 1, 2, 3, 1, 1}}) {
    nn::Parameters<float> ps;
    nn::Conv2d<float> conv(ps, c.name, c.cin, c.cout, c.k, c.s, c.p);
    ps.allocate();
    check_parity(c.name, conv, ps);
  }
  struct ConvT {
    const char* name;
    fd::index_t cin, cout, k, s, p, op;
  };
  for (const auto& c : {ConvT{"convt_a", 4, 3, 4, 2, 1, 0}, ConvT{"convt_b", 3, 2, 3, 2, 1, 1}}) {
    nn::Parameters<float> ps;
    nn::ConvTranspose2d<float> convt(ps, c.name, c.cin, c.cout, c.k, c.s, c.p, c.op);
    ps.allocate();
    check_parity(c.name, convt, ps);
  }
}

TEST_CASE("Pooling, upsampling and BatchNorm2d match PyTorch", "[nn][spatial][parity]") {
  nn::Parameters<float> none;
  check_parity("up", nn::UpsampleNearest2d<float>(2), none);
  check_parity("pool", nn::AvgPool2d<float>(2), none);

  nn::Parameters<float> ps;
  nn::BatchNorm2d<float> bn(ps, "bn_train", 3);
  ps.allocate();
  check_parity("bn_train", bn, ps);  // one training step from the stored running statistics
  check_close("bn running_mean", ps.param(bn.running_mean_id()), "bn_train.running_mean_after");
  check_close("bn running_var", ps.param(bn.running_var_id()), "bn_train.running_var_after");

  nn::Parameters<float> pe;
  nn::BatchNorm2d<float> bne(pe, "bn_eval", 3);
  pe.allocate();
  bne.eval();
  check_parity("bn_eval", bne, pe);
}

TEST_CASE("Self-attention matches PyTorch (timm Attention layout)", "[nn][spatial][parity]") {
  {
    nn::Parameters<float> ps;
    nn::MultiheadSelfAttention<float> attn(ps, "attn_a", 8, 2);
    ps.allocate();
    check_parity("attn_a", attn, ps);
  }
  {
    nn::Parameters<float> ps;
    nn::MultiheadSelfAttention<float> attn(ps, "attn_b", 16, 4);
    ps.allocate();
    check_parity("attn_b", attn, ps);
  }
  nn::Parameters<float> ps;
  nn::ImageSelfAttention<float> attn(ps, "img_attn", 8, 2);
  ps.allocate();
  check_parity("img_attn", attn, ps);
}

// ------------------------------------------------------------------------------------------------
// Errors and workspaces
// ------------------------------------------------------------------------------------------------

TEST_CASE("Spatial layers name the layer, the expected and the actual shape",
          "[nn][spatial][errors]") {
  nn::Parameters<float> ps;
  nn::Conv2d<float> conv(ps, "enc.0.conv1", 3, 8, 3, 1, 1);
  nn::ConvTranspose2d<float> convt(ps, "dec.up", 8, 4, 4, 2, 1);
  nn::BatchNorm2d<float> bn(ps, "enc.0.bn", 8);
  nn::MultiheadSelfAttention<float> attn(ps, "mid.attn", 16, 4);
  ps.allocate();
  fd::Tensor<float> x({2, 4, 5, 5}), y({2, 8, 5, 5}), t({2, 6, 12});
  nn::Conv2d<float>::Cache cc;
  CHECK_THROWS_AS(conv.forward(ps, x.view(), y.view(), cc), fd::shape_error);
  CHECK_THROWS_WITH(conv.forward(ps, x.view(), y.view(), cc),
                    Contains("enc.0.conv1") && Contains("expected shape [N, 3, H, W]") &&
                        Contains("got [2, 4, 5, 5]"));
  fd::Tensor<float> x3({2, 3, 5, 5}), ybad({2, 8, 4, 5});
  CHECK_THROWS_WITH(conv.forward(ps, x3.view(), ybad.view(), cc),
                    Contains("enc.0.conv1") && Contains("y: expected shape [2, 8, 5, 5]") &&
                        Contains("got [2, 8, 4, 5]"));
  nn::ConvTranspose2d<float>::Cache tc;
  fd::Tensor<float> xt({2, 8, 3, 3}), yt({2, 4, 5, 6});
  CHECK_THROWS_WITH(convt.forward(ps, xt.view(), yt.view(), tc),
                    Contains("dec.up") && Contains("expected shape [2, 4, 6, 6]") &&
                        Contains("got [2, 4, 5, 6]"));
  nn::BatchNorm2d<float>::Cache bc;
  CHECK_THROWS_WITH(bn.forward(ps, x.view(), x.view(), bc),
                    Contains("enc.0.bn") && Contains("expected shape [N, 8, H, W]") &&
                        Contains("got [2, 4, 5, 5]"));
  nn::MultiheadSelfAttention<float>::Cache ac;
  fd::Tensor<float> ta({2, 6, 12});
  CHECK_THROWS_WITH(
      attn.forward(ps, ta.view(), t.view(), ac),
      Contains("mid.attn") && Contains("expected shape [N, L, 16]") && Contains("got [2, 6, 12]"));
  nn::AvgPool2d<float> pool(2, "down");
  fd::Tensor<float> yp({2, 4, 3, 3});
  CHECK_THROWS_WITH(
      pool.forward(x.view(), yp.view()),
      Contains("down") && Contains("expected shape [2, 4, 2, 2]") && Contains("got [2, 4, 3, 3]"));
  CHECK_THROWS_AS(nn::Conv2d<float>(ps, "bad", 3, 8, 0), fd::config_error);
  nn::Parameters<float> p2;
  CHECK_THROWS_WITH(nn::MultiheadSelfAttention<float>(p2, "bad", 10, 4),
                    Contains("multiple of heads"));
  CHECK_THROWS_WITH(nn::ConvTranspose2d<float>(p2, "bad", 2, 2, 3, 2, 1, 2),
                    Contains("output_padding"));
}

TEST_CASE("Workspaces are reused when shapes repeat", "[nn][spatial]") {
  fd::Generator gen(17);
  nn::Parameters<float> ps;
  nn::Conv2d<float> conv(ps, "c", 4, 8, 3, 1, 1);
  nn::MultiheadSelfAttention<float> attn(ps, "a", 8, 2);
  ps.allocate();
  conv.init(ps, gen);
  attn.init(ps, gen);
  auto x = fd::randn<float>({4, 4, 8, 8}, gen);
  fd::Tensor<float> y({4, 8, 8, 8}), dx(x.shape());
  nn::Conv2d<float>::Cache cc;
  conv.forward(ps, x.view(), y.view(), cc);
  conv.backward(ps, x.view(), y.view(), dx.view(), cc);
  const float* col = cc.col.data();
  const float* out = cc.out.data();
  for (int i = 0; i < 3; ++i) {
    conv.forward(ps, x.view(), y.view(), cc);
    conv.backward(ps, x.view(), y.view(), dx.view(), cc);
  }
  CHECK(cc.col.data() == col);
  CHECK(cc.out.data() == out);
  // A smaller batch reuses the larger workspace.
  conv.forward(ps, x.view().rows(0, 2), y.view().rows(0, 2), cc);
  CHECK(cc.col.data() == col);

  auto t = fd::randn<float>({3, 16, 8}, gen);
  fd::Tensor<float> yt(t.shape()), dt(t.shape());
  nn::MultiheadSelfAttention<float>::Cache ac;
  attn.forward(ps, t.view(), yt.view(), ac);
  attn.backward(ps, t.view(), yt.view(), dt.view(), ac);
  const float* p = ac.p.data();
  const float* dq = ac.dqkv.data();
  attn.forward(ps, t.view(), yt.view(), ac);
  attn.backward(ps, t.view(), yt.view(), dt.view(), ac);
  CHECK(ac.p.data() == p);
  CHECK(ac.dqkv.data() == dq);
  // Softmax rows sum to one and stay finite for large logits (stable softmax).
  fd::fill(ps.param(attn.qkv_weight_id()), 40.0f);
  attn.forward(ps, t.view(), yt.view(), ac);
  for (fd::index_t r = 0; r < 3 * 2 * 16; ++r) {
    double s = 0;
    for (fd::index_t c = 0; c < 16; ++c) s += ac.p[r * 16 + c];
    CHECK(std::abs(s - 1.0) < 1e-5);
  }
  for (fd::index_t i = 0; i < yt.numel(); ++i) REQUIRE(std::isfinite(yt[i]));
}

// The float Conv2d on an AVX-512 CPU reads its columns straight from the images (implicit GEMM)
// and takes dx of stride-1 convolutions as the convolution of dy with the flipped kernel. The
// forward must have the bits of im2col + gemm; dx must match W^T dy + col2im, and dW (col^T
// packed from the images, the layer's groups summed in its own order) dy col^T, to float
// rounding. Geometries cover one sample per product (28 x 28), groups of
// samples side by side (8 x 8), strides (stride 2 over the input's four phases where the image
// is even and the output half its size, conv_phases.hpp, whose dx takes four phase products
// instead of col2im; otherwise pairs of 16-pixel loads where 8 lanes share an output row, gathered
// columns elsewhere), valid and wide padding, non-square images and kernels 1, 2, 4, 5.
TEST_CASE("Conv2d float: implicit GEMM forward and flipped-kernel dx agree with im2col",
          "[nn][spatial]") {
  namespace sd = flowdiff::nn::spatial_detail;
  if (!sd::implicit_available<float>(8))
    WARN("this CPU has no AVX-512: the implicit-GEMM path is not taken, im2col is compared "
         "with itself");
  struct Case {
    fd::index_t n, c, o, k, s, p, h, w;
  };
  const Case cases[] = {{3, 6, 8, 3, 1, 1, 28, 28},  {20, 8, 16, 3, 1, 1, 8, 8},
                        {5, 7, 9, 3, 2, 1, 16, 16},  {4, 5, 6, 5, 1, 2, 7, 9},
                        {6, 6, 12, 3, 1, 0, 10, 10}, {3, 5, 7, 4, 1, 3, 6, 5},
                        {4, 6, 8, 1, 2, 0, 9, 9},    {2, 16, 33, 3, 1, 1, 13, 11},
                        // stride 2 with 8-lane runs (output rows 16, 8 and 9 wide; padding on
                        // both sides, none, kernel 4)
                        {3, 4, 5, 3, 2, 1, 32, 32},  {2, 3, 4, 3, 2, 0, 33, 17},
                        {2, 3, 4, 4, 2, 1, 30, 18},
                        // stride 2 over the input's phases (even image, output half its size):
                        // groups of samples (16 x 16 -> 64 columns each), kernels 4 and 2,
                        // non-square, samples of 9 and 1 columns (runs across samples: gathers),
                        // odd channel counts, dx with few input channels (old path)
                        {5, 8, 16, 3, 2, 1, 16, 16}, {2, 6, 8, 4, 2, 1, 12, 20},
                        {3, 6, 8, 2, 2, 0, 8, 8},    {4, 5, 7, 3, 2, 1, 6, 6},
                        {3, 6, 8, 3, 2, 1, 2, 2},    {2, 4, 9, 3, 2, 1, 32, 32}};
  // flowdiff's own GEMM (x86) sums k in an order that does not depend on the product's shape, so
  // a sample's output has the same bits in a batch as alone; Eigen's (other CPUs) blocks k by
  // the product's size: there, to float rounding.
  const bool own_gemm = fd::simd::best_isa() != fd::simd::Isa::none;
  fd::Generator gen(23);
  for (const auto& cs : cases) {
    CAPTURE(cs.n, cs.c, cs.o, cs.k, cs.s, cs.p, cs.h, cs.w);
    nn::Parameters<float> ps;
    nn::Conv2d<float> conv(ps, "c", cs.c, cs.o, cs.k, cs.s, cs.p);
    conv.set_winograd(false);  // the implicit GEMM (Winograd has its own test)
    ps.allocate();
    conv.init(ps, gen);
    auto x = fd::randn<float>({cs.n, cs.c, cs.h, cs.w}, gen);
    const fd::Shape ys = conv.output_shape(x.shape());
    fd::Tensor<float> y(ys), dx(x.shape());
    auto dy = fd::randn<float>(ys, gen);
    nn::Conv2d<float>::Cache cache;
    conv.forward(ps, x.view(), y.view(), cache);
    ps.zero_grad();
    conv.backward(ps, x.view(), dy.view(), dx.view(), cache);

    // The explicit path, one sample at a time.
    sd::ConvGeometry g;
    g.channels = cs.c;
    g.height = cs.h;
    g.width = cs.w;
    g.kernel = cs.k;
    g.stride = cs.s;
    g.padding = cs.p;
    g.out_h = ys[2];
    g.out_w = ys[3];
    const fd::index_t K = g.rows(), L = g.cols(), plane = cs.c * cs.h * cs.w;
    const float* w = ps.param(conv.weight_id()).data();
    const float* b = ps.param(conv.bias_id()).data();
    fd::Tensor<float> col({K, L}), yref({cs.o, L}), dcol({K, L}), dxref({cs.c, cs.h, cs.w});
    fd::Tensor<float> dwref({cs.o, K});
    fd::fill(dwref, 0.0f);
    double dx_err = 0, dx_scale = 0, y_err = 0, y_scale = 0;
    for (fd::index_t i = 0; i < cs.n; ++i) {
      sd::im2col(x.data() + i * plane, g, col.data(), L);
      fd::gemm(fd::Trans::no, fd::Trans::no, 1.0f, sd::mat(w, cs.o, K),
               sd::mat(col.data(), K, L), 0.0f, yref.view());
      for (fd::index_t q = 0; q < cs.o * L; ++q) {
        const float expect = yref[q] + b[q / L];
        if (own_gemm) REQUIRE(y[i * cs.o * L + q] == expect);  // bit-equal
        y_err = std::max(y_err, double(std::abs(y[i * cs.o * L + q] - expect)));
        y_scale = std::max(y_scale, double(std::abs(expect)));
      }
      const float* dyi = dy.data() + i * cs.o * L;
      fd::gemm(fd::Trans::no, fd::Trans::yes, 1.0f, sd::mat(dyi, cs.o, L),
               sd::mat(col.data(), K, L), 1.0f, dwref.view());
      fd::gemm(fd::Trans::yes, fd::Trans::no, 1.0f, sd::mat(w, cs.o, K), sd::mat(dyi, cs.o, L),
               0.0f, dcol.view());
      sd::col2im(dcol.data(), L, g, dxref.data());
      for (fd::index_t q = 0; q < plane; ++q) {
        dx_err = std::max(dx_err, double(std::abs(dx[i * plane + q] - dxref[q])));
        dx_scale = std::max(dx_scale, double(std::abs(dxref[q])));
      }
    }
    CHECK(y_err <= 1e-6 * y_scale);
    CHECK(dx_err <= 1e-5 * dx_scale);
    const auto& dw = ps.grad(conv.weight_id());
    double dw_err = 0, dw_scale = 0;
    for (fd::index_t q = 0; q < dw.numel(); ++q) {
      dw_err = std::max(dw_err, double(std::abs(dw[q] - dwref[q])));
      dw_scale = std::max(dw_scale, double(std::abs(dwref[q])));
    }
    CHECK(dw_err <= 1e-5 * dw_scale);
  }
}

// A float ConvTranspose2d with stride 2 and an output twice its input (k + op - 2p = 2) and more
// than 4 channels each way runs over the phases of its output (conv_phases.hpp) on an AVX-512
// CPU: y as four phase products (to float rounding of col2im(W^T x)), dx with the bits of
// W im2col(dy), dW (groups summed in the layer's order) to float rounding of x im2col(dy)^T.
// Kernels 4, 3 (output_padding 1) and 2; groups of several samples; non-square images.
TEST_CASE("ConvTranspose2d float: the phase path agrees with col2im and im2col",
          "[nn][spatial]") {
  namespace sd = flowdiff::nn::spatial_detail;
  struct Case {
    fd::index_t n, cin, cout, k, p, op, h, w;
  };
  const Case cases[] = {{3, 6, 8, 4, 1, 0, 8, 8},
                        {2, 8, 6, 3, 1, 1, 5, 7},
                        {20, 5, 7, 2, 0, 0, 4, 4},
                        {2, 6, 5, 4, 1, 0, 16, 16}};
  const bool own_gemm = fd::simd::best_isa() != fd::simd::Isa::none;  // (as for Conv2d above)
  fd::Generator gen(29);
  for (const auto& cs : cases) {
    CAPTURE(cs.n, cs.cin, cs.cout, cs.k, cs.p, cs.op, cs.h, cs.w);
    nn::Parameters<float> ps;
    nn::ConvTranspose2d<float> convt(ps, "t", cs.cin, cs.cout, cs.k, 2, cs.p, cs.op);
    ps.allocate();
    convt.init(ps, gen);
    auto x = fd::randn<float>({cs.n, cs.cin, cs.h, cs.w}, gen);
    const fd::Shape ys = convt.output_shape(x.shape());
    REQUIRE(ys[2] == 2 * cs.h);
    fd::Tensor<float> y(ys), dx(x.shape());
    auto dy = fd::randn<float>(ys, gen);
    nn::ConvTranspose2d<float>::Cache cache;
    convt.forward(ps, x.view(), y.view(), cache);
    ps.zero_grad();
    convt.backward(ps, x.view(), dy.view(), dx.view(), cache);

    // The explicit path, one sample at a time: the convolution over the output image.
    sd::ConvGeometry g;
    g.channels = cs.cout;
    g.height = ys[2];
    g.width = ys[3];
    g.kernel = cs.k;
    g.stride = 2;
    g.padding = cs.p;
    g.out_h = cs.h;
    g.out_w = cs.w;
    const fd::index_t K = g.rows(), L = g.cols(), plane_y = cs.cout * ys[2] * ys[3];
    const float* w = ps.param(convt.weight_id()).data();
    const float* b = ps.param(convt.bias_id()).data();
    fd::Tensor<float> col({K, L}), yref({cs.cout, ys[2], ys[3]}), dxref({cs.cin, L});
    fd::Tensor<float> dwref({cs.cin, K});
    fd::fill(dwref, 0.0f);
    double y_err = 0, y_scale = 0, dx_err = 0, dx_scale = 0;
    for (fd::index_t i = 0; i < cs.n; ++i) {
      const float* xi = x.data() + i * cs.cin * L;
      fd::gemm(fd::Trans::yes, fd::Trans::no, 1.0f, sd::mat(w, cs.cin, K), sd::mat(xi, cs.cin, L),
               0.0f, col.view());
      sd::col2im(col.data(), L, g, yref.data());
      for (fd::index_t q = 0; q < plane_y; ++q) {
        const float expect = yref[q] + b[q / (ys[2] * ys[3])];
        y_err = std::max(y_err, double(std::abs(y[i * plane_y + q] - expect)));
        y_scale = std::max(y_scale, double(std::abs(expect)));
      }
      sd::im2col(dy.data() + i * plane_y, g, col.data(), L);
      fd::gemm(fd::Trans::no, fd::Trans::no, 1.0f, sd::mat(w, cs.cin, K),
               sd::mat(col.data(), K, L), 0.0f, dxref.view());
      for (fd::index_t q = 0; q < cs.cin * L; ++q) {
        if (own_gemm) REQUIRE(dx[i * cs.cin * L + q] == dxref[q]);  // bit-equal
        dx_err = std::max(dx_err, double(std::abs(dx[i * cs.cin * L + q] - dxref[q])));
        dx_scale = std::max(dx_scale, double(std::abs(dxref[q])));
      }
      fd::gemm(fd::Trans::no, fd::Trans::yes, 1.0f, sd::mat(xi, cs.cin, L),
               sd::mat(col.data(), K, L), 1.0f, dwref.view());
    }
    CHECK(y_err <= 1e-5 * y_scale);
    CHECK(dx_err <= 1e-6 * dx_scale);
    const auto& dw = ps.grad(convt.weight_id());
    double dw_err = 0, dw_scale = 0;
    for (fd::index_t q = 0; q < dw.numel(); ++q) {
      dw_err = std::max(dw_err, double(std::abs(dw[q] - dwref[q])));
      dw_scale = std::max(dw_scale, double(std::abs(dwref[q])));
    }
    CHECK(dw_err <= 1e-5 * dw_scale);
  }
}

TEST_CASE("Winograd kernel transform: the AVX-512 and AVX2 forms are the scalar one, bit for bit",
          "[nn][spatial]") {
#if FLOWDIFF_X86_DISPATCH
  if (fd::simd::best_isa() != fd::simd::Isa::avx512) {
    WARN("this CPU has no AVX-512: the vector transform is not taken");
    return;
  }
  fd::Generator gen(31);
  // O C kernels a multiple of 16, and two with a tail of sixteen (the masked gathers and stores).
  for (const auto& [o, c] : {std::pair<fd::index_t, fd::index_t>{16, 16}, {33, 16}, {17, 20}}) {
    CAPTURE(o, c);
    const auto w = fd::randn<float>({o, c, 3, 3}, gen);
    std::vector<float> scalar(static_cast<std::size_t>(16 * o * c)), vec(scalar.size(), -1.f);
    nn::winograd_detail::transform_weights(w.data(), o, c, scalar.data());
    nn::winograd_detail::transform_weights_avx512(w.data(), o, c, vec.data());
    CHECK(vec == scalar);
    std::vector<float> vec8(scalar.size(), -1.f);  // the AVX2 form (eight kernels a time)
    nn::winograd_detail::transform_weights_avx2(w.data(), o, c, vec8.data());
    CHECK(vec8 == scalar);
  }
#else
  WARN("not an x86-64 build: the vector transform is not compiled");
#endif
}

TEST_CASE("Winograd's portable, AVX2 and AVX-512 transforms give the same bits",
          "[nn][spatial]") {
  // The plain-loop transforms (CPUs without flowdiff's x86 kernels) against the AVX2 ones (eight
  // tiles per register) and those against the AVX-512 ones (sixteen), on the same tiles: input
  // and dy in their plain-row (ld) form, output with a bias. Odd and even sizes, rows of more
  // than 8 and 16 tiles, blocks not starting at row 0.
#if FLOWDIFF_X86_DISPATCH
  const auto isa = fd::simd::best_isa();
  if (isa == fd::simd::Isa::none) {
    WARN("this CPU has no AVX2: the intrinsics to compare with are not taken");
    return;
  }
  if (isa != fd::simd::Isa::avx512) WARN("this CPU has no AVX-512: portable vs AVX2 only");
  namespace wd = nn::winograd_detail;
  fd::Generator gen(37);
  struct Case {
    fd::index_t n, c, o, h, w;
  };
  for (const Case cs : {Case{2, 3, 5, 7, 9}, Case{1, 2, 4, 34, 40}, Case{3, 4, 2, 8, 8},
                        Case{2, 2, 3, 1, 5}, Case{1, 2, 2, 3, 1}}) {
    CAPTURE(cs.n, cs.c, cs.o, cs.h, cs.w);
    const auto p = wd::plan(cs.n, cs.c, cs.o, cs.h, cs.w);
    const auto x = fd::randn<float>({cs.n, cs.c, cs.h, cs.w}, gen);
    const auto dy = fd::randn<float>({cs.n, cs.o, cs.h, cs.w}, gen);
    const auto bias = fd::randn<float>({cs.o}, gen);
    const fd::index_t total = cs.n * p.th;
    const fd::index_t r0 = total > 1 ? 1 : 0, r1 = total, nt = (r1 - r0) * p.tw;
    // Input and dy transforms: 16 positions x channels x nt tiles, plain rows.
    const fd::index_t ve = cs.c * nt, ze = cs.o * nt;
    std::vector<float> rows(static_cast<std::size_t>(wd::portable_rows(p)), 3.f);
    std::vector<float> va(static_cast<std::size_t>(16 * ve), -7.f), vb = va, vp = va;
    wd::transform_input_avx2(p, x.data(), r0, r1, 0, cs.c, vb.data(), ve, nt);
    wd::transform_input_portable(p, x.data(), r0, r1, 0, cs.c, vp.data(), ve, nt, rows.data());
    CHECK(vp == vb);
    std::vector<float> za(static_cast<std::size_t>(16 * ze), -7.f), zb = za, zp = za;
    wd::transform_dy_avx2(p, dy.data(), r0, r1, 0, cs.o, zb.data(), ze, nt);
    wd::transform_dy_portable(p, dy.data(), r0, r1, 0, cs.o, zp.data(), ze, nt, rows.data());
    CHECK(zp == zb);
    // Output transform of random M [16, O, nt] into y (rows r0 .. r1 only: the rest stays),
    // with a bias and without.
    const auto m = fd::randn<float>({16, cs.o, nt}, gen);
    fd::Tensor<float> ya = fd::Tensor<float>::full({cs.n, cs.o, cs.h, cs.w}, -7.f);
    fd::Tensor<float> yb = ya.clone(), yp = ya.clone(), yb0 = ya.clone(), yp0 = ya.clone();
    wd::transform_output_avx2(p, m.data(), nt, r0, r1, 0, cs.o, bias.data(), yb.data());
    wd::transform_output_portable(p, m.data(), nt, r0, r1, 0, cs.o, bias.data(), yp.data());
    CHECK(yp.to_vector() == yb.to_vector());
    wd::transform_output_avx2(p, m.data(), nt, r0, r1, 0, cs.o, nullptr, yb0.data());
    wd::transform_output_portable(p, m.data(), nt, r0, r1, 0, cs.o, nullptr, yp0.data());
    CHECK(yp0.to_vector() == yb0.to_vector());
    if (isa != fd::simd::Isa::avx512) continue;
    wd::transform_input(p, x.data(), r0, r1, 0, cs.c, va.data(), ve, nt);
    CHECK(va == vb);
    wd::transform_dy(p, dy.data(), r0, r1, 0, cs.o, za.data(), ze, nt);
    CHECK(za == zb);
    wd::transform_output(p, m.data(), nt, r0, r1, 0, cs.o, bias.data(), ya.data());
    CHECK(ya.to_vector() == yb.to_vector());
  }
#else
  WARN("not an x86-64 build: the vector transforms to compare with are not compiled");
#endif
}

TEST_CASE("Conv2d float: Winograd forward, dx and dW match a double-precision convolution",
          "[nn][spatial]") {
  struct Case {
    fd::index_t n, c, o, h, w;
  };
  // Odd and even sizes (a last tile of one row or column), images narrower than 16 tiles and
  // wider (34 x 40: 20 tiles per row), a single row, a batch of several blocks of tile rows.
  const Case cases[] = {{3, 16, 16, 8, 8},  {2, 16, 33, 13, 11}, {2, 24, 16, 34, 40},
                        {4, 17, 20, 1, 5},  {1, 16, 16, 2, 3},   {9, 64, 32, 16, 16},
                        {2, 32, 32, 32, 32}};
  fd::Generator gen(29);
  for (const auto& cs : cases) {
    CAPTURE(cs.n, cs.c, cs.o, cs.h, cs.w);
    nn::Parameters<float> ps;
    nn::Conv2d<float> conv(ps, "c", cs.c, cs.o, 3, 1, 1);
    ps.allocate();
    conv.init(ps, gen);
    REQUIRE(conv.winograd());
    auto x = fd::randn<float>({cs.n, cs.c, cs.h, cs.w}, gen);
    const fd::Shape ys{cs.n, cs.o, cs.h, cs.w};
    auto dy = fd::randn<float>(ys, gen);
    fd::Tensor<float> y(ys), dx(x.shape()), y2(ys), dx2(x.shape());
    nn::Conv2d<float>::Cache cache, cache2;
    ps.zero_grad();
    conv.forward(ps, x.view(), y.view(), cache);
    conv.backward(ps, x.view(), dy.view(), dx.view(), cache);
    auto copy = [](fd::View<const float> v) {
      return std::vector<float>(v.data(), v.data() + v.numel());
    };
    const auto dw = copy(ps.grad(conv.weight_id())), db = copy(ps.grad(conv.bias_id()));
    // The GEMM path on the same parameters (db is computed the same way: bit-equal).
    conv.set_winograd(false);
    ps.zero_grad();
    conv.forward(ps, x.view(), y2.view(), cache2);
    conv.backward(ps, x.view(), dy.view(), dx2.view(), cache2);
    const auto dw2 = copy(ps.grad(conv.weight_id()));
    CHECK(copy(ps.grad(conv.bias_id())) == db);

    // y and dx in double, directly from the definition.
    const float* w = ps.param(conv.weight_id()).data();
    const float* b = ps.param(conv.bias_id()).data();
    const fd::index_t H = cs.h, W = cs.w, C = cs.c, O = cs.o;
    std::vector<double> yref(static_cast<std::size_t>(y.numel())),
        dxref(static_cast<std::size_t>(x.numel()), 0.0),
        dwref(dw.size(), 0.0);
    for (fd::index_t s = 0; s < cs.n; ++s)
      for (fd::index_t o = 0; o < O; ++o)
        for (fd::index_t i = 0; i < H; ++i)
          for (fd::index_t j = 0; j < W; ++j) {
            double acc = b[o];
            const double g = dy[((s * O + o) * H + i) * W + j];
            for (fd::index_t c = 0; c < C; ++c)
              for (fd::index_t ki = 0; ki < 3; ++ki)
                for (fd::index_t kj = 0; kj < 3; ++kj) {
                  const fd::index_t ii = i + ki - 1, jj = j + kj - 1;
                  if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
                  const fd::index_t xi = ((s * C + c) * H + ii) * W + jj;
                  const fd::index_t wi = ((o * C + c) * 3 + ki) * 3 + kj;
                  const double wv = w[wi];
                  acc += wv * x[xi];
                  dxref[static_cast<std::size_t>(xi)] += wv * g;
                  dwref[static_cast<std::size_t>(wi)] += g * x[xi];
                }
            yref[static_cast<std::size_t>(((s * O + o) * H + i) * W + j)] = acc;
          }
    // Max error over the scale of the values, for Winograd and for the GEMM path: Winograd's
    // transforms add a few roundings of the largest terms, not more.
    auto rel = [](const float* got, const std::vector<double>& ref) {
      double err = 0, scale = 0;
      for (std::size_t q = 0; q < ref.size(); ++q) {
        err = std::max(err, std::abs(double(got[q]) - ref[q]));
        scale = std::max(scale, std::abs(ref[q]));
      }
      return err / scale;
    };
    const double ey = rel(y.data(), yref), edx = rel(dx.data(), dxref),
                 edw = rel(dw.data(), dwref);
    const double ey2 = rel(y2.data(), yref), edx2 = rel(dx2.data(), dxref),
                 edw2 = rel(dw2.data(), dwref);
    CAPTURE(ey, edx, edw, ey2, edx2, edw2);
    CHECK(ey < 2e-6);
    CHECK(edx < 2e-6);
    CHECK(edw < 2e-6);
    CHECK(ey2 < 2e-6);
    CHECK(edx2 < 2e-6);
    CHECK(edw2 < 2e-6);
  }
}
