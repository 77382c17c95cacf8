// A CUDA event seen as a transport request, so that the host waits on it with the usual
// spin-yield-sleep backoff and timeout (transport/wait.h) instead of blocking in the driver.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"
#include "transport/transport.h"

namespace pycomm::cuda {

class EventRequest : public Request {
 public:
  // `peer` is the rank whose work the event marks, for the time-out message.
  EventRequest(cudaEvent_t event, int peer) : event_(event), peer_(peer) {}
  bool Test() override {
    cudaError_t err = cudaEventQuery(event_);
    if (err == cudaErrorNotReady) {
      // Not an error, but a runtime may keep it as the thread's last one, where the caller's next
      // check (torch checks every launch with cudaGetLastError) would take it for one: it goes,
      // and only it.
      if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
      return false;
    }
    Check(err, "cudaEventQuery");
    return true;
  }
  int peer() const override { return peer_; }

 private:
  cudaEvent_t event_;
  int peer_;
};

}  // namespace pycomm::cuda
