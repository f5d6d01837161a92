// Training-mode BatchNorm followed by ReLU on CPU: the forward pass and its
// gradient, each as two passes over the activations (issue #9).
//
//   forward:  mean, var = per-channel batch statistics of x   (pass 1)
//             y = max(0, (x - mean) * rsqrt(var + eps) * scale + bias)   (pass 2)
//   backward: gz = g where y > 0 else 0
//             dbias = sum gz,  dscale = sum gz * xhat          (pass 1)
//             dx = scale * rstd * (gz - dbias / n - xhat * dscale / n)   (pass 2)
//
// with xhat = (x - mean) * rstd and n the number of rows (all axes but the
// last, the channels). x and y are float32 or bfloat16, each read and written
// in its own dtype; all arithmetic is float32, the statistics are combined in
// double. Why a kernel: XLA:CPU splits these per-channel sums of a
// [16, 128, 128, 16] activation into reduce-window ops that run at ~1 GB/s,
// and materialises a float32 copy of every bf16 activation for them; in the
// width-16 U-Net++ bf16 train step the BatchNorm + ReLU passes took ~25% of
// the step (docs/BENCHMARKS.md). Plain loops over a row block of 64 values
// (several rows when there are fewer channels), which g++ -O3 -march=native
// turns into whatever vector code the CPU has; busi_jax/native.py builds it.
//
// Rows are cut into tasks fixed by the shape (parallel.h); each task keeps
// its own partial sums, added in task order, so the statistics and gradients
// are the same bits on every call.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using busi::bf16;
using busi::Load;
using busi::Store;

// How the rows [0, n) of an [n, c] array are cut. A block is `rows_per_block`
// rows, `width` = c * rows_per_block values; per-channel coefficients are
// repeated to that width so the inner loops run over whole blocks.
struct Layout {
  int64_t n, c, rows_per_block, width, tasks, rows_per_task, participants;

  Layout(int64_t n_, int64_t c_, int64_t pool_threads) : n(n_), c(c_) {
    rows_per_block = std::max<int64_t>(1, 64 / c);
    width = c * rows_per_block;
    // ~64K values per task (128 KB of bf16: a core's L2 holds a task's
    // inputs), at most 256 tasks; whole blocks per task.
    const int64_t want = std::clamp<int64_t>((n * c) >> 16, 1, 256);
    const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
    rows_per_task = std::max<int64_t>(1, (blocks + want - 1) / want) * rows_per_block;
    tasks = n == 0 ? 0 : (n + rows_per_task - 1) / rows_per_task;
    // Waking a helper costs about as much as a pass over ~32K values.
    participants = n * c < (int64_t{1} << 15) ? 1 : pool_threads + 1;
  }

  std::vector<float> Repeat(const std::vector<float>& per_channel) const {
    std::vector<float> out(width);
    for (int64_t k = 0; k < width; ++k) out[k] = per_channel[k % c];
    return out;
  }

  // Per-channel double sums of a task-major partial-sum array [tasks, width].
  std::vector<double> Fold(const std::vector<float>& partial) const {
    std::vector<double> out(c, 0.0);
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t k = 0; k < width; ++k) out[k % c] += partial[t * width + k];
    return out;
  }
};

// Calls block(offset, count) over task t's rows, `count` values from value
// `offset`: whole blocks of l.width values (count is then the compile-time
// kW where kW > 0, so the block loops unroll into registers), then a shorter
// tail of c values a row, only where n is not a multiple of rows_per_block.
template <int64_t kW, typename Block>
void ForBlocks(const Layout& l, int64_t t, const Block& block) {
  const int64_t r0 = t * l.rows_per_task, r1 = std::min(l.n, r0 + l.rows_per_task);
  int64_t r = r0;
  for (; r + l.rows_per_block <= r1; r += l.rows_per_block) {
    if constexpr (kW > 0) {
      block(r * l.c, std::integral_constant<int64_t, kW>{});
    } else {
      block(r * l.c, l.width);
    }
  }
  for (; r < r1; ++r) block(r * l.c, l.c);
}

// A task's copy of `width` floats: on the stack where the width is known at
// compile time (the compiler then keeps it in registers), else `fallback`.
template <int64_t kW>
struct Local {
  alignas(64) float v[kW > 0 ? kW : 1];
  float* p;
  Local(float* fallback, const float* init, int64_t width) {
    p = kW > 0 ? v : fallback;
    if (init) std::copy(init, init + width, p);
    else std::fill(p, p + width, 0.0f);
  }
};

template <int64_t kW, typename TX, typename TY>
void ForwardImpl(ffi::ThreadPool& pool, const TX* x, const float* scale, const float* bias,
                 TY* y, float* mean_out, float* var_out, float eps, const Layout& l) {
  const int64_t w = l.width;
  std::vector<float> sums(l.tasks * w), squares(l.tasks * w);
  busi::ParallelFor(pool, l.tasks, l.participants, [&](int64_t t) {
    Local<kW> s(&sums[t * w], nullptr, w), q(&squares[t * w], nullptr, w);
    ForBlocks<kW>(l, t, [&](int64_t off, auto count) {
      const TX* __restrict xb = x + off;
      for (int64_t k = 0; k < count; ++k) {
        const float v = Load(xb + k);
        s.p[k] += v;
        q.p[k] += v * v;
      }
    });
    if (kW > 0) {
      std::copy(s.p, s.p + w, &sums[t * w]);
      std::copy(q.p, q.p + w, &squares[t * w]);
    }
  });
  const std::vector<double> s = l.Fold(sums), q = l.Fold(squares);
  std::vector<float> a(l.c), b(l.c);
  for (int64_t ch = 0; ch < l.c; ++ch) {
    const double m = l.n ? s[ch] / l.n : 0.0;
    const double v = l.n ? std::max(q[ch] / l.n - m * m, 0.0) : 0.0;
    mean_out[ch] = static_cast<float>(m);
    var_out[ch] = static_cast<float>(v);
    const double ac = scale[ch] / std::sqrt(v + eps);
    a[ch] = static_cast<float>(ac);
    b[ch] = static_cast<float>(bias[ch] - m * ac);
  }
  std::vector<float> aw = l.Repeat(a), bw = l.Repeat(b);
  busi::ParallelFor(pool, l.tasks, l.participants, [&](int64_t t) {
    const Local<kW> ac(aw.data(), aw.data(), w), bc(bw.data(), bw.data(), w);
    ForBlocks<kW>(l, t, [&](int64_t off, auto count) {
      const TX* __restrict xb = x + off;
      TY* __restrict yb = y + off;
      for (int64_t k = 0; k < count; ++k)
        Store(yb + k, std::max(Load(xb + k) * ac.p[k] + bc.p[k], 0.0f));
    });
  });
}

template <int64_t kW, typename TX, typename TY>
void BackwardImpl(ffi::ThreadPool& pool, const TX* x, const TY* y, const TY* g,
                  const float* mean, const float* var, const float* scale, TX* dx,
                  float* dscale_out, float* dbias_out, float eps, const Layout& l) {
  const int64_t w = l.width;
  std::vector<float> mw = l.Repeat(std::vector<float>(mean, mean + l.c));
  std::vector<float> gsum(l.tasks * w), gxsum(l.tasks * w);
  busi::ParallelFor(pool, l.tasks, l.participants, [&](int64_t t) {
    Local<kW> sg(&gsum[t * w], nullptr, w), sgx(&gxsum[t * w], nullptr, w);
    const Local<kW> m(mw.data(), mw.data(), w);
    ForBlocks<kW>(l, t, [&](int64_t off, auto count) {
      const TX* __restrict xb = x + off;
      const TY* __restrict yb = y + off;
      const TY* __restrict gb = g + off;
      for (int64_t k = 0; k < count; ++k) {
        const float gz = Load(yb + k) > 0.0f ? Load(gb + k) : 0.0f;
        sg.p[k] += gz;
        sgx.p[k] += gz * (Load(xb + k) - m.p[k]);
      }
    });
    if (kW > 0) {
      std::copy(sg.p, sg.p + w, &gsum[t * w]);
      std::copy(sgx.p, sgx.p + w, &gxsum[t * w]);
    }
  });
  const std::vector<double> sg = l.Fold(gsum), sgx = l.Fold(gxsum);
  // dx = k1 * gz + k2 * x + k3, per channel.
  std::vector<float> k1(l.c), k2(l.c), k3(l.c);
  for (int64_t ch = 0; ch < l.c; ++ch) {
    const double rstd = 1.0 / std::sqrt(static_cast<double>(var[ch]) + eps);
    const double dscale = sgx[ch] * rstd;
    dscale_out[ch] = static_cast<float>(dscale);
    dbias_out[ch] = static_cast<float>(sg[ch]);
    const double inv_n = l.n ? 1.0 / l.n : 0.0;
    const double a = scale[ch] * rstd;
    const double slope = -a * rstd * dscale * inv_n;
    k1[ch] = static_cast<float>(a);
    k2[ch] = static_cast<float>(slope);
    k3[ch] = static_cast<float>(-a * sg[ch] * inv_n - slope * mean[ch]);
  }
  std::vector<float> k1w = l.Repeat(k1), k2w = l.Repeat(k2), k3w = l.Repeat(k3);
  busi::ParallelFor(pool, l.tasks, l.participants, [&](int64_t t) {
    const Local<kW> c1(k1w.data(), k1w.data(), w), c2(k2w.data(), k2w.data(), w),
        c3(k3w.data(), k3w.data(), w);
    ForBlocks<kW>(l, t, [&](int64_t off, auto count) {
      const TX* __restrict xb = x + off;
      const TY* __restrict yb = y + off;
      const TY* __restrict gb = g + off;
      TX* __restrict db = dx + off;
      for (int64_t k = 0; k < count; ++k) {
        const float gz = Load(yb + k) > 0.0f ? Load(gb + k) : 0.0f;
        Store(db + k, gz * c1.p[k] + Load(xb + k) * c2.p[k] + c3.p[k]);
      }
    });
  });
}

bool Float(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

// Rows and channels of x ([..., C], C >= 1), or an error naming the kernel.
ffi::ErrorOr<std::pair<int64_t, int64_t>> RowsChannels(const ffi::AnyBuffer& x,
                                                        const char* kernel) {
  const auto d = x.dimensions();
  if (d.size() < 1 || d.back() < 1 || !Float(x.element_type()))
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(kernel) + ": x must be float32 or bfloat16 [..., C] with C >= 1"));
  const int64_t c = d.back();
  return std::make_pair(static_cast<int64_t>(x.element_count()) / c, c);
}

ffi::Error PerChannel(std::initializer_list<const ffi::Buffer<ffi::F32>*> bufs, int64_t c,
                      const char* kernel) {
  for (const auto* b : bufs)
    if (static_cast<int64_t>(b->element_count()) != c)
      return ffi::Error::InvalidArgument(std::string(kernel) +
                                         ": per-channel arrays must hold one value per channel");
  return ffi::Error::Success();
}

ffi::Error SameShape(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, bool same_type,
                     const char* what) {
  if (a.element_count() != b.element_count() || !Float(b.element_type()) ||
      (same_type && a.element_type() != b.element_type()))
    return ffi::Error::InvalidArgument(std::string(what));
  return ffi::Error::Success();
}

// Calls fn(kw, tx, ty): the block width as a compile-time constant where it
// is a common one (0 otherwise) and null pointers of the two element types.
template <typename Fn>
void Dispatch(int64_t width, ffi::DataType x, ffi::DataType y, const Fn& fn) {
  const auto types = [&](auto kw) {
    const bool xb = x == ffi::DataType::BF16, yb = y == ffi::DataType::BF16;
    if (xb && yb) fn(kw, static_cast<const bf16*>(nullptr), static_cast<const bf16*>(nullptr));
    if (xb && !yb) fn(kw, static_cast<const bf16*>(nullptr), static_cast<const float*>(nullptr));
    if (!xb && yb) fn(kw, static_cast<const float*>(nullptr), static_cast<const bf16*>(nullptr));
    if (!xb && !yb) fn(kw, static_cast<const float*>(nullptr), static_cast<const float*>(nullptr));
  };
  if (width == 64) return types(std::integral_constant<int64_t, 64>{});
  if (width == 128) return types(std::integral_constant<int64_t, 128>{});
  if (width == 256) return types(std::integral_constant<int64_t, 256>{});
  types(std::integral_constant<int64_t, 0>{});
}

}  // namespace

ffi::Error BnReluForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::Buffer<ffi::F32>> mean,
                         ffi::Result<ffi::Buffer<ffi::F32>> var, float epsilon) {
  constexpr const char* kName = "busi_bn_relu_forward";
  auto nc = RowsChannels(x, kName);
  if (nc.has_error()) return nc.error();
  const auto [n, c] = *nc;
  if (ffi::Error e = PerChannel({&scale, &bias}, c, kName); e.failure()) return e;
  if (ffi::Error e = SameShape(x, *y, false, "busi_bn_relu_forward: y must be shaped as x");
      e.failure())
    return e;
  if (mean->element_count() != static_cast<size_t>(c) ||
      var->element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("busi_bn_relu_forward: mean and var must be [C]");
  const Layout l(n, c, std::max<int64_t>(pool.num_threads(), 0));
  Dispatch(l.width, x.element_type(), y->element_type(), [&](auto kw, auto tx, auto ty) {
    using TX = std::remove_const_t<std::remove_pointer_t<decltype(tx)>>;
    using TY = std::remove_const_t<std::remove_pointer_t<decltype(ty)>>;
    ForwardImpl<decltype(kw)::value>(pool, static_cast<const TX*>(x.untyped_data()),
                                     scale.typed_data(), bias.typed_data(),
                                     static_cast<TY*>(y->untyped_data()), mean->typed_data(),
                                     var->typed_data(), epsilon, l);
  });
  return ffi::Error::Success();
}

ffi::Error BnReluBackward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer y,
                          ffi::AnyBuffer g, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                          ffi::Buffer<ffi::F32> scale, ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                          ffi::Result<ffi::Buffer<ffi::F32>> dbias, float epsilon) {
  constexpr const char* kName = "busi_bn_relu_backward";
  auto nc = RowsChannels(x, kName);
  if (nc.has_error()) return nc.error();
  const auto [n, c] = *nc;
  if (ffi::Error e = PerChannel({&mean, &var, &scale}, c, kName); e.failure()) return e;
  for (ffi::Error e :
       {SameShape(x, y, false, "busi_bn_relu_backward: y must be shaped as x"),
        SameShape(x, *dx, true, "busi_bn_relu_backward: dx must be x's shape and dtype"),
        SameShape(y, g, true, "busi_bn_relu_backward: g must be y's shape and dtype")})
    if (e.failure()) return e;
  if (dscale->element_count() != static_cast<size_t>(c) ||
      dbias->element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("busi_bn_relu_backward: dscale and dbias must be [C]");
  const Layout l(n, c, std::max<int64_t>(pool.num_threads(), 0));
  Dispatch(l.width, x.element_type(), y.element_type(), [&](auto kw, auto tx, auto ty) {
    using TX = std::remove_const_t<std::remove_pointer_t<decltype(tx)>>;
    using TY = std::remove_const_t<std::remove_pointer_t<decltype(ty)>>;
    BackwardImpl<decltype(kw)::value>(
        pool, static_cast<const TX*>(x.untyped_data()), static_cast<const TY*>(y.untyped_data()),
        static_cast<const TY*>(g.untyped_data()), mean.typed_data(), var.typed_data(),
        scale.typed_data(), static_cast<TX*>(dx->untyped_data()), dscale->typed_data(),
        dbias->typed_data(), epsilon, l);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiBnReluForward, BnReluForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [C]
                                  .Ret<ffi::AnyBuffer>()        // y, shaped as x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // batch mean [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // biased batch variance [C]
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiBnReluBackward, BnReluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x [..., C]
                                  .Arg<ffi::AnyBuffer>()        // y, the forward's output
                                  .Arg<ffi::AnyBuffer>()        // g, y's cotangent
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [C]
                                  .Ret<ffi::AnyBuffer>()        // dx, as x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias [C]
                                  .Attr<float>("epsilon"));
