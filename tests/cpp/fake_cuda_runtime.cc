// A stand-in for the CUDA runtime (and the driver calls pycomm makes) so that the device
// collectives' host-side logic runs on machines with no GPU: the leader protocol, the hand-off,
// the layouts across nodes, the host staging between node leaders. Ranks are threads of one
// process, so "device memory" is ordinary memory and an IPC handle carries a pointer.
//
// Work on a stream is queued and runs only when some thread waits for it (an event query or
// synchronisation, a stream waiting on an event, a cudaFree), as if the GPU were arbitrarily
// slow: code that reads a result, or reuses a buffer, without the ordering CUDA requires sees
// stale data here. Each thread ("process") has its own default stream. What this cannot show
// (real concurrency, real IPC, the kernels) only a GPU run can: bench/gpu_check.sh.

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/reduce_kernels.h"
#include "reduce/reduce.h"

namespace {

struct Allocation {
  size_t size;
  unsigned long long id;
  bool placed = false;  // at an address the test chose, in memory it owns (PlaceAllocation)
  bool pooled = false;  // from a stream-ordered pool (cudaMallocAsync): cudaIpcGetMemHandle refuses it
};

std::mutex g_mutex;
std::map<char*, Allocation> g_device;  // by base address
unsigned long long g_next_id = 1;

// The allocation holding `p`, if it is fake device memory.
bool Find(const void* p, char** base, Allocation* a) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_device.upper_bound(static_cast<char*>(const_cast<void*>(p)));
  if (it == g_device.begin()) return false;
  --it;
  if (static_cast<const char*>(p) >= it->first + it->second.size) return false;
  *base = it->first;
  *a = it->second;
  return true;
}

// Only the attributes pycomm may rely on. RANGE_START_ADDR and RANGE_SIZE are refused: the
// driver documents them as the mappable range a pointer lies in, which need not be its allocation
// (cudaMalloc packs small allocations together), so an allocation's bounds come from
// cuMemGetAddressRange.
CUresult FakePointerGetAttributes(unsigned int n, CUpointer_attribute* attributes, void** data, CUdeviceptr ptr) {
  char* base = nullptr;
  Allocation a{};
  const bool found = Find(reinterpret_cast<void*>(ptr), &base, &a);
  for (unsigned i = 0; i < n; ++i) {
    switch (attributes[i]) {
      case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        *static_cast<unsigned long long*>(data[i]) = found ? a.id : 0;
        break;
      default:
        return CUDA_ERROR_INVALID_VALUE;
    }
  }
  return CUDA_SUCCESS;
}

std::atomic<int> g_address_range_queries{0};

CUresult FakeMemGetAddressRange(CUdeviceptr* base, size_t* size, CUdeviceptr ptr) {
  ++g_address_range_queries;
  char* found_base = nullptr;
  Allocation a{};
  if (!Find(reinterpret_cast<void*>(ptr), &found_base, &a)) return CUDA_ERROR_NOT_FOUND;
  if (base) *base = reinterpret_cast<CUdeviceptr>(found_base);
  if (size) *size = a.size;
  return CUDA_SUCCESS;
}

// An operation on a stream. `waits_on` and `position`: it waits for that stream's first
// `position` operations (cudaStreamWaitEvent); `stalls`: it stands for GPU work that never ends
// (a peer that died), until ReleaseStalls.
struct Stream;
struct Op {
  std::function<void()> run;
  Stream* waits_on = nullptr;
  uint64_t position = 0;
  bool stalls = false;
};

// A stream: operations in order, run by whichever thread first needs them done.
struct Stream {
  std::mutex m;
  std::deque<Op> pending;
  uint64_t queued = 0;     // operations ever queued
  uint64_t completed = 0;  // operations run to the end
  std::thread::id runner;  // the thread running one now, if any
  // What the operation being run now (if any) stands for, with its `run` taken out.
  Op running;
};

// Each thread ("process") by a number of its own: thread ids are reused once a thread ends. A
// thread may join another's process instead (fake_cuda::JoinProcess), as an executor thread.
thread_local uint64_t g_joined_process = 0;
uint64_t ThisProcess() {
  static std::atomic<uint64_t> next{1};
  thread_local const uint64_t mine = next++;
  return g_joined_process ? g_joined_process : mine;
}

// Streams by (owning process, handle): the null handle is each process's own default stream.
// They stay until the program ends: events recorded on them may outlive their process.
std::map<std::pair<uint64_t, cudaStream_t>, std::unique_ptr<Stream>> g_streams;

Stream* StreamOf(cudaStream_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& s = g_streams[{ThisProcess(), handle}];
  if (!s) s = std::make_unique<Stream>();
  return s.get();
}

void Enqueue(cudaStream_t handle, std::function<void()> run, Stream* waits_on = nullptr, uint64_t position = 0,
             bool stalls = false) {
  Stream* s = StreamOf(handle);
  std::lock_guard<std::mutex> lock(s->m);
  s->pending.push_back(Op{std::move(run), waits_on, position, stalls});
  ++s->queued;
}

std::atomic<bool> g_stalls_released{false};

// Whether `s`'s first `target` operations can complete, or some stalled operation stands in the
// way (on `s`, or on a stream that one of them waits for): what a real cudaEventQuery tells
// without waiting.
bool CanComplete(Stream* s, uint64_t target) {
  std::vector<std::pair<Stream*, uint64_t>> waits;
  {
    std::lock_guard<std::mutex> lock(s->m);
    if (s->completed >= target) return true;
    if (g_stalls_released) return true;
    if (s->running.stalls) return false;
    if (s->running.waits_on) waits.emplace_back(s->running.waits_on, s->running.position);
    const uint64_t first = s->queued - s->pending.size();  // the front's index
    for (uint64_t i = first; i < target && i - first < s->pending.size(); ++i) {
      const Op& op = s->pending[i - first];
      if (op.stalls) return false;
      if (op.waits_on) waits.emplace_back(op.waits_on, op.position);
    }
  }
  for (const auto& [stream, position] : waits) {
    if (!CanComplete(stream, position)) return false;
  }
  return true;
}

// Runs `s` until its first `target` operations have completed. Another thread running it is
// left to go on; if it stops short, this thread takes over.
void RunUntil(Stream* s, uint64_t target) {
  for (;;) {
    Op op;
    {
      std::lock_guard<std::mutex> lock(s->m);
      if (s->completed >= target) return;
      if (s->runner == std::this_thread::get_id()) std::abort();  // a stream waiting on itself
      if (s->runner == std::thread::id()) {
        s->runner = std::this_thread::get_id();
        op = std::move(s->pending.front());
        s->pending.pop_front();
        s->running = Op{nullptr, op.waits_on, op.position, op.stalls};
      }
    }
    if (!op.run) {
      std::this_thread::yield();
      continue;
    }
    try {
      op.run();
    } catch (const std::exception& e) {  // a queued operation has no caller to throw to
      std::fprintf(stderr, "fake CUDA runtime: a queued operation threw: %s\n", e.what());
      std::abort();
    }
    std::lock_guard<std::mutex> lock(s->m);
    ++s->completed;
    s->runner = std::thread::id();
    s->running = Op{};
  }
}

void RunAll(Stream* s) {
  uint64_t queued;
  {
    std::lock_guard<std::mutex> lock(s->m);
    queued = s->queued;
  }
  RunUntil(s, queued);
}

// What a real cudaDeviceSynchronize (or a cudaFree) waits for: this "process's" streams.
void SynchronizeThisThread() {
  std::vector<Stream*> mine;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto& [key, stream] : g_streams) {
      if (key.first == ThisProcess()) mine.push_back(stream.get());
    }
  }
  for (Stream* s : mine) RunAll(s);
}

// An event: where on which stream it was last recorded. A handle opened through IPC shares the
// state of the event it was exported from, as in CUDA.
struct EventState {
  std::mutex m;
  Stream* stream = nullptr;
  uint64_t position = 0;  // the operations queued on `stream` before the record
};
// Every event created or opened through IPC is a handle of its own, to be destroyed once: the
// objects stay until the program ends, so that a second destroy is caught, not a crash.
struct FakeEvent {
  bool live = true;
  std::shared_ptr<EventState> state;
};
std::vector<std::unique_ptr<FakeEvent>> g_events;
int g_live_events = 0;
// Device allocations opened through IPC and not yet closed (by base address, under g_mutex), and
// how many were freed while some importer still had them open (CUDA: undefined behaviour).
std::map<void*, int> g_ipc_opens;
int g_freed_while_open = 0;
// What each "process" has mapped through IPC: base -> (size, allocation id), under g_mutex. CUDA
// refuses to map an allocation over one still mapped (one freed since, whose addresses the new
// one reuses).
struct Mapped {
  size_t size;
  unsigned long long id;
  int refs = 0;
};
std::map<uint64_t, std::map<char*, Mapped>> g_mapped;

cudaEvent_t NewEvent(std::shared_ptr<EventState> state) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_events.push_back(std::make_unique<FakeEvent>());
  g_events.back()->state = std::move(state);
  ++g_live_events;
  return reinterpret_cast<cudaEvent_t>(g_events.back().get());
}

std::pair<Stream*, uint64_t> LastRecord(cudaEvent_t event) {
  EventState& state = *reinterpret_cast<FakeEvent*>(event)->state;
  std::lock_guard<std::mutex> lock(state.m);
  return {state.stream, state.position};
}

thread_local int g_fail = 0;          // fake_cuda::What
thread_local int g_physical_gpu = 0;  // which GPU this "process's" device 0 is (CUDA_VISIBLE_DEVICES)
// The device whose primary context is current on this thread (-1: none, as on a new thread), and
// a bit for each device whose primary context this "process" has made.
thread_local int g_current_device = -1;
thread_local int g_device_syncs = 0;  // cudaDeviceSynchronize calls by this thread
thread_local unsigned g_contexts_made = 0;
// Frees and closes this thread made with no context current: the real runtime would first make
// device 0's primary context current for them.
thread_local int g_without_context = 0;
void CountIfNoContext() {
  if (g_current_device < 0) ++g_without_context;
}
// As the runtime, every error a call returns is kept as the thread's last error, until
// cudaGetLastError reads it (cudaErrorNotReady too, as some runtimes do): pycomm must leave none
// behind for the caller's next check (torch checks every launch with cudaGetLastError).
thread_local cudaError_t g_last_error = cudaSuccess;
cudaError_t Failed(cudaError_t error) {
  g_last_error = error;
  return error;
}
// The largest pitch a strided copy takes (cudaDevAttrMaxPitch): 2^31 - 1 on current GPUs.
std::atomic<size_t> g_max_pitch{(size_t{1} << 31) - 1};

void MakeCurrent(int device) {
  g_current_device = device;
  g_contexts_made |= 1u << device;
}

// A context is its "process's" number and the device's + 1 (so that none is null): as on a GPU,
// two processes' contexts differ.
CUresult FakeCtxGetCurrent(CUcontext* context) {
  *context = g_current_device < 0
                 ? nullptr
                 : reinterpret_cast<CUcontext>(ThisProcess() << 8 | static_cast<uintptr_t>(g_current_device + 1));
  return CUDA_SUCCESS;
}

CUresult FakeCtxSetCurrent(CUcontext context) {
  g_current_device = context ? static_cast<int>(reinterpret_cast<uintptr_t>(context) & 0xff) - 1 : -1;
  return CUDA_SUCCESS;
}

}  // namespace

namespace fake_cuda {
enum What { kNothing, kEvents, kMalloc, kLaunch, kMallocHost, kIpcOpen, kSetDevice };
// From now on this thread's event creations, device allocations, kernel launches, pinned host
// allocations, openings of other processes' events and memory through IPC, or settings of the
// current device fail.
void Fail(What what) { g_fail = what; }
// This thread's device 0 is physical GPU `gpu` (as with one CUDA_VISIBLE_DEVICES per rank); all
// threads share GPU 0 by default.
void UseGpu(int gpu) { g_physical_gpu = gpu; }
// From now on this thread's default stream stands still, as the GPU work of a rank that died
// would: what is queued after this never runs (a query of an event recorded after it says not
// ready; a synchronisation waits) until ReleaseStalls, or for at most 30 s.
void StallStream() {
  g_stalls_released = false;
  Enqueue(
      nullptr,
      [] {
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        while (!g_stalls_released && std::chrono::steady_clock::now() < until) {
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      },
      nullptr, 0, true);
}
void ReleaseStalls() { g_stalls_released = true; }
// This thread's "process" (its number), for another thread to join.
uint64_t Process() { return ThisProcess(); }
// From now on this thread belongs to `process` (as an executor thread of a rank): its streams,
// its IPC mappings and its CUDA context are that process's.
void JoinProcess(uint64_t process) { g_joined_process = process; }
// Strided copies take pitches up to `bytes` (read as cudaDevAttrMaxPitch) on every thread; 0
// restores the default.
void SetMaxPitch(size_t bytes) { g_max_pitch = bytes ? bytes : (size_t{1} << 31) - 1; }
// Device memory of `size` bytes at `at`, in memory the caller owns (cudaFree only forgets it):
// so that a test can make allocations reuse each other's addresses, as CUDA's allocator does.
int AddressRangeQueries() { return g_address_range_queries; }
void PlaceAllocation(void* at, size_t size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_device[static_cast<char*>(at)] = Allocation{size, g_next_id++, true};
}
// A rank's thread ends: its streams run to the end, so that nothing it queued runs after its
// memory is gone.
void ThreadExit() {
  SynchronizeThisThread();
  g_current_device = -1;
  g_contexts_made = 0;
}
int DeviceSyncs() { return g_device_syncs; }
// Device frees, pinned frees, event destructions and IPC closes this thread made with no context
// current (each would have made device 0's on a real GPU).
int CallsWithoutContext() { return g_without_context; }
// The device whose context is current on this thread (-1: none); none from now on.
int CurrentDevice() { return g_current_device; }
void DropContext() { g_current_device = -1; }
// Whether this thread ("process") has made `device`'s primary context.
bool MadeContext(int device) { return g_contexts_made & (1u << device); }
// Device allocations freed while another thread ("process") still had them open through IPC.
int FreedWhileOpen() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_freed_while_open;
}
// Mappings of device allocations opened through IPC and not yet closed, in all threads.
int OpenIpcMappings() {
  std::lock_guard<std::mutex> lock(g_mutex);
  int open = 0;
  for (const auto& [base, count] : g_ipc_opens) open += count;
  return open;
}
// Events created or opened and not yet destroyed, in all threads.
int LiveEvents() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_live_events;
}
}  // namespace fake_cuda

extern "C" {

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (g_fail == fake_cuda::kMalloc) return Failed(cudaErrorMemoryAllocation);
  char* p = static_cast<char*>(std::aligned_alloc(256, (size + 255) / 256 * 256 + 256));
  std::lock_guard<std::mutex> lock(g_mutex);
  g_device[p] = Allocation{size ? size : 1, g_next_id++};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t) {
  const cudaError_t err = cudaMalloc(ptr, size);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_device[static_cast<char*>(*ptr)].pooled = true;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  CountIfNoContext();
  SynchronizeThisThread();  // as CUDA's does: queued work may still use the memory
  bool placed = false;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_device.find(static_cast<char*>(ptr));
    placed = it != g_device.end() && it->second.placed;
    if (it != g_device.end()) g_device.erase(it);
    if (g_ipc_opens.count(ptr)) ++g_freed_while_open;
  }
  if (!placed) std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) {
  if (g_fail == fake_cuda::kMallocHost) return Failed(cudaErrorMemoryAllocation);
  *ptr = std::aligned_alloc(256, (size + 255) / 256 * 256 + 256);
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  CountIfNoContext();
  SynchronizeThisThread();
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t stream) {
  Enqueue(stream, [=] { std::memmove(dst, src, count); });
  return cudaSuccess;
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t stream) {
  if (width > dpitch || width > spitch || dpitch > g_max_pitch || spitch > g_max_pitch) {
    return Failed(cudaErrorInvalidPitchValue);
  }
  Enqueue(stream, [=] {
    for (size_t row = 0; row < height; ++row) {
      std::memmove(static_cast<char*>(dst) + row * dpitch, static_cast<const char*>(src) + row * spitch, width);
    }
  });
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  if (g_fail == fake_cuda::kEvents) return Failed(cudaErrorInitializationError);
  *event = NewEvent(std::make_shared<EventState>());
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  CountIfNoContext();
  auto* e = reinterpret_cast<FakeEvent*>(event);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!e || !e->live) std::abort();  // destroyed twice, or never made
  e->live = false;
  --g_live_events;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Stream* s = StreamOf(stream);
  EventState& state = *reinterpret_cast<FakeEvent*>(event)->state;
  std::lock_guard<std::mutex> stream_lock(s->m);
  std::lock_guard<std::mutex> lock(state.m);
  state.stream = s;
  state.position = s->queued;
  return cudaSuccess;
}
// Completes the work before the last record (the "GPU" runs it now), unless a stalled
// operation stands in the way (cudaErrorNotReady). Work not yet done is first reported not
// ready, as by a GPU still at it: every other query of it on a thread.
cudaError_t cudaEventQuery(cudaEvent_t event) {
  auto [stream, position] = LastRecord(event);
  if (!stream) return cudaSuccess;
  if (!CanComplete(stream, position)) return Failed(cudaErrorNotReady);
  thread_local bool busy = false;
  bool done;
  {
    std::lock_guard<std::mutex> lock(stream->m);
    done = stream->completed >= position;
  }
  if (!done && (busy = !busy)) return Failed(cudaErrorNotReady);
  RunUntil(stream, position);
  return cudaSuccess;
}
// The stream waits for the event's last record at the time of this call, as in CUDA.
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  auto [waited, position] = LastRecord(event);
  if (waited) Enqueue(stream, [waited = waited, position = position] { RunUntil(waited, position); }, waited, position);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  RunAll(StreamOf(stream));
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
  ++g_device_syncs;
  SynchronizeThisThread();
  return cudaSuccess;
}

cudaError_t cudaIpcGetEventHandle(cudaIpcEventHandle_t* handle, cudaEvent_t event) {
  std::memset(handle, 0, sizeof *handle);
  std::memcpy(handle, &event, sizeof event);
  return cudaSuccess;
}
cudaError_t cudaIpcOpenEventHandle(cudaEvent_t* event, cudaIpcEventHandle_t handle) {
  if (g_fail == fake_cuda::kIpcOpen) return Failed(cudaErrorMapBufferObjectFailed);
  FakeEvent* exported = nullptr;
  std::memcpy(&exported, &handle, sizeof exported);
  *event = NewEvent(exported->state);  // a handle of its own on the same event
  return cudaSuccess;
}
// A handle holds the allocation's base, id (distinct per allocation) and size.
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* ptr) {
  char* base = nullptr;
  Allocation a{};
  if (!Find(ptr, &base, &a) || base != ptr || a.pooled) return Failed(cudaErrorInvalidValue);
  std::memset(handle, 0, sizeof *handle);
  char* bytes = reinterpret_cast<char*>(handle);
  std::memcpy(bytes, &ptr, sizeof ptr);
  std::memcpy(bytes + 8, &a.id, sizeof a.id);
  std::memcpy(bytes + 16, &a.size, sizeof a.size);
  return cudaSuccess;
}
cudaError_t cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t handle, unsigned int) {
  if (g_fail == fake_cuda::kIpcOpen) return Failed(cudaErrorMapBufferObjectFailed);
  const char* bytes = reinterpret_cast<const char*>(&handle);
  char* base = nullptr;
  Mapped m{};
  std::memcpy(&base, bytes, sizeof base);
  std::memcpy(&m.id, bytes + 8, sizeof m.id);
  std::memcpy(&m.size, bytes + 16, sizeof m.size);
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& mapped_here = g_mapped[ThisProcess()];
  // As CUDA (cuda_runtime_api.h): a handle already opened by this context is reference counted
  // and the existing pointer returned.
  auto same = mapped_here.find(base);
  if (same != mapped_here.end() && same->second.id == m.id && same->second.size == m.size) {
    ++same->second.refs;
  } else {
    for (const auto& [at, other] : mapped_here) {
      if (at < base + m.size && base < at + other.size) return Failed(cudaErrorAlreadyMapped);
    }
    m.refs = 1;
    mapped_here[base] = m;
  }
  *ptr = base;
  ++g_ipc_opens[*ptr];
  return cudaSuccess;
}
cudaError_t cudaIpcCloseMemHandle(void* ptr) {
  CountIfNoContext();
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& mapped_here = g_mapped[ThisProcess()];
  auto here = mapped_here.find(static_cast<char*>(ptr));
  if (here != mapped_here.end() && --here->second.refs <= 0) mapped_here.erase(here);
  auto it = g_ipc_opens.find(ptr);
  if (it == g_ipc_opens.end()) return Failed(cudaErrorInvalidValue);
  if (--it->second == 0) g_ipc_opens.erase(it);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  char* base = nullptr;
  Allocation a{};
  *attributes = cudaPointerAttributes{};
  attributes->type = Find(ptr, &base, &a) ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
  attributes->device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device) {
  std::snprintf(id, len, "0000:%02x:00.0", g_physical_gpu + device);
  return cudaSuccess;
}

// As the runtime: 0 where no context is current; setting a device makes its primary context.
cudaError_t cudaGetDevice(int* device) {
  *device = g_current_device < 0 ? 0 : g_current_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (g_fail == fake_cuda::kSetDevice) return Failed(cudaErrorDevicesUnavailable);
  MakeCurrent(device);
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMaxPitch) return Failed(cudaErrorInvalidValue);
  *value = static_cast<int>(g_max_pitch);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return std::exchange(g_last_error, cudaSuccess); }
cudaError_t cudaPeekAtLastError(void) { return g_last_error; }
const char* cudaGetErrorString(cudaError_t) { return "fake CUDA runtime error"; }

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  *fn = std::strcmp(symbol, "cuPointerGetAttributes") == 0 ? reinterpret_cast<void*>(&FakePointerGetAttributes)
        : std::strcmp(symbol, "cuMemGetAddressRange") == 0 ? reinterpret_cast<void*>(&FakeMemGetAddressRange)
        : std::strcmp(symbol, "cuCtxGetCurrent") == 0      ? reinterpret_cast<void*>(&FakeCtxGetCurrent)
        : std::strcmp(symbol, "cuCtxSetCurrent") == 0      ? reinterpret_cast<void*>(&FakeCtxSetCurrent)
                                                           : nullptr;
  const bool known = *fn != nullptr;
  if (status) *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

}  // extern "C"

namespace pycomm::cuda {

// The kernels' contract (reduce_kernels.h) on the CPU kernels: inputs reduced in order, the
// result (for kAvg divided by avg_divisor) written to every output; an output may be an input.
cudaError_t LaunchReduce(const void* const* inputs, int num_inputs, void* const* outputs, int num_outputs, size_t n,
                         DataType dtype, ReduceOp op, int avg_divisor, cudaStream_t stream) {
  if (num_inputs < 1 || num_inputs > kMaxReduceInputs || num_outputs < 1 || num_outputs > kMaxReduceOutputs ||
      avg_divisor < 1 || (op == ReduceOp::kAvg && !IsFloatingPoint(dtype))) {
    return cudaErrorInvalidValue;  // checked at launch, as the real LaunchReduce does
  }
  if (g_fail == fake_cuda::kLaunch) return cudaErrorLaunchFailure;
  std::vector<const void*> in(inputs, inputs + num_inputs);
  std::vector<void*> out(outputs, outputs + num_outputs);
  Enqueue(stream, [=] {
    const size_t bytes = n * DataTypeSize(dtype);
    std::vector<char> acc(static_cast<const char*>(in[0]), static_cast<const char*>(in[0]) + bytes);
    const ReduceFn fn = GetReduceFn(dtype, op == ReduceOp::kAvg ? ReduceOp::kSum : op);
    for (size_t k = 1; k < in.size(); ++k) fn(acc.data(), in[k], acc.data(), n);
    if (op == ReduceOp::kAvg) ScaleDown(acc.data(), n, dtype, avg_divisor);
    for (void* o : out) std::memcpy(o, acc.data(), bytes);
  });
  return cudaSuccess;
}

}  // namespace pycomm::cuda
