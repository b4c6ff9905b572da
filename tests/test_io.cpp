// io: PNG encoding round-trips through stb's decoder, atomic writes, image grids and plots.
#include <catch2/catch.hpp>

#include <filesystem>
#include <flowdiff/io/image.hpp>
#include <flowdiff/io/plot.hpp>
#include <fstream>

extern "C" unsigned char* stbi_load_from_memory(const unsigned char* buffer, int len, int* x,
                                                int* y, int* comp, int req_comp);
extern "C" void stbi_image_free(void* retval_from_stbi_load);

namespace fd = flowdiff;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

TEST_CASE("PNG encoding round-trips exactly", "[io]") {
  fd::io::Image img(7, 5);
  for (int y = 0; y < 5; ++y)
    for (int x = 0; x < 7; ++x)
      img.set(x, y, {static_cast<std::uint8_t>(x * 30), static_cast<std::uint8_t>(y * 50), 77});
  const auto bytes = fd::io::encode_png(img);
  REQUIRE(bytes.size() > 8);
  CHECK(bytes[1] == 'P');
  int w = 0, h = 0, c = 0;
  unsigned char* dec = stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &c, 3);
  REQUIRE(dec != nullptr);
  CHECK(w == 7);
  CHECK(h == 5);
  CHECK(std::equal(img.pixels.begin(), img.pixels.end(), dec));
  stbi_image_free(dec);
}

TEST_CASE("Atomic writes create directories, replace files and report failures", "[io]") {
  const fs::path dir = fs::temp_directory_path() / "flowdiff_test_io" / "nested";
  fs::remove_all(dir.parent_path());
  const fs::path file = dir / "a.png";
  fd::io::write_png(file, fd::io::Image(3, 3));
  REQUIRE(fs::exists(file));
  const auto size1 = fs::file_size(file);
  fd::io::write_png(file, fd::io::Image(30, 30, {1, 2, 3}));
  CHECK(fs::file_size(file) != size1);
  // No temporary files are left behind.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++entries;
  CHECK(entries == 1);
  // A path below a regular file cannot be created.
  CHECK_THROWS_AS(fd::io::write_png(file / "x.png", fd::io::Image(2, 2)), fd::io_error);
  fs::remove_all(dir.parent_path());
}

TEST_CASE("image_grid tiles a batch and checks its input", "[io]") {
  auto x = fd::Tensor<float>::full({3, 1, 4, 4}, -1.0f);
  x(1, 0, 2, 2) = 1.0f;
  const auto img = fd::io::image_grid<float>(x, 2);
  CHECK(img.width == 2 * (4 + 2) + 2);
  CHECK(img.height == 2 * (4 + 2) + 2);
  CHECK(img.get(2, 2).r == 0);                  // image 0, pixel (0, 0): value -1
  CHECK(img.get(2 + 6 + 2, 2 + 2).r == 255);    // image 1, pixel (2, 2): value +1
  auto bad = fd::Tensor<float>::zeros({3, 2, 4, 4});
  CHECK_THROWS_WITH(fd::io::image_grid<float>(bad, 2), Contains("C = 1 or 3"));
  CHECK_THROWS_WITH(fd::io::image_grid<float>(x, 0), Contains("columns must be >= 1"));
}

TEST_CASE("Plot2D draws points where they belong", "[io]") {
  fd::io::Plot2D plot(101, -1, 1, -1, 1, "title");
  auto pts = fd::Tensor<double>::from({1, 2}, {0.5, -0.5});
  plot.scatter<double>(pts, {}, 2.0, 1.0f);
  const auto& img = plot.image();
  const auto c = img.get(plot.px(0.5), plot.py(-0.5));
  CHECK(c.r == fd::io::palette(0).r);
  CHECK(c.b == fd::io::palette(0).b);
  // Far from the point the canvas stays white.
  CHECK(img.get(plot.px(-0.5), plot.py(0.5)).g == 255);
  auto wrong = fd::Tensor<double>::zeros({4, 3});
  CHECK_THROWS_WITH(plot.scatter<double>(wrong), Contains("x must be [N, 2]"));
}
