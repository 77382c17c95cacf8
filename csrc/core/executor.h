// Runs a communicator's operations one at a time, in the order they were issued: asynchronous
// ones on a progress thread, blocking ones on the caller's thread once everything issued before
// them has finished.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "pycomm/pycomm.h"

namespace pycomm {

class Executor {
 public:
  Executor();
  ~Executor();  // finishes queued work, then joins the thread

  // Queues `fn`; the returned Work completes when it has run.
  std::shared_ptr<Work> Submit(std::function<void()> fn);
  // Runs `fn` on this thread after all previously submitted work, and before any submitted later.
  void Run(const std::function<void()>& fn);
  // Finishes queued work and stops the thread. Idempotent.
  void Stop();

 private:
  class Task;
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Task>> queue_;
  bool busy_ = false;  // an operation is running, on either thread
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace pycomm
