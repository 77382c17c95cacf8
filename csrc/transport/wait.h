// Waiting on requests without burning the cores that peers need: spin briefly, then yield, then
// sleep with a growing interval. Ranks may outnumber cores (4 ranks on 2 cores must stay fast).
#pragma once

#include <memory>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

// Blocks until `request` completes. Throws PeerError naming the peer when it has not completed
// after timeout_s seconds: every single wait is bounded, however long the whole collective takes.
void Wait(Request& request, double timeout_s);
void WaitAll(std::vector<std::unique_ptr<Request>>& requests, double timeout_s);

// The spin-yield-sleep schedule shared by every waiting loop; Pause() is called once per failed poll.
class Backoff {
 public:
  void Pause();
  void Reset() { polls_ = 0; }

 private:
  unsigned polls_ = 0;
};

}  // namespace pycomm
