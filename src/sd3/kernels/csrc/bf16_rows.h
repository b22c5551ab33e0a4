// Row helpers shared by the kernels: bf16 <-> fp32 vectors, and SD3.5's RMS qk-norm of one 64-wide
// head row (Esser et al. 2024, sec. 5.3.2) with the plain module's arithmetic:
//   y = bf16(bf16(x * 1 / sqrt(mean(x^2) + eps)) * w)
// (fp32 statistics, the normalised row rounded to bf16, then times the bf16 weight), up to the
// order of the 64-term fp32 sum. qk_norm_cpu.cpp writes such rows into the joint buffer;
// flash_attention_cpu.cpp normalises Q and K rows as it loads them.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

namespace sd3 {

constexpr int HEAD = 64;  // head dim

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 round_bf16(__m512 x) {  // fp32 -> nearest bf16 (ties to even) -> fp32
  __m256i bits = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store_bf16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

struct RmsWeight {  // a norm's 64 bf16 weights as four fp32 vectors (zeros for none)
  __m512 w[HEAD / 16];
  explicit RmsWeight(const uint16_t* weight) {
    for (int j = 0; j < HEAD / 16; ++j)
      w[j] = weight != nullptr ? load_bf16(weight + 16 * j) : _mm512_setzero_ps();
  }
};

// dst = RMSNorm(src) * weight for one 64-wide bf16 row (dst may be src).
inline void rms_norm_row(const uint16_t* src, const RmsWeight& weight, float eps, uint16_t* dst) {
  __m512 v[HEAD / 16];
  for (int j = 0; j < HEAD / 16; ++j) v[j] = load_bf16(src + 16 * j);
  __m512 ss = _mm512_mul_ps(v[0], v[0]);
  for (int j = 1; j < HEAD / 16; ++j) ss = _mm512_fmadd_ps(v[j], v[j], ss);
  const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / HEAD + eps));
  for (int j = 0; j < HEAD / 16; ++j)
    store_bf16(dst + 16 * j, _mm512_mul_ps(round_bf16(_mm512_mul_ps(v[j], inv)), weight.w[j]));
}

}  // namespace sd3
