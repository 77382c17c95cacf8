#include "transport/leader_exchange.h"

#include <cstring>
#include <memory>
#include <string>

#include "transport/shared_arena.h"
#include "transport/wait.h"

namespace pycomm {

namespace {

constexpr int kLeader = 0;

SharedArena::CallInfo HandoffInfo(uint64_t value) {
  SharedArena::CallInfo info{};
  info.count = value;
  info.kind = SharedArena::kDeviceHandoff;
  return info;
}

}  // namespace

LeaderExchange::LeaderExchange(Transport& transport, uint64_t* arena_seq, double timeout_s)
    : transport_(transport), timeout_s_(timeout_s) {
  if (arena_seq && transport.arena()) {
    arena_ = transport.arena();
    arena_seq_ = arena_seq;
  }
}

bool LeaderExchange::ThroughArena(size_t bytes, size_t reply_bytes) const {
  return arena_ && bytes <= arena_->slot_bytes() && reply_bytes <= arena_->slot_bytes();
}

// Through the arena an exchange takes rounds a and a + 1: every rank posts round a (peers with
// their message in their slot), and the leader posts its answer in round a + 1 (its reply in its
// slot), which the peers only wait for. A peer writes its slot again no earlier than round a + 2,
// after it has read the answer, so the leader has read the slot by then; likewise the leader's
// answer and reply are overwritten (round a + 3) only after every peer has posted round a + 2, so
// after each has read them. Through messages the answer is one message: its byte, then the reply.
char LeaderExchange::Hand(const void* message, size_t bytes, void* reply, size_t reply_bytes) {
  if (!ThroughArena(bytes, reply_bytes)) {
    std::vector<char> answer(1 + reply_bytes);
    std::unique_ptr<Request> r = transport_.Irecv(kLeader, answer.data(), answer.size());
    std::unique_ptr<Request> s = transport_.Isend(kLeader, message, bytes);
    Wait(*s, timeout_s_);
    Wait(*r, kAnswerTimeouts * timeout_s_);
    if (reply_bytes) std::memcpy(reply, answer.data() + 1, reply_bytes);
    return answer[0];
  }
  const uint64_t round = ++*arena_seq_;
  ++*arena_seq_;
  std::memcpy(arena_->slot(arena_->rank(), round), message, bytes);
  arena_->Post(round, HandoffInfo(bytes));
  // First the leader's own post of this round: a leader in another call (which fails there, on
  // seeing this post) never answers, and this rank would otherwise wait out the time-out. That
  // post's info is overwritten once the leader, having answered, posts round + 2 (its next
  // call may not wait for this rank first): it counts only if the leader is still at `round`
  // after it was read.
  const auto another_call = [] {
    return MismatchError("pycomm: the leader (rank 0) made another call than this rank's device collective");
  };
  std::unique_ptr<Request> posted = arena_->Arrival(kLeader, round);
  Wait(*posted, timeout_s_);
  const SharedArena::CallInfo leaders = arena_->info(kLeader, round);
  if (arena_->posted(kLeader) == round && leaders.kind != SharedArena::kDeviceHandoff) throw another_call();
  // The answer's info stays until round + 3, which the leader posts only after this rank's
  // round + 2.
  std::unique_ptr<Request> answered = arena_->Arrival(kLeader, round + 1);
  Wait(*answered, kAnswerTimeouts * timeout_s_);
  const SharedArena::CallInfo answer = arena_->info(kLeader, round + 1);
  if (answer.kind != SharedArena::kDeviceHandoff) throw another_call();
  if (reply_bytes) std::memcpy(reply, arena_->slot(kLeader, round + 1), reply_bytes);
  return static_cast<char>(answer.count);
}

void LeaderExchange::Collect(std::vector<std::vector<char>>* messages, size_t bytes, size_t reply_bytes) {
  const int size = transport_.size();
  messages->assign(size, std::vector<char>(bytes));
  reply_bytes_ = reply_bytes;
  if (!ThroughArena(bytes, reply_bytes)) {
    answer_seq_ = 0;  // Answer sends messages
    std::vector<std::unique_ptr<Request>> recvs;
    for (int peer = 1; peer < size; ++peer) recvs.push_back(transport_.Irecv(peer, (*messages)[peer].data(), bytes));
    WaitAll(recvs, timeout_s_);
    return;
  }
  const uint64_t round = ++*arena_seq_;
  ++*arena_seq_;
  answer_seq_ = round + 1;  // where Answer goes, whatever happens below
  arena_->Post(round, HandoffInfo(bytes));
  arena_->WaitAll(round, timeout_s_);
  for (int peer = 1; peer < size; ++peer) {
    const SharedArena::CallInfo info = arena_->info(peer, round);
    if (info.kind != SharedArena::kDeviceHandoff || info.count != bytes) {
      // The caller still answers (kMismatch), so that the peers fail too.
      throw MismatchError("pycomm: rank " + std::to_string(peer) +
                          " made another call than the leader's device collective");
    }
    std::memcpy((*messages)[peer].data(), arena_->slot(peer, round), bytes);
  }
}

void LeaderExchange::Answer(char answer, const void* reply) {
  if (answer_seq_) {
    if (reply_bytes_ && reply) std::memcpy(arena_->slot(kLeader, answer_seq_), reply, reply_bytes_);
    arena_->Post(answer_seq_, HandoffInfo(static_cast<unsigned char>(answer)));
    answer_seq_ = 0;
    return;
  }
  std::vector<char> message(1 + reply_bytes_, 0);
  message[0] = answer;
  if (reply_bytes_ && reply) std::memcpy(message.data() + 1, reply, reply_bytes_);
  std::vector<std::unique_ptr<Request>> sends;
  for (int peer = 1; peer < transport_.size(); ++peer) {
    sends.push_back(transport_.Isend(peer, message.data(), message.size()));
  }
  WaitAll(sends, timeout_s_);
}

}  // namespace pycomm
