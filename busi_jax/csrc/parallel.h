// Shared by the elementwise kernels (batch_norm.cc): run tasks 0..n-1 on the
// calling thread and XLA's intra-op thread pool, and wait for all of them.
//
// Tasks are handed out by an atomic counter, so whoever is free takes the
// next one; a helper that starts after every task is taken returns at once
// without touching the task function (the caller may have returned by then).
// What a task computes must depend on its index only, never on which thread
// ran it: the kernels keep one partial sum per task and add those in task
// order, so results are bit-identical from call to call however the threads
// were scheduled. busi_jax/native.py hashes this header into each kernel's
// build key.

#ifndef BUSI_JAX_CSRC_PARALLEL_H_
#define BUSI_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace busi {

// fn(t) for every t < tasks, on at most `participants` threads (the caller
// included); returns when all are done.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t participants,
                        const std::function<void(int64_t)>& fn) {
  struct State {
    const std::function<void(int64_t)>* fn;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;  // Guarded by mu.

    void Run() {
      int64_t finished = 0;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        (*fn)(t);
        ++finished;
      }
      if (finished == 0) return;
      std::lock_guard<std::mutex> lock(mu);
      done += finished;
      if (done == tasks) cv.notify_all();
    }
  };
  if (tasks <= 0) return;
  auto state = std::make_shared<State>();
  state->fn = &fn;
  state->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(
      {participants - 1, std::max<int64_t>(pool.num_threads(), 0), tasks - 1});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->tasks; });
}

}  // namespace busi

#endif  // BUSI_JAX_CSRC_PARALLEL_H_
