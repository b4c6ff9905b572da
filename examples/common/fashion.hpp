// examples/common/fashion.hpp — what the Fashion-MNIST examples (fashion_cfg, fashion_dit,
// fashion_latent, classifier_guidance) share: loading the training and test sets, the cached
// evaluation classifier (metrics::load_or_train_fashion_classifier), the reference feature
// statistics of real test images with the real-vs-real Fréchet floor at the generated sample
// size, the fixed labels and noise of the sample grids (10 classes x 8, one row per class) and of
// the metric samples, sampling one guided field per w (a grid picture, then the metric samples:
// agreement = share the classifier assigns to the conditioning class, and the Fréchet distance
// in its penultimate features), and the metrics table printed and written as CSV; and for the
// three CFG examples (fashion_cfg, fashion_dit, fashion_latent) their common flags (FashionFlags)
// and the whole report after training (sample_cfg_and_report). Training and sampling run where the
// model lives (nn::model_backend_t): a CPU model with train::Trainer on host tensors, a backend
// model (nn::BackendUNet<float, Cuda>: fashion_cfg --device cuda) with train::BackendTrainer, the
// sampler's noise and labels copied to its backend and the samples copied back for the metrics.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <flowdiff/core/error.hpp>
#include <flowdiff/core/random.hpp>
#include <flowdiff/core/tensor.hpp>
#include <flowdiff/data/fashion_mnist.hpp>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/io/image.hpp>
#include <flowdiff/io/plot.hpp>
#include <flowdiff/metrics/classifier_metrics.hpp>
#include <flowdiff/nn/as_field.hpp>
#include <flowdiff/nn/parameters.hpp>
#include <flowdiff/paths/gaussian_path.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <flowdiff/samplers/dpm_solver.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/train/backend_trainer.hpp>
#include <flowdiff/train/trainer.hpp>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/cli.hpp"

namespace flowdiff::examples {

/// The training and test sets (28 x 28 in [-1, 1]). `limit` > 0 keeps the first `limit` training
/// images; quick (smoke) runs evaluate on the first 500 test images.
struct FashionData {
  data::ImageDataset train, test;
  index_t num_classes() const { return train.num_classes; }
};

inline FashionData load_fashion(const std::string& program, const std::string& dir, long limit,
                                bool quick) {
  data::FashionMnistOptions o;
  o.dir = dir;
  o.limit = limit;
  FashionData d;
  d.train = data::fashion_mnist(data::Split::Train, o);
  o.limit = quick ? 500 : 0;
  d.test = data::fashion_mnist(data::Split::Test, o);
  std::printf("%s: %ld training and %ld test images from %s\n", program.c_str(),
              static_cast<long>(d.train.size()), static_cast<long>(d.test.size()),
              data::fashion_mnist_dir(o).string().c_str());
  return d;
}

/// The evaluation classifier: trained once (`epochs`, lr 3e-3; 90.5-91% test accuracy on
/// 28 x 28, docs/metrics.md) and cached at cache_dir/fashion_classifier.safetensors; quick runs
/// train `quick_steps` steps, skip the 90% bar and cache nothing.
inline metrics::TrainedClassifier<float> evaluation_classifier(
    const std::string& program, const std::filesystem::path& cache_dir, const FashionData& d,
    long epochs, bool quick, long quick_steps, std::uint64_t seed) {
  Generator gen(seed);
  metrics::ClassifierTrainOptions o;
  o.epochs = epochs;
  o.lr = 3e-3;
  if (quick) {
    o.max_steps = quick_steps;
    o.require_accuracy = false;
    o.write_cache = false;
  }
  auto c = metrics::load_or_train_fashion_classifier(
      quick ? std::filesystem::path() : cache_dir / "fashion_classifier.safetensors", d.train,
      d.test, o, gen);
  std::printf("%s: evaluation classifier: test accuracy %.2f%%%s\n", program.c_str(),
              100 * c.report.test_accuracy, c.report.loaded ? " (cached)" : "");
  return c;
}

/// The fixed parts of an evaluation: the classifier's evaluator, the feature statistics of the
/// first n_real test images, the floor (Fréchet distance of min(n_eval, M/2) other test images —
/// the last ones — to that reference: the estimator's bias at the generated sample size), and the
/// labels of the grid (8 per class, row-major by class) and of the metric samples (class i % K).
class Evaluation {
 public:
  /// `classifier` must outlive the evaluation.
  Evaluation(const metrics::TrainedClassifier<float>& classifier, const data::ImageDataset& test,
             index_t per_class, index_t n_real)
      : evaluator_(classifier.net, classifier.params, 200),
        k_(test.num_classes),
        n_eval_(per_class * test.num_classes),
        n_ref_(std::min<index_t>(test.size(), n_real)),
        n_floor_(std::min<index_t>(n_eval_, test.size() / 2)),
        grid_y_(Shape{8 * test.num_classes}),
        eval_y_(Shape{n_eval_}) {
    require<config_error>(per_class >= 2 && n_real >= 2,
                          "Evaluation: need >= 2 images per class and >= 2 real images, got ",
                          per_class, " and ", n_real);
    real_ = evaluator_.feature_statistics(View<const float>(test.images.view().rows(0, n_ref_)));
    floor_ = evaluator_.frechet_to(
        View<const float>(test.images.view().rows(test.size() - n_floor_, test.size())), real_);
    for (index_t i = 0; i < grid_y_.numel(); ++i) grid_y_[i] = static_cast<label_t>(i / 8);
    for (index_t i = 0; i < n_eval_; ++i) eval_y_[i] = static_cast<label_t>(i % k_);
  }

  index_t grid_size() const { return grid_y_.numel(); }
  index_t eval_size() const { return n_eval_; }
  index_t reference_size() const { return n_ref_; }
  index_t floor_size() const { return n_floor_; }
  double floor() const { return floor_; }
  const Tensor<label_t>& grid_labels() const { return grid_y_; }
  const Tensor<label_t>& eval_labels() const { return eval_y_; }

  /// Agreement with the labels of the metric samples and Fréchet distance to the reference.
  std::pair<double, double> score(View<const float> images) {
    const double a = evaluator_.agreement(images, eval_y_.view()).rate();
    return {a, evaluator_.frechet_to(images, real_)};
  }

 private:
  metrics::ClassifierEvaluator<float> evaluator_;
  index_t k_, n_eval_, n_ref_, n_floor_;
  Tensor<label_t> grid_y_, eval_y_;
  metrics::FeatureStatistics real_;
  double floor_ = 0;
};

/// The starting noise of the grid and of the metric samples, drawn once from `seed` so that every
/// w (and method) starts from the same points. sample: the shape of one sample ([1, 28, 28] for
/// pixels, the latent shape for a latent model).
struct SampleNoise {
  Tensor<float> grid, eval;
  SampleNoise(const Evaluation& e, const Shape& sample, std::uint64_t seed) {
    Generator gen(seed);
    Shape g{e.grid_size()}, v{e.eval_size()};
    for (int i = 0; i < sample.rank(); ++i) {
      g.push_back(sample[i]);
      v.push_back(sample[i]);
    }
    grid = randn<float>(g, gen);
    eval = randn<float>(v, gen);
  }
};

/// One row of the metrics table.
struct WResult {
  std::string method;  ///< empty for single-method examples
  float w = 1;
  double agreement = 0, frechet = 0, seconds = 0;
};

/// The images of a batch of samples, unchanged: pixel-space models.
struct PixelImages {
  Tensor<float> operator()(const Tensor<float>& x) const { return x.clone(); }
};

/// The ODE sampler of the --sampler flag: Heun and the midpoint rule (two evaluations per step)
/// or DPM-Solver++(2M) under the linear path the examples train (one evaluation per step).
enum class OdeSampler { heun, midpoint, dpm };

/// The help text of a --sampler flag.
inline constexpr const char* ode_sampler_help =
    "ODE sampler: heun, midpoint (2 evaluations per step) or dpm++ (DPM-Solver++(2M), 1)";

/// A --sampler flag value; config_error naming the flag otherwise.
inline OdeSampler parse_ode_sampler(const std::string& flag, const std::string& text) {
  if (text == "heun") return OdeSampler::heun;
  if (text == "midpoint") return OdeSampler::midpoint;
  if (text == "dpm++") return OdeSampler::dpm;
  fail<config_error>("--", flag, ": expected 'heun', 'midpoint' or 'dpm++', got '", text, "'");
}

inline const char* sampler_name(OdeSampler s) {
  return s == OdeSampler::heun       ? "Heun"
         : s == OdeSampler::midpoint ? "midpoint"
                                     : "DPM-Solver++(2M)";
}
inline long evaluations_per_step(OdeSampler s) { return s == OdeSampler::dpm ? 1 : 2; }

/// integrate() with the chosen sampler (x on the field's backend).
template <class Field, class X>
IntegrateStats integrate_with(OdeSampler s, Field& field, X& x, const std::vector<float>& grid) {
  switch (s) {
    case OdeSampler::midpoint: return integrate(Midpoint{}, field, x, grid);
    case OdeSampler::dpm: return integrate(dpm_solver_pp_2m(schedules::Linear{}), field, x, grid);
    case OdeSampler::heun: break;
  }
  return integrate(Heun{}, field, x, grid);
}

/// Samples `field` (a conditional field with set_condition: cfg(...), classifier_guidance(...))
/// with `sampler` (Heun by default) over `tgrid` from the grid noise (written as an 8-column grid
/// to `picture`) and from the metric noise (scored), after `to_images` (a latent model's decoder;
/// PixelImages for pixel models). Prints one line "<program>: <label>w = ...: agreement ...,
/// Frechet distance ..." and returns the row; its seconds cover both samplings and the decoding.
template <class Field, class ToImages = PixelImages>
WResult sample_and_score(const std::string& program, const std::string& method, float w,
                         Field& field, const SampleNoise& noise, Evaluation& eval,
                         const std::vector<float>& tgrid, const std::filesystem::path& picture,
                         ToImages to_images = {}, OdeSampler sampler = OdeSampler::heun) {
  const auto t0 = std::chrono::steady_clock::now();
  // noise: [N, ...] and labels [N] on the host; the samples come back into a host tensor.
  const auto run = [&](const Tensor<float>& noise_x, const Tensor<label_t>& labels) {
    using B = nn::model_backend_t<Field>;
    auto x = noise_x.clone();
    if constexpr (std::is_same_v<B, Cpu>) {
      field.set_condition(labels);
      integrate_with(sampler, field, x, tgrid);
    } else {
      Tensor<float, B> xb(x.shape());
      Tensor<label_t, B> yb(labels.shape());
      BackendOps<B>::template upload<float>(xb.view(), View<const float>(x.view()));
      BackendOps<B>::template upload<label_t>(yb.view(), labels.view());
      field.set_condition(View<const label_t, B>(yb.view()));
      integrate_with(sampler, field, xb, tgrid);
      BackendOps<B>::template download<float>(x.view(), View<const float, B>(xb.view()));
    }
    check_finite(program + ": samples", x);
    return x;
  };
  const auto x = run(noise.grid, eval.grid_labels());
  io::write_png_grid<float>(picture, to_images(x), 8);
  const auto xe = run(noise.eval, eval.eval_labels());
  const Tensor<float> images = to_images(xe);
  WResult r{method, w, 0, 0, seconds_since(t0)};
  std::tie(r.agreement, r.frechet) = eval.score(images.view());
  std::printf("%s: %s%sw = %g: agreement %.1f%%, Frechet distance %.3f (%.1f s)\n", program.c_str(),
              method.c_str(), method.empty() ? "" : " ", w, 100 * r.agreement, r.frechet,
              r.seconds);
  std::fflush(stdout);
  return r;
}

/// The table on stdout (a `method` column when the rows have one), with the real-vs-real floor.
inline void print_metrics(const std::vector<WResult>& rows, double floor) {
  const bool methods = !rows.empty() && !rows.front().method.empty();
  std::printf("\n");
  if (methods) std::printf("%-7s ", "method");
  std::printf("%-6s %-12s %-18s %-10s\n", "w", "agreement", "Frechet distance", "seconds");
  for (const auto& r : rows) {
    if (methods) std::printf("%-7s ", r.method.c_str());
    std::printf("%-6g %-12.3f %-18.3f %-10.1f\n", r.w, r.agreement, r.frechet, r.seconds);
  }
  if (methods) std::printf("%-7s ", "real");
  std::printf("%-6s %-12s %-18.3f %-10s\n", methods ? "-" : "real", "-", floor, "-");
}

/// metrics.csv: [method,]w,agreement,frechet_distance,sampling_seconds, then the `extra` columns
/// (the same value on every row: training steps and times, ...), then real_frechet_floor.
inline void write_metrics_csv(const std::string& program, const std::filesystem::path& file,
                              const std::vector<WResult>& rows,
                              const std::vector<std::pair<std::string, std::string>>& extra,
                              double floor) {
  const bool methods = !rows.empty() && !rows.front().method.empty();
  std::ofstream f(file);
  if (methods) f << "method,";
  f << "w,agreement,frechet_distance,sampling_seconds";
  for (const auto& [name, value] : extra) f << ',' << name;
  f << ",real_frechet_floor\n";
  for (const auto& r : rows) {
    if (methods) f << r.method << ',';
    f << r.w << ',' << r.agreement << ',' << r.frechet << ',' << r.seconds;
    for (const auto& [name, value] : extra) f << ',' << value;
    f << ',' << floor << '\n';
  }
  require<io_error>(f.good(), program, ": cannot write ", file.string());
}

/// The training of a class-conditional velocity field by CFM on the linear path with CFG label
/// dropout eta, as every Fashion-MNIST example runs it: AdamW at `lr` with min(200, steps / 10)
/// warmup steps and cosine decay to lr / 20, clipping at 1, EMA 0.999, checkpoints every 500
/// steps to out/checkpoint.safetensors (a rerun resumes, or goes straight to sampling), the loss
/// per step in out/loss.csv and its curve in out/loss.png, the EMA weights in out/<weights>.
struct CfmTraining {
  long steps = 1600, batch = 64;
  double lr = 2e-3, eta = 0.1;
  std::uint64_t seed = 0;
  std::filesystem::path out;
  std::string weights = "model_ema.safetensors";
};

/// train_cfm's run with either trainer (train::Trainer, train::BackendTrainer): fit, the speed,
/// the loss curve, the EMA weights file, and the EMA weights into ps.
template <class P, class Source, class Trainer>
train::TrainResult train_cfm_run(const std::string& program, P& ps, Source& source,
                                 const CfmTraining& s, Trainer& trainer) {
  std::printf("%s: training %ld steps of %ld (CFM, CFG dropout eta = %.2f)\n", program.c_str(),
              s.steps, s.batch, s.eta);
  std::fflush(stdout);
  const auto result = trainer.fit(source);
  std::printf("%s: trained to step %ld: %.2f steps/s, %.1f samples/s, %.1f s%s\n", program.c_str(),
              static_cast<long>(result.last_step), result.steps_per_second,
              result.steps_per_second * static_cast<double>(s.batch), result.seconds,
              result.resumed ? " (resumed)" : "");
  if (!trainer.losses().empty())
    io::write_png(s.out / "loss.png", io::loss_curve_plot(trainer.losses(), program + ": CFM loss",
                                                          {.log_y = true, .smoothing = 0.98}));
  trainer.save_weights(s.out / s.weights);
  if (trainer.ema() != nullptr) trainer.ema()->copy_to(ps);  // sample with the EMA weights
  return result;
}

/// Trains `model` (parameters `ps` on the model's backend, initialised) on `source` as
/// CfmTraining says, prints the speed, writes the files, and leaves the EMA weights in `ps` (what
/// the examples sample). A CPU model trains with train::Trainer, a backend model (one with a
/// `backend` typedef: nn::BackendUNet<float, B>) with train::BackendTrainer on B: the same steps,
/// random numbers and files (a checkpoint of either resumes in the other).
template <class M, class Source>
train::TrainResult train_cfm(const std::string& program, const M& model,
                             nn::Parameters<float, nn::model_backend_t<M>>& ps, Source& source,
                             const CfmTraining& s) {
  const GaussianPath path(schedules::Linear{});
  const train::TrainerOptions options{
      .steps = s.steps,
      .batch = s.batch,
      .lr = s.lr,
      .warmup_steps = std::min<long>(200, s.steps / 10),
      .min_lr = s.lr / 20,
      .ema_decay = 0.999,
      .seed = s.seed,
      .checkpoint = s.out / "checkpoint.safetensors",
      .checkpoint_every = 500,
      .loss_csv = s.out / "loss.csv",
      .log_every = std::max<long>(1, std::min<long>(100, s.steps / 10))};
  if constexpr (requires { typename M::backend; }) {
    using B = typename M::backend;
    train::BackendTrainer trainer(model, ps, train::flow_matching<float>(path, s.eta),
                                  train::AdamW<float, B>(), options);
    return train_cfm_run(program, ps, source, s, trainer);
  } else {
    train::Trainer trainer(model, ps, train::flow_matching<float>(path, s.eta),
                           train::AdamW<float>(), options);
    return train_cfm_run(program, ps, source, s, trainer);
  }
}

/// A number as the CSV writes it.
template <class V>
std::string csv_value(V v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

/// What the shared flags of the CFG examples differ in: the defaults and help lines each sets.
struct FashionFlagDefaults {
  std::string out;   ///< --out, e.g. "out/fashion_cfg"
  long train_steps;  ///< --train-steps
  double lr;         ///< --lr
  std::string cache_help = "folder of the cached evaluation classifier";
  std::string train_steps_help = "optimizer steps";
  std::string batch_help = "training batch size";
  std::string quick_help = "1: tiny smoke run (classifier not cached, no 90% bar)";
};

/// The flags fashion_cfg, fashion_dit and fashion_latent share: data, output and cache folders,
/// the CFM training, the guided sampling and its metrics, threads and seed. The members refer to
/// the values held by the Cli they were declared on (add_fashion_flags), so they hold the parsed
/// values once Cli::parse has run; the Cli must outlive them.
struct FashionFlags {
  std::string& data_dir;
  std::string& out;
  std::string& cache;
  long& train_steps;
  long& batch;
  double& lr;
  double& eta;
  std::string& w;
  long& sample_steps;
  std::string& sampler;
  std::string& grid;
  long& eval_per_class;
  long& limit;
  long& eval_real;
  long& classifier_epochs;
  int& quick;
  long& threads;
  unsigned long& seed;
  std::vector<float> ws{};         ///< --w as a list, set by validate()
  OdeSampler ode_sampler = OdeSampler::heun;  ///< --sampler, set by validate()
  std::vector<float> time_grid{};  ///< --grid with --sample-steps steps, set by validate()

  /// Checks the values (config_error naming the flag), parses --w into ws and sets the OpenMP
  /// thread count when --threads is given.
  void validate() {
    ws = parse_list<float>("w", w);
    require<config_error>(train_steps >= 1, "--train-steps must be >= 1, got ", train_steps);
    require<config_error>(batch >= 1, "--batch must be >= 1, got ", batch);
    require<config_error>(sample_steps >= 1, "--sample-steps must be >= 1, got ", sample_steps);
    ode_sampler = parse_ode_sampler("sampler", sampler);
    if (grid == "auto") grid = ode_sampler == OdeSampler::dpm ? "dpm" : "uniform";
    time_grid = parse_time_grid("grid", grid, sample_steps);
    require<config_error>(eval_per_class >= 2, "--eval-per-class must be >= 2, got ",
                          eval_per_class);
    require<config_error>(limit >= 0, "--limit must be >= 0, got ", limit);
    require<config_error>(eval_real >= 2, "--eval-real must be >= 2, got ", eval_real);
    require<config_error>(threads >= 0, "--threads must be >= 0, got ", threads);
#if defined(_OPENMP)
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
  }

  /// The CFM training these flags ask for (train_cfm), its EMA weights written to out/`weights`;
  /// the trainer's seed is seed + 2.
  CfmTraining training(std::string weights) const {
    return {.steps = train_steps,
            .batch = batch,
            .lr = lr,
            .eta = eta,
            .seed = seed + 2,
            .out = out,
            .weights = std::move(weights)};
  }
};

/// Declares the shared flags on `cli`. In --help they come in this order: --data-dir, --out,
/// --cache, then --train-steps, --batch, --lr, then --eta, --w, --sample-steps, --sampler, --grid,
/// --eval-per-class, --limit, --eval-real, --classifier-epochs, --quick, --threads, --seed; an
/// example lists its own flags among them with cli.place_before("train-steps") or
/// cli.place_before("eta").
inline FashionFlags add_fashion_flags(Cli& cli, const FashionFlagDefaults& d) {
  // Braced initialisation runs in order, so the flags are declared in the order of the members.
  return FashionFlags{
      cli.option<std::string>("data-dir", "",
                              "Fashion-MNIST folder (default: $FLOWDIFF_FASHION_MNIST or "
                              "/usr/share/datasets/fashion-mnist)"),
      cli.option<std::string>("out", d.out, "output folder"),
      cli.option<std::string>("cache", "out/cache", d.cache_help),
      cli.option<long>("train-steps", d.train_steps, d.train_steps_help),
      cli.option<long>("batch", 64, d.batch_help),
      cli.option<double>("lr", d.lr, "peak learning rate (AdamW, warmup + cosine)"),
      cli.option<double>("eta", 0.1, "CFG label-dropout probability"),
      cli.option<std::string>("w", "1,3,5", "guidance scales to sample"),
      cli.option<long>("sample-steps", 10, "sampler steps from t = 0 to t = 1"),
      cli.option<std::string>("sampler", "heun", ode_sampler_help),
      cli.option<std::string>("grid", "auto",
                              std::string(time_grid_help) + "; auto: dpm for dpm++, else uniform"),
      cli.option<long>("eval-per-class", 30, "generated images per class for the metrics"),
      cli.option<long>("limit", 0, "use only the first N training images (0: all)"),
      cli.option<long>("eval-real", 5000,
                       "real test images behind the Frechet reference statistics"),
      cli.option<long>("classifier-epochs", 2, "epochs of the evaluation classifier's training"),
      cli.option<int>("quick", 0, d.quick_help),
      cli.option<long>("threads", 0, "OpenMP threads (0: the default)"),
      cli.option<unsigned long>("seed", 0, "random seed"),
  };
}

/// What an example adds to the report of sample_cfg_and_report.
struct CfgReport {
  std::string program;
  std::chrono::steady_clock::time_point started;  ///< the start of the run ("done in")
  train::TrainResult training = {};               ///< its steps and seconds go to the CSV
  std::string weights = "";        ///< the EMA weights file train_cfm wrote (listed at the end)
  std::string sampled_where = "";  ///< after "NFE of a 2N batch" in the table's footnote
  std::string note = "";           ///< more lines printed after the footnote
  std::vector<std::pair<std::string, std::string>> csv = {};  ///< after train_seconds
  std::vector<std::filesystem::path> files = {};              ///< more files written, listed first
};

/// The report after training of the CFG examples: for each w of flags.ws, cfg(model, w) sampled
/// and scored by sample_and_score (flags.eval_per_class images per class against flags.eval_real
/// test images, flags.ode_sampler with flags.sample_steps steps from the noise of seed + 3,
/// `sample` the shape of one sample, `to_images` the decoder) into out/samples_w<w>.png; then the
/// metrics table with its footnote and r.note, out/metrics.csv (train_steps, train_seconds, r.csv), "done in" and the
/// files written. The model samples on its backend (sample_and_score copies noise, labels and
/// samples).
template <class M, class ToImages = PixelImages>
void sample_cfg_and_report(const CfgReport& r, const FashionFlags& flags, const M& model,
                           const nn::Parameters<float, nn::model_backend_t<M>>& ps,
                           const metrics::TrainedClassifier<float>& classifier,
                           const data::ImageDataset& test, const Shape& sample,
                           ToImages to_images = {}) {
  const std::filesystem::path out(flags.out);
  Evaluation eval(classifier, test, flags.eval_per_class, flags.eval_real);
  const SampleNoise noise(eval, sample, flags.seed + 3);
  const auto& tgrid = flags.time_grid;
  std::vector<WResult> results;
  std::vector<std::string> pictures;
  for (const float w : flags.ws) {
    auto field = cfg(nn::as_field(model, ps), w);
    char name[64];
    std::snprintf(name, sizeof name, "samples_w%g.png", w);
    results.push_back(
        sample_and_score(r.program, "", w, field, noise, eval, tgrid, out / name, to_images,
                         flags.ode_sampler));
    pictures.push_back((out / name).string());
  }

  print_metrics(results, eval.floor());
  std::printf(
      "(%ld generated images per w, %s %ld steps (%s grid) = %ld NFE of a 2N batch%s; "
      "Frechet distance to %ld real test images; 'real': %ld other test images)\n%s",
      static_cast<long>(eval.eval_size()), sampler_name(flags.ode_sampler), flags.sample_steps,
      flags.grid.c_str(), evaluations_per_step(flags.ode_sampler) * flags.sample_steps,
      r.sampled_where.c_str(), static_cast<long>(eval.reference_size()),
      static_cast<long>(eval.floor_size()), r.note.c_str());
  std::vector<std::pair<std::string, std::string>> csv{
      {"train_steps", csv_value(r.training.last_step)},
      {"train_seconds", csv_value(r.training.seconds)},
      {"sampler", sampler_name(flags.ode_sampler)},
      {"sample_steps", csv_value(flags.sample_steps)},
      {"grid", flags.grid}};
  csv.insert(csv.end(), r.csv.begin(), r.csv.end());
  write_metrics_csv(r.program, out / "metrics.csv", results, csv, eval.floor());

  std::printf("\n%s: done in %.1f s\n", r.program.c_str(), seconds_since(r.started));
  for (const auto& p : pictures) std::printf("wrote %s\n", p.c_str());
  std::vector<std::filesystem::path> files = r.files;
  for (const char* f : {"metrics.csv", "loss.png"}) files.push_back(out / f);
  files.push_back(out / r.weights);
  files.push_back(out / "checkpoint.safetensors");
  std::string list;
  for (std::size_t i = 0; i < files.size(); ++i)
    list += (i == 0 ? "" : i + 1 == files.size() ? " and " : ", ") + files[i].string();
  std::printf("wrote %s\n", list.c_str());
}

/// train_cfm, then sample_cfg_and_report, for the model where it lives (nn::UNet / nn::DiT on the
/// CPU, or a backend model with its parameters on a device): r.training and r.weights come from
/// the training.
template <class M, class Source, class ToImages = PixelImages>
void train_cfm_and_report(CfgReport r, const FashionFlags& flags, const CfmTraining& training,
                          const M& model, nn::Parameters<float, nn::model_backend_t<M>>& ps,
                          Source& source, const metrics::TrainedClassifier<float>& classifier,
                          const data::ImageDataset& test, const Shape& sample,
                          ToImages to_images = {}) {
  r.training = train_cfm(r.program, model, ps, source, training);
  r.weights = training.weights;
  sample_cfg_and_report(r, flags, model, std::as_const(ps), classifier, test, sample, to_images);
}

}  // namespace flowdiff::examples
