// The chunk pipeline that ring steps share: a fixed window of receives posted ahead, sends issued
// as soon as their data is final, and every wait bounded by the timeout.
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <vector>

#include "core/collectives.h"
#include "transport/wait.h"

namespace pycomm {

struct Span {
  void* ptr;
  size_t bytes;  // 0: nothing to move for this unit
};

// Moves `units` transfers, unit u sending send_of(u) to `right` and receiving recv_of(u) from
// `left`. Unit u's send is posted before its receive is waited on, so both directions stay busy;
// consume(u) runs once unit u's receive has landed, in unit order. send_of(u) may read what
// consume(v) wrote for any v < u. recv_of(u) may reuse a buffer consumed at unit u - kPipelineDepth.
template <typename SendOf, typename RecvOf, typename Consume>
void RunPipeline(const CollectiveContext& ctx, int left, int right, size_t units, SendOf send_of, RecvOf recv_of,
                 Consume consume) {
  Transport& transport = ctx.transport;
  std::vector<std::unique_ptr<Request>> recvs(kPipelineDepth);
  std::deque<std::unique_ptr<Request>> sends;
  auto post_recv = [&](size_t u) {
    Span span = recv_of(u);
    if (span.bytes) recvs[u % kPipelineDepth] = transport.Irecv(left, span.ptr, span.bytes);
  };
  for (size_t u = 0; u < units && u < kPipelineDepth; ++u) post_recv(u);
  for (size_t u = 0; u < units; ++u) {
    Span out = send_of(u);
    if (out.bytes) {
      // Bounding the sends in flight bounds the requests held; the receiver has at least as many
      // receives posted, so this wait always makes progress.
      while (sends.size() >= kPipelineDepth) {
        Wait(*sends.front(), ctx.timeout_s);
        sends.pop_front();
      }
      sends.push_back(transport.Isend(right, out.ptr, out.bytes));
    }
    if (auto& in = recvs[u % kPipelineDepth]) {
      Wait(*in, ctx.timeout_s);
      in.reset();
      consume(u);
    }
    if (u + kPipelineDepth < units) post_recv(u + kPipelineDepth);
  }
  for (auto& send : sends) Wait(*send, ctx.timeout_s);
}

}  // namespace pycomm
