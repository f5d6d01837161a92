// The gradient of 2x2 stride-2 max pooling, added to the pooled activation's
// other gradient in the same pass (issue #9).
//
//   dx = gx + unpool(gp),  unpool(gp)[window k] = gp / ties where x_k == max
//
// x [B, H, W, C] is the pool's input (H, W even), p [B, H/2, W/2, C] its
// output, gp p's cotangent and gx x's cotangent from its other uses (a
// U-Net's skip connection). A window's tied maxima split its gradient evenly,
// as the gradient of jnp.max does (busi_jax.models.blocks.max_pool2). All
// four arrays share one dtype, float32 or bfloat16; the sum is float32,
// rounded once. Why a kernel: XLA:CPU ran this pass on bf16 activations as a
// slow fused loop, and the addition of the skip gradient as another (12 ms
// of the width-16 U-Net's bf16 train step, 8 ms of the U-Net++'s, in the
// in-process A/B of docs/BENCHMARKS.md, fifteenth session).
// Tasks are fixed runs of pooled rows (parallel.h); no sums cross tasks, so
// the result does not depend on the threads. busi_jax/native.py builds it.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using busi::bf16;
using busi::Load;
using busi::Store;

struct PoolShape {
  int64_t B, H, W, C;
};

// One window pixel's channels: d = g + (x == m ? share : 0). A function of
// its own so that its restrict parameters let g++ vectorise the loop without
// run-time alias checks (with pointers into one array it did not).
template <typename T>
__attribute__((noinline)) void AddShare(const T* __restrict x, const T* __restrict g,
                                        const float* __restrict m,
                                        const float* __restrict share, T* __restrict d,
                                        int64_t C) {
  for (int64_t c = 0; c < C; ++c)
    Store(d + c, Load(g + c) + (Load(x + c) == m[c] ? share[c] : 0.0f));
}

template <typename T>
void PooledRow(const T* x, const T* p, const T* gx, const T* gp, T* dx, const PoolShape& s,
               int64_t row, float* m, float* share) {
  const int64_t b = row / (s.H / 2), i = row % (s.H / 2), wo = s.W / 2, C = s.C;
  const int64_t top = ((b * s.H + 2 * i) * s.W) * C, below = s.W * C;
  const int64_t out = row * wo * C;
  for (int64_t j = 0; j < wo; ++j) {
    const int64_t k[4] = {top + 2 * j * C, top + 2 * j * C + C, top + 2 * j * C + below,
                          top + 2 * j * C + below + C};
    const T* pr = p + out + j * C;
    const T* gr = gp + out + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const float mc = Load(pr + c);
      const float ties = (Load(x + k[0] + c) == mc ? 1.0f : 0.0f) +
                         (Load(x + k[1] + c) == mc ? 1.0f : 0.0f) +
                         (Load(x + k[2] + c) == mc ? 1.0f : 0.0f) +
                         (Load(x + k[3] + c) == mc ? 1.0f : 0.0f);
      m[c] = mc;
      share[c] = Load(gr + c) / ties;
    }
    for (int q = 0; q < 4; ++q) AddShare(x + k[q], gx + k[q], m, share, dx + k[q], C);
  }
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const void* x, const void* p, const void* gx, const void* gp,
              void* dx, const PoolShape& s) {
  const int64_t rows = s.B * (s.H / 2), per_row = (s.W / 2) * s.C;
  // ~16K pooled values (~225 KB of bf16 traffic) per task, at most 256 tasks.
  const int64_t want = std::clamp<int64_t>((rows * per_row) >> 14, 1, 256);
  const int64_t rows_per_task = (rows + want - 1) / want;
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  const int64_t participants =
      rows * per_row < (int64_t{1} << 13) ? 1 : std::max<int64_t>(pool.num_threads(), 0) + 1;
  busi::ParallelFor(pool, tasks, participants, [&](int64_t t) {
    std::vector<float> m(s.C), share(s.C);
    const int64_t r1 = std::min(rows, (t + 1) * rows_per_task);
    for (int64_t r = t * rows_per_task; r < r1; ++r)
      PooledRow(static_cast<const T*>(x), static_cast<const T*>(p), static_cast<const T*>(gx),
                static_cast<const T*>(gp), static_cast<T*>(dx), s, r, m.data(), share.data());
  });
}

}  // namespace

ffi::Error MaxPoolBackward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer p,
                           ffi::AnyBuffer gx, ffi::AnyBuffer gp, ffi::Result<ffi::AnyBuffer> dx) {
  const auto xd = x.dimensions(), pd = p.dimensions();
  const ffi::DataType t = x.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("busi_max_pool_backward: x must be float32 or bfloat16");
  for (const ffi::AnyBuffer* b : {&p, &gx, &gp})
    if (b->element_type() != t)
      return ffi::Error::InvalidArgument("busi_max_pool_backward: all arrays must share x's dtype");
  if (dx->element_type() != t)
    return ffi::Error::InvalidArgument("busi_max_pool_backward: dx must share x's dtype");
  if (xd.size() != 4 || pd.size() != 4 || xd[1] % 2 != 0 || xd[2] % 2 != 0)
    return ffi::Error::InvalidArgument(
        "busi_max_pool_backward: x must be [B, H, W, C] with H and W even");
  if (pd[0] != xd[0] || pd[1] != xd[1] / 2 || pd[2] != xd[2] / 2 || pd[3] != xd[3] ||
      gx.element_count() != x.element_count() || gp.element_count() != p.element_count() ||
      dx->element_count() != x.element_count())
    return ffi::Error::InvalidArgument(
        "busi_max_pool_backward: p and gp must be [B, H/2, W/2, C], gx and dx shaped as x");
  const PoolShape s{xd[0], xd[1], xd[2], xd[3]};
  if (t == ffi::DataType::BF16) {
    Backward<bf16>(pool, x.untyped_data(), p.untyped_data(), gx.untyped_data(),
                   gp.untyped_data(), dx->untyped_data(), s);
  } else {
    Backward<float>(pool, x.untyped_data(), p.untyped_data(), gx.untyped_data(),
                    gp.untyped_data(), dx->untyped_data(), s);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [B, H, W, C], the pool's input
                                  .Arg<ffi::AnyBuffer>()  // p [B, H/2, W/2, C], its output
                                  .Arg<ffi::AnyBuffer>()  // gx, x's other cotangent
                                  .Arg<ffi::AnyBuffer>()  // gp, p's cotangent
                                  .Ret<ffi::AnyBuffer>()  // dx, as x
);
