// Memory that every rank of one node maps, with a sequence-numbered flag per rank: what the
// intra-node algorithms (the one-shots, the agreement rounds, the device hand-offs) exchange data
// through, instead of messages.
//
// Layout: a flag (and what the call is) per rank on its own cache lines, then 2 slots per rank (double buffering: a
// slot written at call k was last read at call k-2, which every rank has left before any rank
// can finish call k-1).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

// Bytes per rank per slot of the arenas that transports create: the largest message (or piece
// of one) that a one-shot moves in one round.
constexpr size_t kArenaSlotBytes = size_t{256} << 10;

class PeerWatch;

class SharedArena {
 public:
  // Bytes of shared memory an arena of `size` ranks with `slot_bytes` slots needs.
  static size_t BytesFor(int size, size_t slot_bytes);

  // `base` must hold BytesFor(size, slot_bytes) zeroed bytes mapped by every rank; `keep_alive`
  // owns the mapping (unmaps it when the arena goes).
  SharedArena(void* base, int rank, int size, size_t slot_bytes, std::shared_ptr<void> keep_alive);
  // Leaves (below): the arena goes when its communicator closes or its process exits.
  ~SharedArena();
  SharedArena(const SharedArena&) = delete;
  SharedArena& operator=(const SharedArena&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  size_t slot_bytes() const { return slot_bytes_; }
  char* slot(int rank, uint64_t seq) const;

  // What a rank says about the call it is making, so that ranks can check they agree.
  // Which step posts: ranks on different steps (say, configured with different algorithms)
  // must see a mismatch, not read each other's unrelated data.
  // kAgreement: a call that then moves its data over the transport only checks here.
  // kHierarchical: a node round of the hierarchical allreduce (on the node's own arena).
  enum Kind : uint16_t {
    kOneShot = 1,
    kLargeAllreduce = 2,
    kAllocate = 3,
    kAgreement = 4,
    kHierarchical = 5,
    kSingleCopy = 6,
    kDeviceHandoff = 7,    // a device collective's hand-off to its leader (leader_exchange.h)
    kDeviceAgreement = 8,  // a device collective's agreement where every rank is its own group
  };

  struct CallInfo {
    uint64_t count;  // elements (bytes for kAllocate)
    int32_t dtype;
    int32_t op;
    // Where the call's data lives when it is in a SharedBuffer (id 0: it is not).
    uint32_t shared_id;
    uint16_t in_place;
    uint16_t kind;
    uint64_t shared_offset;  // from the start of the rank's region
    int32_t root = -1;       // broadcast root
    int32_t call_kind = 0;   // CallKind (core/agreement.h), 0 for kAllocate
    uint64_t call = 0;       // the call's number on its communicator
    int32_t variant = 0;     // how the step moves data where it has choices (CallHeader::variant)
  };

  // Publishes this rank's slot and `info` for call `seq` (release).
  void Post(uint64_t seq, const CallInfo& info);
  // Rank `rank`'s info for call `seq`; valid once WaitAll(seq) has returned, until call seq + 2.
  CallInfo info(int rank, uint64_t seq) const;
  // Waits until every rank has posted `seq` (acquire); PeerError naming a late rank after
  // timeout_s.
  void WaitAll(uint64_t seq, double timeout_s) const;
  // The last round `rank` has posted (acquire). Read after info(rank, seq) and equal to seq, it
  // says that info was not being overwritten by the round two after (a sequence lock).
  uint64_t posted(int rank) const;
  // Completes once `rank` has posted `seq`: for waits that must also drive other requests.
  std::unique_ptr<Request> Arrival(int rank, uint64_t seq) const;
  // Tells the other ranks that this one will post nothing more (its communicator closed or
  // failed): their waits for a round it has not posted then fail with PeerError within a
  // fraction of a second instead of running into the timeout. Rounds it did post still complete.
  void Leave();
  // Waits also fail at once, naming the rank, when `watch` sees a rank die (null: no watch).
  void set_peer_watch(const PeerWatch* watch) { watch_ = watch; }
  // How errors name rank q: names[q] (its rank in the whole communicator, for an arena of a
  // node's ranks); by default q.
  void set_rank_names(std::vector<int> names) { names_ = std::move(names); }

 private:
  // Per rank: its flag, how many ranks sleep on it, whether it has left, then two CallInfo
  // (double-buffered like the slots), on two cache lines of their own: no false sharing,
  // adjacent-line prefetch included.
  static constexpr size_t kLine = 128;
  static constexpr size_t kSleepersOffset = 8;  // ranks asleep on this rank's flag (futex)
  static constexpr size_t kLeftOffset = 12;     // nonzero once the rank has left (Leave)
  static constexpr size_t kInfoOffset = 16;
  static_assert(kInfoOffset + 2 * sizeof(CallInfo) <= kLine, "a rank's flag and infos share its line");
  std::atomic<uint64_t>* flag(int rank) const;
  std::atomic<uint32_t>* sleepers(int rank) const;
  std::atomic<uint32_t>* left(int rank) const;
  void WakeSleepers();
  CallInfo* info_slot(int rank, uint64_t seq) const;

  char* base_;
  int rank_;
  int size_;
  size_t slot_bytes_;
  std::shared_ptr<void> keep_alive_;
  const PeerWatch* watch_ = nullptr;
  std::vector<int> names_;
  int name(int rank) const { return names_.empty() ? rank : names_[rank]; }
};

// Creates an arena in POSIX shared memory: rank 0 creates and sizes the segment, every rank maps
// it, and rank 0 unlinks it as soon as all have mapped it, so nothing is left in /dev/shm even if
// every rank is killed. Collective, through two callbacks: `name_from_root` (rank 0 passes the
// segment's name, every rank gets it back) and `all_agree` (true on every rank iff true on all).
// Returns null on every rank if any rank could not map the segment.
std::unique_ptr<SharedArena> CreateShmArena(int rank, int size, size_t slot_bytes,
                                            const std::function<std::string(const std::string&)>& name_from_root,
                                            const std::function<bool(bool)>& all_agree);

// Maps a new POSIX shared-memory segment of `bytes` on every rank (the same protocol as
// CreateShmArena); null on every rank if any rank could not map it.
std::shared_ptr<void> MapSharedSegment(int rank, size_t bytes,
                                       const std::function<std::string(const std::string&)>& name_from_root,
                                       const std::function<bool(bool)>& all_agree);

// Memory that every rank of a node maps: rank q's region starts at base + q * stride. Users'
// arrays live there (comm.empty) so that collectives can read and write peers' data directly.
struct SharedBuffer {
  char* base;
  size_t stride;  // bytes per rank, page-aligned
  uint32_t id;    // the same on every rank: the buffers are created collectively, in one order
  std::shared_ptr<void> mapping;
};

// An arena in ordinary memory for ranks that are threads of one process (tests).
std::shared_ptr<void> AllocateLocalArenaMemory(int size, size_t slot_bytes);

}  // namespace pycomm
