// Flash attention for CPUs with AVX-512 BF16 (vdpbf16ps) or AMX (tdpbf16ps), head dim 64, no mask.
//
// Used by sd3/kernels/flash_attention.py (loaded by build.py) through ctypes: plain C ABI, no torch headers, so it builds in
// seconds with any g++/clang++. One task = (batch, head, block of BLOCK_Q query rows); tasks are
// split over OpenMP threads in contiguous ranges, so a thread packs each head's K and V once.
//
// Per task, for each block of BLOCK_K keys (online softmax, Dao et al. 2022):
//   S = Q K^T                     bf16 x bf16 -> fp32 (vdpbf16ps, K packed in key pairs of d)
//   m' = max(m, rowmax S); P = exp2((S - m') * scale * log2 e) -> bf16; l = l * a + rowsum P
//   O = O * a + P V               bf16 x bf16 -> fp32 (vdpbf16ps, V packed in key pairs)
// with a = exp2((m - m') * scale * log2 e). Extra memory per thread: K and V of one head (packed)
// and O(BLOCK_Q * BLOCK_K) scratch.
//
// The inputs are the MM-DiT's joint sequence as up to two streams ([context, x]), each with its own
// RMS qk-norm, applied as Q rows are loaded and K rows packed (bf16_rows.h), so the normalised,
// concatenated heads are never written out.
//
// Two entry points share the packing and the softmax: sd3_attention_bf16 computes both products
// with vdpbf16ps in zmm registers; sd3_attention_amx (built when the compiler knows AMX) computes
// them on AMX tiles, 16 query rows at a time. The packed K and V layouts are exactly the VNNI
// layouts AMX's B operand wants, so both paths read the same buffers.
//
// On AMX the tiles and the softmax take turns: the tile work and the vector work each take about
// half the time. Interleaving them (a software pipeline: item i's softmax on the vectors while
// the tiles compute item i+1's Q K^T and item i-1's P V, in slices between rows) ran no faster:
// tdpbf16ps overlaps with vector FMAs, but each tilestored, and to a lesser degree tileloadd,
// serialises with the vector work around it, and Q K^T's scores must leave the tiles by a store.
// The measurements are in docs/performance.md.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "bf16_rows.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int D = 64;         // head dim
constexpr int DP = D / 2;     // pairs of d, the unit vdpbf16ps contracts over
constexpr int R = 6;          // query rows per micro-tile (6 x 4 accumulators = 24 zmm)
constexpr int NV = 4;         // 16-key vectors per Q K^T micro-tile
constexpr int KT = 16 * NV;   // keys per Q K^T micro-tile; key counts are padded to this
// Q and K blocks: a wide range of sizes ran within noise of each other (tiles stay in L2).
constexpr int BLOCK_Q = 96;   // query rows per task (multiple of R)
constexpr int BLOCK_K = 256;  // keys per online-softmax step (multiple of KT)

static_assert(BLOCK_Q % R == 0 && BLOCK_K % KT == 0, "block sizes must tile");

// One stream of a [B, H, L, 64] bf16 sequence: its rows with arbitrary strides (in elements), d
// contiguous, and the RMS norm its rows get as they are read (weight null: none). The ABI struct
// is mirrored by build.py's ctypes `Segment`.
struct Segment {
  const uint16_t* data;
  int64_t sb, sh, sl, len;
  const uint16_t* weight;
  float eps;
};

// The joint sequence: up to two streams one after the other (the MMDiT's [context, x]), read
// row by row with each stream's qk-norm applied (bf16_rows.h), so neither the normalised heads
// nor their concatenation is ever written out.
struct Seq {
  static constexpr int MAX = 2;
  Segment seg[MAX];
  sd3::RmsWeight norm[MAX];
  int n;
  Seq(const Segment* s, int count)
      : seg{s[0], count > 1 ? s[1] : Segment{}},
        norm{sd3::RmsWeight(s[0].weight), sd3::RmsWeight(count > 1 ? s[1].weight : nullptr)},
        n(count) {}
  int64_t length() const { return n > 1 ? seg[0].len + seg[1].len : seg[0].len; }
  // Row l of head h in batch b: a pointer into the input, or, for a normed stream, into tmp.
  const uint16_t* row(int64_t b, int64_t h, int64_t l, uint16_t* tmp) const {
    const int i = l < seg[0].len ? 0 : 1;
    const Segment& s = seg[i];
    const uint16_t* src = s.data + b * s.sb + h * s.sh + (l - (i ? seg[0].len : 0)) * s.sl;
    if (s.weight == nullptr) return src;
    sd3::rms_norm_row(src, norm[i], s.eps, tmp);
    return tmp;
  }
};

inline __m512 exp2_ps(__m512 x) {
  // 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2; the degree-3 polynomial for 2^f (a weighted
  // least-squares fit) has relative error < 8e-5, far below the bf16 rounding (4e-3) P gets next,
  // and is a little faster over a whole call than degree 4. x <= 0 here (the row maximum
  // is subtracted), and scalef takes any n: 2^n underflows to 0 for x below about -150.
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.05508877f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24260466f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69327628f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999289f));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// Kp[j / 16][dp][j % 16][2] = K[j][2 dp : 2 dp + 2]; keys >= L are zero.
void pack_k(const Seq& k, int64_t b, int64_t h, int64_t L, int64_t Lpad, uint32_t* kp) {
  alignas(64) uint16_t tmp[D];
  for (int64_t j0 = 0; j0 < Lpad; j0 += 16) {
    uint32_t* blk = kp + j0 * DP;
    for (int j = 0; j < 16; ++j) {
      if (j0 + j < L) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(k.row(b, h, j0 + j, tmp));
        for (int dp = 0; dp < DP; ++dp) blk[dp * 16 + j] = src[dp];
      } else {
        for (int dp = 0; dp < DP; ++dp) blk[dp * 16 + j] = 0;
      }
    }
  }
}

// Vp[j / 2][d][j % 2] = V[j][d]; keys >= L are zero.
void pack_v(const Seq& v, int64_t b, int64_t h, int64_t L, int64_t Lpad, uint16_t* vp) {
  alignas(64) uint16_t tmp_a[D], tmp_b[D];
  // lane 2i + t of output vector c takes d = 16 (c % 2) + i of key t (index >= 32: second row)
  alignas(64) uint16_t idx0[32], idx1[32];
  for (int i = 0; i < 16; ++i)
    for (int t = 0; t < 2; ++t) {
      idx0[2 * i + t] = uint16_t(i + 32 * t);
      idx1[2 * i + t] = uint16_t(16 + i + 32 * t);
    }
  const __m512i i0 = _mm512_load_si512(idx0), i1 = _mm512_load_si512(idx1);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t j = 0; j < Lpad; j += 2) {
    __m512i a_lo = zero, a_hi = zero, b_lo = zero, b_hi = zero;
    if (j < L) {
      const uint16_t* a = v.row(b, h, j, tmp_a);
      a_lo = _mm512_loadu_si512(a);
      a_hi = _mm512_loadu_si512(a + 32);
    }
    if (j + 1 < L) {
      const uint16_t* r = v.row(b, h, j + 1, tmp_b);
      b_lo = _mm512_loadu_si512(r);
      b_hi = _mm512_loadu_si512(r + 32);
    }
    uint16_t* dst = vp + j * D;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a_lo, i0, b_lo));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a_lo, i1, b_lo));
    _mm512_storeu_si512(dst + 64, _mm512_permutex2var_epi16(a_hi, i0, b_hi));
    _mm512_storeu_si512(dst + 96, _mm512_permutex2var_epi16(a_hi, i1, b_hi));
  }
}

// S[r][0 : KT] = Q[r] . K[j0 : j0 + KT] for R rows; returns the row maxima over the first nvalid keys.
inline void qk_tile(const uint32_t* q, const uint32_t* kp, float* s, int64_t s_stride, int nvalid,
                    float* rowmax) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int dp = 0; dp < DP; ++dp) {
    __m512i kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_si512(kp + (c * DP + dp) * 16);
    for (int r = 0; r < R; ++r) {
      __m512i qv = _mm512_set1_epi32(int(q[r * DP + dp]));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(qv), as_bh(kv[c]));
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < NV; ++c) {
      _mm512_storeu_ps(s + r * s_stride + c * 16, acc[r][c]);
      int n = std::clamp(nvalid - c * 16, 0, 16);
      mx = _mm512_mask_max_ps(mx, __mmask16((1u << n) - 1), mx, acc[r][c]);
    }
    rowmax[r] = std::max(rowmax[r], _mm512_reduce_max_ps(mx));
  }
}

// O[r] = O[r] * alpha[r] + P[r][0 : 2 npairs] . V[0 : 2 npairs] for R rows.
inline void pv_tile(const uint32_t* p, int64_t p_stride, const uint16_t* vp, int64_t npairs,
                    const float* alpha, float* o) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c * 16), a);
  }
  for (int64_t kp = 0; kp < npairs; ++kp) {
    __m512i vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = _mm512_loadu_si512(vp + kp * 2 * D + c * 32);
    for (int r = 0; r < R; ++r) {
      __m512i pv = _mm512_set1_epi32(int(p[r * p_stride + kp]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pv), as_bh(vv[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * D + c * 16, acc[r][c]);
}

struct Scratch {
  uint32_t* kp;  // packed K of one head, Lpad x 64 bf16
  uint16_t* vp;  // packed V of one head, Lpad x 64 bf16
  uint32_t* q;   // BLOCK_Q x 64 bf16
  float* s;      // BLOCK_Q x BLOCK_K
  uint16_t* p;   // BLOCK_Q x BLOCK_K bf16
  float* o;      // BLOCK_Q x 64
  float m[BLOCK_Q], l[BLOCK_Q], alpha[BLOCK_Q], blockmax[BLOCK_Q];
};

// P = exp2((S - m') * scale * log2 e) as bf16 for the block's first n keys (0 up to n_pad), the
// new running maxima m' and sums l, and each row's rescale factor alpha for O.
inline void softmax_rows(Scratch& w, int64_t rows_pad, int64_t n, int64_t n_pad, float scale_log2) {
    for (int64_t r = 0; r < rows_pad; ++r) {
      const float m_new = std::max(w.m[r], w.blockmax[r]);
      w.alpha[r] = exp2f((w.m[r] - m_new) * scale_log2);  // 0 on the first block (m = -inf)
      w.m[r] = m_new;
      const __m512 c = _mm512_set1_ps(scale_log2), mc = _mm512_set1_ps(m_new * scale_log2);
      __m512 sum = _mm512_setzero_ps();
      const float* s = w.s + r * BLOCK_K;
      uint16_t* p = w.p + r * BLOCK_K;
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) {  // full vectors: no masks, two converted in one instruction
        const __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), c, mc));
        const __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), c, mc));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      for (; j < n_pad; j += 16) {
        __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), c, mc));
        const int64_t valid = std::clamp<int64_t>(n - j, 0, 16);
        e = _mm512_maskz_mov_ps(__mmask16((1u << valid) - 1), e);
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
      }
      w.l[r] = w.l[r] * w.alpha[r] + _mm512_reduce_add_ps(sum);
    }

}

// out rows i0 .. i0 + rows = O / l, as bf16.
inline void write_rows(const Scratch& w, int64_t rows, int64_t i0, uint16_t* out, int64_t out_row) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / w.l[r]);
    uint16_t* dst = out + (i0 + r) * out_row;
    for (int c = 0; c < 4; ++c) {
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(w.o + r * D + c * 16), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 16), (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

// The block's query rows i0 .. i0 + rows into w.q (zero up to rows_pad), fresh m, l and O.
inline void start_block(const Seq& q, int64_t b, int64_t h, int64_t i0, int64_t rows,
                        int64_t rows_pad, Scratch& w) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(w.q + r * DP);
    if (r < rows) {
      const uint16_t* src = q.row(b, h, i0 + r, dst);
      if (src != dst) memcpy(dst, src, D * 2);
    }
    else memset(w.q + r * DP, 0, D * 2);
    w.m[r] = -INFINITY;
    w.l[r] = 0.f;
  }
  memset(w.o, 0, sizeof(float) * rows_pad * D);
}

void attend_block(const Seq& q, int64_t b, int64_t h, int64_t i0, int64_t Lq, int64_t Lk,
                  float scale_log2, Scratch& w, uint16_t* out, int64_t out_row) {
  const int64_t rows = std::min<int64_t>(BLOCK_Q, Lq - i0);
  const int64_t rows_pad = (rows + R - 1) / R * R;
  start_block(q, b, h, i0, rows, rows_pad, w);

  for (int64_t j0 = 0; j0 < Lk; j0 += BLOCK_K) {
    const int64_t n = std::min<int64_t>(BLOCK_K, Lk - j0);
    const int64_t n_pad = (n + KT - 1) / KT * KT;
    for (int64_t r = 0; r < rows_pad; ++r) w.blockmax[r] = -INFINITY;
    for (int64_t jt = 0; jt < n_pad; jt += KT)
      for (int64_t r = 0; r < rows_pad; r += R)
        qk_tile(w.q + r * DP, w.kp + (j0 + jt) * DP, w.s + r * BLOCK_K + jt, BLOCK_K,
                int(n - jt), w.blockmax + r);

    softmax_rows(w, rows_pad, n, n_pad, scale_log2);

    const int64_t npairs = ((n + 15) / 16 * 16) / 2;  // V and P are zero beyond n
    for (int64_t r = 0; r < rows_pad; r += R)
      pv_tile(reinterpret_cast<const uint32_t*>(w.p + r * BLOCK_K), BLOCK_K / 2,
              w.vp + j0 * D, npairs, w.alpha + r, w.o + r * D);
  }

  write_rows(w, rows, i0, out, out_row);
}

#ifdef __AMX_BF16__
// AMX: 8 tile registers of 16 rows x 64 bytes. Q K^T: tiles 0-3 accumulate S for 64 keys, 4-5 hold
// the row group's Q (d 0-31, 32-63), 6-7 take K. P V: tiles 0-3 accumulate O's four 16-wide d
// chunks (loaded from O after the alpha rescale), 4 takes P, 5-6 take V.
struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void load_tile_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

void attend_block_amx(const Seq& q, int64_t b, int64_t h, int64_t i0, int64_t Lq, int64_t Lk,
                      float scale_log2, Scratch& w, uint16_t* out, int64_t out_row) {
  const int64_t rows = std::min<int64_t>(BLOCK_Q, Lq - i0);
  const int64_t rows_pad = (rows + 15) / 16 * 16;
  start_block(q, b, h, i0, rows, rows_pad, w);
  constexpr int S_STRIDE = BLOCK_K * 4, P_STRIDE = BLOCK_K * 2, O_STRIDE = D * 4;

  for (int64_t j0 = 0; j0 < Lk; j0 += BLOCK_K) {
    const int64_t n = std::min<int64_t>(BLOCK_K, Lk - j0);
    const int64_t n_pad = (n + 63) / 64 * 64;
    for (int64_t r = 0; r < rows_pad; r += 16) {
      const uint16_t* qr = reinterpret_cast<const uint16_t*>(w.q + r * DP);
      _tile_loadd(4, qr, D * 2);
      _tile_loadd(5, qr + 32, D * 2);
      float* s = w.s + r * BLOCK_K;
      for (int64_t jt = 0; jt < n_pad; jt += 64) {
        const uint32_t* kb = w.kp + (j0 + jt) * DP;  // 16-key blocks of [dp][16 keys] dwords
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        _tile_loadd(6, kb, 64);
        _tile_loadd(7, kb + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(0, 5, 7);
        _tile_loadd(6, kb + 16 * DP, 64);
        _tile_loadd(7, kb + 16 * DP + 256, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, kb + 32 * DP, 64);
        _tile_loadd(7, kb + 32 * DP + 256, 64);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(2, 5, 7);
        _tile_loadd(6, kb + 48 * DP, 64);
        _tile_loadd(7, kb + 48 * DP + 256, 64);
        _tile_dpbf16ps(3, 4, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_stored(0, s + jt, S_STRIDE);
        _tile_stored(1, s + jt + 16, S_STRIDE);
        _tile_stored(2, s + jt + 32, S_STRIDE);
        _tile_stored(3, s + jt + 48, S_STRIDE);
      }
    }
    for (int64_t r = 0; r < rows_pad; ++r) {  // row maxima over the valid keys
      const float* s = w.s + r * BLOCK_K;
      __m512 mx = _mm512_set1_ps(-INFINITY), my = mx;
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) {  // two independent chains
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
        my = _mm512_max_ps(my, _mm512_loadu_ps(s + j + 16));
      }
      for (; j < n; j += 16) {
        const int64_t valid = std::min<int64_t>(n - j, 16);
        mx = _mm512_mask_max_ps(mx, __mmask16((1u << valid) - 1), mx, _mm512_loadu_ps(s + j));
      }
      w.blockmax[r] = _mm512_reduce_max_ps(_mm512_max_ps(mx, my));
    }

    softmax_rows(w, rows_pad, n, n_pad, scale_log2);

    const int64_t n32 = (n + 31) / 32 * 32;  // P and V are zero beyond n
    for (int64_t r = 0; r < rows_pad; r += 16) {
      float* o = w.o + r * D;
      for (int rr = 0; rr < 16; ++rr) {
        const __m512 a = _mm512_set1_ps(w.alpha[r + rr]);
        for (int c = 0; c < 4; ++c)
          _mm512_storeu_ps(o + rr * D + c * 16, _mm512_mul_ps(_mm512_loadu_ps(o + rr * D + c * 16), a));
      }
      _tile_loadd(0, o, O_STRIDE);
      _tile_loadd(1, o + 16, O_STRIDE);
      _tile_loadd(2, o + 32, O_STRIDE);
      _tile_loadd(3, o + 48, O_STRIDE);
      const uint16_t* p = w.p + r * BLOCK_K;
      for (int64_t k = 0; k < n32; k += 32) {
        const uint16_t* vb = w.vp + (j0 + k) * D;  // 16 key pairs of [64 d][2] bf16
        _tile_loadd(4, p + k, P_STRIDE);
        _tile_loadd(5, vb, 2 * D * 2);
        _tile_loadd(6, vb + 32, 2 * D * 2);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, vb + 64, 2 * D * 2);
        _tile_loadd(6, vb + 96, 2 * D * 2);
        _tile_dpbf16ps(2, 4, 5);
        _tile_dpbf16ps(3, 4, 6);
      }
      _tile_stored(0, o, O_STRIDE);
      _tile_stored(1, o + 16, O_STRIDE);
      _tile_stored(2, o + 32, O_STRIDE);
      _tile_stored(3, o + 48, O_STRIDE);
    }
  }
  write_rows(w, rows, i0, out, out_row);
}
#endif  // __AMX_BF16__

using AttendFn = void (*)(const Seq&, int64_t, int64_t, int64_t, int64_t, int64_t, float, Scratch&,
                          uint16_t*, int64_t);

void run(const Seq& qv, const Seq& kv, const Seq& vv, uint16_t* out, int64_t B, int64_t H,
         float scale, int num_threads, AttendFn attend, bool tiles) {
  const int64_t Lq = qv.length(), Lk = kv.length();
  const int64_t q_blocks = (Lq + BLOCK_Q - 1) / BLOCK_Q;
  const int64_t tasks = B * H * q_blocks;
  const int64_t Lpad = (Lk + BLOCK_K - 1) / BLOCK_K * BLOCK_K;
  const float scale_log2 = scale * 1.4426950408889634f;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
#ifdef __AMX_BF16__
    if (tiles) load_tile_config();
#endif
    const int64_t begin = tasks * t / nt, end = tasks * (t + 1) / nt;
    Scratch w;
    w.kp = static_cast<uint32_t*>(aligned_alloc(64, Lpad * D * 2));
    w.vp = static_cast<uint16_t*>(aligned_alloc(64, Lpad * D * 2));
    w.q = static_cast<uint32_t*>(aligned_alloc(64, BLOCK_Q * D * 2));
    w.s = static_cast<float*>(aligned_alloc(64, BLOCK_Q * BLOCK_K * 4));
    w.p = static_cast<uint16_t*>(aligned_alloc(64, BLOCK_Q * BLOCK_K * 2));
    w.o = static_cast<float*>(aligned_alloc(64, BLOCK_Q * D * 4));
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / H, h = bh % H;
      if (bh != packed) {
        pack_k(kv, b, h, Lk, Lpad, w.kp);
        pack_v(vv, b, h, Lk, Lpad, w.vp);
        packed = bh;
      }
      attend(qv, b, h, (task % q_blocks) * BLOCK_Q, Lq, Lk, scale_log2, w,
             out + b * Lq * H * D + h * D, H * D);
    }
    free(w.kp); free(w.vp); free(w.q); free(w.s); free(w.p); free(w.o);
#ifdef __AMX_BF16__
    if (tiles) _tile_release();
#endif
  }
}

}  // namespace

extern "C" {

// q, k, v: the joint sequence as nq, nk, nv (1 or 2) segments of [B, H, L, 64] bf16 (element
// strides, unit stride in d; k and v cut at the same lengths), each with an optional RMS norm
// weight (64 bf16; q and k only). out: [B, Lq, H * 64] bf16, contiguous.
void sd3_attention_bf16(const Segment* q, int nq, const Segment* k, int nk, const Segment* v,
                        int nv, uint16_t* out, int64_t B, int64_t H, float scale, int num_threads) {
  run(Seq(q, nq), Seq(k, nk), Seq(v, nv), out, B, H, scale, num_threads, attend_block, false);
}

// 1 when the AMX entry point can run: built with AMX and the kernel grants this process the tile
// state (Linux arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); 0 otherwise.
int sd3_amx_init() {
#ifdef __AMX_BF16__
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
#else
  return 0;
#endif
}

// As sd3_attention_bf16, on AMX tiles. Call only after sd3_amx_init() returned 1.
void sd3_attention_amx(const Segment* q, int nq, const Segment* k, int nk, const Segment* v,
                       int nv, uint16_t* out, int64_t B, int64_t H, float scale, int num_threads) {
#ifdef __AMX_BF16__
  run(Seq(q, nq), Seq(k, nk), Seq(v, nv), out, B, H, scale, num_threads, attend_block_amx, true);
#else
  abort();
#endif
}

}  // extern "C"
