// Stride-1 2-D convolution on Intel AMX: NHWC input, HWIO kernel, float32 or
// bfloat16 in and out, bfloat16 products accumulated in float32.
//
//   y[b, h, w, o] = sum_{i, j, c} bf16(x[b, h + i*dil_h - pad_h, w + j*dil_w - pad_w, c])
//                                 * bf16(k[i, j, c, o])
//
// (x taken as zero outside the image; the output's size comes from y's shape,
// so any padding on the far side works.) busi_jax/models/conv.py uses it for
// the forward pass and, with the kernel flipped and transposed, the input
// gradient (issue #9: XLA:CPU's convolutions, fp32 and bf16 alike, run on the
// AVX-512 units; these CPUs also have AMX tile units that multiply bf16
// matrices several times faster, which is where PyTorch's bf16 lead comes from).
//
// How: each task takes one image and a band of its output rows. It first
// copies the input rows the band needs into a zero-padded bf16 buffer (small
// enough for L2), so every tap (i, j) of every M-pixel run of an output row is
// a plain strided tile load: tile rows are M consecutive pixels, tile columns
// K channels (M = 16 or 8, K = 32 or 16). The kernel is packed once per call
// into AMX's pair-interleaved ("VNNI") layout, 16 output channels per tile
// (or once for every call: BusiConvAmxPack, then the `packed` attribute).
// Up to four accumulator tiles (pixel runs x output-channel blocks) collect
// all taps and channels before one store into y. The weight gradient, the
// third pass, is the second handler in this file (BusiConvAmxWgrad).
//
// CPUs without AMX but with AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake) run
// the same three passes on vdpbf16ps instead (MicroAvx, WgradAvx: same
// buffers, same packed kernel, same sums up to float32 summation order);
// every handler's `unit` attribute picks the path (0: AMX, 1: AVX-512 BF16;
// busi_jax.models.conv.bf16_unit chooses). There the forward handlers'
// `winograd` attribute computes 3x3 'SAME' convolutions by Winograd
// F(2x2, 3x3) instead (ConvWinograd: 2.25x fewer products).
//
// Requires C and O multiples of 16 and Wo a multiple of 8 (the Python side
// checks; other convolutions stay on XLA). Built on first use by
// busi_jax/native.py; the AMX and AVX-512 BF16 code carries its own target
// attributes, so the library compiles on any x86-64 g++ >= 11, and a CPU or
// kernel without the unit asked for gets an error from the first call,
// never wrong numbers.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "image_sum.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define BUSI_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
// The AVX-512 BF16 path and the helpers both paths share: no AMX instruction.
#define BUSI_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Which unit multiplies (the handlers' `unit` attribute).
constexpr int64_t kUnitAmx = 0;
constexpr int64_t kUnitAvx512Bf16 = 1;

bool HasAvx512Bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature.
constexpr long kXfeatureXtiledata = 18;     // AMX tile data.

// Linux hands out AMX state only to processes that ask for it, once.
bool AmxPermitted() {
  static const bool ok =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two rows of 16 values (float32 or bf16) as AMX's pair-interleaved bf16:
// [a0, b0, a1, b1, ..., a15, b15], one 64-byte vector.
BUSI_BF16 inline __m512i InterleaveRows(const void* a, const void* b, bool bf16) {
  alignas(64) static const uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                  21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                  11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  __m512i ab;
  if (bf16) {
    ab = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(a))),
        _mm256_loadu_si256(static_cast<const __m256i*>(b)), 1);
  } else {
    // cvtne2ps packs its second operand first: [a0..a15, b0..b15].
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(static_cast<const float*>(b)),
                                     _mm512_loadu_ps(static_cast<const float*>(a)));
    ab = reinterpret_cast<__m512i&>(v);
  }
  return _mm512_permutexvar_epi16(_mm512_load_si512(kPairs), ab);
}

// The input's channels may come from several tensors, side by side as if
// concatenated (U-Net skips; BusiConvAmxConcatAffineRelu): the padding copy
// reads each part into its channel range, so the concatenation is never
// written out.
struct Part {
  const void* x;  // [B, H, W, C] of this part
  int64_t C;      // its channels, a multiple of 16
  bool bf16;      // element type (else float32)
};

struct Geometry {
  int64_t H, W, C, Ho, Wo, O, KH, KW, dil_h, dil_w, pad_h, pad_w;
  int64_t M;  // pixels per tile (16 or 8); divides Wo
  int64_t K;  // channels per tile (32 or 16); divides C
  int64_t band;  // output rows per task
  bool y_bf16;  // element type of y (else float32)
  int64_t unit = kUnitAmx;  // kUnitAmx: tiles; kUnitAvx512Bf16: K = C, MicroAvx
  // Optional epilogue y = max(0, conv * scale[o] + shift[o]): an eval-mode
  // BatchNorm and ReLU folded into the store (BusiConvAmxAffineRelu); without
  // the max where relu is false.
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = true;
  // A 2x2 pixel shuffle in the store (a transposed conv's matmul at
  // inference): conv channel (a, b, o) of pixel (h, w), with a, b in {0, 1}
  // and o < O / 4, goes to pixel (2h + a, 2w + b), channel o of y
  // [B, 2 Ho, 2 Wo, O / 4]. (Output row h's first element in this layout is
  // OutRow(y, g, b, h), so only the offset within the row changes.)
  bool shuffle = false;
};

// Element offset of (pixel w, channels o0..o0+15) from OutRow's pointer.
inline int64_t OutOffset(const Geometry& g, int64_t w, int64_t o0) {
  if (!g.shuffle) return w * g.O + o0;
  const int64_t o4 = g.O / 4, a = o0 / (2 * o4), b = (o0 / o4) % 2;
  return a * 2 * g.Wo * o4 + (2 * w + b) * o4 + o0 % o4;
}

// Geometry::K for C input channels on `unit`.
inline int64_t ChannelsPerTile(int64_t unit, int64_t C) {
  if (unit == kUnitAvx512Bf16) return C;  // MicroAvx walks a tap's channels in one run.
  return C % 32 == 0 ? 32 : 16;
}

// Output row h of image b.
inline char* OutRow(void* y, const Geometry& g, int64_t b, int64_t h) {
  return static_cast<char*>(y) + (b * g.Ho + h) * g.Wo * g.O * (g.y_bf16 ? 2 : 4);
}

// Tiles: accumulators 0-3, inputs 4 and 7 (alternating), kernel 5 and 6.
// Accumulator of pixel run p and output block q: p * NO + q.
// Accumulator tile -> y at (pixel w0, output channel o0): a direct store for
// float32 y without epilogue; otherwise through a float32 scratch tile,
// row by row (epilogue, then rounding for bf16 y).
#define BUSI_STORE_TILE(t, w0, o0)                                                   \
  do {                                                                              \
    if (!g.y_bf16 && g.scale == nullptr && !g.shuffle) {                            \
      _tile_stored(t, static_cast<float*>(yrow) + (w0) * g.O + (o0), g.O * 4);      \
      break;                                                                        \
    }                                                                               \
    _tile_stored(t, scratch, 64);                                                   \
    StoreRows(scratch, yrow, g, w0, o0);                                            \
  } while (0)

// M rows of 16 float32 sums in scratch -> y row pixels w0.., channels o0..o0+15.
BUSI_BF16 inline void StoreRows(const float* scratch, void* yrow, const Geometry& g, int64_t w0,
                               int64_t o0) {
  __m512 scale = _mm512_set1_ps(1.0f), shift = _mm512_setzero_ps();
  if (g.scale != nullptr) {
    scale = _mm512_loadu_ps(g.scale + o0);
    shift = _mm512_loadu_ps(g.shift + o0);
  }
  for (int64_t m = 0; m < g.M; ++m) {
    __m512 v = _mm512_load_ps(scratch + m * 16);
    if (g.scale != nullptr) v = _mm512_fmadd_ps(v, scale, shift);
    if (g.scale != nullptr && g.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
    const int64_t at = OutOffset(g, w0 + m, o0);
    if (g.y_bf16) {
      __m256bh b = _mm512_cvtneps_pbh(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(yrow) + at),
                          reinterpret_cast<__m256i&>(b));
    } else {
      _mm512_storeu_ps(static_cast<float*>(yrow) + at, v);
    }
  }
}

template <int NP, int NO>
BUSI_AMX inline void Micro(const uint16_t* in, const uint16_t* packed, void* yrow,
                           const Geometry& g, int64_t hl, int64_t w0, int64_t ob0) {
  alignas(64) float scratch[16 * 16];
  static_assert(NP * NO <= 4 && NO <= 2, "four accumulator tiles");
  _tile_zero(0);
  if constexpr (NP * NO > 1) _tile_zero(1);
  if constexpr (NP * NO > 2) _tile_zero(2);
  if constexpr (NP * NO > 3) _tile_zero(3);
  const int64_t wp = g.Wo + (g.KW - 1) * g.dil_w;
  const int64_t nkc = g.C / g.K, nob = g.O / 16;
  const int64_t a_stride = g.C * 2;
  const int64_t tile_elems = g.K * 16;  // one packed kernel tile, bf16
  for (int64_t i = 0; i < g.KH; ++i) {
    const uint16_t* row = in + (hl + i * g.dil_h) * wp * g.C;
    for (int64_t j = 0; j < g.KW; ++j) {
      const uint16_t* base = row + (w0 + j * g.dil_w) * g.C;
      const uint16_t* kt = packed + ((i * g.KW + j) * nkc * nob + ob0) * tile_elems;
      for (int64_t kc = 0; kc < nkc; ++kc) {
        const uint16_t* a = base + kc * g.K;
        const uint16_t* b = kt + kc * nob * tile_elems;
        _tile_loadd(5, b, 64);
        if constexpr (NO == 2) _tile_loadd(6, b + tile_elems, 64);
        _tile_loadd(4, a, a_stride);
        _tile_dpbf16ps(0, 4, 5);
        if constexpr (NO == 2) _tile_dpbf16ps(1, 4, 6);
        if constexpr (NP > 1) {
          _tile_loadd(7, a + g.M * g.C, a_stride);
          if constexpr (NO == 2) {
            _tile_dpbf16ps(2, 7, 5);
            _tile_dpbf16ps(3, 7, 6);
          } else {
            _tile_dpbf16ps(1, 7, 5);
          }
        }
        if constexpr (NP > 2) {
          _tile_loadd(4, a + 2 * g.M * g.C, a_stride);
          _tile_dpbf16ps(2, 4, 5);
          _tile_loadd(7, a + 3 * g.M * g.C, a_stride);
          _tile_dpbf16ps(3, 7, 5);
        }
      }
    }
  }
  const int64_t o0 = ob0 * 16;
  BUSI_STORE_TILE(0, w0, o0);
  if constexpr (NO == 2) {
    BUSI_STORE_TILE(1, w0, o0 + 16);
    if constexpr (NP > 1) {
      BUSI_STORE_TILE(2, w0 + g.M, o0);
      BUSI_STORE_TILE(3, w0 + g.M, o0 + 16);
    }
  } else {
    if constexpr (NP > 1) BUSI_STORE_TILE(1, w0 + g.M, o0);
    if constexpr (NP > 2) BUSI_STORE_TILE(2, w0 + 2 * g.M, o0);
    if constexpr (NP > 3) BUSI_STORE_TILE(3, w0 + 3 * g.M, o0);
  }
}
#undef BUSI_STORE_TILE

// Channels c..c+15 of pixel `pixel` of `part`, as bf16.
BUSI_BF16 inline __m256i Bf16Channels(const Part& part, int64_t pixel, int64_t c) {
  if (part.bf16)
    return _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(part.x) + pixel * part.C + c));
  __m256bh v = _mm512_cvtneps_pbh(
      _mm512_loadu_ps(static_cast<const float*>(part.x) + pixel * part.C + c));
  return reinterpret_cast<__m256i&>(v);
}

// x rows [r_lo, r_lo + rows) of image b (r may fall outside 0..H-1), its
// parts side by side, into a zero-padded bf16 buffer whose column 0 is input
// column -pad_w. Two layouts of the same values:
// - pixel-major (AMX: a tile row is one pixel's K channels):
//   out[r][q][c];
// - pair-major (AVX-512 BF16): out[r][c/2][q] holds the pair (c, c+1) of
//   column q as 32 bits, so a run of output pixels reads one channel pair
//   at consecutive 4-byte addresses (MicroAvx).
BUSI_BF16 void PadRows(const std::vector<Part>& parts, int64_t b, uint16_t* out,
                       const Geometry& g, int64_t r_lo, int64_t rows, bool pair_major) {
  const int64_t wp = g.Wo + (g.KW - 1) * g.dil_w, c2s = g.C / 2;
  std::memset(out, 0, rows * wp * g.C * sizeof(uint16_t));
  uint32_t* out32 = reinterpret_cast<uint32_t*>(out);
  alignas(32) uint32_t pairs[8];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r_lo + r;
    if (h < 0 || h >= g.H) continue;
    for (int64_t q = 0; q < wp; ++q) {
      const int64_t w = q - g.pad_w;
      if (w < 0 || w >= g.W) continue;
      const int64_t pixel = (b * g.H + h) * g.W + w;
      int64_t c0 = 0;  // The part's first channel in the joined input.
      for (const Part& part : parts) {
        for (int64_t c = 0; c < part.C; c += 16) {
          const __m256i v = Bf16Channels(part, pixel, c);
          if (!pair_major) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r * wp + q) * g.C + c0 + c), v);
            continue;
          }
          _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), v);
          uint32_t* dst = out32 + (r * c2s + (c0 + c) / 2) * wp + q;
          for (int k = 0; k < 8; ++k) dst[k * wp] = pairs[k];
        }
        c0 += part.C;
      }
    }
  }
}

// Output rows h0..h1 of image b from the band's pixel-major padded rows `in`.
BUSI_AMX void BandRowsAmx(const uint16_t* in, const uint16_t* packed, void* y, const Geometry& g,
                          int64_t b, int64_t h0, int64_t h1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(g.M);
    cfg.colsb[t] = 64;
  }
  for (int t : {4, 7}) cfg.colsb[t] = static_cast<uint16_t>(g.K * 2);  // M x K inputs
  for (int t : {5, 6}) cfg.rows[t] = static_cast<uint8_t>(g.K / 2);    // K/2 x 16 pairs
  _tile_loadconfig(&cfg);
  const int64_t nob = g.O / 16, runs = g.Wo / g.M;
  for (int64_t h = h0; h < h1; ++h) {
    void* yrow = OutRow(y, g, b, h);
    const int64_t hl = h - h0;
    int64_t ob = 0;
    for (; ob + 2 <= nob; ob += 2) {
      int64_t p = 0;
      for (; p + 2 <= runs; p += 2) Micro<2, 2>(in, packed, yrow, g, hl, p * g.M, ob);
      for (; p < runs; ++p) Micro<1, 2>(in, packed, yrow, g, hl, p * g.M, ob);
    }
    for (; ob < nob; ++ob) {
      int64_t p = 0;
      for (; p + 4 <= runs; p += 4) Micro<4, 1>(in, packed, yrow, g, hl, p * g.M, ob);
      for (; p + 2 <= runs; p += 2) Micro<2, 1>(in, packed, yrow, g, hl, p * g.M, ob);
      for (; p < runs; ++p) Micro<1, 1>(in, packed, yrow, g, hl, p * g.M, ob);
    }
  }
  _tile_release();
}

// ---------------------------------------------------------------------------
// The same forward pass without AMX, on AVX-512 BF16 (vdpbf16ps: 16 float32
// lanes, each adding a dot product of one bf16 pair). Per tap and channel
// pair, one 32-bit broadcast of an input pixel's pair times the packed
// kernel's pair rows (K = C, so a tap's pairs for one 16-wide output block
// lie in one run) adds into that pixel's 16 output channels. NP pixels x NO
// output blocks of accumulators stay in registers over all taps and
// channels, then are stored once (with the optional epilogue).

// acc[q] += the bf16 pair at `pair`, broadcast, dotted with kv[q]'s pairs.
// kEmbedded: the pair is each vdpbf16ps's broadcast memory operand, not a
// broadcast instruction of its own competing with the products for the
// vector ports (GCC does not fold it, hence the asm). In
// scratch per-layer timings on an AMD EPYC it paid in the weight gradient
// (1.2-1.5x at 16 outputs) but not in the forward pass (0.6-0.7x, with
// either input layout), so only WgradAvx asks for it; with several blocks
// one broadcast serves them all.
template <int NO, bool kEmbedded>
BUSI_BF16 inline void DotBroadcastPair(__m512 (&acc)[NO], const __m512bh (&kv)[NO],
                                       const void* pair) {
  if constexpr (kEmbedded) {
    for (int q = 0; q < NO; ++q)
      asm("vdpbf16ps %[m]%{1to16%}, %[k], %[acc]"
          : [acc] "+v"(acc[q])
          : [k] "v"(kv[q]), [m] "m"(*reinterpret_cast<const int32_t*>(pair)));
  } else {
    int32_t bits;
    std::memcpy(&bits, pair, 4);
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(bits);
    for (int q = 0; q < NO; ++q) acc[q] = _mm512_dpbf16_ps(acc[q], xv, kv[q]);
  }
}

// One vector of 16 float32 sums -> y row pixel w, channels o0..o0+15.
BUSI_BF16 inline void StoreVec(__m512 v, void* yrow, const Geometry& g, int64_t w, int64_t o0) {
  if (g.scale != nullptr) {
    v = _mm512_fmadd_ps(v, _mm512_loadu_ps(g.scale + o0), _mm512_loadu_ps(g.shift + o0));
    if (g.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
  }
  const int64_t at = OutOffset(g, w, o0);
  if (g.y_bf16) {
    __m256bh b = _mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(yrow) + at),
                        reinterpret_cast<__m256i&>(b));
  } else {
    _mm512_storeu_ps(static_cast<float*>(yrow) + at, v);
  }
}

template <int NP, int NO>
BUSI_BF16 inline void MicroAvx(const uint32_t* in, const uint16_t* packed, void* yrow,
                               const Geometry& g, int64_t hl, int64_t w0, int64_t ob0) {
  static_assert(NP * NO <= 24, "accumulators must leave registers for operands");
  __m512 acc[NP][NO];
  for (int p = 0; p < NP; ++p)
    for (int q = 0; q < NO; ++q) acc[p][q] = _mm512_setzero_ps();
  const int64_t wp = g.Wo + (g.KW - 1) * g.dil_w;
  const int64_t c2s = g.C / 2, nob = g.O / 16, block = g.C * 16;
  for (int64_t i = 0; i < g.KH; ++i) {
    const uint32_t* row = in + (hl + i * g.dil_h) * c2s * wp;
    for (int64_t j = 0; j < g.KW; ++j) {
      const uint32_t* base = row + w0 + j * g.dil_w;
      const uint16_t* kt = packed + ((i * g.KW + j) * nob + ob0) * block;
      for (int64_t c2 = 0; c2 < c2s; ++c2) {
        __m512bh kv[NO];
        for (int q = 0; q < NO; ++q)
          kv[q] = (__m512bh)_mm512_loadu_si512(kt + q * block + c2 * 32);
        const uint32_t* x = base + c2 * wp;
        for (int p = 0; p < NP; ++p) DotBroadcastPair<NO, false>(acc[p], kv, x + p);
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int q = 0; q < NO; ++q) StoreVec(acc[p][q], yrow, g, w0 + p, (ob0 + q) * 16);
}

// Output rows h0..h1 of image b from the band's pair-major padded rows `in`.
BUSI_BF16 void BandRowsAvx(const uint32_t* in, const uint16_t* packed, void* y, const Geometry& g,
                           int64_t b, int64_t h0, int64_t h1) {
  const int64_t nob = g.O / 16;
  for (int64_t h = h0; h < h1; ++h) {
    void* yrow = OutRow(y, g, b, h);
    const int64_t hl = h - h0;
    int64_t ob = 0;
    // Wo is a multiple of 8: eight-pixel runs, as many output blocks as fit.
    for (; ob + 3 <= nob; ob += 3)
      for (int64_t w = 0; w < g.Wo; w += 8) MicroAvx<8, 3>(in, packed, yrow, g, hl, w, ob);
    for (; ob + 2 <= nob; ob += 2)
      for (int64_t w = 0; w < g.Wo; w += 8) MicroAvx<8, 2>(in, packed, yrow, g, hl, w, ob);
    for (; ob < nob; ++ob) {
      int64_t w = 0;
      for (; w + 16 <= g.Wo; w += 16) MicroAvx<16, 1>(in, packed, yrow, g, hl, w, ob);
      for (; w < g.Wo; w += 8) MicroAvx<8, 1>(in, packed, yrow, g, hl, w, ob);
    }
  }
}

// One task: output rows h0.. (a band) of image b, on the Geometry's unit.
BUSI_BF16 void RunBand(const std::vector<Part>& parts, const uint16_t* packed, void* y,
                       const Geometry& g, int64_t b, int64_t h0, std::vector<uint16_t>& buf) {
  const int64_t h1 = std::min(g.Ho, h0 + g.band);
  const int64_t rows = (h1 - h0) + (g.KH - 1) * g.dil_h;
  const int64_t wp = g.Wo + (g.KW - 1) * g.dil_w;
  const bool amx = g.unit == kUnitAmx;
  buf.resize(rows * wp * g.C);
  PadRows(parts, b, buf.data(), g, h0 - g.pad_h, rows, /*pair_major=*/!amx);
  if (amx) {
    BandRowsAmx(buf.data(), packed, y, g, b, h0, h1);
  } else {
    BandRowsAvx(reinterpret_cast<const uint32_t*>(buf.data()), packed, y, g, b, h0, h1);
  }
}

// k [KH, KW, C, O] float32 -> per tap, channel chunk and 16-wide output
// block, a K/2 x 16 tile of bf16 pairs: tile[k/2][n][k%2] = k[tap, chunk*K + k, block*16 + n].
BUSI_BF16 std::vector<uint16_t> PackKernel(const void* kernel, bool bf16, const Geometry& g) {
  const int64_t taps = g.KH * g.KW, nkc = g.C / g.K, nob = g.O / 16;
  std::vector<uint16_t> out(taps * g.C * g.O);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t kc = 0; kc < nkc; ++kc)
      for (int64_t ob = 0; ob < nob; ++ob) {
        uint16_t* tile = out.data() + ((t * nkc + kc) * nob + ob) * g.K * 16;
        const int64_t es = bf16 ? 2 : 4;
        for (int64_t kk = 0; kk < g.K; kk += 2) {
          const char* row = static_cast<const char*>(kernel) +
                            ((t * g.C + kc * g.K + kk) * g.O + ob * 16) * es;
          _mm512_storeu_si512(tile + kk * 16, InterleaveRows(row, row + g.O * es, bf16));
        }
      }
  return out;
}

// ---------------------------------------------------------------------------
// Winograd F(2x2, 3x3) forward on AVX-512 BF16 (the `winograd` attribute;
// 3x3, stride 1, dilation 1, padding 1, even Ho = H and Wo = W, no AMX).
// Lavin & Gray (CVPR 2016): each 2x2 block of outputs ("tile") is
//
//   Y = A^T [ sum_c (G g_c G^T) (.) (B^T d_c B) ] A,
//
// d_c the tile's 4x4 input patch of channel c, g_c its 3x3 kernel slice, (.)
// the elementwise product: 16 multiply-adds per channel and output channel
// per tile instead of 36, so 2.25x fewer bf16 products than the direct pass
// above. The 16 elementwise products are 16 matrix products over channels,
// [tiles x C] x [C x O], run with MicroAvx's scheme (a broadcast pair of the
// transformed input times the transformed kernel's pair rows, float32
// accumulators). The transforms are sums of +-1 and +-1/2 multiples, done
// in float32; the transformed input and kernel are rounded to bf16 for the
// products, one rounding more than the direct pass makes on each side (the
// tests bound the difference). The input is read from its parts where they
// lie (no padded copy): each task transforms a band of tile rows into
// v[pos][tile][C] (~256 KB, L2), then runs the products and the output
// transform for runs of tiles (small inputs: see ConvWinograd). Per layer
// (every 3x3 conv of the width-16 U-Net++, 8-128 px) it ran 1.24-1.94x as
// fast as the direct pass at batch 16 and 0.98-1.67x at batch 1 on an AMD
// EPYC (python -m busi_jax.bench --winograd_layers); busi_jax.models.conv
// uses it for the forward passes and input gradients of 3x3 'SAME'
// convolutions (winograd_fits), and WinogradWgradImage below for their
// weight gradients.

// 16 bf16 values -> float32 (a bf16 is the top half of a float32).
BUSI_BF16 inline __m512 Bf16ToF32(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// k [3, 3, C, O] -> U[pos][ob][c/2][16 outputs][2] (16 C O values at `out`)
// for output blocks [ob_lo, ob_hi): pos = 4a + b of G g G^T, bf16 pairs of
// channels (2 c2, 2 c2 + 1) as MicroAvx's packed kernel.
BUSI_BF16 void PackWinogradKernel(const void* kernel, bool bf16, const Geometry& g,
                                  int64_t ob_lo, int64_t ob_hi, uint16_t* out) {
  const int64_t nob = g.O / 16, c2s = g.C / 2;
  const __m512 half = _mm512_set1_ps(0.5f);
  alignas(64) float u[2][16][16];  // [channel parity][pos][output]
  for (int64_t ob = ob_lo; ob < ob_hi; ++ob)
    for (int64_t c2 = 0; c2 < c2s; ++c2) {
      for (int par = 0; par < 2; ++par) {
        const int64_t c = 2 * c2 + par;
        __m512 k[3][3];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            const int64_t at = ((i * 3 + j) * g.C + c) * g.O + ob * 16;
            k[i][j] = bf16 ? Bf16ToF32(static_cast<const uint16_t*>(kernel) + at)
                           : _mm512_loadu_ps(static_cast<const float*>(kernel) + at);
          }
        __m512 t[4][3];  // G k
        for (int j = 0; j < 3; ++j) {
          const __m512 s = _mm512_add_ps(k[0][j], k[2][j]);
          t[0][j] = k[0][j];
          t[1][j] = _mm512_mul_ps(half, _mm512_add_ps(s, k[1][j]));
          t[2][j] = _mm512_mul_ps(half, _mm512_sub_ps(s, k[1][j]));
          t[3][j] = k[2][j];
        }
        for (int a = 0; a < 4; ++a) {  // (G k) G^T
          const __m512 s = _mm512_add_ps(t[a][0], t[a][2]);
          _mm512_store_ps(u[par][4 * a + 0], t[a][0]);
          _mm512_store_ps(u[par][4 * a + 1], _mm512_mul_ps(half, _mm512_add_ps(s, t[a][1])));
          _mm512_store_ps(u[par][4 * a + 2], _mm512_mul_ps(half, _mm512_sub_ps(s, t[a][1])));
          _mm512_store_ps(u[par][4 * a + 3], t[a][2]);
        }
      }
      for (int pos = 0; pos < 16; ++pos)
        _mm512_storeu_si512(out + ((pos * nob + ob) * c2s + c2) * 32,
                            InterleaveRows(u[0][pos], u[1][pos], /*bf16=*/false));
    }
}

// Elements from one pos's plane of v to the next: the tiles' values plus one
// cache line, so the 16 planes' rows do not all fall in the same L1 set
// (plain [tiles][C] planes are a power of two apart for most layers, and
// storing a tile's 16 values to them then took 2x the whole transform).
inline int64_t WinogradPlane(int64_t tiles, int64_t C) { return tiles * C + 32; }

// 16 channels of one pixel as float32: zero where `row` is null (a row of
// the zero padding) or w falls outside 0..W-1.
BUSI_BF16 inline __m512 WinogradLoad(const char* row, int64_t w, int64_t W, int64_t stride,
                                     bool bf16) {
  if (row == nullptr || w < 0 || w >= W) return _mm512_setzero_ps();
  if (bf16) return Bf16ToF32(reinterpret_cast<const uint16_t*>(row) + w * stride);
  return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + w * stride);
}

// B^T d of input column w: rows[0..3] (null: padding), 16 channels.
BUSI_BF16 inline void WinogradColumn(const char* const (&rows)[4], int64_t w, int64_t W,
                                     int64_t stride, bool bf16, __m512 (&e)[4]) {
  const __m512 d0 = WinogradLoad(rows[0], w, W, stride, bf16),
               d1 = WinogradLoad(rows[1], w, W, stride, bf16),
               d2 = WinogradLoad(rows[2], w, W, stride, bf16),
               d3 = WinogradLoad(rows[3], w, W, stride, bf16);
  e[0] = _mm512_sub_ps(d0, d2);
  e[1] = _mm512_add_ps(d1, d2);
  e[2] = _mm512_sub_ps(d2, d1);
  e[3] = _mm512_sub_ps(d1, d3);
}

// The four input rows a tile row reads (channel c on of part, image b):
// null for rows of the zero padding.
BUSI_BF16 inline void TileInputRows(const Part& part, int64_t b, int64_t tile_row, int64_t c,
                                    const Geometry& g, const char* (&rows)[4]) {
  const int64_t es = part.bf16 ? 2 : 4;
  for (int a = 0; a < 4; ++a) {
    const int64_t h = 2 * tile_row - 1 + a;
    rows[a] = h < 0 || h >= g.H ? nullptr
                                : static_cast<const char*>(part.x) +
                                      ((b * g.H + h) * g.W * part.C + c) * es;
  }
}

// Tile rows [tr0, tr0 + tile_rows) of image b, read from the input parts
// where they lie (the zero padding is implied) -> v[pos][tile][C] bf16 (pos
// planes `step` elements apart), tiles numbered row by row, nt per row.
// Neighbouring tiles share two input columns: B^T d is computed once per
// column and carried to the next tile.
BUSI_BF16 void WinogradInput(const std::vector<Part>& parts, int64_t b, uint16_t* v,
                             int64_t step, const Geometry& g, int64_t tr0, int64_t tile_rows,
                             int64_t nt) {
  for (int64_t tr = 0; tr < tile_rows; ++tr) {
    int64_t c0 = 0;  // The part's first channel in the joined input.
    for (const Part& part : parts) {
      for (int64_t c = 0; c < part.C; c += 16) {
        const char* rows[4];
        TileInputRows(part, b, tr0 + tr, c, g, rows);
        __m512 e0[4], e1[4], e2[4], e3[4];
        WinogradColumn(rows, -1, g.W, part.C, part.bf16, e0);
        WinogradColumn(rows, 0, g.W, part.C, part.bf16, e1);
        for (int64_t tc = 0; tc < nt; ++tc) {
          WinogradColumn(rows, 2 * tc + 1, g.W, part.C, part.bf16, e2);
          WinogradColumn(rows, 2 * tc + 2, g.W, part.C, part.bf16, e3);
          uint16_t* dst = v + (tr * nt + tc) * g.C + c0 + c;
          for (int a = 0; a < 4; ++a) {  // (B^T d) B, row a
            const __m512 r[4] = {_mm512_sub_ps(e0[a], e2[a]), _mm512_add_ps(e1[a], e2[a]),
                                 _mm512_sub_ps(e2[a], e1[a]), _mm512_sub_ps(e1[a], e3[a])};
            for (int k = 0; k < 4; ++k) {
              __m256bh h = _mm512_cvtneps_pbh(r[k]);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (4 * a + k) * step),
                                  reinterpret_cast<__m256i&>(h));
            }
          }
          for (int a = 0; a < 4; ++a) {
            e0[a] = e2[a];
            e1[a] = e3[a];
          }
        }
      }
      c0 += part.C;
    }
  }
}

// Where v's tiles go in y: tile t is tile t % per_image (row by row, nt per
// row, from output row h0) of image b0 + t / per_image.
struct WinogradTiles {
  const uint16_t* v;
  int64_t plane;  // elements from one pos's plane of v to the next
  int64_t count, per_image, nt, b0, h0;
};

// NP tiles from tile t0 x NO output blocks from ob0: the 16 products over
// channels into `m` (float32 [16 pos][NP][NO][16]), then A^T m A, the
// epilogue and the stores of the 2x2 outputs of each tile.
template <int NP, int NO>
BUSI_BF16 inline void WinogradMicro(const WinogradTiles& tl, const uint16_t* packed, void* y,
                                    const Geometry& g, int64_t t0, int64_t ob0, float* m) {
  const int64_t c2s = g.C / 2, nob = g.O / 16;
  for (int pos = 0; pos < 16; ++pos) {
    __m512 acc[NP][NO];
    for (int p = 0; p < NP; ++p)
      for (int q = 0; q < NO; ++q) acc[p][q] = _mm512_setzero_ps();
    const uint32_t* x = reinterpret_cast<const uint32_t*>(tl.v + pos * tl.plane + t0 * g.C);
    const uint16_t* kt = packed + (pos * nob + ob0) * c2s * 32;
    for (int64_t c2 = 0; c2 < c2s; ++c2) {
      __m512bh kv[NO];
      for (int q = 0; q < NO; ++q)
        kv[q] = (__m512bh)_mm512_loadu_si512(kt + (q * c2s + c2) * 32);
      for (int p = 0; p < NP; ++p) DotBroadcastPair<NO, false>(acc[p], kv, x + p * c2s + c2);
    }
    for (int p = 0; p < NP; ++p)
      for (int q = 0; q < NO; ++q) _mm512_store_ps(m + ((pos * NP + p) * NO + q) * 16, acc[p][q]);
  }
  // Tile t0's image, row and column; then stepped (divisions per tile cost
  // as much as a 16-channel tile's products).
  int64_t b = tl.b0 + t0 / tl.per_image;
  int64_t tr = (t0 % tl.per_image) / tl.nt, tc = t0 % tl.nt;  // per_image: whole rows
  for (int p = 0; p < NP; ++p) {
    if (p > 0 && ++tc == tl.nt) {  // The next tile row, or the next image's first.
      tc = 0;
      if (++tr * tl.nt == tl.per_image) {
        tr = 0;
        ++b;
      }
    }
    const int64_t h = tl.h0 + 2 * tr, w = 2 * tc;
    char* row0 = OutRow(y, g, b, h);
    char* row1 = OutRow(y, g, b, h + 1);
    for (int q = 0; q < NO; ++q) {
      __m512 s[4][4];
      for (int pos = 0; pos < 16; ++pos)
        s[pos / 4][pos % 4] = _mm512_load_ps(m + ((pos * NP + p) * NO + q) * 16);
      __m512 r[2][4];  // A^T s
      for (int j = 0; j < 4; ++j) {
        r[0][j] = _mm512_add_ps(_mm512_add_ps(s[0][j], s[1][j]), s[2][j]);
        r[1][j] = _mm512_sub_ps(_mm512_sub_ps(s[1][j], s[2][j]), s[3][j]);
      }
      const int64_t o0 = (ob0 + q) * 16;
      for (int i = 0; i < 2; ++i) {  // (A^T s) A
        void* row = i == 0 ? row0 : row1;
        StoreVec(_mm512_add_ps(_mm512_add_ps(r[i][0], r[i][1]), r[i][2]), row, g, w, o0);
        StoreVec(_mm512_sub_ps(_mm512_sub_ps(r[i][1], r[i][2]), r[i][3]), row, g, w + 1, o0);
      }
    }
  }
}

// The products and output transform of tl's tiles [t_lo, t_hi) for output
// blocks [ob_lo, ob_hi). Tile counts are multiples of 4 (Wo of 8): runs of
// 16, 8 and 4.
BUSI_BF16 void WinogradProducts(const WinogradTiles& tl, const uint16_t* packed, void* y,
                                const Geometry& g, int64_t t_lo, int64_t t_hi, int64_t ob_lo,
                                int64_t ob_hi, float* m) {
  int64_t ob = ob_lo;
  for (; ob + 2 <= ob_hi; ob += 2) {
    int64_t t = t_lo;
    for (; t + 8 <= t_hi; t += 8) WinogradMicro<8, 2>(tl, packed, y, g, t, ob, m);
    for (; t < t_hi; t += 4) WinogradMicro<4, 2>(tl, packed, y, g, t, ob, m);
  }
  for (; ob < ob_hi; ++ob) {
    int64_t t = t_lo;
    for (; t + 16 <= t_hi; t += 16) WinogradMicro<16, 1>(tl, packed, y, g, t, ob, m);
    for (; t < t_hi; t += 4) WinogradMicro<4, 1>(tl, packed, y, g, t, ob, m);
  }
}

// The forward pass by Winograd F(2x2, 3x3): the caller checked the geometry.
//
// Large inputs: each task takes a band of tile rows of one image through
// the input transform (into its own v, sized for L2), the products and the
// output transform. Small ones (v for the whole batch within 1 MB, bands
// of under 8 tiles: 8-px layers at batch 1 to 4) have too few tile rows for
// that: each band task would read the whole transformed kernel for a few
// tiles. There the input and
// kernel transforms run first, shared out by tile row and output block, and
// then each task takes a pair of output blocks for a run of tiles (all of
// them where that makes enough tasks). That costs a second hand-out to the
// helpers and moves v between cores: at 16 and 32 px (bands of 8 and 16
// tiles at batch 1) the band path timed faster on 2 cores despite its
// kernel re-reads (by a quarter to a third per layer; at 8 px slower), so
// the cut-off is 8 tiles, no longer 32.
BUSI_BF16 void ConvWinograd(ffi::ThreadPool& pool, const std::vector<Part>& parts,
                            const void* kernel, bool kernel_bf16, bool prepacked, void* y,
                            const Geometry& g, int64_t batch) {
  const int64_t nob = g.O / 16, nt = g.Wo / 2, tile_rows_total = g.Ho / 2;
  const int64_t participants = std::max<int64_t>(pool.num_threads(), 0) + 1;
  // Prepacked: `kernel` already holds PackWinogradKernel's output
  // (BusiConvAmxPack, once per set of weights); else it is packed here.
  std::vector<uint16_t> own(prepacked ? 0 : 16 * g.C * g.O);
  const uint16_t* const packed = prepacked ? static_cast<const uint16_t*>(kernel) : own.data();
  const int64_t pack_tasks = prepacked ? 0 : nob;
  // Bands small enough that a task's transformed input (16 bf16 values per
  // channel and tile) stays in L2, and at least four tasks per participant.
  const int64_t per_row = 16 * nt * g.C * 2;  // bytes of v per tile row
  int64_t band = std::max<int64_t>(1, (int64_t{256} << 10) / per_row);
  const int64_t want = std::max<int64_t>(1, (4 * participants + batch - 1) / batch);
  band = std::min(band, std::max<int64_t>(1, tile_rows_total / want));
  const int64_t tiles = batch * tile_rows_total * nt;
  if (band * nt < 8 && 16 * tiles * g.C * 2 <= (int64_t{1} << 20)) {
    const int64_t plane = WinogradPlane(tiles, g.C);
    std::vector<uint16_t> v(16 * plane);
    busi::ParallelFor(pool, pack_tasks + batch * tile_rows_total, participants, [&](int64_t t) {
      if (t < pack_tasks) {
        PackWinogradKernel(kernel, kernel_bf16, g, t, t + 1, own.data());
        return;
      }
      const int64_t row = t - pack_tasks;  // b * tile_rows_total + the image's tile row
      WinogradInput(parts, row / tile_rows_total, v.data() + row * nt * g.C, plane, g,
                    row % tile_rows_total, 1, nt);
    });
    const WinogradTiles tl{v.data(), plane, tiles, tile_rows_total * nt, nt, 0, 0};
    const int64_t pairs = (nob + 1) / 2;
    const int64_t chunks = std::max<int64_t>(1, (2 * participants + pairs - 1) / pairs);
    const int64_t run = std::max<int64_t>(16, (tiles / chunks + 15) / 16 * 16);
    const int64_t runs = (tiles + run - 1) / run;
    busi::ParallelFor(pool, pairs * runs, participants, [&](int64_t t) {
      alignas(64) static thread_local float m[16 * 16 * 16];
      const int64_t ob = 2 * (t / runs), t_lo = (t % runs) * run;
      WinogradProducts(tl, packed, y, g, t_lo, std::min(tiles, t_lo + run), ob,
                       std::min(nob, ob + 2), m);
    });
    return;
  }
  if (!prepacked) PackWinogradKernel(kernel, kernel_bf16, g, 0, nob, own.data());
  const int64_t bands = (tile_rows_total + band - 1) / band;
  busi::ParallelFor(pool, batch * bands, participants, [&](int64_t t) {
    thread_local std::vector<uint16_t> v;
    alignas(64) static thread_local float m[16 * 16 * 16];
    const int64_t b = t / bands, tr0 = (t % bands) * band;
    const int64_t rows = std::min(band, tile_rows_total - tr0);
    const int64_t plane = WinogradPlane(rows * nt, g.C);
    v.resize(16 * plane);
    WinogradInput(parts, b, v.data(), plane, g, tr0, rows, nt);
    const WinogradTiles tl{v.data(), plane, rows * nt, rows * nt, nt, b, 2 * tr0};
    WinogradProducts(tl, packed, y, g, 0, rows * nt, 0, nob, m);
  });
}

// Whether `unit` can run here; the error names the kernel and what to use.
ffi::Error CheckUnit(int64_t unit, const char* kernel) {
  if (unit == kUnitAmx) {
    if (AmxPermitted()) return ffi::Error::Success();
    return ffi::Error::Internal(std::string(kernel) +
                                ": the kernel refused AMX tile state (arch_prctl); use "
                                "model.wgrad='native_bf16' (AVX-512 BF16) or 'native'");
  }
  if (unit == kUnitAvx512Bf16) {
    if (HasAvx512Bf16()) return ffi::Error::Success();
    return ffi::Error::Internal(std::string(kernel) +
                                ": this CPU has no AVX-512 BF16; use model.wgrad='native'");
  }
  return ffi::Error::InvalidArgument(std::string(kernel) +
                                     ": unit must be 0 (AMX) or 1 (AVX-512 BF16)");
}

// Whether winograd=1 suits the call: unit 1, a 3x3 kernel, dilation 1,
// padding 1, and (bad_size false) an output the input's size, even height.
ffi::Error CheckWinograd(int64_t winograd, int64_t unit, int64_t kh, int64_t kw, int64_t dil_h,
                         int64_t dil_w, int64_t pad_h, int64_t pad_w, bool bad_size,
                         const char* kernel) {
  if (winograd == 1 && unit == kUnitAvx512Bf16 && kh == 3 && kw == 3 && dil_h == 1 &&
      dil_w == 1 && pad_h == 1 && pad_w == 1 && !bad_size)
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(kernel) +
      ": winograd=1 needs unit 1 (AVX-512 BF16), a 3x3 kernel, dilation 1, padding 1 and an "
      "output the input's size with an even height");
}

bool F32OrBf16(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::F32 || b.element_type() == ffi::DataType::BF16;
}

// The parts of the input (channels side by side) as buffers; checks them.
ffi::ErrorOr<std::vector<Part>> Parts(const std::vector<ffi::AnyBuffer>& xs) {
  std::vector<Part> parts;
  for (const ffi::AnyBuffer& x : xs) {
    auto d = x.dimensions(), d0 = xs[0].dimensions();
    if (!F32OrBf16(x) || d.size() != 4)
      return ffi::Unexpected(
          ffi::Error::InvalidArgument("busi_conv_amx: inputs must be rank-4 float32 or bf16"));
    if (d[0] != d0[0] || d[1] != d0[1] || d[2] != d0[2] || d[3] % 16 != 0)
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "busi_conv_amx: input parts must share [B, H, W] and have channels in multiples of 16"));
    parts.push_back(Part{x.untyped_data(), d[3], x.element_type() == ffi::DataType::BF16});
  }
  return parts;
}

// The forward pass over the input parts xs (channels side by side); scale and
// shift (float32 [O]) may be null: no epilogue.
ffi::Error ConvAmxImpl(ffi::ThreadPool pool, const std::vector<ffi::AnyBuffer>& xs,
                       ffi::AnyBuffer k, const float* scale, const float* shift,
                       ffi::Result<ffi::AnyBuffer> y, int64_t dil_h, int64_t dil_w, int64_t pad_h,
                       int64_t pad_w, int64_t unit, int64_t winograd, int64_t packed,
                       int64_t relu, int64_t shuffle) {
  if (xs.empty()) return ffi::Error::InvalidArgument("busi_conv_amx: no input");
  auto parts = Parts(xs);
  if (parts.has_error()) return parts.error();
  if (!F32OrBf16(k) || !F32OrBf16(*y))
    return ffi::Error::InvalidArgument("busi_conv_amx: kernel and y must be float32 or bf16");
  auto xd = xs[0].dimensions();
  auto kd = k.dimensions();
  auto ydims = y->dimensions();
  int64_t channels = 0;
  for (const Part& part : *parts) channels += part.C;
  if (kd.size() != 4 || ydims.size() != 4)
    return ffi::Error::InvalidArgument("busi_conv_amx: x, kernel and y must be rank 4");
  // The conv's own output [B, Ho, Wo, O]; with shuffle=1, y is [B, 2 Ho, 2 Wo, O / 4].
  int64_t yd[4] = {ydims[0], ydims[1], ydims[2], ydims[3]};
  if (shuffle != 0) {
    if (yd[1] % 2 != 0 || yd[2] % 2 != 0 || yd[3] % 16 != 0 || winograd != 0)
      return ffi::Error::InvalidArgument(
          "busi_conv_amx: shuffle=1 needs y [B, 2 Ho, 2 Wo, O / 4], O / 4 a multiple of 16, "
          "and winograd=0");
    yd[1] /= 2;
    yd[2] /= 2;
    yd[3] *= 4;
  }
  if (xd[0] != yd[0] || channels != kd[2] || yd[3] != kd[3])
    return ffi::Error::InvalidArgument(
        "busi_conv_amx: shapes disagree (x [B,H,W,C], kernel [KH,KW,C,O], y [B,Ho,Wo,O])");
  if (kd[3] % 16 != 0 || yd[2] % 8 != 0)
    return ffi::Error::InvalidArgument(
        "busi_conv_amx: needs C and O multiples of 16 and output width a multiple of 8");
  if (pad_w < 0 || pad_h < 0 || dil_h < 1 || dil_w < 1)
    return ffi::Error::InvalidArgument("busi_conv_amx: negative padding or dilation < 1");
  if (ffi::Error e = CheckUnit(unit, "busi_conv_amx"); e.failure()) return e;
  // A prepacked Winograd kernel is [4, 4, C, O] (G g G^T) of a 3x3 one.
  const bool packed_winograd = packed != 0 && winograd != 0;
  if (packed != 0 && (k.element_type() != ffi::DataType::BF16 ||
                      (packed_winograd && (kd[0] != 4 || kd[1] != 4))))
    return ffi::Error::InvalidArgument(
        "busi_conv_amx: packed=1 needs the bf16 kernel busi_conv_amx_pack made for the same "
        "winograd and unit ([4, 4, C, O] for winograd=1)");
  Geometry g{xd[1], xd[2], channels, yd[1], yd[2], yd[3],
             packed_winograd ? 3 : kd[0], packed_winograd ? 3 : kd[1], dil_h, dil_w,
             pad_h, pad_w, yd[2] % 16 == 0 ? 16 : 8, ChannelsPerTile(unit, channels), 1,
             y->element_type() == ffi::DataType::BF16};
  g.scale = scale;
  g.shift = shift;
  g.relu = relu != 0;
  g.shuffle = shuffle != 0;
  g.unit = unit;
  const int64_t batch = xd[0];
  void* out = y->untyped_data();
  if (winograd != 0) {
    if (ffi::Error e = CheckWinograd(winograd, unit, g.KH, g.KW, dil_h, dil_w, pad_h, pad_w,
                                     g.H != g.Ho || g.W != g.Wo || g.Ho % 2 != 0, "busi_conv_amx");
        e.failure())
      return e;
    if (batch == 0 || g.Ho == 0) return ffi::Error::Success();
    ConvWinograd(pool, *parts, k.untyped_data(), k.element_type() == ffi::DataType::BF16,
                 packed != 0, out, g, batch);
    return ffi::Error::Success();
  }
  if (batch == 0 || g.Ho == 0) return ffi::Error::Success();
  std::vector<uint16_t> own;
  if (packed == 0) own = PackKernel(k.untyped_data(), k.element_type() == ffi::DataType::BF16, g);
  const uint16_t* const kernel =
      packed != 0 ? static_cast<const uint16_t*>(k.untyped_data()) : own.data();
  // At least two tasks per participant, so a batch of one still uses every
  // core; but a call of under ~4M multiply-adds finishes in tens of
  // microseconds, about what waking a helper costs. (At 16M, the batch-1
  // U-Net++'s transposed convs, 8.4M each, ran on one core: ~7% of its
  // inference.)
  const int64_t macs = batch * g.Ho * g.Wo * g.O * g.C * g.KH * g.KW;
  const int64_t participants =
      macs < (int64_t{1} << 22) ? 1 : std::max<int64_t>(pool.num_threads(), 0) + 1;
  const int64_t want = std::max<int64_t>(1, (2 * participants + batch - 1) / batch);
  g.band = std::max<int64_t>(1, (g.Ho + want - 1) / want);
  // Tasks are (image, band of output rows), shared out by busi::ParallelFor
  // to the caller and XLA's intra-op threads.
  const int64_t bands_per_image = (g.Ho + g.band - 1) / g.band;
  busi::ParallelFor(pool, batch * bands_per_image, participants, [&](int64_t t) {
    // Each thread keeps its padded-rows buffer from call to call.
    thread_local std::vector<uint16_t> buf;
    RunBand(*parts, kernel, out, g, t / bands_per_image, (t % bands_per_image) * g.band, buf);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Weight gradient on AMX:
//
//   dW[i, j, c, o] = sum_{b, h, w} bf16(x[b, h + i*dil_h - pad_h, w + j*dil_w - pad_w, c])
//                                  * bf16(dy[b, h, w, o])
//
// A matrix product per tap with the pixels as the summed dimension: M = 16
// input channels, N = 16 output channels, K = P pixels of one output row
// (P = 32, 16 or 8, dividing Wo). Per image, x is copied channel-major and
// zero-padded (xt[c][r][q], so a tap's shift is just an offset along a row
// of the A tile) and dy pair-interleaved (dyv[h][w/2][o][w%2], AMX's layout
// for B). Up to four taps share each loaded dy tile. Each participant sums
// its images into its own float32 buffer; the buffers are added at the end.

struct WgradGeometry {
  int64_t H, W, C, Ho, Wo, O, KH, KW, dil_h, dil_w, pad_h, pad_w;
  int64_t P;       // pixels per tile step
  int64_t Hp, Wp;  // padded input rows and columns the taps reach
  bool dy_bf16;          // dy's element type (else float32); x's is per Part
};

// One image of one input part (ck channels, bf16 or float32) into channels
// [0, ck) of xt, zeroed beforehand by the caller.
BUSI_BF16 void ChannelMajorBf16(const void* image, int64_t ck, bool bf16, uint16_t* xt,
                                const WgradGeometry& g) {
  // Sixteen pixels of one channel per gather: the 16 cache lines they sit on
  // serve all C channels while they stay in L1.
  const __m512i pixel = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(ck)));
  const int64_t q0 = std::max<int64_t>(0, g.pad_w), q1 = std::min(g.Wp, g.W + g.pad_w);
  for (int64_t r = 0; r < g.Hp; ++r) {
    const int64_t h = r - g.pad_h;
    if (h < 0 || h >= g.H) continue;
    for (int64_t q = q0; q < q1; q += 16) {
      const __mmask16 m = static_cast<__mmask16>(q1 - q >= 16 ? 0xffff : (1u << (q1 - q)) - 1);
      const int64_t at = (h * g.W + q - g.pad_w) * ck;
      uint16_t* dst = xt + r * g.Wp + q;
      if (bf16) {
        // No 16-bit gather: gather the 32 bits ending at channel c (c >= 1)
        // or starting at it (c = 0), so no read passes the image's last value.
        const uint16_t* src = static_cast<const uint16_t*>(image) + at;
        const __m512i scaled = _mm512_slli_epi32(pixel, 1);  // bytes
        for (int64_t c = 0; c < ck; ++c) {
          const char* base = reinterpret_cast<const char*>(src + (c == 0 ? 0 : c - 1));
          __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, scaled, base, 1);
          if (c != 0) v = _mm512_srli_epi32(v, 16);
          _mm256_mask_storeu_epi16(dst + c * g.Hp * g.Wp, m, _mm512_cvtepi32_epi16(v));
        }
        continue;
      }
      const float* src = static_cast<const float*>(image) + at;
      for (int64_t c = 0; c < ck; ++c) {
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, pixel, src + c, 4);
        __m256bh b = _mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(dst + c * g.Hp * g.Wp, m, reinterpret_cast<__m256i&>(b));
      }
    }
  }
}

BUSI_BF16 void PairInterleavedBf16(const void* grad, uint16_t* dyv, const WgradGeometry& g) {
  const int64_t es = g.dy_bf16 ? 2 : 4;
  for (int64_t p = 0; p < g.Ho * g.Wo; p += 2) {
    uint16_t* dst = dyv + p * g.O;
    const char* a = static_cast<const char*>(grad) + p * g.O * es;
    for (int64_t o = 0; o < g.O; o += 16)
      _mm512_storeu_si512(dst + 2 * o, InterleaveRows(a + o * es, a + (g.O + o) * es, g.dy_bf16));
  }
}

// acc [KH*KW, C, O] (float32) += taps t0..t0+NT-1 of channel block cb and
// output block ob, over one image. Tiles: accumulators 0-3, x 4 and 5, dy 6.
template <int NT>
BUSI_AMX inline void WgradTaps(const uint16_t* xt, const uint16_t* dyv, float* acc,
                               const WgradGeometry& g, int64_t t0, int64_t cb, int64_t ob) {
  static_assert(NT >= 1 && NT <= 4, "four accumulator tiles");
  const int64_t acc_stride = g.O * 4;
  float* a[NT];
  const uint16_t* xb[NT];
  for (int n = 0; n < NT; ++n) {
    const int64_t t = t0 + n, i = t / g.KW, j = t % g.KW;
    a[n] = acc + (t * g.C + cb * 16) * g.O + ob * 16;
    xb[n] = xt + cb * 16 * g.Hp * g.Wp + i * g.dil_h * g.Wp + j * g.dil_w;
  }
  _tile_loadd(0, a[0], acc_stride);
  if constexpr (NT > 1) _tile_loadd(1, a[1], acc_stride);
  if constexpr (NT > 2) _tile_loadd(2, a[2], acc_stride);
  if constexpr (NT > 3) _tile_loadd(3, a[3], acc_stride);
  const int64_t x_stride = g.Hp * g.Wp * 2, dy_stride = g.O * 4;
  for (int64_t h = 0; h < g.Ho; ++h) {
    for (int64_t w0 = 0; w0 < g.Wo; w0 += g.P) {
      _tile_loadd(6, dyv + (h * g.Wo + w0) * g.O + ob * 32, dy_stride);
      const int64_t off = h * g.Wp + w0;
      _tile_loadd(4, xb[0] + off, x_stride);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NT > 1) {
        _tile_loadd(5, xb[1] + off, x_stride);
        _tile_dpbf16ps(1, 5, 6);
      }
      if constexpr (NT > 2) {
        _tile_loadd(4, xb[2] + off, x_stride);
        _tile_dpbf16ps(2, 4, 6);
      }
      if constexpr (NT > 3) {
        _tile_loadd(5, xb[3] + off, x_stride);
        _tile_dpbf16ps(3, 5, 6);
      }
    }
  }
  _tile_stored(0, a[0], acc_stride);
  if constexpr (NT > 1) _tile_stored(1, a[1], acc_stride);
  if constexpr (NT > 2) _tile_stored(2, a[2], acc_stride);
  if constexpr (NT > 3) _tile_stored(3, a[3], acc_stride);
}

// Image b's x (its parts' channels side by side, as their concatenation)
// and dy in the layouts both weight-gradient paths read.
BUSI_BF16 void WgradOperands(const std::vector<Part>& parts, int64_t b, const void* dy,
                             const WgradGeometry& g, std::vector<uint16_t>& xt,
                             std::vector<uint16_t>& dyv) {
  xt.assign(g.C * g.Hp * g.Wp, 0);
  dyv.resize(g.Ho * g.Wo * g.O);
  uint16_t* dst = xt.data();
  for (const Part& part : parts) {
    const int64_t image = g.H * g.W * part.C * (part.bf16 ? 2 : 4);
    ChannelMajorBf16(static_cast<const char*>(part.x) + b * image, part.C, part.bf16, dst, g);
    dst += part.C * g.Hp * g.Wp;
  }
  PairInterleavedBf16(dy, dyv.data(), g);
}

BUSI_AMX void WgradImage(const std::vector<Part>& parts, int64_t b, const void* dy, float* acc,
                         const WgradGeometry& g, std::vector<uint16_t>& xt,
                         std::vector<uint16_t>& dyv) {
  WgradOperands(parts, b, dy, g, xt, dyv);
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  for (int t : {4, 5}) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(g.P * 2);  // 16 channels x P pixels
  }
  cfg.rows[6] = static_cast<uint8_t>(g.P / 2);  // P/2 pixel pairs x 16 outputs
  cfg.colsb[6] = 64;
  _tile_loadconfig(&cfg);
  const int64_t taps = g.KH * g.KW;
  for (int64_t cb = 0; cb < g.C / 16; ++cb)
    for (int64_t ob = 0; ob < g.O / 16; ++ob) {
      int64_t t = 0;
      for (; t + 4 <= taps; t += 4) WgradTaps<4>(xt.data(), dyv.data(), acc, g, t, cb, ob);
      if (taps - t == 3) WgradTaps<3>(xt.data(), dyv.data(), acc, g, t, cb, ob);
      if (taps - t == 2) WgradTaps<2>(xt.data(), dyv.data(), acc, g, t, cb, ob);
      if (taps - t == 1) WgradTaps<1>(xt.data(), dyv.data(), acc, g, t, cb, ob);
    }
  _tile_release();
}

// The weight gradient without AMX, on AVX-512 BF16: the same channel-major
// x and pair-interleaved dy, but a broadcast x pair (two neighbouring output
// pixels' inputs for one channel and tap) times a dy vector (those pixels'
// gradients for 16 output channels) adds into that (tap, channel)'s 16
// outputs. NC (tap, channel) combinations x NO output blocks of accumulators
// stay in registers over a band of output rows; bands are sized so their dy
// rows stay in L1 while every combination passes over them.

// acc [KH*KW, C, O] += tap t, channels c0..c0+NC-1 x output blocks
// ob..ob+NO-1, over output rows h0..h1 of one image. The channels' x rows
// lie one plane apart, so one pointer walks them (no pointer per channel).
template <int NC, int NO>
BUSI_BF16 inline void WgradAvx(const uint16_t* xt, const uint16_t* dyv, float* acc,
                               const WgradGeometry& g, int64_t t, int64_t c0, int64_t ob,
                               int64_t h0, int64_t h1) {
  static_assert(NC * NO <= 24, "accumulators must leave registers for operands");
  const int64_t i = t / g.KW, j = t % g.KW, plane = g.Hp * g.Wp;
  const uint16_t* xb = xt + c0 * plane + i * g.dil_h * g.Wp + j * g.dil_w;
  float* a = acc + (t * g.C + c0) * g.O + ob * 16;
  __m512 s[NC][NO];
  for (int n = 0; n < NC; ++n)
    for (int q = 0; q < NO; ++q) s[n][q] = _mm512_loadu_ps(a + n * g.O + q * 16);
  for (int64_t h = h0; h < h1; ++h) {
    const uint16_t* dyrow = dyv + h * g.Wo * g.O + ob * 32;
    const uint16_t* xrow = xb + h * g.Wp;
    for (int64_t w = 0; w < g.Wo; w += 2) {
      __m512bh kv[NO];
      for (int q = 0; q < NO; ++q)
        kv[q] = (__m512bh)_mm512_loadu_si512(dyrow + w * g.O + q * 32);
      const uint16_t* xp = xrow + w;
      for (int n = 0; n < NC; ++n, xp += plane) {
        DotBroadcastPair<NO, NO == 1>(s[n], kv, xp);
      }
    }
  }
  for (int n = 0; n < NC; ++n)
    for (int q = 0; q < NO; ++q) _mm512_storeu_ps(a + n * g.O + q * 16, s[n][q]);
}

// Every tap and channel for output blocks ob..ob+NO-1, NC channels at a time.
template <int NC, int NO>
BUSI_BF16 void WgradCombos(const uint16_t* xt, const uint16_t* dyv, float* acc,
                           const WgradGeometry& g, int64_t ob, int64_t h0, int64_t h1) {
  static_assert(16 % NC == 0, "C is a multiple of 16");
  for (int64_t t = 0; t < g.KH * g.KW; ++t)
    for (int64_t c = 0; c < g.C; c += NC) WgradAvx<NC, NO>(xt, dyv, acc, g, t, c, ob, h0, h1);
}

BUSI_BF16 void WgradImageAvx(const std::vector<Part>& parts, int64_t b, const void* dy,
                             float* acc, const WgradGeometry& g, std::vector<uint16_t>& xt,
                             std::vector<uint16_t>& dyv) {
  WgradOperands(parts, b, dy, g, xt, dyv);
  const int64_t nob = g.O / 16;
  // About 16 KB of dy per band (half of L1).
  const int64_t band = std::max<int64_t>(1, (int64_t{16} << 10) / (g.Wo * g.O * 2));
  for (int64_t h0 = 0; h0 < g.Ho; h0 += band) {
    const int64_t h1 = std::min(g.Ho, h0 + band);
    int64_t ob = 0;
    for (; ob + 3 <= nob; ob += 3) WgradCombos<8, 3>(xt.data(), dyv.data(), acc, g, ob, h0, h1);
    for (; ob + 2 <= nob; ob += 2) WgradCombos<8, 2>(xt.data(), dyv.data(), acc, g, ob, h0, h1);
    for (; ob < nob; ++ob) WgradCombos<16, 1>(xt.data(), dyv.data(), acc, g, ob, h0, h1);
  }
}

// The weight gradient by Winograd F(2x2, 3x3), on AVX-512 BF16 (the wgrad
// handlers' `winograd` attribute). The forward pass's tile y = A^T [(G k G^T)
// . (B^T d B)] A, differentiated by k and summed over the 2x2 output tiles:
//
//   dW = G^T M G,  M[pos][c][o] = sum_tiles (B^T d B)[pos][c] * (A dY A^T)[pos][o]
//
// 16 products per channel pair and tile instead of the direct pass's 36
// (2.25x fewer). Per image, bands of tile rows get both transforms (float32,
// rounded once to bf16), laid out with the tiles of a row paired as
// vdpbf16ps's pairs: v[pos][pair][C][2], u[pos][pair][O][2]. Then, per pos,
// broadcast v pairs (one channel, two tiles) times u vectors (16 outputs,
// two tiles) add into M's rows in registers (WgradAvx's scheme, with tiles
// in place of pixels). M is summed over images (SumOverImages) and G^T M G
// is taken once at the end, in float32.

// Two float32 vectors -> bf16 pairs [a0, b0, a1, b1, ..., a15, b15].
BUSI_BF16 inline __m512i PairBf16(__m512 a, __m512 b) {
  alignas(64) static const uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                  21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                  11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  __m512bh v = _mm512_cvtne2ps_pbh(b, a);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kPairs), reinterpret_cast<__m512i&>(v));
}

// The input transform of tile rows [tr0, tr0 + rows) of image b, read from
// the parts where they lie -> v[pos * plane + (pair * C + c) * 2 + k], the
// pairs numbered row by row (nt / 2 per row).
BUSI_BF16 void WinogradInputPairs(const std::vector<Part>& parts, int64_t b, uint16_t* v,
                                  int64_t plane, const Geometry& g, int64_t tr0, int64_t rows,
                                  int64_t nt) {
  for (int64_t tr = 0; tr < rows; ++tr) {
    int64_t c0 = 0;
    for (const Part& part : parts) {
      for (int64_t c = 0; c < part.C; c += 16) {
        const char* in[4];
        TileInputRows(part, b, tr0 + tr, c, g, in);
        // B^T d of the columns, carried from tile to tile as in WinogradInput.
        __m512 e[6][4];
        WinogradColumn(in, -1, g.W, part.C, part.bf16, e[0]);
        WinogradColumn(in, 0, g.W, part.C, part.bf16, e[1]);
        for (int64_t tc = 0; tc < nt; tc += 2) {
          for (int k = 2; k < 6; ++k)
            WinogradColumn(in, 2 * tc + k - 1, g.W, part.C, part.bf16, e[k]);
          uint16_t* dst = v + ((tr * nt + tc) / 2 * g.C + c0 + c) * 2;
          for (int a = 0; a < 4; ++a) {  // (B^T d) B, row a, of the pair's two tiles
            const __m512 l[4] = {_mm512_sub_ps(e[0][a], e[2][a]), _mm512_add_ps(e[1][a], e[2][a]),
                                 _mm512_sub_ps(e[2][a], e[1][a]), _mm512_sub_ps(e[1][a], e[3][a])};
            const __m512 r[4] = {_mm512_sub_ps(e[2][a], e[4][a]), _mm512_add_ps(e[3][a], e[4][a]),
                                 _mm512_sub_ps(e[4][a], e[3][a]), _mm512_sub_ps(e[3][a], e[5][a])};
            for (int k = 0; k < 4; ++k)
              _mm512_storeu_si512(dst + (4 * a + k) * plane, PairBf16(l[k], r[k]));
          }
          for (int a = 0; a < 4; ++a) {
            e[0][a] = e[4][a];
            e[1][a] = e[5][a];
          }
        }
      }
      c0 += part.C;
    }
  }
}

// 16 output gradients of a pixel as float32.
BUSI_BF16 inline __m512 GradLoad(const char* dy, int64_t at, bool bf16) {
  if (bf16) return Bf16ToF32(reinterpret_cast<const uint16_t*>(dy) + at);
  return _mm512_loadu_ps(reinterpret_cast<const float*>(dy) + at);
}

// A dY A^T of one 2x2 tile (16 outputs each): s[pos].
BUSI_BF16 inline void GradTile(const char* dy, int64_t top, int64_t below, int64_t O, bool bf16,
                               __m512 (&s)[16]) {
  const __m512 d00 = GradLoad(dy, top, bf16), d01 = GradLoad(dy, top + O, bf16),
               d10 = GradLoad(dy, top + below, bf16), d11 = GradLoad(dy, top + below + O, bf16);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 rows[4][2] = {{d00, d01},
                             {_mm512_add_ps(d00, d10), _mm512_add_ps(d01, d11)},
                             {_mm512_sub_ps(d00, d10), _mm512_sub_ps(d01, d11)},
                             {_mm512_sub_ps(zero, d10), _mm512_sub_ps(zero, d11)}};
  for (int a = 0; a < 4; ++a) {
    s[4 * a] = rows[a][0];
    s[4 * a + 1] = _mm512_add_ps(rows[a][0], rows[a][1]);
    s[4 * a + 2] = _mm512_sub_ps(rows[a][0], rows[a][1]);
    s[4 * a + 3] = _mm512_sub_ps(zero, rows[a][1]);
  }
}

// The output-gradient transform of tile rows [tr0, tr0 + rows) of image b
// (dy: that image) -> u[pos * plane + (pair * O + o) * 2 + k].
BUSI_BF16 void WinogradGradPairs(const void* dy, uint16_t* u, int64_t plane, const WgradGeometry& g,
                                 int64_t tr0, int64_t rows, int64_t nt) {
  const char* d = static_cast<const char*>(dy);
  for (int64_t tr = 0; tr < rows; ++tr)
    for (int64_t tc = 0; tc < nt; tc += 2)
      for (int64_t o = 0; o < g.O; o += 16) {
        const int64_t top = (2 * (tr0 + tr) * g.Wo + 2 * tc) * g.O + o;
        __m512 l[16], r[16];
        GradTile(d, top, g.Wo * g.O, g.O, g.dy_bf16, l);
        GradTile(d, top + 2 * g.O, g.Wo * g.O, g.O, g.dy_bf16, r);
        uint16_t* dst = u + ((tr * nt + tc) / 2 * g.O + o) * 2;
        for (int pos = 0; pos < 16; ++pos)
          _mm512_storeu_si512(dst + pos * plane, PairBf16(l[pos], r[pos]));
      }
}

// m[pos][c][o] (float32, that pos's rows) += channels c0..c0+NC-1 x output
// blocks ob..ob+NO-1 over `pairs` tile pairs.
template <int NC, int NO>
BUSI_BF16 inline void WinogradWgradMicro(const uint16_t* v, const uint16_t* u, float* m,
                                         const WgradGeometry& g, int64_t pairs, int64_t c0,
                                         int64_t ob) {
  static_assert(NC * NO <= 24, "accumulators must leave registers for operands");
  __m512 s[NC][NO];
  float* a = m + c0 * g.O + ob * 16;
  for (int n = 0; n < NC; ++n)
    for (int q = 0; q < NO; ++q) s[n][q] = _mm512_loadu_ps(a + n * g.O + q * 16);
  const uint16_t* vp = v + c0 * 2;
  const uint16_t* up = u + ob * 32;
  for (int64_t p = 0; p < pairs; ++p, vp += 2 * g.C, up += 2 * g.O) {
    __m512bh kv[NO];
    for (int q = 0; q < NO; ++q) kv[q] = (__m512bh)_mm512_loadu_si512(up + q * 32);
    for (int n = 0; n < NC; ++n) DotBroadcastPair<NO, NO == 1>(s[n], kv, vp + 2 * n);
  }
  for (int n = 0; n < NC; ++n)
    for (int q = 0; q < NO; ++q) _mm512_storeu_ps(a + n * g.O + q * 16, s[n][q]);
}

template <int NC, int NO>
BUSI_BF16 void WinogradWgradCombos(const uint16_t* v, const uint16_t* u, float* m,
                                   const WgradGeometry& g, int64_t pairs, int64_t ob) {
  static_assert(16 % NC == 0, "C is a multiple of 16");
  for (int64_t c = 0; c < g.C; c += NC) WinogradWgradMicro<NC, NO>(v, u, m, g, pairs, c, ob);
}

// Image b's contribution to M (acc: float32 [16][C][O]), band by band.
BUSI_BF16 void WinogradWgradImage(const std::vector<Part>& parts, int64_t b, const void* dy,
                                  float* acc, const WgradGeometry& g, std::vector<uint16_t>& v,
                                  std::vector<uint16_t>& u) {
  const int64_t nt = g.Wo / 2, tile_rows = g.Ho / 2, nob = g.O / 16;
  // Bands whose two transforms (16 bf16 values per channel, output and tile)
  // stay within ~256 KB of L2.
  const int64_t per_row = 16 * nt * (g.C + g.O) * 2;
  const int64_t band = std::clamp<int64_t>((int64_t{256} << 10) / per_row, 1, tile_rows);
  // A cache line between the pos planes (see WinogradPlane).
  const int64_t vplane = band * nt * g.C + 32, uplane = band * nt * g.O + 32;
  v.resize(16 * vplane);
  u.resize(16 * uplane);
  const Geometry xg{g.H, g.W, g.C, g.Ho, g.Wo, g.O, 3, 3, 1, 1, 1, 1, 8, 16, 0, false};
  for (int64_t tr0 = 0; tr0 < tile_rows; tr0 += band) {
    const int64_t rows = std::min(band, tile_rows - tr0), pairs = rows * nt / 2;
    WinogradInputPairs(parts, b, v.data(), vplane, xg, tr0, rows, nt);
    WinogradGradPairs(dy, u.data(), uplane, g, tr0, rows, nt);
    for (int pos = 0; pos < 16; ++pos) {
      const uint16_t* vp = v.data() + pos * vplane;
      const uint16_t* up = u.data() + pos * uplane;
      float* m = acc + pos * g.C * g.O;
      int64_t ob = 0;
      for (; ob + 3 <= nob; ob += 3) WinogradWgradCombos<8, 3>(vp, up, m, g, pairs, ob);
      for (; ob + 2 <= nob; ob += 2) WinogradWgradCombos<8, 2>(vp, up, m, g, pairs, ob);
      for (; ob < nob; ++ob) WinogradWgradCombos<16, 1>(vp, up, m, g, pairs, ob);
    }
  }
}

// dw[i][j][c][o] = (G^T M G)[i][j] for M summed over the batch, in blocks
// of (c, o) entries shared out among the participants: M is read once.
void WinogradWgradOutput(ffi::ThreadPool& pool, const float* m, float* dw, int64_t co) {
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (co + kBlock - 1) / kBlock;
  const int64_t participants =
      co < 4 * kBlock ? 1 : std::max<int64_t>(pool.num_threads(), 0) + 1;
  busi::ParallelFor(pool, blocks, participants, [&](int64_t blk) {
    const int64_t k0 = blk * kBlock, n = std::min(kBlock, co - k0);
    // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: the
    // columns of G^T M (rows i of t[i][b]), then t G.
    alignas(64) float t[3][4][kBlock];
    for (int bb = 0; bb < 4; ++bb) {
      const float* m0 = m + bb * co + k0;
      const float* m1 = m + (4 + bb) * co + k0;
      const float* m2 = m + (8 + bb) * co + k0;
      const float* m3 = m + (12 + bb) * co + k0;
      for (int64_t k = 0; k < n; ++k) {
        const float h = 0.5f * (m1[k] + m2[k]), d = 0.5f * (m1[k] - m2[k]);
        t[0][bb][k] = m0[k] + h;
        t[1][bb][k] = d;
        t[2][bb][k] = h + m3[k];
      }
    }
    for (int i = 0; i < 3; ++i) {
      float* o0 = dw + (3 * i) * co + k0;
      float* o1 = o0 + co;
      float* o2 = o1 + co;
      for (int64_t k = 0; k < n; ++k) {
        const float h = 0.5f * (t[i][1][k] + t[i][2][k]), d = 0.5f * (t[i][1][k] - t[i][2][k]);
        o0[k] = t[i][0][k] + h;
        o1[k] = d;
        o2[k] = h + t[i][3][k];
      }
    }
  });
}

// The weight gradient with x given as parts (channels side by side).
ffi::Error ConvAmxWgradImpl(ffi::ThreadPool pool, const std::vector<ffi::AnyBuffer>& xs,
                            ffi::AnyBuffer dy, ffi::ResultBuffer<ffi::F32> dw, int64_t dil_h,
                            int64_t dil_w, int64_t pad_h, int64_t pad_w, int64_t unit,
                            int64_t winograd) {
  if (xs.empty()) return ffi::Error::InvalidArgument("busi_conv_amx_wgrad: no input");
  auto parts = Parts(xs);
  if (parts.has_error()) return parts.error();
  if (!F32OrBf16(dy))
    return ffi::Error::InvalidArgument("busi_conv_amx_wgrad: dy must be float32 or bf16");
  auto xd = xs[0].dimensions();
  auto yd = dy.dimensions();
  auto wd = dw->dimensions();
  int64_t channels = 0;
  for (const Part& part : *parts) channels += part.C;
  if (yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("busi_conv_amx_wgrad: x, dy and dW must be rank 4");
  if (xd[0] != yd[0] || channels != wd[2] || yd[3] != wd[3])
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_wgrad: shapes disagree (x [B,H,W,C], dy [B,Ho,Wo,O], dW [KH,KW,C,O])");
  if (wd[3] % 16 != 0 || yd[2] % 8 != 0)
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_wgrad: needs C and O multiples of 16 and output width a multiple of 8");
  if (pad_w < 0 || pad_h < 0 || dil_h < 1 || dil_w < 1)
    return ffi::Error::InvalidArgument("busi_conv_amx_wgrad: negative padding or dilation < 1");
  if (ffi::Error e = CheckUnit(unit, "busi_conv_amx_wgrad"); e.failure()) return e;
  const int64_t Wo = yd[2];
  const WgradGeometry g{xd[1], xd[2], channels, yd[1], Wo, yd[3], wd[0], wd[1], dil_h, dil_w,
                        pad_h, pad_w, Wo % 32 == 0 ? 32 : (Wo % 16 == 0 ? 16 : 8),
                        yd[1] + (wd[0] - 1) * dil_h, Wo + (wd[1] - 1) * dil_w,
                        dy.element_type() == ffi::DataType::BF16};
  const char* dys = static_cast<const char*>(dy.untyped_data());
  const int64_t dy_image = g.Ho * g.Wo * g.O * (g.dy_bf16 ? 2 : 4);
  // Captured by value: each participant gets its own scratch buffers.
  std::vector<uint16_t> xt, dyv;
  const std::vector<Part> ps = std::move(*parts);
  if (winograd != 0) {
    if (ffi::Error e =
            CheckWinograd(winograd, unit, g.KH, g.KW, dil_h, dil_w, pad_h, pad_w,
                          g.H != g.Ho || g.W != g.Wo || g.Ho % 2 != 0, "busi_conv_amx_wgrad");
        e.failure())
      return e;
    const int64_t co = g.C * g.O;
    if (xd[0] == 0 || g.Ho == 0 || g.Wo == 0) {  // No tiles: a zero gradient.
      std::fill(dw->typed_data(), dw->typed_data() + 9 * co, 0.0f);
      return ffi::Error::Success();
    }
    std::vector<float> m(16 * co);
    busi::SumOverImages(pool, xd[0], 16 * co, m.data(), [=](int64_t b, float* acc) mutable {
      WinogradWgradImage(ps, b, dys + b * dy_image, acc, g, xt, dyv);
    });
    WinogradWgradOutput(pool, m.data(), dw->typed_data(), co);
    return ffi::Error::Success();
  }
  busi::SumOverImages(pool, xd[0], wd[0] * wd[1] * wd[2] * wd[3], dw->typed_data(),
                      [=](int64_t b, float* acc) mutable {
                        if (unit == kUnitAmx) {
                          WgradImage(ps, b, dys + b * dy_image, acc, g, xt, dyv);
                        } else {
                          WgradImageAvx(ps, b, dys + b * dy_image, acc, g, xt, dyv);
                        }
                      });
  return ffi::Error::Success();
}

// The buffers of a handler's remaining arguments (a conv's input parts).
ffi::ErrorOr<std::vector<ffi::AnyBuffer>> Buffers(const ffi::RemainingArgs& xs) {
  std::vector<ffi::AnyBuffer> parts;
  for (size_t i = 0; i < xs.size(); ++i) {
    auto x = xs.get<ffi::AnyBuffer>(i);
    if (x.has_error()) return ffi::Unexpected(x.error());
    parts.push_back(*x);
  }
  return parts;
}

}  // namespace

ffi::Error ConvAmx(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer k,
                   ffi::Result<ffi::AnyBuffer> y, int64_t dil_h, int64_t dil_w, int64_t pad_h,
                   int64_t pad_w, int64_t unit, int64_t winograd, int64_t packed, int64_t relu,
                   int64_t shuffle) {
  return ConvAmxImpl(pool, {x}, k, nullptr, nullptr, y, dil_h, dil_w, pad_h, pad_w, unit,
                     winograd, packed, relu, shuffle);
}

ffi::Error CheckAffine(const ffi::AnyBuffer& k, const ffi::Buffer<ffi::F32>& scale,
                       const ffi::Buffer<ffi::F32>& shift) {
  const auto o = k.dimensions().size() == 4 ? k.dimensions()[3] : -1;
  if (scale.element_count() != o || shift.element_count() != o)
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_affine_relu: scale and shift must hold one value per output channel");
  return ffi::Error::Success();
}

ffi::Error ConvAmxAffineRelu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer k,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                             ffi::Result<ffi::AnyBuffer> y, int64_t dil_h, int64_t dil_w,
                             int64_t pad_h, int64_t pad_w, int64_t unit, int64_t winograd,
                             int64_t packed, int64_t relu, int64_t shuffle) {
  if (ffi::Error e = CheckAffine(k, scale, shift); e.failure()) return e;
  return ConvAmxImpl(pool, {x}, k, scale.typed_data(), shift.typed_data(), y, dil_h, dil_w,
                     pad_h, pad_w, unit, winograd, packed, relu, shuffle);
}

// The same over the concatenation of the remaining arguments along channels.
ffi::Error ConvAmxConcatAffineRelu(ffi::ThreadPool pool, ffi::AnyBuffer k,
                                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                                   ffi::RemainingArgs xs, ffi::Result<ffi::AnyBuffer> y,
                                   int64_t dil_h, int64_t dil_w, int64_t pad_h, int64_t pad_w,
                                   int64_t unit, int64_t winograd, int64_t packed,
                                   int64_t relu, int64_t shuffle) {
  if (ffi::Error e = CheckAffine(k, scale, shift); e.failure()) return e;
  auto parts = Buffers(xs);
  if (parts.has_error()) return parts.error();
  return ConvAmxImpl(pool, *parts, k, scale.typed_data(), shift.typed_data(), y, dil_h, dil_w,
                     pad_h, pad_w, unit, winograd, packed, relu, shuffle);
}

// The forward pass over the concatenation of the remaining arguments, no
// epilogue (training: the U-Net skips are read where they lie).
ffi::Error ConvAmxConcat(ffi::ThreadPool pool, ffi::AnyBuffer k, ffi::RemainingArgs xs,
                         ffi::Result<ffi::AnyBuffer> y, int64_t dil_h, int64_t dil_w,
                         int64_t pad_h, int64_t pad_w, int64_t unit, int64_t winograd,
                         int64_t packed, int64_t relu, int64_t shuffle) {
  auto parts = Buffers(xs);
  if (parts.has_error()) return parts.error();
  return ConvAmxImpl(pool, *parts, k, nullptr, nullptr, y, dil_h, dil_w, pad_h, pad_w, unit,
                     winograd, packed, relu, shuffle);
}

// The kernel [KH, KW, C, O] (float32 or bf16) in the layout the forward
// handlers read with packed=1, for the same unit and winograd: bf16
// [4, 4, C, O] (winograd=1, a 3x3 kernel: G g G^T in pair-interleaved
// blocks) or [KH, KW, C, O] (the direct pass's tiles). Packing is the
// kernel-only work of a forward call; done once for a set of weights
// (inference), it leaves each call only the work that depends on x.
ffi::Error ConvAmxPack(ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> out, int64_t unit,
                       int64_t winograd) {
  if (ffi::Error e = CheckUnit(unit, "busi_conv_amx_pack"); e.failure()) return e;
  auto kd = k.dimensions();
  auto od = out->dimensions();
  if (!F32OrBf16(k) || out->element_type() != ffi::DataType::BF16 || kd.size() != 4 ||
      od.size() != 4)
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_pack: kernel [KH, KW, C, O] float32 or bf16 -> bf16 rank 4");
  if (kd[2] % 16 != 0 || kd[3] % 16 != 0)
    return ffi::Error::InvalidArgument("busi_conv_amx_pack: needs C and O multiples of 16");
  if (winograd != 0 &&
      (winograd != 1 || unit != kUnitAvx512Bf16 || kd[0] != 3 || kd[1] != 3))
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_pack: winograd=1 needs unit 1 (AVX-512 BF16) and a 3x3 kernel");
  const int64_t kh = winograd != 0 ? 4 : kd[0], kw = winograd != 0 ? 4 : kd[1];
  if (od[0] != kh || od[1] != kw || od[2] != kd[2] || od[3] != kd[3])
    return ffi::Error::InvalidArgument(
        "busi_conv_amx_pack: output must be [4, 4, C, O] (winograd=1) or the kernel's shape");
  Geometry g{};
  g.KH = kd[0];
  g.KW = kd[1];
  g.C = kd[2];
  g.O = kd[3];
  g.K = ChannelsPerTile(unit, g.C);
  const bool bf16 = k.element_type() == ffi::DataType::BF16;
  uint16_t* dst = static_cast<uint16_t*>(out->untyped_data());
  if (winograd != 0) {
    PackWinogradKernel(k.untyped_data(), bf16, g, 0, g.O / 16, dst);
  } else {
    const std::vector<uint16_t> packed = PackKernel(k.untyped_data(), bf16, g);
    std::memcpy(dst, packed.data(), packed.size() * sizeof(uint16_t));
  }
  return ffi::Error::Success();
}

ffi::Error ConvAmxWgrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                        ffi::ResultBuffer<ffi::F32> dw, int64_t dil_h, int64_t dil_w,
                        int64_t pad_h, int64_t pad_w, int64_t unit, int64_t winograd) {
  return ConvAmxWgradImpl(pool, {x}, dy, dw, dil_h, dil_w, pad_h, pad_w, unit, winograd);
}

// The weight gradient of a conv over the concatenation of the remaining
// arguments: dW [KH, KW, sum C_k, O].
ffi::Error ConvAmxConcatWgrad(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::RemainingArgs xs,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t dil_h, int64_t dil_w,
                              int64_t pad_h, int64_t pad_w, int64_t unit, int64_t winograd) {
  auto parts = Buffers(xs);
  if (parts.has_error()) return parts.error();
  return ConvAmxWgradImpl(pool, *parts, dy, dw, dil_h, dil_w, pad_h, pad_w, unit, winograd);
}

// The attributes every convolution handler takes after its buffers.
// (Bindings cannot be moved, only chained: hence the references.)
template <typename Binding>
auto ConvAttrs(Binding&& binding) {
  return std::move(binding)
      .template Attr<int64_t>("dil_h")
      .template Attr<int64_t>("dil_w")
      .template Attr<int64_t>("pad_h")
      .template Attr<int64_t>("pad_w")
      .template Attr<int64_t>("unit")       // 0: AMX, 1: AVX-512 BF16
      .template Attr<int64_t>("winograd");  // 1: F(2x2, 3x3) (unit 1 only), 0: direct
}

// The forward handlers' attributes: ConvAttrs, then whether the kernel is
// already packed (BusiConvAmxPack's output for the same unit and winograd),
// whether an epilogue (scale, shift) ends in a ReLU, and whether the store
// pixel-shuffles (Geometry::shuffle).
template <typename Binding>
auto ForwardAttrs(Binding&& binding) {
  return ConvAttrs(std::move(binding))
      .template Attr<int64_t>("packed")
      .template Attr<int64_t>("relu")
      .template Attr<int64_t>("shuffle");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmx, ConvAmx,
                              ForwardAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()  // x: float32 or bf16
                                            .Arg<ffi::AnyBuffer>()  // kernel: float32 or bf16
                                            .Ret<ffi::AnyBuffer>()  // y: float32 or bf16
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxAffineRelu, ConvAmxAffineRelu,
                              ForwardAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()         // x: float32 or bf16
                                            .Arg<ffi::AnyBuffer>()         // kernel: float32 or bf16
                                            .Arg<ffi::Buffer<ffi::F32>>()  // scale [O]
                                            .Arg<ffi::Buffer<ffi::F32>>()  // shift [O]
                                            .Ret<ffi::AnyBuffer>()         // y: float32 or bf16
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxConcatAffineRelu, ConvAmxConcatAffineRelu,
                              ForwardAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()         // kernel: float32 or bf16
                                            .Arg<ffi::Buffer<ffi::F32>>()  // scale [O]
                                            .Arg<ffi::Buffer<ffi::F32>>()  // shift [O]
                                            .RemainingArgs()               // x parts: float32 or bf16
                                            .Ret<ffi::AnyBuffer>()         // y: float32 or bf16
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxWgrad, ConvAmxWgrad,
                              ConvAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()         // x: float32 or bf16
                                            .Arg<ffi::AnyBuffer>()         // dy: float32 or bf16
                                            .Ret<ffi::Buffer<ffi::F32>>()  // dW
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxConcat, ConvAmxConcat,
                              ForwardAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()  // kernel: float32 or bf16
                                            .RemainingArgs()        // x parts: float32 or bf16
                                            .Ret<ffi::AnyBuffer>()  // y: float32 or bf16
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxConcatWgrad, ConvAmxConcatWgrad,
                              ConvAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::AnyBuffer>()         // dy: float32 or bf16
                                            .RemainingArgs()               // x parts: float32 or bf16
                                            .Ret<ffi::Buffer<ffi::F32>>()  // dW
                              ));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BusiConvAmxPack, ConvAmxPack,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // kernel [KH, KW, C, O]: float32 or bf16
                                  .Ret<ffi::AnyBuffer>()  // packed: bf16
                                  .Attr<int64_t>("unit")
                                  .Attr<int64_t>("winograd"));
