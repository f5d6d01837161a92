// Weight gradient of a stride-1 2-D convolution, NHWC input, HWIO kernel, float32.
//
//   dW[i, j, c, o] = sum_{b, h, w} x[b, h + i*dil_h - pad_h, w + j*dil_w - pad_w, c] * dy[b, h, w, o]
//
// (x taken as zero outside the image.) XLA:CPU computes this at 20-35 GFLOP/s
// on 32-128 px images on the project's 2-core machine (issue #9); this kernel
// is 1.3-8x faster there and at 16 px, 0.9x at 256 channels on 8 px, without
// materialising patches (python -m busi_jax.bench --wgrad_layers; docs/BENCHMARKS.md).
// Why it is fast: a block of 16 input channels x 16 (or 8) output channels of
// dW lives in 16 vector registers while it sweeps about 128 pixels (one or more
// image rows), so every FMA reads only x (broadcast) and dy (one vector load
// shared by 16 FMAs) and the working set of one image stays in L2.
// Images are spread over XLA's intra-op thread pool by SumOverImages
// (image_sum.h).
//
// Built on first use by busi_jax/native.py (g++ -O3 -march=native) and called
// through jax.ffi from busi_jax/models/conv.py.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "image_sum.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Output channels per vector: 16 (512 bits of float32), or 8 for layers with
// a multiple of 8 but not of 16 output channels (width-8 networks).
template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(L * sizeof(float))));
};

struct Geometry {
  int64_t H, W, C, Ho, Wo, O, KH, KW, dil_h, dil_w, pad_h, pad_w;
};

// acc[c0:c0+CB, o0:o0+L] += sum over rows [h0, h1) of one image.
template <int CB, int L>
inline void BlockRows(const float* x, const float* dy, float* acc, const Geometry& g, int64_t h0,
                      int64_t h1, int64_t c0, int64_t o0, int64_t hoff, int64_t wlo, int64_t whi,
                      int64_t woff) {
  typedef typename Vec<L>::type V;
  V a[CB];
  for (int k = 0; k < CB; ++k) std::memcpy(&a[k], acc + (c0 + k) * g.O + o0, sizeof(V));
  for (int64_t h = h0; h < h1; ++h) {
    const float* xr = x + ((h + hoff) * g.W + wlo + woff) * g.C + c0;
    const float* dr = dy + (h * g.Wo + wlo) * g.O + o0;
    for (int64_t w = 0; w < whi - wlo; ++w) {
      V d;
      std::memcpy(&d, dr + w * g.O, sizeof(V));
      const float* xp = xr + w * g.C;
#pragma GCC unroll 16
      for (int k = 0; k < CB; ++k) a[k] += xp[k] * d;
    }
  }
  for (int k = 0; k < CB; ++k) std::memcpy(acc + (c0 + k) * g.O + o0, &a[k], sizeof(V));
}

// One input channel (the first layer of a grayscale network): four
// accumulators over neighbouring columns, so the FMAs do not wait on each other.
template <int L>
inline void BlockRowsOneChannel(const float* x, const float* dy, float* acc, const Geometry& g,
                                int64_t h0, int64_t h1, int64_t c, int64_t o0, int64_t hoff,
                                int64_t wlo, int64_t whi, int64_t woff) {
  typedef typename Vec<L>::type V;
  V a[4] = {};
  for (int64_t h = h0; h < h1; ++h) {
    const float* xr = x + ((h + hoff) * g.W + wlo + woff) * g.C + c;
    const float* dr = dy + (h * g.Wo + wlo) * g.O + o0;
    const int64_t n = whi - wlo;
    int64_t w = 0;
    for (; w + 4 <= n; w += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        V d;
        std::memcpy(&d, dr + (w + u) * g.O, sizeof(V));
        a[u] += xr[(w + u) * g.C] * d;
      }
    }
    for (; w < n; ++w) {
      V d;
      std::memcpy(&d, dr + w * g.O, sizeof(V));
      a[0] += xr[w * g.C] * d;
    }
  }
  V s;
  std::memcpy(&s, acc + c * g.O + o0, sizeof(V));
  s += (a[0] + a[1]) + (a[2] + a[3]);
  std::memcpy(acc + c * g.O + o0, &s, sizeof(V));
}

// Adds image b's contribution to acc [KH, KW, C, O]; O is a multiple of L.
template <int L>
void OneImage(const float* x, const float* dy, float* acc, const Geometry& g) {
  // About 128 pixels per register pass: long enough to amortise loading and
  // storing the accumulators, short enough that x and dy rows stay in L1/L2.
  const int64_t rows = std::max<int64_t>(1, 128 / std::max<int64_t>(1, g.Wo));
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t hoff = i * g.dil_h - g.pad_h;
    const int64_t hlo = std::max<int64_t>(0, -hoff), hhi = std::min<int64_t>(g.Ho, g.H - hoff);
    for (int64_t h0 = hlo; h0 < hhi; h0 += rows) {
      const int64_t h1 = std::min(hhi, h0 + rows);
      for (int64_t j = 0; j < g.KW; ++j) {
        const int64_t woff = j * g.dil_w - g.pad_w;
        const int64_t wlo = std::max<int64_t>(0, -woff), whi = std::min<int64_t>(g.Wo, g.W - woff);
        if (whi <= wlo) continue;
        float* a = acc + (i * g.KW + j) * g.C * g.O;
        for (int64_t o0 = 0; o0 < g.O; o0 += L) {
          int64_t c0 = 0;
          if (g.C >= 4) {
            for (; c0 + 16 <= g.C; c0 += 16)
              BlockRows<16, L>(x, dy, a, g, h0, h1, c0, o0, hoff, wlo, whi, woff);
            for (; c0 + 4 <= g.C; c0 += 4)
              BlockRows<4, L>(x, dy, a, g, h0, h1, c0, o0, hoff, wlo, whi, woff);
          }
          for (; c0 < g.C; ++c0)
            BlockRowsOneChannel<L>(x, dy, a, g, h0, h1, c0, o0, hoff, wlo, whi, woff);
        }
      }
    }
  }
}

ffi::Error ConvWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                     ffi::ResultBuffer<ffi::F32> dw, int64_t dil_h, int64_t dil_w, int64_t pad_h,
                     int64_t pad_w) {
  auto xd = x.dimensions();
  auto yd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("busi_conv_wgrad: x, dy and dW must be rank 4");
  if (xd[0] != yd[0] || xd[3] != wd[2] || yd[3] != wd[3])
    return ffi::Error::InvalidArgument(
        "busi_conv_wgrad: shapes disagree (x [B,H,W,C], dy [B,Ho,Wo,O], dW [KH,KW,C,O])");
  if (wd[3] % 8 != 0)
    return ffi::Error::InvalidArgument("busi_conv_wgrad: output channels must be a multiple of 8");
  const Geometry g{xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
                   wd[0], wd[1], dil_h, dil_w, pad_h, pad_w};
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  busi::SumOverImages(pool, xd[0], wd[0] * wd[1] * wd[2] * wd[3], dw->typed_data(),
                      [=](int64_t b, float* acc) {
                        const float* xb = xs + b * g.H * g.W * g.C;
                        const float* db = dys + b * g.Ho * g.Wo * g.O;
                        if (g.O % 16 == 0) {
                          OneImage<16>(xb, db, acc, g);
                        } else {
                          OneImage<8>(xb, db, acc, g);
                        }
                      });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvWgrad, ConvWgrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW
                                  .Attr<int64_t>("dil_h")
                                  .Attr<int64_t>("dil_w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
