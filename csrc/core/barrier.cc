// Dissemination barrier: in round k every rank signals rank r+k and waits for rank r-k; after
// ceil(log2 P) rounds every rank has heard, directly or indirectly, from every other.

#include "core/collectives.h"
#include "transport/wait.h"

namespace pycomm {

void BarrierDissemination(const CollectiveContext& ctx) {
  Transport& transport = ctx.transport;
  const int P = transport.size(), r = transport.rank();
  char token_out = 0, token_in = 0;
  for (int k = 1; k < P; k *= 2) {
    auto recv = transport.Irecv((r - k + P) % P, &token_in, 1);
    auto send = transport.Isend((r + k) % P, &token_out, 1);
    Wait(*send, ctx.timeout_s);
    Wait(*recv, ctx.timeout_s);
  }
}

}  // namespace pycomm
