// flowdiff::ThreadTeam: every part runs once, on its own thread, all at the same time; results
// written by the workers are visible after run(); exceptions come back; bad arguments and nested
// calls are refused; workers that went to sleep wake for the next job; in a forked child a
// team refuses to run and a LazyThreadTeam makes a new one; copies of a LazyThreadTeam own none.
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <thread>
#include <vector>

#if defined(__unix__)
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

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

TEST_CASE("LazyThreadTeam makes its team on first use; copies make their own", "[core][threads]") {
  fd::LazyThreadTeam lazy;
  CHECK(lazy.current() == nullptr);
  fd::ThreadTeam& team = lazy.get(2);
  CHECK(team.size() == 2);
  CHECK(&lazy.get(2) == &team);  // kept while the size stays
  std::atomic<int> parts{0};
  lazy.get(2).run([&parts](int, int) { parts.fetch_add(1); });
  CHECK(parts.load() == 2);
  CHECK(lazy.get(3).size() == 3);  // another size: another team
  const fd::LazyThreadTeam copy = lazy;
  CHECK(copy.current() == nullptr);
  fd::LazyThreadTeam assigned;
  assigned.get(2);
  assigned = lazy;  // keeps its own team, takes none of lazy's
  REQUIRE(assigned.current() != nullptr);
  CHECK(assigned.current()->size() == 2);
  fd::ThreadTeam* before = lazy.current();
  fd::LazyThreadTeam moved = std::move(lazy);
  CHECK(moved.current() == before);
  moved.reset();
  CHECK(moved.current() == nullptr);
}

#if defined(__unix__)
TEST_CASE("A ThreadTeam made before fork() refuses to run in the child; LazyThreadTeam remakes it",
          "[core][threads]") {
  fd::ThreadTeam team(2, microseconds(20));
  fd::LazyThreadTeam lazy;
  std::atomic<int> parts{0};
  lazy.get(2).run([&parts](int, int) { parts.fetch_add(1); });
  REQUIRE(parts.load() == 2);
  CHECK_FALSE(team.forked());
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child: exit codes name the first check that failed (no Catch here: its state is the
    // parent's). Before the fix a run() here waited for workers that do not exist: a hang.
    int code = 0;
    if (!team.forked()) code = 2;
    try {
      team.run([](int, int) {});
      if (code == 0) code = 3;
    } catch (const fd::config_error& e) {
      if (code == 0 && std::string(e.what()).find("forked") == std::string::npos) code = 4;
    }
    fd::ThreadTeam* stale = lazy.current();
    std::atomic<int> child_parts{0};
    fd::ThreadTeam& fresh = lazy.get(2);
    fresh.run([&child_parts](int, int) { child_parts.fetch_add(1); });
    if (code == 0 && (child_parts.load() != 2 || fresh.forked())) code = 5;
    (void)stale;
    std::_Exit(code);  // the child's copy of `team` is left to the OS (its threads are the parent's)
  }
  // Ten seconds for the child, then it counts as hung (a run() waiting for absent workers).
  int status = 0;
  pid_t done = 0;
  for (int i = 0; i < 1000 && (done = waitpid(child, &status, WNOHANG)) == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (done == 0) {
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    FAIL("the forked child hung");
  }
  REQUIRE(done == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // The parent's teams are untouched.
  CHECK_FALSE(team.forked());
  std::atomic<int> again{0};
  team.run([&again](int, int) { again.fetch_add(1); });
  lazy.get(2).run([&again](int, int) { again.fetch_add(1); });
  CHECK(again.load() == 4);
}
#endif
