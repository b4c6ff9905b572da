// toy2d — flow matching and score matching on labelled 2D distributions, end to end. For each of
// gaussians, moons, circles, checkerboard and spirals (data/toy2d.hpp) the program
//   1. trains an unconditional MLP velocity field by conditional flow matching and samples it
//      with Euler and Heun (ODE) and with the marginal-preserving SDE
//      dX = [u + sigma^2/2 s] dt + sigma dW (score derived from the velocity);
//   2. trains an unconditional MLP score network by denoising score matching (weight beta^2) and
//      samples it with the same SDE (velocity derived from the score: u = a_t x + b_t s);
//   3. trains a class-conditional MLP by flow matching with classifier-free label dropout
//      (eta = 0.1): one network gives u(x|∅) and u(x|y); samples its null-label field and
//      classifier-free guidance u~ = (1 - w) u(x|∅) + w u(x|y) at w = 1 and 3, measuring how many
//      samples a 10-nearest-neighbour classifier on held-out data assigns to their conditioning
//      class;
// and reports energy distance, MMD and sliced Wasserstein-2 to held-out data (with the
// data-vs-data value as the noise floor), writing one picture per distribution, loss curves and a
// CSV of every figure.
// --device cuda trains the three MLPs on a GPU (nn::BackendMLP and train::BackendTrainer on the
// CUDA backend, the same steps and random numbers as the CPU trainer) and samples them there too
// (nn::as_field of the device model, under cfg for guidance: the trained weights stay on the
// device; the starting noise is drawn on the host from the same generator and copied over, the
// samples are copied back for the metrics and pictures). CMake compiles this file with nvcc when
// it finds the CUDA toolkit; without a usable device, or in a build without the toolkit, it says
// so in one line and runs on the CPU (examples/common/device.hpp).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <fstream>
#include <iostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__CUDACC__)
#include <flowdiff/backend/cuda/all.cuh>
#endif

#include "common/cli.hpp"
#include "common/device.hpp"

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
namespace tr = flowdiff::train;
using Clock = std::chrono::steady_clock;
using flowdiff::examples::parse_list;
using flowdiff::examples::seconds_since;

namespace {

struct Distances {
  double energy = 0, mmd = 0, swd = 0;
};

Distances distances(fd::View<const float> x, fd::View<const float> ref, fd::Generator& gen) {
  Distances d;
  d.energy = fd::metrics::energy_distance<float>(x, ref);
  d.mmd = fd::metrics::mmd2_rbf<float>(x, ref, 0.2);
  d.swd = fd::metrics::sliced_wasserstein<float>(x, ref, 128, gen);
  return d;
}

/// Share of samples whose 10 nearest held-out data points mostly carry the conditioning label.
double knn_agreement(fd::View<const float> x, fd::View<const fd::label_t> y,
                     fd::View<const float> ref, fd::View<const fd::label_t> ref_y,
                     fd::index_t num_classes) {
  const fd::index_t n = x.dim(0), m = ref.dim(0);
  constexpr int k = 10;
  fd::index_t hits = 0;
#pragma omp parallel for reduction(+ : hits) schedule(static)
  for (fd::index_t i = 0; i < n; ++i) {
    std::pair<float, fd::label_t> best[k];
    for (auto& b : best) b = {1e30f, 0};
    for (fd::index_t j = 0; j < m; ++j) {
      const float dx = x(i, 0) - ref(j, 0), dy = x(i, 1) - ref(j, 1);
      const float d2 = dx * dx + dy * dy;
      if (d2 < best[k - 1].first) {
        int p = k - 1;
        while (p > 0 && best[p - 1].first > d2) {
          best[p] = best[p - 1];
          --p;
        }
        best[p] = {d2, ref_y[j]};
      }
    }
    std::vector<int> votes(static_cast<std::size_t>(num_classes), 0);
    for (const auto& b : best) ++votes[static_cast<std::size_t>(b.second)];
    const auto top = std::max_element(votes.begin(), votes.end()) - votes.begin();
    hits += top == y[i];
  }
  return static_cast<double>(hits) / static_cast<double>(n);
}

fd::io::Image scatter_panel(fd::View<const float> x, const std::string& title,
                            const std::string& caption, double lim,
                            fd::View<const fd::label_t> labels = {}) {
  fd::io::Plot2D plot(300, -lim, lim, -lim, lim, title);
  if (labels.data() != nullptr && !labels.empty())
    plot.scatter_labels<float>(x, labels, 1.1, 0.35f);
  else
    plot.scatter<float>(x, {}, 1.1, 0.35f);
  if (!caption.empty()) plot.caption(caption);
  return plot.image();
}

struct Row {
  std::string dist, method;
  Distances d;
  double agreement = -1;
  double seconds = 0;
};

struct Trained {
  std::vector<double> losses;
  double steps_per_second = 0;
};

/// Trains `net` (parameters ps, initialised) with AdamW, then calls sample(model, params) with
/// the EMA weights in params: with train::Trainer and (net, ps) on the CPU, or on the GPU (nvcc
/// build, device == cuda) with the same model as nn::BackendMLP<float, Cuda> and
/// train::BackendTrainer, whose trained parameters stay on the device for sampling.
template <class S, class Times, class Source, class Sample>
Trained train_mlp(fd::Device device, const nn::MLP<float>& net, nn::Parameters<float>& ps,
                  tr::PathObjective<float, S, Times> objective, tr::TrainerOptions options,
                  Source& source, Sample&& sample) {
#if defined(__CUDACC__)
  if (device == fd::Device::cuda) {
    nn::Parameters<float, fd::Cuda> dps;
    nn::BackendMLP<float, fd::Cuda> dnet(dps, net.config());
    dps.allocate();
    nn::upload_parameters(dps, ps);
    // The same loss CSV as the CPU run's (BackendTrainer writes Trainer's format).
    tr::BackendTrainer<float, fd::Cuda, S, Times> trainer(dnet, dps, objective,
                                                          tr::AdamW<float, fd::Cuda>(), options);
    const auto r = trainer.fit(source);
    if (trainer.ema() != nullptr) trainer.ema()->copy_to(dps);
    sample(std::as_const(dnet), std::as_const(dps));
    return {trainer.losses(), r.steps_per_second};
  }
#endif
  (void)device;
  tr::Trainer trainer(net, ps, std::move(objective), tr::AdamW<float>(), options);
  const auto r = trainer.fit(source);
  if (trainer.ema() != nullptr) trainer.ema()->copy_to(ps);  // sample with the EMA weights
  sample(net, std::as_const(ps));
  return {trainer.losses(), r.steps_per_second};
}

/// The backend a model (and its field) runs on: nn::MLP on the CPU, BackendMLP<float, B> on B.
template <class Net>
using backend_of_net = nn::model_backend_t<std::remove_cvref_t<Net>>;

/// Runs f(xb) with the host batch x [N, 2] placed on backend B and the result back in x: x itself
/// on the CPU (so the CPU run is what it always was), a device copy otherwise.
template <class B, class F>
void on_backend(fd::Tensor<float>& x, F&& f) {
  if constexpr (std::is_same_v<B, fd::Cpu>) {
    f(x);
  } else {
    fd::Tensor<float, B> xb(x.shape());
    fd::BackendOps<B>::template upload<float>(xb.view(), fd::View<const float>(x.view()));
    f(xb);
    fd::BackendOps<B>::template download<float>(x.view(), fd::View<const float, B>(xb.view()));
  }
}

/// The labels y [N] on backend B (Cfg copies them again in set_condition).
template <class B>
fd::Tensor<fd::label_t, B> labels_on(const fd::Tensor<fd::label_t>& y) {
  fd::Tensor<fd::label_t, B> yb(y.shape());
  fd::BackendOps<B>::template upload<fd::label_t>(yb.view(), y.view());
  return yb;
}

}  // namespace

int main(int argc, char** argv) try {
  fd::examples::Cli cli(
      "toy2d",
      "Flow matching (Euler, Heun, SDE), denoising score matching (SDE) and classifier-free "
      "guidance on labelled 2D distributions, with an MLP trained here; pictures, distances to "
      "held-out data and a CSV.");
  auto& which = cli.option<std::string>("dist", "all",
                                        "gaussians, moons, circles, checkerboard, spirals or all");
  auto& out_dir = cli.option<std::string>("out", "out/toy2d", "output folder");
  auto& train_steps = cli.option<long>("train-steps", 3000, "optimizer steps per model");
  auto& batch = cli.option<long>("batch", 512, "training batch size");
  auto& width = cli.option<long>("width", 128, "MLP hidden width");
  auto& depth = cli.option<long>("depth", 3, "MLP hidden layers");
  auto& lr = cli.option<double>("lr", 2e-3, "peak learning rate (AdamW, warmup + cosine)");
  auto& ema =
      cli.option<double>("ema", 0.995, "EMA decay of the weights used for sampling (0: off)");
  auto& n = cli.option<long>("n", 2000, "samples per sampler (and held-out data points)");
  auto& steps = cli.option<long>("steps", 50, "sampler steps from t = 0 to t = 1");
  auto& grid_flag = cli.option<std::string>(
      "grid", "uniform", std::string(fd::examples::time_grid_help) + " for the ODE samplers");
  auto& sigma = cli.option<double>("sigma", 0.5, "SDE diffusion coefficient sigma_t");
  auto& threads = cli.option<long>("threads", 0, "OpenMP threads (0: the default)");
  auto& seed = cli.option<unsigned long>("seed", 0, "random seed (training and sampling)");
  auto& device_flag = fd::examples::add_device_flag(cli, "the MLPs train and sample");
  if (!cli.parse(argc, argv)) return 0;
  const fd::Device device =
      fd::examples::resolve_example_device("toy2d", device_flag, "training and sampling");
  fd::require<fd::config_error>(train_steps >= 1, "--train-steps must be >= 1, got ", train_steps);
  fd::require<fd::config_error>(batch >= 1, "--batch must be >= 1, got ", batch);
  fd::require<fd::config_error>(width >= 1 && depth >= 1, "--width and --depth must be >= 1");
  fd::require<fd::config_error>(n >= 10 && n <= 1'000'000, "--n must be in [10, 1e6], got ", n);
  fd::require<fd::config_error>(steps >= 1, "--steps must be >= 1, got ", steps);
  const auto ode_grid = fd::examples::parse_time_grid("grid", grid_flag, steps);
  const std::string grid_note = grid_flag == "uniform" ? "" : " " + grid_flag;  // (no comma: CSV)
  fd::require<fd::config_error>(sigma >= 0, "--sigma must be >= 0, got ", sigma);
  fd::require<fd::config_error>(threads >= 0, "--threads must be >= 0, got ", threads);
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
  std::vector<fd::data::Toy2D> kinds;
  if (which == "all")
    kinds = {fd::data::Toy2D::Gaussians, fd::data::Toy2D::Moons, fd::data::Toy2D::Circles,
             fd::data::Toy2D::Checkerboard, fd::data::Toy2D::Spirals};
  else
    kinds = {fd::data::toy2d_from_name(which)};
  const std::filesystem::path out(out_dir);
  std::filesystem::create_directories(out);
  const auto t_start = Clock::now();
  const fd::schedules::Linear schedule;
  const fd::GaussianPath path(schedule);
  std::vector<Row> rows;
  std::vector<std::string> pictures;

  for (const auto kind : kinds) {
    const std::string name(fd::data::toy2d_name(kind));
    const fd::data::Toy2DDistribution<float> dist(kind);
    const fd::index_t k = dist.num_classes();
    fd::Generator gen(seed * 1000003u + static_cast<unsigned long>(kind));
    auto held_out = dist.sample(n, gen);  // reference data (never trained on: fresh draws)
    auto held_out2 = dist.sample(n, gen);
    tr::SampledSource<fd::data::Toy2DDistribution<float>> source(dist, fd::Shape{2}, k);
    std::printf("\n== %s (%ld classes) ==\n", name.c_str(), static_cast<long>(k));

    auto add_row = [&](const std::string& method, fd::View<const float> x, double secs,
                       double agreement = -1) {
      Row r{name, method, distances(x, held_out.x, gen), agreement, secs};
      std::printf("  %-26s energy %8.5f  mmd %8.5f  swd %7.4f%s  (%.2f s)\n", method.c_str(),
                  r.d.energy, r.d.mmd, r.d.swd,
                  agreement >= 0 ? ("  agreement " + std::to_string(agreement)).c_str() : "", secs);
      rows.push_back(r);
    };
    add_row("data (noise floor)", held_out2.x, 0);

    // Trainer options shared by the three models (AdamW, warmup + cosine, EMA of the weights).
    auto options = [&](const std::string& csv_name) {
      return tr::TrainerOptions{.steps = train_steps,
                                .batch = batch,
                                .lr = lr,
                                .warmup_steps = std::min<long>(100, train_steps / 10),
                                .ema_decay = ema,
                                .seed = gen.fork().seed(),
                                .loss_csv = out / (name + "_" + csv_name + "_loss.csv"),
                                .log_every = std::max<long>(1, train_steps / 5)};
    };
    std::vector<fd::io::Image> panels;
    panels.push_back(
        scatter_panel(held_out.x, name + ": data", "held-out samples", 3.0, held_out.labels));
    auto add_panel = [&](fd::View<const float> x, const std::string& title,
                         fd::View<const fd::label_t> labels = {}) {
      char cap[96];
      if (rows.back().agreement >= 0)
        std::snprintf(cap, sizeof cap, "class agreement %.1f%%", 100 * rows.back().agreement);
      else
        std::snprintf(cap, sizeof cap, "energy dist %.4f", rows.back().d.energy);
      panels.push_back(scatter_panel(x, title, cap, 3.0, labels));
    };
    const auto& grid = ode_grid;

    // 1. CFM: an unconditional velocity MLP, sampled with Euler, Heun and the SDE.
    nn::Parameters<float> ups;
    nn::MLP<float> vnet(ups, {.dim = 2, .width = width, .depth = depth, .time_dim = 32});
    ups.allocate();
    vnet.init(ups, gen);
    std::printf("  training the velocity MLP (CFM): %ld steps of %ld\n", train_steps, batch);
    // Each sampling block below is a generic lambda called with the trained model where it
    // lives (nn::MLP and host parameters, or BackendMLP and device parameters): the starting
    // noise comes from gen on the host in both cases, the samples end up in a host tensor.
    auto sample_cfm = [&](const auto& net, const auto& ps) {
      using B = backend_of_net<decltype(net)>;
      auto field = nn::as_field(net, ps);
      for (int method = 0; method < 3; ++method) {
        auto x = fd::randn<float>({n, 2}, gen);
        const auto t0 = Clock::now();
        std::string label;
        on_backend<B>(x, [&](auto& xb) {
          if (method == 0) {
            fd::integrate(fd::Euler{}, field, xb, grid);
            label = "Euler " + std::to_string(steps) + grid_note;
          } else if (method == 1) {
            fd::integrate(fd::Heun{}, field, xb, grid);
            label = "Heun " + std::to_string(steps) + grid_note;
          } else {
            fd::integrate(fd::euler_maruyama(schedule, sigma, gen), field, xb,
                          fd::uniform_grid<float>(4 * steps));
            char b[64];
            std::snprintf(b, sizeof b, "SDE sigma %.2g (%ld steps)", sigma, 4 * steps);
            label = b;
          }
        });
        const double secs = seconds_since(t0);
        fd::check_finite("toy2d: samples", x);
        add_row("CFM " + label, x, secs);
        add_panel(x, "CFM, " + label);
      }
    };
    const Trained cfm = train_mlp(device, vnet, ups, tr::flow_matching<float>(path), options("cfm"),
                                  source, sample_cfm);

    // 2. DSM: an unconditional score MLP, sampled with the SDE (velocity from the score).
    nn::Parameters<float> sps;
    nn::MLP<float> snet(sps, {.dim = 2, .width = width, .depth = depth, .time_dim = 32});
    sps.allocate();
    snet.init(sps, gen);
    std::printf("  training the score MLP (DSM, weight beta^2): %ld steps of %ld\n", train_steps,
                batch);
    auto sample_dsm = [&](const auto& net, const auto& ps) {
      using B = backend_of_net<decltype(net)>;
      auto score = nn::as_field(net, ps);
      auto velocity = fd::as_parametrization(nn::as_field(net, ps), fd::Parametrization::score,
                                             fd::Parametrization::velocity, schedule);
      auto x = fd::randn<float>({n, 2}, gen);
      const auto t0 = Clock::now();
      // The score says nothing about the data at t = 0 (alpha_0 = 0), so the conversion to a
      // velocity needs t > 0: start at t = 1e-3, where p_t is N(0, I) to within 1e-3.
      on_backend<B>(x, [&](auto& xb) {
        fd::integrate(
            fd::euler_maruyama(schedule, fd::ConstantSigma{std::max(sigma, 0.5)}, score, gen),
            velocity, xb, fd::uniform_grid<float>(4 * steps, 1e-3f, 1.0f));
      });
      const double secs = seconds_since(t0);
      fd::check_finite("toy2d: DSM samples", x);
      char label[64];
      std::snprintf(label, sizeof label, "DSM SDE sigma %.2g (%ld steps)", std::max(sigma, 0.5),
                    4 * steps);
      add_row(label, x, secs);
      add_panel(x, label);
    };
    const Trained dsm = train_mlp(device, snet, sps, tr::score_matching<float>(path, 0.0, 0.995),
                                  options("dsm"), source, sample_dsm);

    // 3. CFM with CFG dropout: a class-conditional velocity MLP whose null label gives u(x|∅).
    nn::Parameters<float> cps;
    nn::MLP<float> cnet(
        cps, {.dim = 2, .width = width, .depth = depth, .time_dim = 32, .num_classes = k});
    cps.allocate();
    cnet.init(cps, gen);
    std::printf("  training the conditional velocity MLP (CFM, eta = 0.1): %ld steps of %ld\n",
                train_steps, batch);
    // Classifier-free guidance: labels spread evenly over the classes.
    fd::Tensor<fd::label_t> y(fd::Shape{n});
    for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % k);
    auto sample_cond = [&](const auto& net, const auto& ps) {
      using B = backend_of_net<decltype(net)>;
      {
        // The null-label field alone: the unconditional model trained on a tenth of the batch.
        auto null_field = nn::as_field(net, ps);
        auto x = fd::randn<float>({n, 2}, gen);
        const auto t0 = Clock::now();
        on_backend<B>(x, [&](auto& xb) { fd::integrate(fd::Heun{}, null_field, xb, grid); });
        const double secs = seconds_since(t0);
        fd::check_finite("toy2d: null-label samples", x);
        char label[64];
        std::snprintf(label, sizeof label, "null label (Heun %ld%s)", steps, grid_note.c_str());
        add_row(label, x, secs);
        add_panel(x, "u(x|null), Heun " + std::to_string(steps));
      }
      const auto yb = labels_on<B>(y);
      for (float w : {1.0f, 3.0f}) {
        auto guided = fd::cfg(nn::as_field(net, ps), w);
        guided.set_condition(fd::View<const fd::label_t, B>(yb.view()));
        auto x = fd::randn<float>({n, 2}, gen);
        const auto t0 = Clock::now();
        on_backend<B>(x, [&](auto& xb) { fd::integrate(fd::Heun{}, guided, xb, grid); });
        const double secs = seconds_since(t0);
        fd::check_finite("toy2d: CFG samples", x);
        const double agree = knn_agreement(x, y, held_out.x, held_out.labels, k);
        char label[64];
        std::snprintf(label, sizeof label, "CFG w = %.0f (Heun %ld%s)", w, steps,
                      grid_note.c_str());
        add_row(label, x, secs, agree);
        add_panel(x, label, y);
      }
    };
    const Trained cond = train_mlp(device, cnet, cps, tr::flow_matching<float>(path, 0.1),
                                   options("cfg"), source, sample_cond);
    const auto picture = out / (name + ".png");
    fd::io::write_png(picture, fd::io::hstack(panels));
    pictures.push_back(picture.string());

    // Loss curves of the three models.
    std::vector<fd::io::Image> curves;
    curves.push_back(fd::io::loss_curve_plot(cfm.losses, name + ": CFM loss",
                                             {.log_y = true, .smoothing = 0.98}));
    curves.push_back(fd::io::loss_curve_plot(dsm.losses, name + ": DSM loss",
                                             {.log_y = true, .smoothing = 0.98}));
    curves.push_back(fd::io::loss_curve_plot(cond.losses, name + ": CFM + CFG dropout loss",
                                             {.log_y = true, .smoothing = 0.98}));
    const auto curve_file = out / (name + "_loss.png");
    fd::io::write_png(curve_file, fd::io::hstack(curves));
    pictures.push_back(curve_file.string());
    std::printf("  training: CFM %.1f steps/s, DSM %.1f steps/s, conditional CFM %.1f steps/s\n",
                cfm.steps_per_second, dsm.steps_per_second, cond.steps_per_second);
  }

  const auto csv = out / "metrics.csv";
  {
    std::ofstream f(csv);
    f << "distribution,method,energy_distance,mmd2_rbf_0.2,sliced_w2,knn_agreement,seconds\n";
    // (a method name with a comma quoted, RFC 4180, so that every row has the header's columns)
    const auto csv_field = [](const std::string& v) {
      return v.find(',') == std::string::npos ? v : '"' + v + '"';
    };
    for (const auto& r : rows)
      f << r.dist << ',' << csv_field(r.method) << ',' << r.d.energy << ',' << r.d.mmd << ','
        << r.d.swd << ','
        << (r.agreement >= 0 ? std::to_string(r.agreement) : "") << ',' << r.seconds << '\n';
    fd::require<fd::io_error>(f.good(), "toy2d: cannot write ", csv.string());
  }
  std::printf("\ntoy2d: done in %.1f s\n", seconds_since(t_start));
  for (const auto& p : pictures) std::printf("wrote %s\n", p.c_str());
  std::printf("wrote %s\n", csv.string().c_str());
  return 0;
} catch (const std::exception& e) {
  std::cerr << "toy2d: error: " << e.what() << '\n';
  return 1;
}
