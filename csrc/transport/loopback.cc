#include "transport/loopback.h"

#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>

#include "pycomm/pycomm.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

struct Pending {
  void* buf;  // the receiver's buffer, or the sender's (const-cast) buffer
  size_t bytes;
  std::shared_ptr<std::atomic<bool>> done;
};

// Messages from one sender to one receiver: whichever side arrives first waits in its queue.
struct Channel {
  std::mutex mu;
  std::deque<Pending> sends;
  std::deque<Pending> recvs;
};

class Hub {
 public:
  explicit Hub(int size)
      : size_(size),
        channels_(static_cast<size_t>(size) * size),
        arena_memory_(AllocateLocalArenaMemory(size, kArenaSlotBytes)) {}
  Channel& channel(int from, int to) { return channels_[static_cast<size_t>(from) * size_ + to]; }
  const std::shared_ptr<void>& arena_memory() const { return arena_memory_; }

 private:
  int size_;
  std::vector<Channel> channels_;
  std::shared_ptr<void> arena_memory_;  // the ranks are threads: ordinary memory is shared
};

// A receive dropped before it completes (a wait that timed out) is withdrawn, as MpiRequest
// cancels one: a late peer must not write into a buffer its owner has freed. A send stays and
// still reads its buffer, as MPI's does (MPI_Request_free): a sender that frees it first is a
// bug that the sanitizer run should see.
class LoopbackRequest : public Request {
 public:
  LoopbackRequest(std::shared_ptr<std::atomic<bool>> done, int peer, std::shared_ptr<Hub> hub, Channel* channel,
                  bool receive)
      : done_(std::move(done)), peer_(peer), hub_(std::move(hub)), channel_(channel), receive_(receive) {}
  ~LoopbackRequest() override {
    if (!receive_) return;
    std::lock_guard<std::mutex> lock(channel_->mu);
    if (done_->load(std::memory_order_acquire)) return;
    for (auto it = channel_->recvs.begin(); it != channel_->recvs.end(); ++it) {
      if (it->done == done_) {
        channel_->recvs.erase(it);
        return;
      }
    }
  }
  bool Test() override { return done_->load(std::memory_order_acquire); }
  int peer() const override { return peer_; }

 private:
  std::shared_ptr<std::atomic<bool>> done_;
  int peer_;
  std::shared_ptr<Hub> hub_;  // keeps channel_
  Channel* channel_;
  bool receive_;
};

void Deliver(const Pending& send, const Pending& recv) {
  if (send.bytes != recv.bytes) {
    throw CommError("pycomm loopback: send of " + std::to_string(send.bytes) + " bytes matched a receive of " +
                    std::to_string(recv.bytes));
  }
  if (send.bytes) std::memcpy(recv.buf, send.buf, send.bytes);
  send.done->store(true, std::memory_order_release);
  recv.done->store(true, std::memory_order_release);
}

class LoopbackTransport : public Transport {
 public:
  LoopbackTransport(std::shared_ptr<Hub> hub, int rank, int size)
      : hub_(std::move(hub)),
        rank_(rank),
        size_(size),
        arena_(hub_->arena_memory().get(), rank, size, kArenaSlotBytes, hub_->arena_memory()) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "loopback"; }
  SharedArena* arena() override { return &arena_; }

  std::unique_ptr<Request> Isend(int peer, const void* buf, size_t bytes) override {
    Pending send{const_cast<void*>(buf), bytes, std::make_shared<std::atomic<bool>>(false)};
    Channel& ch = hub_->channel(rank_, peer);
    std::lock_guard<std::mutex> lock(ch.mu);
    if (ch.recvs.empty()) {
      ch.sends.push_back(send);
    } else {
      Deliver(send, ch.recvs.front());
      ch.recvs.pop_front();
    }
    return std::make_unique<LoopbackRequest>(send.done, peer, hub_, &ch, false);
  }

  std::unique_ptr<Request> Irecv(int peer, void* buf, size_t bytes) override {
    Pending recv{buf, bytes, std::make_shared<std::atomic<bool>>(false)};
    Channel& ch = hub_->channel(peer, rank_);
    std::lock_guard<std::mutex> lock(ch.mu);
    if (ch.sends.empty()) {
      ch.recvs.push_back(recv);
    } else {
      Deliver(ch.sends.front(), recv);
      ch.sends.pop_front();
    }
    return std::make_unique<LoopbackRequest>(recv.done, peer, hub_, &ch, true);
  }

 private:
  std::shared_ptr<Hub> hub_;
  int rank_;
  int size_;
  SharedArena arena_;
};

}  // namespace

std::vector<std::unique_ptr<Transport>> CreateLoopbackTransports(int size) {
  auto hub = std::make_shared<Hub>(size);
  std::vector<std::unique_ptr<Transport>> transports;
  for (int r = 0; r < size; ++r) transports.push_back(std::make_unique<LoopbackTransport>(hub, r, size));
  return transports;
}

}  // namespace pycomm
