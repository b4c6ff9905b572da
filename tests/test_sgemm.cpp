// flowdiff's own float GEMM (backend/cpu/sgemm.hpp): every kernel this CPU can run against a
// double reference over random shapes (packed and unpacked paths, transposes, leading
// dimensions, alpha, beta), the beta == 0 contract (C not read), bit-identical results on 1
// and 2 threads, an op(A) that packs itself (APacker) and op(B) read as panels in place
// (BPacker::panels) giving the stored matrix's bits.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "flowdiff/flowdiff.hpp"

namespace fd = flowdiff;

namespace {

std::vector<fd::sgemm::Isa> sgemm_kernels_here() {
  std::vector<fd::sgemm::Isa> out;
  const auto best = fd::sgemm::best_isa();
  if (best == fd::sgemm::Isa::avx2 || best == fd::sgemm::Isa::avx512)
    out.push_back(fd::sgemm::Isa::avx2);
  if (best == fd::sgemm::Isa::avx512) out.push_back(fd::sgemm::Isa::avx512);
  return out;
}

struct SgemmCase {
  bool ta, tb;
  fd::index_t m, n, k, lda, ldb, ldc;
  float alpha, beta;
  std::vector<float> a, b, c;
};

SgemmCase make_sgemm_case(std::mt19937& g, fd::index_t m, fd::index_t n, fd::index_t k, bool ta,
                          bool tb, float alpha, float beta) {
  SgemmCase s{ta, tb, m, n, k, 0, 0, 0, alpha, beta, {}, {}, {}};
  s.lda = (ta ? m : k) + static_cast<fd::index_t>(g() % 3);
  s.ldb = (tb ? k : n) + static_cast<fd::index_t>(g() % 3);
  s.ldc = n + static_cast<fd::index_t>(g() % 3);
  std::normal_distribution<float> nd;
  s.a.resize(static_cast<std::size_t>((ta ? k : m) * s.lda + 1));
  s.b.resize(static_cast<std::size_t>((tb ? n : k) * s.ldb + 1));
  s.c.resize(static_cast<std::size_t>(m * s.ldc));
  for (auto& x : s.a) x = nd(g);
  for (auto& x : s.b) x = nd(g);
  for (auto& x : s.c) x = nd(g);
  return s;
}

fd::sgemm::Problem sgemm_problem(const SgemmCase& s, float* c) {
  return {s.ta, s.tb, s.m, s.n, s.k, s.alpha, s.a.data(), s.lda, s.b.data(), s.ldb, s.beta, c,
          s.ldc};
}

// Largest error relative to sum |alpha a b| + |beta c| per element, over the m x n block; also
// fails (returns 1) if the padding columns of C were touched.
double sgemm_error(const SgemmCase& s, const std::vector<float>& got) {
  const auto p = sgemm_problem(s, nullptr);
  double worst = 0;
  for (fd::index_t i = 0; i < s.m; ++i) {
    for (fd::index_t j = 0; j < s.n; ++j) {
      double sum = 0, mag = 0;
      for (fd::index_t q = 0; q < s.k; ++q) {
        const double v = double(p.A(i, q)) * double(p.B(q, j));
        sum += v;
        mag += std::fabs(v);
      }
      const double c0 = s.c[static_cast<std::size_t>(i * s.ldc + j)];
      const double ref = s.alpha * sum + (s.beta == 0.f ? 0.0 : s.beta * c0);
      const double scale = std::fabs(s.alpha) * mag + std::fabs(s.beta * c0) + 1e-30;
      const double e = std::fabs(got[static_cast<std::size_t>(i * s.ldc + j)] - ref) / scale;
      worst = std::isnan(e) ? 1.0 : std::max(worst, e);
    }
    for (fd::index_t j = s.n; j < s.ldc; ++j)
      if (got[static_cast<std::size_t>(i * s.ldc + j)] != s.c[static_cast<std::size_t>(i * s.ldc + j)])
        return 1.0;
  }
  return worst;
}

// s on each of `kernels` (C poisoned with NaN where beta = 0: it must not be read), checked
// against the double reference; `what` names the case in a failure.
void check_kernels(const SgemmCase& s, const std::vector<fd::sgemm::Isa>& kernels,
                   const std::string& what) {
  for (auto isa : kernels) {
    auto c = s.c;
    if (s.beta == 0.f)
      for (fd::index_t i = 0; i < s.m; ++i)
        for (fd::index_t j = 0; j < s.n; ++j)
          c[static_cast<std::size_t>(i * s.ldc + j)] = std::numeric_limits<float>::quiet_NaN();
    REQUIRE(fd::sgemm::gemm(isa, sgemm_problem(s, c.data())));
    INFO("kernel " << fd::sgemm::isa_name(isa) << ", " << what);
    CHECK(sgemm_error(s, c) < 1e-5);
  }
}

}  // namespace

TEST_CASE("sgemm kernels match a double reference over random shapes", "[core][gemm][sgemm]") {
  const auto kernels = sgemm_kernels_here();
  if (kernels.empty()) {
    WARN("no AVX2/AVX-512 kernel on this CPU: float products go through Eigen (tested elsewhere)");
    return;
  }
  std::mt19937 g(7);
  int cases = 0;
  for (int trial = 0; trial < 120; ++trial) {
    fd::index_t m = 1 + g() % 70, n = 1 + g() % 90, k = g() % 300;
    if (trial % 7 == 0) m = 1 + g() % 4;   // unpacked: few rows
    if (trial % 11 == 0) n = 1 + g() % 4;  // unpacked: few columns
    if (trial % 40 == 0) {  // two MC, KC and NC blocks of either kernel, threaded
      m = 130 + g() % 20;
      n = 2050 + g() % 100;
      k = 257 + g() % 50;
    }
    const bool ta = g() % 2, tb = g() % 2;
    const float alpha = trial % 5 == 0 ? -0.5f : 1.f;
    const float beta = trial % 3 == 0 ? 0.f : (trial % 3 == 1 ? 1.f : 0.25f);
    const auto s = make_sgemm_case(g, m, n, k, ta, tb, alpha, beta);
    check_kernels(s, kernels,
                  "m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k) +
                      " ta " + std::to_string(ta) + " tb " + std::to_string(tb) + " alpha " +
                      std::to_string(alpha) + " beta " + std::to_string(beta));
    cases += static_cast<int>(kernels.size());
  }
  CHECK(cases >= 120);
}

TEST_CASE("sgemm: the dot-product products (m <= 4 against B^T, n <= 4) for every k remainder",
          "[core][gemm][sgemm]") {
  // AVX-512's dot16 kernel: four rows at a time, the even and odd 16-float vectors of k in two
  // accumulators, an extra even vector and a masked tail where k asks for them; 16-row blocks
  // and an 8-row remainder; a batch-1 Linear (m = 1, B^T) and a one-column output (n = 1, B
  // gathered), beta 0 (C not read) and 1.
  const auto kernels = sgemm_kernels_here();
  if (kernels.empty()) {
    WARN("no AVX2/AVX-512 kernel on this CPU: float products go through Eigen (tested elsewhere)");
    return;
  }
  std::mt19937 g(11);
  for (const fd::index_t k : {1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 66, 80, 255, 256, 257, 300}) {
    for (const auto& [m, n, tb] : {std::tuple<fd::index_t, fd::index_t, bool>{1, 48, true},
                                   {3, 40, true}, {1, 256, true}, {56, 1, false}}) {
      for (const float beta : {0.f, 1.f}) {
        const auto s = make_sgemm_case(g, m, n, k, false, tb, 1.f, beta);
        check_kernels(s, kernels,
                      "m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                          std::to_string(k) + " tb " + std::to_string(tb) + " beta " +
                          std::to_string(beta));
      }
    }
  }
}

TEST_CASE("sgemm: small batches against a weight matrix (C = A B^T, 2 <= m <= 16)",
          "[core][gemm][sgemm]") {
  // The unpacked dot-product tiles of the AVX-512 kernel (4 x 4 for groups of four rows, 4 x 4
  // with a row repeated for a remainder of three, 2 x 8 for two, 1 x 16 for one; blocks of 16
  // columns): ragged rows and columns, k not a multiple of 16 (masked tail) and shorter than one
  // vector, padded leading dimensions, alpha and beta; m = 1 and 17 are the neighbouring paths.
  const auto kernels = sgemm_kernels_here();
  if (kernels.empty()) return;
  std::mt19937 g(13);
  for (fd::index_t m : {1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 16, 17})
    for (fd::index_t n : {4, 5, 7, 20, 24, 33, 256})
      for (fd::index_t k : {1, 15, 16, 17, 256, 300}) {
        const float alpha = (m + n) % 3 == 0 ? -0.5f : 1.f;
        const float beta = k % 2 == 0 ? 0.f : (n % 2 == 0 ? 1.f : 0.25f);
        const auto s = make_sgemm_case(g, m, n, k, false, true, alpha, beta);
        check_kernels(s, kernels,
                      "m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                          std::to_string(k) + " alpha " + std::to_string(alpha) + " beta " +
                          std::to_string(beta));
      }
}

TEST_CASE("sgemm: a small batch's rows have the same bits in every batch from 2 to 16 rows",
          "[core][gemm][sgemm]") {
  // Every tile shape computes an element as one accumulator over k and the same reduction, so a
  // row of A gives the same bits whether it sits in a group of four, a remainder of three, two
  // or one: C = A B^T for the first m rows of one A, against the rows of the 16-row product.
  const auto kernels = sgemm_kernels_here();
  if (std::find(kernels.begin(), kernels.end(), fd::sgemm::Isa::avx512) == kernels.end()) return;
  std::mt19937 g(29);
  for (const fd::index_t k : {7, 64, 66, 257}) {
    for (const fd::index_t n : {20, 37}) {
      const auto s = make_sgemm_case(g, 16, n, k, false, true, 1.f, 0.f);
      std::vector<float> all(s.c.size());
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(s, all.data())));
      for (fd::index_t m = 2; m < 16; ++m) {
        auto part = s;
        part.m = m;
        std::vector<float> c(static_cast<std::size_t>(m * s.ldc), 0.f);
        REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(part, c.data())));
        bool same = true;
        for (fd::index_t i = 0; i < m; ++i)
          for (fd::index_t j = 0; j < n; ++j)
            same = same && c[static_cast<std::size_t>(i * s.ldc + j)] ==
                               all[static_cast<std::size_t>(i * s.ldc + j)];
        INFO("k " << k << " n " << n << " m " << m);
        CHECK(same);
      }
    }
  }
}

TEST_CASE("sgemm: a row of C has the same bits in a whole row tile and in a partial one",
          "[core][gemm][sgemm]") {
  // The packed kernels cut C into MR-row tiles (AVX2 6, AVX-512 8); a product whose m is not a
  // multiple of MR ends in a partial tile (the 32-, 64- and 128-channel convolutions on AVX2),
  // computed in place for its rows alone. Its rows must get the bits they get inside a whole
  // tile, for any alpha and beta and over several K blocks (k 300 > KC 256: the second block
  // accumulates into C): C = alpha op(A) B + beta C for the first m rows of a 24-row problem,
  // against those rows of the whole one; A stored plainly (AVX-512: read as rows) and
  // transposed (packed panels); n 40 ends in a partial column tile as well.
  std::mt19937 g(31);
  for (const auto isa : sgemm_kernels_here()) {
    for (const bool ta : {false, true}) {
      for (const auto& [alpha, beta] : {std::pair{0.7f, 1.f}, std::pair{1.f, 0.f},
                                        std::pair{-1.3f, 0.5f}}) {
        const auto s = make_sgemm_case(g, 24, 40, 300, ta, false, alpha, beta);
        auto all = s.c;
        REQUIRE(fd::sgemm::gemm(isa, sgemm_problem(s, all.data())));
        REQUIRE(sgemm_error(s, all) < 1e-5);
        for (fd::index_t m = 5; m < 24; ++m) {
          auto part = s;
          part.m = m;  // (transposed: A's first m columns, at the same stride)
          auto c = s.c;
          REQUIRE(fd::sgemm::gemm(isa, sgemm_problem(part, c.data())));
          std::size_t differ = 0;
          for (fd::index_t i = 0; i < m; ++i)
            for (fd::index_t j = 0; j < s.n; ++j)
              differ += c[static_cast<std::size_t>(i * s.ldc + j)] !=
                        all[static_cast<std::size_t>(i * s.ldc + j)];
          INFO("kernel " << fd::sgemm::isa_name(isa) << ", ta " << ta << ", alpha " << alpha
                         << ", beta " << beta << ", m " << m);
          CHECK(differ == 0);
        }
      }
    }
  }
}

TEST_CASE("sgemm: the packed product's bits do not depend on how A and B are stored",
          "[core][gemm][sgemm]") {
  // The same logical op(A) op(B) with A and B stored plain or transposed, and with leading
  // dimensions equal to the row length (a row-major A's rows used in place) or longer: the
  // packings differ (plain rows, 8 x 8 transposes, panel-at-a-time B for at most 128 rows, whole
  // blocks beyond) but the packed values and the kernels' FMA order do not, so neither do the
  // bits. m > 16 keeps every case on the packed kernel (C = A B^T with m <= 16 takes the
  // small-batch dot products).
  std::mt19937 g(11);
  std::normal_distribution<float> nd;
  for (auto isa : sgemm_kernels_here()) {
    for (const fd::index_t m : {17, 24, 64, 130})
      for (const fd::index_t n : {5, 33, 100})
        for (const fd::index_t k : {7, 64, 256, 300}) {
          std::vector<float> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n));
          for (auto& x : a) x = nd(g);
          for (auto& x : b) x = nd(g);
          std::vector<float> first;
          for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb)
              for (const fd::index_t pad : {0, 3}) {
                // op(A) = A (m x k), stored as [m, k] or as its transpose [k, m], rows pad longer
                const fd::index_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad;
                std::vector<float> sa(static_cast<std::size_t>((ta ? k : m) * lda)),
                    sb(static_cast<std::size_t>((tb ? n : k) * ldb));
                for (fd::index_t i = 0; i < m; ++i)
                  for (fd::index_t p = 0; p < k; ++p)
                    sa[static_cast<std::size_t>(ta ? p * lda + i : i * lda + p)] =
                        a[static_cast<std::size_t>(i * k + p)];
                for (fd::index_t p = 0; p < k; ++p)
                  for (fd::index_t j = 0; j < n; ++j)
                    sb[static_cast<std::size_t>(tb ? j * ldb + p : p * ldb + j)] =
                        b[static_cast<std::size_t>(p * n + j)];
                std::vector<float> c(static_cast<std::size_t>(m * n));
                fd::sgemm::Problem pr{ta == 1, tb == 1, m, n, k, 1.f, sa.data(), lda,
                                      sb.data(), ldb, 0.f, c.data(), n};
                REQUIRE(fd::sgemm::gemm(isa, pr, /*allow_threads=*/false));
                if (first.empty()) {
                  first = c;
                } else {
                  INFO("kernel " << fd::sgemm::isa_name(isa) << ", m " << m << " n " << n << " k "
                                 << k << " ta " << ta << " tb " << tb << " pad " << pad);
                  CHECK(c == first);
                }
              }
        }
  }
}

TEST_CASE("sgemm: k = 0 and alpha = 0 scale C by beta", "[core][gemm][sgemm]") {
  for (auto isa : sgemm_kernels_here()) {
    std::vector<float> c(12, 2.f), a(1, 1.f), b(1, 1.f);
    fd::sgemm::Problem p{false, false, 3, 4, 0, 1.f, a.data(), 1, b.data(), 4, 0.5f, c.data(), 4};
    REQUIRE(fd::sgemm::gemm(isa, p));
    for (float v : c) CHECK(v == 1.f);
    p.beta = 0.f;
    REQUIRE(fd::sgemm::gemm(isa, p));
    for (float v : c) CHECK(v == 0.f);
  }
}

TEST_CASE("sgemm is bit-identical on 1 and 2 threads", "[core][gemm][sgemm][threads]") {
#if defined(_OPENMP)
  const auto kernels = sgemm_kernels_here();
  if (kernels.empty()) return;
  std::mt19937 g(11);
  // Packed shapes of the models (MLP, DiT projections; all above sgemm::parallel_flops, so they
  // are threaded), a U-Net convolution below it, and threaded unpacked (thin) ones.
  const fd::index_t shapes[][5] = {{1024, 256, 256, 0, 1}, {256, 256, 1024, 1, 0},
                                   {32, 1024, 288, 0, 0},  {4096, 384, 96, 0, 1},
                                   {300, 2500, 600, 0, 1}, {3, 6000, 2000, 0, 1},
                                   {6000, 2, 3000, 1, 0},  {4, 4096, 2100, 1, 0}};
  const int threads = omp_get_max_threads();
  for (const auto& sh : shapes) {
    const auto s = make_sgemm_case(g, sh[0], sh[1], sh[2], sh[3] != 0, sh[4] != 0, 1.f, 0.f);
    for (auto isa : kernels) {
      auto c1 = s.c, c2 = s.c;
      omp_set_num_threads(1);
      fd::sgemm::gemm(isa, sgemm_problem(s, c1.data()));
      omp_set_num_threads(2);
      fd::sgemm::gemm(isa, sgemm_problem(s, c2.data()));
      omp_set_num_threads(threads);
      INFO("kernel " << fd::sgemm::isa_name(isa) << ", m " << sh[0] << " n " << sh[1] << " k "
                     << sh[2]);
      CHECK(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
      if (sh[0] * sh[1] * sh[2] <= 40'000'000) CHECK(sgemm_error(s, c2) < 1e-5);
    }
  }
#endif
}

namespace {
// The product p (on s's C, run already into `expected` on all threads) on one thread: same bits.
void check_one_thread(fd::sgemm::Problem p, const SgemmCase& s,
                      const std::vector<float>& expected) {
#if defined(_OPENMP)
  auto c_one = s.c;
  p.c = c_one.data();
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  fd::sgemm::gemm(fd::sgemm::Isa::avx512, p);
  omp_set_num_threads(threads);
  CHECK(std::memcmp(c_one.data(), expected.data(), c_one.size() * sizeof(float)) == 0);
#else
  (void)p, (void)s, (void)expected;
#endif
}
}  // namespace

// An APacker (op(A) that packs itself as plain rows; the convolution's weight gradient uses one)
// must give the bits of the same product from the stored matrix: the row-broadcasting kernel does
// the same FMAs in the same order. Shapes: partial row tiles, several MC / KC blocks, products
// threaded by rows (the packer's row offset) and by columns, beta 0 and 1, op(B) both ways.
TEST_CASE("sgemm: an APacker gives the bits of the stored op(A)", "[core][gemm][sgemm]") {
  if (fd::sgemm::best_isa() != fd::sgemm::Isa::avx512) {
    WARN("no AVX-512 on this CPU: APacker products are not taken (gemm returns false)");
    return;
  }
  struct Rows {
    const SgemmCase* s;
    static void pack(const void* ctx, fd::index_t i0, fd::index_t mc, fd::index_t p0,
                     fd::index_t kc, float* dst) {
      const SgemmCase& s = *static_cast<const Rows*>(ctx)->s;
      for (fd::index_t r = 0; r < mc; ++r)
        for (fd::index_t p = 0; p < kc; ++p) {
          const fd::index_t i = i0 + r, q = p0 + p;
          dst[r * kc + p] = s.ta ? s.a[static_cast<std::size_t>(q * s.lda + i)]
                                 : s.a[static_cast<std::size_t>(i * s.lda + q)];
        }
    }
  };
  std::mt19937 g(29);
  // op(A) = A^T where m + k is odd: the reference of {13, 40, 38} must not take the small-batch
  // path (m <= 16, op(A) = A, op(B) = B^T), which is another algorithm with other bits.
  const fd::index_t shapes[][4] = {{13, 40, 38, 1},   {288, 32, 1024, 1}, {1152, 128, 1024, 1},
                                   {300, 77, 600, 0}, {64, 2000, 300, 1}, {9, 5, 3, 0}};
  for (const auto& sh : shapes)
    for (float beta : {0.f, 1.f}) {
      const bool ta = (sh[0] + sh[2]) % 2 == 1;
      const auto s = make_sgemm_case(g, sh[0], sh[1], sh[2], ta, sh[3] != 0, 1.f, beta);
      auto c_ref = s.c, c_packed = s.c;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(s, c_ref.data())));
      const Rows rows{&s};
      const fd::sgemm::APacker packer{&Rows::pack, &rows};
      auto p = sgemm_problem(s, c_packed.data());
      p.apack = &packer;
      p.a = nullptr;  // never read
      INFO("m " << sh[0] << " n " << sh[1] << " k " << sh[2] << " tb " << sh[3] << " beta "
                << beta);
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
      CHECK(std::memcmp(c_ref.data(), c_packed.data(), c_ref.size() * sizeof(float)) == 0);
      check_one_thread(p, s, c_packed);
    }
  // Thin products and other kernels are refused, nothing done.
  const auto s = make_sgemm_case(g, 3, 40, 20, false, true, 1.f, 0.f);
  auto c = s.c;
  const Rows rows{&s};
  const fd::sgemm::APacker packer{&Rows::pack, &rows};
  auto p = sgemm_problem(s, c.data());
  p.apack = &packer;
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
  p.m = 8;
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx2, p));
  CHECK(std::memcmp(c.data(), s.c.data(), c.size() * sizeof(float)) == 0);
}

TEST_CASE("gemm_strided multiplies sub-matrices in place", "[core][gemm]") {
  // One "head": columns [8, 16) of a [20, 48] matrix times the transpose of columns [24, 32).
  fd::Generator gen{5};
  auto x = fd::randn<float>({20, 48}, gen);
  auto xd = fd::randn<double>({20, 48}, gen);
  fd::Tensor<float> c(fd::Shape{20, 20});
  fd::Tensor<double> cd(fd::Shape{20, 20});
  fd::gemm_strided(fd::Trans::no, fd::Trans::yes, 20, 20, 8, 0.5f, x.data() + 8, 48,
                   x.data() + 24, 48, 0.f, c.data(), 20);
  fd::gemm_strided(fd::Trans::no, fd::Trans::yes, 20, 20, 8, 0.5, xd.data() + 8, 48,
                   xd.data() + 24, 48, 0.0, cd.data(), 20);
  for (fd::index_t i = 0; i < 20; ++i)
    for (fd::index_t j = 0; j < 20; ++j) {
      double s = 0, sd = 0;
      for (fd::index_t p = 0; p < 8; ++p) {
        s += double(x(i, 8 + p)) * x(j, 24 + p);
        sd += xd(i, 8 + p) * xd(j, 24 + p);
      }
      CHECK(c(i, j) == Approx(0.5 * s).margin(1e-5));
      CHECK(cd(i, j) == Approx(0.5 * sd).margin(1e-12));
    }
  const std::string kernel = fd::float_gemm_kernel();
  CHECK((kernel == "avx512" || kernel == "avx2" || kernel == "eigen"));
}

// The epilogue contract of gemm(..., epilogue): every element of C in exactly one block, each
// block final when it runs (the epilogue sees the finished product), for the packed and thin
// paths, on 1 and 2 threads, through the sgemm kernels and through Eigen (double).
template <class T>
void check_epilogue_shapes() {
  const fd::index_t shapes[][5] = {{1024, 256, 256, 0, 1}, {256, 256, 1024, 1, 0},
                                   {300, 2500, 40, 0, 0},  {37, 29, 300, 1, 1},
                                   {3, 6000, 2000, 0, 1},  {6000, 2, 3000, 1, 0},
                                   {2, 300, 50, 0, 0},     {9, 5, 0, 0, 0}};
  fd::Generator gen{21};
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  const int counts[] = {1, 2};
#else
  const int counts[] = {1};
#endif
  for (const auto& sh : shapes) {
    const fd::index_t m = sh[0], n = sh[1], k = sh[2];
    const bool ta = sh[3] != 0, tb = sh[4] != 0;
    auto a = fd::randn<T>(ta ? fd::Shape{k, m} : fd::Shape{m, k}, gen);
    auto b = fd::randn<T>(tb ? fd::Shape{n, k} : fd::Shape{k, n}, gen);
    fd::Tensor<T> ref(fd::Shape{m, n}), c(fd::Shape{m, n});
    const auto tra = ta ? fd::Trans::yes : fd::Trans::no, trb = tb ? fd::Trans::yes : fd::Trans::no;
    fd::gemm(tra, trb, T(1), a, b, T(0), ref);
    for (int nt : counts) {
#if defined(_OPENMP)
      omp_set_num_threads(nt);
#endif
      std::vector<int> seen(static_cast<std::size_t>(m * n), 0);
      std::atomic<int> stale{0};  // elements the epilogue saw before they were final
      T* pc = c.data();
      const T* pr = ref.data();
      auto ep = [&, pc, pr](fd::index_t i0, fd::index_t i1, fd::index_t j0, fd::index_t j1) {
        for (fd::index_t i = i0; i < i1; ++i)
          for (fd::index_t j = j0; j < j1; ++j) {
            seen[static_cast<std::size_t>(i * n + j)] += 1;  // blocks are disjoint: no race
            if (pc[i * n + j] != pr[i * n + j]) ++stale;
            pc[i * n + j] = 2 * pc[i * n + j] + 1;
          }
      };
      fd::gemm<T>(tra, trb, T(1), a.view(), b.view(), T(0), c.view(), ep);
      INFO("m " << m << " n " << n << " k " << k << " threads " << nt);
      CHECK(std::all_of(seen.begin(), seen.end(), [](int v) { return v == 1; }));
      CHECK(stale.load() == 0);
      bool applied = true;
      for (fd::index_t i = 0; i < m * n; ++i) applied = applied && pc[i] == 2 * pr[i] + 1;
      CHECK(applied);
    }
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#endif
  }
}

TEST_CASE("gemm epilogue: runs once per element of C, on final values", "[core][gemm][sgemm]") {
  check_epilogue_shapes<float>();
  check_epilogue_shapes<double>();
}

// B's micro-panels stored in place (BPacker::panels, what the Winograd convolution writes): the
// product reads them instead of packing and gives the bits of the stored op(B). Shapes: a partial
// last panel, several KC and NC blocks, products threaded by rows and by columns, beta 0 and 1.
TEST_CASE("sgemm: B panels read in place give the bits of the stored op(B)",
          "[core][gemm][sgemm]") {
  if (fd::sgemm::best_isa() != fd::sgemm::Isa::avx512) {
    WARN("no AVX-512 on this CPU: BPacker products are not taken (gemm returns false)");
    return;
  }
  std::mt19937 g(31);
  const fd::index_t shapes[][3] = {{32, 100, 32}, {128, 4100, 300}, {300, 77, 600}, {40, 33, 7}};
  for (const auto& sh : shapes)
    for (float beta : {0.f, 1.f}) {
      const fd::index_t m = sh[0], n = sh[1], k = sh[2];
      const auto s = make_sgemm_case(g, m, n, k, false, false, 1.f, beta);
      auto c_ref = s.c, c_panels = s.c;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(s, c_ref.data())));
      // op(B) = B [k, n] as panels of 32 columns over the whole k; the last panel's extra lanes
      // hold NaN: their columns are discarded, so they must not reach C.
      const fd::index_t np = (n + 31) / 32;
      fd::Tensor<float> panels(fd::Shape{np * 32 * k});  // 64-byte aligned, as panels must be
      fd::fill(panels, std::numeric_limits<float>::quiet_NaN());
      for (fd::index_t p = 0; p < k; ++p)
        for (fd::index_t j = 0; j < n; ++j)
          panels.data()[(j / 32) * 32 * k + 32 * p + j % 32] =
              s.b[static_cast<std::size_t>(p * s.ldb + j)];
      const fd::sgemm::BPacker packer{nullptr, nullptr, panels.data()};
      auto p = sgemm_problem(s, c_panels.data());
      p.bpack = &packer;
      p.b = nullptr;  // never read
      INFO("m " << m << " n " << n << " k " << k << " beta " << beta);
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
      CHECK(std::memcmp(c_ref.data(), c_panels.data(), c_ref.size() * sizeof(float)) == 0);
      check_one_thread(p, s, c_panels);
    }
}

// C in column blocks (Problem::cblock: a batch's per-sample outputs written in place, as the
// stride-2 convolution's forward does) gives, block by block, the bits of the product into one
// matrix. Shapes: partial row and column tiles, several KC blocks, one and several blocks,
// products threaded by columns (the cut lands inside a block: cj0) and by rows, beta 0, 1 and
// 0.5, alpha 1 and -2 (shapes whose whole product is packed too: with m <= 16 against B^T or
// m <= 4 the whole one would take the unpacked kernels); the padding between blocks is never
// written. Refused (nothing done) for a
// block width or offset that is not a multiple of the kernel's 32 columns, and by AVX2.
TEST_CASE("sgemm: C in column blocks gives the bits of one C", "[core][gemm][sgemm]") {
  if (fd::sgemm::best_isa() != fd::sgemm::Isa::avx512) return;
  std::mt19937 g(23);
  struct Shape {
    fd::index_t m, blocks, block, k;
    bool tb;
  };
  const Shape shapes[] = {{64, 4, 256, 288, false}, {20, 3, 64, 300, true},
                          {200, 2, 96, 40, false},   {5, 9, 32, 600, false},
                          {640, 6, 128, 300, true},  {64, 33, 64, 576, false},
                          {1200, 2, 160, 100, false}};
  const float betas[] = {0.f, 1.f, 0.5f};
  int variant = 0;
  for (const auto& sh : shapes) {
    for (const float beta : betas) {
      const float alpha = variant++ % 2 == 0 ? 1.f : -2.f;
      const fd::index_t n = sh.blocks * sh.block;
      auto s = make_sgemm_case(g, sh.m, n, sh.k, false, sh.tb, alpha, beta);
      s.ldc = n;
      s.c.assign(static_cast<std::size_t>(sh.m * n), 0.f);
      std::normal_distribution<float> nd;
      for (auto& x : s.c) x = nd(g);
      std::vector<float> whole = s.c;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(s, whole.data())));
      // Blocks [m, block] (ld block) at stride m * block + 7 (7 floats of padding each), holding
      // the same starting values as the whole C's columns.
      const fd::index_t stride = sh.m * sh.block + 7;
      std::vector<float> blocked(static_cast<std::size_t>(sh.blocks * stride), 123.f);
      auto at = [&](fd::index_t i, fd::index_t j) -> float& {
        return blocked[static_cast<std::size_t>(j / sh.block * stride + i * sh.block +
                                                j % sh.block)];
      };
      for (fd::index_t i = 0; i < sh.m; ++i)
        for (fd::index_t j = 0; j < n; ++j) at(i, j) = s.c[static_cast<std::size_t>(i * n + j)];
      auto p = sgemm_problem(s, blocked.data());
      p.ldc = sh.block;
      p.cblock = sh.block;
      p.cstride = stride;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
      INFO("m " << sh.m << ", " << sh.blocks << " blocks of " << sh.block << ", k " << sh.k
                << ", beta " << beta << ", alpha " << alpha);
      bool same = true;
      for (fd::index_t i = 0; i < sh.m; ++i)
        for (fd::index_t j = 0; j < n; ++j)
          same = same && std::memcmp(&at(i, j), &whole[static_cast<std::size_t>(i * n + j)],
                                     sizeof(float)) == 0;
      CHECK(same);
      bool padding = true;
      for (fd::index_t b = 0; b < sh.blocks; ++b)
        for (fd::index_t q = sh.m * sh.block; q < stride; ++q)
          padding = padding && blocked[static_cast<std::size_t>(b * stride + q)] == 123.f;
      CHECK(padding);
      CHECK(sgemm_error(s, whole) < 1e-5);
    }
  }
  // Refused: nothing written.
  auto s = make_sgemm_case(g, 16, 96, 40, false, false, 1.f, 0.f);
  std::vector<float> c(static_cast<std::size_t>(16 * 96), 7.f);
  auto p = sgemm_problem(s, c.data());
  p.ldc = 48;
  p.cblock = 48;  // not a multiple of 32
  p.cstride = 16 * 48;
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx2, p));
  p.cblock = 32;
  p.cj0 = 16;  // an offset inside a tile
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, p));
  CHECK(std::all_of(c.begin(), c.end(), [](float v) { return v == 7.f; }));
}

// A transposed op(B) in blocks along k (Problem::bblock: a batch's per-sample dy [n, L] read as
// one op(B) = [gn L, n], as the convolutions' weight gradients do) gives the bits of the same
// product from one stored B: KC blocks that start, end and cross block boundaries (bblock 64,
// 100, 256, 300 against KC = 256), partial tiles, threads, beta 0 and 1. Refused (nothing done)
// without tb and by AVX2.
TEST_CASE("sgemm: a transposed B in blocks along k gives the bits of one B", "[core][gemm][sgemm]") {
  if (fd::sgemm::best_isa() != fd::sgemm::Isa::avx512) return;
  std::mt19937 g(29);
  struct Shape {
    fd::index_t m, n, blocks, block;
  };
  const Shape shapes[] = {{288, 64, 4, 256}, {40, 37, 5, 64}, {17, 70, 3, 100},
                          {600, 128, 7, 300}, {100, 5, 2, 33}};
  for (const auto& sh : shapes) {
    for (const float beta : {0.f, 1.f}) {
      const fd::index_t k = sh.blocks * sh.block;
      auto s = make_sgemm_case(g, sh.m, sh.n, k, false, true, 1.f, beta);
      std::vector<float> whole = s.c;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, sgemm_problem(s, whole.data())));
      // The same op(B) as blocks [n, block] at stride n * block + 5.
      const fd::index_t stride = sh.n * sh.block + 5;
      std::vector<float> blocks(static_cast<std::size_t>(sh.blocks * stride), 0.f);
      for (fd::index_t j = 0; j < sh.n; ++j)
        for (fd::index_t p = 0; p < k; ++p)
          blocks[static_cast<std::size_t>(p / sh.block * stride + j * sh.block + p % sh.block)] =
              s.b[static_cast<std::size_t>(j * s.ldb + p)];
      auto c = s.c;
      auto pr = sgemm_problem(s, c.data());
      pr.b = blocks.data();
      pr.ldb = sh.block;
      pr.bblock = sh.block;
      pr.bstride = stride;
      REQUIRE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, pr));
      INFO("m " << sh.m << ", n " << sh.n << ", " << sh.blocks << " blocks of " << sh.block
                << ", beta " << beta);
      CHECK(std::memcmp(c.data(), whole.data(), c.size() * sizeof(float)) == 0);
      CHECK(sgemm_error(s, whole) < 1e-5);
    }
  }
  auto s = make_sgemm_case(g, 20, 30, 64, false, false, 1.f, 0.f);
  std::vector<float> c(s.c.size(), 7.f);
  auto pr = sgemm_problem(s, c.data());
  pr.bblock = 32;
  pr.bstride = 30 * 32;
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx512, pr));  // not transposed
  pr.tb = true;
  pr.ldb = 32;
  CHECK_FALSE(fd::sgemm::gemm(fd::sgemm::Isa::avx2, pr));
  CHECK(std::all_of(c.begin(), c.end(), [](float v) { return v == 7.f; }));
}
