// Shared by the weight-gradient kernels (conv_wgrad.cc, conv_amx.cc): a sum
// over the images of a batch, spread over the calling thread and XLA's
// intra-op thread pool.
//
// Images are handed out one at a time by an atomic counter; each participant
// adds its images into its own float32 buffer, and the buffers are added up
// at the end, so no two threads ever write the same memory. Tasks that start
// after every image is taken return at once, so the caller never waits on
// them. busi_jax/native.py hashes this header into each kernel's build key.

#ifndef BUSI_JAX_CSRC_IMAGE_SUM_H_
#define BUSI_JAX_CSRC_IMAGE_SUM_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace busi {

// out[0:size] = sum over b < batch of the buffers that image_fn(b, acc)
// adds into (acc starts at zero). Each participant works on its own copy of
// image_fn, so state it captures by value (scratch buffers) is per thread.
template <typename ImageFn>
void SumOverImages(xla::ffi::ThreadPool& pool, int64_t batch, int64_t size, float* out,
                   const ImageFn& image_fn) {
  struct Work {
    ImageFn proto;
    int64_t batch, size;
    std::atomic<int64_t> next{0};
    std::atomic<int> slots{0};
    std::vector<std::vector<float>> partial;
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;  // Guarded by mu.

    explicit Work(const ImageFn& fn) : proto(fn) {}

    void Run() {
      int64_t b = next.fetch_add(1);
      if (b >= batch) return;
      std::vector<float>& acc = partial[slots.fetch_add(1)];
      acc.assign(size, 0.0f);
      ImageFn fn = proto;
      int64_t finished = 0;
      for (; b < batch; b = next.fetch_add(1)) {
        fn(b, acc.data());
        ++finished;
      }
      std::lock_guard<std::mutex> lock(mu);
      done += finished;
      if (done == batch) cv.notify_all();
    }
  };
  if (batch == 0) {
    std::fill(out, out + size, 0.0f);
    return;
  }
  auto work = std::make_shared<Work>(image_fn);
  work->batch = batch;
  work->size = size;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 0), batch - 1);
  work->partial.resize(helpers + 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->cv.wait(lock, [&] { return work->done == work->batch; });
  }
  const int used = work->slots.load();
  std::memcpy(out, work->partial[0].data(), size * sizeof(float));
  for (int s = 1; s < used; ++s) {
    const float* p = work->partial[s].data();
    for (int64_t k = 0; k < size; ++k) out[k] += p[k];
  }
}

}  // namespace busi

#endif  // BUSI_JAX_CSRC_IMAGE_SUM_H_
