// flowdiff::ThreadTeam: every part runs once, on its own thread, all at the same time; results
// written by the workers are visible after run(); exceptions come back; bad arguments and nested
// calls are refused; workers that went to sleep wake for the next job.
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <thread>
#include <vector>

#include <flowdiff/core/thread_team.hpp>

namespace fd = flowdiff;
using std::chrono::microseconds;

namespace {

// Spins until `counter` reaches `target` or about two seconds have passed; true if reached.
bool team_spin_until(const std::atomic<int>& counter, int target) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (counter.load(std::memory_order_acquire) < target)
    if (std::chrono::steady_clock::now() > until) return false;
  return true;
}

}  // namespace

TEST_CASE("ThreadTeam runs every part once, part 0 on the caller, all at the same time",
          "[core][threads]") {
  for (const int size : {1, 2, 4}) {
    INFO("team of " << size);
    fd::ThreadTeam team(size, microseconds(20));
    REQUIRE(team.size() == size);
    for (int count = 1; count <= size; ++count) {
      INFO("count " << count);
      std::vector<int> calls(static_cast<std::size_t>(size), 0);
      std::vector<std::thread::id> ids(static_cast<std::size_t>(size));
      std::atomic<int> arrived{0};
      std::atomic<bool> all_met{true};
      int seen_count = -1;
      team.run(
          [&](int t, int nt) {
            calls[static_cast<std::size_t>(t)] += 1;
            ids[static_cast<std::size_t>(t)] = std::this_thread::get_id();
            if (t == 0) seen_count = nt;
            // A barrier: it completes only if all parts run at once.
            arrived.fetch_add(1, std::memory_order_acq_rel);
            if (!team_spin_until(arrived, nt)) all_met = false;
          },
          count);
      CHECK(all_met);
      CHECK(seen_count == count);
      for (int t = 0; t < size; ++t) CHECK(calls[static_cast<std::size_t>(t)] == (t < count));
      CHECK(ids[0] == std::this_thread::get_id());
      std::set<std::thread::id> distinct(ids.begin(), ids.begin() + count);
      CHECK(static_cast<int>(distinct.size()) == count);
    }
  }
}

TEST_CASE("ThreadTeam: what the workers write is visible after run(), job after job",
          "[core][threads]") {
  // More threads than this machine's two cores make each job wait for the scheduler: fewer jobs.
  for (const auto& [size, jobs] : {std::pair{2, 20000}, std::pair{3, 300}}) {
    fd::ThreadTeam team(size, microseconds(100));
    std::vector<long> out(static_cast<std::size_t>(size), 0);
    long expected = 0;
    for (int job = 1; job <= jobs; ++job) {
      team.run([&out, job](int t, int) { out[static_cast<std::size_t>(t)] += job * (t + 1); });
      expected += job;
    }
    for (int t = 0; t < size; ++t) CHECK(out[static_cast<std::size_t>(t)] == (t + 1) * expected);
  }
}

TEST_CASE("ThreadTeam wakes workers that went to sleep", "[core][threads]") {
  // spin 0: a worker sleeps a few microseconds after each job, so jobs after pauses of 0 to 2 ms
  // find it spinning, falling asleep or asleep; each must run (a lost wake-up would hang here).
  fd::ThreadTeam team(2, microseconds(0));
  std::atomic<int> done{0};
  for (int job = 0; job < 300; ++job) {
    if (job % 3 != 0) std::this_thread::sleep_for(microseconds((job * 37) % 2000));
    team.run([&done](int t, int) {
      if (t == 1) done.fetch_add(1, std::memory_order_relaxed);
    });
  }
  CHECK(done.load() == 300);
}

TEST_CASE("ThreadTeam takes callables that do not fit its closure line", "[core][threads]") {
  fd::ThreadTeam team(2);
  std::vector<double> big(100, 1.5);  // captured by value: not trivially copyable
  std::atomic<double> sum{0};
  std::function<void(int, int)> f = [big, &sum](int t, int) {
    double s = 0;
    for (double v : big) s += v;
    if (t == 1) sum.store(s);
  };
  team.run(f);
  CHECK(sum.load() == 150.0);
  struct Large {
    double pad[40] = {};
    std::atomic<int>* hits;
    void operator()(int, int) const { hits->fetch_add(1); }
  };
  std::atomic<int> hits{0};
  Large large;
  large.hits = &hits;
  team.run(large);
  CHECK(hits.load() == 2);
}

TEST_CASE("ThreadTeam: a callable that changes itself is the caller's object on every thread",
          "[core][threads]") {
  // Small and trivially copyable, but its operator() is not const: the team must not run a copy
  // of it (the parts' writes would land in the copy).
  struct Recorder {
    int seen[4] = {};
    void operator()(int t, int) { seen[t] = t + 1; }
  };
  fd::ThreadTeam team(3, microseconds(20));
  Recorder rec;
  team.run(rec);
  CHECK(rec.seen[0] == 1);
  CHECK(rec.seen[1] == 2);
  CHECK(rec.seen[2] == 3);
}

TEST_CASE("ThreadTeam rethrows what a part throws and stays usable", "[core][threads]") {
  fd::ThreadTeam team(3, microseconds(20));
  std::atomic<int> finished{0};
  auto throw_on = [&](int which) {
    return [&finished, which](int t, int) {
      if (t == which) throw std::runtime_error("part " + std::to_string(t) + " failed");
      finished.fetch_add(1);
    };
  };
  CHECK_THROWS_WITH(team.run(throw_on(2)), "part 2 failed");
  CHECK(finished.load() == 2);  // the other parts ran to their end before run() threw
  CHECK_THROWS_WITH(team.run(throw_on(0)), "part 0 failed");
  CHECK(finished.load() == 4);
  std::atomic<int> ok{0};
  team.run([&ok](int, int) { ok.fetch_add(1); });
  CHECK(ok.load() == 3);
}

TEST_CASE("ThreadTeam refuses bad arguments and nested runs", "[core][threads]") {
  CHECK_THROWS_AS(fd::ThreadTeam(-1), fd::config_error);
  CHECK_THROWS_AS(fd::ThreadTeam(2, microseconds(-5)), fd::config_error);
  fd::ThreadTeam automatic;  // one thread per hardware thread
  CHECK(automatic.size() >= 1);
  fd::ThreadTeam team(2, microseconds(20));
  auto nothing = [](int, int) {};
  CHECK_THROWS_WITH(team.run(nothing, 0), Catch::Contains("count must be in [1, 2]"));
  CHECK_THROWS_WITH(team.run(nothing, 3), Catch::Contains("count must be in [1, 2]"));
  std::mutex m;
  std::vector<std::string> errors;
  team.run([&](int t, int) {
    try {
      team.run(nothing);
    } catch (const fd::config_error& e) {
      std::lock_guard<std::mutex> lock(m);
      errors.push_back(std::to_string(t) + ": " + e.what());
    }
  });
  REQUIRE(errors.size() == 2);
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("already running a job"));
  std::atomic<int> ok{0};
  team.run([&ok](int, int) { ok.fetch_add(1); });  // the refused calls left it usable
  CHECK(ok.load() == 2);
}
