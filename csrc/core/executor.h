// Runs a communicator's operations one at a time, in the order they were issued: asynchronous
// ones on a progress thread (or on the thread that waits for them, if it gets there first),
// blocking ones on the caller's thread once everything issued before them has finished.
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
  // Without a progress thread (`with_thread` false) only Run() works; Submit() throws.
  explicit Executor(bool with_thread = true);
  ~Executor();  // Close() without teardown

  // Queues `fn`; the returned Work completes when it has run. Throws CommError once Close() has
  // begun, or when there is no progress thread. Its Wait() runs the queue's front itself (in
  // issue order) where the progress thread has not started it yet: a wait right after the
  // submit then costs no hand-off between threads.
  std::shared_ptr<Work> Submit(std::function<void()> fn);
  // Runs `fn` on this thread after all previously submitted work, and before any submitted later.
  // Throws CommError once Close() has begun.
  void Run(const std::function<void()>& fn);
  // Finishes queued work and any Run() in progress, stops the thread, refuses all later work, and
  // then runs `teardown` on this thread. Later calls do nothing.
  void Close(const std::function<void()>& teardown);

 private:
  class Task;
  struct Queue;  // shared with the tasks, whose Work may outlive the executor

  std::shared_ptr<Queue> q_;
  std::thread thread_;
};

}  // namespace pycomm
