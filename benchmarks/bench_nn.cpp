// Network-engine throughput: the FMA peak of this CPU (an AVX2+FMA loop on every thread, measured
// in this binary), fp32 GEMM GFLOP/s at the shapes the MLP and the U-Net use, through
// flowdiff::gemm (Eigen's kernel, or OpenBLAS when the binary is built with EIGEN_USE_BLAS) and
// through cblas_sgemm of the OpenMP OpenBLAS directly (when linked), each as a fraction of that
// peak; Conv2d forward/backward GFLOP/s at the U-Net's shapes; MLP (4 x 256, SiLU, d = 2) and U-Net
// (6.S184 config: channels [32, 64, 128], 2 residual layers, embeddings 40, 1 x 32 x 32, 10
// classes) training steps/s (forward + MSE gradient + backward + AdamW); forward latency at batch
// 1, 4, 16; a small DiT (1 x 32 x 32, patch 4 or 2, width 128, depth 6, 4 heads) training step
// and forward (sampling) throughput at batch 1..64, multi-head self-attention forward and
// backward at the DiT's shapes, and a training step of the latent examples' VAE. A GEMM C[m, n] = A[m, k] B[k, n] counts 2 m n k flops; a
// convolution's forward 2 N O (C k k) (Ho Wo), its backward twice that (dW and dx). The model
// benchmarks also report the CPU time of the whole process (all threads): on a shared machine it
// says what the work costs, while the wall time also says how much of the cores the scheduler gave
// us.
//
// Driver mode for peak-memory measurements (/usr/bin/time -v):
//   bench_nn --train=unet --batch=250 --steps=5     (or --train=mlp, --train=dit: patch 4)
// runs that many training steps and exits without running the benchmarks.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <flowdiff/backend/cpu/linalg.hpp>
#include <flowdiff/nn/layers/attention.hpp>
#include <flowdiff/nn/layers/conv_transpose.hpp>
#include <flowdiff/nn/models/dit.hpp>
#include <flowdiff/nn/models/mlp.hpp>
#include <flowdiff/nn/models/unet.hpp>
#include <flowdiff/nn/models/vae.hpp>
#include <flowdiff/train/optimizer.hpp>
#include <memory>
#include <string>
#include <vector>

#if defined(FLOWDIFF_BENCH_CBLAS)
#include <cblas.h>
#endif

namespace fd = flowdiff;
namespace nn = flowdiff::nn;

namespace {

// ---------------------------------------------------------------------------------------------
// FMA peak: 12 independent 8-wide accumulators per thread hide the FMA latency (4 cycles, 2 ports).
// `peak` in the GEMM counters is the larger of the AVX2 and AVX-512 all-thread figures.
// ---------------------------------------------------------------------------------------------
__attribute__((target("avx2,fma"))) double fma_loop(long iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + 1e-7f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return static_cast<double>(out[0]);
}

// The same with 16-wide AVX-512 vectors (CPUs with two 512-bit FMA ports double the AVX2 peak).
__attribute__((target("avx512f"))) double fma_loop_512(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(1.0f + 1e-7f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  return static_cast<double>(out[0]);
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }

// GFLOP/s of the FMA loop (width 8 or 16) on `threads` threads, every thread the same work.
double measure_peak(int threads, long iters, int width) {
  double sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  sink += width == 16 ? fma_loop_512(iters) : fma_loop(iters);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  benchmark::DoNotOptimize(sink);
  return threads * iters * 12.0 * width * 2 / s * 1e-9;
}

double g_peak = 0;  // all-threads FMA peak (widest vectors) measured at start-up (GFLOP/s)

// Arguments: threads, vector width (8: AVX2, 16: AVX-512).
void BM_fma_peak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0)), width = static_cast<int>(state.range(1));
  if (width == 16 && !has_avx512()) {
    state.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const long iters = 10'000'000;
  double flops = 0;
  for (auto _ : state) {
    double sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += width == 16 ? fma_loop_512(iters) : fma_loop(iters);
    benchmark::DoNotOptimize(sink);
    flops += threads * iters * 12.0 * width * 2;
  }
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_fma_peak)
    ->ArgNames({"threads", "width"})
    ->Args({1, 8})
    ->Args({2, 8})
    ->Args({1, 16})
    ->Args({2, 16})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// `peak` is the start-up figure; `peak_here` the same all-thread FMA peak measured again right
// after this benchmark's timed loop (best of three short runs), so GFLOPs / peak_here compares
// the two under the same conditions on a machine whose speed drifts (a shared VM's did by 1.5x
// within minutes).
void set_gemm_counters(benchmark::State& state, double flops_per_iter) {
  const double total = flops_per_iter * static_cast<double>(state.iterations());
  state.counters["GFLOPs"] = benchmark::Counter(total * 1e-9, benchmark::Counter::kIsRate);
  state.counters["peak"] = g_peak;
  const int width = has_avx512() ? 16 : 8;
  double here = 0;
  for (int r = 0; r < 3; ++r)
    here = std::max(here, measure_peak(fd::Cpu::max_threads(), 2'000'000, width));
  state.counters["peak_here"] = here;
}

// ---------------------------------------------------------------------------------------------
// GEMM C[m, n] = op(A) op(B) at model shapes. Arguments: m, n, k, ta, tb (1 = transposed).
// ---------------------------------------------------------------------------------------------
struct GemmData {
  fd::Tensor<float> a, b, c;
  fd::Trans ta, tb;
  GemmData(const benchmark::State& s) {
    const fd::index_t m = s.range(0), n = s.range(1), k = s.range(2);
    ta = s.range(3) ? fd::Trans::yes : fd::Trans::no;
    tb = s.range(4) ? fd::Trans::yes : fd::Trans::no;
    fd::Generator gen{7};
    a = fd::randn<float>(ta == fd::Trans::no ? fd::Shape{m, k} : fd::Shape{k, m}, gen);
    b = fd::randn<float>(tb == fd::Trans::no ? fd::Shape{k, n} : fd::Shape{n, k}, gen);
    c = fd::Tensor<float>::zeros({m, n});
  }
};

void BM_gemm_flowdiff(benchmark::State& state) {
  GemmData d(state);
  for (auto _ : state) {
    fd::gemm(d.ta, d.tb, 1.0f, d.a, d.b, 0.0f, d.c);
    benchmark::DoNotOptimize(d.c.data());
  }
  set_gemm_counters(state, 2.0 * state.range(0) * state.range(1) * state.range(2));
}

// flowdiff's AVX2 kernel forced (the one laptops without AVX-512 run), when this CPU has AVX2.
void BM_gemm_avx2(benchmark::State& state) {
  GemmData d(state);
  if (fd::sgemm::best_isa() == fd::sgemm::Isa::none) {
    state.SkipWithError("no AVX2 kernel (FLOWDIFF_NO_SGEMM or not x86 / no AVX2)");
    return;
  }
  const fd::index_t m = state.range(0), n = state.range(1), k = state.range(2);
  const bool ta = state.range(3) != 0, tb = state.range(4) != 0;
  const fd::sgemm::Problem p{ta, tb, m, n, k, 1.f, d.a.data(), ta ? m : k, d.b.data(),
                             tb ? k : n, 0.f, d.c.data(), n};
  for (auto _ : state) {
    fd::sgemm::gemm(fd::sgemm::Isa::avx2, p);
    benchmark::DoNotOptimize(d.c.data());
  }
  set_gemm_counters(state, 2.0 * m * n * k);
}

#if defined(FLOWDIFF_BENCH_CBLAS)
void BM_gemm_cblas(benchmark::State& state) {
  GemmData d(state);
  const int m = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1)),
            k = static_cast<int>(state.range(2));
  const bool ta = state.range(3) != 0, tb = state.range(4) != 0;
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
                k, 1.0f, d.a.data(), ta ? m : k, d.b.data(), tb ? k : n, 0.0f, d.c.data(), n);
    benchmark::DoNotOptimize(d.c.data());
  }
  set_gemm_counters(state, 2.0 * m * n * k);
}
#endif

// m, n, k, ta, tb of the GEMMs the models make.
void gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k", "ta", "tb"});
  // MLP, batch 1024, width 256: forward x W^T, dW = dy^T x, dx = dy W.
  b->Args({1024, 256, 256, 0, 1});
  b->Args({256, 256, 1024, 1, 0});
  b->Args({1024, 256, 256, 0, 0});
  // U-Net convolutions (3 x 3), one group of about 1024 columns: forward W col,
  // dW = dy col^T, dcol = W^T dy, at 32 x 32 (32 ch), 16 x 16 (64 ch), 8 x 8 (128 ch).
  for (long c : {32, 64, 128}) {
    b->Args({c, 1024, 9 * c, 0, 0});
    b->Args({c, 9 * c, 1024, 0, 1});
    b->Args({9 * c, 1024, c, 1, 0});
  }
  // A square reference.
  b->Args({1024, 1024, 1024, 0, 0});
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}
BENCHMARK(BM_gemm_flowdiff)->Apply(gemm_shapes);
BENCHMARK(BM_gemm_avx2)->Apply(gemm_shapes);
#if defined(FLOWDIFF_BENCH_CBLAS)
BENCHMARK(BM_gemm_cblas)->Apply(gemm_shapes);
#endif

// ---------------------------------------------------------------------------------------------
// Conv2d forward / backward. Arguments: N, C_in, C_out, H (= W), stride.
// ---------------------------------------------------------------------------------------------
struct ConvData {
  nn::Parameters<float> ps;
  std::vector<nn::Conv2d<float>> conv;
  fd::Tensor<float> x, y, dy, dx;
  nn::Conv2d<float>::Cache cache;
  double flops = 0;
  ConvData(const benchmark::State& s) {
    const fd::index_t n = s.range(0), ci = s.range(1), co = s.range(2), h = s.range(3),
                      st = s.range(4);
    conv.emplace_back(ps, "conv", ci, co, 3, st, 1);
    if (s.range(5) == 0) conv[0].set_winograd(false);
    ps.allocate();
    fd::Generator gen{3};
    conv[0].init(ps, gen);
    x = fd::randn<float>({n, ci, h, h}, gen);
    const auto os = conv[0].output_shape(x.shape());
    y = fd::Tensor<float>(os);
    dy = fd::randn<float>(os, gen);
    dx = fd::Tensor<float>(x.shape());
    flops = 2.0 * n * co * ci * 9 * os[2] * os[3];
  }
};

void BM_conv_forward(benchmark::State& state) {
  ConvData d(state);
  for (auto _ : state) {
    d.conv[0].forward(d.ps, d.x, d.y, d.cache);
    benchmark::DoNotOptimize(d.y.data());
  }
  set_gemm_counters(state, d.flops);
}

void BM_conv_backward(benchmark::State& state) {
  ConvData d(state);
  d.conv[0].forward(d.ps, d.x, d.y, d.cache);
  for (auto _ : state) {
    d.ps.zero_grad();
    d.conv[0].backward(d.ps, d.x, d.dy, d.dx, d.cache);
    benchmark::DoNotOptimize(d.dx.data());
  }
  set_gemm_counters(state, 2 * d.flops);
}

// wino: 1 = the layer's default (Winograd for the stride-1 shapes on AVX-512), 0 = the GEMM path
// (set_winograd(false)), for comparing the two on the machine at hand.
void conv_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "Ci", "Co", "H", "s", "wino"});
  for (long n : {64, 250}) {
    b->Args({n, 32, 32, 32, 1, 1});
    b->Args({n, 32, 64, 32, 2, 1});
    b->Args({n, 64, 64, 16, 1, 1});
    b->Args({n, 64, 128, 16, 2, 1});
    b->Args({n, 128, 128, 8, 1, 1});
  }
  for (long h : {32, 16, 8}) b->Args({64, 32 * 32 / h, 32 * 32 / h, h, 1, 0});
  // The first downsampling at batch 8: one group of 4 samples per thread, input and output
  // staying in the caches between iterations (the rate without the trip to memory).
  b->Args({8, 32, 64, 32, 2, 1});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_conv_forward)->Apply(conv_shapes);
BENCHMARK(BM_conv_backward)->Apply(conv_shapes);

// ConvTranspose2d 4 x 4, stride 2, padding 1 (a DCGAN-style upsampling: H -> 2H). Arguments: N,
// C_in, C_out, H (= W) of the input.
struct ConvTData {
  nn::Parameters<float> ps;
  std::vector<nn::ConvTranspose2d<float>> convt;
  fd::Tensor<float> x, y, dy, dx;
  nn::ConvTranspose2d<float>::Cache cache;
  double flops = 0;
  ConvTData(const benchmark::State& s) {
    const fd::index_t n = s.range(0), ci = s.range(1), co = s.range(2), h = s.range(3);
    convt.emplace_back(ps, "up", ci, co, 4, 2, 1);
    ps.allocate();
    fd::Generator gen{3};
    convt[0].init(ps, gen);
    x = fd::randn<float>({n, ci, h, h}, gen);
    const auto os = convt[0].output_shape(x.shape());
    y = fd::Tensor<float>(os);
    dy = fd::randn<float>(os, gen);
    dx = fd::Tensor<float>(x.shape());
    flops = 2.0 * n * ci * co * 16 * h * h;  // every input pixel meets every tap once
  }
};

void BM_convt_forward(benchmark::State& state) {
  ConvTData d(state);
  for (auto _ : state) {
    d.convt[0].forward(d.ps, d.x, d.y, d.cache);
    benchmark::DoNotOptimize(d.y.data());
  }
  set_gemm_counters(state, d.flops);
}

void BM_convt_backward(benchmark::State& state) {
  ConvTData d(state);
  d.convt[0].forward(d.ps, d.x, d.y, d.cache);
  for (auto _ : state) {
    d.ps.zero_grad();
    d.convt[0].backward(d.ps, d.x, d.dy, d.dx, d.cache);
    benchmark::DoNotOptimize(d.dx.data());
  }
  set_gemm_counters(state, 2 * d.flops);
}

void convt_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "Ci", "Co", "H"});
  b->Args({64, 64, 32, 16});
  b->Args({64, 128, 64, 8});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_convt_forward)->Apply(convt_shapes);
BENCHMARK(BM_convt_backward)->Apply(convt_shapes);

// ---------------------------------------------------------------------------------------------
// Models: one training step = forward, MSE gradient dout = 2 (out - target) / numel, backward,
// AdamW. The data are fixed random tensors (speed does not depend on their values).
// ---------------------------------------------------------------------------------------------
template <class Net>
struct Model {
  nn::Parameters<float> ps;
  std::vector<Net> net;
  typename Net::Cache cache;
  fd::Tensor<float> x, t, target, out, dout;
  fd::Tensor<fd::label_t> y;
  fd::train::AdamW<float> opt{fd::train::AdamWOptions{.lr = 1e-4}};

  template <class Config>
  Model(const Config& cfg, fd::Shape xshape) {
    net.emplace_back(ps, cfg);
    ps.allocate();
    fd::Generator gen{11};
    net[0].init(ps, gen);
    const fd::index_t n = xshape[0];
    x = fd::randn<float>(xshape, gen);
    target = fd::randn<float>(xshape, gen);
    t = fd::Tensor<float>({n});
    fd::fill_uniform(t, gen);
    y = fd::Tensor<fd::label_t>({n});
    for (fd::index_t i = 0; i < n; ++i) y.data()[i] = static_cast<fd::label_t>(i % 10);
    out = fd::Tensor<float>(xshape);
    dout = fd::Tensor<float>(xshape);
  }

  fd::View<const fd::label_t> labels() {
    if constexpr (std::is_same_v<Net, nn::UNet<float>> || std::is_same_v<Net, nn::DiT<float>>)
      return y.view();
    return {};
  }

  void forward() { net[0].forward(ps, x, t, labels(), out, cache); }

  void train_step() {
    forward();
    const float s = 2.0f / static_cast<float>(out.numel());
    float* g = dout.data();
    const float *o = out.data(), *z = target.data();
    for (fd::index_t i = 0; i < out.numel(); ++i) g[i] = s * (o[i] - z[i]);
    ps.zero_grad();
    net[0].backward(ps, dout, fd::View<float>{}, cache);
    opt.step(ps);
  }
};

nn::MLPConfig mlp_config() { return nn::MLPConfig{.dim = 2, .width = 256, .depth = 4}; }
nn::UNetConfig unet_config() {
  nn::UNetConfig c;
  c.in_channels = 1;
  c.channels = {32, 64, 128};
  c.num_residual_layers = 2;
  c.t_embed_dim = 40;
  c.y_embed_dim = 40;
  c.num_classes = 10;
  return c;
}
/// A small Fashion DiT: 1 x 32 x 32, patch 4 (64 tokens) or 2 (256 tokens), width 128, depth 6,
/// 4 heads, MLP ratio 4, 10 classes (DiTConfig's defaults), 1.2 M parameters.
nn::DiTConfig dit_config(fd::index_t patch = 4) {
  nn::DiTConfig c;
  c.patch_size = patch;
  return c;
}

void BM_mlp_train(benchmark::State& state) {
  Model<nn::MLP<float>> m(mlp_config(), {state.range(0), 2});
  m.train_step();
  for (auto _ : state) m.train_step();
  state.SetItemsProcessed(state.iterations());  // steps
}
BENCHMARK(BM_mlp_train)
    ->Arg(1024)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

void BM_unet_train(benchmark::State& state) {
  Model<nn::UNet<float>> m(unet_config(), {state.range(0), 1, 32, 32});
  m.train_step();
  for (auto _ : state) m.train_step();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_unet_train)
    ->Arg(64)
    ->Arg(250)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// One training step of the convolutional VAE of the latent examples (28 x 28, channels {32, 64},
// 4 latent channels): forward with fresh noise, the loss's backward, AdamW. Argument: N.
void BM_vae_train(benchmark::State& state) {
  nn::Parameters<float> ps;
  nn::VAE<float> vae(ps, {.image_size = 28, .channels = {32, 64}, .latent_channels = 4});
  ps.allocate();
  fd::Generator gen{12};
  vae.init(ps, gen);
  const auto x = fd::randn<float>({state.range(0), 1, 28, 28}, gen);
  nn::VAE<float>::Cache cache;
  fd::train::AdamW<float> opt{fd::train::AdamWOptions{.lr = 1e-4}};
  auto step = [&] {
    vae.forward(ps, x, gen, cache);
    ps.zero_grad();
    vae.backward(ps, x, fd::View<float>{}, cache);
    opt.step(ps);
  };
  step();
  for (auto _ : state) step();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_vae_train)
    ->Arg(128)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// MLP forward latency at batch state.range(0): by default the small-batch forward runs on the
// cache's own flowdiff::ThreadTeam (spinning workers, no fork or join); with `openmp`, the cache
// opts out (own_team = false) and every call opens an OpenMP parallel region instead.
void mlp_forward(benchmark::State& state, bool openmp) {
  Model<nn::MLP<float>> m(mlp_config(), {state.range(0), 2});
  m.cache.own_team = !openmp;
  m.forward();
  for (auto _ : state) {
    m.forward();
    benchmark::DoNotOptimize(m.out.data());
  }
}
void BM_mlp_forward(benchmark::State& state) { mlp_forward(state, false); }
void BM_mlp_forward_omp(benchmark::State& state) { mlp_forward(state, true); }
// Batches 1, 2 (classifier-free guidance of one sample), 4, 16; wall time and the CPU time of
// the whole process, in microseconds.
void latency_batches(benchmark::internal::Benchmark* b) {
  b->Arg(1)->Arg(2)->Arg(4)->Arg(16)->UseRealTime()->MeasureProcessCPUTime()->Unit(
      benchmark::kMicrosecond);
}
BENCHMARK(BM_mlp_forward)->Apply(latency_batches);
BENCHMARK(BM_mlp_forward_omp)->Apply(latency_batches);

void BM_unet_forward(benchmark::State& state) {
  Model<nn::UNet<float>> m(unet_config(), {state.range(0), 1, 32, 32});
  m.forward();
  for (auto _ : state) {
    m.forward();
    benchmark::DoNotOptimize(m.out.data());
  }
}
BENCHMARK(BM_unet_forward)
    ->Arg(1)
    ->Arg(4)
    ->Arg(16)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// DiT (dit_config) training step and forward. Arguments: patch size, batch.
void BM_dit_train(benchmark::State& state) {
  Model<nn::DiT<float>> m(dit_config(state.range(0)), {state.range(1), 1, 32, 32});
  m.train_step();
  for (auto _ : state) m.train_step();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_dit_train)
    ->ArgNames({"p", "N"})
    ->Args({4, 64})
    ->Args({2, 64})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// Sampling throughput: items/s are images/s of one field evaluation.
void BM_dit_forward(benchmark::State& state) {
  Model<nn::DiT<float>> m(dit_config(state.range(0)), {state.range(1), 1, 32, 32});
  m.forward();
  for (auto _ : state) {
    m.forward();
    benchmark::DoNotOptimize(m.out.data());
  }
  state.SetItemsProcessed(state.iterations() * state.range(1));
}
BENCHMARK(BM_dit_forward)
    ->ArgNames({"p", "N"})
    ->Args({4, 1})
    ->Args({4, 4})
    ->Args({4, 16})
    ->Args({4, 64})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// Multi-head self-attention alone (qkv and output projections included). Arguments: N, L, D,
// heads. Flops: projections 8 N L D^2, scores and P v 4 N L^2 D (forward; backward twice that).
struct AttentionData {
  nn::Parameters<float> ps;
  std::vector<nn::MultiheadSelfAttention<float>> attn;
  nn::MultiheadSelfAttention<float>::Cache cache;
  fd::Tensor<float> x, y, dy, dx;
  double flops = 0;
  AttentionData(const benchmark::State& s) {
    const fd::index_t n = s.range(0), L = s.range(1), d = s.range(2), h = s.range(3);
    attn.emplace_back(ps, "attn", d, h);
    ps.allocate();
    fd::Generator gen{5};
    attn[0].init(ps, gen);
    x = fd::randn<float>({n, L, d}, gen);
    y = fd::Tensor<float>({n, L, d});
    dy = fd::randn<float>({n, L, d}, gen);
    dx = fd::Tensor<float>({n, L, d});
    flops = 8.0 * n * L * d * d + 4.0 * n * L * L * d;
  }
};

void BM_attention_forward(benchmark::State& state) {
  AttentionData d(state);
  d.attn[0].forward(d.ps, d.x, d.y, d.cache);
  for (auto _ : state) {
    d.attn[0].forward(d.ps, d.x, d.y, d.cache);
    benchmark::DoNotOptimize(d.y.data());
  }
  set_gemm_counters(state, d.flops);
}

void BM_attention_backward(benchmark::State& state) {
  AttentionData d(state);
  d.attn[0].forward(d.ps, d.x, d.y, d.cache);
  for (auto _ : state) {
    d.ps.zero_grad();
    d.attn[0].backward(d.ps, d.x, d.dy, d.dx, d.cache);
    benchmark::DoNotOptimize(d.dx.data());
  }
  set_gemm_counters(state, 2 * d.flops);
}

void attention_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "L", "D", "h"});
  b->Args({64, 64, 128, 4});   // the DiT's blocks at patch 4
  b->Args({64, 256, 128, 4});  // at patch 2
  b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_attention_forward)->Apply(attention_shapes);
BENCHMARK(BM_attention_backward)->Apply(attention_shapes);

// --train=mlp|unet|dit --batch=N --steps=S: the peak-memory driver.
bool flag(const char* arg, const char* name, std::string& value) {
  const std::size_t len = std::strlen(name);
  if (std::strncmp(arg, name, len) != 0 || arg[len] != '=') return false;
  value = arg + len + 1;
  return true;
}

int driver(const std::string& which, long batch, long steps) {
  const auto t0 = std::chrono::steady_clock::now();
  if (which == "unet") {
    Model<nn::UNet<float>> m(unet_config(), {batch, 1, 32, 32});
    for (long i = 0; i < steps; ++i) m.train_step();
  } else if (which == "dit") {
    Model<nn::DiT<float>> m(dit_config(), {batch, 1, 32, 32});
    for (long i = 0; i < steps; ++i) m.train_step();
  } else if (which == "mlp") {
    Model<nn::MLP<float>> m(mlp_config(), {batch, 2});
    for (long i = 0; i < steps; ++i) m.train_step();
  } else {
    std::fprintf(stderr, "bench_nn: --train must be mlp, unet or dit, got '%s'\n", which.c_str());
    return 2;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s batch %ld: %ld training steps in %.3f s (%.2f steps/s incl. setup)\n",
              which.c_str(), batch, steps, s, static_cast<double>(steps) / s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string train, batch = "250", steps = "5";
  for (int i = 1; i < argc; ++i) {
    flag(argv[i], "--train", train);
    flag(argv[i], "--batch", batch);
    flag(argv[i], "--steps", steps);
  }
  if (!train.empty()) return driver(train, std::stol(batch), std::stol(steps));

  // Best of 7 short trials: other processes on the cores only ever lower the figure.
  const int nt = fd::Cpu::max_threads();
  double avx2 = 0, avx512 = 0;
  for (int trial = 0; trial < 7; ++trial) {
    avx2 = std::max(avx2, measure_peak(nt, 5'000'000, 8));
    if (has_avx512()) avx512 = std::max(avx512, measure_peak(nt, 5'000'000, 16));
  }
  g_peak = std::max(avx2, avx512);
  benchmark::AddCustomContext("fma_peak_gflops_avx2", std::to_string(avx2));
  benchmark::AddCustomContext("fma_peak_gflops_avx512", std::to_string(avx512));
  benchmark::AddCustomContext("threads", std::to_string(fd::Cpu::max_threads()));
#if defined(EIGEN_USE_BLAS)
  const std::string eigen_gemm = "Eigen + EIGEN_USE_BLAS (OpenBLAS)";
#else
  const std::string eigen_gemm = "Eigen's own kernel";
#endif
  const std::string kernel = fd::float_gemm_kernel();
  benchmark::AddCustomContext("flowdiff_gemm", kernel == "eigen" ? eigen_gemm
                                                                 : "flowdiff sgemm, " + kernel);
#if defined(__AVX2__) && defined(__FMA__)
  benchmark::AddCustomContext("eigen_simd", "AVX2+FMA");
#elif defined(__AVX__)
  benchmark::AddCustomContext("eigen_simd", "AVX");
#else
  benchmark::AddCustomContext("eigen_simd", "SSE2 (no -march: Eigen cannot use AVX2/FMA)");
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
