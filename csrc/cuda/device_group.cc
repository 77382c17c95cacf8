#include "cuda/device_group.h"

#include <cstring>
#include <exception>
#include <optional>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/event_request.h"
#include "transport/wait.h"

namespace pycomm::cuda {

namespace {

constexpr size_t kStagingAlign = 256;
// Every message to the leader starts with a header: a status (so that a rank that failed to
// prepare its buffers fails the call on every rank at once instead of leaving them to time out),
// then the call, then the IPC records, 8-byte aligned.
struct Header {
  int32_t status;
  int32_t sync;  // DeviceSync: ranks must order their GPU work alike, or the leader reads unfinished inputs
  DeviceCall call;
};
constexpr size_t kHeaderBytes = sizeof(Header);
static_assert(kHeaderBytes % 8 == 0, "IPC records stay 8-byte aligned");

// The leader's answer.
enum Answer : char { kFailed = 0, kDone = 1, kMismatch = LeaderExchange::kMismatch };

size_t AlignUp(size_t n) { return (n + kStagingAlign - 1) / kStagingAlign * kStagingAlign; }

void Exchange(Transport& transport, int peer, const void* send, size_t send_bytes, void* recv, size_t recv_bytes,
              double timeout_s) {
  std::unique_ptr<Request> r, s;
  if (recv_bytes) r = transport.Irecv(peer, recv, recv_bytes);
  if (send_bytes) s = transport.Isend(peer, send, send_bytes);
  if (s) Wait(*s, timeout_s);
  if (r) Wait(*r, timeout_s);
}

// What each rank sends in the constructor's one exchange with the leader: its IPC event (peers:
// `ready`, the leader: `done`), or that it could not make one, so that the exchange completes on
// every rank either way; and which GPU it is on, so that the leader can tell whether ranks share one.
struct EventRecord {
  int32_t ok;
  int32_t sync;  // DeviceSync. Peers: as asked for; the leader's answer: what the group uses
  char gpu[32];  // PCI bus id
  cudaIpcEventHandle_t handle;
};

// Whether two ranks that could set up are on one GPU.
bool SomeShareAGpu(const std::vector<EventRecord>& records) {
  for (size_t a = 0; a < records.size(); ++a) {
    for (size_t b = a + 1; b < records.size(); ++b) {
      if (records[a].ok && records[b].ok && std::strncmp(records[a].gpu, records[b].gpu, sizeof records[a].gpu) == 0) {
        return true;
      }
    }
  }
  return false;
}

}  // namespace

DeviceGroup::DeviceGroup(Transport& transport, uint64_t* arena_seq, int device, double timeout_s, DeviceSync sync)
    : transport_(transport),
      exchange_(transport, arena_seq, timeout_s),
      device_(device),
      timeout_s_(timeout_s),
      sync_(sync) {
  const int rank = transport_.rank(), size = transport_.size();
  std::exception_ptr failure;
  EventRecord mine{};
  mine.sync = static_cast<int32_t>(sync);
  std::optional<DeviceGuard> guard;
  try {
    guard.emplace(device_);
    Check(cudaDeviceGetPCIBusId(mine.gpu, sizeof mine.gpu, device_), "cudaDeviceGetPCIBusId");
    constexpr unsigned kFlags = cudaEventDisableTiming | cudaEventInterprocess;
    Check(cudaEventCreateWithFlags(&ready_, kFlags), "cudaEventCreateWithFlags");
    Check(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    if (rank == kLeader) Check(cudaEventCreateWithFlags(&done_, kFlags), "cudaEventCreateWithFlags");
    Check(cudaIpcGetEventHandle(&mine.handle, rank == kLeader ? done_ : ready_), "cudaIpcGetEventHandle");
    mine.ok = 1;
  } catch (...) {
    failure = std::current_exception();
  }
  auto open = [&](const EventRecord& theirs, int peer, cudaEvent_t* event) {
    if (failure) return;
    try {
      if (!theirs.ok) throw CommError("pycomm: rank " + std::to_string(peer) + " could not set up its GPU events");
      Check(cudaIpcOpenEventHandle(event, theirs.handle), "cudaIpcOpenEventHandle");
    } catch (...) {
      failure = std::current_exception();
    }
  };
  try {
    if (rank == kLeader) {
      // Every peer's record first: the answer says how the group orders its work.
      std::vector<EventRecord> records(size);
      records[kLeader] = mine;
      std::vector<std::unique_ptr<Request>> requests;
      for (int peer = 1; peer < size; ++peer) {
        requests.push_back(transport_.Irecv(peer, &records[peer], sizeof(EventRecord)));
      }
      WaitAll(requests, timeout_s_);
      if (sync_ == DeviceSync::kAuto) sync_ = SomeShareAGpu(records) ? DeviceSync::kHost : DeviceSync::kStream;
      mine.sync = static_cast<int32_t>(sync_);
      for (int peer = 1; peer < size; ++peer) requests.push_back(transport_.Isend(peer, &mine, sizeof mine));
      WaitAll(requests, timeout_s_);
      peer_ready_.assign(size, nullptr);
      peer_ready_[kLeader] = ready_;
      for (int peer = 1; peer < size; ++peer) open(records[peer], peer, &peer_ready_[peer]);
    } else {
      EventRecord leaders{};
      Exchange(transport_, kLeader, &mine, sizeof mine, &leaders, sizeof leaders, timeout_s_);
      if (sync_ == DeviceSync::kAuto) sync_ = static_cast<DeviceSync>(leaders.sync);
      open(leaders, kLeader, &done_);
    }
  } catch (...) {  // a rank gone or stalled
    if (!failure) failure = std::current_exception();
  }
  if (failure) {
    ReleaseEvents();
    std::rethrow_exception(failure);
  }
}

DeviceGroup::~DeviceGroup() {
  DeviceGuard guard(device_);
  ReleaseEvents();
}

void DeviceGroup::ReleaseEvents() {
  for (int peer = 0; peer < static_cast<int>(peer_ready_.size()); ++peer) {
    if (peer != kLeader && peer_ready_[peer]) cudaEventDestroy(peer_ready_[peer]);
  }
  if (done_) cudaEventDestroy(done_);
  if (ready_) cudaEventDestroy(ready_);
  if (staging_free_) cudaEventDestroy(staging_free_);
}

void DeviceGroup::Describe(const std::vector<BufferRef>& buffers, cudaStream_t stream, std::vector<IpcBuffer>* out,
                           std::vector<size_t>* staged_at) {
  out->resize(buffers.size());
  staged_at->assign(buffers.size(), SIZE_MAX);
  size_t staged = 0;
  std::vector<bool> direct(buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    // An in-place call names one buffer twice: one export serves both.
    if (i > 0 && direct[i - 1] && buffers[i].ptr == buffers[i - 1].ptr && buffers[i].bytes == buffers[i - 1].bytes) {
      (*out)[i] = (*out)[i - 1];
      direct[i] = true;
      continue;
    }
    direct[i] = buffers[i].bytes == 0 || exporter_.Export(buffers[i].ptr, &(*out)[i]);
    if (!direct[i]) {
      (*staged_at)[i] = staged;
      staged += AlignUp(buffers[i].bytes);
    }
  }
  if (!staged) return;
  char* staging = staging_.Reserve(staged);
  // The previous call's stage-out, possibly on another stream, must finish before this stage-in.
  Check(cudaStreamWaitEvent(stream, staging_free_, 0), "cudaStreamWaitEvent(staging free)");
  IpcBuffer exported;
  if (!exporter_.Export(staging, &exported)) throw CommError("pycomm: cannot export the CUDA staging buffer");
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (direct[i]) continue;
    (*out)[i] = exported;
    (*out)[i].offset += (*staged_at)[i];
    if (buffers[i].read) {
      Check(cudaMemcpyAsync(staging + (*staged_at)[i], buffers[i].ptr, buffers[i].bytes, cudaMemcpyDeviceToDevice,
                            stream),
            "cudaMemcpyAsync(stage in)");
    }
  }
}

void DeviceGroup::After(cudaEvent_t event, cudaStream_t stream, int peer) {
  if (sync_ == DeviceSync::kStream) {
    Check(cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent");
  } else {
    EventRequest request(event, peer);
    Wait(request, timeout_s_);
  }
}

std::string DeviceCall::Describe() const {
  static const char* const kNames[] = {"allreduce", "reduce_scatter", "allgather", "broadcast"};
  std::string out = std::string(kind >= 0 && kind < 4 ? kNames[kind] : "?") + " " +
                    DataTypeName(static_cast<DataType>(dtype)) + " x " + std::to_string(count);
  if (op >= 0) out += std::string(" ") + ReduceOpName(static_cast<ReduceOp>(op));
  if (root >= 0) out += " root " + std::to_string(root);
  return out;
}

const char* DeviceSyncName(DeviceSync sync) {
  return sync == DeviceSync::kStream ? "stream" : sync == DeviceSync::kHost ? "host" : "auto";
}

uint64_t DeviceCall::Signature() const {
  uint64_t hash = 14695981039346656037ull;
  for (uint64_t field : {static_cast<uint64_t>(kind), static_cast<uint64_t>(dtype), static_cast<uint64_t>(op),
                         static_cast<uint64_t>(root), count}) {
    for (int byte = 0; byte < 8; ++byte) {
      hash ^= (field >> (8 * byte)) & 0xFF;
      hash *= 1099511628211ull;
    }
  }
  return hash;
}

void DeviceGroup::Run(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                      const LeaderWork& work, const std::function<void(int trouble)>& agree) {
  DeviceGuard guard(device_);
  const int rank = transport_.rank(), size = transport_.size();
  const size_t message_bytes = kHeaderBytes + buffers.size() * sizeof(IpcBuffer);

  if (rank != kLeader) {
    std::vector<char> message(message_bytes, 0);
    Header header{0, static_cast<int32_t>(sync_), call};
    std::vector<size_t> staged_at;
    std::exception_ptr failure;
    try {
      std::vector<IpcBuffer> mine;
      Describe(buffers, stream, &mine, &staged_at);
      if (sync_ == DeviceSync::kStream) {
        Check(cudaEventRecord(ready_, stream), "cudaEventRecord(ready)");
      } else {
        Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      }
      header.status = 1;
      std::memcpy(message.data() + kHeaderBytes, mine.data(), mine.size() * sizeof(IpcBuffer));
    } catch (...) {
      failure = std::current_exception();
    }
    std::memcpy(message.data(), &header, sizeof header);
    const char answer = exchange_.Hand(message.data(), message_bytes);
    if (failure) std::rethrow_exception(failure);
    if (answer == kMismatch) {
      throw MismatchError("pycomm: the ranks made different device calls (" + call.Describe() +
                          " here; the leader's error names them)");
    }
    if (answer != kDone) throw CommError("pycomm: the collective failed on another rank (see its error)");
    // The leader recorded `done` before telling us, so this waits for this call's work.
    After(done_, stream, kLeader);
    bool staged = false;
    for (size_t i = 0; i < buffers.size(); ++i) {
      if (staged_at[i] == SIZE_MAX) continue;
      staged = true;
      if (buffers[i].written) {
        Check(cudaMemcpyAsync(buffers[i].ptr, staging_.get() + staged_at[i], buffers[i].bytes, cudaMemcpyDeviceToDevice,
                              stream),
              "cudaMemcpyAsync(stage out)");
      }
    }
    if (staged) Check(cudaEventRecord(staging_free_, stream), "cudaEventRecord(staging free)");
    return;
  }

  // The leader: its own buffers need no IPC; every peer's arrive as handles.
  std::vector<std::vector<char>> messages;
  std::vector<std::vector<void*>> mapped(size, std::vector<void*>(buffers.size()));
  std::exception_ptr failure;
  Answer answer = kDone;
  // The first failure decides the answer; a MismatchError is answered as such. Every failure
  // still reaches the agreement with other nodes and the answer to this node's peers.
  auto fail = [&](Answer why) {
    if (!failure) {
      failure = std::current_exception();
      answer = why;
    }
  };
  // Everything that can fail goes before the agreement with other nodes (which then hear of it),
  // the peers' buffers mapped included.
  try {
    exchange_.Collect(&messages, message_bytes);
    for (int peer = 1; peer < size; ++peer) {
      Header header;
      std::memcpy(&header, messages[peer].data(), sizeof header);
      if (!(header.call == call)) {
        throw MismatchError("pycomm: the ranks made different device calls: rank " + std::to_string(peer) + " " +
                            header.call.Describe() + ", rank " + std::to_string(kLeader) + " " + call.Describe());
      }
      if (header.sync != static_cast<int32_t>(sync_)) {
        throw MismatchError("pycomm: PYCOMM_GPU_SYNC differs between rank " + std::to_string(peer) + " and rank " +
                            std::to_string(kLeader) + " (host or stream: set it alike on every rank)");
      }
      if (header.status != 1) {
        throw CommError("pycomm: rank " + std::to_string(peer) +
                        " could not prepare its device buffers (see its error)");
      }
    }
    for (size_t i = 0; i < buffers.size(); ++i) mapped[kLeader][i] = buffers[i].ptr;
    for (int peer = 1; peer < size; ++peer) {
      const auto* records = reinterpret_cast<const IpcBuffer*>(messages[peer].data() + kHeaderBytes);
      for (size_t i = 0; i < buffers.size(); ++i) {
        IpcBuffer record;
        std::memcpy(&record, records + i, sizeof record);
        mapped[peer][i] = buffers[i].bytes ? importer_.Open(record) : nullptr;
      }
    }
  } catch (const MismatchError&) {
    fail(kMismatch);
  } catch (...) {
    fail(kFailed);
  }
  if (agree) {
    try {
      agree(!failure ? 0 : answer == kMismatch ? 2 : 1);
    } catch (const MismatchError&) {
      fail(kMismatch);
    } catch (...) {
      fail(kFailed);
    }
  }
  if (!failure) {
    try {
      // With stream sync each peer recorded `ready` before handing its buffers over, so this
      // waits for its inputs; with host sync they were complete before it did.
      if (sync_ == DeviceSync::kStream) {
        for (int peer = 1; peer < size; ++peer) After(peer_ready_[peer], stream, peer);
      }
      work(mapped, stream);
      Check(cudaEventRecord(done_, stream), "cudaEventRecord(done)");
    } catch (...) {
      fail(kFailed);
    }
  }
  exchange_.Answer(answer);
  if (failure) std::rethrow_exception(failure);
}

void DeviceGroup::Quiesce() {
  DeviceGuard guard(device_);
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  // A barrier through the leader: nobody destroys events or unmaps buffers that a peer's queued
  // work may still use.
  char token = 1, reply = 0;
  if (transport_.rank() != kLeader) {
    Exchange(transport_, kLeader, &token, 1, &reply, 1, timeout_s_);
    return;
  }
  std::vector<char> arrived(transport_.size());
  std::vector<std::unique_ptr<Request>> requests;
  for (int peer = 1; peer < transport_.size(); ++peer) requests.push_back(transport_.Irecv(peer, &arrived[peer], 1));
  WaitAll(requests, timeout_s_);
  for (int peer = 1; peer < transport_.size(); ++peer) requests.push_back(transport_.Isend(peer, &token, 1));
  WaitAll(requests, timeout_s_);
}

}  // namespace pycomm::cuda
