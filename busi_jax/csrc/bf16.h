// Scalar float32 <-> bfloat16 loads and stores for the elementwise kernels
// (batch_norm.cc, max_pool.cc): plain code that g++ -O3 -march=native
// vectorises inside their loops. busi_jax/native.py hashes this header into
// each kernel's build key.

#ifndef BUSI_JAX_CSRC_BF16_H_
#define BUSI_JAX_CSRC_BF16_H_

#include <cstdint>
#include <cstring>

namespace busi {

using bf16 = uint16_t;

inline float Load(const float* p) { return *p; }
inline float Load(const bf16* p) {
  const uint32_t u = uint32_t{*p} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void Store(float* p, float v) { *p = v; }
// Round to nearest even, as XLA's convert; NaN stays NaN.
inline void Store(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  u += 0x7fffu + ((u >> 16) & 1u);
  *p = nan ? bf16{0x7fc0} : bf16(u >> 16);
}

}  // namespace busi

#endif  // BUSI_JAX_CSRC_BF16_H_
