// Buffers in nn::Parameters (add_buffer: saved and loaded, never trained): the flat layout puts
// every trainable tensor before every buffer; SGD, Adam and AdamW (with weight decay), gradient
// clipping and EMA averaging leave buffers alone (EMA copies them); checkpoints carry them under
// their names; BatchNorm2d registers its running statistics as buffers.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/layers/batchnorm.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/train/clip.hpp>
#include <flowdiff/train/ema.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <string>
#include <vector>

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;

namespace {

// "w" [5], buffer "stat" [3], "b" [2]: registered interleaved, as a layer would.
struct Store {
  nn::Parameters<double> ps;
  fd::index_t w, stat, b;
  Store() {
    w = ps.add("w", fd::Shape{5});
    stat = ps.add_buffer("stat", fd::Shape{3});
    b = ps.add("b", fd::Shape{2});
    ps.allocate();
    fill(0.5);
  }
  void fill(double grad) {
    for (fd::index_t id : {w, stat, b}) {
      auto p = ps.param(id);
      auto g = ps.grad(id);
      for (fd::index_t i = 0; i < p.numel(); ++i) {
        p.data()[i] = 1.0 + 0.25 * static_cast<double>(i) + static_cast<double>(id);
        g.data()[i] = grad * (1.0 + static_cast<double>(i));  // a buffer slot set on purpose
      }
    }
  }
  std::vector<double> values(fd::index_t id) const {
    auto p = ps.param(id);
    return std::vector<double>(p.data(), p.data() + p.numel());
  }
};

template <class Opt>
void check_optimizer_skips_buffers(Opt opt) {
  Store s;
  const auto stat0 = s.values(s.stat), w0 = s.values(s.w);
  for (int i = 0; i < 3; ++i) opt.step(s.ps);
  CHECK(s.values(s.stat) == stat0);  // bit for bit
  CHECK(s.values(s.w) != w0);        // the trainable ones did move
}

}  // namespace

TEST_CASE("buffers follow the trainable tensors in the flat layout", "[nn][buffers]") {
  Store s;
  CHECK_FALSE(s.ps.is_buffer(s.w));
  CHECK(s.ps.is_buffer(s.stat));
  CHECK_FALSE(s.ps.is_buffer(s.b));
  const auto a = nn::Parameters<double>::alignment;
  CHECK(s.ps.info(s.w).offset == 0);
  CHECK(s.ps.info(s.b).offset == a);
  CHECK(s.ps.trainable_size() == 2 * a);
  CHECK(s.ps.info(s.stat).offset == 2 * a);
  CHECK(s.ps.flat_size() == 3 * a);
  nn::Parameters<float> empty;
  empty.add("x", fd::Shape{1});
  CHECK_THROWS_WITH(empty.trainable_size(), Catch::Contains("allocate()"));
  empty.allocate();
  CHECK(empty.trainable_size() == empty.flat_size());
  CHECK_THROWS_WITH(empty.add_buffer("y", fd::Shape{1}), Catch::Contains("add_buffer('y')"));
  nn::Parameters<float> dup;
  dup.add("x", fd::Shape{1});
  CHECK_THROWS_WITH(dup.add_buffer("x", fd::Shape{1}),
                    Catch::Contains("duplicate parameter name 'x'"));
}

TEST_CASE("optimizers with weight decay leave buffers unchanged", "[nn][buffers]") {
  check_optimizer_skips_buffers(tr::AdamW<double>({.lr = 0.1, .weight_decay = 0.5}));
  check_optimizer_skips_buffers(tr::Adam<double>({.lr = 0.1, .weight_decay = 0.5}));
  check_optimizer_skips_buffers(tr::Sgd<double>({.lr = 0.1, .momentum = 0.9, .weight_decay = 0.5}));
  check_optimizer_skips_buffers(tr::Sgd<double>({.lr = 0.1}));
}

TEST_CASE("clip_grad_norm counts and scales trainable gradients only", "[nn][buffers]") {
  Store s;
  // Trainable gradients: w = 0.5 (1..5), b = 0.5 (1, 2); the buffer's slot holds 0.5 (1..3).
  double sq = 0;
  for (int i = 1; i <= 5; ++i) sq += 0.25 * i * i;
  for (int i = 1; i <= 2; ++i) sq += 0.25 * i * i;
  const double norm = tr::clip_grad_norm(s.ps, 0.1);
  CHECK(norm == Approx(std::sqrt(sq)).epsilon(1e-14));
  auto gs = s.ps.grad(s.stat);
  for (fd::index_t i = 0; i < gs.numel(); ++i) CHECK(gs.data()[i] == 0.5 * (1.0 + i));
  CHECK(s.ps.grad(s.w).data()[0] == Approx(0.5 * 0.1 / (std::sqrt(sq) + 1e-6)).epsilon(1e-12));
}

TEST_CASE("EMA averages trainable tensors and copies buffers", "[nn][buffers]") {
  Store s;
  tr::Ema<double> ema(s.ps, {.decay = 0.5, .warmup = false});
  const double w0 = s.ps.param(s.w).data()[0];
  s.ps.param(s.w).data()[0] = w0 + 2.0;
  s.ps.param(s.stat).data()[0] = 42.0;
  ema.update(s.ps);
  const auto& iw = s.ps.info(s.w);
  const auto& is = s.ps.info(s.stat);
  CHECK(ema.flat().data()[iw.offset] == w0 + 1.0);  // 0.5 w0 + 0.5 (w0 + 2)
  CHECK(ema.flat().data()[is.offset] == 42.0);      // copied, not averaged
}

TEST_CASE("checkpoints save and load buffers by name", "[nn][buffers]") {
  Store s;
  const auto dir = std::filesystem::temp_directory_path() / "flowdiff_test_buffers";
  std::filesystem::create_directories(dir);
  const auto path = dir / "params.safetensors";
  nn::save_parameters(s.ps, path);
  Store t;
  t.ps.param(t.stat).data()[1] = -7.0;
  nn::load_parameters(t.ps, path);
  CHECK(t.values(t.stat) == s.values(s.stat));
  const auto file = nn::load_tensors(path);
  CHECK_NOTHROW(nn::load_checked<double>(file, "stat", fd::Shape{3}));
  std::filesystem::remove_all(dir);
}

TEST_CASE("BatchNorm2d registers its running statistics as buffers", "[nn][buffers]") {
  nn::Parameters<float> ps;
  nn::BatchNorm2d<float> bn(ps, "bn", 4);
  ps.allocate();
  CHECK(ps.is_buffer(bn.running_mean_id()));
  CHECK(ps.is_buffer(bn.running_var_id()));
  CHECK_FALSE(ps.is_buffer(ps.find("bn.weight")));
  CHECK(ps.info(bn.running_mean_id()).offset >= ps.trainable_size());
}
