// Every peer hands the leader (rank 0) a message and waits for its one-byte answer, which may
// carry a reply that every peer reads: the per-call hand-off of the device collectives
// (csrc/cuda/device_group.h). Through the transport's shared
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

  // On a peer: hands `message` to the leader, returns its answer and copies its reply (the
  // leader's `reply_bytes`, which every rank passes alike) to `reply`. Every rank's message of one
  // exchange has the same size. Through the arena, MismatchError when the leader is making
  // another call than a hand-off.
  char Hand(const void* message, size_t bytes, void* reply = nullptr, size_t reply_bytes = 0);
  // On the leader: every rank's message (messages[0], the leader's own, is left empty). Through
  // the arena, a peer that made another call (another size, or not a hand-off) makes this throw
  // MismatchError; the leader must still Answer (kMismatch), as after every Collect.
  void Collect(std::vector<std::vector<char>>* messages, size_t bytes, size_t reply_bytes = 0);
  static constexpr char kMismatch = 2;
  // On the leader, after Collect: answers every peer, with Collect's reply_bytes from `reply`
  // (where null, the peers' reply is left undefined: for answers that say the call failed).
  void Answer(char answer, const void* reply = nullptr);

 private:
  Transport& transport_;
  SharedArena* arena_ = nullptr;
  uint64_t* arena_seq_ = nullptr;
  double timeout_s_;
  // Whether an exchange of these sizes goes through the arena (the same on every rank).
  bool ThroughArena(size_t bytes, size_t reply_bytes) const;

  // Between Collect and Answer the leader waits in turn for the other nodes' leaders and for the
  // work between nodes, each wait within the time-out: ranks late by less than one time-out can
  // add up past it there. A peer whose leader is in the call allows the answer this many
  // time-outs, so that it does not give up (and raise) while its leader goes on to succeed.
  static constexpr double kAnswerTimeouts = 4;
  uint64_t answer_seq_ = 0;  // the leader's: the round its answer goes out in
  size_t reply_bytes_ = 0;   // the leader's: Collect's, for Answer
};

}  // namespace pycomm
