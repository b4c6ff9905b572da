// The backend-generic MLP path with B = Cpu: nn::BackendMLP (nn/models/mlp_backend.hpp) against
// nn::MLP and train::BackendTrainer (train/backend_trainer.hpp) against train::Trainer, bit for
// bit (the same gemm calls, the same element operations in the same order, the same generator
// counters); the host-device SiLU of nn/layers/kernels.hpp against fast_math's on a dense grid;
// optimizers, EMA and clipping through the generic code; parameter transfer and its errors; the
// device choice; sampling through nn::as_field(BackendMLP) (plain, conditional, cfg; Euler, Heun,
// Euler–Maruyama) against as_field(nn::MLP); BackendTrainer's checkpoints (interrupted + resumed
// equals straight, byte-equal to Trainer's files, loadable either way). tests/cuda/test_cuda_mlp.cu
// runs the same bodies (tests/support/backend_mlp_checks.hpp) with B = Cuda.
#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/core/fast_math.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/checkpoint.hpp>
#include <flowdiff/nn/layers/activation.hpp>
#include <flowdiff/nn/layers/kernels.hpp>
#include <flowdiff/nn/models/mlp_backend.hpp>
#include <flowdiff/nn/transfer.hpp>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support/backend_mlp_checks.hpp"
#include "support/compare.hpp"
#include "support/files.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using Catch::Matchers::Contains;

namespace {

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return false;
  return true;
}

template <class T>
bool finite_and_nonzero(const std::vector<T>& v) {
  bool nonzero = false;
  for (T x : v) {
    if (!std::isfinite(x)) return false;
    nonzero = nonzero || x != T(0);
  }
  return nonzero;
}

}  // namespace

TEST_CASE("backend kernels: SiLU and its sigmoid are fast_math's, bit for bit", "[nn][backend]") {
  // Every 101st float of [-100, 100] (about 20 million values), plus the special values.
  std::int64_t checked = 0, differ = 0;
  auto check = [&](float x) {
    const float g = 1.3f;
    const float s0 = fd::fast_sigmoid(x), s1 = fd::nn::kernels::sigmoid(x);
    const float f0 = nn::detail::silu_fwd(x), f1 = nn::kernels::silu(x);
    const float b0 = nn::detail::silu_bwd(x, g), b1 = nn::kernels::silu_grad(x, g);
    ++checked;
    if (std::bit_cast<std::uint32_t>(s0) != std::bit_cast<std::uint32_t>(s1) ||
        std::bit_cast<std::uint32_t>(f0) != std::bit_cast<std::uint32_t>(f1) ||
        std::bit_cast<std::uint32_t>(b0) != std::bit_cast<std::uint32_t>(b1))
      ++differ;
  };
  for (std::uint32_t u = 0; u <= std::bit_cast<std::uint32_t>(100.0f); u += 101) {
    check(std::bit_cast<float>(u));
    check(-std::bit_cast<float>(u));
  }
  for (float x : {0.0f, -0.0f, 88.5f, -87.5f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()})
    check(x);
  CHECK(checked > 20'000'000);
  CHECK(differ == 0);
  CHECK(std::isnan(nn::kernels::silu(std::numeric_limits<float>::quiet_NaN())));
  // double: std::exp on both sides.
  for (double x : {-30.0, -1.5, 0.0, 0.25, 7.0})
    CHECK(nn::kernels::silu_grad(x, 0.7) == nn::detail::silu_bwd(x, 0.7));
}

TEST_CASE("BackendMLP<Cpu> reproduces nn::MLP bit for bit: output, dx, parameter gradients",
          "[nn][backend]") {
  for (const auto& c : fd::test::mlp_cases()) {
    INFO(c.name);
    const auto ref = fd::test::mlp_reference<float>(c);
    const auto got = fd::test::mlp_on_backend<float, fd::Cpu>(c);
    REQUIRE(finite_and_nonzero(ref.out));
    REQUIRE(finite_and_nonzero(ref.grads));
    CHECK(same_bits(got.out, ref.out));
    CHECK(same_bits(got.grads, ref.grads));
    if (c.dx) {
      REQUIRE(finite_and_nonzero(ref.dx));
      CHECK(same_bits(got.dx, ref.dx));
    }
    CHECK(same_bits(got.params, ref.params));  // upload + download is the identity
  }
  // double as well (std::exp sigmoid on both sides).
  const auto c = fd::test::mlp_cases()[1];
  const auto ref = fd::test::mlp_reference<double>(c);
  const auto got = fd::test::mlp_on_backend<double, fd::Cpu>(c);
  CHECK(same_bits(got.out, ref.out));
  CHECK(same_bits(got.grads, ref.grads));
  CHECK(same_bits(got.dx, ref.dx));
}

TEST_CASE("BackendTrainer<Cpu> reproduces train::Trainer bit for bit", "[nn][backend][train]") {
  for (const auto& c : fd::test::train_cases()) {
    INFO(c.name);
    const auto ref = fd::test::train_reference<float>(c);
    const auto got = fd::test::train_on_backend<float, fd::Cpu>(c);
    REQUIRE(ref.losses.size() == static_cast<std::size_t>(c.steps));
    REQUIRE(finite_and_nonzero(ref.params));
    CHECK(got.losses == ref.losses);
    CHECK(got.norms == ref.norms);
    CHECK(same_bits(got.params, ref.params));
    CHECK(same_bits(got.ema, ref.ema));
    CHECK(got.offset == ref.offset);
    if (c.grad_clip > 0) CHECK(ref.norms.back() > c.grad_clip);  // the clipping was active
  }
}

TEST_CASE("as_field(BackendMLP<Cpu>) samples bit for bit as as_field(nn::MLP)",
          "[nn][backend][as_field][cfg]") {
  for (const auto& c : fd::test::sample_cases()) {
    INFO(c.name);
    const auto ref = fd::test::sample_reference<float>(c);
    const auto got = fd::test::sample_on_backend<float, fd::Cpu>(c);
    REQUIRE(finite_and_nonzero(ref.x));
    CHECK(!same_bits(ref.x, ref.x0));  // the samples moved
    CHECK(same_bits(got.x, ref.x));
    CHECK(got.offset == ref.offset);
    if (c.stepper == fd::test::SampleStepper::euler_maruyama)
      CHECK(ref.offset > 0);  // the noise was drawn
  }
  const auto c = fd::test::sample_cases()[5];  // cfg w = 3, Heun, in double
  CHECK(same_bits(fd::test::sample_on_backend<double, fd::Cpu>(c).x,
                  fd::test::sample_reference<double>(c).x));
}

TEST_CASE("as_field(BackendMLP): a backend field; nothing is reallocated while N repeats",
          "[nn][backend][as_field]") {
  nn::Parameters<float> ps;
  nn::BackendMLP<float, fd::Cpu> mlp(
      ps, {.dim = 2, .width = 8, .depth = 2, .time_dim = 4, .num_classes = 3});
  ps.allocate();
  fd::Generator gen(4);
  mlp.init(ps, gen);
  auto field = nn::as_field(mlp, ps);
  using Field = decltype(field);
  static_assert(std::is_same_v<Field::backend, fd::Cpu>);
  static_assert(std::is_same_v<nn::model_backend_t<nn::MLP<float>>, fd::Cpu>);
  static_assert(fd::Field<Field, float> && fd::ConditionalField<Field, float>);
  CHECK(field.num_classes() == 3);
  auto x = fd::randn<float>({6, 2}, gen);
  fd::Tensor<float> out({6, 2});
  field(x.view(), out.view(), 0.25f);
  const float* h0 = field.cache().h0.data();
  const float* a0 = field.cache().act[0].data();
  fd::integrate(fd::Heun{}, field, x, fd::uniform_grid<float>(3));
  CHECK(field.cache().h0.data() == h0);  // the same buffers at the same N
  CHECK(field.cache().act[0].data() == a0);
  // The labels are checked by the model (a count, as on a device).
  const auto bad = fd::test::make_labels({0, 1, 2, 3, 4, 5});
  CHECK_THROWS_WITH(field(x.view(), out.view(), 0.5f, bad.view()),
                    Contains("2 of the 6 labels") && Contains("[0, 3]"));
  const auto short_y = fd::test::make_labels({0, 1});
  CHECK_THROWS_AS(field(x.view(), out.view(), 0.5f, short_y.view()), fd::shape_error);
}

TEST_CASE("optimizers, EMA and clipping through the generic path", "[nn][backend][train]") {
  const auto r = fd::test::optim_on_backend<float, fd::Cpu>();
  // Recompute the clip by hand: norm of the trainable gradients, scaled by 0.5 / (norm + 1e-6).
  nn::Parameters<float> ps;
  ps.add("a", fd::Shape{37, 5});
  ps.add("b", fd::Shape{3});
  ps.add_buffer("stats", fd::Shape{4});
  ps.allocate();
  fd::Generator gen(5);
  const fd::index_t nt = ps.trainable_size();
  fd::fill_normal(ps.flat_params().rows(0, nt), gen);
  fd::fill_normal(ps.flat_grads().rows(0, nt), gen);
  double sq = 0;
  for (fd::index_t i = 0; i < nt; ++i) sq += double(ps.flat_grads()[i]) * ps.flat_grads()[i];
  CHECK(r.norm == Approx(std::sqrt(sq)).epsilon(1e-6));
  const float coef = 0.5f / (static_cast<float>(r.norm) + 1e-6f);
  for (fd::index_t i = 0; i < nt; ++i) CHECK(r.clipped[std::size_t(i)] == coef * ps.flat_grads()[i]);
  for (const auto* v : {&r.sgd, &r.adam, &r.adamw, &r.ema, &r.swapped}) {
    REQUIRE(finite_and_nonzero(*v));
    // The buffer "stats" (3 everywhere) is never trained nor averaged.
    const auto off = static_cast<std::size_t>(ps.info(2).offset);
    for (std::size_t j = 0; j < 4; ++j) CHECK((*v)[off + j] == 3.0f);
  }
  // After the swap the parameters hold the average.
  CHECK(same_bits(r.swapped, r.ema));
}

TEST_CASE("parameters move between the host and a backend by layout; a checkpoint loads",
          "[nn][backend]") {
  const nn::MLPConfig cfg{.dim = 2, .width = 8, .depth = 2, .time_dim = 4, .num_classes = 2};
  nn::Parameters<float> host;
  nn::MLP<float> mlp(host, cfg);
  host.allocate();
  fd::Generator gen(3);
  mlp.init(host, gen);
  // A checkpoint written on the CPU, loaded into host memory, then onto the backend.
  fd::test::TempDir dir("nn_backend_ckpt");
  nn::save_parameters(host, dir / "mlp.safetensors");
  nn::Parameters<float> loaded;
  nn::MLP<float> mlp2(loaded, cfg);
  loaded.allocate();
  nn::load_parameters(loaded, dir / "mlp.safetensors");
  nn::Parameters<float, fd::Cpu> dev;
  nn::BackendMLP<float, fd::Cpu> bmlp(dev, cfg);
  dev.allocate();
  nn::upload_parameters(dev, loaded);
  for (fd::index_t i = 0; i < host.count(); ++i) {
    CHECK(dev.info(i).name == host.info(i).name);
    CHECK(dev.info(i).offset == host.info(i).offset);
  }
  CHECK(same_bits(fd::test::host_copy<float, fd::Cpu>(dev.flat_params()),
                  fd::test::host_copy<float, fd::Cpu>(host.flat_params())));
  // Another configuration: the layouts differ, and the message says where.
  nn::Parameters<float> other;
  nn::MLP<float> wide(other, {.dim = 2, .width = 9, .depth = 2, .time_dim = 4, .num_classes = 2});
  other.allocate();
  CHECK_THROWS_WITH(nn::upload_parameters(dev, other),
                    Contains("upload_parameters") && Contains("net.0.weight") &&
                        Contains("[8, 6]") && Contains("[9, 6]"));
  nn::Parameters<float> unconditional;
  nn::MLP<float> u(unconditional, {.dim = 2, .width = 8, .depth = 2, .time_dim = 4});
  unconditional.allocate();
  CHECK_THROWS_WITH(nn::download_parameters(unconditional, dev),
                    Contains("download_parameters") && Contains("tensors"));
}

TEST_CASE("BackendMLP: argument errors name what is wrong", "[nn][backend]") {
  nn::Parameters<float> ps;
  nn::BackendMLP<float, fd::Cpu> mlp(ps, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4,
                                          .num_classes = 3});
  ps.allocate();
  typename nn::BackendMLP<float, fd::Cpu>::Cache cache;
  fd::Tensor<float> x({5, 2}), t({5}), out({5, 2});
  fd::fill(x, 0.5f);
  fd::fill(t, 0.5f);
  auto y = fd::test::make_labels({0, 1, 2, 3, 4});
  CHECK_THROWS_WITH(mlp.backward(ps, out.view(), {}, cache), Contains("forward() call first"));
  CHECK_THROWS_AS(mlp.forward(ps, x.view(), t.view(), y.view(), out.view(), cache),
                  fd::config_error);
  CHECK_THROWS_WITH(mlp.forward(ps, x.view(), t.view(), y.view(), out.view(), cache),
                    Contains("1 of the 5 labels") && Contains("[0, 3]"));
  fd::Tensor<float> x3({5, 3});
  CHECK_THROWS_WITH(mlp.forward(ps, x3.view(), t.view(), {}, out.view(), cache),
                    Contains("BackendMLP: x: expected shape [N, 2]") && Contains("[5, 3]"));
  fd::Tensor<float> t4({4});
  CHECK_THROWS_WITH(mlp.forward(ps, x.view(), t4.view(), {}, out.view(), cache),
                    Contains("t: expected shape [5]"));
}

TEST_CASE("device choice: parse, and fall back to the CPU with one line", "[backend]") {
  CHECK(fd::parse_device("cpu") == fd::Device::cpu);
  CHECK(fd::parse_device("CUDA") == fd::Device::cuda);
  CHECK_THROWS_WITH(fd::parse_device("tpu"), Contains("unknown device 'tpu'") && Contains("cpu or cuda"));
  std::ostringstream log;
  CHECK(fd::resolve_device(fd::Device::cpu, 0, "", log) == fd::Device::cpu);
  CHECK(fd::resolve_device(fd::Device::cuda, 2, "", log) == fd::Device::cuda);
  CHECK(log.str().empty());
  CHECK(fd::resolve_device(fd::Device::cuda, 0, "no driver", log) == fd::Device::cpu);
  CHECK_THAT(log.str(), Contains("no driver") && Contains("running on the CPU"));
  const std::string line = log.str();
  CHECK(std::count(line.begin(), line.end(), '\n') == 1);
}

TEST_CASE("BackendTrainer<Cpu> checkpoints: resume bit for bit; Trainer's file format",
          "[nn][backend][train][checkpoint]") {
  const auto r = fd::test::checkpoint_runs<float, fd::Cpu>();
  const auto& s = r.straight;
  REQUIRE(s.losses.size() == 10);
  REQUIRE(finite_and_nonzero(s.params));
  REQUIRE(r.straight_file.size() > 1000);  // a real file (the comparisons below use its bytes)
  REQUIRE(r.cpu_file.size() > 1000);
  // Interrupted during step 8: the file on disk is the checkpoint of step 5.
  CHECK(r.interrupted_step == 5);
  // Resumed by a fresh model (other initial weights) and trainer: steps 6..10, the same bits.
  CHECK(r.resumed_first_step == 5);
  CHECK(r.resumed_drawn == 10);  // the source's position came back from the checkpoint
  CHECK(r.resumed.losses == std::vector<double>(s.losses.begin() + 5, s.losses.end()));
  CHECK(same_bits(r.resumed.params, s.params));
  CHECK(same_bits(r.resumed.ema, s.ema));
  CHECK(r.resumed.offset == s.offset);
  CHECK(r.resumed.norms == s.norms);
  CHECK(r.resumed_file == r.straight_file);  // parameters, EMA, optimizer, step, rng, data
  CHECK(r.resumed_csv == r.straight_csv);    // each step once, the same losses
  CHECK(std::count(r.straight_csv.begin(), r.straight_csv.end(), '\n') == 11);
  // The same file as train::Trainer's for the same run, byte for byte; each loads the other's.
  CHECK(r.cpu_file == r.straight_file);
  CHECK(same_bits(r.from_cpu.params, s.params));
  CHECK(same_bits(r.from_cpu.ema, s.ema));
  CHECK(r.from_cpu.offset == s.offset);
  CHECK(r.cpu_loaded_step == 10);
  CHECK(same_bits(r.cpu_loaded, s.params));
  // Refused with the reason.
  CHECK_THAT(r.wrong_seed, Contains("trained with seed 99") && Contains("seed 12345"));
  CHECK_THAT(r.bad_every, Contains("BackendTrainer: checkpoint_every must be >= 0"));
}

TEST_CASE("BackendTrainer<Cpu>: a non-finite loss names the untouched checkpoint; save_weights",
          "[nn][backend][train][checkpoint]") {
  fd::test::TempDir dir("nn_backend_nonfinite");
  nn::Parameters<float> host;
  const nn::MLPConfig cfg{.dim = 2, .width = 8, .depth = 1, .time_dim = 4};
  nn::MLP<float> ref(host, cfg);
  host.allocate();
  fd::Generator gen(2);
  ref.init(host, gen);
  nn::Parameters<float, fd::Cpu> ps;
  nn::BackendMLP<float, fd::Cpu> mlp(ps, cfg);
  ps.allocate();
  nn::upload_parameters(ps, host);
  std::ostringstream log;
  const fd::train::TrainerOptions o{.steps = 4,
                                    .batch = 8,
                                    .ema_decay = 0.9,
                                    .checkpoint = dir / "run.safetensors",
                                    .loss_csv = dir / "run.csv",
                                    .progress = fd::train::ProgressMode::quiet,
                                    .log = &log};
  const fd::GaussianPath path{fd::schedules::Linear{}};
  fd::train::BackendTrainer<float, fd::Cpu, fd::schedules::Linear> trainer(
      mlp, ps, fd::train::flow_matching<float>(path), fd::train::AdamW<float>(), o);
  fd::test::CountingSource<float> source;
  trainer.fit(source);
  REQUIRE(std::filesystem::exists(dir / "run.safetensors"));
  // The EMA weights as a plain state_dict, loadable into the CPU model.
  trainer.save_weights(dir / "w.safetensors");
  nn::load_parameters(host, dir / "w.safetensors");
  CHECK(same_bits(fd::test::host_copy<float, fd::Cpu>(host.flat_params()),
                  fd::test::host_copy<float, fd::Cpu>(trainer.ema()->flat())));
  // A batch with a NaN: the step stops before the update and names the good checkpoint.
  const auto before = fd::test::host_copy<float, fd::Cpu>(ps.flat_params());
  fd::Tensor<float> z({8, 2});
  fd::fill(z, std::numeric_limits<float>::quiet_NaN());
  CHECK_THROWS_WITH(trainer.step(z.view(), {}),
                    Contains("BackendTrainer: step 5: the loss is not finite") &&
                        Contains("the last good checkpoint is") && Contains("(untouched)"));
  CHECK(same_bits(fd::test::host_copy<float, fd::Cpu>(ps.flat_params()), before));
}

TEST_CASE("BackendTrainer / BackendObjective: bad arguments are named", "[nn][backend][train]") {
  nn::Parameters<float> ps;
  nn::BackendMLP<float, fd::Cpu> mlp(ps, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4});
  ps.allocate();
  const fd::GaussianPath path{fd::schedules::Linear{}};
  std::ostringstream log;
  auto options = [&] {
    return fd::train::TrainerOptions{.steps = 3, .batch = 4,
                                     .progress = fd::train::ProgressMode::quiet, .log = &log};
  };
  using Trainer = fd::train::BackendTrainer<float, fd::Cpu, fd::schedules::Linear>;
  // Every TrainerOptions field is supported now (checkpoints included); bad values are named.
  auto bad_every = options();
  bad_every.checkpoint_every = -2;
  CHECK_THROWS_WITH(
      Trainer(mlp, ps, fd::train::flow_matching<float>(path), fd::train::AdamW<float>(), bad_every),
      Contains("checkpoint_every must be >= 0, got -2"));
  // Dropout needs a conditional model; labels need one too.
  Trainer cfg(mlp, ps, fd::train::flow_matching<float>(path, 0.1), fd::train::AdamW<float>(),
              options());
  fd::Tensor<float> z({4, 2});
  fd::fill(z, 0.25f);
  CHECK_THROWS_WITH(cfg.step(z.view(), {}), Contains("cfg_dropout = 0.1") &&
                                                Contains("num_classes = 0"));
  Trainer plain(mlp, ps, fd::train::flow_matching<float>(path), fd::train::AdamW<float>(),
                options());
  const auto y = fd::test::make_labels({0, 1, 0, 1});
  CHECK_THROWS_WITH(plain.step(z.view(), y.view()), Contains("unconditional"));
  CHECK(std::isfinite(plain.step(z.view(), {})));
  CHECK(plain.steps_done() == 1);
}
