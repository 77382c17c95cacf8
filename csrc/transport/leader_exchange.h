// Every peer hands the leader (rank 0) a message and waits for its one-byte answer: the per-call
// hand-off of the device collectives (csrc/cuda/device_group.h). Through the transport's shared
// arena when it has one (a slot and a flag in shared memory each way: no MPI message on the
// latency path), else through two transport messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

class LeaderExchange {
 public:
  // `arena_seq` counts the rounds made through transport.arena() by every user of that arena
  // (the communicator's counter), the same on every rank; each exchange takes two. Null: messages.
  LeaderExchange(Transport& transport, uint64_t* arena_seq, double timeout_s);

  bool through_arena() const { return arena_ != nullptr; }

  // On a peer: hands `message` to the leader, returns its answer. Every rank's message of one
  // exchange has the same size. Through the arena, MismatchError when the leader is making
  // another call than a hand-off.
  char Hand(const void* message, size_t bytes);
  // On the leader: every rank's message (messages[0], the leader's own, is left empty). Through
  // the arena, a peer that made another call (another size, or not a hand-off) makes this throw
  // MismatchError; the leader must still Answer (kMismatch), as after every Collect.
  void Collect(std::vector<std::vector<char>>* messages, size_t bytes);
  static constexpr char kMismatch = 2;
  // On the leader, after Collect: answers every peer.
  void Answer(char answer);

 private:
  Transport& transport_;
  SharedArena* arena_ = nullptr;
  uint64_t* arena_seq_ = nullptr;
  double timeout_s_;
  uint64_t answer_seq_ = 0;  // the leader's: the round its answer goes out in
};

}  // namespace pycomm
