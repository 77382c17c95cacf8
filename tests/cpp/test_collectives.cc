// C++ tier: ranks as threads over the in-process loopback transport. Checks every collective
// against a serial reference over many sizes, rank counts and chunk sizes, quickly and without
// MPI. Prints "N passed, N failed" and exits non-zero on any failure.

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/executor.h"
#include "core/fault.h"
#include "core/phase_times.h"
#include "expect.h"
#include "pycomm/pycomm.h"
#include "transport/leader_exchange.h"
#include "transport/loopback.h"
#include "transport/peer_watch.h"
#include "transport/shared_arena.h"
#include "transport/wait.h"

namespace {

using pycomm::Communicator;
using pycomm::DataType;
using pycomm::ReduceOp;

using pycomm_test::Expect;

// Runs body(comm) on `size` threads, one communicator each, all over one loopback hub.
void RunRanks(int size, size_t chunk_bytes, const std::function<void(Communicator&)>& body,
              pycomm::Algorithm algorithm = pycomm::Algorithm::kAuto) {
  auto transports = pycomm::CreateLoopbackTransports(size);
  pycomm::Options options;
  options.chunk_bytes = chunk_bytes;
  options.timeout_s = 30;
  options.algorithm = algorithm;
  std::vector<std::unique_ptr<Communicator>> comms;
  for (auto& t : transports) comms.push_back(Communicator::FromTransport(std::move(t), options));
  std::vector<std::thread> threads;
  for (auto& comm : comms) threads.emplace_back([&body, c = comm.get()] { body(*c); });
  for (auto& t : threads) t.join();
}

std::vector<int64_t> Input(int rank, size_t n) {
  std::vector<int64_t> v(n);
  std::mt19937_64 rng(rank * 1000003 + n);
  for (auto& x : v) x = static_cast<int64_t>(rng() % 2001) - 1000;
  return v;
}

std::string Case(const char* what, int P, size_t n, size_t chunk) {
  return std::string(what) + " P=" + std::to_string(P) + " n=" + std::to_string(n) + " chunk=" + std::to_string(chunk);
}

const char* AlgorithmName(pycomm::Algorithm a) {
  return a == pycomm::Algorithm::kRing         ? "ring"
         : a == pycomm::Algorithm::kOneShot    ? "oneshot"
         : a == pycomm::Algorithm::kSingleCopy ? "singlecopy"
                                               : "auto";
}

// int64 sums are exact, so results must equal the serial sum bit for bit.
void TestAllreduce(int P, size_t n, size_t chunk, bool in_place, pycomm::Algorithm algorithm) {
  std::vector<int64_t> expected(n, 0);
  for (int r = 0; r < P; ++r) {
    auto in = Input(r, n);
    for (size_t i = 0; i < n; ++i) expected[i] += in[i];
  }
  std::vector<std::vector<int64_t>> outs(P);
  RunRanks(
      P, chunk,
      [&](Communicator& c) {
        auto in = Input(c.rank(), n);
        auto& out = outs[c.rank()];
        if (in_place) {
          out = in;
          c.Allreduce(out.data(), out.data(), n, DataType::kInt64, ReduceOp::kSum);
        } else {
          out.assign(n, -1);
          c.Allreduce(in.data(), out.data(), n, DataType::kInt64, ReduceOp::kSum);
          Expect(in == Input(c.rank(), n), Case("allreduce modified its input", P, n, chunk));
        }
      },
      algorithm);
  std::string what = std::string(in_place ? "allreduce in place " : "allreduce ") + AlgorithmName(algorithm);
  for (int r = 0; r < P; ++r) Expect(outs[r] == expected, Case(what.c_str(), P, n, chunk));
}

void TestFloatBitwiseIdentical(int P, size_t n, size_t chunk, pycomm::Algorithm algorithm) {
  std::vector<std::vector<float>> outs(P);
  RunRanks(
      P, chunk,
      [&](Communicator& c) {
        std::vector<float> in(n);
        std::mt19937 rng(c.rank());
        std::normal_distribution<float> normal;
        for (auto& x : in) x = normal(rng);
        outs[c.rank()].resize(n);
        c.Allreduce(in.data(), outs[c.rank()].data(), n, DataType::kFloat32, ReduceOp::kAvg);
      },
      algorithm);
  for (int r = 1; r < P; ++r) {
    Expect(std::memcmp(outs[r].data(), outs[0].data(), n * sizeof(float)) == 0, Case("float avg bitwise", P, n, chunk));
  }
}

// In place: reduce_scatter's output is this rank's block of its input, allgather's input this
// rank's block of its output (forced one-shot and auto, whose small calls take it).
void TestReduceScatterAllgather(int P, size_t block, size_t chunk, pycomm::Algorithm algorithm, bool in_place = false) {
  std::vector<int64_t> sum(block * P, 0);
  for (int r = 0; r < P; ++r) {
    auto in = Input(r, block * P);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += in[i];
  }
  std::string what = std::string(in_place ? " in place " : " ") + AlgorithmName(algorithm);
  RunRanks(
      P, chunk,
      [&](Communicator& c) {
        auto in = Input(c.rank(), block * P);
        std::vector<int64_t> mine(block, -1);
        int64_t* out = in_place ? in.data() + c.rank() * block : mine.data();
        c.ReduceScatter(in.data(), out, block, DataType::kInt64, ReduceOp::kSum);
        Expect(std::equal(out, out + block, sum.begin() + c.rank() * block),
               Case(("reduce_scatter" + what).c_str(), P, block, chunk));
        std::vector<int64_t> all(block * P, -1);
        if (in_place) std::copy(out, out + block, all.begin() + c.rank() * block);
        c.Allgather(in_place ? all.data() + c.rank() * block : out, all.data(), block, DataType::kInt64);
        Expect(all == sum, Case(("allgather" + what).c_str(), P, block, chunk));
      },
      algorithm);
}

void TestBroadcast(int P, size_t n, size_t chunk, pycomm::Algorithm algorithm) {
  for (int root = 0; root < P; ++root) {
    RunRanks(
        P, chunk,
        [&](Communicator& c) {
          auto buf = Input(c.rank(), n);
          c.Broadcast(buf.data(), n, DataType::kInt64, root);
          Expect(
              buf == Input(root, n),
              Case(("broadcast root " + std::to_string(root) + " " + AlgorithmName(algorithm)).c_str(), P, n, chunk));
          c.Barrier();
        },
        algorithm);
  }
}

void TestAsyncOrder(int P) {
  RunRanks(P, 16, [&](Communicator& c) {
    std::vector<std::vector<int64_t>> bufs;
    for (int i = 0; i < 6; ++i) bufs.push_back(std::vector<int64_t>(100 + i, c.rank() + i));
    std::vector<std::shared_ptr<pycomm::Work>> works;
    for (auto& b : bufs)
      works.push_back(c.AllreduceAsync(b.data(), b.data(), b.size(), DataType::kInt64, ReduceOp::kMax));
    for (int i = 5; i >= 0; --i) {
      works[i]->Wait();
      Expect(bufs[i] == std::vector<int64_t>(100 + i, P - 1 + i), "async max #" + std::to_string(i));
    }
  });
}

// The executor alone: issue order whichever thread runs a task (the progress thread, a waiter
// that takes the queue's front, a blocking Run() that first runs what was queued before it); a
// task nobody waits for still runs, whether the progress thread naps or sleeps; a task's error
// reaches its waiter.
void TestExecutor() {
  std::vector<int> order;  // tasks run one at a time, each after the last (the queue's lock orders them)
  auto record = [&](int i) { return [&order, i] { order.push_back(i); }; };
  auto done_within = [](const std::shared_ptr<pycomm::Work>& w, double seconds) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!w->Done() && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    return w->Done();
  };
  pycomm::Executor executor;
  for (int round = 0; round < 50; ++round) {
    order.clear();
    auto a = executor.Submit(record(0));
    auto b = executor.Submit(record(1));
    auto c = executor.Submit(record(2));
    b->Wait();  // a before b, wherever they ran (c may be running: order is read after Run)
    Expect(a->Done() && b->Done(), "wait finishes the tasks issued before");
    executor.Run(record(3));  // after everything submitted before it
    Expect(c->Done() && order == std::vector<int>({0, 1, 2, 3}), "run after submitted work");
  }
  // Nobody waits: the napping thread (just active) and the sleeping one (idle for longer than its
  // naps last) both start it.
  Expect(done_within(executor.Submit(record(4)), 10), "unwaited task runs while the thread naps");
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  Expect(done_within(executor.Submit(record(5)), 10), "unwaited task runs after the thread slept");
  auto failing = executor.Submit([] { throw std::runtime_error("task failed"); });
  bool thrown = false;
  try {
    failing->Wait();
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  Expect(thrown, "a task's error reaches its waiter");
  auto queued = executor.Submit(record(6));
  executor.Close([] {});
  Expect(queued->Done() && order.back() == 6, "close runs queued tasks");
  queued->Wait();  // after close: returns at once
}

// Blocking-only (no progress thread): blocking calls work, an asynchronous one is refused before
// anything is sent and leaves the communicator usable.
void TestBlockingOnly(int P) {
  auto transports = pycomm::CreateLoopbackTransports(P);
  pycomm::Options options;
  options.blocking_only = true;
  options.timeout_s = 30;
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r, t = std::move(transports[r])]() mutable {
      auto comm = Communicator::FromTransport(std::move(t), options);
      std::vector<int64_t> buf(333, r + 1);
      bool refused = false;
      try {
        comm->AllreduceAsync(buf.data(), buf.data(), buf.size(), DataType::kInt64, ReduceOp::kSum);
      } catch (const pycomm::CommError&) {
        refused = true;
      }
      Expect(refused, "blocking-only refuses AllreduceAsync P=" + std::to_string(P));
      comm->Allreduce(buf.data(), buf.data(), buf.size(), DataType::kInt64, ReduceOp::kSum);
      Expect(buf == std::vector<int64_t>(333, P * (P + 1) / 2), "blocking-only allreduce P=" + std::to_string(P));
      comm->Close();
    });
  }
  for (auto& t : threads) t.join();
}

void TestCloseRunsQueuedWork(int P) {
  // close() right after issuing: the queued allreduce must still run on every rank, whichever
  // rank's progress thread gets to it first.
  auto transports = pycomm::CreateLoopbackTransports(P);
  std::vector<std::vector<int64_t>> bufs(P, std::vector<int64_t>(1000));
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r, t = std::move(transports[r])]() mutable {
      auto comm = Communicator::FromTransport(std::move(t));
      bufs[r].assign(1000, r + 1);
      comm->AllreduceAsync(bufs[r].data(), bufs[r].data(), 1000, DataType::kInt64, ReduceOp::kSum);
      comm->Close();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < P; ++r) Expect(bufs[r] == std::vector<int64_t>(1000, P * (P + 1) / 2), "close runs queued work");
}

void TestTimeout() {
  // Rank 1 never joins: rank 0 must get PeerError naming rank 1, not hang.
  auto transports = pycomm::CreateLoopbackTransports(2);
  pycomm::Options options;
  options.timeout_s = 0.2;
  auto comm = Communicator::FromTransport(std::move(transports[0]), options);
  int64_t x = 1;
  bool peer_error = false;
  try {
    comm->Allreduce(&x, &x, 1, DataType::kInt64, ReduceOp::kSum);
  } catch (const pycomm::PeerError& e) {
    peer_error = e.peer() == 1;
  }
  Expect(peer_error, "a silent peer gives PeerError naming it");
  bool refused = false;
  try {
    comm->Barrier();
  } catch (const pycomm::CommError& e) {
    refused = std::string(e.what()).find("unusable") != std::string::npos;
  }
  Expect(refused, "a communicator refuses calls after a peer error");
}

// A rank that leaves the arena (its communicator closed or broke): a round it posted before
// leaving still completes; a wait for a later one fails at once with PeerError naming it, not at
// the timeout. Through the communicator too: rank 1 closes after one allreduce.
void TestPeerLeaves() {
  auto transports = pycomm::CreateLoopbackTransports(2);
  pycomm::SharedArena& mine = *transports[0]->arena();
  pycomm::SharedArena& theirs = *transports[1]->arena();
  theirs.Post(1, pycomm::SharedArena::CallInfo{});
  theirs.Leave();
  mine.Post(1, pycomm::SharedArena::CallInfo{});
  mine.WaitAll(1, 60);
  mine.Post(2, pycomm::SharedArena::CallInfo{});
  const auto start = std::chrono::steady_clock::now();
  int named = -1;
  try {
    mine.WaitAll(2, 60);
  } catch (const pycomm::PeerError& e) {
    named = e.peer();
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Expect(named == 1 && seconds < 10, "arena: a round after the peer left (" + std::to_string(seconds) + " s)");

  transports = pycomm::CreateLoopbackTransports(2);
  pycomm::Options options;
  options.timeout_s = 60;
  auto comm0 = Communicator::FromTransport(std::move(transports[0]), options);
  auto comm1 = Communicator::FromTransport(std::move(transports[1]), options);
  std::thread leaver([&] {
    int64_t x = 1;
    comm1->Allreduce(&x, &x, 1, DataType::kInt64, ReduceOp::kSum);
    comm1->Close();
  });
  int64_t x = 1;
  comm0->Allreduce(&x, &x, 1, DataType::kInt64, ReduceOp::kSum);
  leaver.join();
  const auto again = std::chrono::steady_clock::now();
  named = -1;
  try {
    comm0->Allreduce(&x, &x, 1, DataType::kInt64, ReduceOp::kSum);
  } catch (const pycomm::PeerError& e) {
    named = e.peer();
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - again).count();
  Expect(x == 2 && named == 1 && seconds < 10,
         "communicator: a call after the peer closed (" + std::to_string(seconds) + " s)");
}

// The device collectives' hand-off to their leader, through the arena (with rounds of other
// arena users in between, sharing its counter) or through messages, with and without a reply;
// messages or replies too large for an arena slot fall back to messages.
void TestLeaderExchange(int P, bool through_arena) {
  auto transports = pycomm::CreateLoopbackTransports(P);
  std::vector<std::thread> threads;
  std::vector<int> bad(P, 0);
  for (int rank = 0; rank < P; ++rank) {
    threads.emplace_back([&, rank] {
      pycomm::Transport& t = *transports[rank];
      uint64_t seq = 0;
      pycomm::LeaderExchange exchange(t, through_arena ? &seq : nullptr, 30);
      if (exchange.through_arena() != through_arena) ++bad[rank];
      for (int i = 0; i < 300; ++i) {
        const size_t bytes = i % 50 == 7 ? pycomm::kArenaSlotBytes + 8 : 16 + (i % 5) * 40;
        // A reply every other call, one too large for a slot now and then.
        const size_t reply_bytes = i % 2 ? 0 : i % 50 == 10 ? pycomm::kArenaSlotBytes + 16 : 8 + (i % 3) * 24;
        auto fill = [&](int from) { return static_cast<char>(from * 31 + i); };
        const std::vector<char> want_reply(reply_bytes, static_cast<char>(i * 3 + 1));
        if (rank == 0) {
          std::vector<std::vector<char>> messages;
          exchange.Collect(&messages, bytes, reply_bytes);
          for (int peer = 1; peer < P; ++peer) {
            if (messages[peer] != std::vector<char>(bytes, fill(peer))) ++bad[rank];
          }
          exchange.Answer(static_cast<char>(i % 7 + 1), want_reply.data());
        } else {
          std::vector<char> message(bytes, fill(rank)), reply(reply_bytes);
          if (exchange.Hand(message.data(), message.size(), reply.data(), reply_bytes) !=
              static_cast<char>(i % 7 + 1)) {
            ++bad[rank];
          }
          if (reply != want_reply) ++bad[rank];
        }
        if (through_arena && i % 3 == 0) {
          // Another user of the arena: a full round whose slots every rank reads.
          pycomm::SharedArena& arena = *t.arena();
          const uint64_t round = ++seq;
          std::memset(arena.slot(rank, round), fill(rank) + 1, 64);
          arena.Post(round, pycomm::SharedArena::CallInfo{});
          arena.WaitAll(round, 30);
          for (int q = 0; q < P; ++q) {
            if (arena.slot(q, round)[63] != static_cast<char>(fill(q) + 1)) ++bad[rank];
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int rank = 0; rank < P; ++rank) {
    Expect(bad[rank] == 0, "leader exchange P=" + std::to_string(P) + (through_arena ? " arena" : " messages") +
                               " rank " + std::to_string(rank) + ": " + std::to_string(bad[rank]) + " wrong");
  }
}

// Ranks that make different calls: a peer handing over a message of another size gets the
// mismatch answer and the leader MismatchError; a peer handing over while the leader makes
// another arena round gets MismatchError at once, not after the time-out.
void TestLeaderExchangeMismatch() {
  auto transports = pycomm::CreateLoopbackTransports(2);
  uint64_t seqs[2] = {0, 0};
  pycomm::LeaderExchange leader(*transports[0], &seqs[0], 30), peer(*transports[1], &seqs[1], 30);
  bool leader_saw = false;
  char answer = 0;
  std::thread t([&] {
    std::vector<std::vector<char>> messages;
    try {
      leader.Collect(&messages, 24);
    } catch (const pycomm::MismatchError&) {
      leader_saw = true;
    }
    leader.Answer(pycomm::LeaderExchange::kMismatch);
  });
  std::vector<char> message(16, 1);
  answer = peer.Hand(message.data(), message.size());
  t.join();
  Expect(leader_saw && answer == pycomm::LeaderExchange::kMismatch, "leader exchange: sizes differ");

  bool peer_saw = false;
  const auto start = std::chrono::steady_clock::now();
  std::thread other([&] {
    // The leader's side of some other arena user's round.
    pycomm::SharedArena& arena = *transports[0]->arena();
    const uint64_t round = ++seqs[0];
    arena.Post(round, pycomm::SharedArena::CallInfo{});
    arena.WaitAll(round, 30);
  });
  try {
    peer.Hand(message.data(), message.size());
  } catch (const pycomm::MismatchError&) {
    peer_saw = true;
  }
  other.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Expect(peer_saw && seconds < 10,
         "leader exchange: the leader makes another call (" + std::to_string(seconds) + " s)");
}

}  // namespace

// The start time that identifies a process, read from /proc/<pid>/stat: for this process, for a
// child whose command name holds spaces and parentheses (the fields are counted after the last
// ')'), and none once the child is a zombie or gone.
void TestLiveStartTicks() {
  using pycomm::LiveStartTicks;
  const int64_t mine = LiveStartTicks(getpid());
  Expect(mine > 0 && LiveStartTicks(getpid()) == mine, "this process has a start time, the same each time");
  const pid_t child = fork();
  if (child == 0) {
    prctl(PR_SET_NAME, "x) 1 2 (y", 0, 0, 0);
    for (;;) pause();
  }
  int64_t theirs = -1;
  for (int i = 0; i < 200; ++i) {  // until the child has renamed itself (its start time is the same before)
    theirs = LiveStartTicks(child);
    char name[64] = {};
    const std::string path = "/proc/" + std::to_string(child) + "/comm";
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      std::fgets(name, sizeof(name), f);
      std::fclose(f);
    }
    if (std::strncmp(name, "x) 1 2 (y", 9) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  Expect(theirs >= mine, "a child started later: start time " + std::to_string(theirs) + " >= " + std::to_string(mine));
  Expect(LiveStartTicks(child) == theirs, "a child named 'x) 1 2 (y' keeps its start time");
  kill(child, SIGKILL);
  int64_t zombie = theirs;
  for (int i = 0; i < 200 && zombie >= 0; ++i) {  // dead but not yet reaped
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    zombie = LiveStartTicks(child);
  }
  Expect(zombie == -1, "a killed child that is not reaped has no start time");
  waitpid(child, nullptr, 0);
  Expect(LiveStartTicks(child) == -1, "a reaped child has no start time");
}

// Options::chunk_bytes outside kMinChunkBytes .. kMaxChunkBytes: refused at creation; the bounds
// themselves are taken (the largest without touching its scratch).
// A plain CommError (MPI or a memory read failing) is blamed on a rank found dead within the
// grace, as a PeerError naming it with the original text; other errors, and a CommError where
// every rank lives, stay as they were.
void TestBlameDeadPeer() {
  class Watched : public pycomm::Transport {
   public:
    explicit Watched(int dies_at_look) : dies_at_look_(dies_at_look) {}
    int rank() const override { return 0; }
    int size() const override { return 3; }
    std::unique_ptr<pycomm::Request> Isend(int, const void*, size_t) override { return nullptr; }
    std::unique_ptr<pycomm::Request> Irecv(int, void*, size_t) override { return nullptr; }
    const char* name() const override { return "watched"; }
    void CheckPeersAlive() override {
      if (++looks == dies_at_look_) throw pycomm::PeerError("pycomm: rank 2 has died", 2);
    }
    int looks = 0;

   private:
    int dies_at_look_;
  };
  auto blamed = [](const std::exception_ptr& error, Watched& transport) -> std::string {
    try {
      std::rethrow_exception(pycomm::BlameDeadPeer(error, transport));
    } catch (const pycomm::PeerError& e) {
      return "PeerError " + std::to_string(e.peer()) + ": " + e.what();
    } catch (const pycomm::MismatchError& e) {
      return std::string("MismatchError: ") + e.what();
    } catch (const pycomm::CommError& e) {
      return std::string("CommError: ") + e.what();
    }
  };
  const auto mpi_failed = std::make_exception_ptr(pycomm::CommError("pycomm: MPI_Test(recv) failed: Other MPI error"));
  Watched dead_at_once(1), dead_a_moment_later(2), alive(-1), untouched(1);
  const std::string at_once = blamed(mpi_failed, dead_at_once);
  Expect(at_once ==
             "PeerError 2: pycomm: rank 2 has died (here it showed as: pycomm: MPI_Test(recv) failed: Other MPI error)",
         "a dead rank is blamed for an MPI failure: " + at_once);
  Expect(blamed(mpi_failed, dead_a_moment_later).rfind("PeerError 2", 0) == 0,
         "a rank that shows as dead only a moment later is blamed too");
  Expect(blamed(mpi_failed, alive) == "CommError: pycomm: MPI_Test(recv) failed: Other MPI error" && alive.looks == 3,
         "with every rank alive the error stays, after 3 looks");
  const auto mismatch = std::make_exception_ptr(pycomm::MismatchError("pycomm: the ranks made different calls"));
  const auto left = std::make_exception_ptr(pycomm::PeerError("pycomm: rank 1 has left", 1));
  Expect(blamed(mismatch, untouched).rfind("MismatchError", 0) == 0 &&
             blamed(left, untouched) == "PeerError 1: pycomm: rank 1 has left" && untouched.looks == 0,
         "mismatches and peer errors are not blamed on anyone else");
}

void TestChunkBounds() {
  auto refused = [](size_t chunk_bytes) {
    pycomm::Options options;
    options.chunk_bytes = chunk_bytes;
    try {
      Communicator::FromTransport(std::move(pycomm::CreateLoopbackTransports(1)[0]), options);
      return false;
    } catch (const std::invalid_argument& e) {
      return std::string(e.what()).find("chunk_bytes must be from 8 to") != std::string::npos;
    }
  };
  Expect(!refused(pycomm::kMinChunkBytes) && !refused(pycomm::kMaxChunkBytes), "chunk_bytes at its bounds taken");
  Expect(refused(pycomm::kMinChunkBytes - 1), "chunk_bytes below its least refused");
  Expect(refused(pycomm::kMaxChunkBytes + 1), "chunk_bytes above its most refused");
}

// PYCOMM_FAULT, split at its commas: every item read, a last comma allowed, an empty item or a
// bad number refused.
void TestFaultPlanParsing() {
  auto parse = [](const char* value, pycomm::FaultPlan* plan) {
    setenv("PYCOMM_FAULT", value, 1);
    try {
      *plan = pycomm::FaultPlan::FromEnvironment();
      return true;
    } catch (const std::invalid_argument&) {
      return false;
    }
  };
  pycomm::FaultPlan plan;
  Expect(parse("rank=2,call=7,action=stall,seconds=1.5", &plan) && plan.rank == 2 && plan.call == 7 &&
             plan.action == pycomm::FaultPlan::kStall && plan.seconds == 1.5,
         "PYCOMM_FAULT: every item read");
  Expect(parse("action=exit,call=3,rank=1,", &plan) && plan.rank == 1 && plan.call == 3 &&
             plan.action == pycomm::FaultPlan::kExit,
         "PYCOMM_FAULT: a last comma allowed");
  Expect(!parse("rank=1,,call=3,action=exit", &plan), "PYCOMM_FAULT: an empty item refused");
  Expect(!parse("rank=one,call=3,action=exit", &plan), "PYCOMM_FAULT: a bad number refused");
  Expect(!parse("rank=1,call=3", &plan), "PYCOMM_FAULT: no action refused");
  Expect(parse("", &plan) && plan.action == pycomm::FaultPlan::kNone, "PYCOMM_FAULT empty: no fault");
  unsetenv("PYCOMM_FAULT");
}

// Phase timing: a call counts where timing was on, unchanged, from its start to its end.
void TestPhaseClock() {
  auto laps = [](const char* phase) {
    for (const pycomm::PhaseTime& t : pycomm::PhaseTimes()) {
      if (t.phase == phase) return static_cast<int>(t.laps);
    }
    return 0;
  };
  {
    pycomm::PhaseClock off;
    off.Lap("a");
  }
  Expect(pycomm::PhaseTimes().empty(), "phase timing off: nothing summed");
  pycomm::SetPhaseTiming(true);
  for (int i = 0; i < 3; ++i) {
    pycomm::PhaseClock clock;
    clock.Lap("a");
    clock.Lap("b");
    clock.Lap("a");
  }
  Expect(laps("a") == 6 && laps("b") == 3 && pycomm::PhaseTimes()[0].phase == "a", "phase timing: laps summed");
  {
    pycomm::PhaseClock before_restart;
    pycomm::SetPhaseTiming(true);  // zeroes the sums: the call that began before adds nothing
    before_restart.Lap("a");
  }
  Expect(pycomm::PhaseTimes().empty(), "phase timing restarted: an earlier call adds nothing");
  {
    pycomm::PhaseClock before_stop;
    before_stop.Lap("a");
    pycomm::SetPhaseTiming(false);
  }
  Expect(pycomm::PhaseTimes().empty(), "phase timing stopped: a call in flight adds nothing");
}

int main() {
  TestPhaseClock();
  TestFaultPlanParsing();
  TestChunkBounds();
  TestBlameDeadPeer();
  TestLiveStartTicks();
  TestExecutor();
  const size_t chunks[] = {8, 24, 4096, size_t{1} << 20};
  for (int P = 1; P <= 5; ++P) {
    for (size_t chunk : chunks) {
      for (auto algorithm : {pycomm::Algorithm::kRing, pycomm::Algorithm::kOneShot, pycomm::Algorithm::kSingleCopy}) {
        for (size_t n :
             {size_t{0}, size_t{1}, size_t{2}, size_t{3}, size_t{5}, size_t{17}, size_t{1000}, size_t{4099}}) {
          TestAllreduce(P, n, chunk, false, algorithm);
          TestAllreduce(P, n, chunk, true, algorithm);
        }
        TestFloatBitwiseIdentical(P, 1001, chunk, algorithm);
      }
      for (auto algorithm : {pycomm::Algorithm::kAuto, pycomm::Algorithm::kRing, pycomm::Algorithm::kOneShot,
                             pycomm::Algorithm::kSingleCopy}) {
        for (size_t block : {size_t{0}, size_t{1}, size_t{7}, size_t{300}}) {
          TestReduceScatterAllgather(P, block, chunk, algorithm);
        }
        for (size_t n : {size_t{0}, size_t{1}, size_t{333}}) TestBroadcast(P, n, chunk, algorithm);
      }
      for (auto algorithm : {pycomm::Algorithm::kAuto, pycomm::Algorithm::kOneShot}) {
        for (size_t block : {size_t{1}, size_t{300}}) TestReduceScatterAllgather(P, block, chunk, algorithm, true);
      }
    }
    // Larger than one arena slot (256 KiB): the one-shots go piece by piece.
    TestReduceScatterAllgather(P, 40003, 1 << 20, pycomm::Algorithm::kOneShot);
    TestReduceScatterAllgather(P, 40003, 1 << 20, pycomm::Algorithm::kOneShot, true);
    TestBroadcast(P, 70001, 1 << 20, pycomm::Algorithm::kOneShot);
    TestBroadcast(P, 70001, 1 << 20, pycomm::Algorithm::kSingleCopy);
    TestBroadcast(P, 70001, 1 << 20, pycomm::Algorithm::kAuto);
    // Larger than one arena slot: the one-shot goes piece by piece, alternating slots.
    TestAllreduce(P, 100003, 1 << 20, false, pycomm::Algorithm::kOneShot);
    TestAllreduce(P, 100003, 1 << 20, true, pycomm::Algorithm::kOneShot);
    // Several single-copy chunks per block (threads read their own process's memory).
    TestAllreduce(P, 300007, 1 << 20, true, pycomm::Algorithm::kSingleCopy);
    TestAsyncOrder(P);
    TestCloseRunsQueuedWork(P);
    TestBlockingOnly(P);
    TestLeaderExchange(P, true);
    TestLeaderExchange(P, false);
  }
  TestTimeout();
  TestPeerLeaves();
  TestLeaderExchangeMismatch();
  return pycomm_test::Report();
}
