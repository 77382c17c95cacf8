#include "transport/shared_arena.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <new>
#include <random>

#include "pycomm/pycomm.h"
#include "transport/peer_watch.h"
#include "transport/wait.h"

namespace pycomm {

size_t SharedArena::BytesFor(int size, size_t slot_bytes) {
  return static_cast<size_t>(size) * kLine + static_cast<size_t>(size) * 2 * slot_bytes;
}

SharedArena::SharedArena(void* base, int rank, int size, size_t slot_bytes, std::shared_ptr<void> keep_alive)
    : base_(static_cast<char*>(base)),
      rank_(rank),
      size_(size),
      slot_bytes_(slot_bytes),
      keep_alive_(std::move(keep_alive)) {
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "flags in shared memory must be lock-free");
}

SharedArena::~SharedArena() { Leave(); }

std::atomic<uint64_t>* SharedArena::flag(int rank) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(base_ + static_cast<size_t>(rank) * kLine);
}

char* SharedArena::slot(int rank, uint64_t seq) const {
  size_t index = static_cast<size_t>(rank) * 2 + (seq & 1);
  return base_ + static_cast<size_t>(size_) * kLine + index * slot_bytes_;
}

SharedArena::CallInfo* SharedArena::info_slot(int rank, uint64_t seq) const {
  return reinterpret_cast<CallInfo*>(base_ + static_cast<size_t>(rank) * kLine + kInfoOffset) + (seq & 1);
}

namespace {

// The futex word of a flag: its low 32 bits, which change with every post.
uint32_t* FutexWord(const std::atomic<uint64_t>* flag) {
  auto* word = reinterpret_cast<uint32_t*>(const_cast<std::atomic<uint64_t>*>(flag));
  return __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? word : word + 1;
}

// A call info moves between ranks word by word with relaxed atomic accesses: a reader may read a
// slot while its owner rewrites it for a later round, and then discards what it read (it checks
// the owner's flag afterwards, as a seqlock does; LeaderExchange::Hand). Plain copies would make
// that a data race.
constexpr size_t kInfoWords = sizeof(SharedArena::CallInfo) / sizeof(uint64_t);
static_assert(sizeof(SharedArena::CallInfo) % sizeof(uint64_t) == 0, "CallInfo moves as whole words");

void StoreInfo(SharedArena::CallInfo* slot, const SharedArena::CallInfo& info) {
  uint64_t words[kInfoWords];
  std::memcpy(words, &info, sizeof info);
  auto* to = reinterpret_cast<uint64_t*>(slot);
  for (size_t i = 0; i < kInfoWords; ++i) __atomic_store_n(&to[i], words[i], __ATOMIC_RELAXED);
}

SharedArena::CallInfo LoadInfo(const SharedArena::CallInfo* slot) {
  uint64_t words[kInfoWords];
  const auto* from = reinterpret_cast<const uint64_t*>(slot);
  for (size_t i = 0; i < kInfoWords; ++i) words[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
  SharedArena::CallInfo info;
  std::memcpy(&info, words, sizeof info);
  return info;
}

// Not FUTEX_PRIVATE_FLAG: the word lives in memory that other processes map.
long Futex(uint32_t* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, word, op, value, timeout, nullptr, 0);
}

}  // namespace

std::atomic<uint32_t>* SharedArena::sleepers(int rank) const {
  return reinterpret_cast<std::atomic<uint32_t>*>(base_ + static_cast<size_t>(rank) * kLine + kSleepersOffset);
}

std::atomic<uint32_t>* SharedArena::left(int rank) const {
  return reinterpret_cast<std::atomic<uint32_t>*>(base_ + static_cast<size_t>(rank) * kLine + kLeftOffset);
}

void SharedArena::Post(uint64_t seq, const CallInfo& info) {
  StoreInfo(info_slot(rank_, seq), info);
  flag(rank_)->store(seq, std::memory_order_release);
  WakeSleepers();
}

void SharedArena::Leave() {
  // Released after every post of this rank: a waiter that sees it and still not the round it
  // waits for knows that round will never come.
  left(rank_)->store(1, std::memory_order_release);
  WakeSleepers();
}

void SharedArena::WakeSleepers() {
  // Paired with the sleeper's count-then-check (both sequentially consistent): either it sees
  // the new flag, or this sees it counted and wakes it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleepers(rank_)->load(std::memory_order_relaxed) > 0) Futex(FutexWord(flag(rank_)), FUTEX_WAKE, INT_MAX, nullptr);
}

SharedArena::CallInfo SharedArena::info(int rank, uint64_t seq) const { return LoadInfo(info_slot(rank, seq)); }

uint64_t SharedArena::posted(int rank) const {
  std::atomic_thread_fence(std::memory_order_acquire);  // earlier reads of infos stay before this
  return flag(rank)->load(std::memory_order_acquire);
}

namespace {

// The flags seen as requests, so that waiting shares the spin-yield-sleep schedule and timeout.
class FlagRequest : public Request {
 public:
  FlagRequest(const std::atomic<uint64_t>* flag, std::atomic<uint32_t>* sleepers, const std::atomic<uint32_t>* left,
              uint64_t seq, int peer, const PeerWatch* watch)
      : flag_(flag), sleepers_(sleepers), left_(left), seq_(seq), peer_(peer), watch_(watch) {}
  bool Test() override {
    if (flag_->load(std::memory_order_acquire) >= seq_) return true;
    if ((++polls_ & PeerWatch::kPollMask) == 0) {
      if (watch_) watch_->Check();
      CheckNotLeft();
    }
    return false;
  }
  int peer() const override { return peer_; }
  // Sleeps on the flag's futex: the post wakes it at once.
  void Sleep(std::chrono::microseconds limit) override {
    sleepers_->fetch_add(1, std::memory_order_seq_cst);
    const uint64_t now = flag_->load(std::memory_order_seq_cst);
    if (now < seq_) {
      const timespec timeout{0, static_cast<long>(limit.count()) * 1000};
      TightTimerSlack slack;
      Futex(FutexWord(flag_), FUTEX_WAIT, static_cast<uint32_t>(now), &timeout);
    }
    sleepers_->fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  void CheckNotLeft() const {
    if (left_->load(std::memory_order_acquire) == 0) return;
    if (flag_->load(std::memory_order_acquire) >= seq_) return;  // posted before it left
    // A rank leaves after its own error, often a peer's death: the dead rank is the news.
    if (watch_) watch_->Check(true);
    throw PeerError("pycomm: rank " + std::to_string(peer_) +
                        " has left the communicator (closed it, failed in it, or is exiting) without taking part "
                        "in the call this rank waits in",
                    peer_);
  }

  const std::atomic<uint64_t>* flag_;
  std::atomic<uint32_t>* sleepers_;
  const std::atomic<uint32_t>* left_;
  uint64_t seq_;
  int peer_;
  const PeerWatch* watch_;
  unsigned polls_ = 0;
};

}  // namespace

void SharedArena::WaitAll(uint64_t seq, double timeout_s) const {
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    FlagRequest request(flag(r), sleepers(r), left(r), seq, name(r), watch_);
    Wait(request, timeout_s);
  }
}

std::unique_ptr<Request> SharedArena::Arrival(int rank, uint64_t seq) const {
  return std::make_unique<FlagRequest>(flag(rank), sleepers(rank), left(rank), seq, name(rank), watch_);
}

std::shared_ptr<void> AllocateLocalArenaMemory(int size, size_t slot_bytes) {
  size_t bytes = SharedArena::BytesFor(size, slot_bytes);
  void* memory = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  if (!memory) throw std::bad_alloc();
  std::memset(memory, 0, bytes);
  return std::shared_ptr<void>(memory, [](void* p) { std::free(p); });
}

std::shared_ptr<void> MapSharedSegment(int rank, size_t bytes,
                                       const std::function<std::string(const std::string&)>& name_from_root,
                                       const std::function<bool(bool)>& all_agree) {
  std::string name;
  int fd = -1;
  if (rank == 0) {
    std::random_device random;
    name = "/pycomm-" + std::to_string(getpid()) + "-" + std::to_string(random());
    fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd >= 0 && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      close(fd);
      shm_unlink(name.c_str());
      fd = -1;
    }
    if (fd < 0) name.clear();  // tells the others there is no segment
  }
  name = name_from_root(name);
  if (name.empty()) return nullptr;  // rank 0 could not create it: nobody maps anything
  if (rank != 0) fd = shm_open(name.c_str(), O_RDWR, 0600);
  void* base = fd >= 0 ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  if (rank != 0 && fd >= 0) close(fd);
  // Everyone has mapped it (or failed) past this point: the name can go. The window in which a
  // killed job would leave the name behind is kept to these few steps.
  bool ok = all_agree(base != MAP_FAILED);
  if (rank == 0) shm_unlink(name.c_str());
  // Reserve the pages only now, after the unlink (rank 0 still holds the file open): on a
  // /dev/shm too small for them, the mapping alone succeeds and the first write would kill the
  // rank with SIGBUS.
  bool reserved = true;
  if (rank == 0) {
    reserved = ok && posix_fallocate(fd, 0, static_cast<off_t>(bytes)) == 0;
    close(fd);
  }
  ok = all_agree(ok && reserved);
  if (!ok) {
    if (base != MAP_FAILED) munmap(base, bytes);
    return nullptr;
  }
  return std::shared_ptr<void>(base, [bytes](void* p) { munmap(p, bytes); });
}

std::unique_ptr<SharedArena> CreateShmArena(int rank, int size, size_t slot_bytes,
                                            const std::function<std::string(const std::string&)>& name_from_root,
                                            const std::function<bool(bool)>& all_agree) {
  auto mapping = MapSharedSegment(rank, SharedArena::BytesFor(size, slot_bytes), name_from_root, all_agree);
  if (!mapping) return nullptr;
  return std::make_unique<SharedArena>(mapping.get(), rank, size, slot_bytes, std::move(mapping));
}

}  // namespace pycomm
