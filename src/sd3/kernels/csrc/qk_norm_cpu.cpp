// SD3.5's QK-normalization (RMSNorm of every query and key head, Esser et al. 2024, sec. 5.3.2)
// for bf16 inference on CPUs with AVX-512 BF16, fused with the joint attention's concatenation.
//
// Used by sd3/kernels/fused.py through ctypes, built into one library with flash_attention_cpu.cpp.
// The plain module runs six elementwise ops over a strided [B, H, L, 64] view of the qkv
// projection, then torch.cat copies both streams into the joint sequence. Here each 64-wide row
// is read once and written once, straight into its place in the joint buffer, normalised as in
// bf16_rows.h. Without a weight the row is copied (the values, which are not normalised).
// (The MMDiT's attention path normalises Q and K inside flash_attention_cpu.cpp instead; this
// kernel serves the other paths, e.g. torch SDPA.)
#include <stdint.h>
#include <string.h>

#include "bf16_rows.h"

extern "C" {

// x, y: [B, H, L, 64] bf16 with element strides (sb, sh, sl) and unit stride in d; w: 64 bf16
// or null (copy). Rows are split over OpenMP threads.
void sd3_rms_norm_heads(const uint16_t* x, int64_t xsb, int64_t xsh, int64_t xsl,
                        const uint16_t* w, float eps, uint16_t* y, int64_t ysb, int64_t ysh,
                        int64_t ysl, int64_t B, int64_t H, int64_t L, int num_threads) {
  const int64_t rows = B * H * L;
#pragma omp parallel num_threads(num_threads)
  {
    const sd3::RmsWeight weight(w);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, l = r % L;
      const uint16_t* src = x + b * xsb + h * xsh + l * xsl;
      uint16_t* dst = y + b * ysb + h * ysh + l * ysl;
      if (w != nullptr) sd3::rms_norm_row(src, weight, eps, dst);
      else memcpy(dst, src, sd3::HEAD * 2);
    }
  }
}

}  // extern "C"
