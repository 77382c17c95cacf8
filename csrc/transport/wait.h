// Waiting on requests without burning the cores that peers need: spin briefly, then yield, then
// sleep with a growing interval. Ranks may outnumber cores (4 ranks on 2 cores must stay fast).
#pragma once

#include <exception>
#include <memory>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

// Blocks until `request` completes. Throws PeerError naming the peer when it has not completed
// after timeout_s seconds: every single wait is bounded, however long the whole collective takes.
void Wait(Request& request, double timeout_s);
void WaitAll(std::vector<std::unique_ptr<Request>>& requests, double timeout_s);

// The error to raise for `error`, which a collective over `transport` threw: where it is a plain
// CommError (MPI or a read of a peer's memory failing), most likely a peer died and broke the
// link before any wait noticed. Then, where the transport finds a dead rank within a short grace
// (a dying process shows in /proc a moment longer), the PeerError naming it, with `error`'s
// text; else `error` itself.
std::exception_ptr BlameDeadPeer(const std::exception_ptr& error, Transport& transport);

// Linux stretches every timed sleep of a thread by its timer slack (50 us by default): far
// longer than the microseconds a peer usually needs. While one of these lives, this thread's
// slack is 1 us; the caller's own slack comes back afterwards.
class TightTimerSlack {
 public:
  TightTimerSlack();
  ~TightTimerSlack();

 private:
  int saved_;
};

// The spin-yield-sleep schedule shared by every waiting loop; Pause() is called once per failed
// poll, and sleeps through `request` (Request::Sleep) when one is given.
class Backoff {
 public:
  void Pause(Request* request = nullptr);
  void Reset() { polls_ = 0; }

 private:
  unsigned polls_ = 0;
};

}  // namespace pycomm
