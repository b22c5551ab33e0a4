// GroupNorm, optionally followed by SiLU, for the VAE's bf16 inference on CPUs with AVX-512 BF16,
// on channels-last tensors (every pixel's C channels contiguous).
//
// Used by sd3/kernels/fused.py through ctypes, built into one library with flash_attention_cpu.cpp.
// torch runs GroupNorm (a statistics pass, then a normalising pass that writes bf16) and SiLU (a
// pass that reads that bf16 and writes again) separately. Here:
//   pass 1: per-channel sums of (x - s_c) and (x - s_c)^2, s_c the channel's first pixel (which
//           keeps the sums small where the mean is large), in fp32 over runs of pixels and fp64
//           across runs and threads; merged per group in fp64 into the mean and 1 / sqrt(var + eps)
//   pass 2: y = bf16(silu(x * a_c + b_c)), a_c = rstd_g * weight_c, b_c = bias_c - mean_g * a_c
// so the activation is rounded to bf16 once, not twice.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t RUN = 256;  // pixels summed in fp32 before joining the fp64 total

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_bf16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// e^x to about 2e-7 relative: 2^n * 2^f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.540353039338161e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355814642844e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu_ps(__m512 v) {  // v / (1 + e^-v)
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

}  // namespace

extern "C" {

// x, y: [B, P, C] bf16, contiguous (P pixels, channels last); weight, bias: C fp32; C a multiple
// of 16 and of G. y may be x (in place).
void sd3_group_norm_silu(const uint16_t* x, uint16_t* y, int64_t B, int64_t P, int64_t C,
                         int64_t G, const float* weight, const float* bias, float eps, int silu,
                         int num_threads) {
  const int64_t V = C / 16;  // vectors per pixel
  std::vector<double> totals(2 * C);
  std::vector<float> scale(C), shift(C), first(C);
  for (int64_t b = 0; b < B; ++b) {
    const uint16_t* xb = x + b * P * C;
    uint16_t* yb = y + b * P * C;
    for (int64_t c = 0; c < C; ++c) first[c] = bf16_to_float(xb[c]);
    std::fill(totals.begin(), totals.end(), 0.0);
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<double> mine(2 * C, 0.0);
      std::vector<float> run(2 * C);
#pragma omp for schedule(static)
      for (int64_t start = 0; start < P; start += RUN) {
        const int64_t stop = start + RUN < P ? start + RUN : P;
        for (int64_t v = 0; v < V; ++v) {
          const __m512 s = _mm512_loadu_ps(first.data() + 16 * v);
          __m512 sum = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
          for (int64_t p = start; p < stop; ++p) {
            const __m512 d = _mm512_sub_ps(load_bf16(xb + p * C + 16 * v), s);
            sum = _mm512_add_ps(sum, d);
            squares = _mm512_fmadd_ps(d, d, squares);
          }
          _mm512_storeu_ps(run.data() + 16 * v, sum);
          _mm512_storeu_ps(run.data() + C + 16 * v, squares);
        }
        for (int64_t c = 0; c < 2 * C; ++c) mine[c] += run[c];
      }
#pragma omp critical
      for (int64_t c = 0; c < 2 * C; ++c) totals[c] += mine[c];
    }
    const int64_t per_group = C / G;
    for (int64_t g = 0; g < G; ++g) {
      double mean = 0.0, spread = 0.0;  // of the group: mean of channel means, mean square
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double m = totals[c] / P;
        mean += first[c] + m;
        spread += totals[C + c] / P - m * m;  // E[(x - mean_c)^2] of channel c
      }
      mean /= per_group;
      double var = spread / per_group;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double d = first[c] + totals[c] / P - mean;
        var += d * d / per_group;
      }
      const double rstd = 1.0 / sqrt(var + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        scale[c] = static_cast<float>(rstd * weight[c]);
        shift[c] = static_cast<float>(bias[c] - mean * rstd * weight[c]);
      }
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t v = 0; v < V; ++v) {
        __m512 h = _mm512_fmadd_ps(load_bf16(xb + p * C + 16 * v),
                                   _mm512_loadu_ps(scale.data() + 16 * v),
                                   _mm512_loadu_ps(shift.data() + 16 * v));
        if (silu) h = silu_ps(h);
        store_bf16(yb + p * C + 16 * v, h);
      }
    }
  }
}

}  // extern "C"
