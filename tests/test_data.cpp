// Tests of flowdiff/data/: the IDX reader (raw and gzip files written here, and every kind of
// corrupt input), the Fashion-MNIST loader (the Debian files when installed, generated files via
// the environment override), the toy 2D distributions (exact geometric facts per kind, label
// frequencies, determinism and batch/thread independence) and the mini-batch Batcher.
#include <zlib.h>

#include <catch2/catch.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "support/files.hpp"

#include "flowdiff/flowdiff.hpp"

namespace fd = flowdiff;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

using flowdiff::test::TempDir;

/// The bytes of an IDX file: magic 0 0 type ndim, big-endian extents, payload.
std::vector<unsigned char> idx_bytes(const std::vector<std::uint32_t>& dims,
                                     const std::vector<unsigned char>& payload,
                                     unsigned type = 0x08) {
  std::vector<unsigned char> b{0, 0, static_cast<unsigned char>(type),
                               static_cast<unsigned char>(dims.size())};
  for (auto d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<unsigned char>(d >> s));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

void write_raw(const fs::path& p, const std::vector<unsigned char>& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

void write_gz(const fs::path& p, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(p.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<unsigned char> read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<unsigned char> iota_bytes(std::size_t n, unsigned start = 0) {
  std::vector<unsigned char> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>((start + i * 7) & 0xFF);
  return v;
}

/// Sets an environment variable for the scope of a test and restores the old value.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(std::string n, const std::string& value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old)
      ::setenv(name.c_str(), old->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

/// Writes a small Fashion-MNIST-shaped split (n images of h x w, labels i % 10) into dir.
void write_fake_fashion(const fs::path& dir, const std::string& prefix, std::uint32_t n,
                        std::uint32_t h, std::uint32_t w, bool gz, std::uint32_t n_labels = 0) {
  if (n_labels == 0) n_labels = n;
  std::vector<unsigned char> labels(n_labels);
  for (std::uint32_t i = 0; i < n_labels; ++i) labels[i] = static_cast<unsigned char>(i % 10);
  const auto im = idx_bytes({n, h, w}, iota_bytes(std::size_t{n} * h * w));
  const auto lb = idx_bytes({n_labels}, labels);
  const std::string ext = gz ? ".gz" : "";
  if (gz) {
    write_gz(dir / (prefix + "-images-idx3-ubyte" + ext), im);
    write_gz(dir / (prefix + "-labels-idx1-ubyte" + ext), lb);
  } else {
    write_raw(dir / (prefix + "-images-idx3-ubyte"), im);
    write_raw(dir / (prefix + "-labels-idx1-ubyte"), lb);
  }
}

}  // namespace

// --------------------------------------------------------------------------------------------- IDX
// ---------------------------------------------------------------------------------------------

TEST_CASE("read_idx reads raw and gzip files", "[data][idx]") {
  TempDir tmp("idx_ok");
  const auto payload = iota_bytes(3 * 4 * 5, 11);
  const auto bytes = idx_bytes({3, 4, 5}, payload);
  write_raw(tmp / "a.idx", bytes);
  write_gz(tmp / "a.idx.gz", bytes);
  for (const auto* name : {"a.idx", "a.idx.gz"}) {
    INFO(name);
    const auto a = fd::data::read_idx(tmp / name);
    CHECK(a.dims == std::vector<fd::index_t>{3, 4, 5});
    CHECK(a.data == std::vector<std::uint8_t>(payload.begin(), payload.end()));
  }
  // Extents are big-endian: 258 is stored as 00 00 01 02.
  const auto long_payload = iota_bytes(258);
  write_raw(tmp / "b.idx", idx_bytes({258}, long_payload));
  const auto b = fd::data::read_idx(tmp / "b.idx");
  CHECK(b.dims == std::vector<fd::index_t>{258});
  CHECK(b.data.size() == 258);
  CHECK(b.data[257] == long_payload[257]);
}

TEST_CASE("read_idx rejects corrupt files with messages that say what is wrong", "[data][idx]") {
  TempDir tmp("idx_bad");
  const auto payload = iota_bytes(2 * 3);
  const auto good = idx_bytes({2, 3}, payload);
  const auto path = [&](const char* f) { return tmp / f; };

  SECTION("missing file") {
    CHECK_THROWS_MATCHES(fd::data::read_idx(path("none.idx")), fd::io_error,
                         Catch::Matchers::Predicate<fd::io_error>([&](const fd::io_error& e) {
                           const std::string m = e.what();
                           return m.find("none.idx") != std::string::npos &&
                                  m.find("no such file") != std::string::npos;
                         }));
  }
  SECTION("wrong magic") {
    auto b = good;
    b[0] = 0x12;
    write_raw(path("magic.idx"), b);
    CHECK_THROWS_AS(fd::data::read_idx(path("magic.idx")), fd::io_error);
    CHECK_THROWS_WITH(fd::data::read_idx(path("magic.idx")),
                      Contains("magic.idx") && Contains("not an IDX file") && Contains("0x12"));
  }
  SECTION("wrong element type") {
    write_raw(path("type.idx"), idx_bytes({2, 3}, payload, 0x0D));
    CHECK_THROWS_AS(fd::data::read_idx(path("type.idx")), fd::io_error);
    CHECK_THROWS_WITH(
        fd::data::read_idx(path("type.idx")),
        Contains("type.idx") && Contains("0xd (float32)") && Contains("only 0x08 (unsigned byte)"));
  }
  SECTION("zero dimensions") {
    write_raw(path("ndim0.idx"), idx_bytes({}, {}));
    CHECK_THROWS_WITH(fd::data::read_idx(path("ndim0.idx")),
                      Contains("ndim0.idx") && Contains("0 dimensions"));
    write_raw(path("extent0.idx"), idx_bytes({2, 0}, {}));
    CHECK_THROWS_AS(fd::data::read_idx(path("extent0.idx")), fd::io_error);
    CHECK_THROWS_WITH(fd::data::read_idx(path("extent0.idx")),
                      Contains("extent0.idx") && Contains("dimension 1 of [2, 0] is 0"));
    write_raw(path("first0.idx"), idx_bytes({0, 5}, {}));
    CHECK_THROWS_WITH(fd::data::read_idx(path("first0.idx")),
                      Contains("dimension 0 of [0, 5] is 0"));
  }
  SECTION("dimensions that overflow") {
    write_raw(path("huge.idx"), idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
    CHECK_THROWS_WITH(
        fd::data::read_idx(path("huge.idx")),
        Contains("huge.idx") && Contains("dimensions [4294967295, 4294967295] overflow"));
  }
  SECTION("a huge header with no payload fails without allocating it") {
    write_raw(path("big.idx"), idx_bytes({0xFFFFu, 0xFFFFu, 0x3FFu}, iota_bytes(10)));
    CHECK_THROWS_WITH(fd::data::read_idx(path("big.idx")),
                      Contains("truncated payload") && Contains("got 10"));
  }
  SECTION("truncated header and file shorter than the magic") {
    write_raw(path("short.idx"), {0, 0});
    CHECK_THROWS_WITH(fd::data::read_idx(path("short.idx")),
                      Contains("short.idx") && Contains("too short for the 4-byte IDX magic"));
    auto b = good;
    b.resize(6);
    write_raw(path("header.idx"), b);
    CHECK_THROWS_WITH(fd::data::read_idx(path("header.idx")), Contains("truncated header") &&
                                                                  Contains("need 8 bytes") &&
                                                                  Contains("got 2"));
  }
  SECTION("truncated payload, raw and gzip") {
    auto b = good;
    b.pop_back();
    write_raw(path("trunc.idx"), b);
    write_gz(path("trunc.idx.gz"), b);
    for (const char* f : {"trunc.idx", "trunc.idx.gz"}) {
      INFO(f);
      CHECK_THROWS_AS(fd::data::read_idx(path(f)), fd::io_error);
      CHECK_THROWS_WITH(fd::data::read_idx(path(f)),
                        Contains(f) && Contains("truncated payload") && Contains("[2, 3]") &&
                            Contains("need 6 bytes") && Contains("got 5"));
    }
  }
  SECTION("trailing data, raw and gzip") {
    auto b = good;
    b.push_back(1);
    b.push_back(2);
    write_raw(path("trail.idx"), b);
    write_gz(path("trail.idx.gz"), b);
    for (const char* f : {"trail.idx", "trail.idx.gz"}) {
      INFO(f);
      CHECK_THROWS_WITH(fd::data::read_idx(path(f)), Contains(f) && Contains("trailing data") &&
                                                         Contains("need 6 bytes") &&
                                                         Contains("got 8 (2 too many)"));
    }
  }
  SECTION("truncated gzip stream") {
    write_gz(path("full.gz"), idx_bytes({64, 64}, iota_bytes(64 * 64)));
    auto z = read_all(path("full.gz"));
    REQUIRE(z.size() > 40);
    z.resize(z.size() / 2);
    write_raw(path("cut.gz"), z);
    CHECK_THROWS_AS(fd::data::read_idx(path("cut.gz")), fd::io_error);
    CHECK_THROWS_WITH(fd::data::read_idx(path("cut.gz")),
                      Contains("cut.gz") && Contains("corrupt or truncated gzip data"));
    // Only the 8-byte gzip trailer (CRC and size) missing is detected too.
    z = read_all(path("full.gz"));
    z.resize(z.size() - 8);
    write_raw(path("notrailer.gz"), z);
    CHECK_THROWS_WITH(fd::data::read_idx(path("notrailer.gz")),
                      Contains("corrupt or truncated gzip data"));
  }
  SECTION("corrupt gzip data") {
    write_gz(path("full.gz"), idx_bytes({64, 64}, iota_bytes(64 * 64)));
    auto z = read_all(path("full.gz"));
    for (std::size_t i = 12; i < z.size() - 8; ++i) z[i] = static_cast<unsigned char>(z[i] ^ 0x5A);
    write_raw(path("bad.gz"), z);
    CHECK_THROWS_AS(fd::data::read_idx(path("bad.gz")), fd::io_error);
  }
  SECTION("a directory") {
    CHECK_THROWS_WITH(fd::data::read_idx(tmp.path), Contains("is a directory"));
  }
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST
// ---------------------------------------------------------------------------------------------

TEST_CASE("fashion_mnist on the installed Debian files", "[data][fashion]") {
  const fs::path dir = fd::data::fashion_mnist_default_dir;
  fd::data::FashionMnistOptions opt;
  opt.dir = dir;
  if (!fs::exists(dir / "t10k-images-idx3-ubyte.gz") &&
      !fs::exists(dir / "t10k-images-idx3-ubyte")) {
    WARN("Fashion-MNIST is not installed in " << dir
                                              << " (apt-get install dataset-fashion-mnist): "
                                                 "only the missing-file error is checked");
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("apt-get install dataset-fashion-mnist"));
    return;
  }
  SECTION("first 100 test images") {
    opt.limit = 100;
    const auto ds = fd::data::fashion_mnist(fd::data::Split::Test, opt);
    CHECK(ds.images.shape() == fd::Shape{100, 1, 28, 28});
    CHECK(ds.labels.shape() == fd::Shape{100});
    CHECK(ds.num_classes == 10);
    CHECK(ds.size() == 100);
    float lo = 2, hi = -2;
    for (fd::index_t i = 0; i < ds.images.numel(); ++i) {
      lo = std::min(lo, ds.images[i]);
      hi = std::max(hi, ds.images[i]);
      // Every value is p / 127.5 - 1 for an integer p in [0, 255].
      const float p = (ds.images[i] + 1.0f) * 127.5f;
      REQUIRE(std::abs(p - std::round(p)) < 1e-3f);
    }
    CHECK(lo == -1.0f);
    CHECK(hi == 1.0f);
    for (fd::index_t i = 0; i < 100; ++i) {
      CHECK(ds.labels[i] >= 0);
      CHECK(ds.labels[i] < 10);
    }
  }
  SECTION("the whole test split: 10000 images, 1000 of each class; padding") {
    const auto ds = fd::data::fashion_mnist(fd::data::Split::Test, opt);
    REQUIRE(ds.images.shape() == fd::Shape{10000, 1, 28, 28});
    std::vector<int> count(10, 0);
    for (fd::index_t i = 0; i < 10000; ++i) ++count[static_cast<std::size_t>(ds.labels[i])];
    CHECK(count == std::vector<int>(10, 1000));

    opt.pad_to_32 = true;
    opt.limit = 20;
    const auto padded = fd::data::fashion_mnist(fd::data::Split::Test, opt);
    REQUIRE(padded.images.shape() == fd::Shape{20, 1, 32, 32});
    bool border_ok = true, inner_ok = true;
    for (int i = 0; i < 20; ++i)
      for (int r = 0; r < 32; ++r)
        for (int c = 0; c < 32; ++c) {
          const float v = padded.images(i, 0, r, c);
          if (r < 2 || r >= 30 || c < 2 || c >= 30)
            border_ok = border_ok && v == -1.0f;
          else
            inner_ok = inner_ok && v == ds.images(i, 0, r - 2, c - 2);
        }
    CHECK(border_ok);
    CHECK(inner_ok);
    for (int i = 0; i < 20; ++i) CHECK(padded.labels[i] == ds.labels[i]);
  }
  SECTION("class names") {
    const auto names = fd::data::fashion_mnist_class_names();
    REQUIRE(names.size() == 10);
    CHECK(std::string(names[0]) == "T-shirt/top");
    CHECK(std::string(names[9]) == "Ankle boot");
  }
}

TEST_CASE(
    "fashion_mnist finds its files through options, the environment and "
    "both names",
    "[data][fashion]") {
  TempDir tmp("fashion_env");
  write_fake_fashion(tmp.path, "t10k", 12, 28, 28, /*gz=*/true);
  write_fake_fashion(tmp.path, "train", 7, 28, 28, /*gz=*/false);
  {
    ScopedEnv env("FLOWDIFF_FASHION_MNIST", tmp.path.string());
    CHECK(fd::data::fashion_mnist_dir() == tmp.path);
    const auto test = fd::data::fashion_mnist(fd::data::Split::Test);
    CHECK(test.images.shape() == fd::Shape{12, 1, 28, 28});
    const auto train = fd::data::fashion_mnist(fd::data::Split::Train);  // uncompressed names
    CHECK(train.images.shape() == fd::Shape{7, 1, 28, 28});
    for (int i = 0; i < 7; ++i) CHECK(train.labels[i] == i % 10);
    // pixel (i, r, c) was byte (i*784 + r*28 + c) * 7 mod 256
    const auto expect = [](long k) { return static_cast<float>((k * 7) & 0xFF) / 127.5f - 1.0f; };
    CHECK(train.images(3, 0, 5, 9) == expect(3 * 784 + 5 * 28 + 9));
    // An explicit directory wins over the environment.
    fd::data::FashionMnistOptions opt;
    opt.dir = tmp.path / "elsewhere";
    CHECK(fd::data::fashion_mnist_dir(opt) == opt.dir);
    CHECK_THROWS_AS(fd::data::fashion_mnist(fd::data::Split::Test, opt), fd::io_error);
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("elsewhere") && Contains("does not exist") &&
                          Contains("apt-get install dataset-fashion-mnist") &&
                          Contains("FLOWDIFF_FASHION_MNIST"));
    // limit larger than the split gives the whole split.
    opt.dir = tmp.path;
    opt.limit = 1000;
    CHECK(fd::data::fashion_mnist(fd::data::Split::Train, opt).size() == 7);
    opt.limit = -1;
    CHECK_THROWS_AS(fd::data::fashion_mnist(fd::data::Split::Train, opt), fd::config_error);
  }
  {
    ScopedEnv env("FLOWDIFF_FASHION_MNIST", "");
    CHECK(fd::data::fashion_mnist_dir() == fs::path(fd::data::fashion_mnist_default_dir));
  }
}

TEST_CASE("fashion_mnist rejects inconsistent files", "[data][fashion]") {
  TempDir tmp("fashion_bad");
  fd::data::FashionMnistOptions opt;
  opt.dir = tmp.path;
  SECTION("a missing labels file") {
    write_fake_fashion(tmp.path, "t10k", 4, 28, 28, true);
    fs::remove(tmp / "t10k-labels-idx1-ubyte.gz");
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("cannot find t10k-labels-idx1-ubyte.gz or "
                               "t10k-labels-idx1-ubyte") &&
                          Contains(tmp.path.string()) && Contains("apt-get install"));
  }
  SECTION("counts that disagree") {
    write_fake_fashion(tmp.path, "t10k", 4, 28, 28, true, /*n_labels=*/5);
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("holds 4 images") && Contains("holds 5 labels"));
  }
  SECTION("a label out of range") {
    write_fake_fashion(tmp.path, "t10k", 3, 28, 28, false);
    write_raw(tmp / "t10k-labels-idx1-ubyte", idx_bytes({3}, {1, 2, 10}));
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("label 10 at index 2 is not in [0, 10)"));
  }
  SECTION("images that are not [N, H, W], or too big to pad") {
    write_fake_fashion(tmp.path, "t10k", 3, 28, 28, false);
    write_raw(tmp / "t10k-images-idx3-ubyte", idx_bytes({3, 784}, iota_bytes(3 * 784)));
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("must hold images [N, H, W]") && Contains("[3, 784]"));
    write_fake_fashion(tmp.path, "t10k", 3, 34, 30, false);
    opt.pad_to_32 = true;
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("pad_to_32") && Contains("34 x 30"));
  }
}

// --------------------------------------------------------------------------------------------- Toy
// 2D distributions
// ---------------------------------------------------------------------------------------------

namespace {

using fd::data::Toy2D;
constexpr double kPi = 3.14159265358979323846;

/// Label counts are multinomial with p = 1/K: each within 5 binomial standard deviations.
void check_uniform_labels(const fd::Tensor<fd::label_t>& y, fd::index_t k) {
  std::vector<double> count(static_cast<std::size_t>(k), 0);
  for (fd::index_t i = 0; i < y.numel(); ++i) {
    REQUIRE(y[i] >= 0);
    REQUIRE(y[i] < k);
    ++count[static_cast<std::size_t>(y[i])];
  }
  const double n = static_cast<double>(y.numel()), p = 1.0 / static_cast<double>(k);
  const double sd = std::sqrt(n * p * (1 - p));
  for (fd::index_t c = 0; c < k; ++c) {
    INFO("class " << c << ": " << count[static_cast<std::size_t>(c)] << " of " << n);
    CHECK(std::abs(count[static_cast<std::size_t>(c)] - n * p) <= 5 * sd);
  }
}

/// Per-class mean and per-axis variance of x: [N, 2].
struct ClassMoments {
  std::vector<double> n, mx, my, vx, vy;
};
ClassMoments class_moments(const fd::Tensor<float>& x, const fd::Tensor<fd::label_t>& y,
                           fd::index_t k) {
  const auto K = static_cast<std::size_t>(k);
  ClassMoments m{std::vector<double>(K), std::vector<double>(K), std::vector<double>(K),
                 std::vector<double>(K), std::vector<double>(K)};
  for (fd::index_t i = 0; i < y.numel(); ++i) {
    const auto c = static_cast<std::size_t>(y[i]);
    m.n[c] += 1;
    m.mx[c] += x(i, 0);
    m.my[c] += x(i, 1);
  }
  for (std::size_t c = 0; c < K; ++c) m.mx[c] /= m.n[c], m.my[c] /= m.n[c];
  for (fd::index_t i = 0; i < y.numel(); ++i) {
    const auto c = static_cast<std::size_t>(y[i]);
    m.vx[c] += (x(i, 0) - m.mx[c]) * (x(i, 0) - m.mx[c]);
    m.vy[c] += (x(i, 1) - m.my[c]) * (x(i, 1) - m.my[c]);
  }
  for (std::size_t c = 0; c < K; ++c) m.vx[c] /= m.n[c] - 1, m.vy[c] /= m.n[c] - 1;
  return m;
}

bool all_finite(const fd::Tensor<float>& x) {
  for (fd::index_t i = 0; i < x.numel(); ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

}  // namespace

TEST_CASE("toy2d names round-trip; unknown names list the choices", "[data][toy2d]") {
  for (Toy2D k :
       {Toy2D::Gaussians, Toy2D::Moons, Toy2D::Circles, Toy2D::Checkerboard, Toy2D::Spirals})
    CHECK(fd::data::toy2d_from_name(fd::data::toy2d_name(k)) == k);
  CHECK(fd::data::toy2d_name(Toy2D::Checkerboard) == "checkerboard");
  CHECK_THROWS_AS(fd::data::toy2d_from_name("swissroll"), fd::config_error);
  CHECK_THROWS_WITH(
      fd::data::toy2d_from_name("swissroll"),
      Contains("'swissroll'") && Contains("gaussians, moons, circles, checkerboard, spirals"));
}

TEST_CASE("toy2d: 8 Gaussians match their mixture, moments and labels", "[data][toy2d]") {
  const fd::data::Toy2DDistribution<float> dist(Toy2D::Gaussians);
  REQUIRE(dist.num_classes() == 8);
  REQUIRE(dist.noise() == 0.2f);
  fd::Generator gen{11};
  const fd::index_t n = 8000;
  const auto s = dist.sample(n, gen);
  REQUIRE(all_finite(s.x));
  check_uniform_labels(s.labels, 8);
  const auto m = class_moments(s.x, s.labels, 8);
  const auto mix = dist.gaussian_mixture();
  REQUIRE(mix.num_components() == 8);
  REQUIRE(mix.num_classes() == 8);
  for (fd::index_t k = 0; k < 8; ++k) {
    const auto c = static_cast<std::size_t>(k);
    const double a = 2 * kPi * static_cast<double>(k) / 8;
    CHECK(mix.mean(k, 0) == Approx(2 * std::cos(a)).margin(1e-6));
    CHECK(mix.mean(k, 1) == Approx(2 * std::sin(a)).margin(1e-6));
    CHECK(mix.stddev(k, 0) == 0.2f);
    CHECK(mix.weight(k) == Approx(0.125));
    CHECK(mix.label(k) == k);
    // Mean within 5 standard errors; variance within 5 sd of the sample variance (2 s^4/(n-1)).
    const double se = 0.2 / std::sqrt(m.n[c]), var_sd = 0.04 * std::sqrt(2 / (m.n[c] - 1));
    CHECK(std::abs(m.mx[c] - mix.mean(k, 0)) <= 5 * se);
    CHECK(std::abs(m.my[c] - mix.mean(k, 1)) <= 5 * se);
    CHECK(std::abs(m.vx[c] - 0.04) <= 5 * var_sd);
    CHECK(std::abs(m.vy[c] - 0.04) <= 5 * var_sd);
  }
  // The exact classifier of the mixture recognises the labels (components 7.6 sigma apart).
  fd::Tensor<float> logp(fd::Shape{n});
  mix.class_log_prob(s.x, logp, s.labels);
  double mean_p = 0;
  for (fd::index_t i = 0; i < n; ++i) mean_p += std::exp(static_cast<double>(logp[i])) / n;
  CHECK(mean_p > 0.99);
  CHECK_THROWS_WITH(fd::data::Toy2DDistribution<float>(Toy2D::Moons).gaussian_mixture(),
                    Contains("moons") && Contains("only the gaussians"));
  // A configurable mixture: 3 modes.
  const fd::data::Toy2DDistribution<float> three(Toy2D::Gaussians, 0.1f, 3);
  CHECK(three.num_classes() == 3);
  CHECK(three.gaussian_mixture().num_components() == 3);
}

TEST_CASE("toy2d: moons lie on their arcs, with the exact class means", "[data][toy2d]") {
  fd::Generator gen{12};
  const auto exact = fd::data::Toy2DDistribution<float>(Toy2D::Moons, 0.0f).sample(4000, gen);
  check_uniform_labels(exact.labels, 2);
  for (fd::index_t i = 0; i < 4000; ++i) {
    const double s = exact.labels[i] == 0 ? 1 : -1;
    // Undo the class's map: (cos theta, sin theta) = s x / 2 + (1/2, 1/4), theta in [0, pi].
    const double c = s * exact.x(i, 0) / 2 + 0.5, sn = s * exact.x(i, 1) / 2 + 0.25;
    REQUIRE(std::hypot(c, sn) == Approx(1).margin(1e-5));
    REQUIRE(sn >= -1e-6);
  }
  const fd::index_t n = 8000;
  const auto s = fd::data::Toy2DDistribution<float>(Toy2D::Moons).sample(n, gen);
  const auto m = class_moments(s.x, s.labels, 2);
  // Class 0: E x = 2 (E cos - 1/2) = -1, E y = 2 (2/pi - 1/4); Var x = 2 + s^2, Var y = 2 - 16/pi^2
  // + s^2. Class 1 is the point reflection.
  const double ey = 4 / kPi - 0.5, sdx = std::sqrt(2 + 0.01),
               sdy = std::sqrt(2 - 16 / (kPi * kPi) + 0.01);
  for (std::size_t c = 0; c < 2; ++c) {
    const double sign = c == 0 ? 1 : -1;
    CHECK(std::abs(m.mx[c] - sign * -1) <= 5 * sdx / std::sqrt(m.n[c]));
    CHECK(std::abs(m.my[c] - sign * ey) <= 5 * sdy / std::sqrt(m.n[c]));
    CHECK(std::sqrt(m.vx[c]) == Approx(sdx).epsilon(0.05));
    CHECK(std::sqrt(m.vy[c]) == Approx(sdy).epsilon(0.05));
  }
  CHECK_THROWS_WITH(fd::data::Toy2DDistribution<float>(Toy2D::Moons, 0.1f, 3),
                    Contains("exactly 2 moons"));
}

TEST_CASE("toy2d: circles have the radius of their class", "[data][toy2d]") {
  fd::Generator gen{13};
  const fd::data::Toy2DDistribution<float> exact(Toy2D::Circles, 0.0f, 3);
  REQUIRE(exact.num_classes() == 3);
  const auto e = exact.sample(3000, gen);
  check_uniform_labels(e.labels, 3);
  for (fd::index_t i = 0; i < 3000; ++i)
    REQUIRE(std::hypot(e.x(i, 0), e.x(i, 1)) == Approx(2.0 * (e.labels[i] + 1) / 3).margin(1e-5));
  // With noise 0.05 the mean radius is r + sigma^2 / (2 r) + O(sigma^4), spread about sigma.
  const auto s = fd::data::Toy2DDistribution<float>(Toy2D::Circles).sample(4000, gen);
  std::vector<double> sum(2), cnt(2);
  for (fd::index_t i = 0; i < 4000; ++i) {
    const auto c = static_cast<std::size_t>(s.labels[i]);
    sum[c] += std::hypot(s.x(i, 0), s.x(i, 1));
    cnt[c] += 1;
  }
  for (std::size_t c = 0; c < 2; ++c) {
    const double r = static_cast<double>(c + 1);
    CHECK(std::abs(sum[c] / cnt[c] - (r + 0.0025 / (2 * r))) <= 5 * 0.05 / std::sqrt(cnt[c]));
  }
}

TEST_CASE("toy2d: checkerboard points lie in the dark cell of their class, uniformly",
          "[data][toy2d]") {
  for (fd::index_t side : {4, 3}) {
    const fd::data::Toy2DDistribution<float> dist(Toy2D::Checkerboard, 0.0f, side);
    const fd::index_t k = dist.num_classes();
    CHECK(k == (side * side + 1) / 2);
    fd::Generator gen{14};
    const fd::index_t n = 6000;
    const auto s = dist.sample(n, gen);
    check_uniform_labels(s.labels, k);
    const double h = 4.0 / static_cast<double>(side);
    std::vector<double> mx(static_cast<std::size_t>(k)), my(mx), cnt(mx);
    for (fd::index_t i = 0; i < n; ++i) {
      const double x = s.x(i, 0), y = s.x(i, 1);
      const auto ci = static_cast<fd::index_t>(std::floor((x + 2) / h));
      const auto cj = static_cast<fd::index_t>(std::floor((y + 2) / h));
      REQUIRE(ci >= 0);
      REQUIRE(ci < side);
      REQUIRE(cj >= 0);
      REQUIRE(cj < side);
      REQUIRE((ci + cj) % 2 == 0);  // a dark cell
      float x0 = 0, y0 = 0, cell = 0;
      dist.checkerboard_cell(s.labels[i], x0, y0, cell);
      REQUIRE(cell == Approx(h));
      REQUIRE(x >= x0 - 1e-6);  // the cell of its class
      REQUIRE(x <= x0 + h + 1e-6);
      REQUIRE(y >= y0 - 1e-6);
      REQUIRE(y <= y0 + h + 1e-6);
      const auto c = static_cast<std::size_t>(s.labels[i]);
      mx[c] += x - x0;
      my[c] += y - y0;
      cnt[c] += 1;
    }
    // Uniform in the cell: mean offset h/2, standard error h / sqrt(12 n).
    for (std::size_t c = 0; c < static_cast<std::size_t>(k); ++c) {
      CHECK(std::abs(mx[c] / cnt[c] - h / 2) <= 5 * h / std::sqrt(12 * cnt[c]));
      CHECK(std::abs(my[c] / cnt[c] - h / 2) <= 5 * h / std::sqrt(12 * cnt[c]));
    }
    // Every dark cell is some class's: the cells are distinct.
    for (fd::index_t a = 0; a < k; ++a)
      for (fd::index_t b = a + 1; b < k; ++b) {
        float ax, ay, bx, by, hh;
        dist.checkerboard_cell(a, ax, ay, hh);
        dist.checkerboard_cell(b, bx, by, hh);
        CHECK((ax != bx || ay != by));
      }
  }
}

TEST_CASE("toy2d: spiral radius grows with the angle along each arm", "[data][toy2d]") {
  const fd::data::Toy2DDistribution<float> dist(Toy2D::Spirals, 0.0f, 3);
  fd::Generator gen{15};
  const auto s = dist.sample(3000, gen);
  check_uniform_labels(s.labels, 3);
  double max_r = 0;
  for (fd::index_t i = 0; i < 3000; ++i) {
    const double r = std::hypot(s.x(i, 0), s.x(i, 1));
    max_r = std::max(max_r, r);
    REQUIRE(r <= 2 + 1e-6);
    if (r < 1e-3) continue;
    // phi = 2 pi y / K + 3 pi t with r = 2 t: the angle, unwrapped, is an affine function of r.
    const double phi = std::atan2(s.x(i, 1), s.x(i, 0));
    const double expected = 2 * kPi * s.labels[i] / 3 + 1.5 * kPi * r;
    const double d = std::remainder(phi - expected, 2 * kPi);
    REQUIRE(std::abs(d) < 1e-3 / std::min(r, 1.0));
  }
  CHECK(max_r > 1.95);
  // With noise: points stay near their arm (mean distance to the noiseless radius/angle relation).
  const auto noisy = fd::data::Toy2DDistribution<float>(Toy2D::Spirals).sample(2000, gen);
  REQUIRE(all_finite(noisy.x));
  check_uniform_labels(noisy.labels, 2);
}

TEST_CASE("toy2d: scale and centre of every kind", "[data][toy2d]") {
  fd::Generator gen{16};
  for (Toy2D kind :
       {Toy2D::Gaussians, Toy2D::Moons, Toy2D::Circles, Toy2D::Checkerboard, Toy2D::Spirals}) {
    INFO(fd::data::toy2d_name(kind));
    const auto s = fd::data::Toy2DDistribution<float>(kind).sample(6000, gen);
    double m[2] = {0, 0}, v[2] = {0, 0};
    for (fd::index_t i = 0; i < 6000; ++i)
      for (int j = 0; j < 2; ++j) m[j] += s.x(i, j) / 6000.0;
    for (fd::index_t i = 0; i < 6000; ++i)
      for (int j = 0; j < 2; ++j) v[j] += (s.x(i, j) - m[j]) * (s.x(i, j) - m[j]) / 5999.0;
    for (int j = 0; j < 2; ++j) {
      CHECK(std::abs(m[j]) < 5 * std::sqrt(v[j] / 6000) + 0.02);  // centred (spirals: ~0)
      CHECK(std::sqrt(v[j]) > 0.8);
      CHECK(std::sqrt(v[j]) < 2.0);
    }
  }
}

TEST_CASE("toy2d: determinism, batch-size and thread-count independence", "[data][toy2d]") {
  for (Toy2D kind :
       {Toy2D::Gaussians, Toy2D::Moons, Toy2D::Circles, Toy2D::Checkerboard, Toy2D::Spirals}) {
    INFO(fd::data::toy2d_name(kind));
    const fd::data::Toy2DDistribution<float> dist(kind);
    fd::Generator g1{99}, g2{99}, g3{99}, g4{100};
    const auto a = dist.sample(5000, g1);
    const auto b = dist.sample(5000, g2);
    CHECK(a.x.to_vector() == b.x.to_vector());
    CHECK(a.labels.to_vector() == b.labels.to_vector());
    // The first 37 samples of a 37-sample batch are those of the 5000-sample batch.
    const auto small = dist.sample(37, g3);
    for (fd::index_t i = 0; i < 37; ++i) {
      REQUIRE(small.x(i, 0) == a.x(i, 0));
      REQUIRE(small.x(i, 1) == a.x(i, 1));
      REQUIRE(small.labels[i] == a.labels[i]);
    }
    CHECK(dist.sample(5000, g4).x.to_vector() != a.x.to_vector());
    // Consecutive calls draw fresh samples.
    CHECK(dist.sample(5000, g1).x.to_vector() != a.x.to_vector());
#if defined(_OPENMP)
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    fd::Generator g5{99};
    const auto serial = dist.sample(5000, g5);
    omp_set_num_threads(std::max(threads, 2));
    CHECK(serial.x.to_vector() == a.x.to_vector());
    CHECK(serial.labels.to_vector() == a.labels.to_vector());
    omp_set_num_threads(threads);
#endif
    // Labels may be skipped; the points are the same.
    fd::Generator g6{99};
    fd::Tensor<float> x(fd::Shape{5000, 2});
    dist.sample(x, {}, g6);
    CHECK(x.to_vector() == a.x.to_vector());
  }
  // double works too, and agrees with float to float precision for the class draws.
  fd::Generator gd{5}, gf{5};
  const auto d = fd::data::Toy2DDistribution<double>(Toy2D::Circles).sample(100, gd);
  const auto f = fd::data::Toy2DDistribution<float>(Toy2D::Circles).sample(100, gf);
  CHECK(d.labels.to_vector() == f.labels.to_vector());
}

TEST_CASE("toy2d: bad shapes and parameters name the problem", "[data][toy2d]") {
  const fd::data::Toy2DDistribution<float> dist(Toy2D::Spirals);
  fd::Generator gen{1};
  fd::Tensor<float> x3(fd::Shape{4, 3}), x2(fd::Shape{4, 2});
  fd::Tensor<fd::label_t> y5(fd::Shape{5});
  CHECK_THROWS_AS(dist.sample(x3, {}, gen), fd::shape_error);
  CHECK_THROWS_WITH(dist.sample(x3, {}, gen),
                    Contains("spirals") && Contains("x must be [N, 2], got [4, 3]"));
  CHECK_THROWS_AS(dist.sample(x2, y5, gen), fd::shape_error);
  CHECK_THROWS_WITH(dist.sample(x2, y5, gen), Contains("y must be [4]") && Contains("got [5]"));
  CHECK_THROWS_AS(fd::data::Toy2DDistribution<float>(Toy2D::Moons, -0.1f), fd::config_error);
  CHECK_THROWS_WITH(fd::data::Toy2DDistribution<float>(Toy2D::Moons, -0.1f),
                    Contains("noise must be finite and >= 0") && Contains("-0.1"));
  CHECK_THROWS_WITH(fd::data::Toy2DDistribution<float>(Toy2D::Gaussians, 0.1f, -2),
                    Contains("modes must be in [1, 4096]") && Contains("-2"));
  CHECK_THROWS_AS(dist.sample(-1, gen), fd::config_error);
}

// ---------------------------------------------------------------------------------------------
// Batcher
// ---------------------------------------------------------------------------------------------

namespace {

/// N images [N, 1, 2, 2] where every pixel of image i is i, and labels i % 3.
fd::data::ImageDataset numbered_dataset(fd::index_t n) {
  fd::data::ImageDataset ds;
  ds.num_classes = 3;
  ds.images = fd::Tensor<float>(fd::Shape{n, 1, 2, 2});
  ds.labels = fd::Tensor<fd::label_t>(fd::Shape{n});
  for (fd::index_t i = 0; i < n; ++i) {
    for (int k = 0; k < 4; ++k) ds.images[i * 4 + k] = static_cast<float>(i);
    ds.labels[i] = static_cast<fd::label_t>(i % 3);
  }
  return ds;
}

/// The sample indices of one batch (read back from the pixel values), checking the rows are whole.
std::vector<fd::index_t> batch_indices(const fd::Tensor<float>& x,
                                       const fd::Tensor<fd::label_t>& y) {
  std::vector<fd::index_t> idx;
  for (fd::index_t b = 0; b < x.dim(0); ++b) {
    const float v = x[b * 4];
    for (int k = 1; k < 4; ++k) REQUIRE(x[b * 4 + k] == v);
    const auto i = static_cast<fd::index_t>(v);
    REQUIRE(y[b] == i % 3);
    idx.push_back(i);
  }
  return idx;
}

}  // namespace

TEST_CASE(
    "epoch_permutation is a uniform random permutation, a function of "
    "(seed, epoch)",
    "[data][batcher]") {
  for (std::int64_t e = 0; e < 5; ++e) {
    auto p = fd::data::epoch_permutation(1000, 7, e);
    CHECK(p == fd::data::epoch_permutation(1000, 7, e));
    CHECK(p != fd::data::epoch_permutation(1000, 7, e + 1));
    CHECK(p != fd::data::epoch_permutation(1000, 8, e));
    std::sort(p.begin(), p.end());
    for (fd::index_t i = 0; i < 1000; ++i) REQUIRE(p[static_cast<std::size_t>(i)] == i);
  }
  // All 3! orders of 3 elements are equally likely: counts within 5 binomial sd.
  std::vector<int> count(9, 0);
  const int epochs = 6000;
  for (int e = 0; e < epochs; ++e) {
    const auto p = fd::data::epoch_permutation(3, 2024, e);
    ++count[static_cast<std::size_t>(p[0] * 3 + p[1])];
  }
  const double sd = std::sqrt(epochs * (1.0 / 6) * (5.0 / 6));
  int orders = 0;
  for (int c : count)
    if (c > 0) {
      ++orders;
      CHECK(std::abs(c - epochs / 6.0) <= 5 * sd);
    }
  CHECK(orders == 6);
  CHECK(fd::data::epoch_permutation(1, 3, 0) == std::vector<fd::index_t>{0});
  CHECK_THROWS_AS(fd::data::epoch_permutation(5, 3, -1), fd::config_error);
}

TEST_CASE("Batcher: every epoch visits each sample once; full batches only", "[data][batcher]") {
  const auto ds = numbered_dataset(10);
  fd::Tensor<float> x(fd::Shape{5, 1, 2, 2});
  fd::Tensor<fd::label_t> y(fd::Shape{5});
  fd::data::Batcher batcher(ds, 42);
  CHECK(batcher.size() == 10);
  CHECK(batcher.batches_per_epoch(5) == 2);
  CHECK(batcher.batches_per_epoch(3) == 3);
  for (std::int64_t e = 0; e < 4; ++e) {
    std::vector<fd::index_t> seen;
    for (int b = 0; b < 2; ++b) {
      batcher.next(x, y);
      CHECK(batcher.epoch() == e);
      CHECK(batcher.position() == 5 * (b + 1));
      const auto idx = batch_indices(x, y);
      seen.insert(seen.end(), idx.begin(), idx.end());
    }
    CHECK(seen == fd::data::epoch_permutation(10, 42, e));  // the epoch's order, exactly
    std::sort(seen.begin(), seen.end());
    for (fd::index_t i = 0; i < 10; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
  }
  // B = 3 over N = 10: three batches, the tenth index is skipped, then the next epoch starts.
  fd::data::Batcher b3(ds, 5);
  fd::Tensor<float> x3(fd::Shape{3, 1, 2, 2});
  fd::Tensor<fd::label_t> y3(fd::Shape{3});
  std::vector<fd::index_t> seen;
  for (int b = 0; b < 3; ++b) {
    b3.next(x3, y3);
    const auto idx = batch_indices(x3, y3);
    seen.insert(seen.end(), idx.begin(), idx.end());
  }
  CHECK(b3.epoch() == 0);
  CHECK(b3.position() == 9);
  const auto perm0 = fd::data::epoch_permutation(10, 5, 0);
  CHECK(seen == std::vector<fd::index_t>(perm0.begin(), perm0.begin() + 9));
  b3.next(x3, y3);
  CHECK(b3.epoch() == 1);
  CHECK(b3.position() == 3);
  const auto perm1 = fd::data::epoch_permutation(10, 5, 1);
  CHECK(batch_indices(x3, y3) == std::vector<fd::index_t>(perm1.begin(), perm1.begin() + 3));
  // Labels may be skipped.
  b3.next(x3, {});
  CHECK(b3.position() == 6);
}

TEST_CASE("Batcher: same seed agrees, set_state resumes exactly", "[data][batcher]") {
  const auto ds = numbered_dataset(23);
  fd::Tensor<float> xa(fd::Shape{4, 1, 2, 2}), xb(fd::Shape{4, 1, 2, 2});
  fd::Tensor<fd::label_t> ya(fd::Shape{4}), yb(fd::Shape{4});
  fd::data::Batcher a(ds, 9), b(ds, 9), other(ds, 10);
  bool differs = false;
  for (int k = 0; k < 12; ++k) {
    a.next(xa, ya);
    b.next(xb, yb);
    CHECK(xa.to_vector() == xb.to_vector());
    CHECK(ya.to_vector() == yb.to_vector());
    other.next(xb, yb);
    differs = differs || xa.to_vector() != xb.to_vector();
  }
  CHECK(differs);
  // Save after 12 batches (epoch 2: 5 batches of 4 per epoch), continue; a fresh batcher resumes.
  const auto saved = a.state();
  CHECK(saved.epoch == 2);
  CHECK(saved.position == 8);
  std::vector<std::vector<float>> expected;
  for (int k = 0; k < 9; ++k) {
    a.next(xa, ya);
    expected.push_back(xa.to_vector());
  }
  fd::data::Batcher resumed(ds, 9);
  resumed.set_state(saved);
  CHECK(resumed.epoch() == 2);
  CHECK(resumed.position() == 8);
  for (int k = 0; k < 9; ++k) {
    resumed.next(xb, yb);
    CHECK(xb.to_vector() == expected[static_cast<std::size_t>(k)]);
  }
  CHECK(resumed.state().epoch == a.state().epoch);
  CHECK(resumed.state().position == a.state().position);
  // position == N is a valid state: the next batch starts the next epoch.
  resumed.set_state({3, 23});
  resumed.next(xb, yb);
  CHECK(resumed.epoch() == 4);
  CHECK(resumed.position() == 4);
}

TEST_CASE("Batcher: generic items, invalid states and shapes", "[data][batcher]") {
  // Any element type and item shape, without labels.
  fd::Tensor<double> items(fd::Shape{6, 3});
  for (fd::index_t i = 0; i < 18; ++i) items[i] = static_cast<double>(i / 3);
  fd::data::BasicBatcher<double> gb(items.view(), {}, 1);
  fd::Tensor<double> xg(fd::Shape{6, 3});
  gb.next(xg, {});
  std::vector<double> firsts;
  for (fd::index_t b = 0; b < 6; ++b) {
    CHECK(xg(b, 1) == xg(b, 0));
    firsts.push_back(xg(b, 0));
  }
  std::sort(firsts.begin(), firsts.end());
  CHECK(firsts == std::vector<double>{0, 1, 2, 3, 4, 5});
  fd::Tensor<fd::label_t> y6(fd::Shape{6});
  CHECK_THROWS_WITH(gb.next(xg, y6), Contains("labels requested") && Contains("has none"));

  // A batcher of a temporary data set would dangle, so it does not compile.
  STATIC_REQUIRE(
      std::is_constructible_v<fd::data::Batcher, const fd::data::ImageDataset&, std::uint64_t>);
  STATIC_REQUIRE(
      !std::is_constructible_v<fd::data::Batcher, fd::data::ImageDataset&&, std::uint64_t>);

  const auto ds = numbered_dataset(10);
  fd::data::Batcher b(ds, 1);
  CHECK_THROWS_AS(b.set_state({-1, 0}), fd::config_error);
  CHECK_THROWS_WITH(b.set_state({-1, 0}), Contains("epoch must be >= 0, got -1"));
  CHECK_THROWS_WITH(b.set_state({0, 11}), Contains("position must be in [0, 10], got 11"));
  CHECK_THROWS_WITH(b.set_state({0, -1}), Contains("position must be in [0, 10], got -1"));
  fd::Tensor<float> wrong_tail(fd::Shape{2, 1, 2, 3}), too_big(fd::Shape{11, 1, 2, 2});
  fd::Tensor<float> ok(fd::Shape{2, 1, 2, 2});
  fd::Tensor<fd::label_t> y3(fd::Shape{3});
  CHECK_THROWS_AS(b.next(wrong_tail, {}), fd::shape_error);
  CHECK_THROWS_WITH(b.next(wrong_tail, {}),
                    Contains("[10, 1, 2, 2]") && Contains("got [2, 1, 2, 3]"));
  CHECK_THROWS_WITH(b.next(too_big, {}), Contains("1 <= B <= 10") && Contains("got [11, 1, 2, 2]"));
  CHECK_THROWS_WITH(b.next(ok, y3), Contains("y must be [2]") && Contains("got [3]"));
  CHECK(b.position() == 0);  // failed calls do not advance
  CHECK_THROWS_AS(fd::data::BasicBatcher<float>(fd::Tensor<float>(fd::Shape{0, 2}).view(), {}, 1),
                  fd::shape_error);
  fd::Tensor<fd::label_t> bad_labels(fd::Shape{9});
  CHECK_THROWS_WITH(fd::data::Batcher(ds.images.view(), bad_labels.view(), 1),
                    Contains("labels must be [10]") && Contains("got [9]"));
}
