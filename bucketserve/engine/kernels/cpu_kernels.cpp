// The CPU engine's native kernels: paged attention for decode rows, flash attention for bf16
// prompt chunks over their cached context, rotary embedding fused with the KV-cache write,
// the residual add fused with RMSNorm, SwiGLU's silu-and-multiply, and the per-token int8
// quantization around torch._int_mm (the w8a8 weight format).
//
// Paged attention for decode rows (one query per sequence) reads K/V in place.
// The torch reference (model.py, _paged_attention) gathers each row's blocks out of the
// cache every layer and multiplies them in two batched matmuls: at 32 rows of 300 tokens that
// copy and the fp32 score tensor took 47 ms of a 135 ms decode step on a 2-core Xeon. Here
// each (row, kv head) task reads its K and V blocks once, where they lie, and keeps the
// scores of its query group in a per-thread buffer: two passes (scores, then the weighted sum
// of V), no copy and no [rows x context] tensor.
//
// Built once with the system C++ compiler (-O3 -march=native -fopenmp) and loaded through
// ctypes (bucketserve/engine/kernels/__init__.py); no torch headers, so it builds in ~1 s.

#include <algorithm>
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __SSE__
#include <xmmintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {  // bfloat16 -> float: the high 16 bits of an fp32
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float x) { *p = x; }

// exp(x) for x <= 0 (softmax after subtracting the max), in plain arithmetic so that the
// compiler vectorizes the softmax loop (std::exp is a scalar library call: at 32 rows of 300
// tokens it took most of the kernel's time). exp(x) = 2^n * 2^f with n = round(x log2 e),
// f in [-0.5, 0.5], 2^f by a degree-6 polynomial: relative error < 2e-7.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (|t| < 2^22)
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);  // n >= -126: no overflow
  std::memcpy(&p, &bits, sizeof p);
  return p;
}
inline void store(uint16_t* p, float x) {  // float -> bfloat16, round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *p = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *p = static_cast<uint16_t>(u >> 16);
}

#ifdef __AVX512F__
// The elementwise kernels 16 lanes at a time, rounding where the scalar helpers round: GCC
// left the residual norm's loops scalar (its sum of squares is a serial chain without
// fast-math; the NaN branch of store()), 132 us at 128 rows, now 25-46 (measured; SwiGLU,
// which the compiler had vectorized, and the w8a8 rescale gained little by it).
inline __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1u);
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// float -> bfloat16 as store() rounds (to nearest even, NaN kept NaN), in each lane's low half.
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}
// 16 bfloat16s as store() rounds them. VCVTNEPS2BF16 rounds the same (to nearest even, NaN
// quiet) in one instruction, except that it flushes fp32 denormals (< 1.2e-38) to zero; the
// integer version above took ~7 vector ops a conversion, and these loops are ALU-bound.
inline __m256i to_bf16(__m512 v) {
#ifdef __AVX512BF16__
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return _mm512_cvtepi32_epi16(bf16_bits(v));
#endif
}
// v as a T holds it (the T* only picks the overload).
inline __m512 round16(__m512 v, const float*) { return v; }
inline __m512 round16(__m512 v, const uint16_t*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }
#endif

#ifdef __AVX512F__
// exp_nonpositive, 16 lanes: the same steps (a NaN comes out as e^-87, where silu's product
// with x makes it NaN again).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
  return _mm512_castsi512_ps(bits);
}
#endif

// q . k over D dimensions. With AVX-512 the lanes are summed as a tree
// (_mm512_reduce_add_ps): the compiler's own reduction summed them one after another, and
// that chain was most of the kernel's time (measured).
template <int64_t D>
inline float dot(const float* q, const float* k) {
#ifdef __AVX512F__
  if constexpr (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
  return s;
}
template <int64_t D>
inline float dot(const float* q, const uint16_t* k) {
#ifdef __AVX512F__
  if constexpr (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + d));
      const __m512 kf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), kf, acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

// Softmax in place over the first ctx scores of each of ``rows`` rows of ``stride`` floats.
inline void softmax_rows(float* scores, int64_t stride, int64_t rows, int64_t ctx) {
  for (int64_t h = 0; h < rows; ++h) {
    float* sc = scores + h * stride;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < ctx; ++t) m = sc[t] > m ? sc[t] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < ctx; ++t) {
      sc[t] = exp_nonpositive(sc[t] - m);
      sum += sc[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < ctx; ++t) sc[t] *= inv;
  }
}

// One (row, kv head) task: the query group's scores over every visible key, a softmax, then
// the weighted sum of V. K and V are read a block at a time (block_size x D, contiguous in
// the cache), converted to fp32 once, and used by every head of the group. D is a template
// constant for the common head sizes so that the dot products unroll into vector FMAs.
template <typename T, int64_t D>
void attend_row(T* out, const T* q, const T* kh, const T* vh, const int64_t* table, int64_t ctx,
                int64_t group, int64_t head_dim_runtime, int64_t block_size, float scale,
                float* scores, int64_t max_ctx, float* qf, float* acc, float* blockf) {
  const int64_t hd = D > 0 ? D : head_dim_runtime;
  for (int64_t h = 0; h < group; ++h)
    for (int64_t d = 0; d < hd; ++d) qf[h * hd + d] = to_float(q[h * hd + d]) * scale;
  // Pass 1: scores. The block's keys are transposed to [D][block] while converted, so that
  // each head's scores over the block grow by one vector FMA per dimension (a dot product
  // per key would end in a horizontal sum per key).
  for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
    const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
    const T* kb = kh + table[t0 / block_size] * block_size * hd;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t d = 0; d < hd; ++d) blockf[d * block_size + t] = to_float(kb[t * hd + d]);
    for (int64_t h = 0; h < group; ++h) {
      const float* qq = qf + h * hd;
      float* sc = scores + h * max_ctx + t0;
      for (int64_t t = 0; t < n; ++t) sc[t] = 0.f;
      for (int64_t d = 0; d < hd; ++d) {
        const float qd = qq[d];
        const float* kd = blockf + d * block_size;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) sc[t] += qd * kd[t];
      }
    }
  }
  softmax_rows(scores, max_ctx, group, ctx);
  // Pass 2: the probability-weighted sum of V.
  for (int64_t i = 0; i < group * hd; ++i) acc[i] = 0.f;
  for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
    const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
    const T* vb = vh + table[t0 / block_size] * block_size * hd;
    for (int64_t i = 0; i < n * hd; ++i) blockf[i] = to_float(vb[i]);
    for (int64_t h = 0; h < group; ++h) {
      const float* sc = scores + h * max_ctx + t0;
      float* a = acc + h * hd;
      for (int64_t t = 0; t < n; ++t) {
        const float p = sc[t];
        const float* vt = blockf + t * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) a[d] += p * vt[d];
      }
    }
  }
  for (int64_t i = 0; i < group * hd; ++i) store(out + i, acc[i]);
}

// The same for block_size 16 and a fixed D, with every accumulator in registers: each
// score is a D-long dot product unrolled into vector FMAs, and each head's output row (D
// floats) stays in registers across the whole context. Keeping the output row in memory made
// each FMA wait on the store before it; transposing each block of keys to score 16 keys per
// vector cost more than it saved (both measured).
template <typename T, int64_t D>
void attend_row_b16(T* out, const T* q, const T* kh, const T* vh, const int64_t* table,
                    int64_t ctx, int64_t group, float scale, float* scores, int64_t max_ctx,
                    float* qf) {
  constexpr int64_t B = 16;
  for (int64_t h = 0; h < group; ++h)
    for (int64_t d = 0; d < D; ++d) qf[h * D + d] = to_float(q[h * D + d]) * scale;
  for (int64_t t0 = 0; t0 < ctx; t0 += B) {
    const int64_t n = ctx - t0 < B ? ctx - t0 : B;
    const T* kb = kh + table[t0 / B] * B * D;
    for (int64_t t = 0; t < n; ++t) {
      const T* k = kb + t * D;
      for (int64_t h = 0; h < group; ++h) {
        const float* qq = qf + h * D;
        scores[h * max_ctx + t0 + t] = dot<D>(qq, k);
      }
    }
  }
  softmax_rows(scores, max_ctx, group, ctx);
  for (int64_t h = 0; h < group; ++h) {
    const float* sc = scores + h * max_ctx;
    alignas(64) float a[D] = {};
    for (int64_t t0 = 0; t0 < ctx; t0 += B) {
      const int64_t n = ctx - t0 < B ? ctx - t0 : B;
      const T* vb = vh + table[t0 / B] * B * D;
      for (int64_t t = 0; t < n; ++t) {
        const float p = sc[t0 + t];
        const T* vt = vb + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(vt[d]);
      }
    }
    for (int64_t d = 0; d < D; ++d) store(out + h * D + d, a[d]);
  }
}

// A row's blocks lie wherever the allocator put them, so the hardware prefetcher, which
// follows one block's 2 KB, stalls at every jump to the next: the kernel asks for the block
// PREFETCH_AHEAD ahead of the one it computes. At 128 rows x 300 tokens over a scattered
// pool, a layer's decode attention ran at 10-12 GB/s of K/V without it and 15 with it (18
// with the blocks laid out in order; measured). One block ahead did as well as two; four
// did worse.
constexpr int64_t PREFETCH_AHEAD = 1;

inline void prefetch_bytes([[maybe_unused]] const void* p, [[maybe_unused]] int64_t bytes) {
#ifdef __SSE__
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 caches on CPUs with AVX512-BF16 (VDPBF16PS: 32 bf16 products summed pairwise into
// 16 fp32 lanes): each block of 16 keys is transposed in registers once, so that one
// instruction adds a pair of dimensions to the scores of all 16 keys, for every head of the
// group; V is converted once per token for every head. The per-key dot products of
// attend_row_b16 converted each key once per head and summed each score across lanes: at 32
// rows x 300 tokens 400 us a layer against 324 here (measured). Products are exact in fp32,
// as there; only the sums' order differs.

// Transposes a 16 x 16 matrix of 32-bit words held in 16 registers, by swapping the
// off-diagonal blocks of 8, 4, 2 and 1 (each swap: two two-source permutes per row pair).
template <int S>
inline void swap_blocks(__m512i r[16]) {
  // Row i (bit S clear) takes row i + S's first half of each pair of S-blocks; row i + S
  // takes row i's second half.
  alignas(64) static constexpr int32_t lo[16] = {
      (0 & S) ? 16 + 0 - S : 0,     (1 & S) ? 16 + 1 - S : 1,     (2 & S) ? 16 + 2 - S : 2,
      (3 & S) ? 16 + 3 - S : 3,     (4 & S) ? 16 + 4 - S : 4,     (5 & S) ? 16 + 5 - S : 5,
      (6 & S) ? 16 + 6 - S : 6,     (7 & S) ? 16 + 7 - S : 7,     (8 & S) ? 16 + 8 - S : 8,
      (9 & S) ? 16 + 9 - S : 9,     (10 & S) ? 16 + 10 - S : 10,  (11 & S) ? 16 + 11 - S : 11,
      (12 & S) ? 16 + 12 - S : 12,  (13 & S) ? 16 + 13 - S : 13,  (14 & S) ? 16 + 14 - S : 14,
      (15 & S) ? 16 + 15 - S : 15};
  alignas(64) static constexpr int32_t hi[16] = {
      (0 & S) ? 16 : 0 + S,         (1 & S) ? 17 : 1 + S,         (2 & S) ? 18 : 2 + S,
      (3 & S) ? 19 : 3 + S,         (4 & S) ? 20 : 4 + S,         (5 & S) ? 21 : 5 + S,
      (6 & S) ? 22 : 6 + S,         (7 & S) ? 23 : 7 + S,         (8 & S) ? 24 : 8 + S,
      (9 & S) ? 25 : 9 + S,         (10 & S) ? 26 : 10 + S,       (11 & S) ? 27 : 11 + S,
      (12 & S) ? 28 : 12 + S,       (13 & S) ? 29 : 13 + S,       (14 & S) ? 30 : 14 + S,
      (15 & S) ? 31 : 15 + S};
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const __m512i a = r[i], b = r[i + S];
    r[i] = _mm512_permutex2var_epi32(a, ilo, b);
    r[i + S] = _mm512_permutex2var_epi32(a, ihi, b);
  }
}

// Transposes a 16 x 16 matrix of 32-bit words held in 16 registers, by swapping the
// off-diagonal blocks of 8, 4, 2 and 1 (each swap: two two-source permutes per row pair).
inline void transpose16_epi32(__m512i r[16]) {
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
}

template <int64_t D, int64_t G>
void attend_row_bf16_dp(uint16_t* out, const uint16_t* q, const uint16_t* kh, const uint16_t* vh,
                        const int64_t* table, int64_t ctx, float scale, float* scores,
                        int64_t max_ctx) {
  constexpr int64_t B = 16, PAIRS = D / 2;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < ctx; t0 += B) {
    const uint16_t* kb = kh + table[t0 / B] * B * D;
    if (t0 + PREFETCH_AHEAD * B < ctx) prefetch_bytes(kh + table[t0 / B + PREFETCH_AHEAD] * B * D, B * D * 2);
    __m512 acc[G];
    for (int64_t h = 0; h < G; ++h) acc[h] = _mm512_setzero_ps();
    // Rows past ctx in the last block are read (the block is allocated) and their scores
    // never used.
    for (int64_t c = 0; c < PAIRS; c += 16) {  // 16 dimension pairs (32 dims) at a time
      __m512i kt[16];
      for (int64_t t = 0; t < B; ++t) kt[t] = _mm512_loadu_si512(kb + t * D + 2 * c);
      transpose16_epi32(kt);  // kt[j]: dims (2(c+j), 2(c+j)+1) of the 16 keys
      for (int64_t h = 0; h < G; ++h) {
        const int32_t* qp = reinterpret_cast<const int32_t*>(q + h * D) + c;
        for (int64_t j = 0; j < 16; ++j)
          acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)kt[j], (__m512bh)_mm512_set1_epi32(qp[j]));
      }
    }
    const int64_t n = ctx - t0 < B ? ctx - t0 : B;
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t h = 0; h < G; ++h)
      _mm512_mask_storeu_ps(scores + h * max_ctx + t0, keep, _mm512_mul_ps(acc[h], vscale));
  }
  softmax_rows(scores, max_ctx, G, ctx);
  // V in fp32 FMAs, each token's row converted once for all the heads of the group. (V by
  // VDPBF16PS over interleaved pairs of tokens was slower here: 398 against 324 us at 32 rows
  // x 300 tokens; its interleave competes with the transposes for the shuffle port.)
  __m512 a[G][D / 16];
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < D / 16; ++c) a[h][c] = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < ctx; t0 += B) {
    const int64_t n = ctx - t0 < B ? ctx - t0 : B;
    const uint16_t* vb = vh + table[t0 / B] * B * D;
    if (t0 + PREFETCH_AHEAD * B < ctx) prefetch_bytes(vh + table[t0 / B + PREFETCH_AHEAD] * B * D, B * D * 2);
    for (int64_t t = 0; t < n; ++t) {
      __m512 v[D / 16];
      for (int64_t c = 0; c < D / 16; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + t * D + 16 * c));
        v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
      for (int64_t h = 0; h < G; ++h) {
        const __m512 p = _mm512_set1_ps(scores[h * max_ctx + t0 + t]);
        for (int64_t c = 0; c < D / 16; ++c) a[h][c] = _mm512_fmadd_ps(p, v[c], a[h][c]);
      }
    }
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < D / 16; ++c) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, a[h][c]);
      for (int64_t d = 0; d < 16; ++d) store(out + h * D + 16 * c + d, tmp[d]);
    }
}

#endif

// The dpbf16 kernel for this dtype, head_dim and group, or null where it has none (or the CPU
// lacks AVX512-BF16).
// A (row, kv head) task of head size D and query group G fixed at compile time: out, q, the
// kv head's K and V pools, the row's block table, its context length, scale, scores, max_ctx.
template <typename T, typename C>
using RowKernel = void (*)(T*, const T*, const C*, const C*, const int64_t*, int64_t, float, float*,
                           int64_t);
template <typename T>
RowKernel<T, T> bf16_dp_kernel([[maybe_unused]] int64_t head_dim, [[maybe_unused]] int64_t group) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (head_dim == 64) {
      switch (group) {
        case 1: return attend_row_bf16_dp<64, 1>;
        case 2: return attend_row_bf16_dp<64, 2>;
        case 3: return attend_row_bf16_dp<64, 3>;
        case 4: return attend_row_bf16_dp<64, 4>;
      }
    }
  }
#endif
  return nullptr;
}

// Flushes denormal floats to zero on this thread while it lives, then restores the thread's
// setting (torch's kernels run on the same threads). A softmax over peaked scores makes
// probabilities near the bottom of the float range, and their products with V are denormals,
// which x86 computes through microcode: a batch-1 step's attention ran 4x slower on the real
// model's cache than on random data (13.7 against 52 us a layer, measured). What is flushed
// is below 1e-38 of a sum of probabilities that is 1.
class DenormalsAreZero {
 public:
#ifdef __SSE__
  DenormalsAreZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ | DAZ
  ~DenormalsAreZero() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// What one (row, kv head) task of decode attention may use, one per thread.
struct AttentionScratch {
  std::vector<float> scores, qf, acc, blockf;
  std::vector<int8_t> qcodes;
  AttentionScratch(int64_t group, int64_t max_ctx, int64_t head_dim, int64_t block_size)
      : scores(static_cast<size_t>(group * max_ctx)),
        qf(static_cast<size_t>(group * head_dim)),
        acc(static_cast<size_t>(group * head_dim)),
        blockf(static_cast<size_t>(block_size * head_dim)),
        qcodes(static_cast<size_t>(head_dim)) {}
};

// task(row, kv_head, scratch) for every decode row and kv head, both caches' kernels alike.
template <typename Task>
void for_each_row_head(int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t max_ctx, int64_t block_size, Task task) {
  // A second thread only for work worth its wake-up: batch 1 over ~100 tokens (3 tasks of a
  // few microseconds) ran 2-5x slower in a decode step with it than without (measured).
  const bool parallel = num_rows * num_heads * max_ctx * head_dim > (int64_t{1} << 18);
#pragma omp parallel if (parallel)
  {
    const DenormalsAreZero flush;
    AttentionScratch scratch(num_heads / num_kv_heads, max_ctx, head_dim, block_size);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t r = 0; r < num_rows; ++r)
      for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) task(r, kvh, scratch);
  }
}

// residual += x (rounded to T), then out = weight * normalise(residual) with the
// normalisation in fp32 and both roundings where the reference (Hugging Face's RMSNorm after
// the residual add) has them. One call per norm instead of a residual add and six ops.
template <typename T>
void add_rms_norm(T* out, T* residual, const T* x, const T* weight, int64_t rows, int64_t dim,
                  float eps) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    T* res = residual + r * dim;
    const T* in = x + r * dim;
    T* o = out + r * dim;
#ifdef __AVX512F__
    __m512 sq = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 m = tail_mask(dim - d);
      const __m512 sum = round16(_mm512_add_ps(load16(res + d, m), load16(in + d, m)), res);
      store16(res + d, sum, m);
      sq = _mm512_fmadd_ps(sum, sum, sq);  // masked-off lanes load as zeros
    }
    const __m512 vinv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(dim) + eps));
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 m = tail_mask(dim - d);
      const __m512 normed = round16(_mm512_mul_ps(load16(res + d, m), vinv), res);
      store16(o + d, _mm512_mul_ps(load16(weight + d, m), normed), m);
    }
#else
    float ss = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      T sum;
      store(&sum, to_float(res[d]) + to_float(in[d]));
      res[d] = sum;
      const float v = to_float(sum);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; ++d) {
      T normed;
      store(&normed, to_float(res[d]) * inv);
      store(o + d, to_float(weight[d]) * to_float(normed));
    }
#endif
  }
}

// Rotary embedding of q and k in place in the fused qkv projection's output.
// qkv [T, (H + 2 KVH) * D]; cos, sin fp32 [max_positions, D].
template <typename T>
void rope_rows(T* qkv, const int64_t* positions, const float* cos, const float* sin, int64_t tokens,
               int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t half = dim / 2;
  const int64_t width = (heads + 2 * kv_heads) * dim;
#pragma omp parallel for schedule(static) if (tokens > 4)
  for (int64_t t = 0; t < tokens; ++t) {
    T* row = qkv + t * width;
    const float* c = cos + positions[t] * dim;
    const float* s = sin + positions[t] * dim;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      T* x = row + h * dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = to_float(x[i]), b = to_float(x[i + half]);
        store(x + i, a * c[i] - b * s[i]);
        store(x + i + half, b * c[i + half] + a * s[i + half]);
      }
    }
  }
}

// The rotary embedding, and the step's K and V written to their cache slots: what the
// reference does with eleven ops per layer. Caches [KVH, blocks * bs, D].
template <typename T>
void rope_write_kv(T* qkv, const int64_t* positions, const float* cos, const float* sin,
                   T* k_cache, T* v_cache, const int64_t* slots, int64_t tokens, int64_t heads,
                   int64_t kv_heads, int64_t dim, int64_t cache_slots) {
  rope_rows(qkv, positions, cos, sin, tokens, heads, kv_heads, dim);
  const int64_t width = (heads + 2 * kv_heads) * dim;
  // The copies into the cache run in order: pad tokens all write the one scratch slot, and
  // parallel copies to one slot would race (a few hundred bytes a token: no time to save).
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = qkv + t * width;
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(k_cache + (h * cache_slots + slots[t]) * dim, row + (heads + h) * dim, sizeof(T) * dim);
      std::memcpy(v_cache + (h * cache_slots + slots[t]) * dim, row + (heads + kv_heads + h) * dim,
                  sizeof(T) * dim);
    }
  }
}

// ---- The int8 KV cache (--kv-cache-dtype int8) ----
// Decode attention reads every cached K/V byte once a step and runs at the memory's speed
// (~15 GB/s on the 2-core Xeon, docs/RESULTS.md), so fewer bytes are less time. Each token's
// K (or V) for one kv head is quantized symmetrically, scale = max|x| / 127, codes = x /
// scale rounded to nearest even (as w8a8 quantizes activations, quantize_rows_int8 below). A block of one kv head holds block_size tokens in block_size * (head_dim + 4)
// bytes: the codes first, then one float32 scale per token. K's codes lie four dimensions of
// every token at a time ([head_dim / 4][block_size][4]), offset by 128 to unsigned: the
// layout VPDPBUSD reads, so that one 64-byte load and one instruction per head add four
// dimensions to 16 keys' scores. V's lie in token pairs, the two tokens' codes of each
// dimension side by side ([block_size / 2][head_dim][2], signed): sign-extended to int16,
// the pairs VPDPWSSD multiplies by two tokens' attention weights at once.
// kv_quant.py writes and reads the same layout for the torch paths.
constexpr int64_t KV_SCALE_BYTES = 4;

// x's dim values as int8 codes into out[0, dim), plus offset (wrapping to unsigned), and
// their scale. In vectors where dim is a multiple of 16: the same max, the same IEEE division
// and the same rounding to nearest even as the scalar loop, so the same codes.
template <typename T>
inline float quantize_kv(int8_t* out, const T* x, int64_t dim, int offset) {
  float amax = 0.f;
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16(x + i, 0xffff)));
    const float scale = std::max(_mm512_reduce_max_ps(m), 1e-12f) / 127.f;  // as quantize_rows_int8
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i voffset = _mm512_set1_epi32(offset);
    for (int64_t i = 0; i < dim; i += 16) {
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(x + i, 0xffff), vscale),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i code = _mm512_add_epi32(_mm512_cvtps_epi32(r), voffset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(code));
    }
    return scale;
  }
#endif
  for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  const float scale = std::max(amax, 1e-12f) / 127.f;  // as weights.quantize_rows_int8
  for (int64_t i = 0; i < dim; ++i) {
    const int code = static_cast<int>(std::nearbyint(to_float(x[i]) / scale)) + offset;
    out[i] = static_cast<int8_t>(static_cast<uint8_t>(code));
  }
  return scale;
}

// As rope_write_kv, into int8 caches [kv_heads, num_blocks, block_size * (dim + 4)] bytes.
// Each token's K and V are quantized in parallel into a staging buffer (codes, then scale),
// then placed in their blocks in order (pad tokens share the scratch slot: see rope_write_kv).
// Quantizing in the ordered loop took 5.7% of the offline benchmark (py-spy).
template <typename T>
void rope_write_kv_int8(T* qkv, const int64_t* positions, const float* cos, const float* sin,
                        int8_t* k_cache, int8_t* v_cache, const int64_t* slots, int64_t tokens,
                        int64_t heads, int64_t kv_heads, int64_t dim, int64_t cache_slots,
                        int64_t block_size) {
  rope_rows(qkv, positions, cos, sin, tokens, heads, kv_heads, dim);
  const int64_t width = (heads + 2 * kv_heads) * dim, row = dim + KV_SCALE_BYTES;
  const int64_t block_bytes = block_size * row, head_bytes = cache_slots / block_size * block_bytes;
  std::vector<int8_t> staged(static_cast<size_t>(tokens * kv_heads * 2 * row));
#pragma omp parallel for schedule(static) if (tokens > 4)
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t kv = 0; kv < 2; ++kv) {  // K (offset to unsigned), then V
        int8_t* dst = staged.data() + ((t * kv_heads + h) * 2 + kv) * row;
        const float scale = quantize_kv(dst, qkv + t * width + (heads + kv * kv_heads + h) * dim, dim,
                                        kv == 0 ? 128 : 0);
        std::memcpy(dst + dim, &scale, sizeof scale);
      }
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t block = slots[t] / block_size, at = slots[t] % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int8_t* k = staged.data() + (t * kv_heads + h) * 2 * row;
      const int8_t* v = k + row;
      int8_t* kb = k_cache + h * head_bytes + block * block_bytes;
      int8_t* vb = v_cache + h * head_bytes + block * block_bytes;
      for (int64_t g = 0; g < dim / 4; ++g) std::memcpy(kb + g * block_size * 4 + at * 4, k + 4 * g, 4);
      std::memcpy(kb + block_size * dim + at * KV_SCALE_BYTES, k + dim, KV_SCALE_BYTES);
      int8_t* vpair = vb + (at / 2) * dim * 2 + at % 2;
      for (int64_t d = 0; d < dim; ++d) vpair[2 * d] = v[d];
      std::memcpy(vb + block_size * dim + at * KV_SCALE_BYTES, v + dim, KV_SCALE_BYTES);
    }
  }
}

// A query head's int8 codes (signed), their scale, and 128 x their sum (what K's +128 offset
// adds to every integer dot product).
struct QuantizedQuery {
  float scale;
  int32_t offset_sum;
};

template <typename T>
inline QuantizedQuery quantize_query(int8_t* codes, const T* q, int64_t dim) {
  const float s = quantize_kv(codes, q, dim, 0);
  int32_t sum = 0;
  for (int64_t i = 0; i < dim; ++i) sum += codes[i];
  return {s, 128 * sum};
}

// Any dtype, head size and block size: scalar, the reference for the vector kernel below
// (the same integer scores, the same fp32 weighted sum of V).
template <typename T>
void attend_row_int8(T* out, const T* q, const int8_t* kh, const int8_t* vh, const int64_t* table,
                     int64_t ctx, int64_t group, int64_t dim, int64_t block_size, float scale,
                     float* scores, int64_t max_ctx, float* acc, int8_t* qcodes) {
  const int64_t block_bytes = block_size * (dim + KV_SCALE_BYTES);
  for (int64_t h = 0; h < group; ++h) {
    const QuantizedQuery qq = quantize_query(qcodes, q + h * dim, dim);
    for (int64_t t = 0; t < ctx; ++t) {
      const int8_t* kb = kh + table[t / block_size] * block_bytes;
      const int64_t at = t % block_size;
      int32_t s = 0;
      for (int64_t d = 0; d < dim; ++d)
        s += static_cast<int32_t>(static_cast<uint8_t>(kb[(d / 4) * block_size * 4 + at * 4 + d % 4])) * qcodes[d];
      const float ks = reinterpret_cast<const float*>(kb + block_size * dim)[at];
      scores[h * max_ctx + t] = static_cast<float>(s - qq.offset_sum) * (qq.scale * ks * scale);
    }
  }
  softmax_rows(scores, max_ctx, group, ctx);
  for (int64_t i = 0; i < group * dim; ++i) acc[i] = 0.f;
  for (int64_t t = 0; t < ctx; ++t) {
    const int8_t* vb = vh + table[t / block_size] * block_bytes;
    const int64_t at = t % block_size;
    const int8_t* v = vb + (at / 2) * dim * 2 + at % 2;  // dimension d at v[2 d]
    const float vs = reinterpret_cast<const float*>(vb + block_size * dim)[at];
    for (int64_t h = 0; h < group; ++h) {
      const float p = scores[h * max_ctx + t] * vs;
      for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] += p * static_cast<float>(v[2 * d]);
    }
  }
  for (int64_t i = 0; i < group * dim; ++i) store(out + i, acc[i]);
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// Head size D, blocks of 16, any query dtype: the scores by VPDPBUSD (K's unsigned codes
// times the query's signed ones, 16 keys a vector), V by VPDPWSSD (two tokens' codes times
// their int16 weights, 16 dimensions a vector). V in fp32 FMAs, each token's codes converted
// once per head group, took 40% of the kernel (0.74 of 1.84 ms at 200 rows x 300 tokens).
template <typename T, int64_t D, int64_t G>
void attend_row_int8_vnni(T* out, const T* q, const int8_t* kh, const int8_t* vh, const int64_t* table,
                          int64_t ctx, float scale, float* scores, int64_t max_ctx) {
  constexpr int64_t B = 16, BLOCK = B * (D + KV_SCALE_BYTES);
  alignas(64) int8_t qcodes[G][D];
  __m512i offset[G];
  __m512 qscale[G];
  for (int64_t h = 0; h < G; ++h) {
    const QuantizedQuery qq = quantize_query(qcodes[h], q + h * D, D);
    offset[h] = _mm512_set1_epi32(qq.offset_sum);
    qscale[h] = _mm512_set1_ps(qq.scale * scale);
  }
  for (int64_t t0 = 0; t0 < ctx; t0 += B) {
    const int8_t* kb = kh + table[t0 / B] * BLOCK;
    if (t0 + PREFETCH_AHEAD * B < ctx) prefetch_bytes(kh + table[t0 / B + PREFETCH_AHEAD] * BLOCK, BLOCK);
    __m512i acc[G];
    for (int64_t h = 0; h < G; ++h) acc[h] = _mm512_setzero_si512();
    for (int64_t g = 0; g < D / 4; ++g) {
      const __m512i k = _mm512_loadu_si512(kb + g * 64);  // dims 4g..4g+3 of the 16 keys
      for (int64_t h = 0; h < G; ++h) {
        int32_t q4;
        std::memcpy(&q4, qcodes[h] + 4 * g, 4);
        acc[h] = _mm512_dpbusd_epi32(acc[h], k, _mm512_set1_epi32(q4));
      }
    }
    const int64_t n = ctx - t0 < B ? ctx - t0 : B;
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
    // Slots past ctx in the last block hold whatever was written there, never used.
    const __m512 ks = _mm512_loadu_ps(reinterpret_cast<const float*>(kb + B * D));
    for (int64_t h = 0; h < G; ++h) {
      const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[h], offset[h]));
      _mm512_mask_storeu_ps(scores + h * max_ctx + t0, keep, _mm512_mul_ps(s, _mm512_mul_ps(ks, qscale[h])));
    }
  }
  softmax_rows(scores, max_ctx, G, ctx);
  // V: each token's weight p x its V scale, as int16 against the largest weight of the head
  // (15 bits, finer than the bf16 probabilities of the torch reference), written over the
  // scores in place (an int16 never overtakes the float it replaces); weights past ctx are 0.
  float wscale[G];
  for (int64_t h = 0; h < G; ++h) {
    float* sc = scores + h * max_ctx;
    __m512 m = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < ctx; t0 += B) {
      const __mmask16 keep = tail_mask(ctx - t0);
      const __m512 vs = _mm512_loadu_ps(reinterpret_cast<const float*>(vh + table[t0 / B] * BLOCK + B * D));
      const __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, sc + t0), vs);
      _mm512_storeu_ps(sc + t0, w);
      m = _mm512_max_ps(m, _mm512_maskz_mov_ps(keep, w));
    }
    const float wmax = _mm512_reduce_max_ps(m);
    wscale[h] = wmax / 32767.f;
    const __m512 inv = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
    int16_t* w16 = reinterpret_cast<int16_t*>(sc);
    for (int64_t t0 = 0; t0 < ctx; t0 += B) {
      const __m512 w = _mm512_maskz_loadu_ps(tail_mask(ctx - t0), sc + t0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w16 + t0),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w, inv))));
    }
  }
  // Integer sums per lane: a pair adds at most 2 x 32767 x 127, so 16 blocks of 8 pairs stay
  // below 2^31; then they are added to the fp32 totals.
  __m512 a[G][D / 16];
  __m512i acc[G][D / 16];
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < D / 16; ++c) {
      a[h][c] = _mm512_setzero_ps();
      acc[h][c] = _mm512_setzero_si512();
    }
  for (int64_t t0 = 0; t0 < ctx; t0 += B) {
    const int64_t n = ctx - t0 < B ? ctx - t0 : B;
    const int8_t* vb = vh + table[t0 / B] * BLOCK;
    if (t0 + PREFETCH_AHEAD * B < ctx) prefetch_bytes(vh + table[t0 / B + PREFETCH_AHEAD] * BLOCK, BLOCK);
    for (int64_t pr = 0; pr < (n + 1) / 2; ++pr) {  // an odd last token pairs with a weight of 0
      __m512i v[D / 16];
      for (int64_t c = 0; c < D / 16; ++c)
        v[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + pr * 2 * D + 32 * c)));
      for (int64_t h = 0; h < G; ++h) {
        int32_t w2;
        std::memcpy(&w2, reinterpret_cast<const int16_t*>(scores + h * max_ctx) + t0 + 2 * pr, 4);
        const __m512i w = _mm512_set1_epi32(w2);
        for (int64_t c = 0; c < D / 16; ++c) acc[h][c] = _mm512_dpwssd_epi32(acc[h][c], v[c], w);
      }
    }
    if (t0 / B % 16 == 15 || t0 + B >= ctx) {
      for (int64_t h = 0; h < G; ++h)
        for (int64_t c = 0; c < D / 16; ++c) {
          a[h][c] = _mm512_add_ps(a[h][c], _mm512_cvtepi32_ps(acc[h][c]));
          acc[h][c] = _mm512_setzero_si512();
        }
    }
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < D / 16; ++c) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, _mm512_mul_ps(a[h][c], _mm512_set1_ps(wscale[h])));
      for (int64_t d = 0; d < 16; ++d) store(out + h * D + 16 * c + d, tmp[d]);
    }
}
#endif

template <typename T>
RowKernel<T, int8_t> int8_vnni_kernel([[maybe_unused]] int64_t head_dim, [[maybe_unused]] int64_t group) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  if (head_dim == 64) {
    switch (group) {
      case 1: return attend_row_int8_vnni<T, 64, 1>;
      case 2: return attend_row_int8_vnni<T, 64, 2>;
      case 3: return attend_row_int8_vnni<T, 64, 3>;
      case 4: return attend_row_int8_vnni<T, 64, 4>;
    }
  }
#endif
  return nullptr;
}

// The vector kernel for this query dtype, cache type and sizes, or null (then attend_any runs).
template <typename T, typename C>
RowKernel<T, C> vector_kernel(int64_t head_dim, int64_t group, int64_t block_size) {
  if (block_size != 16) return nullptr;
  if constexpr (std::is_same_v<C, int8_t>)
    return int8_vnni_kernel<T>(head_dim, group);
  else
    return bf16_dp_kernel<T>(head_dim, group);
}

// The kernels for any head size and block size: over a cache in the query's dtype ...
template <typename T>
void attend_any(T* out, const T* q, const T* kh, const T* vh, const int64_t* table, int64_t ctx,
                int64_t group, int64_t head_dim, int64_t block_size, float scale, int64_t max_ctx,
                AttentionScratch& s) {
  if (block_size == 16 && (head_dim == 64 || head_dim == 128)) {
    auto fast = head_dim == 64 ? attend_row_b16<T, 64> : attend_row_b16<T, 128>;
    fast(out, q, kh, vh, table, ctx, group, scale, s.scores.data(), max_ctx, s.qf.data());
    return;
  }
  auto run = [&](auto dim) {
    attend_row<T, decltype(dim)::value>(out, q, kh, vh, table, ctx, group, head_dim, block_size, scale,
                                        s.scores.data(), max_ctx, s.qf.data(), s.acc.data(), s.blockf.data());
  };
  if (head_dim == 64)
    run(std::integral_constant<int64_t, 64>{});
  else if (head_dim == 128)
    run(std::integral_constant<int64_t, 128>{});
  else
    run(std::integral_constant<int64_t, 0>{});
}

// ... and over an int8 one.
template <typename T>
void attend_any(T* out, const T* q, const int8_t* kh, const int8_t* vh, const int64_t* table,
                int64_t ctx, int64_t group, int64_t head_dim, int64_t block_size, float scale,
                int64_t max_ctx, AttentionScratch& s) {
  attend_row_int8(out, q, kh, vh, table, ctx, group, head_dim, block_size, scale, s.scores.data(), max_ctx,
                  s.acc.data(), s.qcodes.data());
}

// Each decode row's query attends to its first context_lens[r] cached tokens. q's rows lie
// q_row_stride elements apart (its heads contiguous within a row), so that the query rows are
// read where the qkv projection wrote them: copying them out first cost a split, views and a
// copy per layer. Caches [kv_heads, num_blocks, block_size, head_dim] of T, or int8
// [kv_heads, num_blocks, block_size * (head_dim + 4)] bytes (the layout above).
template <typename T, typename C>
void decode_attention(T* out, const T* q, int64_t q_row_stride, const C* k_cache, const C* v_cache,
                      const int64_t* block_tables, int64_t table_width, const int64_t* context_lens,
                      int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t num_blocks, int64_t block_size, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_ctx = table_width * block_size;
  const int64_t row = std::is_same_v<C, int8_t> ? head_dim + KV_SCALE_BYTES : head_dim;
  const int64_t head_stride = num_blocks * block_size * row;  // one kv head's whole pool
  const RowKernel<T, C> vec = vector_kernel<T, C>(head_dim, group, block_size);
  for_each_row_head(num_rows, num_heads, num_kv_heads, head_dim, max_ctx, block_size,
                    [&](int64_t r, int64_t kvh, AttentionScratch& s) {
    T* o = out + (r * num_heads + kvh * group) * head_dim;
    const T* qr = q + r * q_row_stride + kvh * group * head_dim;
    const C* kh = k_cache + kvh * head_stride;
    const C* vh = v_cache + kvh * head_stride;
    const int64_t* table = block_tables + r * table_width;
    if (vec != nullptr)
      vec(o, qr, kh, vh, table, context_lens[r], scale, s.scores.data(), max_ctx);
    else
      attend_any(o, qr, kh, vh, table, context_lens[r], group, head_dim, block_size, scale, max_ctx, s);
  });
}

// Per-token int8 quantization of a step's activations for torch._int_mm (the w8a8 weight
// format): each channel first times its smoothing factor col[i] (SmoothQuant's 1 / s), then
// scale = max|x| / 127 per row, q = round(x / scale). One call instead of the eight torch ops
// it replaces; at batch 1 their dispatch cost more than the int8 matmul saved.
template <typename T>
void quantize_rows_int8(int8_t* q, float* scale, const T* x, const float* col, int64_t rows, int64_t k) {
#pragma omp parallel for schedule(static) if (rows * k > 262144)
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = x + r * k;
    int8_t* out = q + r * k;
#ifdef __AVX512F__
    // 16 channels a vector; the round is the CPU's (to nearest even, as torch.round), the
    // narrowing saturates (|x| / scale <= 127 by construction). The scalar loop below took
    // 33 us for 32 x 576 (a third of the w8a8 linear at batch 32): it did not vectorize.
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 m = static_cast<__mmask16>(k - i >= 16 ? 0xffff : (1u << (k - i)) - 1u);
      const __m512 v = _mm512_mul_ps(load16(in + i, m), _mm512_maskz_loadu_ps(m, col + i));
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    const float s = std::max(_mm512_reduce_max_ps(vmax), 1e-12f) / 127.f;
    scale[r] = s;
    const __m512 inv = _mm512_set1_ps(1.f / s);
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 m = static_cast<__mmask16>(k - i >= 16 ? 0xffff : (1u << (k - i)) - 1u);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(in + i, m), _mm512_maskz_loadu_ps(m, col + i)), inv);
      _mm_mask_storeu_epi8(out + i, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#else
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(to_float(in[i]) * col[i]));
    const float s = std::max(amax, 1e-12f) / 127.f;
    scale[r] = s;
    for (int64_t i = 0; i < k; ++i) {
      const float v = std::nearbyint(to_float(in[i]) * col[i] / s);  // ties to even, as torch.round
      out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
#endif
  }
}

// w4a8: int4 weights times int8 activations, llama.cpp's Q4_1 x Q8_1 scheme on AVX512-VNNI.
// A decode step at batch 1 reads every weight once, so it runs at the speed the weights
// stream in: torch's int4 kernel (_weight_int4pack_mm_for_cpu) unpacks them to floats and
// reached 12 GB/s of the machine's 25 GB/s. Here the 4-bit codes stay integers: each group
// of 32 weights (code x scale + min, as the GGUF's Q4_1) meets the input's group of 32
// quantized to int8 (one scale per group), VPDPBUSD sums the products in int32 for 16 output
// rows at once, and only each group's sum is scaled, in fp32: y = scale x sx x (code . xq)
// + min x sx x sum(xq).
//
// Weight layout, from weights.py's quantize_w4a8: codes [N/16, K/32, 4, 64]
// bytes, where byte 4r + j of chunk p holds the codes of row 16t + r at k = 32g + 4p + j (low
// nibble) and k = 32g + 16 + 4p + j (high nibble); scales [N/16, K/32, 2, 16] fp16, the 16
// rows' scales then their mins.
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHasW4A8 = true;

template <typename T>
void quantize_groups_int8(int8_t* q, float* sx, float* sum, const T* x, int64_t rows, int64_t k) {
  const int64_t groups = k / 32;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* in = x + r * k + g * 32;
      const __m512 a = load16(in, 0xffff), b = load16(in + 16, 0xffff);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float s = std::max(amax, 1e-30f) / 127.f;
      const __m512 inv = _mm512_set1_ps(1.f / s);
      int8_t* out = q + r * k + g * 32;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  // |q| <= 127
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qb));
      sx[r * groups + g] = s;
      // The sum of the quantized group, not of x: then min x sum + scale x sx x (code . xq)
      // is exactly the dequantized weights times the dequantized input, whose error is the
      // input's rounding times w. With sum(x) exact, the rounding would meet code x scale =
      // w - min instead, about twice w (measured: 1-2.7% of each output against 0.5%).
      sum[r * groups + g] = s * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
    }
  }
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {  // round to nearest even, as store() above
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

// Rows [r0, r0 + M) of the input against the 16 output rows of tile t.
template <typename T, int M>
inline void w4a8_tile(T* out, const uint8_t* codes, const uint16_t* scales, const int8_t* xq,
                      const float* sx, const float* xsum, int64_t t, int64_t groups, int64_t k,
                      int64_t n) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* c = codes + t * groups * 256;
  const uint16_t* sc = scales + t * groups * 32;
  for (int64_t g = 0; g < groups; ++g, c += 256, sc += 32) {
    __m512i lo[4], hi[4];
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(c + 64 * p);
      lo[p] = _mm512_and_si512(v, low4);
      hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
    const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16)));
    for (int m = 0; m < M; ++m) {
      const int8_t* xg = xq + m * k + g * 32;
      int32_t x4[8];
      std::memcpy(x4, xg, 32);
      __m512i dot = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) dot = _mm512_dpbusd_epi32(dot, lo[p], _mm512_set1_epi32(x4[p]));
      for (int p = 0; p < 4; ++p) dot = _mm512_dpbusd_epi32(dot, hi[p], _mm512_set1_epi32(x4[4 + p]));
      const __m512 s = _mm512_mul_ps(scale, _mm512_set1_ps(sx[m * groups + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[m]);
      acc[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xsum[m * groups + g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) store16(out + m * n + t * 16, acc[m]);
}

template <typename T>
void w4a8_matmul(T* out, const T* x, const uint8_t* codes, const uint16_t* scales, int64_t rows,
                 int64_t k, int64_t n) {
  const int64_t groups = k / 32, tiles = n / 16;
  std::vector<int8_t> xq(rows * k);
  std::vector<float> sx(rows * groups), xsum(rows * groups);
  quantize_groups_int8(xq.data(), sx.data(), xsum.data(), x, rows, k);
  // Up to 4 input rows share each unpacked tile (registers: 8 code vectors, 4 accumulators).
#pragma omp parallel for schedule(static) if (tiles * groups * rows > 512)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < rows; r += 4) {
      T* o = out + r * n;
      const int8_t* q = xq.data() + r * k;
      const float* s = sx.data() + r * groups;
      const float* xs = xsum.data() + r * groups;
      switch (std::min<int64_t>(4, rows - r)) {
        case 1: w4a8_tile<T, 1>(o, codes, scales, q, s, xs, t, groups, k, n); break;
        case 2: w4a8_tile<T, 2>(o, codes, scales, q, s, xs, t, groups, k, n); break;
        case 3: w4a8_tile<T, 3>(o, codes, scales, q, s, xs, t, groups, k, n); break;
        default: w4a8_tile<T, 4>(o, codes, scales, q, s, xs, t, groups, k, n); break;
      }
    }
  }
}
#else
constexpr bool kHasW4A8 = false;
template <typename T>
void w4a8_matmul(T*, const T*, const uint8_t*, const uint16_t*, int64_t, int64_t, int64_t) {}
#endif

// out[r, n] = acc[r, n] x row_scale[r] x col_scale[n]: the int32 sums of torch._int_mm back
// in the model's dtype.
template <typename T>
void rescale_int32(T* out, const int32_t* acc, const float* row_scale, const float* col_scale,
                   int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const float rs = row_scale[r];
    const int32_t* a = acc + r * n;
    T* o = out + r * n;
#ifdef __AVX512F__
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + i));
      store16(o + i, _mm512_mul_ps(_mm512_mul_ps(v, vrs), _mm512_maskz_loadu_ps(m, col_scale + i)), m);
    }
#else
    for (int64_t i = 0; i < n; ++i) store(o + i, static_cast<float>(a[i]) * rs * col_scale[i]);
#endif
  }
}

// SwiGLU's activation: out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i], rounded where
// torch rounds (silu in fp32 then to T, the product in fp32 then to T). One call instead of a
// split, a silu and a mul with their two temporaries. silu(x) = x / (1 + e^-x), written with
// e^-|x| so that the exponent is never positive (exp_nonpositive).
template <typename T>
void silu_and_mul(T* out, const T* gate_up, int64_t tokens, int64_t inter) {
  // Threads only for prefill-sized work: at batch 8 waking the second thread cost more than
  // the vectorized loop takes (measured: the step 27 ms against 26 with torch's three ops).
#pragma omp parallel for schedule(static) if (tokens * inter > 65536)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* gate = gate_up + t * 2 * inter;
    const T* up = gate + inter;
    T* o = out + t * inter;
#ifdef __AVX512F__
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 m = tail_mask(inter - i);
      const __m512 x = load16(gate + i, m);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
      const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
      // x / (1 + e) or x e / (1 + e), as the scalar loop: one division (the blend first).
      const __m512 silu = _mm512_div_ps(_mm512_mask_blend_ps(pos, _mm512_mul_ps(x, e), x), d);
      store16(o + i, _mm512_mul_ps(round16(silu, o), load16(up + i, m)), m);
    }
#else
    for (int64_t i = 0; i < inter; ++i) {
      const float x = to_float(gate[i]);
      const float e = exp_nonpositive(-std::fabs(x));
      const float silu = x >= 0.f ? x / (1.f + e) : x * e / (1.f + e);
      T rounded;
      store(&rounded, silu);
      store(o + i, to_float(rounded) * to_float(up[i]));
    }
#endif
  }
}

// The decoder layers of a decode-only step in one call, every linear in w4a8: the same
// kernels in the same order as the model's Python forward (so the same numbers), without
// its ~10 calls a layer across ctypes, their tensors and the modules around them. At batch
// 1 a step is ~120 w4a8 products of 10-30 us each over weights that sit in L3, and the
// per-call cost (about 7 us each, measured) was a quarter of the step (11.7 against 8.6 ms
// in one call, benchmarks/decode_step.py --layer-by-layer).
//
// ``layer_ptrs``: 12 addresses per layer: the codes and scales of qkv, o, gate_up and down,
// the two norms' weights, then the layer's K and V caches. ``h`` holds layer 0's normalised
// input (its norm has no residual to add, and the caller runs it as the reference does);
// ``residual`` the embeddings. On return ``h`` holds the last layer's output and
// ``residual`` the stream before it, as the Python loop leaves them.
template <typename T>
void decode_layers_w4a8(T* h, T* residual, const int64_t* layer_ptrs, int64_t layers, int64_t rows,
                        const int64_t* positions, const float* cos, const float* sin,
                        const int64_t* slots, const int64_t* block_tables, int64_t table_width,
                        const int64_t* context_lens, int64_t hidden, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int64_t inter, int64_t num_blocks,
                        int64_t block_size, float eps, float scale, bool kv_int8) {
  const int64_t q_size = heads * head_dim, qkv_width = (heads + 2 * kv_heads) * head_dim;
  std::vector<T> normed(rows * hidden), qkv(rows * qkv_width), attn(rows * q_size);
  std::vector<T> o(rows * hidden), gate_up(rows * 2 * inter), act(rows * inter);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t* p = layer_ptrs + 12 * l;
    const auto codes = [p](int i) { return reinterpret_cast<const uint8_t*>(p[2 * i]); };
    const auto scales = [p](int i) { return reinterpret_cast<const uint16_t*>(p[2 * i + 1]); };
    const T* input_norm = reinterpret_cast<const T*>(p[8]);
    const T* post_norm = reinterpret_cast<const T*>(p[9]);
    const T* x = h;
    if (l > 0) {
      add_rms_norm(normed.data(), residual, h, input_norm, rows, hidden, eps);
      x = normed.data();
    }
    w4a8_matmul(qkv.data(), x, codes(0), scales(0), rows, hidden, qkv_width);
    if (kv_int8) {
      int8_t* k_cache = reinterpret_cast<int8_t*>(p[10]);
      int8_t* v_cache = reinterpret_cast<int8_t*>(p[11]);
      rope_write_kv_int8(qkv.data(), positions, cos, sin, k_cache, v_cache, slots, rows, heads,
                         kv_heads, head_dim, num_blocks * block_size, block_size);
      decode_attention(attn.data(), qkv.data(), qkv_width, k_cache, v_cache, block_tables,
                            table_width, context_lens, rows, heads, kv_heads, head_dim, num_blocks,
                            block_size, scale);
    } else {
      T* k_cache = reinterpret_cast<T*>(p[10]);
      T* v_cache = reinterpret_cast<T*>(p[11]);
      rope_write_kv(qkv.data(), positions, cos, sin, k_cache, v_cache, slots, rows, heads, kv_heads,
                    head_dim, num_blocks * block_size);
      decode_attention(attn.data(), qkv.data(), qkv_width, k_cache, v_cache, block_tables,
                       table_width, context_lens, rows, heads, kv_heads, head_dim, num_blocks,
                       block_size, scale);
    }
    w4a8_matmul(o.data(), attn.data(), codes(1), scales(1), rows, q_size, hidden);
    add_rms_norm(normed.data(), residual, o.data(), post_norm, rows, hidden, eps);
    w4a8_matmul(gate_up.data(), normed.data(), codes(2), scales(2), rows, hidden, 2 * inter);
    silu_and_mul(act.data(), gate_up.data(), rows, inter);
    w4a8_matmul(h, act.data(), codes(3), scales(3), rows, inter, hidden);
  }
}

// Each row's index of its largest logit, the first where several tie and the first NaN where
// there is one (torch.argmax's answer). torch's CPU argmax ran 5.5 ms over 128 rows of the
// 49,152-token vocabulary where its amax ran 0.5 (measured): a row is one vectorized max, then
// a scan for where it is, 64 values at a time.
void argmax_rows(int64_t* out, const float* x, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > (1 << 18))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    float m = -std::numeric_limits<float>::infinity();
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const float v = row[i];
      m = m > v ? m : v;  // not std::max: its NaN rule kept the loop scalar (17x slower)
      nan |= v != v;
    }
    int64_t at = 0;
    if (nan) {
      while (row[at] == row[at]) ++at;
    } else {
      for (int64_t base = 0; base < n; base += 64) {
        const int64_t end = std::min(n, base + 64);
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t i = base; i < end; ++i) hit |= row[i] == m;
        if (!hit) continue;
        for (at = base; row[at] != m; ++at) {
        }
        break;
      }
    }
    out[r] = at;
  }
}


#if defined(__AVX512F__) && defined(__AVX512BF16__)
// Attention of a bf16 prompt chunk over its cached context and itself (causal), as one flash
// pass: first every key tile of CHUNK_KEYS keys is converted once for the whole call (K to bf16
// dimension pairs for VDPBF16PS, V to token pairs), then the chunk's queries in tiles of
// CHUNK_POSITIONS positions x the query group run over those tiles, online softmax per query in
// fp32. Cached keys are read where they lie in the paged cache (bf16, or int8 dequantized), the
// chunk's own from its rows of qkv, unquantized. torch's CPU flash attention ran this shape at
// 45-155 GFLOP/s on a Zen 5 EPYC without AMX (a 96-token chunk over 1,152 cached: 2.7 ms a
// layer), where its bf16 GEMMs reach 600-880, and the per-layer gather of the cache came on top.
// Converting each key tile per query tile instead (once per 16 positions) made the kernel 1.2x
// (bf16 cache) to 1.4x (int8) slower at 512 positions over 1,536 cached; tiles of 32 keys and 4
// queries scored together, ~1.25x slower again (a session's A/B on the Zen 5 EPYC, docs/RESULTS.md).
constexpr int64_t CHUNK_POSITIONS = 16;
constexpr int64_t CHUNK_KEYS = 64;  // a softmax update (max, exp, sum) per 64 keys a query
constexpr int64_t CHUNK_QUERIES = 6;  // query vectors scored together, each key pair loaded once for them
static_assert(CHUNK_KEYS % 32 == 0, "the weights are stored 32 keys (16 bf16 pairs) at a time");

// One converted key tile of one kv head: K as [D / 2][CHUNK_KEYS] dimension pairs, then V as
// [CHUNK_KEYS / 2][D] token pairs (each dimension's two side by side); keys past the end zero.
template <int64_t D>
constexpr int64_t CHUNK_TILE_WORDS = D / 2 * CHUNK_KEYS + CHUNK_KEYS / 2 * D;

struct ChunkScratch {
  std::vector<int32_t> q;      // [positions x group][D / 2]: the query tile's pairs
  std::vector<float> o, m, l;  // per query vector: its weighted sum of V, running max and sum
  std::vector<int32_t> pp;     // [CHUNK_QUERIES][CHUNK_KEYS / 2]: weights as bf16 token pairs
  ChunkScratch(int64_t d, int64_t group)
      : q(static_cast<size_t>(CHUNK_POSITIONS * group * d / 2)),
        o(static_cast<size_t>(CHUNK_POSITIONS * group * d)),
        m(static_cast<size_t>(CHUNK_POSITIONS * group)),
        l(static_cast<size_t>(CHUNK_POSITIONS * group)),
        pp(static_cast<size_t>(CHUNK_QUERIES * CHUNK_KEYS / 2)) {}
};

// Key j of one kv head, K and V as D bf16s each into krow and vrow: a cached key from its
// block of the paged cache, one of the chunk's own from its row of qkv.
template <int64_t D>
inline void chunk_key(int64_t j, uint16_t* krow, uint16_t* vrow, const uint16_t* kh, const uint16_t* vh,
                      const int64_t* blocks, int64_t cached, const uint16_t* k_own,
                      const uint16_t* v_own, int64_t own_stride, int64_t bs) {
  const uint16_t *k, *v;
  if (j < cached) {
    const int64_t at = blocks[j / bs] * bs + j % bs;
    k = kh + at * D;
    v = vh + at * D;
  } else {
    k = k_own + (j - cached) * own_stride;
    v = v_own + (j - cached) * own_stride;
  }
  std::memcpy(krow, k, D * sizeof(uint16_t));
  std::memcpy(vrow, v, D * sizeof(uint16_t));
}
template <int64_t D>
inline void chunk_key(int64_t j, uint16_t* krow, uint16_t* vrow, const int8_t* kh, const int8_t* vh,
                      const int64_t* blocks, int64_t cached, const uint16_t* k_own,
                      const uint16_t* v_own, int64_t own_stride, int64_t bs) {
  if (j >= cached) {
    std::memcpy(krow, k_own + (j - cached) * own_stride, D * sizeof(uint16_t));
    std::memcpy(vrow, v_own + (j - cached) * own_stride, D * sizeof(uint16_t));
    return;
  }
  // kv_quant.py's layout: K codes [D/4][bs][4] offset by 128, V codes [bs/2][D][2], then the
  // block's float32 scales [bs].
  const int64_t block_bytes = bs * (D + KV_SCALE_BYTES), at = j % bs;
  const int8_t* kb = kh + blocks[j / bs] * block_bytes;
  const int8_t* vb = vh + blocks[j / bs] * block_bytes;
  const float ks = reinterpret_cast<const float*>(kb + bs * D)[at];
  const float vs = reinterpret_cast<const float*>(vb + bs * D)[at];
  static_assert(D == 64, "one gather of 16 four-code words holds a key");
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i words = _mm512_i32gather_epi32(
      _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(bs * 4))),
                       _mm512_set1_epi32(static_cast<int32_t>(at * 4))),
      kb, 1);  // dimensions 4x .. 4x + 3 in word x: all 64 codes in order
  const __m512 kscale = _mm512_set1_ps(ks), vscale = _mm512_set1_ps(vs);
  const auto key16 = [&](__m128i codes, int64_t c) {
    const __m512i x = _mm512_sub_epi32(_mm512_cvtepu8_epi32(codes), _mm512_set1_epi32(128));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(krow + c), to_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(x), kscale)));
  };
  key16(_mm512_extracti32x4_epi32(words, 0), 0);
  key16(_mm512_extracti32x4_epi32(words, 1), 16);
  key16(_mm512_extracti32x4_epi32(words, 2), 32);
  key16(_mm512_extracti32x4_epi32(words, 3), 48);
  const int8_t* vpair = vb + (at / 2) * D * 2;  // the token pair's codes, [D][2]
  for (int64_t c = 0; c < D; c += 32) {
    const __m512i w = _mm512_loadu_si512(vpair + 2 * c);  // 32 dimensions: the pair's two codes each
    const __m512i x = at % 2 ? _mm512_srai_epi16(w, 8) : _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(x)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(x, 1)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vrow + c), to_bf16(_mm512_mul_ps(lo, vscale)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vrow + c + 16), to_bf16(_mm512_mul_ps(hi, vscale)));
  }
}

// The key tile of one kv head that starts at key j0 (of total keys), converted into tile
// (CHUNK_TILE_WORDS<D> words).
template <int64_t D, typename C>
void chunk_convert_keys(int32_t* tile, int64_t j0, int64_t total, const uint16_t* k_own,
                        const uint16_t* v_own, int64_t own_stride, const C* kh, const C* vh,
                        const int64_t* blocks, int64_t cached, int64_t bs) {
  constexpr int64_t PAIRS = D / 2;
  alignas(64) uint16_t krow[16 * D], vrow[CHUNK_KEYS * D];
  int32_t* kt = tile;
  int32_t* vp = tile + PAIRS * CHUNK_KEYS;
  const int64_t nk = std::min(CHUNK_KEYS, total - j0);
  for (int64_t t = 0; t < CHUNK_KEYS; ++t) {  // K and V rows in bf16 (past the end: zeros)
    if (t < nk)
      chunk_key<D>(j0 + t, krow + (t % 16) * D, vrow + t * D, kh, vh, blocks, cached,
                   k_own, v_own, own_stride, bs);
    else {
      std::memset(krow + (t % 16) * D, 0, D * sizeof(uint16_t));
      std::memset(vrow + t * D, 0, D * sizeof(uint16_t));
    }
    if (t % 16 == 15) {  // 16 keys in: their dimension pairs
      for (int64_t c = 0; c < PAIRS; c += 16) {
        __m512i pairs[16];
        for (int64_t r = 0; r < 16; ++r) pairs[r] = _mm512_loadu_si512(krow + r * D + 2 * c);
        transpose16_epi32(pairs);  // pairs[x]: dimension pair c + x of the 16 keys
        for (int64_t x = 0; x < 16; ++x)
          _mm512_storeu_si512(kt + (c + x) * CHUNK_KEYS + (t - 15), pairs[x]);
      }
    }
  }
  for (int64_t t2 = 0; t2 < CHUNK_KEYS / 2; ++t2)  // V's token pairs
    for (int64_t c = 0; c < D; c += 16) {
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + 2 * t2 * D + c)));
      const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + (2 * t2 + 1) * D + c)));
      _mm512_storeu_si512(vp + t2 * D + c, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

// One task: a kv head's query group at chunk positions p0 .. p0 + P - 1 (P <= CHUNK_POSITIONS),
// over the head's converted key tiles.
// Scores by VDPBF16PS (16 keys a vector, one dimension pair an instruction), P V by VDPBF16PS
// over token pairs (16 dimensions a vector), the weights rounded to bf16 as flash attention in
// bf16 rounds them; the softmax's max, sum and rescaling in fp32.
template <int64_t D>
void chunk_attention_tile(uint16_t* out, int64_t out_stride, const uint16_t* q, int64_t q_stride,
                          const int32_t* tiles, int64_t cached, int64_t group, int64_t p0, int64_t P,
                          float scale, ChunkScratch& s) {
  constexpr int64_t PAIRS = D / 2;
  const int64_t M = P * group;  // query vectors: position-major, then the group's heads
  for (int64_t i = 0; i < M; ++i) {
    const uint16_t* qi = q + (p0 + i / group) * q_stride + (i % group) * D;
    std::memcpy(s.q.data() + i * PAIRS, qi, D * sizeof(uint16_t));
    s.m[i] = -INFINITY;
    s.l[i] = 0.f;
  }
  std::fill(s.o.begin(), s.o.begin() + M * D, 0.f);
  const int64_t end = cached + p0 + P;  // the keys the tile's last position sees
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j0 = 0; j0 < end; j0 += CHUNK_KEYS) {
    const int64_t nk = std::min(CHUNK_KEYS, end - j0);
    const int32_t* kt = tiles + j0 / CHUNK_KEYS * CHUNK_TILE_WORDS<D>;
    const int32_t* vp = kt + PAIRS * CHUNK_KEYS;
    for (int64_t i0 = 0; i0 < M; i0 += CHUNK_QUERIES) {
      const int64_t nq = std::min(CHUNK_QUERIES, M - i0);
      constexpr int64_t KV = CHUNK_KEYS / 16;  // score vectors a query
      __m512 acc[CHUNK_QUERIES][KV];
      for (int64_t a = 0; a < CHUNK_QUERIES; ++a)
        for (int64_t k = 0; k < KV; ++k) acc[a][k] = _mm512_setzero_ps();
      for (int64_t x = 0; x < PAIRS; ++x) {
        __m512bh kx[KV];
        for (int64_t k = 0; k < KV; ++k) kx[k] = (__m512bh)_mm512_loadu_si512(kt + x * CHUNK_KEYS + 16 * k);
        for (int64_t a = 0; a < CHUNK_QUERIES; ++a) {
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(s.q[std::min(i0 + a, M - 1) * PAIRS + x]);
          for (int64_t k = 0; k < KV; ++k) acc[a][k] = _mm512_dpbf16_ps(acc[a][k], kx[k], qb);
        }
      }
      float alpha[CHUNK_QUERIES];
      for (int64_t a = 0; a < CHUNK_QUERIES; ++a) {
        alpha[a] = 1.f;
        const int64_t i = i0 + a;
        int32_t* pp = s.pp.data() + a * CHUNK_KEYS / 2;
        const int64_t visible = a < nq ? cached + p0 + i / group + 1 - j0 : 0;  // of this tile's keys
        if (visible <= 0) {  // a query before every key of the tile (or none)
          std::memset(pp, 0, CHUNK_KEYS / 2 * sizeof(int32_t));
          continue;
        }
        const __m512i vis = _mm512_set1_epi32(static_cast<int32_t>(std::min(visible, nk)));
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        __mmask16 mask[KV];
        __m512 sc[KV];
        __m512 top = ninf;
        for (int64_t k = 0; k < KV; ++k) {
          mask[k] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(16 * k))), vis);
          sc[k] = _mm512_mask_mul_ps(ninf, mask[k], acc[a][k], _mm512_set1_ps(scale));
          top = _mm512_max_ps(top, sc[k]);
        }
        const float mnew = std::max(s.m[i], _mm512_reduce_max_ps(top));
        alpha[a] = std::isinf(s.m[i]) ? 0.f : std::exp(s.m[i] - mnew);
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < KV; k += 2) {
          // bf16 weights, keys 2x and 2x+1 side by side: 32 keys' weights as 16 pairs a store
          const __m512 e0 = _mm512_maskz_mov_ps(mask[k], exp_nonpositive(_mm512_sub_ps(sc[k], mv)));
          const __m512 e1 = _mm512_maskz_mov_ps(mask[k + 1], exp_nonpositive(_mm512_sub_ps(sc[k + 1], mv)));
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
          _mm512_storeu_si512(pp + 8 * k, _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(e0)), to_bf16(e1), 1));
        }
        s.l[i] = s.l[i] * alpha[a] + _mm512_reduce_add_ps(sum);
        s.m[i] = mnew;
      }
      // O += P V for the (up to) CHUNK_QUERIES queries, each V pair loaded once for them all.
      __m512 o[CHUNK_QUERIES][D / 16];
      for (int64_t a = 0; a < CHUNK_QUERIES; ++a)
        for (int64_t c = 0; c < D / 16; ++c)
          o[a][c] = a < nq ? _mm512_mul_ps(_mm512_loadu_ps(s.o.data() + (i0 + a) * D + 16 * c), _mm512_set1_ps(alpha[a]))
                           : _mm512_setzero_ps();
      for (int64_t t2 = 0; t2 < (nk + 1) / 2; ++t2) {
        __m512bh v[D / 16];
        for (int64_t c = 0; c < D / 16; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + t2 * D + 16 * c);
        for (int64_t a = 0; a < CHUNK_QUERIES; ++a) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(s.pp[a * CHUNK_KEYS / 2 + t2]);
          for (int64_t c = 0; c < D / 16; ++c) o[a][c] = _mm512_dpbf16_ps(o[a][c], v[c], pb);
        }
      }
      for (int64_t a = 0; a < nq; ++a)
        for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(s.o.data() + (i0 + a) * D + 16 * c, o[a][c]);
    }
  }
  for (int64_t i = 0; i < M; ++i) {
    uint16_t* oi = out + (p0 + i / group) * out_stride + (i % group) * D;
    const __m512 inv = _mm512_set1_ps(1.f / s.l[i]);
    for (int64_t c = 0; c < D; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(oi + c), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(s.o.data() + i * D + c), inv)));
  }
}

template <typename C>
int chunk_attention(uint16_t* out, const uint16_t* q, int64_t q_stride, const uint16_t* k_own,
                    const uint16_t* v_own, int64_t own_stride, const C* k_cache, const C* v_cache,
                    const int64_t* blocks, int64_t cached, int64_t n, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t num_blocks, int64_t bs, float scale) {
  if (head_dim != 64) return 4;
  constexpr int64_t D = 64;
  const int64_t group = heads / kv_heads;
  const int64_t row = std::is_same_v<C, int8_t> ? D + KV_SCALE_BYTES : D;
  const int64_t tiles = (n + CHUNK_POSITIONS - 1) / CHUNK_POSITIONS;
  const int64_t total = cached + n, key_tiles = (total + CHUNK_KEYS - 1) / CHUNK_KEYS;
  // The converted keys of every kv head ([kv_heads][key_tiles][CHUNK_TILE_WORDS]), kept by the
  // calling thread between calls so a layer's call does not fault in fresh pages.
  static thread_local std::vector<int32_t> converted;
  const int64_t head_words = key_tiles * CHUNK_TILE_WORDS<D>;
  if (converted.size() < static_cast<size_t>(kv_heads * head_words))
    converted.resize(static_cast<size_t>(kv_heads * head_words));
  int32_t* conv = converted.data();
#pragma omp parallel
  {
    const DenormalsAreZero flush;
#pragma omp for schedule(static) collapse(2)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t t = 0; t < key_tiles; ++t)
        chunk_convert_keys<D, C>(conv + h * head_words + t * CHUNK_TILE_WORDS<D>, t * CHUNK_KEYS, total,
                                 k_own + h * D, v_own + h * D, own_stride,
                                 k_cache + h * num_blocks * bs * row, v_cache + h * num_blocks * bs * row,
                                 blocks, cached, bs);
    ChunkScratch scratch(D, group);
    // Later tiles see more keys: the biggest first, handed out one at a time.
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t tile = tiles - 1; tile >= 0; --tile)
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t p0 = tile * CHUNK_POSITIONS;
        const int64_t P = std::min(CHUNK_POSITIONS, n - p0);
        chunk_attention_tile<D>(out + h * group * D, heads * D, q + h * group * D, q_stride,
                                conv + h * head_words, cached, group, p0, P, scale, scratch);
      }
  }
  return 0;
}
#endif

}  // namespace

extern "C" {

int bucketserve_has_w4a8() { return kHasW4A8 ? 1 : 0; }

// Whether decode attention over an int8 cache runs its VNNI kernel at these sizes here (else
// the scalar one, far slower than the bf16 kernels).
int bucketserve_int8_attention_vectorized(int64_t head_dim, int64_t group, int64_t block_size) {
  return vector_kernel<uint16_t, int8_t>(head_dim, group, block_size) != nullptr ? 1 : 0;
}

// out [rows, n] = x [rows, k] @ W.T in the w4a8 layout above; k % 32 == 0, n % 16 == 0.
int bucketserve_w4a8_matmul(int dtype, void* out, const void* x, const uint8_t* codes,
                            const uint16_t* scales, int64_t rows, int64_t k, int64_t n) {
  if (!kHasW4A8) return 3;
  if (k % 32 != 0 || n % 16 != 0) return 1;
  if (dtype == 0) {
    w4a8_matmul(static_cast<float*>(out), static_cast<const float*>(x), codes, scales, rows, k, n);
  } else if (dtype == 1) {
    w4a8_matmul(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(x), codes, scales, rows, k, n);
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_decode_layers_w4a8(int dtype, void* h, void* residual, const int64_t* layer_ptrs,
                                   int64_t layers, int64_t rows, const int64_t* positions,
                                   const float* cos, const float* sin, const int64_t* slots,
                                   const int64_t* block_tables, int64_t table_width,
                                   const int64_t* context_lens, int64_t hidden, int64_t heads,
                                   int64_t kv_heads, int64_t head_dim, int64_t inter,
                                   int64_t num_blocks, int64_t block_size, float eps, float scale,
                                   int kv_int8) {
  if (!kHasW4A8) return 3;
  if (kv_int8 && head_dim % 4 != 0) return 1;
  if (hidden % 32 != 0 || inter % 32 != 0 || (heads * head_dim) % 32 != 0 || head_dim % 2 != 0 ||
      ((heads + 2 * kv_heads) * head_dim) % 16 != 0 ||
      kv_heads <= 0 || heads % kv_heads != 0)
    return 1;
  const auto run = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    decode_layers_w4a8(static_cast<T*>(h), static_cast<T*>(residual), layer_ptrs, layers, rows,
                       positions, cos, sin, slots, block_tables, table_width, context_lens, hidden,
                       heads, kv_heads, head_dim, inter, num_blocks, block_size, eps, scale, kv_int8 != 0);
  };
  if (dtype == 0) {
    run(static_cast<float*>(nullptr));
  } else if (dtype == 1) {
    run(static_cast<uint16_t*>(nullptr));
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_silu_and_mul(int dtype, void* out, const void* gate_up, int64_t tokens, int64_t inter) {
  if (dtype == 0) {
    silu_and_mul(static_cast<float*>(out), static_cast<const float*>(gate_up), tokens, inter);
  } else if (dtype == 1) {
    silu_and_mul(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(gate_up), tokens, inter);
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_quantize_rows_int8(int dtype, int8_t* q, float* scale, const void* x, const float* col,
                                   int64_t rows, int64_t k) {
  if (dtype == 0) {
    quantize_rows_int8(q, scale, static_cast<const float*>(x), col, rows, k);
  } else if (dtype == 1) {
    quantize_rows_int8(q, scale, static_cast<const uint16_t*>(x), col, rows, k);
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_rescale_int32(int dtype, void* out, const int32_t* acc, const float* row_scale,
                              const float* col_scale, int64_t rows, int64_t n) {
  if (dtype == 0) {
    rescale_int32(static_cast<float*>(out), acc, row_scale, col_scale, rows, n);
  } else if (dtype == 1) {
    rescale_int32(static_cast<uint16_t*>(out), acc, row_scale, col_scale, rows, n);
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_argmax_rows(int64_t* out, const float* x, int64_t rows, int64_t n) {
  if (n < 1) return 1;
  argmax_rows(out, x, rows, n);
  return 0;
}

int bucketserve_add_rms_norm(int dtype, void* out, void* residual, const void* x,
                             const void* weight, int64_t rows, int64_t dim, float eps) {
  if (dtype == 0) {
    add_rms_norm(static_cast<float*>(out), static_cast<float*>(residual),
                 static_cast<const float*>(x), static_cast<const float*>(weight), rows, dim, eps);
  } else if (dtype == 1) {
    add_rms_norm(static_cast<uint16_t*>(out), static_cast<uint16_t*>(residual),
                 static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), rows, dim,
                 eps);
  } else {
    return 2;
  }
  return 0;
}

int bucketserve_rope_write_kv(int dtype, void* qkv, const int64_t* positions, const float* cos,
                              const float* sin, void* k_cache, void* v_cache, const int64_t* slots,
                              int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                              int64_t cache_slots) {
  if (dim % 2 != 0) return 1;
  if (dtype == 0) {
    rope_write_kv(static_cast<float*>(qkv), positions, cos, sin, static_cast<float*>(k_cache),
                  static_cast<float*>(v_cache), slots, tokens, heads, kv_heads, dim, cache_slots);
  } else if (dtype == 1) {
    rope_write_kv(static_cast<uint16_t*>(qkv), positions, cos, sin,
                  static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), slots, tokens,
                  heads, kv_heads, dim, cache_slots);
  } else {
    return 2;
  }
  return 0;
}


// As bucketserve_rope_write_kv, into int8 caches [kv_heads, cache_slots / block_size,
// block_size * (dim + 4)] bytes (the layout of the int8 KV cache section).
int bucketserve_rope_write_kv_int8(int dtype, void* qkv, const int64_t* positions, const float* cos,
                                   const float* sin, int8_t* k_cache, int8_t* v_cache,
                                   const int64_t* slots, int64_t tokens, int64_t heads,
                                   int64_t kv_heads, int64_t dim, int64_t cache_slots,
                                   int64_t block_size) {
  if (dim % 4 != 0 || block_size <= 0 || cache_slots % block_size != 0) return 1;
  if (dtype == 0) {
    rope_write_kv_int8(static_cast<float*>(qkv), positions, cos, sin, k_cache, v_cache, slots, tokens,
                       heads, kv_heads, dim, cache_slots, block_size);
  } else if (dtype == 1) {
    rope_write_kv_int8(static_cast<uint16_t*>(qkv), positions, cos, sin, k_cache, v_cache, slots,
                       tokens, heads, kv_heads, dim, cache_slots, block_size);
  } else {
    return 2;
  }
  return 0;
}

// As bucketserve_decode_attention, over int8 caches [kv_heads, num_blocks, block_size *
// (head_dim + 4)] bytes; dtype is q's and out's.
int bucketserve_decode_attention_int8(int dtype, void* out, const void* q, int64_t q_row_stride,
                                      const int8_t* k_cache, const int8_t* v_cache,
                                      const int64_t* block_tables, int64_t table_width,
                                      const int64_t* context_lens, int64_t num_rows,
                                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                      int64_t num_blocks, int64_t block_size, float scale) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim % 4 != 0) return 1;
  if (dtype == 0) {
    decode_attention(static_cast<float*>(out), static_cast<const float*>(q), q_row_stride, k_cache,
                          v_cache, block_tables, table_width, context_lens, num_rows, num_heads,
                          num_kv_heads, head_dim, num_blocks, block_size, scale);
  } else if (dtype == 1) {
    decode_attention(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(q), q_row_stride,
                          k_cache, v_cache, block_tables, table_width, context_lens, num_rows,
                          num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale);
  } else {
    return 2;
  }
  return 0;
}

// dtype: 0 = float32, 1 = bfloat16. Shapes: out [rows, heads, head_dim]; q's rows
// q_row_stride elements apart, each [heads, head_dim] contiguous; caches
// [kv_heads, num_blocks, block_size, head_dim]; block_tables [rows, table_width] (int64);
// context_lens [rows] (int64): row r attends to its first context_lens[r] cached tokens.
int bucketserve_decode_attention(int dtype, void* out, const void* q, int64_t q_row_stride,
                                 const void* k_cache,
                                 const void* v_cache, const int64_t* block_tables,
                                 int64_t table_width, const int64_t* context_lens, int64_t num_rows,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 int64_t num_blocks, int64_t block_size, float scale) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return 1;
  if (dtype == 0) {
    decode_attention(static_cast<float*>(out), static_cast<const float*>(q), q_row_stride,
                     static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                     block_tables, table_width, context_lens, num_rows, num_heads, num_kv_heads,
                     head_dim, num_blocks, block_size, scale);
  } else if (dtype == 1) {
    decode_attention(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(q), q_row_stride,
                     static_cast<const uint16_t*>(k_cache), static_cast<const uint16_t*>(v_cache),
                     block_tables, table_width, context_lens, num_rows, num_heads, num_kv_heads,
                     head_dim, num_blocks, block_size, scale);
  } else {
    return 2;
  }
  return 0;
}

// A bf16 prompt chunk of n tokens at positions cached .. cached + n - 1 attends causally to its
// sequence's first ``cached`` tokens in the paged caches (the blocks ``blocks``) and to its own
// K/V rows. q, k_own and v_own: rows q_stride / own_stride elements apart (they may lie in the
// qkv projection's output), each row [heads or kv_heads][head_dim]; out [n, heads * head_dim].
// cache_int8: the caches are int8 in kv_quant.py's layout, else bf16. 3: not built here (no
// AVX512-BF16), 4: a head size other than 64.
int bucketserve_chunk_attention(void* out, const void* q, int64_t q_stride, const void* k_own,
                                const void* v_own, int64_t own_stride, const void* k_cache,
                                const void* v_cache, int cache_int8, const int64_t* blocks,
                                int64_t cached, int64_t n, int64_t heads, int64_t kv_heads,
                                int64_t head_dim, int64_t num_blocks, int64_t block_size, float scale) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || n < 0 || cached < 0 || block_size <= 0) return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const auto* qq = static_cast<const uint16_t*>(q);
  const auto* ko = static_cast<const uint16_t*>(k_own);
  const auto* vo = static_cast<const uint16_t*>(v_own);
  auto* o = static_cast<uint16_t*>(out);
  if (cache_int8)
    return chunk_attention(o, qq, q_stride, ko, vo, own_stride, static_cast<const int8_t*>(k_cache),
                           static_cast<const int8_t*>(v_cache), blocks, cached, n, heads, kv_heads,
                           head_dim, num_blocks, block_size, scale);
  return chunk_attention(o, qq, q_stride, ko, vo, own_stride, static_cast<const uint16_t*>(k_cache),
                         static_cast<const uint16_t*>(v_cache), blocks, cached, n, heads, kv_heads,
                         head_dim, num_blocks, block_size, scale);
#else
  return 3;
#endif
}

int bucketserve_has_chunk_attention() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
