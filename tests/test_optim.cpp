// train/: SGD / Adam / AdamW and clip_grad_norm against PyTorch (tests/fixtures/optim.safetensors
// from tools/fixtures/optim.py), bit-for-bit resume through saved optimizer state, schedules, EMA;
// nn/checkpoint.hpp: parameter save/load and its errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <numbers>
#include <string>
#include <vector>

#include <flowdiff/io/safetensors.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/train/clip.hpp>
#include <flowdiff/train/ema.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <flowdiff/train/schedule.hpp>

#include "support/files.hpp"

namespace fd = flowdiff;
namespace tr = flowdiff::train;
using Catch::Matchers::Contains;

namespace {

const fd::io::SafetensorsFile& optim_fixture() {
  static const auto f =
      fd::io::SafetensorsFile::read(flowdiff::test::fixture_path("optim.safetensors"));
  return f;
}

template <class T>
fd::nn::Parameters<T> make_params() {
  fd::nn::Parameters<T> ps;
  ps.add("net.0.weight", {3, 5});
  ps.add("net.0.bias", {3});
  ps.add("net.2.weight", {2, 3, 4});
  ps.allocate();
  return ps;
}

template <class T>
std::string tag() {
  return std::is_same_v<T, float> ? "f32" : "f64";
}

/// DESIGN §4 element-wise rule: |a - b| <= atol + rtol |ref|; fp32 1e-6 / 1e-5, fp64 1e-12.
template <class T>
void check_close(fd::View<const T> got, const fd::Tensor<T>& ref, const std::string& what) {
  const double atol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
  const double rtol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  REQUIRE(got.numel() == ref.numel());
  double worst = 0;
  for (fd::index_t i = 0; i < got.numel(); ++i) {
    REQUIRE(std::isfinite(double(got[i])));
    const double err = std::fabs(double(got[i]) - double(ref[i])) / (atol + rtol * std::fabs(double(ref[i])));
    worst = std::max(worst, err);
  }
  INFO(what << ": worst |a-b| / (atol + rtol |ref|) = " << worst);
  CHECK(worst <= 1.0);
}

template <class T>
void set_grads(fd::nn::Parameters<T>& ps, int k) {
  for (fd::index_t id = 0; id < ps.count(); ++id)
    fd::nn::load_into(optim_fixture(), tag<T>() + ".grad" + std::to_string(k) + "." + ps.info(id).name, ps.grad(id));
}

template <class T, class Opt>
void check_parity(const std::string& name, Opt opt) {
  auto ps = make_params<T>();
  fd::nn::load_parameters(ps, optim_fixture(), {.strict = true, .prefix = tag<T>() + ".init."});
  const auto init = ps.flat_params();
  std::vector<T> start(init.data(), init.data() + init.numel());
  for (int k = 1; k <= 5; ++k) {
    set_grads(ps, k);
    opt.step(ps);
    for (fd::index_t id = 0; id < ps.count(); ++id) {
      const std::string key = tag<T>() + "." + name + ".step" + std::to_string(k) + "." + ps.info(id).name;
      check_close<T>(ps.param(id), optim_fixture().tensor<T>(key), key);
    }
  }
  // Not trivially equal to the start; padding untouched.
  double moved = 0;
  for (fd::index_t i = 0; i < init.numel(); ++i) moved = std::max(moved, std::fabs(double(ps.flat_params()[i] - start[std::size_t(i)])));
  CHECK(moved > 1e-3);
  const auto& last = ps.entries().back();
  for (fd::index_t i = last.offset + last.numel(); i < ps.flat_size(); ++i) CHECK(ps.flat_params()[i] == T(0));
  CHECK(opt.steps() == 5);
}

template <class T>
void parity_all() {
  check_parity<T>("sgd", tr::Sgd<T>({.lr = 0.1}));
  check_parity<T>("sgd_momentum", tr::Sgd<T>({.lr = 0.05, .momentum = 0.9, .dampening = 0.1, .weight_decay = 0.01}));
  check_parity<T>("sgd_nesterov", tr::Sgd<T>({.lr = 0.05, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true}));
  check_parity<T>("adam", tr::Adam<T>({.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01}));
  check_parity<T>("adamw", tr::AdamW<T>({.lr = 1e-2, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.1}));
}

template <class T>
void clip_parity() {
  for (const char* max_norm : {"0.5", "100"}) {
    auto ps = make_params<T>();
    for (fd::index_t id = 0; id < ps.count(); ++id)
      fd::nn::load_into(optim_fixture(), tag<T>() + ".clip.grad." + ps.info(id).name, ps.grad(id));
    const T norm = tr::clip_grad_norm(ps, std::stod(max_norm));
    const auto ref = optim_fixture().tensor<T>(tag<T>() + ".clip" + max_norm + ".norm");
    const T ref_norm = ref[0];
    CHECK(ref_norm > T(1));
    const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
    CHECK(std::fabs(double(norm - ref_norm)) <= tol * (1 + double(ref_norm)));
    for (fd::index_t id = 0; id < ps.count(); ++id) {
      const std::string key = tag<T>() + ".clip" + max_norm + ".grad." + ps.info(id).name;
      check_close<T>(ps.grad(id), optim_fixture().tensor<T>(key), key);
    }
    if (std::string(max_norm) == "0.5")
      CHECK(std::sqrt(double(fd::sum_squares(ps.flat_grads()))) == Approx(0.5).epsilon(1e-5));
  }
}

}  // namespace

TEST_CASE("optimizers match torch.optim step by step (float64)", "[train][optim]") { parity_all<double>(); }
TEST_CASE("optimizers match torch.optim step by step (float32)", "[train][optim]") { parity_all<float>(); }

TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_", "[train][clip]") {
  clip_parity<double>();
  clip_parity<float>();
  auto ps = make_params<float>();
  ps.grad(0)[0] = NAN;
  CHECK_THROWS_AS(tr::clip_grad_norm(ps, 1.0), fd::numeric_error);
  CHECK(std::isnan(tr::clip_grad_norm(ps, 1.0, /*error_if_nonfinite=*/false)));
  CHECK_THROWS_AS(tr::clip_grad_norm(ps, 0.0), fd::config_error);
}

namespace {

/// Runs `steps` steps from fixture step `first`; returns the flat parameters.
template <class Opt>
void run_steps(fd::nn::Parameters<double>& ps, Opt& opt, int first, int steps, tr::Ema<double>* ema) {
  for (int k = first; k < first + steps; ++k) {
    set_grads(ps, k);
    opt.step(ps);
    if (ema) ema->update(ps);
  }
}

template <class Opt>
void check_resume(const std::function<Opt()>& make) {
  const auto dir = std::filesystem::temp_directory_path() / "flowdiff_test_optim";
  const auto path = dir / "state.safetensors";
  // Uninterrupted: 5 steps.
  auto a = make_params<double>();
  fd::nn::load_parameters(a, optim_fixture(), {.prefix = "f64.init."});
  Opt opt_a = make();
  tr::Ema<double> ema_a(a, {.decay = 0.9});
  run_steps(a, opt_a, 1, 3, &ema_a);
  // Checkpoint after 3 steps: parameters, optimizer state, EMA.
  fd::io::SafetensorsWriter w;
  fd::nn::add_parameters(w, a, "model.");
  opt_a.save_state(w, a);
  ema_a.save_state(w, a);
  w.write(path);
  run_steps(a, opt_a, 4, 2, &ema_a);

  // Resumed: fresh objects loaded from the file.
  auto b = make_params<double>();
  const auto file = fd::io::SafetensorsFile::read(path);
  fd::nn::load_parameters(b, file, {.strict = false, .prefix = "model."});
  Opt opt_b = make();
  opt_b.load_state(file, b);
  tr::Ema<double> ema_b(b, {.decay = 0.9});
  ema_b.load_state(file, b);
  CHECK(opt_b.steps() == 3);
  CHECK(ema_b.updates() == 3);
  run_steps(b, opt_b, 4, 2, &ema_b);
  CHECK(std::memcmp(a.flat_params().data(), b.flat_params().data(), sizeof(double) * std::size_t(a.flat_size())) == 0);
  CHECK(std::memcmp(ema_a.flat().data(), ema_b.flat().data(), sizeof(double) * std::size_t(a.flat_size())) == 0);
  std::filesystem::remove_all(dir);
}

}  // namespace

TEST_CASE("a run resumed from saved optimizer and EMA state continues bit for bit", "[train][optim]") {
  check_resume<tr::Adam<double>>([] { return tr::Adam<double>({.lr = 1e-2, .weight_decay = 0.01}); });
  check_resume<tr::AdamW<double>>([] { return tr::AdamW<double>({.lr = 1e-2}); });
  check_resume<tr::Sgd<double>>([] { return tr::Sgd<double>({.lr = 0.05, .momentum = 0.9, .nesterov = true}); });
  check_resume<tr::Sgd<double>>([] { return tr::Sgd<double>({.lr = 0.05}); });
}

TEST_CASE("optimizer state errors are clear", "[train][optim]") {
  CHECK_THROWS_WITH(tr::Adam<float>({.beta1 = 1.0}), Contains("beta1 must lie in [0, 1), got 1"));
  CHECK_THROWS_WITH(tr::Sgd<float>({.lr = -1}), Contains("lr must lie in"));
  CHECK_THROWS_WITH(tr::Sgd<float>({.momentum = 0, .nesterov = true}), Contains("nesterov"));
  auto ps = make_params<float>();
  tr::Adam<float> opt;
  opt.step(ps);
  fd::nn::Parameters<float> other;
  other.add("x", {100});
  other.allocate();
  CHECK_THROWS_WITH(opt.step(other), Contains("one optimizer per parameter set"));
  fd::io::SafetensorsWriter w;
  opt.save_state(w, ps);
  const auto f = fd::io::SafetensorsFile::parse(w.bytes(), "opt.safetensors");
  CHECK(f.contains("optimizer.exp_avg.net.0.weight"));
  CHECK(f.contains("optimizer.exp_avg_sq.net.2.weight"));
  tr::Adam<float> opt2;
  CHECK_THROWS_WITH(opt2.load_state(f, other), Contains("no tensor named 'optimizer.exp_avg.x'"));
  CHECK(opt2.steps() == 0);  // a failed load changes nothing
}

TEST_CASE("learning-rate schedules", "[train][schedule]") {
  CHECK(tr::linear_warmup(0, 1.0, 4) == 0.25);
  CHECK(tr::linear_warmup(3, 1.0, 4) == 1.0);
  CHECK(tr::linear_warmup(10, 1.0, 4) == 1.0);
  CHECK(tr::linear_warmup(0, 1.0, 0) == 1.0);
  CHECK(tr::cosine_decay(0, 1.0, 10, 0.1) == Approx(1.0));
  CHECK(tr::cosine_decay(5, 1.0, 10, 0.1) == Approx(0.55));
  CHECK(tr::cosine_decay(10, 1.0, 10, 0.1) == Approx(0.1));
  CHECK(tr::cosine_decay(20, 1.0, 10, 0.1) == Approx(0.1));
  CHECK(tr::cosine_decay(3, 2.0, 12) == Approx(1.0 + std::cos(std::numbers::pi / 4)));
  const tr::WarmupCosine s{.base_lr = 1e-3, .warmup_steps = 10, .total_steps = 110, .min_lr = 1e-5};
  CHECK(s(0) == Approx(1e-4));
  CHECK(s(9) == Approx(1e-3));
  CHECK(s(10) == Approx(1e-3));
  CHECK(s(60) == Approx(1e-5 + (1e-3 - 1e-5) * 0.5));
  CHECK(s(110) == Approx(1e-5));
  for (std::int64_t k = 11; k < 120; ++k) CHECK(s(k) <= s(k - 1));
  CHECK_THROWS_AS(tr::warmup_cosine(0, 1.0, 10, 10), fd::config_error);
  CHECK_THROWS_AS(tr::linear_warmup(-1, 1.0, 10), fd::config_error);
  tr::Adam<float> opt;
  opt.set_lr(s(0));
  CHECK(opt.lr() == Approx(1e-4));
}

TEST_CASE("EMA with warmup; copy_to and swap", "[train][ema]") {
  fd::nn::Parameters<double> ps;
  const auto id = ps.add("w", {2});
  ps.allocate();
  ps.param(id)[0] = 1.0;
  ps.param(id)[1] = -2.0;
  tr::Ema<double> ema(ps, {.decay = 0.99});
  CHECK(ema.next_decay() == Approx(2.0 / 11.0));
  ps.param(id)[0] = 3.0;
  ema.update(ps);  // 1 - (1 - 2/11)(1 - 3) ... shadow = 1 - (9/11)(1 - 3)
  CHECK(ema.flat()[0] == Approx(1.0 + (9.0 / 11.0) * 2.0));
  CHECK(ema.flat()[1] == -2.0);
  CHECK(ema.next_decay() == Approx(3.0 / 12.0));
  for (int k = 0; k < 2000; ++k) ema.update(ps);
  CHECK(ema.next_decay() == 0.99);
  CHECK(ema.flat()[0] == Approx(3.0));
  tr::Ema<double> plain(ps, {.decay = 0.5, .warmup = false});
  CHECK(plain.next_decay() == 0.5);

  ps.param(id)[0] = 7.0;
  ema.swap(ps);
  CHECK(ps.param(id)[0] == Approx(3.0));
  CHECK(ema.flat()[0] == 7.0);
  ema.swap(ps);
  CHECK(ps.param(id)[0] == 7.0);
  ema.copy_to(ps);
  CHECK(ps.param(id)[0] == Approx(3.0));
}

TEST_CASE("save_parameters / load_parameters round trip and report errors", "[nn][checkpoint]") {
  const auto dir = std::filesystem::temp_directory_path() / "flowdiff_test_checkpoint";
  std::filesystem::remove_all(dir);
  auto ps = make_params<double>();
  for (fd::index_t i = 0; i < ps.flat_size(); ++i) ps.flat_params()[i] = 0.1 * double(i) - 1.0 / 3.0;
  ps.param(0)[0] = 1e300;
  fd::nn::save_parameters(ps, dir / "p64.safetensors", {{"epoch", "3"}});
  const auto f = fd::nn::load_tensors(dir / "p64.safetensors");
  CHECK(f.dtype("net.0.weight") == fd::io::DType::F64);
  CHECK(f.metadata().at("epoch") == "3");
  CHECK(f.names().size() == 3);

  auto back = make_params<double>();
  const auto report = fd::nn::load_parameters(back, dir / "p64.safetensors");
  CHECK(report.missing.empty());
  for (fd::index_t id = 0; id < ps.count(); ++id)  // padding is not saved, so compare tensor by tensor
    CHECK(back.param(id).span().size() == ps.param(id).span().size());
  for (fd::index_t id = 0; id < ps.count(); ++id)
    CHECK(std::memcmp(back.param(id).data(), ps.param(id).data(), sizeof(double) * std::size_t(ps.param(id).numel())) == 0);

  // F64 -> float: 1e300 does not fit, and the failed load leaves the parameters unchanged.
  auto pf = make_params<float>();
  pf.param(1)[0] = 5.0f;
  CHECK_THROWS_WITH(fd::nn::load_parameters(pf, dir / "p64.safetensors"), Contains("'net.0.weight'") && Contains("1e+300"));
  CHECK(pf.param(1)[0] == 5.0f);
  ps.param(0)[0] = 0.25;
  fd::nn::save_parameters(ps, dir / "p64.safetensors");
  fd::nn::load_parameters(pf, dir / "p64.safetensors");
  CHECK(pf.param(0)[0] == 0.25f);
  CHECK(pf.param(2)[3] == static_cast<float>(ps.param(2)[3]));

  // Shape mismatch: shape_error naming the tensor and both shapes.
  fd::nn::Parameters<float> wrong;
  wrong.add("net.0.weight", {5, 3});
  wrong.add("net.0.bias", {3});
  wrong.add("net.2.weight", {2, 3, 4});
  wrong.allocate();
  CHECK_THROWS_AS(fd::nn::load_parameters(wrong, dir / "p64.safetensors"), fd::shape_error);
  CHECK_THROWS_WITH(fd::nn::load_parameters(wrong, dir / "p64.safetensors"),
                    Contains("tensor 'net.0.weight' has shape [3, 5] in the file but [5, 3] is expected"));

  // Missing and extra tensors.
  fd::nn::Parameters<float> more;
  more.add("net.0.weight", {3, 5});
  more.add("net.4.weight", {2});
  more.allocate();
  CHECK_THROWS_WITH(fd::nn::load_parameters(more, dir / "p64.safetensors"),
                    Contains("1 parameter is missing from the file: 'net.4.weight'"));
  CHECK_THROWS_WITH(fd::nn::load_parameters(more, dir / "p64.safetensors", {.allow_missing = true}),
                    Contains("2 tensors in the file match no parameter: 'net.0.bias', 'net.2.weight'"));
  const auto r = fd::nn::load_parameters(more, dir / "p64.safetensors", {.strict = false, .allow_missing = true});
  CHECK(r.missing == std::vector<std::string>{"net.4.weight"});
  CHECK(r.unexpected == std::vector<std::string>{"net.0.bias", "net.2.weight"});
  CHECK(more.param(0)[0] == 0.25f);

  // A PyTorch-written file (F32) loads into double parameters exactly.
  auto pd = make_params<double>();
  fd::nn::load_parameters(pd, optim_fixture(), {.prefix = "f32.init."});
  CHECK(pd.param(1)[2] == double(optim_fixture().tensor<float>("f32.init.net.0.bias")[2]));

  // save_tensors / load_tensors.
  const auto t = fd::Tensor<float>::from({2}, {1.0f, 2.0f});
  fd::nn::save_tensors<float>(dir / "t.safetensors", {{"a", t.view()}}, {{"k", "v"}});
  CHECK(fd::nn::load_tensors(dir / "t.safetensors").tensor<float>("a")[1] == 2.0f);
  std::filesystem::remove_all(dir);
}
