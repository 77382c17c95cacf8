// C++ tier for the device collectives, on the fake CUDA runtime (fake_cuda_runtime.cc): ranks are
// threads, each node's ranks share a loopback transport, the node leaders another one, and the
// whole communicator's transport says which node each rank is on. Checks every collective against
// a serial reference on one node (up to 10 ranks: several fused passes) and across nodes (even,
// one rank each, uneven), several pieces of host staging included, and that ranks making
// different calls all get MismatchError; with the leader's protocol and with split work (each
// rank on a GPU of its own, or forced on a shared one). Inputs are written by copies queued on each rank's
// stream and results read after a stream synchronisation, as a CUDA program would: the fake runs
// queued work late, so missing ordering inside pycomm shows as wrong results. Prints "N passed,
// N failed".

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "core/collectives.h"
#include "core/device.h"
#include "core/hierarchy.h"
#include "cuda/cuda_check.h"
#include "cuda/device_group.h"
#include "cuda/reduce_kernels.h"
#include "expect.h"
#include "reduce/half.h"
#include "transport/loopback.h"

// Failures the fake runtime injects on the calling thread (fake_cuda_runtime.cc).
namespace fake_cuda {
enum What { kNothing, kEvents, kMalloc, kLaunch, kMallocHost, kIpcOpen, kSetDevice };
void Fail(What what);
void UseGpu(int gpu);
int LiveEvents();
int FreedWhileOpen();
int OpenIpcMappings();
void ThreadExit();
int CurrentDevice();
void DropContext();
bool MadeContext(int device);
int DeviceSyncs();
int CallsWithoutContext();
void StallStream();
void ReleaseStalls();
uint64_t Process();
void JoinProcess(uint64_t process);
void PlaceAllocation(void* at, size_t size);
void SetMaxPitch(size_t bytes);
int AddressRangeQueries();
}  // namespace fake_cuda

namespace {

using pycomm::DataType;
using pycomm::ReduceOp;
using pycomm::Transport;

using pycomm_test::Expect;

// Whether the transports play a CUDA-aware MPI (set between runs, read by every rank's thread).
bool g_cuda_aware = false;
// Whether every rank has a GPU of its own (else all share GPU 0), set between runs.
bool g_own_gpus = false;
// The device number the ranks' arrays are on, set between runs.
int g_device = 0;
// The rank that cannot open other ranks' events and memory through CUDA IPC (-1: none), set
// between runs.
int g_ipc_fails_on = -1;
// The time-out where RunPlaced keeps each rank's error (tests of failures expect none to wait it out).
double g_errors_timeout = 5;
// Whether the communicator could not build its hierarchy (its node groups), set between runs.
bool g_no_hierarchy = false;
// The host algorithm the communicator would pass on (PYCOMM_ALGO) on each rank (none listed:
// auto), set between runs.
std::vector<pycomm::Algorithm> g_algorithms;

// Each rank's whole-communicator transport and its arena's round counter, as RunPlaced gives
// them to the device collectives (for tests that make a host call beside them).
thread_local Transport* t_world = nullptr;
thread_local uint64_t* t_arena_seq = nullptr;

// Passes point-to-point traffic to another transport: the base of the stand-ins below.
class Forwarding : public Transport {
 public:
  explicit Forwarding(std::unique_ptr<Transport> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::unique_ptr<pycomm::Request> Isend(int peer, const void* buf, size_t bytes) override {
    return inner_->Isend(peer, buf, bytes);
  }
  std::unique_ptr<pycomm::Request> Irecv(int peer, void* buf, size_t bytes) override {
    return inner_->Irecv(peer, buf, bytes);
  }

 protected:
  std::unique_ptr<Transport> inner_;
};

// The leaders' group as a CUDA-aware MPI's: its allreduce takes "device" memory (ordinary memory
// here) and reduces at once, with pycomm's ring; like MPI, it has no float16 or bfloat16.
class CudaAwareGroup : public Forwarding {
 public:
  using Forwarding::Forwarding;
  const char* name() const override { return "cuda-aware"; }
  bool accepts_device_memory() const override { return true; }
  std::unique_ptr<pycomm::Request> IallreduceInPlace(void* buf, size_t count, DataType dtype, ReduceOp op) override {
    if (dtype == DataType::kFloat16 || dtype == DataType::kBFloat16) return nullptr;
    std::vector<char> scratch(pycomm::kPipelineDepth * 4096);
    uint64_t unused_arena_seq = 0;
    pycomm::AllreduceRing(pycomm::CollectiveContext{*inner_, 4096, 30, scratch.data(), &unused_arena_seq, 0}, buf, buf,
                          count, dtype, op == ReduceOp::kAvg ? ReduceOp::kSum : op);
    return std::make_unique<Done>();
  }

 private:
  struct Done : pycomm::Request {
    bool Test() override { return true; }
    int peer() const override { return -1; }
  };
};

// The whole communicator's transport, with ranks placed on nodes.
class PlacedTransport : public Forwarding {
 public:
  PlacedTransport(std::unique_ptr<Transport> inner, std::vector<int> node_of)
      : Forwarding(std::move(inner)), node_of_(std::move(node_of)) {}
  const char* name() const override { return "placed"; }
  bool accepts_device_memory() const override { return g_cuda_aware; }
  // On one node it is the node's transport, arena included.
  pycomm::SharedArena* arena() override { return single_node() ? inner_->arena() : nullptr; }
  int node_of(int rank) const override { return node_of_[rank]; }

 private:
  bool single_node() const {
    for (int n : node_of_) {
      if (n != 0) return false;
    }
    return true;
  }
  std::vector<int> node_of_;
};

// Device memory filled with `host` by a copy queued on this rank's default stream, which the fake
// runs only when something waits for it: collectives must order their reads after it.
template <typename T>
T* DeviceArray(const std::vector<T>& host, cudaStream_t stream = nullptr) {
  thread_local std::vector<std::vector<T>> sources;  // what the queued copies read, kept
  void* p = nullptr;
  cudaMalloc(&p, host.size() * sizeof(T) + 1);
  sources.push_back(host);
  if (!host.empty()) cudaMemcpyAsync(p, sources.back().data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream);
  return static_cast<T*>(p);
}

// Before the host reads results: the collectives' work is queued on `stream`.
void Sync(cudaStream_t stream = nullptr) { cudaStreamSynchronize(stream); }

// What every rank runs: body(rank, collectives) on threads, with the groups that a communicator
// would have built (the hierarchy's node group and the leaders' group) for the placement.
std::string Layout(const std::vector<int>& node_of) {
  std::string s = "[";
  for (int n : node_of) s += std::to_string(n);
  return s + "]";
}

// With `errors`, each rank's exception (from set-up or body) is kept there, and the timeout is
// short: tests of failures check that every rank fails at once, not after it. `before` runs on
// each rank's thread before set-up, `after` once its collectives are destroyed.
void RunPlaced(const std::vector<int>& node_of, const std::function<void(int rank, pycomm::DeviceCollectives&)>& body,
               std::vector<std::string>* errors = nullptr, const std::function<void(int rank)>& before = nullptr,
               const std::function<void(int rank)>& after = nullptr) {
  const int P = static_cast<int>(node_of.size());
  int nodes = 0;
  for (int n : node_of) nodes = std::max(nodes, n + 1);
  std::vector<std::vector<int>> members(nodes);
  for (int r = 0; r < P; ++r) members[node_of[r]].push_back(r);
  auto world = pycomm::CreateLoopbackTransports(P);
  std::vector<std::vector<std::unique_ptr<Transport>>> node_transports(nodes);
  for (int n = 0; n < nodes; ++n) node_transports[n] = pycomm::CreateLoopbackTransports(members[n].size());
  // As BuildHierarchy makes them: slice s's owners are node n's rank s % (its size), one per
  // node, ranked in ascending order; slice 0's are the nodes' leaders.
  int slices = 0;
  for (const auto& m : members) slices = std::max(slices, static_cast<int>(m.size()));
  std::vector<std::vector<int>> slice_members(slices);
  std::vector<std::vector<std::unique_ptr<Transport>>> slice_transports(slices);
  for (int s = 0; s < slices && nodes > 1; ++s) {
    for (const auto& m : members) slice_members[s].push_back(m[s % m.size()]);
    std::sort(slice_members[s].begin(), slice_members[s].end());
    slice_transports[s] = pycomm::CreateLoopbackTransports(nodes);
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      fake_cuda::UseGpu(g_own_gpus ? r : 0);
      if (r == g_ipc_fails_on) fake_cuda::Fail(fake_cuda::kIpcOpen);
      PlacedTransport placed(std::move(world[r]), node_of);
      std::unique_ptr<pycomm::Hierarchy> hierarchy;
      uint64_t arena_seq = 0;
      if (nodes > 1 && !g_no_hierarchy) {
        hierarchy = std::make_unique<pycomm::Hierarchy>();
        const auto& mine = members[node_of[r]];
        const int local = static_cast<int>(std::find(mine.begin(), mine.end(), r) - mine.begin());
        if (mine.size() > 1) hierarchy->node = std::move(node_transports[node_of[r]][local]);
        hierarchy->slices = slices;
        hierarchy->local_rank = local;
        hierarchy->local_size = static_cast<int>(mine.size());
        hierarchy->node_ranks = mine;
        hierarchy->across.resize(slices);
        for (int s = local; s < slices; s += static_cast<int>(mine.size())) {
          hierarchy->owned.push_back(s);
          const auto& group = slice_members[s];
          const size_t at = std::find(group.begin(), group.end(), r) - group.begin();
          hierarchy->across[s] = std::move(slice_transports[s][at]);
          if (g_cuda_aware) hierarchy->across[s] = std::make_unique<CudaAwareGroup>(std::move(hierarchy->across[s]));
        }
      }
      t_world = &placed;
      t_arena_seq = &arena_seq;
      if (before) before(r);
      try {
        pycomm::Options options;
        options.chunk_bytes = 4096;
        options.timeout_s = errors ? g_errors_timeout : 30;
        options.algorithm = r < static_cast<int>(g_algorithms.size()) ? g_algorithms[r] : pycomm::Algorithm::kAuto;
        auto collectives = pycomm::CreateDeviceCollectives(placed, &arena_seq, hierarchy.get(), g_device, options);
        body(r, *collectives);
        if (!errors) {
          // What pycomm met and handled (a query of unfinished work, a refused mapping) is no
          // error of the caller's: its next cudaGetLastError must not find it.
          Expect(cudaGetLastError() == cudaSuccess, "an error left behind on rank " + std::to_string(r));
          collectives->Quiesce();
          Expect(cudaGetLastError() == cudaSuccess, "an error left behind at close on rank " + std::to_string(r));
        }
      } catch (const std::exception& e) {
        if (errors) {
          (*errors)[r] = std::string(typeid(e).name()) + ": " + e.what();
        } else {
          Expect(false, std::string("rank ") + std::to_string(r) + " threw: " + e.what());
        }
      }
      fake_cuda::Fail(fake_cuda::kNothing);
      if (after) after(r);
      fake_cuda::ThreadExit();
    });
  }
  for (auto& t : threads) t.join();
  Expect(fake_cuda::LiveEvents() == 0,
         "events left after " + Layout(node_of) + ": " + std::to_string(fake_cuda::LiveEvents()));
}

bool Same(const void* a, const void* b, size_t bytes) { return bytes == 0 || std::memcmp(a, b, bytes) == 0; }

int64_t Power(int64_t base, int exponent) {
  int64_t result = 1;
  while (exponent-- > 0) result *= base;
  return result;
}

// RunPlaced keeping each rank's error in `errors`: the seconds it took (tests of failures check
// that every rank fails at once, not after the time-out).
double SecondsToRun(const std::vector<int>& node_of,
                    const std::function<void(int rank, pycomm::DeviceCollectives&)>& body,
                    std::vector<std::string>* errors, const std::function<void(int rank)>& before = nullptr) {
  const auto start = std::chrono::steady_clock::now();
  RunPlaced(node_of, body, errors, before);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int64_t Value(int rank, size_t i) { return static_cast<int64_t>((rank + 1) * 1000 + i % 977) - 500; }

// float32 values whose sums round: their bits depend on the order of the additions, which must
// not depend on whether the call is in place.
float Inexact(int rank, size_t i) {
  return 0.1f * static_cast<float>(Value(rank, i)) + 1e-3f * static_cast<float>(i % 7);
}

// On `stream` (each rank's own; null: its default stream): inputs written there, the collectives
// queued there, results read after synchronising only it.
void TestAllreduce(const std::vector<int>& node_of, size_t n, cudaStream_t stream = nullptr) {
  const int P = static_cast<int>(node_of.size());
  std::vector<int64_t> sum(n, 0);
  std::vector<float> avg(n, 0);
  for (int r = 0; r < P; ++r) {
    for (size_t i = 0; i < n; ++i) sum[i] += Value(r, i);
  }
  for (size_t i = 0; i < n; ++i) avg[i] = static_cast<float>(sum[i]) / static_cast<float>(P);
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    std::vector<int64_t> in(n);
    std::vector<float> fin(n);
    std::vector<uint16_t> hin(n);  // float16: small integers, whose sums are exact
    for (size_t i = 0; i < n; ++i) {
      in[i] = Value(r, i), fin[i] = static_cast<float>(Value(r, i));
      hin[i] = pycomm::FloatToFloat16(static_cast<float>(i % 64 + r));
    }
    uint16_t* h = DeviceArray(hin, stream);
    int64_t* a = DeviceArray(in, stream);
    int64_t* out = DeviceArray(std::vector<int64_t>(n, -1), stream);
    float* f = DeviceArray(fin, stream);
    std::vector<float> gin(n);
    for (size_t i = 0; i < n; ++i) gin[i] = Inexact(r, i);
    float* g = DeviceArray(gin, stream);
    float* gout = DeviceArray(std::vector<float>(n, -1), stream);
    c.Allreduce(g, gout, n, DataType::kFloat32, ReduceOp::kSum, stream);
    c.Allreduce(g, g, n, DataType::kFloat32, ReduceOp::kSum, stream);
    c.Allreduce(a, out, n, DataType::kInt64, ReduceOp::kSum, stream);
    c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, stream);
    c.Allreduce(f, f, n, DataType::kFloat32, ReduceOp::kAvg, stream);
    c.Allreduce(h, h, n, DataType::kFloat16, ReduceOp::kSum, stream);
    Sync(stream);
    bool halves = true;
    for (size_t i = 0; i < n; ++i) {
      halves = halves && pycomm::Float16ToFloat(h[i]) == static_cast<float>(P * (i % 64) + P * (P - 1) / 2);
    }
    Expect(halves, "float16 " + Layout(node_of) + " n=" + std::to_string(n));
    cudaFree(h);
    Expect(Same(g, gout, n * 4), "float32 in place as out of place " + Layout(node_of) + " n=" + std::to_string(n));
    cudaFree(g), cudaFree(gout);
    Expect(Same(out, sum.data(), n * 8), "allreduce " + Layout(node_of) + " n=" + std::to_string(n));
    Expect(Same(a, sum.data(), n * 8), "in place " + Layout(node_of) + " n=" + std::to_string(n));
    Expect(Same(f, avg.data(), n * 4), "avg " + Layout(node_of) + " n=" + std::to_string(n));
    cudaFree(a), cudaFree(out), cudaFree(f);
  });
}

void TestOthers(const std::vector<int>& node_of, size_t block) {
  const int P = static_cast<int>(node_of.size());
  const std::string where = Layout(node_of) + " block=" + std::to_string(block);
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    std::vector<int64_t> in(block * P);
    for (size_t i = 0; i < in.size(); ++i) in[i] = Value(r, i);
    int64_t* x = DeviceArray(in);
    int64_t* mine = DeviceArray(std::vector<int64_t>(block, -1));
    int64_t* all = DeviceArray(std::vector<int64_t>(block * P, -1));
    std::vector<int64_t*> bufs;
    for (int root = 0; root < P; ++root) {
      std::vector<int64_t> mine_in(block);
      for (size_t i = 0; i < block; ++i) mine_in[i] = Value(r + 7 + root, i);
      bufs.push_back(DeviceArray(mine_in));
    }
    c.ReduceScatter(x, mine, block, DataType::kInt64, ReduceOp::kSum, nullptr);
    // In place (NCCL's form): the output is this rank's block of the input.
    int64_t* x_in_place = DeviceArray(in);
    c.ReduceScatter(x_in_place, x_in_place + r * block, block, DataType::kInt64, ReduceOp::kSum, nullptr);
    // avg: a float32 sum of small integers (exact), divided once.
    std::vector<float> fin(block * P);
    for (size_t i = 0; i < fin.size(); ++i) fin[i] = static_cast<float>(Value(r, i));
    float* f = DeviceArray(fin);
    float* favg = DeviceArray(std::vector<float>(block, -1));
    c.ReduceScatter(f, favg, block, DataType::kFloat32, ReduceOp::kAvg, nullptr);
    std::vector<float> gin(block * P);
    for (size_t i = 0; i < gin.size(); ++i) gin[i] = Inexact(r, i);
    float* g = DeviceArray(gin);
    float* gmine = DeviceArray(std::vector<float>(block, -1));
    c.ReduceScatter(g, gmine, block, DataType::kFloat32, ReduceOp::kSum, nullptr);
    c.ReduceScatter(g, g + r * block, block, DataType::kFloat32, ReduceOp::kSum, nullptr);
    c.Allgather(x, all, block, DataType::kInt64, nullptr);
    // In place: x is this rank's block of the output.
    std::vector<int64_t> placed(block * P, -1);
    for (size_t i = 0; i < block; ++i) placed[r * block + i] = Value(r, i);
    int64_t* all_in_place = DeviceArray(placed);
    c.Allgather(all_in_place + r * block, all_in_place, block, DataType::kInt64, nullptr);
    for (int root = 0; root < P; ++root) c.Broadcast(bufs[root], block, DataType::kInt64, root, nullptr);
    Sync();
    bool ok = true;
    for (size_t i = 0; i < block; ++i) {
      int64_t want = 0;
      for (int q = 0; q < P; ++q) want += Value(q, r * block + i);
      ok = ok && mine[i] == want;
    }
    Expect(ok, "reduce_scatter " + where);
    ok = true;
    for (size_t i = 0; i < block; ++i) {
      int64_t sum = 0;
      for (int q = 0; q < P; ++q) sum += Value(q, r * block + i);
      ok = ok && favg[i] == static_cast<float>(sum) / static_cast<float>(P);
    }
    Expect(ok, "reduce_scatter avg " + where);
    cudaFree(f), cudaFree(favg);
    Expect(Same(g + r * block, gmine, block * 4), "float32 reduce_scatter in place as out of place " + where);
    cudaFree(g), cudaFree(gmine);
    Expect(Same(x_in_place + r * block, mine, block * 8), "reduce_scatter in place " + where);
    cudaFree(x_in_place);

    ok = true;
    for (int q = 0; q < P; ++q) {
      for (size_t i = 0; i < block; ++i) ok = ok && all[q * block + i] == Value(q, i);
    }
    Expect(ok, "allgather " + where);
    Expect(Same(all_in_place, all, block * P * 8), "allgather in place " + where);
    cudaFree(all_in_place);

    for (int root = 0; root < P; ++root) {
      ok = true;
      for (size_t i = 0; i < block; ++i) ok = ok && bufs[root][i] == Value(root + 7 + root, i);
      Expect(ok, "broadcast root " + std::to_string(root) + " " + where);
      cudaFree(bufs[root]);
    }
    cudaFree(x), cudaFree(mine), cudaFree(all);
  });
}

// Memory that cannot be exported (host memory here, stream-ordered pools on a GPU) goes through
// each rank's staging buffer, which its peers open. When it grows (the third call's size), and at
// teardown, nobody frees a staging buffer while a peer still has it open.
void TestUnexportableMemory(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  const int freed_while_open = fake_cuda::FreedWhileOpen();
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    for (size_t n : {5000, 5000, 20000, 20000}) {
      std::vector<int64_t> a(n), out(n, -1);
      for (size_t i = 0; i < n; ++i) a[i] = Value(r, i);
      c.Allreduce(a.data(), out.data(), n, DataType::kInt64, ReduceOp::kSum, nullptr);
      c.Allreduce(a.data(), a.data(), n, DataType::kInt64, ReduceOp::kSum, nullptr);
      Sync();
      bool ok = true;
      for (size_t i = 0; i < n; ++i) {
        int64_t want = 0;
        for (int q = 0; q < P; ++q) want += Value(q, i);
        ok = ok && out[i] == want && a[i] == want;
      }
      Expect(ok, "unexportable memory, " + std::to_string(n) + " elements " + Layout(node_of));
    }
  });
  Expect(fake_cuda::FreedWhileOpen() == freed_while_open, "staging freed while a peer had it open " + Layout(node_of));
}

// Memory from a stream-ordered pool, which CUDA IPC cannot export: staged, with right results,
// and asked about once (its refusal is remembered by the allocation's id), not on every call.
void TestPoolMemory(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  auto queries_with = [&](int calls) {
    const int before = fake_cuda::AddressRangeQueries();
    RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
      const size_t n = 1000;
      std::vector<int64_t> in(n);
      for (size_t i = 0; i < n; ++i) in[i] = Value(r, i);
      void* p = nullptr;
      cudaMallocAsync(&p, n * 8, nullptr);
      auto* a = static_cast<int64_t*>(p);
      cudaMemcpyAsync(a, in.data(), n * 8, cudaMemcpyHostToDevice, nullptr);
      for (int call = 0; call < calls; ++call) c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
      Sync();
      bool ok = true;
      for (size_t i = 0; i < n; ++i) {
        int64_t want = 0;
        for (int q = 0; q < P; ++q) want += Value(q, i);
        ok = ok && a[i] == want * Power(P, calls - 1);
      }
      Expect(ok, "pool memory, " + std::to_string(calls) + " calls " + Layout(node_of));
      c.Allreduce(a, a, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // nobody frees before all are done
      Sync();
      cudaFree(a);
    });
    return fake_cuda::AddressRangeQueries() - before;
  };
  const int few = queries_with(2), many = queries_with(8);
  Expect(few == many, "pool memory asked about on every call: " + std::to_string(few) + " queries for 2 calls, " +
                          std::to_string(many) + " for 8 " + Layout(node_of));
}

// Calls on parts of one allocation, as views of one array make: the first call exports the
// allocation from a pointer inside it, the later ones find it cached (from its id, whatever the
// pointer), and each travels with its own offset. What no call names keeps its values.
void TestBuffersInsideOneAllocation(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  constexpr size_t kBlock = 301;  // not a multiple of any alignment: offsets of every kind
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    std::vector<int64_t> in(4 * kBlock);
    for (size_t i = 0; i < in.size(); ++i) in[i] = Value(r, i);
    int64_t* a = DeviceArray(in);
    c.Allreduce(a + kBlock + 1, a + kBlock + 1, kBlock - 2, DataType::kInt64, ReduceOp::kSum, nullptr);
    c.Allreduce(a, a, 7, DataType::kInt64, ReduceOp::kSum, nullptr);
    c.Allreduce(a + 2 * kBlock, a + 3 * kBlock, kBlock, DataType::kInt64, ReduceOp::kMax, nullptr);
    Sync();
    auto sum = [&](size_t i) {
      int64_t s = 0;
      for (int q = 0; q < P; ++q) s += Value(q, i);
      return s;
    };
    auto max = [&](size_t i) {
      int64_t m = Value(0, i);
      for (int q = 1; q < P; ++q) m = std::max(m, Value(q, i));
      return m;
    };
    bool ok = true;
    for (size_t i = 0; i < 4 * kBlock; ++i) {
      const bool summed = i < 7 || (i > kBlock && i < 2 * kBlock - 1);
      const int64_t want = summed ? sum(i) : i >= 3 * kBlock ? max(i - kBlock) : Value(r, i);
      ok = ok && a[i] == want;
    }
    Expect(ok, "calls on parts of one allocation " + Layout(node_of));
    c.Allreduce(a, a, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // nobody frees before all are done
    Sync();
    cudaFree(a);
  });
}

// Allocations that ranks free after using them in calls are closed by their peers within a few
// later calls (each call checks one cached export and carries up to 4 retirements), not left
// mapped until the communicator closes: afterwards only the buffers still in use are open.
void TestFreedMemoryUnmapped(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  constexpr int kTemporaries = 9;
  std::atomic<int> open_before_close{-1};
  const int open_at_start = fake_cuda::OpenIpcMappings();
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    int64_t* kept = DeviceArray(std::vector<int64_t>(100, r));
    std::vector<int64_t*> temporaries;
    for (int t = 0; t < kTemporaries; ++t) {
      temporaries.push_back(DeviceArray(std::vector<int64_t>(100 + t, r)));
      c.Allreduce(temporaries.back(), temporaries.back(), 100 + t, DataType::kInt64, ReduceOp::kSum, nullptr);
    }
    Sync();
    for (int64_t* t : temporaries) cudaFree(t);  // none reallocated: only the sweep finds them
    for (int call = 0; call < kTemporaries + 4; ++call) {
      c.Allreduce(kept, kept, 100, DataType::kInt64, ReduceOp::kSum, nullptr);
    }
    Sync();
    Expect(kept[0] == static_cast<int64_t>(P * (P - 1) / 2) * Power(P, kTemporaries + 3),
           "kept buffer's sum " + Layout(node_of));
    c.Allreduce(kept, kept, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // all past the check
    if (r == 0) open_before_close = fake_cuda::OpenIpcMappings() - open_at_start;
    c.Allreduce(kept, kept, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // nobody frees `kept` before
    Sync();
    cudaFree(kept);
  });
  // At most every rank's mapping of every other rank's `kept` and staging buffer (opened at set-up).
  Expect(open_before_close >= 0 && open_before_close <= 2 * P * (P - 1),
         "allocations left mapped after their owners freed them: " + std::to_string(open_before_close.load()) + " " +
             Layout(node_of));
}

// A new allocation over the addresses of freed ones (which peers still have mapped), as caching
// allocators make after returning memory: peers close the old mappings before mapping the new
// one, which CUDA would refuse otherwise. Six freed allocations under one new one: more than a
// call's retirements (4), so the rest are closed when the mapping is refused.
void TestReusedAddresses(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  constexpr size_t kBlock = 512, kOld = 6;  // int64 elements per old allocation
  // Each rank's "device memory", outliving every rank's queued work.
  std::vector<std::vector<int64_t>> regions(P, std::vector<int64_t>(kBlock * (kOld + 1)));
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    int64_t* region = regions[r].data();
    for (size_t i = 0; i < kOld; ++i) {
      int64_t* old = region + i * kBlock;
      fake_cuda::PlaceAllocation(old, kBlock * 8);
      std::fill(old, old + kBlock, r + 1);
      c.Allreduce(old, old, kBlock, DataType::kInt64, ReduceOp::kSum, nullptr);
    }
    Sync();
    for (size_t i = 0; i < kOld; ++i) cudaFree(region + i * kBlock);
    int64_t* reused = region + kBlock / 4;  // another base, over all six
    const size_t n = kBlock * kOld;
    fake_cuda::PlaceAllocation(reused, n * 8);
    std::fill(reused, reused + n, r + 1);
    try {
      c.Allreduce(reused, reused, n, DataType::kInt64, ReduceOp::kSum, nullptr);
      Sync();
      bool ok = true;
      for (size_t i = 0; i < n; ++i) ok = ok && reused[i] == P * (P + 1) / 2;
      Expect(ok, "allreduce over reused addresses " + Layout(node_of));
    } catch (const std::exception& e) {
      Expect(false, "allreduce over reused addresses " + Layout(node_of) + " threw: " + e.what());
    }
    c.Allreduce(reused, reused, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // nobody frees before all are done
    Sync();
    cudaFree(reused);
  });
}

// Each of P ranks on one node (threads) with two communicators over the same ranks (comm and
// comm.dup()): body(rank, first, second), then both close, the second first, on every rank, then
// after(rank). `what` names the run in failures.
void RunTwoCommunicators(int P, const std::string& what,
                         const std::function<void(int, pycomm::DeviceCollectives&, pycomm::DeviceCollectives&)>& body,
                         const std::function<void(int)>& after = nullptr) {
  auto first = pycomm::CreateLoopbackTransports(P), second = pycomm::CreateLoopbackTransports(P);
  const std::vector<int> node_of(P, 0);
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      fake_cuda::UseGpu(g_own_gpus ? r : 0);
      PlacedTransport placed_a(std::move(first[r]), node_of), placed_b(std::move(second[r]), node_of);
      uint64_t seq_a = 0, seq_b = 0;
      pycomm::Options options;
      options.chunk_bytes = 4096;
      options.timeout_s = 30;
      try {
        auto a = pycomm::CreateDeviceCollectives(placed_a, &seq_a, nullptr, g_device, options);
        auto b = pycomm::CreateDeviceCollectives(placed_b, &seq_b, nullptr, g_device, options);
        body(r, *a, *b);
        b->Quiesce();
        a->Quiesce();
      } catch (const std::exception& e) {
        Expect(false, what + ": rank " + std::to_string(r) + " threw: " + e.what());
      }
      if (after) after(r);
      fake_cuda::ThreadExit();
    });
  }
  for (auto& t : threads) t.join();
  Expect(fake_cuda::LiveEvents() == 0, what + ": events left");
}

// Two communicators over the same ranks (comm and comm.dup()): a rank frees allocations it used
// through the first, makes one over their addresses and uses it through the second. The first's
// mappings of the freed ones (it hears of the frees at its next call only) must not make CUDA
// refuse the second's mapping for good: the process's communicators share their mappings. The
// first then still works over the new allocation.
void TestReusedAddressesAcrossCommunicators(int P) {
  constexpr size_t kBlock = 512, kOld = 3;
  const size_t n = kBlock * kOld;
  std::vector<std::vector<int64_t>> regions(P, std::vector<int64_t>(kBlock * (kOld + 1)));
  const std::string what = "reused addresses across communicators, " + std::to_string(P) + " ranks" +
                           (g_own_gpus ? ", a GPU each" : ", one GPU");
  RunTwoCommunicators(
      P, what,
      [&](int r, pycomm::DeviceCollectives& a, pycomm::DeviceCollectives& b) {
        int64_t* region = regions[r].data();
        for (size_t i = 0; i < kOld; ++i) {
          int64_t* old = region + i * kBlock;
          fake_cuda::PlaceAllocation(old, kBlock * 8);
          std::fill(old, old + kBlock, r + 1);
          a.Allreduce(old, old, kBlock, DataType::kInt64, ReduceOp::kSum, nullptr);
        }
        Sync();
        for (size_t i = 0; i < kOld; ++i) cudaFree(region + i * kBlock);
        int64_t* reused = region + kBlock / 4;
        fake_cuda::PlaceAllocation(reused, n * 8);
        std::fill(reused, reused + n, r + 1);
        b.Allreduce(reused, reused, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        bool ok = true;
        for (size_t i = 0; i < n; ++i) ok = ok && reused[i] == P * (P + 1) / 2;
        Expect(ok, what + ": the second communicator's sum");
        a.Allreduce(reused, reused, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        for (size_t i = 0; i < n; ++i) ok = ok && reused[i] == P * P * (P + 1) / 2;
        Expect(ok, what + ": the first communicator's sum");
      },
      [&](int r) { cudaFree(regions[r].data() + kBlock / 4); });  // once every rank has closed
}

// The importer that a process's communicators share on one GPU: one per context; a mapping stays
// while some communicator maps it; and a mapping that a call in progress uses (on another thread,
// in a process) is not closed when another call's mapping is refused and the rest are closed.
void TestSharedImporter() {
  using pycomm::cuda::IpcBuffer;
  using pycomm::cuda::IpcImporter;
  constexpr size_t kBytes = 4096;
  std::vector<char> memory(4 * kBytes);
  char* in_use = memory.data();
  char* stale = memory.data() + 2 * kBytes;
  std::thread([&] {
    cudaSetDevice(0);
    auto handle_of = [](void* base) {
      IpcBuffer buffer{};
      cudaIpcGetMemHandle(&buffer.handle, base);
      return buffer;
    };
    fake_cuda::PlaceAllocation(in_use, kBytes);
    fake_cuda::PlaceAllocation(stale, kBytes);
    const IpcBuffer in_use_buffer = handle_of(in_use), stale_buffer = handle_of(stale);
    const int open_at_start = fake_cuda::OpenIpcMappings();
    auto open = [&] { return fake_cuda::OpenIpcMappings() - open_at_start; };
    auto importer = IpcImporter::OfCurrentContext();
    Expect(IpcImporter::OfCurrentContext() == importer, "one importer per context");
    std::shared_ptr<IpcImporter> elsewhere;
    std::thread([&] {
      cudaSetDevice(0);
      elsewhere = IpcImporter::OfCurrentContext();
      fake_cuda::ThreadExit();
    }).join();
    Expect(elsewhere != importer, "another process's context has an importer of its own");
    elsewhere.reset();
    int users[2];
    importer->Open(stale_buffer, &users[0]);
    importer->Open(stale_buffer, &users[1]);  // the same allocation, through another communicator
    Expect(open() == 1, "an allocation opened by two communicators is mapped once");
    importer->Release(&users[0]);
    Expect(open() == 1, "a mapping stays while another communicator maps it");
    char* reused = memory.data() + kBytes;
    {
      IpcImporter::Imports call_in_progress(*importer, &users[0]);
      call_in_progress.Open(in_use_buffer);
      // The owner frees `stale` and makes an allocation over it, which another call maps.
      cudaFree(stale);
      fake_cuda::PlaceAllocation(reused, 2 * kBytes);
      IpcImporter::Imports other_call(*importer, &users[1]);
      try {
        other_call.Open(handle_of(reused));
        Expect(open() == 2, "the call in progress keeps its mapping; the stale one is closed");
      } catch (const std::exception& e) {
        Expect(false, std::string("mapping over a stale mapping threw: ") + e.what());
      }
    }
    importer->Release(&users[0]);
    importer->Release(&users[1]);
    Expect(open() == 0, "nothing mapped once every communicator released its mappings");
    importer.reset();
    cudaFree(reused);
    cudaFree(in_use);
    fake_cuda::ThreadExit();
  }).join();
}

// Two communicators of each rank run their calls at once, each on an executor thread of the
// rank's process (as the library's executors do), each freeing and reusing its own addresses so
// that retirements, refused mappings and the closing of unpinned mappings in the shared importer
// happen while the other communicator's call is in flight.
void TestConcurrentCommunicators(int P, int iterations) {
  constexpr size_t kBlock = 256, kOld = 6;
  const size_t n = kBlock * kOld;
  std::vector<std::vector<int64_t>> regions(2 * P, std::vector<int64_t>(kBlock * (kOld + 1)));
  const std::string what =
      "concurrent communicators, " + std::to_string(P) + " ranks" + (g_own_gpus ? ", a GPU each" : ", one GPU");
  std::atomic<int> wrong{0};
  RunTwoCommunicators(P, what, [&](int r, pycomm::DeviceCollectives& a, pycomm::DeviceCollectives& b) {
    const uint64_t process = fake_cuda::Process();
    auto calls = [&](pycomm::DeviceCollectives* c, int64_t* region) {
      fake_cuda::JoinProcess(process);
      fake_cuda::UseGpu(g_own_gpus ? r : 0);
      auto check = [&](const int64_t* at, size_t count) {
        for (size_t k = 0; k < count; ++k) {
          if (at[k] != P * (P + 1) / 2) return ++wrong, void();
        }
      };
      try {
        for (int it = 0; it < iterations; ++it) {
          for (size_t i = 0; i < kOld; ++i) {
            int64_t* old = region + i * kBlock;
            fake_cuda::PlaceAllocation(old, kBlock * 8);
            std::fill(old, old + kBlock, r + 1);
            c->Allreduce(old, old, kBlock, DataType::kInt64, ReduceOp::kSum, nullptr);
          }
          Sync();
          for (size_t i = 0; i < kOld; ++i) check(region + i * kBlock, kBlock);
          c->Allreduce(region, region, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // all read before frees
          Sync();
          for (size_t i = 0; i < kOld; ++i) cudaFree(region + i * kBlock);
          int64_t* reused = region + kBlock / 4 + it % 3;  // over the freed ones, at another base each time
          fake_cuda::PlaceAllocation(reused, n * 8);
          std::fill(reused, reused + n, r + 1);
          c->Allreduce(reused, reused, n, DataType::kInt64, ReduceOp::kSum, nullptr);
          Sync();
          check(reused, n);
          c->Allreduce(reused, reused, 1, DataType::kInt64, ReduceOp::kMax, nullptr);
          Sync();
          cudaFree(reused);
        }
      } catch (const std::exception& e) {
        Expect(false, what + ": rank " + std::to_string(r) + " threw: " + e.what());
      }
    };
    std::thread on_a(calls, &a, regions[2 * r].data()), on_b(calls, &b, regions[2 * r + 1].data());
    on_a.join();
    on_b.join();
  });
  Expect(wrong == 0, what + ": " + std::to_string(wrong.load()) + " wrong results");
}

// The shared importer waits for the device with its lock released: one communicator closing
// mappings behind a long GPU wait (a kernel of the caller's, here a stalled stream) does not hold
// up another communicator's call that only looks up a mapping it has.
void TestImporterWaitsOutsideItsLock() {
  using pycomm::cuda::IpcBuffer;
  using pycomm::cuda::IpcImporter;
  constexpr size_t kBytes = 4096;
  std::vector<char> memory(2 * kBytes);
  std::thread([&] {
    cudaSetDevice(0);
    const uint64_t process = fake_cuda::Process();
    IpcBuffer cached{}, retired{};
    fake_cuda::PlaceAllocation(memory.data(), kBytes);
    fake_cuda::PlaceAllocation(memory.data() + kBytes, kBytes);
    cudaIpcGetMemHandle(&cached.handle, memory.data());
    cudaIpcGetMemHandle(&retired.handle, memory.data() + kBytes);
    auto importer = IpcImporter::OfCurrentContext();
    int users[2];
    importer->Open(cached, &users[0]);
    importer->Open(retired, &users[1]);
    fake_cuda::StallStream();  // the device is busy until ReleaseStalls
    std::atomic<bool> closed{false};
    std::thread closing([&] {
      fake_cuda::JoinProcess(process);
      cudaSetDevice(0);
      importer->Close(&retired.handle, 1);  // waits for the device
      closed = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the closing thread is waiting now
    const auto start = std::chrono::steady_clock::now();
    {
      IpcImporter::Imports call(*importer, &users[0]);
      call.Open(cached);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    Expect(!closed && seconds < 0.5,
           "a cached lookup waited " + std::to_string(seconds) + " s for another communicator's device wait");
    fake_cuda::ReleaseStalls();
    closing.join();
    Expect(closed, "the retired mapping was closed once the device was done");
    importer->Release(&users[0]);
    importer->Release(&users[1]);
    importer.reset();
    cudaFree(memory.data());
    cudaFree(memory.data() + kBytes);
    fake_cuda::ThreadExit();
  }).join();
}

// A node's leader answers its peers only after agreeing with the other nodes, each of its waits
// within the time-out: a peer on time, whose leader waits for a node where one rank comes late
// (by 0.95 of the time-out) and then moves 32 MiB between nodes, must not time out before that
// answer (it did, raising while its leader
// went on to write into its buffer and succeeded: the ranks disagreed on the outcome, and the
// buffer the caller reused after the error was overwritten).
void TestPeerOutwaitsASlowLeader() {
  const std::vector<int> node_of = {0, 0, 1, 1};
  const int P = 4;
  const size_t n = size_t{1} << 22;
  std::vector<std::string> errors(P);
  std::vector<int64_t> first(P, 0);
  const double timeout = g_errors_timeout;
  g_errors_timeout = 2;
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
        if (r == 3) std::this_thread::sleep_for(std::chrono::milliseconds(1900));
        c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        first[r] = a[n - 1];
        cudaFree(a);
      },
      &errors);
  g_errors_timeout = timeout;
  for (int r = 0; r < P; ++r) {
    Expect(errors[r].empty() && first[r] == 10,
           "rank 3 late, by less than the time-out: rank " + std::to_string(r) + " " + errors[r]);
  }
}

// A rank whose GPU work never finishes, as a rank's that died after close()'s first meeting:
// close fails on every other rank within the time-out, none waits for its GPU forever. (The
// stuck rank itself waits for its own GPU, as any program would.)
void TestPeerGpuStuckAtClose(const std::vector<int>& node_of, int stuck) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  std::atomic<int> closed{0}, synced{0};
  double seconds = 0;  // until every other rank's close has returned
  const double timeout = g_errors_timeout;
  g_errors_timeout = 1;
  const auto start = std::chrono::steady_clock::now();
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r));
        if (r == stuck) fake_cuda::StallStream();
        c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        try {
          c.Quiesce();
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
        if (r != stuck && ++closed == P - 1) {
          seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          fake_cuda::ReleaseStalls();  // the "GPU" may go on: the test is over
        }
        while (closed < P - 1) std::this_thread::yield();
        Sync();  // this rank's queued work, which may read others' `a`, has run
        ++synced;
        while (synced < P) std::this_thread::yield();
        cudaFree(a);
      },
      &errors);
  g_errors_timeout = timeout;
  for (int r = 0; r < P; ++r) {
    if (r == stuck) continue;
    Expect(!errors[r].empty(), "close with rank " + std::to_string(stuck) + "'s GPU stuck " + Layout(node_of) +
                                   ": no error on rank " + std::to_string(r));
  }
  Expect(seconds < 10, "close with rank " + std::to_string(stuck) + "'s GPU stuck took " + std::to_string(seconds) +
                           " s " + Layout(node_of));
}

// Without CUDA IPC on one node, a rank in a host call (a one-shot allreduce over the same arena)
// while the others make a device call: every rank gets MismatchError at once, none waits out
// the time-out.
void TestHostCallAgainstDeviceCall(const std::vector<int>& node_of, int host_rank) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  std::vector<int> mismatched(P, 0);
  const double seconds = SecondsToRun(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(10, 1));
        try {
          if (r == host_rank) {
            std::vector<int64_t> host(10, 1);
            std::vector<char> scratch(pycomm::kPipelineDepth * 4096);
            const pycomm::CollectiveContext ctx{*t_world, 4096, g_errors_timeout, scratch.data(), t_arena_seq, 1};
            pycomm::AllreduceOneShot(ctx, host.data(), host.data(), 10, DataType::kInt64, ReduceOp::kSum);
          } else {
            c.Allreduce(a, a, 10, DataType::kInt64, ReduceOp::kSum, nullptr);
          }
        } catch (const pycomm::MismatchError& e) {
          mismatched[r] = 1;
          errors[r] = e.what();
        }
        Sync();
        cudaFree(a);
      },
      &errors);
  for (int r = 0; r < P; ++r) {
    Expect(mismatched[r] == 1, "host call on rank " + std::to_string(host_rank) + " against device calls " +
                                   Layout(node_of) + ", rank " + std::to_string(r) + ": " + errors[r]);
  }
  Expect(seconds < g_errors_timeout, "host call against device calls took " + std::to_string(seconds) + " s");
}

// Whether every rank's device collectives go through the host (no CUDA IPC), as `want` says.
void TestThroughHost(const std::vector<int>& node_of, bool want) {
  const int P = static_cast<int>(node_of.size());
  std::vector<int> through_host(P, -1);
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    through_host[r] = std::string(c.work_name()).find("through the host") != std::string::npos;
  });
  for (int r = 0; r < P; ++r) {
    Expect(through_host[r] == static_cast<int>(want),
           std::string(want ? "not " : "") + "through the host " + Layout(node_of) + " rank " + std::to_string(r));
  }
}

// Without CUDA IPC on one node, the host step takes the algorithm PYCOMM_ALGO names, as host
// arrays do: counted in arena rounds per allreduce (the agreement takes one; the ring none, the
// one-shot and single-copy some), small and large (over the one-shot's range). Returns {small,
// large} rounds per call on rank 0 in the second of two rounds of calls (the first has probed
// whether single-copy works), each result checked.
std::pair<uint64_t, uint64_t> HostStepRounds(const std::vector<int>& node_of, pycomm::Algorithm algorithm) {
  const int P = static_cast<int>(node_of.size());
  g_algorithms.assign(P, algorithm);
  std::pair<uint64_t, uint64_t> rounds;
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    std::vector<uint64_t> taken;
    for (size_t n : {size_t{100}, size_t{300007}, size_t{100}, size_t{300007}}) {
      int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
      const uint64_t before = *t_arena_seq;
      c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
      Sync();
      taken.push_back(*t_arena_seq - before);
      Expect(Same(a, std::vector<int64_t>(n, P * (P + 1) / 2).data(), n * 8),
             "host step " + Layout(node_of) + " algorithm " + std::to_string(static_cast<int>(algorithm)) +
                 " n=" + std::to_string(n));
      cudaFree(a);
    }
    if (r == 0) rounds = {taken[2], taken[3]};
  });
  g_algorithms.clear();
  return rounds;
}

void TestHostStepAlgorithm(const std::vector<int>& node_of) {
  using A = pycomm::Algorithm;
  const auto automatic = HostStepRounds(node_of, A::kAuto);
  const auto ring = HostStepRounds(node_of, A::kRing);
  const auto one_shot = HostStepRounds(node_of, A::kOneShot);
  const auto single_copy = HostStepRounds(node_of, A::kSingleCopy);
  const std::string where = " " + Layout(node_of);
  Expect(ring.first == 1 && ring.second == 1, "ring: the agreement's round only" + where);
  Expect(automatic.first == one_shot.first && automatic.first > 1, "auto: the one-shot when small" + where);
  Expect(automatic.second == single_copy.second && automatic.second > 1, "auto: single-copy when large" + where);
  Expect(one_shot.second != single_copy.second, "forced one-shot and single-copy differ when large" + where);
  Expect(single_copy.first != one_shot.first, "forced single-copy when small" + where);
}

// Ranks set to different host algorithms would take different steps and wait for each other:
// every rank gets MismatchError at the agreement instead, well inside the time-out.
void TestHostStepAlgorithmsDiffer(const std::vector<int>& node_of, pycomm::Algorithm other) {
  const int P = static_cast<int>(node_of.size());
  g_algorithms.assign(P, pycomm::Algorithm::kAuto);
  g_algorithms[P - 1] = other;
  std::vector<std::string> errors(P);
  const double seconds = SecondsToRun(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r));
        try {
          c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        } catch (...) {
          cudaFree(a);
          throw;
        }
        cudaFree(a);
      },
      &errors);
  g_algorithms.clear();
  for (int r = 0; r < P; ++r) {
    Expect(errors[r].find("MismatchError") != std::string::npos && errors[r].find("PYCOMM_ALGO") != std::string::npos,
           "different host algorithms " + Layout(node_of) + " rank " + std::to_string(r) + ": " + errors[r]);
  }
  Expect(seconds < 4, "different host algorithms " + Layout(node_of) + " took " + std::to_string(seconds) + " s");
}

// Rank 0 reduces 10 elements where every other rank reduces 20 (the same hand-off, another call),
// or rank 1 broadcasts (another hand-off size): MismatchError everywhere, on one node or several.
void TestMismatch(const std::vector<int>& node_of, bool other_kind) {
  const int P = static_cast<int>(node_of.size());
  std::vector<int> mismatched(P, 0);
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    int64_t* a = DeviceArray(std::vector<int64_t>(20, 1));
    try {
      if (other_kind && r == 1) {
        c.Broadcast(a, 20, DataType::kInt64, 0, nullptr);
      } else {
        c.Allreduce(a, a, !other_kind && r == 0 ? 10 : 20, DataType::kInt64, ReduceOp::kSum, nullptr);
      }
    } catch (const pycomm::MismatchError&) {
      mismatched[r] = 1;
    }
    cudaFree(a);
  });
  for (int r = 0; r < P; ++r) {
    Expect(mismatched[r] == 1, std::string(other_kind ? "broadcast vs allreduce " : "count mismatch ") +
                                   Layout(node_of) + " rank " + std::to_string(r));
  }
}

// A rank that cannot set up its GPU events, and a node leader that cannot get the device memory
// for a reduce_scatter across nodes: every rank gets an error at once (well inside the 5 s
// time-out), none waits it out.
// `allreduce`: an allreduce of that many elements instead (split across nodes, every rank's slice
// crosses on its own link).
void TestFailuresReachEveryRank(const std::vector<int>& node_of, fake_cuda::What what, int failing,
                                size_t allreduce = 0) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  const double seconds = SecondsToRun(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        struct Free {
          void operator()(void* p) const { cudaFree(p); }
        };
        std::unique_ptr<int64_t, Free> x(DeviceArray(std::vector<int64_t>(4 * P, 1)));
        std::unique_ptr<int64_t, Free> mine(DeviceArray(std::vector<int64_t>(4, 0)));
        std::unique_ptr<int64_t, Free> a(DeviceArray(std::vector<int64_t>(allreduce, 1)));
        if (r == failing) fake_cuda::Fail(what);
        // Without a context current, the call must make its GPU current (and so fail there).
        if (r == failing && what == fake_cuda::kSetDevice) fake_cuda::DropContext();
        if (allreduce) {
          c.Allreduce(a.get(), a.get(), allreduce, DataType::kInt64, ReduceOp::kSum, nullptr);
        } else {
          c.ReduceScatter(x.get(), mine.get(), 4, DataType::kInt64, ReduceOp::kSum, nullptr);
        }
      },
      &errors,
      [&](int r) { fake_cuda::Fail(r == failing && what == fake_cuda::kEvents ? what : fake_cuda::kNothing); });
  const char* const kWhat[] = {"", " events", " malloc", " launch", " pinned", " ipc open", " set device"};
  const std::string where = Layout(node_of) + kWhat[what] + " on rank " + std::to_string(failing);
  for (int r = 0; r < P; ++r) {
    Expect(!errors[r].empty() && errors[r].find("PeerError") == std::string::npos,
           "failure reaches rank " + std::to_string(r) + " " + where + ": " + errors[r]);
  }
  Expect(seconds < 4, "failures " + where + " took " + std::to_string(seconds) + " s");
}

// A rank that cannot make its GPU current at close: it fails with its own error, and the others
// at once (well inside the time-out) with CommError, instead of waiting for it at close's
// meetings or freeing what it still has open.
void TestQuiesceWithoutItsGpu(const std::vector<int>& node_of, int failing) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  const double seconds = SecondsToRun(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(100, r));
        c.Allreduce(a, a, 100, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        cudaFree(a);
        if (r == failing) fake_cuda::Fail(fake_cuda::kSetDevice), fake_cuda::DropContext();
        c.Quiesce();
      },
      &errors);
  const std::string where = Layout(node_of) + " failing " + std::to_string(failing);
  for (int r = 0; r < P; ++r) {
    Expect(errors[r].find(r == failing ? "cudaSetDevice" : "could not close") != std::string::npos,
           "close without its GPU, rank " + std::to_string(r) + " " + where + ": " + errors[r]);
  }
  Expect(seconds < 4, "close without its GPU " + where + " took " + std::to_string(seconds) + " s");
}

// Node 1 never makes the call (in a host call, say, which agrees across nodes another way): node
// 0's ranks time out agreeing with it, and the error says what they were doing and what may be
// wrong.
void TestOtherNodeSilent(const std::vector<int>& node_of) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  g_errors_timeout = 0.5;
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        if (node_of[r] == 1) return;
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r + 1));
        try {
          c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        } catch (...) {
          cudaFree(a);
          throw;
        }
      },
      &errors);
  g_errors_timeout = 5;
  for (int r = 0; r < P; ++r) {
    if (node_of[r] == 1) continue;
    // The leader waits in the agreement; its peers hear of its failure.
    const bool leader = r == 0;
    Expect(leader ? errors[r].find("PeerError") != std::string::npos &&
                        errors[r].find("agreeing on a device call with the other nodes (allreduce int64 x 1000 "
                                       "sum here): a node may be gone, or in another call") != std::string::npos
                  : !errors[r].empty(),
           "silent node, rank " + std::to_string(r) + " " + Layout(node_of) + ": " + errors[r]);
  }
}

// Closing where a rank never comes (gone after the last call): the others' Quiesce fails within the time-out without
// waiting for their GPU first, whose queued work could wait forever for the missing rank's.
void TestQuiesceWithoutARank(const std::vector<int>& node_of, int missing) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  std::vector<int> syncs(P, -1);
  g_errors_timeout = 0.5;
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r + 1));
        c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        if (r == missing) {  // gone after the call
          cudaFree(a);
          return;
        }
        const int before = fake_cuda::DeviceSyncs();
        try {
          c.Quiesce();
        } catch (...) {
          syncs[r] = fake_cuda::DeviceSyncs() - before;
          cudaFree(a);
          throw;
        }
      },
      &errors);
  g_errors_timeout = 5;
  for (int r = 0; r < P; ++r) {
    if (r == missing) continue;
    Expect(errors[r].find("PeerError") != std::string::npos && syncs[r] == 0,
           "close without rank " + std::to_string(missing) + ", rank " + std::to_string(r) + " " + Layout(node_of) +
               ": device syncs " + std::to_string(syncs[r]) + ", " + errors[r]);
  }
}

// PYCOMM_GPU_SYNC=auto: ranks on GPUs of their own order their work on the streams (NCCL's
// semantics), ranks sharing a GPU on the host; the results are right either way.
void TestAutoSync(const std::vector<int>& node_of, int gpus) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> chosen(P), work(P);
  std::vector<int> right(P, 0);
  std::vector<std::string> errors(P);
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        chosen[r] = c.sync_name();
        work[r] = c.work_name();
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r + 1));
        c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        right[r] = a[999] == P * (P + 1) / 2;
        cudaFree(a);
      },
      &errors, [&](int r) { fake_cuda::UseGpu(r % gpus); });
  for (int r = 0; r < P; ++r) {
    const bool own = gpus >= static_cast<int>(std::count(node_of.begin(), node_of.end(), node_of[r]));
    const std::string where = Layout(node_of) + " on " + std::to_string(gpus) + " GPUs, rank " + std::to_string(r);
    Expect(errors[r].empty() && right[r], "auto sync " + where + ": " + errors[r]);
    Expect(chosen[r] == (own ? "stream" : "host"), "auto sync chose " + chosen[r] + " " + where);
    // Split where each has its own GPU: across nodes, only where every node's ranks do.
    bool all_own = true;
    for (int q = 0; q < P; ++q) all_own = all_own && gpus >= std::count(node_of.begin(), node_of.end(), node_of[q]);
    Expect(work[r] == (all_own && P > 1 ? "split" : "leader"), "auto work chose " + work[r] + " " + where);
  }
}

// A node whose ranks could split their work, next to one that cannot: the first goes over to the
// leader's protocol at set-up, and its peers close the mappings split work had opened (a peer
// later tells only its leader of the buffers it frees). Node 0: 2 ranks on 2 GPUs; node 1: 3
// ranks on 2. Afterwards only each leader maps its peers' staging buffers.
void TestLeaderAfterSplitSetUp() {
  const std::vector<int> node_of = {0, 0, 1, 1, 1};
  const int P = static_cast<int>(node_of.size());
  const int open_at_start = fake_cuda::OpenIpcMappings();
  std::atomic<int> arrived{0};
  std::atomic<int> open_after_setup{-1};
  std::vector<std::string> errors(P);
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        Expect(std::string(c.work_name()) == "leader",
               "work after a node could not split: " + std::string(c.work_name()));
        if (++arrived == P) open_after_setup = fake_cuda::OpenIpcMappings() - open_at_start;
        while (arrived < P) std::this_thread::yield();
        int64_t* a = DeviceArray(std::vector<int64_t>(1000, r + 1));
        c.Allreduce(a, a, 1000, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        Expect(a[999] == P * (P + 1) / 2, "allreduce after a node left split work");
        c.Allreduce(a, a, 1, DataType::kInt64, ReduceOp::kMax, nullptr);  // nobody frees before all are done
        Sync();
        cudaFree(a);
        c.Quiesce();
      },
      &errors, [&](int r) { fake_cuda::UseGpu(r % 2); });
  for (int r = 0; r < P; ++r)
    Expect(errors[r].empty(), "leader after split set-up, rank " + std::to_string(r) + ": " + errors[r]);
  Expect(open_after_setup == 3, "mappings after a node left split work: " + std::to_string(open_after_setup.load()));
}

// Split work: many calls in a row, alternating between two streams, each call's input written
// on its stream just before: a rank that records its events again before every rank has queued
// its waits for the last records would deadlock the fake's streams or read the wrong call.
// Arrays on device 1, called from threads with no context current (even ranks) or with device
// 2's (odd ranks): each thread ends every call with the context it had, and none makes device 0's
// (restoring "device 0" where there was none would, in every rank).
void TestCallersContextKept(const std::vector<int>& node_of) {
  g_device = 1;
  const size_t n = 1000;
  const int P = static_cast<int>(node_of.size());
  std::vector<int> had(P), without_context(P);
  auto kept = [&](int r, const std::string& when) {
    Expect(fake_cuda::CurrentDevice() == had[r] && had[r] == (r % 2 ? 2 : -1),
           "rank " + std::to_string(r) + " left with device " + std::to_string(fake_cuda::CurrentDevice()) +
               "'s context " + when + ", had " + std::to_string(had[r]) + " " + Layout(node_of));
    Expect(!fake_cuda::MadeContext(0), "rank " + std::to_string(r) + " made device 0's context " + Layout(node_of));
  };
  RunPlaced(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
        // Memory the group must stage (as a stream-ordered pool's, which cannot be exported;
        // here memory the fake runtime did not allocate): its teardown frees the staging.
        std::vector<int64_t> pooled(n);
        c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        c.Allreduce(a, pooled.data(), n, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        Expect(Same(a, std::vector<int64_t>(n, P * (P + 1) / 2).data(), n * 8), "sum " + Layout(node_of));
        kept(r, "after a call");
        cudaFree(a);
        without_context[r] = fake_cuda::CallsWithoutContext();
      },
      nullptr,
      [&](int r) {
        if (r % 2) {
          cudaSetDevice(2);
        } else {
          fake_cuda::DropContext();
        }
        had[r] = fake_cuda::CurrentDevice();
      },
      [&](int r) {
        // Tearing down frees, closes and destroys on the group's GPU, not device 0's new context.
        kept(r, "after teardown");
        Expect(fake_cuda::CallsWithoutContext() == without_context[r],
               "rank " + std::to_string(r) + " freed with no context at teardown " + Layout(node_of));
      });
  g_device = 0;
}

// Set-up failing on one rank (it cannot create its events), on threads with no context current
// and arrays on device 1: what the other ranks had made by then (staging, the mappings of each
// other's) is freed on device 1 as they fail, not from no context, which would make device 0's.
void TestFailedSetUpFreesOnItsGpu(const std::vector<int>& node_of, int failing) {
  const int P = static_cast<int>(node_of.size());
  std::vector<std::string> errors(P);
  std::vector<int> without_context(P);
  g_device = 1;
  RunPlaced(
      node_of, [&](int, pycomm::DeviceCollectives&) {}, &errors,
      [&](int r) {
        fake_cuda::DropContext();
        without_context[r] = fake_cuda::CallsWithoutContext();
        if (r == failing) fake_cuda::Fail(fake_cuda::kEvents);
      },
      [&](int r) {
        Expect(!errors[r].empty(), "set-up failing on rank " + std::to_string(failing) + ": no error on rank " +
                                       std::to_string(r) + " " + Layout(node_of));
        Expect(fake_cuda::CallsWithoutContext() == without_context[r],
               "rank " + std::to_string(r) + " freed with no context after a failed set-up " + Layout(node_of));
        Expect(!fake_cuda::MadeContext(0), "rank " + std::to_string(r) + " made device 0's context " + Layout(node_of));
      });
  g_device = 0;
}

void TestManyCalls(const std::vector<int>& node_of, size_t n) {
  const int P = static_cast<int>(node_of.size());
  constexpr int kCalls = 24;
  const auto own_stream = reinterpret_cast<cudaStream_t>(0x7);
  RunPlaced(node_of, [&](int r, pycomm::DeviceCollectives& c) {
    std::vector<std::vector<int64_t>> inputs(kCalls, std::vector<int64_t>(n));
    for (int call = 0; call < kCalls; ++call) {
      for (size_t i = 0; i < n; ++i) inputs[call][i] = (r + 1) * (call + 1) + static_cast<int64_t>(i % 13);
    }
    int64_t* a = DeviceArray(std::vector<int64_t>(n, 0));
    int64_t* results = DeviceArray(std::vector<int64_t>(n * kCalls, -1));
    Sync();
    for (int call = 0; call < kCalls; ++call) {
      cudaStream_t s = call % 2 ? own_stream : nullptr;
      Sync(call % 2 ? nullptr : own_stream);  // the other stream's last use of `a` is done
      cudaMemcpyAsync(a, inputs[call].data(), n * 8, cudaMemcpyHostToDevice, s);
      c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, s);
      cudaMemcpyAsync(results + call * n, a, n * 8, cudaMemcpyDeviceToDevice, s);
    }
    Sync(own_stream), Sync();
    bool ok = true;
    for (int call = 0; call < kCalls; ++call) {
      for (size_t i = 0; i < n; ++i) {
        const int64_t want = static_cast<int64_t>(P * (P + 1) / 2) * (call + 1) + P * static_cast<int64_t>(i % 13);
        ok = ok && results[call * n + i] == want;
      }
    }
    Expect(ok, "many calls " + Layout(node_of) + " n=" + std::to_string(n) + " work " + c.work_name());
    cudaFree(a), cudaFree(results);
  });
}

// Phase timing (for bench/gpu_allreduce.py's breakdown): while on, each call of each rank laps
// its role's phases once; off, nothing is summed. Ranks are threads here, so the process's sums
// hold every rank's laps.
void TestPhaseTimes(const std::vector<int>& node_of, bool split) {
  const int P = static_cast<int>(node_of.size());
  constexpr int kCalls = 5;
  auto run = [&](int calls) {
    RunPlaced(node_of, [&](int, pycomm::DeviceCollectives& c) {
      int64_t* a = DeviceArray(std::vector<int64_t>(100, 1));
      for (int call = 0; call < calls; ++call) c.Allreduce(a, a, 100, DataType::kInt64, ReduceOp::kSum, nullptr);
      Sync();
      cudaFree(a);
    });
  };
  auto laps = [](const std::string& phase) {
    for (const pycomm::PhaseTime& t : pycomm::PhaseTimes()) {
      if (t.phase == phase) return static_cast<int>(t.laps);
    }
    return 0;
  };
  const std::string where = Layout(node_of) + (split ? " split" : " leader");
  pycomm::SetPhaseTiming(true);
  run(kCalls);
  pycomm::SetPhaseTiming(false);
  const auto times = pycomm::PhaseTimes();
  Expect(laps("all: make the GPU current") == P * kCalls, "every call timed " + where);
  if (split) {
    Expect(laps("prepare: export the buffers") == P * kCalls, "every rank prepares " + where);
    Expect(laps("split: queue the part") == P * kCalls, "every rank queues " + where);
    Expect(laps("split: wait for the others' parts") == P * kCalls, "every rank waits " + where);
    Expect(laps("leader: queue the work") == 0, "no leader's work " + where);
  } else {
    Expect(laps("leader: collect the peers' hand-offs") == kCalls, "the leader collects " + where);
    Expect(laps("leader: queue the work") == kCalls, "the leader queues " + where);
    Expect(laps("leader: answer") == kCalls, "the leader answers " + where);
    Expect(laps("prepare: wait for the own stream") == (P - 1) * kCalls, "peers wait for their streams " + where);
    Expect(laps("peer: hand over, until the leader's answer") == (P - 1) * kCalls, "peers hand over " + where);
    Expect(laps("peer: wait for the leader's work") == (P - 1) * kCalls, "peers wait " + where);
  }
  bool sane = true;
  for (const pycomm::PhaseTime& t : times) sane = sane && t.seconds >= 0 && t.seconds < 60 && t.laps > 0;
  Expect(sane, "phase times " + where);
  run(2);  // off: nothing more is summed
  Expect(laps("all: make the GPU current") == P * kCalls, "phase timing off " + where);
  pycomm::SetPhaseTiming(true);
  Expect(pycomm::PhaseTimes().empty(), "turned on again, the sums start from zero " + where);
  pycomm::SetPhaseTiming(false);
}

// Threads meet: none leaves before all have arrived.
class Meeting {
 public:
  explicit Meeting(int threads) : threads_(threads) {}
  void Arrive() {
    std::unique_lock<std::mutex> lock(m_);
    const int round = round_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++round_;
      cv_.notify_all();
    }
    cv_.wait(lock, [&] { return round_ != round; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int threads_, arrived_ = 0, round_ = 0;
};

// Split work: a rank whose kernel launch fails (after every rank has its peers' buffers, before
// the second hand-off) fails the call on every rank at once; the other ranks' parts, which write
// into every output, go before what each rank queues next on its stream, so the next call works.
void TestSplitLaunchFailure(const std::vector<int>& node_of, int failing) {
  const int P = static_cast<int>(node_of.size());
  Meeting meeting(P);
  const size_t n = 10007;  // a slice on each of the first 3 ranks
  std::vector<std::string> errors(P);
  std::vector<int> failed(P, 0), right(P, 0);
  const double seconds = SecondsToRun(
      node_of,
      [&](int r, pycomm::DeviceCollectives& c) {
        int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
        if (r == failing) fake_cuda::Fail(fake_cuda::kLaunch);
        try {
          c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        } catch (const pycomm::CommError&) {
          failed[r] = 1;
        }
        fake_cuda::Fail(fake_cuda::kNothing);
        meeting.Arrive();
        const std::vector<int64_t> again(n, r + 1);
        cudaMemcpyAsync(a, again.data(), n * 8, cudaMemcpyHostToDevice, nullptr);
        Sync();
        c.Allreduce(a, a, n, DataType::kInt64, ReduceOp::kSum, nullptr);
        Sync();
        right[r] = a[0] == P * (P + 1) / 2 && a[n - 1] == P * (P + 1) / 2;
        cudaFree(a);
        c.Quiesce();
      },
      &errors);
  for (int r = 0; r < P; ++r) {
    const std::string where = Layout(node_of) + " launch fails on rank " + std::to_string(failing) + ", rank " +
                              std::to_string(r) + ": " + errors[r];
    Expect(errors[r].empty() && failed[r] && right[r],
           "split failure " + where + " failed " + std::to_string(failed[r]) + " right " + std::to_string(right[r]));
  }
  Expect(seconds < 4, "split failure took " + std::to_string(seconds) + " s");
}

// An int64 sum of n elements, as DeviceGroup compares calls.
pycomm::cuda::DeviceCall SumCall(size_t n) {
  return {pycomm::cuda::DeviceCall::kAllreduce, static_cast<int32_t>(DataType::kInt64),
          static_cast<int32_t>(ReduceOp::kSum), -1, n};
}

// Work for DeviceGroup::Run on every rank's one int64 buffer: split, each rank sums its slice
// (`slice` elements) of every buffer into every buffer; on the leader, all of them whole. After
// its launch it throws where `fail` says so.
pycomm::cuda::GroupWork SumIntoAll(int P, size_t slice, std::function<bool()> fail) {
  return [=](const std::vector<std::vector<void*>>& buffers, pycomm::cuda::WorkPart part, cudaStream_t stream) {
    const size_t first = part.parts == 1 ? 0 : part.index * slice, count = part.parts == 1 ? P * slice : slice;
    std::vector<const void*> in;
    std::vector<void*> out;
    for (const auto& rank_buffers : buffers) {
      in.push_back(static_cast<int64_t*>(rank_buffers[0]) + first);
      out.push_back(static_cast<int64_t*>(rank_buffers[0]) + first);
    }
    pycomm::cuda::Check(
        pycomm::cuda::LaunchReduce(in.data(), P, out.data(), P, count, DataType::kInt64, ReduceOp::kSum, 1, stream),
        "launch");
    if (fail()) throw std::runtime_error("injected after a launch");
  };
}

// Memory from a stream-ordered pool (CUDA IPC cannot export it: calls stage it), `count`
// elements of `value` written by a copy queued on `stream`.
int64_t* PoolArray(int64_t value, size_t count, cudaStream_t stream) {
  thread_local std::vector<std::vector<int64_t>> sources;  // what the queued copies read, kept
  void* p = nullptr;
  cudaMallocAsync(&p, count * 8, stream);
  sources.emplace_back(count, value);
  cudaMemcpyAsync(p, sources.back().data(), count * 8, cudaMemcpyHostToDevice, stream);
  return static_cast<int64_t*>(p);
}

// Makes `later` wait for what `earlier` has queued so far, as a caller may. Returns the event,
// for the caller to destroy.
cudaEvent_t OrderStreams(cudaStream_t later, cudaStream_t earlier) {
  cudaEvent_t event = nullptr;
  cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  cudaEventRecord(event, earlier);
  cudaStreamWaitEvent(later, event, 0);
  return event;
}

// body(rank, group) on a thread per rank, each with a DeviceGroup (GPU 0, `timeout_s`; the
// leader's `leader_timeout_s` where given) over its transport. Returns each rank's error from
// set-up or from body (which closes the group).
std::vector<std::string> RunGroups(const std::vector<Transport*>& transports, pycomm::cuda::DeviceSync sync,
                                   pycomm::cuda::DeviceWork work, double timeout_s,
                                   const std::function<void(int rank, pycomm::cuda::DeviceGroup&)>& body,
                                   double leader_timeout_s = 0) {
  const int P = static_cast<int>(transports.size());
  std::vector<std::string> errors(P);
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      uint64_t seq = 0;
      try {
        const double timeout = r == 0 && leader_timeout_s > 0 ? leader_timeout_s : timeout_s;
        pycomm::cuda::DeviceGroup group(*transports[r], &seq, 0, timeout, sync, work);
        body(r, group);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
      fake_cuda::ThreadExit();
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

std::vector<Transport*> Pointers(const std::vector<std::unique_ptr<Transport>>& transports) {
  std::vector<Transport*> out;
  for (const auto& t : transports) out.push_back(t.get());
  return out;
}

// A call whose work fails after part of it was queued (on the leader, or on one rank of split
// work): the work queued still writes into other ranks' buffers, so each rank's stream must go on
// after it. Each rank then queues a rewrite of its buffer and synchronises its stream, one rank
// after another (the last rank first, or the first), so that any work of the failed call left
// unordered would run after a rewrite and undo it.
void TestPartialWorkOrdered(int P, pycomm::cuda::DeviceSync sync, pycomm::cuda::DeviceWork how, int failing,
                            bool last_first) {
  auto transports = pycomm::CreateLoopbackTransports(P);
  Meeting meeting(P);
  const size_t slice = 100, n = slice * P;
  std::vector<std::string> call_errors(P);
  std::vector<int> rewritten(P, 0);
  const auto errors = RunGroups(Pointers(transports), sync, how, 5, [&](int r, pycomm::cuda::DeviceGroup& group) {
    int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
    try {
      group.Run(SumCall(n), {{a, n * 8, true, true}}, nullptr, SumIntoAll(P, slice, [&] { return r == failing; }));
    } catch (const std::exception& e) {
      call_errors[r] = e.what();
    }
    const std::vector<int64_t> fresh(n, -7);
    cudaMemcpyAsync(a, fresh.data(), n * 8, cudaMemcpyHostToDevice, nullptr);
    for (int i = 0; i < P; ++i) {
      if (r == (last_first ? P - 1 - i : i)) Sync();
      meeting.Arrive();
    }
    Sync();
    rewritten[r] = std::vector<int64_t>(a, a + n) == fresh;
    cudaDeviceSynchronize();
    cudaFree(a);
    group.Quiesce();
  });
  const std::string where = std::to_string(P) + " ranks, " + pycomm::cuda::DeviceSyncName(sync) + "/" +
                            pycomm::cuda::DeviceWorkName(how) + ", failing on rank " + std::to_string(failing) +
                            (last_first ? ", last rank first" : ", first rank first");
  for (int r = 0; r < P; ++r) {
    // The leader names the rank that failed; the others hear that one did.
    const std::string& e = call_errors[r];
    const bool told = r == failing ? e.find("injected") != std::string::npos
                                   : e.find("failed on another rank") != std::string::npos ||
                                         e.find("rank " + std::to_string(failing) + " could not") != std::string::npos;
    Expect(told && rewritten[r] && errors[r].empty(), "partial work ordered, " + where + ", rank " + std::to_string(r) +
                                                          ": rewritten " + std::to_string(rewritten[r]) +
                                                          " error: " + e + errors[r]);
  }
  Expect(fake_cuda::LiveEvents() == 0, where + ": events left");
}

// Split work on memory from stream-ordered pools (so through each rank's staging buffer): a call
// that fails after a part was queued, on one stream, then a call on another stream with other
// buffers, which the caller need not order after the failed one. Rank 1's second stream does wait for
// its first (as a caller may), which makes the other ranks' failed parts run in the middle of
// the second call unless the failed call marked the staging buffer free only after them.
void TestFailedCallStagingOrdered(int P) {
  auto transports = pycomm::CreateLoopbackTransports(P);
  const size_t slice = 100, n = slice * P;
  const auto second = reinterpret_cast<cudaStream_t>(0x5);
  Meeting meeting(P);
  std::vector<int> right(P, 0), failed(P, 0);
  const auto errors = RunGroups(
      Pointers(transports), pycomm::cuda::DeviceSync::kStream, pycomm::cuda::DeviceWork::kSplit, 5,
      [&](int r, pycomm::cuda::DeviceGroup& group) {
        int64_t* a = PoolArray(r + 1, n, nullptr);
        int64_t* b = PoolArray(10 * (r + 1), n, second);
        int calls = 0;
        auto fail_second = [&] { return r == 0 && calls == 2; };
        // The first call grows the staging buffer (the old one is closed everywhere, which waits
        // for the GPU); the second fails.
        for (int call = 0; call < 2; ++call) {
          try {
            ++calls;
            group.Run(SumCall(n), {{a, n * 8, true, true}}, nullptr, SumIntoAll(P, slice, fail_second));
          } catch (const std::exception&) {
            failed[r] += call == 1;
          }
        }
        cudaEvent_t first_done = r == 1 ? OrderStreams(second, nullptr) : nullptr;
        ++calls;
        group.Run(SumCall(n), {{b, n * 8, true, true}}, second, SumIntoAll(P, slice, fail_second));
        for (int q = 0; q < P; ++q) {  // rank 0 first: its second stream runs before anything of the first call
          if (q == r) Sync(second);
          meeting.Arrive();
        }
        right[r] = std::vector<int64_t>(b, b + n) == std::vector<int64_t>(n, 10 * P * (P + 1) / 2);
        cudaDeviceSynchronize();
        if (first_done) cudaEventDestroy(first_done);
        cudaFree(a);
        cudaFree(b);
        group.Quiesce();
      });
  for (int r = 0; r < P; ++r) {
    Expect(errors[r].empty() && right[r] && failed[r] == 1, "staging after a failed call, " + std::to_string(P) +
                                                                " ranks, rank " + std::to_string(r) + ": right " +
                                                                std::to_string(right[r]) + " " + errors[r]);
  }
  Expect(fake_cuda::LiveEvents() == 0, "staging after a failed call: events left");
}

// Split work on pool memory, each call on a stream of its own: a call whose staging buffer cannot
// grow (no device memory) fails before its stage-in waited for the last stage-out, so
// it must leave the staging buffer's "free" mark as it was; the next call's stage-in then still
// waits for the first call's stage-out. Rank 1's third stream waits for its first (as a caller
// may), which runs the first call's stage-out late unless that order holds.
void TestFailedGrowthKeepsStagingOrder(int P) {
  auto transports = pycomm::CreateLoopbackTransports(P);
  const size_t slice = 100, n = slice * P;
  const auto first = reinterpret_cast<cudaStream_t>(0x5), grown = reinterpret_cast<cudaStream_t>(0x6),
             third = reinterpret_cast<cudaStream_t>(0x7);
  Meeting meeting(P);
  std::vector<int> right(P, 0), failed(P, 0);
  const auto errors =
      RunGroups(Pointers(transports), pycomm::cuda::DeviceSync::kStream, pycomm::cuda::DeviceWork::kSplit, 5,
                [&](int r, pycomm::cuda::DeviceGroup& group) {
                  auto never = [] { return false; };
                  // The staging buffer grows once (its old one freed, which waits for the GPU), then serves
                  // a call of half the size, and cannot grow for one of 4 times the size.
                  int64_t* warm = PoolArray(1, 2 * n, first);
                  group.Run(SumCall(2 * n), {{warm, 2 * n * 8, true, true}}, first, SumIntoAll(P, 2 * slice, never));
                  int64_t* a = PoolArray(r + 1, n, first);
                  group.Run(SumCall(n), {{a, n * 8, true, true}}, first, SumIntoAll(P, slice, never));
                  int64_t* big = PoolArray(1, 4 * n, grown);
                  fake_cuda::Fail(fake_cuda::kMalloc);  // on every rank: no rank retires its old buffer
                  try {
                    group.Run(SumCall(4 * n), {{big, 4 * n * 8, true, true}}, grown, SumIntoAll(P, 4 * slice, never));
                  } catch (const std::exception&) {
                    failed[r] = 1;
                  }
                  fake_cuda::Fail(fake_cuda::kNothing);
                  int64_t* c = PoolArray(100 * (r + 1), n, third);
                  cudaEvent_t first_done = r == 1 ? OrderStreams(third, first) : nullptr;
                  group.Run(SumCall(n), {{c, n * 8, true, true}}, third, SumIntoAll(P, slice, never));
                  for (int q = 0; q < P; ++q) {  // rank 0 first
                    if (q == r) Sync(third);
                    meeting.Arrive();
                  }
                  cudaDeviceSynchronize();
                  right[r] = std::vector<int64_t>(a, a + n) == std::vector<int64_t>(n, P * (P + 1) / 2) &&
                             std::vector<int64_t>(c, c + n) == std::vector<int64_t>(n, 100 * P * (P + 1) / 2);
                  meeting.Arrive();  // nobody frees before all have read
                  if (first_done) cudaEventDestroy(first_done);
                  for (int64_t* p : {warm, a, big, c}) cudaFree(p);
                  group.Quiesce();
                });
  for (int r = 0; r < P; ++r) {
    Expect(errors[r].empty() && right[r] && failed[r], "staging after a failed growth, " + std::to_string(P) +
                                                           " ranks, rank " + std::to_string(r) + ": right " +
                                                           std::to_string(right[r]) + " " + errors[r]);
  }
  Expect(fake_cuda::LiveEvents() == 0, "staging after a failed growth: events left");
}

// Hand-offs as messages (no arena), the next one to the leader held back once asked.
class HeldBackSends : public Forwarding {
 public:
  using Forwarding::Forwarding;
  const char* name() const override { return "held back"; }
  std::unique_ptr<pycomm::Request> Isend(int peer, const void* buf, size_t bytes) override {
    if (peer == 0 && hold_next_.exchange(false)) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    return inner_->Isend(peer, buf, bytes);
  }
  void HoldNext() { hold_next_ = true; }

 private:
  std::atomic<bool> hold_next_{false};
};

// Split work where the last rank queues its part, its GPU then stalls (a rank about to die), and
// its last hand-off reaches the leader only after the time-out: the leader answers that it did
// not hear every rank, and no rank's stream waits for the stalled rank's `done` (which would
// hold up everything the caller queues next, until that GPU recovers).
void TestUnheardRankNotWaitedFor(int P) {
  auto loopback = pycomm::CreateLoopbackTransports(P);
  std::vector<std::unique_ptr<HeldBackSends>> held;
  std::vector<Transport*> transports;
  for (auto& t : loopback) {
    held.push_back(std::make_unique<HeldBackSends>(std::move(t)));
    transports.push_back(held.back().get());
  }
  const int stalled = P - 1;
  const size_t slice = 100, n = slice * P;
  std::vector<std::string> call_errors(P);
  std::vector<double> sync_seconds(P, 0);
  std::atomic<int> measured{0}, synced{0};
  // The leader gives up on the held-back hand-off after 1 s; the others wait longer for its answer.
  const auto errors = RunGroups(
      transports, pycomm::cuda::DeviceSync::kStream, pycomm::cuda::DeviceWork::kSplit, 3,
      [&](int r, pycomm::cuda::DeviceGroup& group) {
        int64_t* a = DeviceArray(std::vector<int64_t>(n, r + 1));
        const auto sum = SumIntoAll(P, slice, [] { return false; });
        const pycomm::cuda::GroupWork work = [&, r](const std::vector<std::vector<void*>>& buffers,
                                                    pycomm::cuda::WorkPart part, cudaStream_t stream) {
          sum(buffers, part, stream);
          if (r == stalled) fake_cuda::StallStream(), held[r]->HoldNext();
        };
        try {
          group.Run(SumCall(n), {{a, n * 8, true, true}}, nullptr, work);
        } catch (const std::exception& e) {
          call_errors[r] = e.what();
        }
        if (r != stalled) {
          const auto start = std::chrono::steady_clock::now();
          Sync();
          sync_seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          if (++measured == P - 1) fake_cuda::ReleaseStalls();  // the test is over
        }
        while (measured < P - 1) std::this_thread::yield();
        cudaDeviceSynchronize();  // this rank's part, which may read others' `a`, has run
        ++synced;
        while (synced < P) std::this_thread::yield();
        cudaFree(a);
      },
      1);
  for (int r = 0; r < P; ++r) {
    if (r == stalled) continue;
    Expect(!call_errors[r].empty() && errors[r].empty() && sync_seconds[r] < 0.5,
           "a rank the leader never heard, " + std::to_string(P) + " ranks, rank " + std::to_string(r) +
               ": its stream took " + std::to_string(sync_seconds[r]) + " s; error: " + call_errors[r] + errors[r]);
  }
  Expect(fake_cuda::LiveEvents() == 0, "a rank the leader never heard: events left");
}

// PYCOMM_GPU_SYNC and PYCOMM_GPU_WORK as each rank of a node asked (groups made directly, so that
// ranks can ask differently): a value set on some ranks wins over auto on the others; values
// that conflict, or split with host ordering, fail on every rank, quickly.
struct Asked {
  pycomm::cuda::DeviceSync sync;
  pycomm::cuda::DeviceWork work;
};

// OrderAfterStream: work queued on one stream afterwards runs after what another stream had
// queued (here a copy into the array), with no host wait, no event left and no error behind.
void TestOrderAfterStream() {
  std::thread([] {
    const auto producer = reinterpret_cast<cudaStream_t>(0x5), work = reinterpret_cast<cudaStream_t>(0x6);
    const std::vector<int64_t> values(100, 7);
    int64_t* a = DeviceArray(std::vector<int64_t>(100, 0));
    Sync();
    cudaMemcpyAsync(a, values.data(), values.size() * 8, cudaMemcpyHostToDevice, producer);
    pycomm::OrderAfterStream(a, work, producer);
    Sync(work);
    Expect(Same(a, values.data(), values.size() * 8), "work ordered after the producer's stream");
    Expect(fake_cuda::LiveEvents() == 0, "OrderAfterStream left an event");
    Expect(cudaGetLastError() == cudaSuccess, "OrderAfterStream left an error");
    cudaFree(a);
    fake_cuda::ThreadExit();
  }).join();
}

// UseDevice: the GPU is current while the token lives, then the thread's own context comes
// back: none (no device 0 context made), or another GPU's.
void TestUseDevice() {
  std::thread([] {
    fake_cuda::DropContext();
    for (int had : {-1, 2}) {
      if (had >= 0) cudaSetDevice(had);
      {
        std::shared_ptr<void> used = pycomm::UseDevice(1);
        Expect(fake_cuda::CurrentDevice() == 1,
               "UseDevice(1) made device " + std::to_string(fake_cuda::CurrentDevice()));
      }
      Expect(fake_cuda::CurrentDevice() == had, "after UseDevice, device " +
                                                    std::to_string(fake_cuda::CurrentDevice()) + " is current, not " +
                                                    std::to_string(had));
    }
    Expect(!fake_cuda::MadeContext(0), "UseDevice made device 0's context");
    fake_cuda::ThreadExit();
  }).join();
}

void TestSettingsTogether(const std::vector<Asked>& asked, const std::string& want_sync, const std::string& want_work) {
  const int P = static_cast<int>(asked.size());
  auto transports = pycomm::CreateLoopbackTransports(P);
  std::vector<std::string> sync(P), work(P), error(P);
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      uint64_t seq = 0;
      try {
        pycomm::cuda::DeviceGroup group(*transports[r], &seq, 0, 5, asked[r].sync, asked[r].work);
        sync[r] = pycomm::cuda::DeviceSyncName(group.sync());
        work[r] = pycomm::cuda::DeviceWorkName(group.work());
      } catch (const pycomm::MismatchError& e) {
        error[r] = "mismatch";
      } catch (const std::exception& e) {
        error[r] = "error";
      }
      fake_cuda::ThreadExit();
    });
  }
  for (auto& t : threads) t.join();
  std::string where = "settings";
  for (const auto& a : asked) {
    where += std::string(" ") + pycomm::cuda::DeviceSyncName(a.sync) + "/" + pycomm::cuda::DeviceWorkName(a.work);
  }
  for (int r = 0; r < P; ++r) {
    if (want_sync == "mismatch" || want_sync == "error") {
      // The leader names the cause; every peer hears that the settings differ, or that set-up failed.
      const bool ok = want_sync == "mismatch" ? error[r] == "mismatch" : !error[r].empty();
      Expect(ok, where + ": rank " + std::to_string(r) + " got " + (error[r].empty() ? "no error" : error[r]));
    } else {
      Expect(error[r].empty() && sync[r] == want_sync && work[r] == want_work,
             where + ": rank " + std::to_string(r) + " chose " + sync[r] + "/" + work[r] + " " + error[r]);
    }
  }
  Expect(fake_cuda::LiveEvents() == 0, where + ": events left");
}

}  // namespace

int main() {
  const std::vector<std::vector<int>> layouts = {
      {0},          {0, 0},       {0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},  // one node; 10 ranks: several passes
      {0, 0, 1, 1}, {0, 1, 2, 3}, {0, 0, 1},    {0, 1, 1, 0},  // nodes: even, one rank each, uneven, interleaved
  };
  for (const auto& layout : layouts) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{1000}, size_t{(4 << 20) / 8 * 2 + 3}}) TestAllreduce(layout, n);
    for (size_t block : {size_t{0}, size_t{1}, size_t{333}}) TestOthers(layout, block);
    if (layout.size() > 1) TestMismatch(layout, false), TestMismatch(layout, true);
    TestUnexportableMemory(layout);
    if (layout.size() > 1) TestFreedMemoryUnmapped(layout), TestReusedAddresses(layout);
    TestBuffersInsideOneAllocation(layout);
    if (layout.size() > 1) TestPoolMemory(layout);
  }
  TestSharedImporter();
  TestImporterWaitsOutsideItsLock();
  for (int P : {2, 3}) TestReusedAddressesAcrossCommunicators(P);
  TestConcurrentCommunicators(2, 10);
  TestPeerOutwaitsASlowLeader();
  TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kEvents, 3);
  TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kEvents, 0);
  TestFailuresReachEveryRank({0, 0, 0}, fake_cuda::kEvents, 1);
  TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kMalloc, 2);  // node 1's leader
  // One rank a node: its reduce_scatter needs no device scratch, only pinned memory.
  TestFailuresReachEveryRank({0, 1, 2}, fake_cuda::kMallocHost, 0);
  // A rank that cannot make its GPU current as a call begins: a peer, a leader, a group of one.
  TestFailuresReachEveryRank({0, 0}, fake_cuda::kSetDevice, 1);
  TestFailuresReachEveryRank({0, 0, 0}, fake_cuda::kSetDevice, 0);
  TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kSetDevice, 2);
  TestFailuresReachEveryRank({0, 1}, fake_cuda::kSetDevice, 1);
  TestFailuresReachEveryRank({0, 1, 2}, fake_cuda::kSetDevice, 0);
  // Between nodes through a CUDA-aware MPI (MPI_Iallreduce straight on GPU memory; float16 still
  // through the host).
  g_cuda_aware = true;
  for (const auto& layout : {std::vector<int>{0, 0, 1, 1}, std::vector<int>{0, 1, 2}, std::vector<int>{0, 0, 1}}) {
    for (size_t n : {size_t{1}, size_t{1000}, size_t{(4 << 20) / 8 + 5}}) TestAllreduce(layout, n);
    TestOthers(layout, 33);
    TestMismatch(layout, true);
  }
  g_cuda_aware = false;
  TestAutoSync({0, 0, 0, 0}, 4);  // a GPU each
  TestAutoSync({0, 0, 0, 0}, 2);  // two ranks a GPU
  TestAutoSync({0, 0, 0}, 1);
  TestAutoSync({0, 0, 1, 1}, 4);  // each node decides for itself
  TestLeaderAfterSplitSetUp();
  TestPhaseTimes({0, 0, 0}, false);
  g_own_gpus = true;  // auto splits
  TestPhaseTimes({0, 0, 0}, true);
  g_own_gpus = false;
  TestOrderAfterStream();
  TestUseDevice();
  // A stream of each rank's own instead of its default stream.
  const auto own_stream = reinterpret_cast<cudaStream_t>(0x5);
  for (const auto& layout : {std::vector<int>{0, 0, 0}, std::vector<int>{0, 0, 1}}) {
    TestAllreduce(layout, 1000, own_stream);
    TestAllreduce(layout, (4 << 20) / 8 + 5, own_stream);  // two pieces of host staging
  }
  // Ordered by IPC events on the streams instead of on the host.
  setenv("PYCOMM_GPU_SYNC", "stream", 1);
  for (const auto& layout : {std::vector<int>{0, 0, 0}, std::vector<int>{0, 0, 1}}) {
    TestAllreduce(layout, 1000);
    TestAllreduce(layout, 1000, own_stream);
    TestOthers(layout, 5);
  }
  unsetenv("PYCOMM_GPU_SYNC");
  // Split work: every rank on a GPU of its own (auto splits), and forced on a shared GPU; on
  // one node, and across nodes (each rank's slices cross with their owners on other nodes).
  for (bool own : {true, false}) {
    g_own_gpus = own;
    if (!own) setenv("PYCOMM_GPU_WORK", "split", 1);
    for (const auto& layout : {std::vector<int>{0, 0}, std::vector<int>{0, 0, 0, 0}, std::vector<int>(10, 0),
                               std::vector<int>{0, 0, 1, 1}, std::vector<int>{0, 1, 2, 3}, std::vector<int>{0, 0, 1},
                               std::vector<int>{0, 1, 1, 0}, std::vector<int>{0, 0, 0, 1, 1}}) {
      for (size_t n : {size_t{0}, size_t{1}, size_t{1000}, size_t{10007}, size_t{(4 << 20) / 8 * 2 + 3}}) {
        TestAllreduce(layout, n);
      }
      TestAllreduce(layout, 10007, own_stream);
      for (size_t block : {size_t{0}, size_t{1}, size_t{333}}) TestOthers(layout, block);
      TestMismatch(layout, false), TestMismatch(layout, true);
      TestUnexportableMemory(layout);
      TestFreedMemoryUnmapped(layout);
      TestReusedAddresses(layout);
      TestBuffersInsideOneAllocation(layout);
      if (layout.size() == 3) TestReusedAddressesAcrossCommunicators(3), TestConcurrentCommunicators(3, 10);
      TestManyCalls(layout, 10007);
    }
    TestSplitLaunchFailure({0, 0, 0}, 1);
    TestSplitLaunchFailure({0, 0, 0, 0}, 0);
    TestFailuresReachEveryRank({0, 0, 0}, fake_cuda::kEvents, 2);
    // Across nodes, failures before the agreement: set-up, and the scratch of a reduce_scatter
    // (which the leaders still do alone) on node 1's leader.
    TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kEvents, 3);
    TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kMalloc, 2);
    TestFailuresReachEveryRank({0, 0, 1}, fake_cuda::kMalloc, 2);
    // A rank that cannot get the pinned memory its slice's crossing needs, next to a rank that
    // owns several slices (and so agrees over several links): its node fails on every link.
    TestFailuresReachEveryRank({0, 0, 1}, fake_cuda::kMallocHost, 1, 10007);
    TestFailuresReachEveryRank({0, 0, 1, 1, 1}, fake_cuda::kMallocHost, 4, 10007);
    TestFailuresReachEveryRank({0, 0, 1, 1, 1}, fake_cuda::kMallocHost, 1, 10007);
    TestFailuresReachEveryRank({0, 0, 0}, fake_cuda::kSetDevice, 1);
    TestFailuresReachEveryRank({0, 0, 1, 1}, fake_cuda::kSetDevice, 3, 10007);
  }
  unsetenv("PYCOMM_GPU_WORK");
  // Split across nodes, each slice's owners through a CUDA-aware MPI.
  g_own_gpus = g_cuda_aware = true;
  TestAllreduce({0, 0, 1, 1}, 10007);
  TestAllreduce({0, 0, 1}, (4 << 20) / 8 + 5);
  TestOthers({0, 1, 1, 0}, 33);
  TestOthers({0, 1, 2, 3}, 300007);  // one rank a node, the whole vector allreduced through MPI
  g_cuda_aware = false;
  TestOthers({0, 1, 2, 3}, 300007);  // one rank a node: a reduce_scatter of several pieces through the host
  fake_cuda::SetMaxPitch(4096);      // blocks over the largest pitch a strided copy takes: a copy each
  TestOthers({0, 1, 2, 3}, 300007);
  TestOthers({0, 1, 2}, 600);  // int64 blocks over it (a copy each), float32 under (one strided copy)
  fake_cuda::SetMaxPitch(0);
  setenv("PYCOMM_GPU_WORK", "leader", 1);  // on GPUs of their own, for comparison
  TestManyCalls({0, 0, 0}, 10007);
  g_own_gpus = false;
  unsetenv("PYCOMM_GPU_WORK");
  TestQuiesceWithoutARank({0, 0}, 1);
  TestQuiesceWithoutARank({0, 0, 0}, 2);
  TestQuiesceWithoutARank({0, 0, 0}, 0);
  TestFailedSetUpFreesOnItsGpu({0, 0, 0}, 2);
  TestFailedSetUpFreesOnItsGpu({0, 0, 0}, 0);
  TestFailedSetUpFreesOnItsGpu({0, 0, 1, 1}, 3);
  TestQuiesceWithoutItsGpu({0, 0}, 1);
  TestQuiesceWithoutItsGpu({0, 0, 0}, 0);
  // Without CUDA IPC (a rank cannot open its peers' events or memory, or PYCOMM_GPU_IPC=off on
  // some rank): every rank goes through the host, on a shared GPU or GPUs of their own (split).
  for (bool own : {false, true}) {
    g_own_gpus = own;
    for (int failing : {1, 0, -1}) {
      g_ipc_fails_on = failing;
      if (failing < 0) setenv("PYCOMM_GPU_IPC", "off", 1);
      for (const auto& layout : {std::vector<int>{0, 0}, std::vector<int>{0, 0, 0, 0}, std::vector<int>{0, 0, 1, 1}}) {
        TestThroughHost(layout, true);
        TestAllreduce(layout, 1000);
        TestAllreduce(layout, (4 << 20) / 8 + 5);  // two pieces of host staging
        TestOthers(layout, 333);
        if (layout.size() == 2) TestOthers(layout, 300007);  // several pieces through the host
        TestMismatch(layout, false);
      }
      if (failing < 0) TestHostCallAgainstDeviceCall({0, 0, 0}, 1), TestHostCallAgainstDeviceCall({0, 0}, 0);
      unsetenv("PYCOMM_GPU_IPC");
    }
    g_ipc_fails_on = -1;
    TestThroughHost({0, 0}, false);
    // Without the node groups across nodes: through the host.
    g_no_hierarchy = true;
    TestThroughHost({0, 0, 1, 1}, true);
    TestAllreduce({0, 0, 1, 1}, 1000);
    TestOthers({0, 1, 1}, 333);
    g_no_hierarchy = false;
    setenv("PYCOMM_GPU_IPC", "off", 1);
    TestHostStepAlgorithm({0, 0});
    TestHostStepAlgorithm({0, 0, 0});
    TestHostStepAlgorithmsDiffer({0, 0}, pycomm::Algorithm::kRing);
    TestHostStepAlgorithmsDiffer({0, 0, 0}, pycomm::Algorithm::kSingleCopy);
    // The hierarchy is the ring on one node: no mismatch.
    g_algorithms = {pycomm::Algorithm::kRing, pycomm::Algorithm::kHierarchical};
    TestAllreduce({0, 0}, 1000);
    TestOthers({0, 0}, 33);
    g_algorithms.clear();
    unsetenv("PYCOMM_GPU_IPC");
  }
  g_own_gpus = false;
  setenv("PYCOMM_GPU_SYNC", "stream", 1);  // host sync makes no GPU wait for another rank's work
  TestPeerGpuStuckAtClose({0, 0}, 1);
  TestPeerGpuStuckAtClose({0, 0, 0}, 0);
  g_own_gpus = true;  // split work
  TestPeerGpuStuckAtClose({0, 0, 0}, 2);
  g_own_gpus = false;
  unsetenv("PYCOMM_GPU_SYNC");
  TestOtherNodeSilent({0, 1});
  TestOtherNodeSilent({0, 0, 1});
  TestCallersContextKept({0, 0, 0});
  TestCallersContextKept({0, 0, 1, 1});
  // Settings asked differently on the ranks of one node (all on one GPU).
  using S = pycomm::cuda::DeviceSync;
  using W = pycomm::cuda::DeviceWork;
  TestSettingsTogether({{S::kAuto, W::kAuto}, {S::kStream, W::kAuto}, {S::kAuto, W::kAuto}}, "stream", "leader");
  TestSettingsTogether({{S::kAuto, W::kAuto}, {S::kAuto, W::kSplit}, {S::kAuto, W::kAuto}}, "stream", "split");
  TestSettingsTogether({{S::kAuto, W::kAuto}, {S::kAuto, W::kAuto}}, "host", "leader");
  TestSettingsTogether({{S::kHost, W::kAuto}, {S::kAuto, W::kAuto}, {S::kStream, W::kAuto}}, "mismatch", "");
  TestSettingsTogether({{S::kAuto, W::kLeader}, {S::kAuto, W::kSplit}}, "mismatch", "");
  TestSettingsTogether({{S::kHost, W::kAuto}, {S::kAuto, W::kSplit}}, "error", "");
  for (bool last_first : {true, false}) {
    TestPartialWorkOrdered(2, S::kHost, W::kLeader, 0, last_first);
    TestPartialWorkOrdered(3, S::kStream, W::kLeader, 0, last_first);
    TestPartialWorkOrdered(2, S::kStream, W::kSplit, 0, last_first);
    TestPartialWorkOrdered(3, S::kStream, W::kSplit, 1, last_first);
    TestPartialWorkOrdered(4, S::kStream, W::kSplit, 3, last_first);
  }
  TestFailedCallStagingOrdered(2);
  TestFailedCallStagingOrdered(3);
  TestFailedGrowthKeepsStagingOrder(2);
  TestFailedGrowthKeepsStagingOrder(3);
  TestUnheardRankNotWaitedFor(2);
  TestUnheardRankNotWaitedFor(3);
  return pycomm_test::Report();
}
