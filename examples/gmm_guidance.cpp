// gmm_guidance — classifier-free guidance on an exactly known field. The data is a labelled
// Gaussian mixture in 2D (four classes, two components each); its exact conditional and
// unconditional velocity fields under the linear path come from flowdiff::analytic, so every
// difference between the pictures is guidance and integration, not learning. The program samples
// with u~ = (1 - w) u(x|∅) + w u(x|y) for w in {1, 2, 4}, reports how strongly the exact classifier
// p(y|x) agrees with the conditioning label, compares the ODE with the marginal-preserving SDE, and
// writes PNG scatter plots and trajectories.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/flowdiff.hpp>
#include <flowdiff/metrics/distances.hpp>
#include <flowdiff/samplers/sde.hpp>
#include <iostream>
#include <numbers>
#include <vector>

#include "common/cli.hpp"

namespace fd = flowdiff;
using Clock = std::chrono::steady_clock;

namespace {

/// Four classes on a circle of radius 3; each class has two components 25 degrees either side
/// of its direction, so neighbouring classes overlap and guidance has something to separate.
fd::analytic::GaussianMixture<float> make_data() {
  std::vector<float> weights, means;
  std::vector<fd::label_t> labels;
  for (int c = 0; c < 4; ++c)
    for (int side : {-1, 1}) {
      const double a = std::numbers::pi / 2 * c + side * 25.0 * std::numbers::pi / 180;
      means.push_back(static_cast<float>(3 * std::cos(a)));
      means.push_back(static_cast<float>(3 * std::sin(a)));
      weights.push_back(1.0f);
      labels.push_back(c);
    }
  auto m = fd::Tensor<float>::from({8, 2}, std::span<const float>(means));
  return fd::analytic::GaussianMixture<float>::isotropic(weights, m, std::vector<float>(8, 0.7f), labels, 4);
}

struct Agreement {
  double accuracy = 0;   // share of samples whose most likely class is the conditioning class
  double mean_prob = 0;  // mean exact p(y | x) of the conditioning class
};

Agreement agreement(const fd::analytic::GaussianMixture<float>& data, fd::View<const float> x,
                    fd::View<const fd::label_t> y) {
  const auto n = x.rows();
  Agreement a;
  fd::Tensor<float> lp(fd::Shape{n});
  std::vector<std::vector<float>> per_class;
  for (fd::label_t c = 0; c < data.num_classes(); ++c) {
    auto yc = fd::Tensor<fd::label_t>::full({n}, c);
    data.class_log_prob(x, lp, yc);
    per_class.push_back(lp.to_vector());
  }
  for (fd::index_t i = 0; i < n; ++i) {
    const auto yi = static_cast<std::size_t>(y[i]);
    std::size_t best = 0;
    for (std::size_t c = 1; c < per_class.size(); ++c)
      if (per_class[c][i] > per_class[best][i]) best = c;
    a.accuracy += best == yi;
    a.mean_prob += std::exp(static_cast<double>(per_class[yi][i]));
  }
  a.accuracy /= static_cast<double>(n);
  a.mean_prob /= static_cast<double>(n);
  return a;
}

}  // namespace

int main(int argc, char** argv) try {
  fd::examples::Cli cli("gmm_guidance",
                        "Classifier-free guidance of the exact field of a labelled 2D Gaussian "
                        "mixture: samples for w in {1, 2, 4}, trajectories, agreement with the "
                        "exact classifier.");
  auto& out_dir = cli.option<std::string>("out", "out/gmm_guidance", "output folder for the PNGs");
  auto& n = cli.option<long>("n", 3000, "samples per guidance scale");
  auto& steps = cli.option<long>("steps", 40, "Heun steps from t = 0 to t = 1");
  auto& seed = cli.option<unsigned long>("seed", 0, "random seed");
  if (!cli.parse(argc, argv)) return 0;
  fd::require<fd::config_error>(n >= 1 && n <= 10'000'000, "--n must be in [1, 1e7], got ", n);
  fd::require<fd::config_error>(steps >= 1, "--steps must be >= 1, got ", steps);
  const std::filesystem::path out(out_dir);
  const auto t_start = Clock::now();

  const auto data = make_data();
  const fd::schedules::Linear schedule;
  fd::Generator gen{seed};

  // Labels 0, 1, 2, 3, 0, 1, ... so every class gets n / 4 samples.
  fd::Tensor<fd::label_t> y(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) y[i] = static_cast<fd::label_t>(i % 4);
  std::vector<int> colours(y.data(), y.data() + n);

  const double lim = 5.2;
  std::vector<fd::io::Image> panels;
  {
    auto ref = data.sample(n, gen);
    fd::io::Plot2D plot(420, -lim, lim, -lim, lim, "data");
    std::vector<int> c(ref.labels.data(), ref.labels.data() + n);
    plot.scatter<float>(ref.x, c, 1.3, 0.45f);
    plot.caption("4 classes x 2 components");
    panels.push_back(plot.image());
  }

  std::printf("%-6s %-10s %-12s %-10s\n", "w", "agreement", "mean p(y|x)", "seconds");
  const auto grid = fd::uniform_grid<float>(steps);
  for (float w : {1.0f, 2.0f, 4.0f}) {
    const auto t0 = Clock::now();
    auto field = fd::cfg(data.velocity(schedule), w);
    field.set_condition(y);
    auto x = fd::randn<float>({n, 2}, gen);
    fd::integrate(fd::Heun{}, field, x, grid);
    fd::check_finite("gmm_guidance: samples", x);
    const auto a = agreement(data, x, y);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("%-6.1f %-10.3f %-12.3f %-10.3f\n", w, a.accuracy, a.mean_prob, secs);

    char title[64], caption[96];
    std::snprintf(title, sizeof title, "CFG w = %.0f", w);
    std::snprintf(caption, sizeof caption, "Heun %ld steps, agreement %.1f%%, mean p(y|x) %.2f",
                  steps, 100 * a.accuracy, a.mean_prob);
    fd::io::Plot2D plot(420, -lim, lim, -lim, lim, title);
    plot.scatter<float>(x, colours, 1.3, 0.45f);
    plot.caption(caption);
    panels.push_back(plot.image());
  }
  fd::io::write_png(out / "guidance.png", fd::io::hstack(panels));

  // ODE against SDE at w = 1 (exact class-conditional sampling): same marginals for every sigma,
  // measured by the (unbiased, so possibly slightly negative) energy distance between the first
  // m samples and fresh samples of p(x | y); two independent data samples give the noise floor.
  {
    std::vector<fd::io::Image> row;
    const fd::index_t m = std::min<fd::index_t>(n, 1500);
    auto ref = data.sample_class(fd::View<const fd::label_t>(y.view().rows(0, m)), gen);
    auto ref2 = data.sample_class(fd::View<const fd::label_t>(y.view().rows(0, m)), gen);
    std::printf("\n%-22s %-16s\n", "sampler (w = 1)", "energy distance to p(x|y)");
    std::printf("%-22s %-16.5f\n", "(two data samples)",
                fd::metrics::energy_distance<float>(ref.x, ref2.x));
    for (double sigma : {0.0, 0.5, 1.5}) {
      auto field = fd::cfg(data.velocity(schedule), 1.0f);
      field.set_condition(y);
      auto x = fd::randn<float>({n, 2}, gen);
      char title[64];
      if (sigma == 0) {
        fd::integrate(fd::Heun{}, field, x, grid);
        std::snprintf(title, sizeof title, "ODE (Heun, %ld steps)", steps);
      } else {
        fd::integrate(fd::euler_maruyama(schedule, sigma, gen), field, x,
                      fd::uniform_grid<float>(10 * steps));
        std::snprintf(title, sizeof title, "SDE sigma = %.1f", sigma);
      }
      fd::check_finite("gmm_guidance: SDE samples", x);
      const double ed =
          fd::metrics::energy_distance<float>(fd::View<const float>(x.view().rows(0, m)), ref.x);
      std::printf("%-22s %-16.5f\n", title, ed);
      char caption[96];
      std::snprintf(caption, sizeof caption, "energy distance to p(x|y): %.4f", ed);
      fd::io::Plot2D plot(420, -lim, lim, -lim, lim, title);
      plot.scatter<float>(x, colours, 1.3, 0.45f);
      plot.caption(caption);
      row.push_back(plot.image());
    }
    fd::io::write_png(out / "ode_vs_sde.png", fd::io::hstack(row));
  }

  // Trajectories from noise to data at w = 2: 96 particles, every step recorded.
  {
    const fd::index_t m = 96;
    fd::Tensor<fd::label_t> ym(fd::Shape{m});
    for (fd::index_t i = 0; i < m; ++i) ym[i] = static_cast<fd::label_t>(i % 4);
    auto field = fd::cfg(data.velocity(schedule), 2.0f);
    field.set_condition(ym);
    auto x = fd::randn<float>({m, 2}, gen);
    fd::TrajectoryRecorder<float> rec;
    fd::integrate(fd::Heun{}, field, x, grid, rec);
    fd::io::Plot2D plot(640, -lim, lim, -lim, lim, "trajectories, w = 2");
    for (fd::index_t i = 0; i < m; ++i) {
      const auto c = fd::io::palette(ym[i]);
      for (std::size_t k = 0; k + 1 < rec.frames.size(); ++k)
        plot.line(rec.frames[k](i, 0), rec.frames[k](i, 1), rec.frames[k + 1](i, 0),
                  rec.frames[k + 1](i, 1), c, 0.5f);
      plot.point(rec.frames.front()(i, 0), rec.frames.front()(i, 1), {60, 60, 60}, 2.0, 0.9f);
      plot.point(x(i, 0), x(i, 1), c, 3.0, 1.0f);
    }
    plot.caption("grey: x_0 ~ N(0, I) at t = 0; coloured: samples at t = 1");
    plot.save(out / "trajectories.png");
  }

  const double total = std::chrono::duration<double>(Clock::now() - t_start).count();
  std::cout << "\nwrote " << (out / "guidance.png").string() << ", "
            << (out / "ode_vs_sde.png").string() << " and " << (out / "trajectories.png").string()
            << " in " << total << " s\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "gmm_guidance: error: " << e.what() << '\n';
  return 1;
}
