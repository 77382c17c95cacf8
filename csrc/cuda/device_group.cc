#include "cuda/device_group.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <optional>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/driver.h"
#include "cuda/event_request.h"
#include "transport/wait.h"

namespace pycomm::cuda {

namespace {

constexpr size_t kStagingAlign = 256;
// Retired allocations (see ipc_memory.h) a message carries at most: a rank that frees more at
// once sends them over several calls.
constexpr int kRetiredPerCall = 4;
// Every message to the leader starts with a header: a status (so that a rank that failed to
// prepare its buffers fails the call on every rank at once instead of leaving them to time out),
// the call, and the sender's retired allocations; then the IPC records, 8-byte aligned.
struct Header {
  int32_t status;
  int32_t retired_count;
  DeviceCall call;
  cudaIpcMemHandle_t retired[kRetiredPerCall];
};
constexpr size_t kHeaderBytes = sizeof(Header);
static_assert(kHeaderBytes % 8 == 0, "IPC records stay 8-byte aligned");

// The leader's answer. kUnheard: failed, and some rank's message never reached the leader (split
// work's hand-offs tell it apart; it reads as kFailed everywhere else).
enum Answer : char { kFailed = 0, kDone = 1, kMismatch = LeaderExchange::kMismatch, kUnheard = 3 };

// After a failed call: the call's own error is the one to tell, so a failure here is dropped
// (and cleared, as Check does).
void RecordAfterFailure(cudaEvent_t event, cudaStream_t stream) {
  if (cudaEventRecord(event, stream) != cudaSuccess) cudaGetLastError();
}

size_t AlignUp(size_t n) { return (n + kStagingAlign - 1) / kStagingAlign * kStagingAlign; }

void Exchange(Transport& transport, int peer, const void* send, size_t send_bytes, void* recv, size_t recv_bytes,
              double timeout_s) {
  std::unique_ptr<Request> r, s;
  if (recv_bytes) r = transport.Irecv(peer, recv, recv_bytes);
  if (send_bytes) s = transport.Isend(peer, send, send_bytes);
  if (s) Wait(*s, timeout_s);
  if (r) Wait(*r, timeout_s);
}

// What each rank sends in the constructor's one exchange with the leader: its IPC events, or that
// it could not make them, so that the exchange completes on every rank either way; and which GPU
// it is on, so that the leader can tell whether ranks share one. The leader answers with every
// rank's record, its own saying what the group uses.
struct EventRecord {
  int32_t ok;
  int32_t sync;      // DeviceSync
  int32_t work;      // DeviceWork
  int32_t mismatch;  // the leader's: the ranks asked for settings that conflict
  int32_t ipc;       // it could export its events and memory (`probe`, a buffer for others to open)
  char gpu[32];      // PCI bus id
  cudaIpcEventHandle_t ready, done;
  IpcBuffer probe;
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

// What the ranks asked for together: a value some rank set (auto where none did), or
// MismatchError where two set different ones.
template <typename Setting>
Setting Together(const std::vector<EventRecord>& records, int32_t EventRecord::* field, Setting automatic,
                 const char* name) {
  Setting chosen = automatic;
  for (size_t q = 0; q < records.size(); ++q) {
    const auto asked = static_cast<Setting>(records[q].*field);
    if (!records[q].ok || asked == automatic) continue;
    if (chosen != automatic && asked != chosen) {
      throw MismatchError(std::string("pycomm: ") + name + " differs between ranks of a node (rank " +
                          std::to_string(q) + " and a lower one): set it alike on every rank");
    }
    chosen = asked;
  }
  return chosen;
}

// The leader's decision from every rank's record (each as asked for on its rank): throws where
// the ranks asked for conflicting things, or for what cannot be.
void Decide(const std::vector<EventRecord>& records, DeviceSync* sync, DeviceWork* work) {
  *sync = Together(records, &EventRecord::sync, DeviceSync::kAuto, "PYCOMM_GPU_SYNC");
  *work = Together(records, &EventRecord::work, DeviceWork::kAuto, "PYCOMM_GPU_WORK");
  const bool shared = SomeShareAGpu(records);
  if (*work == DeviceWork::kSplit) {
    if (*sync == DeviceSync::kHost) {
      throw std::invalid_argument("pycomm: PYCOMM_GPU_WORK=split needs PYCOMM_GPU_SYNC=stream or auto, not host");
    }
    *sync = DeviceSync::kStream;
  }
  if (*sync == DeviceSync::kAuto) *sync = shared ? DeviceSync::kHost : DeviceSync::kStream;
  if (*work == DeviceWork::kAuto) {
    *work = !shared && *sync == DeviceSync::kStream ? DeviceWork::kSplit : DeviceWork::kLeader;
  }
}

}  // namespace

DeviceGroup::DeviceGroup(Transport& transport, uint64_t* arena_seq, int device, double timeout_s, DeviceSync sync,
                         DeviceWork work)
    : transport_(transport),
      exchange_(transport, arena_seq, timeout_s),
      device_(device),
      timeout_s_(timeout_s),
      sync_(sync),
      work_(work) {
  const int rank = transport_.rank(), size = transport_.size();
  std::exception_ptr failure;
  EventRecord mine{};
  mine.sync = static_cast<int32_t>(sync);
  mine.work = static_cast<int32_t>(work);
  std::optional<DeviceGuard> guard;
  try {
    guard.emplace(device_);
    importer_ = IpcImporter::OfCurrentContext();
    Check(cudaDeviceGetPCIBusId(mine.gpu, sizeof mine.gpu, device_), "cudaDeviceGetPCIBusId");
    constexpr unsigned kFlags = cudaEventDisableTiming | cudaEventInterprocess;
    Check(cudaEventCreateWithFlags(&ready_, kFlags), "cudaEventCreateWithFlags");
    Check(cudaEventCreateWithFlags(&done_, kFlags), "cudaEventCreateWithFlags");
    Check(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    // What CUDA IPC needs is tried apart from the rest: where it fails (containers without a
    // shared IPC namespace, GPUs without peer access) the group is built, but without IPC.
    mine.ipc = cudaIpcGetEventHandle(&mine.ready, ready_) == cudaSuccess &&
               cudaIpcGetEventHandle(&mine.done, done_) == cudaSuccess &&
               exporter_.Export(staging_.Reserve(1), &mine.probe);
    if (!mine.ipc) cudaGetLastError();
    mine.ok = 1;
  } catch (...) {
    failure = std::current_exception();
  }
  std::vector<EventRecord> records(size);
  try {
    if (rank == kLeader) {
      // Every peer's record first: the answer says how the group orders and shares its work.
      records[kLeader] = mine;
      std::vector<std::unique_ptr<Request>> requests;
      for (int peer = 1; peer < size; ++peer) {
        requests.push_back(transport_.Irecv(peer, &records[peer], sizeof(EventRecord)));
      }
      WaitAll(requests, timeout_s_);
      try {
        Decide(records, &sync_, &work_);
      } catch (const MismatchError&) {
        records[kLeader].mismatch = 1;
        if (!failure) failure = std::current_exception();
      } catch (...) {
        if (!failure) failure = std::current_exception();
      }
      records[kLeader].ok = !failure;
      records[kLeader].sync = static_cast<int32_t>(sync_);
      records[kLeader].work = static_cast<int32_t>(work_);
      for (int peer = 1; peer < size; ++peer) {
        requests.push_back(transport_.Isend(peer, records.data(), records.size() * sizeof(EventRecord)));
      }
      WaitAll(requests, timeout_s_);
    } else {
      Exchange(transport_, kLeader, &mine, sizeof mine, records.data(), records.size() * sizeof(EventRecord),
               timeout_s_);
      sync_ = static_cast<DeviceSync>(records[kLeader].sync);
      work_ = static_cast<DeviceWork>(records[kLeader].work);
    }
  } catch (...) {  // a rank gone or stalled
    if (!failure) failure = std::current_exception();
  }
  // The events this rank waits for, and a buffer of each rank whose buffers it reads.
  peer_ready_.assign(size, nullptr);
  peer_done_.assign(size, nullptr);
  for (int peer = 0; peer < size && !failure; ++peer) {
    if (peer == rank || !(work_ == DeviceWork::kSplit || rank == kLeader || peer == kLeader)) continue;
    try {
      if (records[peer].mismatch) {
        throw MismatchError(
            "pycomm: PYCOMM_GPU_SYNC or PYCOMM_GPU_WORK differs between ranks of this node (the "
            "error of the node's first rank says which)");
      }
      if (!records[peer].ok) {
        throw CommError("pycomm: rank " + std::to_string(peer) + " of the node could not set up (see its error)");
      }
      if (ipc_)
        ipc_ = records[peer].ipc && OpenFrom(peer, records[peer].ready, records[peer].done, records[peer].probe);
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (failure) {
    // While `guard` still holds the GPU: the members' destructors run after it has gone.
    ReleaseEvents();
    if (importer_) importer_->Release(this);
    staging_.Release();
    std::rethrow_exception(failure);
  }
}

bool DeviceGroup::OpenFrom(int peer, const cudaIpcEventHandle_t& ready, const cudaIpcEventHandle_t& done,
                           const IpcBuffer& probe) {
  const bool split = work_ == DeviceWork::kSplit;
  const bool reads = split || transport_.rank() == kLeader;  // waits for its `ready`, reads its buffers
  const bool waits_done = split || peer == kLeader;
  try {
    if (reads) {
      Check(cudaIpcOpenEventHandle(&peer_ready_[peer], ready), "cudaIpcOpenEventHandle");
      importer_->Open(probe, this);  // mapped like any buffer of the peer's
    }
    if (waits_done) Check(cudaIpcOpenEventHandle(&peer_done_[peer], done), "cudaIpcOpenEventHandle");
  } catch (const CommError&) {
    cudaGetLastError();
    return false;
  }
  return true;
}

DeviceGroup::~DeviceGroup() {
  // A destructor must not throw: where the GPU cannot be made current (after a sticky error,
  // say), what it frees goes from whichever context is current.
  std::exception_ptr unused;
  DeviceGuard guard(device_, &unused);
  ReleaseEvents();
  for (const RetiredStaging& old : retired_staging_) cudaFree(old.ptr);
  // Where this was the importer's last group, its mappings close now, on this GPU.
  if (importer_) importer_->Release(this);
  importer_.reset();
}

void DeviceGroup::LeaveWorkToLeader() {
  if (work_ == DeviceWork::kLeader) return;
  DeviceGuard guard(device_);
  work_ = DeviceWork::kLeader;
  // At set-up: no work is queued yet that could use them.
  const int rank = transport_.rank();
  for (int peer = 0; peer < static_cast<int>(peer_ready_.size()); ++peer) {
    for (cudaEvent_t* event :
         {rank != kLeader ? &peer_ready_[peer] : nullptr, peer != kLeader ? &peer_done_[peer] : nullptr}) {
      if (event && *event) cudaEventDestroy(*event);
      if (event) *event = nullptr;
    }
  }
  if (rank != kLeader) importer_->Release(this);
}

void DeviceGroup::ReleasePeerEvents() {
  for (auto* events : {&peer_ready_, &peer_done_}) {
    for (cudaEvent_t event : *events) {
      if (event) cudaEventDestroy(event);
    }
    events->clear();
  }
}

void DeviceGroup::ReleaseEvents() {
  ReleasePeerEvents();
  for (cudaEvent_t* event : {&ready_, &done_, &staging_free_}) {
    if (*event) cudaEventDestroy(*event);
    *event = nullptr;
  }
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
  char* superseded = nullptr;
  char* staging = staging_.Reserve(staged, &superseded);
  if (superseded) {
    // Peers may still have the old buffer open: it is freed once they have closed it. They close
    // it when this call tells them to, so their work on it must have run by then: waiting for
    // this GPU waits for it (this rank's stream waited for theirs, or its host did).
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    RetiredStaging old{superseded, {}, false};
    old.exported = exporter_.Retire(superseded, &old.handle);
    retired_staging_.push_back(old);
  }
  // The previous call's stage-out, possibly on another stream, must finish before this stage-in.
  Check(cudaStreamWaitEvent(stream, staging_free_, 0), "cudaStreamWaitEvent(staging free)");
  // From here on, should the call fail, `stream` marks the staging free (Run): it has waited.
  staged_this_call_ = true;
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

void DeviceGroup::AfterPeersOfFailedCall(cudaStream_t stream) {
  for (int q = 0; q < transport_.size(); ++q) {
    if (!peer_done_[q]) continue;  // a rank this one never waits for (the leader's peers)
    try {
      After(peer_done_[q], stream, q);
    } catch (...) {
    }
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

const char* DeviceWorkName(DeviceWork work) {
  return work == DeviceWork::kSplit ? "split" : work == DeviceWork::kLeader ? "leader" : "auto";
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

void DeviceGroup::StageOut(const std::vector<BufferRef>& buffers, const std::vector<size_t>& staged_at,
                           cudaStream_t stream) {
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
}

std::exception_ptr DeviceGroup::Prepare(const DeviceCall& call, const std::vector<BufferRef>& buffers,
                                        cudaStream_t stream, const std::exception_ptr& unready,
                                        std::vector<char>* message, std::vector<size_t>* staged_at, PhaseClock& clock) {
  message->assign(kHeaderBytes + buffers.size() * sizeof(IpcBuffer), 0);
  Header header{};
  header.call = call;
  std::exception_ptr failure;
  try {
    if (unready) std::rethrow_exception(unready);
    std::vector<IpcBuffer> mine;
    exporter_.Sweep();
    Describe(buffers, stream, &mine, staged_at);
    sent_retired_ = exporter_.TakeRetired(kRetiredPerCall);
    header.retired_count = static_cast<int32_t>(sent_retired_.size());
    std::copy(sent_retired_.begin(), sent_retired_.end(), header.retired);
    clock.Lap("prepare: export the buffers");
    if (sync_ == DeviceSync::kStream) {
      Check(cudaEventRecord(ready_, stream), "cudaEventRecord(ready)");
      clock.Lap("prepare: record ready");
    } else {
      Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      clock.Lap("prepare: wait for the own stream");
    }
    header.status = 1;
    std::memcpy(message->data() + kHeaderBytes, mine.data(), mine.size() * sizeof(IpcBuffer));
  } catch (...) {
    failure = std::current_exception();
  }
  std::memcpy(message->data(), &header, sizeof header);
  return failure;
}

void DeviceGroup::CheckCalls(const DeviceCall& call, const std::vector<std::vector<char>>& messages) const {
  for (int peer = 1; peer < static_cast<int>(messages.size()); ++peer) {
    Header header;
    std::memcpy(&header, messages[peer].data(), sizeof header);
    if (!(header.call == call)) {
      throw MismatchError("pycomm: the ranks made different device calls: rank " + std::to_string(peer) + " " +
                          header.call.Describe() + ", rank " + std::to_string(kLeader) + " " + call.Describe());
    }
    if (header.status != 1) {
      throw CommError("pycomm: rank " + std::to_string(peer) + " could not prepare its device buffers (see its error)");
    }
  }
}

void DeviceGroup::Run(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                      const GroupWork& work, const CrossNodeAgreement& agree) {
  if (quiesced_) throw CommError("pycomm: the device collectives are closed");
  if (!ipc_) throw std::logic_error("pycomm: a device group without CUDA IPC was used");
  PhaseClock clock;
  std::exception_ptr unready;
  DeviceGuard guard(device_, &unready);
  IpcImporter::Imports imports(*importer_, this);
  staged_this_call_ = false;
  clock.Lap("all: make the GPU current");
  try {
    if (work_ == DeviceWork::kSplit) {
      RunSplit(call, buffers, stream, work, agree, unready, imports, clock);
    } else {
      RunLeader(call, buffers, stream, work, agree, unready, imports, clock);
    }
  } catch (...) {
    // What the failed call queued into staging (its stage-in, others' work, waited for above)
    // goes before the next call's stage-in, on whatever stream, as after StageOut.
    if (staged_this_call_) RecordAfterFailure(staging_free_, stream);
    SettleRetired(false);
    throw;
  }
  SettleRetired(true);
}

void DeviceGroup::CloseRetired(const char* message) {
  Header header;
  std::memcpy(&header, message, sizeof header);
  importer_->Close(header.retired, std::clamp(header.retired_count, 0, kRetiredPerCall));
}

void DeviceGroup::SettleRetired(bool delivered) {
  if (!delivered) {
    exporter_.Requeue(sent_retired_);
    sent_retired_.clear();
    return;
  }
  auto heard = [&](const RetiredStaging& old) {
    if (!old.exported) return true;
    for (const cudaIpcMemHandle_t& sent : sent_retired_) {
      if (std::memcmp(&sent, &old.handle, sizeof sent) == 0) return true;
    }
    return false;
  };
  for (auto it = retired_staging_.begin(); it != retired_staging_.end();) {
    if (!heard(*it)) {
      ++it;
      continue;
    }
    cudaFree(it->ptr);  // after this call's queued work, which may still stage out of it
    it = retired_staging_.erase(it);
  }
  sent_retired_.clear();
}

void DeviceGroup::RunLeader(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                            const GroupWork& work, const CrossNodeAgreement& agree, const std::exception_ptr& unready,
                            IpcImporter::Imports& imports, PhaseClock& clock) {
  const int rank = transport_.rank(), size = transport_.size();
  const size_t message_bytes = kHeaderBytes + buffers.size() * sizeof(IpcBuffer);

  if (rank != kLeader) {
    std::vector<char> message;
    std::vector<size_t> staged_at;
    const std::exception_ptr failure = Prepare(call, buffers, stream, unready, &message, &staged_at, clock);
    const char answer = exchange_.Hand(message.data(), message_bytes);
    clock.Lap("peer: hand over, until the leader's answer");
    // The leader works only for calls every rank prepared, and may have queued part of it.
    if (answer == kFailed && !failure) AfterPeersOfFailedCall(stream);
    if (failure) std::rethrow_exception(failure);
    if (answer == kMismatch) {
      throw MismatchError("pycomm: the ranks made different device calls (" + call.Describe() +
                          " here; the leader's error names them)");
    }
    if (answer != kDone) throw CommError("pycomm: the collective failed on another rank (see its error)");
    // The leader recorded `done` before telling us, so this waits for this call's work.
    After(peer_done_[kLeader], stream, kLeader);
    clock.Lap("peer: wait for the leader's work");
    StageOut(buffers, staged_at, stream);
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
    clock.Lap("leader: collect the peers' hand-offs");
    if (unready) std::rethrow_exception(unready);
    for (int peer = 1; peer < size; ++peer) CloseRetired(messages[peer].data());
    CheckCalls(call, messages);
    for (size_t i = 0; i < buffers.size(); ++i) mapped[kLeader][i] = buffers[i].ptr;
    for (int peer = 1; peer < size; ++peer) {
      const auto* records = reinterpret_cast<const IpcBuffer*>(messages[peer].data() + kHeaderBytes);
      for (size_t i = 0; i < buffers.size(); ++i) {
        IpcBuffer record;
        std::memcpy(&record, records + i, sizeof record);
        mapped[peer][i] = buffers[i].bytes ? imports.Open(record) : nullptr;
      }
    }
    if (agree) agree.prepare(WorkPart{});
    clock.Lap("leader: check the calls, map the buffers");
  } catch (const MismatchError&) {
    fail(kMismatch);
  } catch (...) {
    fail(kFailed);
  }
  if (agree) {
    try {
      agree.agree(!failure ? 0 : answer == kMismatch ? 2 : 1, WorkPart{});
      clock.Lap("leader: agree with other nodes");
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
      work(mapped, WorkPart{}, stream);
      clock.Lap("leader: queue the work");
      Check(cudaEventRecord(done_, stream), "cudaEventRecord(done)");
      imports.Done();  // before the answer: peers may free their buffers once they have it
      clock.Lap("leader: record done");
    } catch (...) {
      fail(kFailed);
      RecordAfterFailure(done_, stream);  // for what `work` queued before it failed
    }
  }
  exchange_.Answer(answer);
  clock.Lap("leader: answer");
  if (failure) std::rethrow_exception(failure);
}

char DeviceGroup::ExchangeAll(const std::vector<char>& message, std::vector<char>* table,
                              const std::function<void(const std::vector<std::vector<char>>&)>& check,
                              const std::exception_ptr& failure, std::exception_ptr* error, bool* heard) {
  const int size = transport_.size();
  const size_t bytes = message.size();
  table->assign(size * bytes, 0);
  char answer = failure ? kFailed : kDone;
  bool collected = false;
  if (heard) *heard = false;
  try {
    if (transport_.rank() != kLeader) {
      answer = exchange_.Hand(message.data(), bytes, table->data(), table->size());
      // kMismatch: maybe a rank in another call, never heard (in the status hand-off, where
      // `heard` is asked for, nothing else gives it).
      if (heard) *heard = answer == kDone || answer == kFailed;
      return answer == kUnheard ? static_cast<char>(kFailed) : answer;
    }
    std::vector<std::vector<char>> messages;
    exchange_.Collect(&messages, bytes, table->size());
    collected = true;
    messages[kLeader] = message;
    check(messages);
    for (int q = 0; q < size; ++q) std::memcpy(table->data() + q * bytes, messages[q].data(), bytes);
  } catch (const MismatchError&) {
    *error = std::current_exception();
    if (answer == kDone) answer = kMismatch;
  } catch (...) {
    *error = std::current_exception();
    answer = kFailed;
  }
  if (transport_.rank() == kLeader) {
    try {
      // No reply where the call fails: a peer stalled past the time-out may still be reading the
      // last one.
      exchange_.Answer(answer == kFailed && !collected ? static_cast<char>(kUnheard) : answer,
                       answer == kDone ? table->data() : nullptr);
      if (heard) *heard = collected;
    } catch (...) {  // a peer gone: the call fails here too
      if (!*error) *error = std::current_exception();
      answer = kFailed;
    }
  }
  return answer;
}

void DeviceGroup::RunSplit(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                           const GroupWork& work, const CrossNodeAgreement& agree, const std::exception_ptr& unready,
                           IpcImporter::Imports& imports, PhaseClock& clock) {
  const int rank = transport_.rank(), size = transport_.size();
  const size_t message_bytes = kHeaderBytes + buffers.size() * sizeof(IpcBuffer);
  // 1. Every rank's buffers (and that its inputs are ready) to every rank, the calls checked.
  std::vector<char> message;
  std::vector<size_t> staged_at;
  std::exception_ptr failure = Prepare(call, buffers, stream, unready, &message, &staged_at, clock);
  std::vector<char> table;
  std::exception_ptr checked;  // the leader's check's error, or this rank's hand-off's
  const char answer = ExchangeAll(
      message, &table, [&](const std::vector<std::vector<char>>& all) { CheckCalls(call, all); }, failure, &checked);
  clock.Lap("split: exchange the buffers");
  const WorkPart part{rank, size, true};
  if (failure || checked || answer != kDone) {
    // Other nodes hear of it before this node gives up (they would otherwise wait for it).
    if (agree) {
      try {
        agree.agree(answer == kMismatch ? 2 : 1, part);
      } catch (...) {  // this node's own error is the one to tell
      }
    }
    if (failure) std::rethrow_exception(failure);
    if (checked) std::rethrow_exception(checked);
    if (answer == kMismatch) {
      throw MismatchError("pycomm: the ranks made different device calls (" + call.Describe() +
                          " here; the leader's error names them)");
    }
    throw CommError("pycomm: the collective failed on another rank (see its error)");
  }

  // 2. Every rank maps the others' buffers, agrees with other nodes (the node's verdict first),
  //    queues its part after every rank's `ready`, then records its `done`.
  std::vector<std::vector<void*>> mapped(size, std::vector<void*>(buffers.size()));
  int32_t queued = 0;
  try {
    for (int q = 0; q < size; ++q) {
      if (q != rank) CloseRetired(table.data() + q * message_bytes);
    }
    for (int q = 0; q < size; ++q) {
      const auto* records = reinterpret_cast<const IpcBuffer*>(table.data() + q * message_bytes + kHeaderBytes);
      for (size_t i = 0; i < buffers.size(); ++i) {
        if (q == rank) {
          // Where the other ranks reach this buffer: this rank's part must go there too.
          mapped[q][i] = staged_at[i] == SIZE_MAX ? buffers[i].ptr : staging_.get() + staged_at[i];
          continue;
        }
        IpcBuffer record;
        std::memcpy(&record, records + i, sizeof record);
        mapped[q][i] = buffers[i].bytes ? imports.Open(record) : nullptr;
      }
    }
  } catch (...) {
    failure = std::current_exception();
  }
  clock.Lap("split: map the buffers");
  if (agree) {
    if (!failure) {
      try {
        agree.prepare(part);
      } catch (...) {
        failure = std::current_exception();
      }
    }
    // The node's verdict first, so that every rank of it tells each of its links the same: no
    // link then goes on to move data while another, on some rank, stops.
    std::vector<char> ready(1, failure ? 0 : 1), all_ready;
    std::exception_ptr handoff;  // this hand-off's own failure, if any: a failed verdict
    const char verdict = ExchangeAll(
        ready, &all_ready,
        [&](const std::vector<std::vector<char>>& all) {
          for (int q = 1; q < size; ++q) {
            if (all[q][0] != 1) throw CommError("pycomm: rank " + std::to_string(q) + " could not prepare");
          }
        },
        failure, &handoff);
    try {
      agree.agree(verdict == kDone && !failure ? 0 : 1, part);
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
    if (!failure && handoff) failure = handoff;
    if (!failure && verdict != kDone) {
      failure = std::make_exception_ptr(CommError("pycomm: the collective failed on another rank (see its error)"));
    }
    clock.Lap("split: agree with other nodes");
  }
  if (!failure) {
    try {
      for (int q = 0; q < size; ++q) {
        if (q != rank) After(peer_ready_[q], stream, q);
      }
      work(mapped, part, stream);
      Check(cudaEventRecord(done_, stream), "cudaEventRecord(done)");
      imports.Done();  // before the last hand-off: peers may free their buffers after it
      queued = 1;
      clock.Lap("split: queue the part");
    } catch (...) {
      failure = std::current_exception();
      RecordAfterFailure(done_, stream);  // for what `work` queued before it failed
    }
  }
  std::vector<char> status(sizeof queued), statuses;
  bool heard = false;
  std::memcpy(status.data(), &queued, sizeof queued);
  const char all_queued = ExchangeAll(
      status, &statuses,
      [&](const std::vector<std::vector<char>>& all) {
        for (int q = 1; q < size; ++q) {
          int32_t theirs;
          std::memcpy(&theirs, all[q].data(), sizeof theirs);
          if (theirs != 1) throw CommError("pycomm: rank " + std::to_string(q) + " could not queue its device work");
        }
      },
      failure, &checked, &heard);
  clock.Lap("split: exchange the statuses");
  if (failure || checked || all_queued != kDone) {
    if (heard) AfterPeersOfFailedCall(stream);
    if (failure) std::rethrow_exception(failure);
    if (checked) std::rethrow_exception(checked);
    throw CommError("pycomm: the collective failed on another rank (see its error)");
  }

  // 3. This rank's outputs are whole once every rank's part is done.
  for (int q = 0; q < size; ++q) {
    if (q != rank) After(peer_done_[q], stream, q);
  }
  clock.Lap("split: wait for the others' parts");
  StageOut(buffers, staged_at, stream);
}

void DeviceGroup::Quiesce() {
  std::exception_ptr unready;
  DeviceGuard guard(device_, &unready);
  if (unready) {
    // This rank can neither wait for its GPU nor close what it opened of others': it tells them
    // at the first meeting, so that none waits out the time-out for it, nor frees what it still
    // has open (every rank then keeps its GPU state to the end of the process).
    try {
      MeetAll(false);
    } catch (...) {  // its own error is the one to tell
    }
    std::rethrow_exception(unready);
  }
  // Every rank first: one that is gone or stuck fails this within the time-out, before this rank
  // waits for its GPU, whose queued work may wait forever for the missing rank's.
  if (!MeetAll(true)) {
    throw CommError("pycomm: another rank could not close its device collectives (see its error)");
  }
  // Every peer has now queued all it ever will, so the last records of its events are final.
  // Once they have completed (a timed wait on the host), every wait this rank's streams made on
  // them is met, and the device synchronisation below waits for this rank's own work only, not
  // forever for a rank that died after the meeting.
  for (int peer = 0; peer < static_cast<int>(peer_ready_.size()); ++peer) {
    for (cudaEvent_t event : {peer_ready_[peer], peer_done_[peer]}) {
      if (!event) continue;
      EventRequest finished(event, peer);
      Wait(finished, timeout_s_);
    }
  }
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  quiesced_ = true;
  importer_->Release(this);
  ReleasePeerEvents();
  // Then nobody destroys events or frees buffers that a peer's queued work may still use, or
  // that a peer still has open.
  MeetAll(true);
}

bool DeviceGroup::MeetAll(bool ok) {
  char token = ok ? 1 : 0, reply = 0;
  if (transport_.rank() != kLeader) {
    Exchange(transport_, kLeader, &token, 1, &reply, 1, timeout_s_);
    return reply == 1;
  }
  std::vector<char> arrived(transport_.size());
  std::vector<std::unique_ptr<Request>> requests;
  for (int peer = 1; peer < transport_.size(); ++peer) requests.push_back(transport_.Irecv(peer, &arrived[peer], 1));
  WaitAll(requests, timeout_s_);
  requests.clear();
  for (int peer = 1; peer < transport_.size(); ++peer) token = token && arrived[peer] == 1 ? 1 : 0;
  for (int peer = 1; peer < transport_.size(); ++peer) requests.push_back(transport_.Isend(peer, &token, 1));
  WaitAll(requests, timeout_s_);
  return token == 1;
}

}  // namespace pycomm::cuda
