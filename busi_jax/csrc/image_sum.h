// Shared by the weight-gradient kernels (conv_wgrad.cc, conv_amx.cc): a sum
// over the images of a batch, spread over the calling thread and XLA's
// intra-op thread pool (parallel.h).
//
// The batch is cut into a number of contiguous chunks fixed by the shapes
// (ChunkCount). Whichever participant is free takes the next chunk and adds
// its images, in order, into that chunk's own float32 buffer; the chunk
// buffers are then added in chunk order. Float sums therefore happen in the
// same order on every call, however the threads were scheduled: the same
// inputs give bit-identical weight gradients (a run's results do not depend
// on machine load), and no two threads ever write the same memory. Tasks
// that start after every chunk is taken return at once, so the caller never
// waits on them. busi_jax/native.py hashes this header into each kernel's
// build key.

#ifndef BUSI_JAX_CSRC_IMAGE_SUM_H_
#define BUSI_JAX_CSRC_IMAGE_SUM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace busi {

// Enough chunks to keep a few cores busy; few enough that zeroing and adding
// the chunk buffers stays small next to the gradient itself: large kernels
// (256x256 channels at 8 px) get two. The count depends on shapes only.
constexpr int64_t kChunks = 4;
constexpr int64_t kChunkFloats = int64_t{1} << 20;  // 4 MB of buffers

inline int64_t ChunkCount(int64_t batch, int64_t size) {
  const int64_t by_memory = std::max<int64_t>(2, kChunkFloats / std::max<int64_t>(size, 1));
  return std::max<int64_t>(1, std::min({batch, kChunks, by_memory}));
}

// out[0..size) = sum over b < batch of image_fn(b, acc), where image_fn adds
// image b's contribution into acc (float32[size], zeroed before the chunk's
// first image). ImageFn is copied once per chunk (its scratch buffers).
template <typename ImageFn>
void SumOverImages(xla::ffi::ThreadPool& pool, int64_t batch, int64_t size, float* out,
                   const ImageFn& image_fn) {
  if (batch == 0) {
    std::fill(out, out + size, 0.0f);
    return;
  }
  const int64_t chunks = ChunkCount(batch, size);
  std::vector<std::vector<float>> partial(chunks);
  ParallelFor(pool, chunks, chunks, [&](int64_t c) {
    ImageFn fn = image_fn;  // Its own scratch buffers.
    std::vector<float>& acc = partial[c];
    acc.assign(size, 0.0f);
    for (int64_t b = c * batch / chunks; b < (c + 1) * batch / chunks; ++b) fn(b, acc.data());
  });
  std::memcpy(out, partial[0].data(), size * sizeof(float));
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = partial[c].data();
    for (int64_t k = 0; k < size; ++k) out[k] += p[k];
  }
}

}  // namespace busi

#endif  // BUSI_JAX_CSRC_IMAGE_SUM_H_
