#include "core/executor.h"

#include <atomic>
#include <chrono>

namespace pycomm {

class Executor::Task : public Work {
 public:
  explicit Task(std::function<void()> fn) : fn_(std::move(fn)) {}

  void Run() {
    auto start = std::chrono::steady_clock::now();
    try {
      fn_();
    } catch (...) {
      error_ = std::current_exception();
    }
    fn_ = nullptr;  // drop captured state as soon as possible
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }

  void Wait() override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire); });
    }
    if (error_) std::rethrow_exception(error_);
  }

  bool Done() const override { return done_.load(std::memory_order_acquire); }

  // Written before done_ is released, so a reader that saw Done() sees it.
  double Seconds() const override { return Done() ? seconds_ : 0.0; }

 private:
  std::function<void()> fn_;
  std::exception_ptr error_;
  double seconds_ = 0.0;
  std::atomic<bool> done_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

Executor::Executor(bool with_thread) {
  if (with_thread) thread_ = std::thread([this] { Loop(); });
}

Executor::~Executor() {
  Close([] {});
}

std::shared_ptr<Work> Executor::Submit(std::function<void()> fn) {
  auto task = std::make_shared<Task>(std::move(fn));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) throw CommError("pycomm: the communicator is closed");
    if (!thread_.joinable()) {
      throw CommError(
          "pycomm: this communicator is blocking-only (no progress thread): asynchronous calls are refused");
    }
    queue_.push_back(task);
  }
  cv_.notify_all();
  return task;
}

void Executor::Run(const std::function<void()>& fn) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto ready = [&] { return queue_.empty() && !busy_; };
    if (!ready()) {
      ++waiting_runs_;
      cv_.wait(lock, ready);
      --waiting_runs_;
    }
    if (closed_) throw CommError("pycomm: the communicator is closed");
    busy_ = true;
  }
  struct Release {
    Executor* self;
    ~Release() {
      bool wake;
      {
        std::lock_guard<std::mutex> lock(self->mu_);
        self->busy_ = false;
        // Waking the idle progress thread for nothing costs a context switch per call, taken
        // from the peers on a busy machine: only wake whoever can go on now.
        wake = !self->queue_.empty() || self->waiting_runs_ > 0 || self->stopping_;
      }
      if (wake) self->cv_.notify_all();
    }
  } release{this};
  fn();
}

void Executor::Close(const std::function<void()>& teardown) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    // A blocking call that got past its checks before close still runs to its end; any other
    // caller waiting in Run() then finds the executor closed.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !busy_; });
    closed_ = true;
  }
  cv_.notify_all();
  teardown();
}

void Executor::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return (!queue_.empty() && !busy_) || (stopping_ && queue_.empty()); });
    if (queue_.empty()) return;  // stopping, and nothing left to run
    auto task = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    task->Run();
    lock.lock();
    busy_ = false;
    cv_.notify_all();
  }
}

}  // namespace pycomm
