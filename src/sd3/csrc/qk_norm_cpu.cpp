// SD3.5's QK-normalization (RMSNorm of every query and key head, Esser et al. 2024, sec. 5.3.2)
// for bf16 inference on CPUs with AVX-512 BF16, fused with the joint attention's concatenation.
//
// Used by sd3/models/fused.py through ctypes, built into one library with flash_attention_cpu.cpp.
// The plain module runs six elementwise ops over a strided [B, H, L, 64] view of the qkv
// projection, then torch.cat copies both streams into the joint sequence. Here each 64-wide row
// is read once and written once, straight into its place in the joint buffer:
//   y = bf16(bf16(x * 1 / sqrt(mean(x^2) + eps)) * w)
// which is the plain module's arithmetic (fp32 statistics, the normalised row rounded to bf16,
// then times the bf16 weight) up to the order of the 64-term fp32 sum. Without a weight the row
// is copied (the values, which are not normalised).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int D = 64;  // head dim

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

}  // namespace

extern "C" {

// x, y: [B, H, L, 64] bf16 with element strides (sb, sh, sl) and unit stride in d; w: 64 bf16
// or null (copy). Rows are split over OpenMP threads.
void sd3_rms_norm_heads(const uint16_t* x, int64_t xsb, int64_t xsh, int64_t xsl,
                        const uint16_t* w, float eps, uint16_t* y, int64_t ysb, int64_t ysh,
                        int64_t ysl, int64_t B, int64_t H, int64_t L, int num_threads) {
  __m512 wv[D / 16];
  if (w != nullptr)
    for (int j = 0; j < D / 16; ++j) wv[j] = load_bf16(w + 16 * j);
  const int64_t rows = B * H * L;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (H * L), h = r / L % H, l = r % L;
    const uint16_t* src = x + b * xsb + h * xsh + l * xsl;
    uint16_t* dst = y + b * ysb + h * ysh + l * ysl;
    __m512 v[D / 16];
    for (int j = 0; j < D / 16; ++j) v[j] = load_bf16(src + 16 * j);
    if (w != nullptr) {
      __m512 ss = _mm512_mul_ps(v[0], v[0]);
      for (int j = 1; j < D / 16; ++j) ss = _mm512_fmadd_ps(v[j], v[j], ss);
      const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / D + eps));
      for (int j = 0; j < D / 16; ++j) v[j] = _mm512_mul_ps(round_bf16(_mm512_mul_ps(v[j], inv)), wv[j]);
    }
    for (int j = 0; j < D / 16; ++j) store_bf16(dst + 16 * j, v[j]);
  }
}

}  // extern "C"
