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

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BUSI_PAUSE() _mm_pause()
#else
#define BUSI_PAUSE() ((void)0)
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace busi {

// How long a caller whose own tasks are done spins for its helpers before
// it sleeps: $BUSI_JAX_SPIN_US microseconds (default 100; 0 sleeps at once,
// for machines with more busy threads than cores), like OpenMP's
// KMP_BLOCKTIME. Read whenever a caller would wait, so a process can change it.
inline std::chrono::microseconds SpinMicroseconds() {
  const char* v = std::getenv("BUSI_JAX_SPIN_US");
  if (v == nullptr || *v == '\0') return std::chrono::microseconds(100);
  char* end = nullptr;
  const long us = std::strtol(v, &end, 10);
  return std::chrono::microseconds(*end == '\0' && us > 0 ? us : 0);
}

// fn(t) for every t < tasks, on at most `participants` threads (the caller
// included); returns when all are done.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t participants,
                        const std::function<void(int64_t)>& fn) {
  struct State {
    const std::function<void(int64_t)>* fn;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;  // For cv only.
    std::condition_variable cv;

    void Run() {
      int64_t finished = 0;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        (*fn)(t);
        ++finished;
      }
      if (finished == 0 || done.fetch_add(finished) + finished != tasks) return;
      // Under mu: a caller between its check and its wait holds it, so this
      // notify cannot fall in that gap.
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
    bool Finished() const { return done.load(std::memory_order_acquire) == tasks; }
  };
  if (tasks <= 0) return;
  auto state = std::make_shared<State>();
  state->fn = &fn;
  state->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(
      {participants - 1, std::max<int64_t>(pool.num_threads(), 0), tasks - 1});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  if (state->Finished()) return;
  // A helper still on its last task usually finishes within microseconds:
  // spin up to SpinMicroseconds() for it before sleeping, since a futex
  // sleep and wake costs about as much, on every call (batch-1 inference
  // makes ~40 calls of well under a millisecond each).
  const auto until = std::chrono::steady_clock::now() + SpinMicroseconds();
  while (!state->Finished()) {
    for (int i = 0; i < 32; ++i) BUSI_PAUSE();
    if (std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait(lock, [&] { return state->Finished(); });
      return;
    }
  }
}

}  // namespace busi

#endif  // BUSI_JAX_CSRC_PARALLEL_H_
