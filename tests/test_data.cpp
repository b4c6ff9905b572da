// Tests of flowdiff/data/: the IDX reader (raw and gzip files written here, and
// every kind of corrupt input), the Fashion-MNIST loader (the Debian files when
// installed, generated files via the environment override), the toy 2D
// distributions (exact geometric facts per kind, label frequencies, determinism
// and batch/thread independence) and the mini-batch Batcher.
#include <catch2/catch.hpp>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "flowdiff/flowdiff.hpp"

namespace fd = flowdiff;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

/// A fresh temporary directory, removed with everything in it at the end of the
/// test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string &name)
      : path(fs::temp_directory_path() / ("flowdiff_test_data_" + name + "_" +
                                          std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string &f) const { return path / f; }
};

/// The bytes of an IDX file: magic 0 0 type ndim, big-endian extents, payload.
std::vector<unsigned char> idx_bytes(const std::vector<std::uint32_t> &dims,
                                     const std::vector<unsigned char> &payload,
                                     unsigned type = 0x08) {
  std::vector<unsigned char> b{0, 0, static_cast<unsigned char>(type),
                               static_cast<unsigned char>(dims.size())};
  for (auto d : dims)
    for (int s = 24; s >= 0; s -= 8)
      b.push_back(static_cast<unsigned char>(d >> s));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

void write_raw(const fs::path &p, const std::vector<unsigned char> &bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char *>(bytes.data()),
          static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

void write_gz(const fs::path &p, const std::vector<unsigned char> &bytes) {
  gzFile f = gzopen(p.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<unsigned char> read_all(const fs::path &p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<unsigned char> iota_bytes(std::size_t n, unsigned start = 0) {
  std::vector<unsigned char> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<unsigned char>((start + i * 7) & 0xFF);
  return v;
}

/// Sets an environment variable for the scope of a test and restores the old
/// value.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(std::string n, const std::string &value) : name(std::move(n)) {
    if (const char *v = std::getenv(name.c_str()))
      old = v;
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old)
      ::setenv(name.c_str(), old->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

/// Writes a small Fashion-MNIST-shaped split (n images of h x w, labels i % 10)
/// into dir.
void write_fake_fashion(const fs::path &dir, const std::string &prefix,
                        std::uint32_t n, std::uint32_t h, std::uint32_t w,
                        bool gz, std::uint32_t n_labels = 0) {
  if (n_labels == 0)
    n_labels = n;
  std::vector<unsigned char> labels(n_labels);
  for (std::uint32_t i = 0; i < n_labels; ++i)
    labels[i] = static_cast<unsigned char>(i % 10);
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

} // namespace

// ---------------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------------

TEST_CASE("read_idx reads raw and gzip files", "[data][idx]") {
  TempDir tmp("idx_ok");
  const auto payload = iota_bytes(3 * 4 * 5, 11);
  const auto bytes = idx_bytes({3, 4, 5}, payload);
  write_raw(tmp / "a.idx", bytes);
  write_gz(tmp / "a.idx.gz", bytes);
  for (const auto *name : {"a.idx", "a.idx.gz"}) {
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

TEST_CASE("read_idx rejects corrupt files with messages that say what is wrong",
          "[data][idx]") {
  TempDir tmp("idx_bad");
  const auto payload = iota_bytes(2 * 3);
  const auto good = idx_bytes({2, 3}, payload);
  const auto path = [&](const char *f) { return tmp / f; };

  SECTION("missing file") {
    CHECK_THROWS_MATCHES(
        fd::data::read_idx(path("none.idx")), fd::io_error,
        Catch::Matchers::Predicate<fd::io_error>([&](const fd::io_error &e) {
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
                      Contains("magic.idx") && Contains("not an IDX file") &&
                          Contains("0x12"));
  }
  SECTION("wrong element type") {
    write_raw(path("type.idx"), idx_bytes({2, 3}, payload, 0x0D));
    CHECK_THROWS_AS(fd::data::read_idx(path("type.idx")), fd::io_error);
    CHECK_THROWS_WITH(fd::data::read_idx(path("type.idx")),
                      Contains("type.idx") && Contains("0xd (float32)") &&
                          Contains("only 0x08 (unsigned byte)"));
  }
  SECTION("zero dimensions") {
    write_raw(path("ndim0.idx"), idx_bytes({}, {}));
    CHECK_THROWS_WITH(fd::data::read_idx(path("ndim0.idx")),
                      Contains("ndim0.idx") && Contains("0 dimensions"));
    write_raw(path("extent0.idx"), idx_bytes({2, 0}, {}));
    CHECK_THROWS_AS(fd::data::read_idx(path("extent0.idx")), fd::io_error);
    CHECK_THROWS_WITH(fd::data::read_idx(path("extent0.idx")),
                      Contains("extent0.idx") &&
                          Contains("dimension 1 of [2, 0] is 0"));
  }
  SECTION("dimensions that overflow") {
    write_raw(path("huge.idx"), idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
    CHECK_THROWS_WITH(fd::data::read_idx(path("huge.idx")),
                      Contains("huge.idx") && Contains("dimensions overflow"));
  }
  SECTION("a huge header with no payload fails without allocating it") {
    write_raw(path("big.idx"),
              idx_bytes({0xFFFFu, 0xFFFFu, 0x3FFu}, iota_bytes(10)));
    CHECK_THROWS_WITH(fd::data::read_idx(path("big.idx")),
                      Contains("truncated payload") && Contains("got 10"));
  }
  SECTION("truncated header and file shorter than the magic") {
    write_raw(path("short.idx"), {0, 0});
    CHECK_THROWS_WITH(fd::data::read_idx(path("short.idx")),
                      Contains("short.idx") &&
                          Contains("too short for the 4-byte IDX magic"));
    auto b = good;
    b.resize(6);
    write_raw(path("header.idx"), b);
    CHECK_THROWS_WITH(fd::data::read_idx(path("header.idx")),
                      Contains("truncated header") &&
                          Contains("need 8 bytes") && Contains("got 2"));
  }
  SECTION("truncated payload, raw and gzip") {
    auto b = good;
    b.pop_back();
    write_raw(path("trunc.idx"), b);
    write_gz(path("trunc.idx.gz"), b);
    for (const char *f : {"trunc.idx", "trunc.idx.gz"}) {
      INFO(f);
      CHECK_THROWS_AS(fd::data::read_idx(path(f)), fd::io_error);
      CHECK_THROWS_WITH(fd::data::read_idx(path(f)),
                        Contains(f) && Contains("truncated payload") &&
                            Contains("[2, 3]") && Contains("need 6 bytes") &&
                            Contains("got 5"));
    }
  }
  SECTION("trailing data, raw and gzip") {
    auto b = good;
    b.push_back(1);
    b.push_back(2);
    write_raw(path("trail.idx"), b);
    write_gz(path("trail.idx.gz"), b);
    for (const char *f : {"trail.idx", "trail.idx.gz"}) {
      INFO(f);
      CHECK_THROWS_WITH(fd::data::read_idx(path(f)),
                        Contains(f) && Contains("trailing data") &&
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
                      Contains("cut.gz") &&
                          Contains("corrupt or truncated gzip data"));
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
    for (std::size_t i = 12; i < z.size() - 8; ++i)
      z[i] = static_cast<unsigned char>(z[i] ^ 0x5A);
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
    WARN("Fashion-MNIST is not installed in "
         << dir
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
    for (fd::index_t i = 0; i < 10000; ++i)
      ++count[static_cast<std::size_t>(ds.labels[i])];
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
    for (int i = 0; i < 20; ++i)
      CHECK(padded.labels[i] == ds.labels[i]);
  }
  SECTION("class names") {
    const auto names = fd::data::fashion_mnist_class_names();
    REQUIRE(names.size() == 10);
    CHECK(std::string(names[0]) == "T-shirt/top");
    CHECK(std::string(names[9]) == "Ankle boot");
  }
}

TEST_CASE("fashion_mnist finds its files through options, the environment and "
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
    const auto train =
        fd::data::fashion_mnist(fd::data::Split::Train); // uncompressed names
    CHECK(train.images.shape() == fd::Shape{7, 1, 28, 28});
    for (int i = 0; i < 7; ++i)
      CHECK(train.labels[i] == i % 10);
    // pixel (i, r, c) was byte (i*784 + r*28 + c) * 7 mod 256
    const auto expect = [](long k) {
      return static_cast<float>((k * 7) & 0xFF) / 127.5f - 1.0f;
    };
    CHECK(train.images(3, 0, 5, 9) == expect(3 * 784 + 5 * 28 + 9));
    // An explicit directory wins over the environment.
    fd::data::FashionMnistOptions opt;
    opt.dir = tmp.path / "elsewhere";
    CHECK(fd::data::fashion_mnist_dir(opt) == opt.dir);
    CHECK_THROWS_AS(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                    fd::io_error);
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("elsewhere") && Contains("does not exist") &&
                          Contains("apt-get install dataset-fashion-mnist") &&
                          Contains("FLOWDIFF_FASHION_MNIST"));
    // limit larger than the split gives the whole split.
    opt.dir = tmp.path;
    opt.limit = 1000;
    CHECK(fd::data::fashion_mnist(fd::data::Split::Train, opt).size() == 7);
    opt.limit = -1;
    CHECK_THROWS_AS(fd::data::fashion_mnist(fd::data::Split::Train, opt),
                    fd::config_error);
  }
  {
    ScopedEnv env("FLOWDIFF_FASHION_MNIST", "");
    CHECK(fd::data::fashion_mnist_dir() ==
          fs::path(fd::data::fashion_mnist_default_dir));
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
                          Contains(tmp.path.string()) &&
                          Contains("apt-get install"));
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
    write_raw(tmp / "t10k-images-idx3-ubyte",
              idx_bytes({3, 784}, iota_bytes(3 * 784)));
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("must hold images [N, H, W]") &&
                          Contains("[3, 784]"));
    write_fake_fashion(tmp.path, "t10k", 3, 34, 30, false);
    opt.pad_to_32 = true;
    CHECK_THROWS_WITH(fd::data::fashion_mnist(fd::data::Split::Test, opt),
                      Contains("pad_to_32") && Contains("34 x 30"));
  }
}
