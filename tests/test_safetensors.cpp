// io::SafetensorsFile / io::SafetensorsWriter: round trips, dtype conversions (F16/BF16 built by
// hand), every validation error with its message, a file written by Python (tools/fixtures/st.py
// via tools/fixtures/optim.py), and a randomised-corruption test: thousands of mutated files must
// each parse or throw io_error, never crash (CI runs this under ASan + UBSan).
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <flowdiff/io/safetensors.hpp>

#include "support/files.hpp"

namespace fd = flowdiff;
namespace st = flowdiff::io;
using Catch::Matchers::Contains;

namespace {

std::vector<std::byte> to_bytes(std::string_view s) {
  std::vector<std::byte> b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// A file from a literal JSON header and raw data bytes.
std::vector<std::byte> make_file(std::string_view header, const std::vector<std::byte>& data) {
  std::vector<std::byte> out(8);
  std::uint64_t n = header.size();
  for (int k = 0; k < 8; ++k) out[static_cast<std::size_t>(k)] = static_cast<std::byte>((n >> (8 * k)) & 0xFF);
  const auto h = to_bytes(header);
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

st::SafetensorsFile parse(const std::vector<std::byte>& b) { return st::SafetensorsFile::parse(b, "test.safetensors"); }

std::vector<std::byte> sample_file() {
  st::SafetensorsWriter w;
  auto a = fd::Tensor<float>::from({2, 3}, {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f});
  auto b = fd::Tensor<double>::from({4}, {1.0 / 3.0, -2.5, 1e300, 0.0});
  auto c = fd::Tensor<std::int64_t>::from({3}, {-1, 0, std::int64_t(1) << 40});
  auto d = fd::Tensor<std::int32_t>::from({1, 1}, {-123456});
  auto e = fd::Tensor<float>::from({}, {42.0f});
  fd::Tensor<float> empty(fd::Shape{0, 5});
  w.add("enc.0.weight", a.view());
  w.add("enc.0.bias", b.view());
  w.add("step", c.view());
  w.add("i32", d.view());
  w.add("scalar", e.view());
  w.add("empty", empty.view());
  w.set_metadata("format", "pt");
  w.set_metadata("note", "quote \" backslash \\ newline \n tab \t unicode \xC3\xA9");
  return w.bytes();
}

}  // namespace

TEST_CASE("safetensors: writer output round-trips through the reader", "[io][safetensors]") {
  const auto bytes = sample_file();
  // Header length is a multiple of 8 so that the data is aligned.
  std::uint64_t n = 0;
  for (int k = 0; k < 8; ++k) n |= std::uint64_t(std::to_integer<unsigned>(bytes[std::size_t(k)])) << (8 * k);
  CHECK(n % 8 == 0);

  const auto f = parse(bytes);
  CHECK(f.names() == std::vector<std::string>{"empty", "enc.0.bias", "enc.0.weight", "i32", "scalar", "step"});
  CHECK(f.contains("enc.0.weight"));
  CHECK_FALSE(f.contains("enc.0"));
  CHECK(f.shape("enc.0.weight") == fd::Shape{2, 3});
  CHECK(f.dtype("enc.0.weight") == st::DType::F32);
  CHECK(f.dtype("enc.0.bias") == st::DType::F64);
  CHECK(f.dtype("step") == st::DType::I64);
  CHECK(f.dtype("i32") == st::DType::I32);
  CHECK(f.shape("scalar").rank() == 0);
  CHECK(f.shape("empty") == fd::Shape{0, 5});
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "quote \" backslash \\ newline \n tab \t unicode \xC3\xA9");

  const auto a = f.tensor<float>("enc.0.weight");
  CHECK(a.to_vector() == std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f});
  const auto b = f.tensor<double>("enc.0.bias");
  CHECK(b.to_vector() == std::vector<double>{1.0 / 3.0, -2.5, 1e300, 0.0});
  CHECK(f.tensor<std::int64_t>("step").to_vector() == std::vector<std::int64_t>{-1, 0, std::int64_t(1) << 40});
  CHECK(f.tensor<std::int32_t>("i32").to_vector() == std::vector<std::int32_t>{-123456});
  CHECK(f.tensor<float>("scalar")[0] == 42.0f);
  CHECK(f.tensor<float>("empty").numel() == 0);

  // Conversions: F32 -> double exact, I64 -> double exact, I32 -> float exact.
  CHECK(f.tensor<double>("enc.0.weight")[4] == double(1e-30f));
  CHECK(f.tensor<double>("step")[2] == double(std::int64_t(1) << 40));
  CHECK(f.tensor<float>("i32")[0] == -123456.0f);
  CHECK(f.tensor<std::int64_t>("i32")[0] == -123456);
  // Out of range: 1e300 does not fit a float; 2^40 does not fit int32; 1.5 is not an integer.
  CHECK_THROWS_AS(f.tensor<float>("enc.0.bias"), fd::io_error);
  CHECK_THROWS_WITH(f.tensor<float>("enc.0.bias"), Contains("'enc.0.bias'") && Contains("element 2"));
  CHECK_THROWS_WITH(f.tensor<std::int32_t>("step"), Contains("does not fit"));
  CHECK_THROWS_WITH(f.tensor<std::int32_t>("enc.0.weight"), Contains("not an integer"));
  CHECK_THROWS_WITH(f.tensor<float>("nope"), Contains("test.safetensors: no tensor named 'nope'"));
  CHECK_THROWS_AS(f.shape("nope"), fd::io_error);

  // Writing the parsed tensors again gives identical bytes.
  st::SafetensorsWriter w;
  for (const auto& name : f.names()) {
    switch (f.dtype(name)) {
      case st::DType::F32: w.add(name, f.tensor<float>(name)); break;
      case st::DType::F64: w.add(name, f.tensor<double>(name)); break;
      case st::DType::I32: w.add(name, f.tensor<std::int32_t>(name)); break;
      case st::DType::I64: w.add(name, f.tensor<std::int64_t>(name)); break;
      default: FAIL("unexpected dtype");
    }
  }
  for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  CHECK(w.bytes() == bytes);
}

TEST_CASE("safetensors: write() is atomic and read() reads it back", "[io][safetensors]") {
  const auto dir = std::filesystem::temp_directory_path() / "flowdiff_test_safetensors";
  std::filesystem::remove_all(dir);
  const auto path = dir / "sub" / "model.safetensors";
  st::SafetensorsWriter w;
  auto x = fd::Tensor<float>::from({2}, {1.0f, 2.0f});
  w.add("x", x.view());
  w.write(path);
  const auto f = st::SafetensorsFile::read(path);
  CHECK(f.tensor<float>("x").to_vector() == std::vector<float>{1.0f, 2.0f});
  CHECK(f.source() == path.string());
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir / "sub")) ++files;
  CHECK(files == 1);  // no temporary left behind
  CHECK_THROWS_WITH(st::SafetensorsFile::read(dir / "missing.safetensors"),
                    Contains("missing.safetensors") && Contains("no such file"));
  CHECK_THROWS_WITH(st::SafetensorsFile::read(dir), Contains("not a regular file"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("safetensors: writer rejects bad names", "[io][safetensors]") {
  st::SafetensorsWriter w;
  auto x = fd::Tensor<float>::from({1}, {1.0f});
  w.add("a", x.view());
  CHECK_THROWS_WITH(w.add("a", x.view()), Contains("duplicate tensor name 'a'"));
  CHECK_THROWS_AS(w.add("", x.view()), fd::config_error);
  CHECK_THROWS_AS(w.add("__metadata__", x.view()), fd::config_error);
}

TEST_CASE("safetensors: F16 and BF16 convert exactly", "[io][safetensors]") {
  // F16: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), 2^-14 (smallest normal), inf,
  // 0.333251953125 (0x3555), -0.0.  BF16: 1.0, -3.0, 1.0078125 (0x3F81), 2^-133 (subnormal, 0x0001).
  const std::uint16_t h[] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0400, 0x7C00, 0x3555, 0x8000};
  const std::uint16_t bf[] = {0x3F80, 0xC040, 0x3F81, 0x0001};
  std::vector<std::byte> data;
  for (auto v : h) {
    data.push_back(std::byte(v & 0xFF));
    data.push_back(std::byte(v >> 8));
  }
  for (auto v : bf) {
    data.push_back(std::byte(v & 0xFF));
    data.push_back(std::byte(v >> 8));
  }
  const auto f = parse(make_file(
      R"({"h":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]}})",
      data));
  CHECK(f.dtype("h") == st::DType::F16);
  CHECK(f.dtype("b") == st::DType::BF16);
  const auto x = f.tensor<float>("h");
  CHECK(x.shape() == fd::Shape{2, 4});
  CHECK(x[0] == 1.0f);
  CHECK(x[1] == -2.0f);
  CHECK(x[2] == 65504.0f);
  CHECK(x[3] == std::ldexp(1.0f, -24));
  CHECK(x[4] == std::ldexp(1.0f, -14));
  CHECK(std::isinf(x[5]));
  CHECK(x[6] == 0.333251953125f);
  CHECK(x[7] == 0.0f);
  CHECK(std::signbit(x[7]));
  const auto y = f.tensor<double>("b");
  CHECK(y[0] == 1.0);
  CHECK(y[1] == -3.0);
  CHECK(y[2] == 1.0078125);
  CHECK(y[3] == std::ldexp(1.0, -133));
  CHECK_THROWS_WITH(f.tensor<std::int32_t>("b"), Contains("element 2 = 1.0078125 is not an integer"));
}

TEST_CASE("safetensors: corrupt files throw io_error naming the file, the tensor and the fault",
          "[io][safetensors]") {
  const std::vector<std::byte> d16(16), d128(128);
  const auto bad = [&](std::string_view header, const std::vector<std::byte>& data, std::string_view msg) {
    INFO(header);
    CHECK_THROWS_AS(parse(make_file(header, data)), fd::io_error);
    CHECK_THROWS_WITH(parse(make_file(header, data)), Contains("test.safetensors") && Contains(std::string(msg)));
  };
  bad(R"({"enc.0.weight":{"dtype":"F32","shape":[4,8],"data_offsets":[0,100]}})", d128,
      "tensor 'enc.0.weight' has data_offsets [0, 100] but shape [4, 8] of F32 needs 128 bytes");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d128, "trailing garbage");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", {}, "beyond the end of the data");
  bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      d16, "overlapping");
  bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
      d16, "a gap");
  bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", d16, "must start at offset 0");
  bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
      d16, "duplicate tensor name 'a'");
  bad(R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", d16, "got a negative one");
  bad(R"({"a":{"dtype":"F33","shape":[4],"data_offsets":[0,16]}})", d16, "unknown dtype 'F33'");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", d16, "begin > end");
  bad(R"({"a":{"dtype":"F32","shape":[4]}})", d16, "lacks the field 'data_offsets'");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"x":1}})", d16, "unknown field 'x'");
  bad(R"({"a":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}})", d16, "non-integer number");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"__metadata__":{"k":1}})", d16,
      "metadata 'k' must be a string");
  bad(R"({"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1],"data_offsets":[0,4]}})", d16, "rank 7");
  bad(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", d16,
      "overflows 64 bits");
  bad(R"({"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,16]}})", d16, "integer too large");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})", d16, "unexpected end");
  bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}x)", d16, "trailing characters");
  bad(R"({"a":{"dtype":true,"shape":[4],"data_offsets":[0,16]}})", d16, "unsupported JSON value");
  bad(R"({"\ud800":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d16, "unpaired UTF-16 surrogate");
  bad(R"({"a\q":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d16, "unknown escape");
  bad("{\"\xff\":1}", d16, "not valid UTF-8");
  bad(R"([1,2])", d16, "must be a JSON object");
  bad(R"({"a":{"b":{"c":{"d":{"e":1}}}}})", d16, "nested too deeply");

  // Header length field: larger than the file, absurdly large, truncated file.
  auto f = make_file(R"({})", {});
  f[0] = std::byte{200};
  CHECK_THROWS_WITH(parse(f), Contains("truncated") && Contains("header length 200"));
  f[7] = std::byte{1};
  CHECK_THROWS_WITH(parse(f), Contains("exceeds the limit"));
  CHECK_THROWS_WITH(parse(std::vector<std::byte>(5)), Contains("truncated"));

  // Escapes decode; \u escapes incl. a surrogate pair; spaces after the JSON are padding.
  const auto ok = parse(make_file(
      R"({"__metadata__":{"k\u00e9\ud83d\ude00":"a\/b\n"},"w":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}   )",
      std::vector<std::byte>(4)));
  CHECK(ok.metadata().at("k\xC3\xA9\xF0\x9F\x98\x80") == "a/b\n");
  CHECK(ok.tensor<float>("w")[0] == 0.0f);
  // An empty file with only a header is valid.
  CHECK(parse(make_file("{}", {})).names().empty());
}

TEST_CASE("safetensors: reads a file written by Python (tools/fixtures/st.py)", "[io][safetensors]") {
  const auto path = flowdiff::test::fixture_path("optim.safetensors");
  REQUIRE(std::filesystem::exists(path));
  const auto f = st::SafetensorsFile::read(path);
  CHECK(f.metadata().at("generator") == "tools/fixtures/optim.py");
  CHECK(f.metadata().at("compat.text") == "caf\xC3\xA9 \"quoted\" \\ back");
  REQUIRE(f.dtype("compat.arange") == st::DType::F32);
  const auto a = f.tensor<float>("compat.arange");
  REQUIRE(a.shape() == fd::Shape{2, 3, 4});
  for (fd::index_t i = 0; i < 24; ++i) CHECK(a[i] == static_cast<float>(i) * 0.5f - 3.0f);
  REQUIRE(f.dtype("compat.int64") == st::DType::I64);
  CHECK(f.tensor<std::int64_t>("compat.int64").to_vector() ==
        std::vector<std::int64_t>{-(std::int64_t(1) << 62), -1, 0, 7});
}

TEST_CASE("safetensors: randomly corrupted files parse or throw io_error, never crash",
          "[io][safetensors][fuzz]") {
  std::vector<std::vector<std::byte>> seeds;
  seeds.push_back(sample_file());
  {
    std::vector<std::byte> d(24, std::byte{0x3C});
    seeds.push_back(make_file(
        R"({"h":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]},"__metadata__":{"a":"\u00e9"}})",
        d));
    std::vector<std::byte> e(12, std::byte{0x01});
    seeds.push_back(make_file(
        R"({"u":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"q":{"dtype":"BOOL","shape":[2,2],"data_offsets":[4,8]},"i":{"dtype":"I16","shape":[2],"data_offsets":[8,12]}})",
        e));
  }
  // Replacement tokens for JSON-aware edits: each is a plausible way a header goes wrong.
  const std::vector<std::string> tokens = {
      "-1", "0", "1", "4", "16", "1e3", "1.5", "18446744073709551615", "18446744073709551616",
      "9223372036854775807", "4294967296", "\"F16\"", "\"BF16\"", "\"F8_E4M3\"", "\"U64\"", "\"BOOL\"",
      "[]", "[0]", "[0,0]", "{}", "null", "true", "\"\\ud800\"", "\"\\u00zz\"", "\"", "\\", "[[[[[[",
      "{\"a\":", ",", ":", "}", "]", "\"__metadata__\"", "\"shape\"", "\"data_offsets\"", "\"dtype\""};
  std::mt19937_64 rng(20240611);
  const auto uniform = [&](std::size_t n) { return n == 0 ? std::size_t(0) : std::size_t(rng() % n); };
  const auto header_len = [](const std::vector<std::byte>& b) {
    std::uint64_t n = 0;
    for (int k = 0; k < 8 && std::size_t(k) < b.size(); ++k)
      n |= std::uint64_t(std::to_integer<unsigned>(b[std::size_t(k)])) << (8 * k);
    return n;
  };
  const auto set_header_len = [](std::vector<std::byte>& b, std::uint64_t n) {
    for (int k = 0; k < 8 && std::size_t(k) < b.size(); ++k)
      b[std::size_t(k)] = std::byte((n >> (8 * k)) & 0xFF);
  };

  int parsed = 0, rejected = 0;
  const int iterations = 6000;
  for (int it = 0; it < iterations; ++it) {
    auto b = seeds[uniform(seeds.size())];
    const int edits = 1 + int(uniform(3));
    for (int e = 0; e < edits; ++e) {
      switch (uniform(7)) {
        case 0:  // bit flips
          for (int k = 0, m = 1 + int(uniform(4)); k < m && !b.empty(); ++k)
            b[uniform(b.size())] ^= std::byte(1u << uniform(8));
          break;
        case 1:  // truncation
          b.resize(uniform(b.size() + 1));
          break;
        case 2: {  // byte insertion
          const auto at = uniform(b.size() + 1);
          std::vector<std::byte> ins(1 + uniform(8));
          for (auto& x : ins) x = std::byte(rng() & 0xFF);
          b.insert(b.begin() + std::ptrdiff_t(at), ins.begin(), ins.end());
          break;
        }
        case 3: {  // byte deletion
          if (b.empty()) break;
          const auto at = uniform(b.size());
          const auto len = std::min(b.size() - at, 1 + uniform(8));
          b.erase(b.begin() + std::ptrdiff_t(at), b.begin() + std::ptrdiff_t(at + len));
          break;
        }
        case 4: {  // header length change: small delta or anything
          const std::uint64_t n = header_len(b);
          set_header_len(b, uniform(2) ? n + uniform(17) - 8 : rng());
          break;
        }
        case 5:
        case 6: {  // JSON edit: replace a token-sized span of the header, keep the length consistent
          const std::uint64_t n = header_len(b);
          if (b.size() < 8 || n > b.size() - 8 || n == 0) break;
          const auto at = 8 + uniform(n);
          const auto len = std::min<std::size_t>(n - (at - 8), uniform(6));
          const auto& tok = tokens[uniform(tokens.size())];
          std::vector<std::byte> rep = to_bytes(tok);
          b.erase(b.begin() + std::ptrdiff_t(at), b.begin() + std::ptrdiff_t(at + len));
          b.insert(b.begin() + std::ptrdiff_t(at), rep.begin(), rep.end());
          set_header_len(b, n - len + rep.size());
          break;
        }
      }
    }
    try {
      const auto f = st::SafetensorsFile::parse(b, "fuzz.safetensors");
      for (const auto& name : f.names()) {
        try {
          (void)f.tensor<float>(name);
        } catch (const fd::io_error&) {
        }
        try {
          (void)f.tensor<std::int32_t>(name);
        } catch (const fd::io_error&) {
        }
        (void)f.raw(name);
      }
      ++parsed;
    } catch (const fd::io_error& e) {
      CHECK(std::string(e.what()).rfind("fuzz.safetensors", 0) == 0);
      ++rejected;
    }
  }
  CHECK(parsed + rejected == iterations);
  // Both outcomes occur (the mutations are neither all fatal nor all harmless).
  CHECK(parsed > 20);
  CHECK(rejected > 1000);
}
