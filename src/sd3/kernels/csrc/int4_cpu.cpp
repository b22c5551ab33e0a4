// ggml's Q4_0 blocks -> bf16 weights, for the int4 layers (sd3/kernels/quantization.py,
// `Int4Linear.dequantized`) on CPUs with AVX-512 BF16: one pass over the blocks instead of the
// plain path's four tensor ops, with its arithmetic, so the weights are the same bits: the fp16
// scale d rounded to bf16, then bf16((q - 8) * d), exact in fp32 before that one rounding.
//
// A block is 16 bytes holding 32 weights (value j in the low nibble of byte j, value j + 16 in
// its high nibble) with one fp16 scale; block b is written to out[32 b, 32 b + 32).
#include <immintrin.h>
#include <stdint.h>

#include "bf16_rows.h"

namespace {

// blocks [b, b + count) of the layer, count <= 16
inline void blocks_to_bf16(const uint8_t* packed, const uint16_t* scales, uint16_t* out,
                           int64_t b, int count) {
  const __mmask16 take = static_cast<__mmask16>((1u << count) - 1);
  const __m256i half = _mm256_maskz_loadu_epi16(take, scales + b);
  float d[16];  // the fp16 scales in fp32, rounded to bf16 as the plain path's scale.to(bf16)
  _mm512_storeu_ps(d, sd3::round_bf16(_mm512_cvtph_ps(half)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int i = 0; i < count; ++i) {
    const __m512 scale = _mm512_set1_ps(d[i]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + 16 * (b + i)));
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low));
    const __m512 wh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
    sd3::store_bf16(out + 32 * (b + i), _mm512_mul_ps(_mm512_sub_ps(wl, eight), scale));
    sd3::store_bf16(out + 32 * (b + i) + 16, _mm512_mul_ps(_mm512_sub_ps(wh, eight), scale));
  }
}

}  // namespace

extern "C" {

void sd3_q4_0_to_bf16(const uint8_t* packed, const uint16_t* scales, uint16_t* out,
                      int64_t blocks, int num_threads) {
  const int64_t chunks = (blocks + 15) / 16;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = 16 * c;
    blocks_to_bf16(packed, scales, out, b, static_cast<int>(blocks - b < 16 ? blocks - b : 16));
  }
}

}  // extern "C"
