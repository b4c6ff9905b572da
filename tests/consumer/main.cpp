// A user's program: draws Gaussian noise and evaluates the linear schedule through the umbrella
// header (and, with flowdiff::io, encodes a PNG), then checks the results are sane (exit code 1
// otherwise).
#include <flowdiff/flowdiff.hpp>

#include <cmath>
#include <cstdio>

#if CONSUMER_WITH_IO
#include <flowdiff/io/image.hpp>
#endif

int main() {
  namespace fd = flowdiff;
  fd::Generator gen{2026};
  auto x = fd::randn<float>({256, 4}, gen);
  const double m = fd::mean(x);
  const double var = static_cast<double>(fd::sum_squares(x)) / static_cast<double>(x.numel());
  const fd::schedules::Linear path;
  const double a = path.alpha(0.25), b = path.beta(0.25);
  std::printf("flowdiff %d.%d.%d: randn mean %.4f, variance %.4f; alpha(0.25) = %.2f, beta(0.25) = %.2f\n",
              FLOWDIFF_VERSION_MAJOR, FLOWDIFF_VERSION_MINOR, FLOWDIFF_VERSION_PATCH, m, var, a, b);
  bool ok = std::abs(m) < 0.1 && std::abs(var - 1.0) < 0.1 && a == 0.25 && b == 0.75;
#if CONSUMER_WITH_IO
  const auto png = fd::io::encode_png(fd::io::Image(3, 2));
  std::printf("flowdiff::io: a 3 x 2 PNG is %zu bytes\n", png.size());
  ok = ok && png.size() > 8 && png[1] == 'P' && png[2] == 'N' && png[3] == 'G';
#endif
  if (!ok) std::puts("consumer: unexpected values");
  return ok ? 0 : 1;
}
