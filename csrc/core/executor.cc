#include "core/executor.h"

#include <atomic>
#include <chrono>
#include <stdexcept>

namespace pycomm {

namespace {

using Clock = std::chrono::steady_clock;

// After a submit the progress thread stays in short naps for a while instead of sleeping until
// woken: a submit then need not wake it (a thread hand-off cost ~10 us per call on a 2-core VM
// running 2 ranks), and a caller that waits at once runs the task itself. A task that nobody
// waits for starts within one nap.
constexpr auto kNap = std::chrono::microseconds(100);
constexpr auto kNapping = std::chrono::milliseconds(5);

}  // namespace

struct Executor::Queue {
  std::mutex mu;
  std::condition_variable cv;  // any change to the fields below, and any task finishing
  std::deque<std::shared_ptr<Task>> tasks;
  bool busy = false;      // an operation is running, on any thread
  bool stopping = false;  // no more Submit(); the thread exits once the queue is empty
  bool closed = false;    // no more Run() either
  int waiting_runs = 0;   // callers blocked in Run()
  int waiting_waits = 0;  // callers blocked in a task's Wait()
  bool asleep = false;    // the progress thread waits without a time limit: Submit() wakes it
  Clock::time_point last_submit;

  // Runs the front task on this thread (lock held on entry and on return, released meanwhile).
  void RunFront(std::unique_lock<std::mutex>& lock);
  bool FrontRunnable() const { return !tasks.empty() && !busy; }
};

class Executor::Task : public Work {
  friend struct Executor::Queue;  // RunFront takes it off the queue

 public:
  Task(std::function<void()> fn, std::weak_ptr<Queue> queue) : fn_(std::move(fn)), queue_(std::move(queue)) {}

  void Run() {
    auto start = std::chrono::steady_clock::now();
    try {
      fn_();
    } catch (...) {
      error_ = std::current_exception();
    }
    fn_ = nullptr;  // drop captured state as soon as possible
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    done_.store(true, std::memory_order_release);
  }

  void Wait() override {
    // A task not done has its executor's queue (Close() runs every task before it ends).
    if (std::shared_ptr<Queue> q = Done() ? nullptr : queue_.lock()) {
      std::unique_lock<std::mutex> lock(q->mu);
      for (;;) {
        if (Done()) break;
        // This task, or one issued before it, waits at the front with nothing running: run it
        // here rather than wake the progress thread for it and be woken back.
        if (q->FrontRunnable() && queued_) {
          q->RunFront(lock);
        } else {
          ++q->waiting_waits;
          q->cv.wait(lock);
          --q->waiting_waits;
        }
      }
    } else if (!Done()) {
      throw std::logic_error("pycomm: a task outlived its executor unrun");  // Close() runs them all
    }
    if (error_) std::rethrow_exception(error_);
  }

  bool Done() const override { return done_.load(std::memory_order_acquire); }

  // Written before done_ is released, so a reader that saw Done() sees it.
  double Seconds() const override { return Done() ? seconds_ : 0.0; }

 private:
  std::function<void()> fn_;
  std::weak_ptr<Queue> queue_;
  bool queued_ = true;  // still in the queue (guarded by the queue's lock)
  std::exception_ptr error_;
  double seconds_ = 0.0;
  std::atomic<bool> done_{false};
};

void Executor::Queue::RunFront(std::unique_lock<std::mutex>& lock) {
  auto task = std::move(tasks.front());
  tasks.pop_front();
  task->queued_ = false;
  busy = true;
  lock.unlock();
  task->Run();
  lock.lock();
  busy = false;
  // Waking the idle progress thread for nothing costs a context switch per call, taken from the
  // peers on a busy machine: only wake whoever can go on now (the next task's runner, Run() and
  // Wait() callers, Close()).
  if (!tasks.empty() || waiting_runs > 0 || waiting_waits > 0 || stopping) cv.notify_all();
}

Executor::Executor(bool with_thread) : q_(std::make_shared<Queue>()) {
  if (!with_thread) return;
  thread_ = std::thread([q = q_] {
    std::unique_lock<std::mutex> lock(q->mu);
    auto ready = [&] { return q->FrontRunnable() || (q->stopping && q->tasks.empty()); };
    for (;;) {
      if (!ready()) {
        if (Clock::now() - q->last_submit < kNapping) {
          q->cv.wait_for(lock, kNap, ready);
          continue;
        }
        q->asleep = true;
        q->cv.wait(lock, ready);
        q->asleep = false;
      }
      if (q->tasks.empty()) return;  // stopping, and nothing left to run
      q->RunFront(lock);
    }
  });
}

Executor::~Executor() {
  Close([] {});
}

std::shared_ptr<Work> Executor::Submit(std::function<void()> fn) {
  auto task = std::make_shared<Task>(std::move(fn), q_);
  bool wake;
  {
    std::lock_guard<std::mutex> lock(q_->mu);
    if (q_->stopping) throw CommError("pycomm: the communicator is closed");
    if (!thread_.joinable()) {
      throw CommError(
          "pycomm: this communicator is blocking-only (no progress thread): asynchronous calls are refused");
    }
    q_->tasks.push_back(task);
    q_->last_submit = Clock::now();
    wake = q_->asleep;  // a napping thread looks again soon
  }
  if (wake) q_->cv.notify_all();
  return task;
}

void Executor::Run(const std::function<void()>& fn) {
  Queue& q = *q_;
  {
    std::unique_lock<std::mutex> lock(q.mu);
    // Work submitted before this call runs first: here, where the progress thread has not
    // started it, rather than wake that thread for it and be woken back.
    while (!q.tasks.empty() || q.busy) {
      if (q.FrontRunnable()) {
        q.RunFront(lock);
        continue;
      }
      ++q.waiting_runs;
      q.cv.wait(lock);
      --q.waiting_runs;
    }
    if (q.closed) throw CommError("pycomm: the communicator is closed");
    q.busy = true;
  }
  struct Release {
    Queue& q;
    ~Release() {
      bool wake;
      {
        std::lock_guard<std::mutex> lock(q.mu);
        q.busy = false;
        // Waking the idle progress thread for nothing costs a context switch per call, taken
        // from the peers on a busy machine: only wake whoever can go on now.
        wake = !q.tasks.empty() || q.waiting_runs > 0 || q.stopping;
      }
      if (wake) q.cv.notify_all();
    }
  } release{q};
  fn();
}

void Executor::Close(const std::function<void()>& teardown) {
  Queue& q = *q_;
  {
    std::lock_guard<std::mutex> lock(q.mu);
    if (q.stopping) return;
    q.stopping = true;
  }
  q.cv.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    // A blocking call that got past its checks before close still runs to its end, as does a
    // task that a waiter took from the queue; any other caller waiting in Run() then finds the
    // executor closed.
    std::unique_lock<std::mutex> lock(q.mu);
    q.cv.wait(lock, [&] { return !q.busy && q.tasks.empty(); });
    q.closed = true;
  }
  q.cv.notify_all();
  teardown();
}

}  // namespace pycomm
