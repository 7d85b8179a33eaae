// CPU decoding kernels: small-batch linear layers y = x @ W^T over bf16 or int8/int4 weights (few rows of x:
// memory-bound), every routed expert of a layer in one call, fused RMSNorm, RoPE and expert selection, and MLA and
// GQA decode attention read in place from the paged cache.
//
// Built on first use by torch.utils.cpp_extension (model/kernels/build.py) for the CPU's ISA level, with
// -fopenmp (at::parallel_for runs serially without). Why by hand: for a few rows oneDNN streams decode weights
// at under half of what a tensor sum reads, and on AVX2 it cannot use bf16 weights at all; these kernels stream
// them at ~1.7x oneDNN's rate (AVX512-BF16) and run every routed expert of a layer in one parallel region
// instead of 2 oneDNN calls per expert.
//
// Layout: each weight W [N, K] is packed as [N/16][K/2][16][2] bf16, so one 64-byte load holds 16 outputs x 2
// inputs. With AVX512-BF16 that is exactly the operand of vdpbf16ps (bf16 pairs multiplied, float32 sums) for
// bf16 activations (from 3 rows up). Everywhere else -- AVX2, AVX-512 without bf16, float32 activations (models
// that keep bf16 weights but compute in float32), and 1-2 rows of bf16 -- the pairs are widened in registers (a
// bf16 is float32's upper half: one shift or one mask) and multiplied in float32 FMAs: the bytes streamed stay
// half of float32's. Each output row block is a contiguous run of memory, prefetched PREFETCH_BYTES ahead. Rows
// of x are processed a few at a time against a block still in L1/L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using namespace simd;

inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_scalar(v); }

// Every kernel's weight stream is prefetched this far ahead: with more work per byte than a plain sum, these loops
// keep too few loads in flight for the hardware prefetcher alone (measured on 2 AMX cores, 8960x1536 matrices under
// the AVX2 ceiling: bf16 30 -> 33 GB/s, int8 22 -> 28, int4 17 -> 26; the 186M bench model's 0.4-1.5 MB matrices
// at batch 1: 43% -> 49% of the sum-read in bf16, 55% -> 60% in float32; its 32-sequence decoding on vdpbf16ps
// 700 -> 800 tokens/s). 1-4 KiB measured alike.
constexpr int64_t PREFETCH_BYTES = 2048;
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + PREFETCH_BYTES);  // read, kept in every cache level
}

#if defined(__AVX512BF16__)
// bf16 activations on vdpbf16ps: two accumulator chains per row hide the instruction's latency.
template <int MC>
inline void block_rows_dp(const uint16_t* x, int64_t K, const uint16_t* wb, uint16_t* y, int64_t ldy) {
  __m512 a0[MC], a1[MC];
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    a0[m] = _mm512_setzero_ps();
    a1[m] = _mm512_setzero_ps();
  }
  const int64_t pairs = K / 2;
  const __m512i* w = reinterpret_cast<const __m512i*>(wb);
  int64_t kp = 0;
  for (; kp + 2 <= pairs; kp += 2) {
    prefetch_ahead(w + kp);
    prefetch_ahead(w + kp + 1);
    const __m512i w0 = _mm512_loadu_si512(w + kp), w1 = _mm512_loadu_si512(w + kp + 1);
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(x + m * K);
      a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_set1_epi32(xr[kp]), (__m512bh)w0);
      a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)_mm512_set1_epi32(xr[kp + 1]), (__m512bh)w1);
    }
  }
  if (kp < pairs) {
    const __m512i w0 = _mm512_loadu_si512(w + kp);
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(x + m * K);
      a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_set1_epi32(xr[kp]), (__m512bh)w0);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(a0[m], a1[m]));  // round to nearest even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy), (__m256i)r);
  }
}
#endif

// The widening path. NV vectors of W lanes cover a block's 16 outputs; piece v of a pair's 64 bytes holds
// outputs v*W.. as (even input, odd input) 32-bit pairs: the even one is the low half, widened by a shift, the
// odd one the high half, widened by a mask.
constexpr int NV = int(16 / W);

// Every entry of an MC x NV block of register sums set to `value` (zero, to start a sum).
template <typename V, int MC>
inline void fill(V (&a)[MC][NV], V value) {
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) a[m][v] = value;
}
#if defined(__AVX512F__)
inline void widen_pairs(const uint16_t* p, int v, vf& even, vf& odd) {
  const __m512i w = _mm512_loadu_si512(reinterpret_cast<const __m512i*>(p) + v);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))));
}
#elif defined(__AVX2__)
inline void widen_pairs(const uint16_t* p, int v, vf& even, vf& odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + v);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xFFFF0000u))));
}
#endif

template <int MC, typename X, typename Y>
inline void block_rows_widen(const X* x, int64_t K, const uint16_t* wb, Y* y, int64_t ldy) {
  // Few rows (batch-1 decoding): even and odd inputs sum into separate accumulators, so no FMA waits for
  // another; more rows: one accumulator each, their independent chains hide the latency.
  constexpr bool split = MC * NV <= 4;
  vf acc[MC][NV], acc_odd[MC][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[m][v] = acc_odd[m][v] = set1(0.0f);
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    prefetch_ahead(wb + kp * 32);
    vf even[NV], odd[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) widen_pairs(wb + kp * 32, v, even[v], odd[v]);
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const vf xe = set1(as_float(x[m * K + 2 * kp])), xo = set1(as_float(x[m * K + 2 * kp + 1]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        acc[m][v] = fmadd(even[v], xe, acc[m][v]);
        if (split)
          acc_odd[m][v] = fmadd(odd[v], xo, acc_odd[m][v]);
        else
          acc[m][v] = fmadd(odd[v], xo, acc[m][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store(y + m * ldy + v * W, split ? add(acc[m][v], acc_odd[m][v]) : acc[m][v]);
}

// Rows per register block: enough to reuse each widened weight pair, few enough to keep the sums in registers.
constexpr int ROWS = W == 16 ? 8 : 4;

// Calls block(rows, first row) over M rows: blocks of MAX rows, then one block of the 1..MAX-1 rows left (the
// row count a compile-time constant, so each block size keeps its sums in registers).
template <typename F, int... I>
inline void tail_block(int64_t n, int64_t m, F& block, std::integer_sequence<int, I...>) {
  ((n == I + 1 ? block(std::integral_constant<int, I + 1>{}, m) : void()), ...);
}

template <int MAX, typename F>
inline void in_blocks(int64_t M, F block) {
  int64_t m = 0;
  for (; m + MAX <= M; m += MAX) block(std::integral_constant<int, MAX>{}, m);
  tail_block(M - m, m, block, std::make_integer_sequence<int, MAX - 1>{});
}

template <typename X, typename Y>
void rows(int64_t M, const X* x, int64_t K, const uint16_t* wb, Y* y, int64_t ldy) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<X, uint16_t>::value && std::is_same<Y, uint16_t>::value) {
    in_blocks<8>(M, [&](auto mc, int64_t m) { block_rows_dp<decltype(mc)::value>(x + m * K, K, wb, y + m * ldy, ldy); });
    return;
  }
#endif
  in_blocks<ROWS>(M, [&](auto mc, int64_t m) {
    block_rows_widen<decltype(mc)::value>(x + m * K, K, wb, y + m * ldy, ldy);
  });
}

// The packed bf16 weights of E experts, [E, N/16, K/2, 16, 2]: `run` multiplies rows of x by the 16 outputs of
// block nb of expert e.
// x [T, K] widened to float32 for the kernels that multiply in float32, or nothing where x is float32 already.
template <typename X>
std::vector<float> widened(const X* x, int64_t T, int64_t K) {
  if constexpr (std::is_same<X, float>::value) return {};
  std::vector<float> xf(T * K);
  for (int64_t i = 0; i < T * K; ++i) xf[i] = as_float(x[i]);
  return xf;
}

// One or two bf16 rows are widened to float32 once per call (`prepare`) and run on the widening path: at batch 1
// it streams the weights ~1.2x faster than vdpbf16ps (measured 29.6 vs 24.1 GB/s on 2 AMX cores), whose
// per-instruction work is too small to keep the loads in flight; more rows reuse each weight load enough.
struct Bf16Weights {
  const uint16_t* p;
  int64_t N, K;
  template <typename X>
  std::vector<float> prepare(const X* x, int64_t T) const {
    return T > 2 ? std::vector<float>() : widened(x, T, K);
  }
  template <typename X, typename Y>
  void run(int64_t M, const X* x, int64_t e, int64_t nb, Y* y, int64_t ldy, const std::vector<float>& xf,
           int64_t r0) const {
    if (xf.empty())
      rows(M, x, K, p + (e * N + nb * 16) * K, y, ldy);
    else
      rows(M, xf.data() + r0 * K, K, p + (e * N + nb * 16) * K, y, ldy);
  }
};

// Rows per register block of the quantized kernels: their sums per row and vector must stay in registers.
constexpr int ROWS_Q = W == 16 ? 8 : 2;

// ---- float32 weights ----
// Layout: weight e [N, K] as [N/16][K][16] float32 (each input's 16 outputs in one 64-byte run). What float32
// checkpoints decode through: a tiny product costs ~4 us here against oneDNN's ~25 us fixed cost per call, and
// the routed experts run in one call. Even and odd inputs sum into separate accumulators at batch 1, as above.
template <int MC, typename X, typename Y>
inline void block_rows_f32(const X* x, int64_t K, const float* wb, Y* y, int64_t ldy) {
  constexpr bool split = MC * NV <= 4;
  vf acc[MC][NV], acc_odd[MC][NV];
  fill(acc, set1(0.0f));
  fill(acc_odd, set1(0.0f));
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    prefetch_ahead(wb + k * 16);
    prefetch_ahead(wb + k * 16 + 16);
    vf w0[NV], w1[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      w0[v] = load(wb + k * 16 + v * W);
      w1[v] = load(wb + k * 16 + 16 + v * W);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const vf xa = set1(as_float(x[m * K + k])), xb = set1(as_float(x[m * K + k + 1]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        acc[m][v] = fmadd(w0[v], xa, acc[m][v]);
        if (split)
          acc_odd[m][v] = fmadd(w1[v], xb, acc_odd[m][v]);
        else
          acc[m][v] = fmadd(w1[v], xb, acc[m][v]);
      }
    }
  }
  if (k < K) {
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const vf xa = set1(as_float(x[m * K + k]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[m][v] = fmadd(load(wb + k * 16 + v * W), xa, acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store(y + m * ldy + v * W, split ? add(acc[m][v], acc_odd[m][v]) : acc[m][v]);
}

// The packed float32 weights of E experts, [E, N/16, K, 16].
struct Float32Weights {
  const float* p;
  int64_t N, K;
  template <typename X>
  std::vector<float> prepare(const X*, int64_t) const { return {}; }
  template <typename X, typename Y>
  void run(int64_t M, const X* x, int64_t e, int64_t nb, Y* y, int64_t ldy, const std::vector<float>&,
           int64_t) const {
    const float* wb = p + (e * N + nb * 16) * K;
    in_blocks<ROWS>(M, [&](auto mc, int64_t m) {
      block_rows_f32<decltype(mc)::value>(x + m * K, K, wb, y + m * ldy, ldy);
    });
  }
};

// ---- int4 by integer dot products ----
// Widening nibbles to float32 costs more instructions than the bytes take to stream, so int4 multiplies in
// integers, as llama.cpp's q4_0 does: each group of `group` inputs of a row is quantized to int8 (scale =
// max |x| / 127), and 4 consecutive inputs of an output meet in one 32-bit lane of u8 x s8 products summed in
// int32 -- vpdpbusd with AVX512-VNNI, vpmaddubsw + vpmaddwd elsewhere (AVX2, AVX-512 without VNNI; u4 x s8 pairs
// cannot saturate 16 bits). The nibbles are the stored u = q + 8, so a group's sum is sum u xq - 8 sum xq; it is
// then scaled by the weight's scale times the activation's.
// Layout: weight e [N, K] as [N/16][K/8][16][4] bytes: for output j of a block and inputs 8b..8b+7, byte i holds
// u[8b + i] (low nibble) and u[8b + 4 + i] (high nibble). Scales as for int8: [N/16][K/group][16] float32.
struct Int4Acts {  // the activations, quantized per row and group
  std::vector<int8_t> q;
  std::vector<float> scale;  // [T, G]
  std::vector<int32_t> sum;  // [T, G]: sum of q over the group
};

#if defined(__AVX512F__)
using vi = __m512i;
inline vi load_vi(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vi low_nibbles(vi v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
inline vi high_nibbles(vi v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
inline vi bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
inline vi zero_vi() { return _mm512_setzero_si512(); }
inline vi add_vi(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vf group_value(vi acc, int32_t offset) {
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(offset)));
}
#if defined(__AVX512VNNI__)
inline vi dot4(vi acc, vi u, vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
inline vi dot4(vi acc, vi u, vi s) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
#endif
#elif defined(__AVX2__)
using vi = __m256i;
inline vi load_vi(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi low_nibbles(vi v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
inline vi high_nibbles(vi v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
inline vi bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline vi zero_vi() { return _mm256_setzero_si256(); }
inline vi add_vi(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vf group_value(vi acc, int32_t offset) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, _mm256_set1_epi32(offset)));
}
inline vi dot4(vi acc, vi u, vi s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// MC rows of quantized activations times one block of 16 outputs (NV vectors of W lanes).
template <int MC, typename Y>
inline void block_rows_q4(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, int64_t G,
                          const uint8_t* wb, const float* sb, int64_t group, Y* y, int64_t ldy) {
  vf acc[MC][NV];
  fill(acc, set1(0.0f));
  for (int64_t g = 0; g < G; ++g, sb += 16) {
    vi dots[MC][NV];
    fill(dots, zero_vi());
    for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
      prefetch_ahead(wb + k * 8);
      vi lo[NV], hi[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        const vi packed = load_vi(wb + k * 8 + v * W * 4);
        lo[v] = low_nibbles(packed);
        hi[v] = high_nibbles(packed);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MC; ++m) {
        const vi xa = bcast4(xq + m * K + k), xb = bcast4(xq + m * K + k + 4);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) dots[m][v] = dot4(dot4(dots[m][v], lo[v], xa), hi[v], xb);
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const vf scale = load(sb + v * W);
#pragma GCC unroll 8
      for (int m = 0; m < MC; ++m)
        acc[m][v] = fmadd(group_value(dots[m][v], 8 * xsum[m * G + g]), mul(scale, set1(xs[m * G + g])),
                          acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store(y + m * ldy + v * W, acc[m][v]);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
struct Int4Weights {
  const uint8_t* p;
  const float* scales;
  int64_t N, K, group;
  template <typename X>
  Int4Acts prepare(const X* x, int64_t T) const {
    const int64_t G = K / group;
    Int4Acts a{std::vector<int8_t>(T * K), std::vector<float>(T * G), std::vector<int32_t>(T * G)};
    at::parallel_for(0, T * G, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const X* xg = x + (i / G) * K + (i % G) * group;
        float amax = 0.f;
        for (int64_t d = 0; d < group; ++d) amax = std::max(amax, std::fabs(as_float(xg[d])));
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* q = a.q.data() + (i / G) * K + (i % G) * group;
        int32_t total = 0;
        for (int64_t d = 0; d < group; ++d) {
          q[d] = static_cast<int8_t>(std::nearbyint(as_float(xg[d]) * inv));
          total += q[d];
        }
        a.scale[i] = scale;
        a.sum[i] = total;
      }
    });
    return a;
  }
  template <typename X, typename Y>
  void run(int64_t M, const X*, int64_t e, int64_t nb, Y* y, int64_t ldy, const Int4Acts& a, int64_t r0) const {
    const int64_t G = K / group;
    const uint8_t* wb = p + (e * N + nb * 16) * K / 2;
    const float* sb = scales + (e * N + nb * 16) * G;
    in_blocks<ROWS_Q>(M, [&](auto mc, int64_t m) {
      const int64_t r = r0 + m;
      block_rows_q4<decltype(mc)::value>(a.q.data() + r * K, a.scale.data() + r * G, a.sum.data() + r * G, K, G,
                                         wb, sb, group, y + m * ldy, ldy);
    });
  }
};
#endif

// ---- weight-only quantized weights: int8, multiplied in 16-bit integer pairs ----
// Layout: weight e [N, K] as [N/16][K/2][16][2] int8 (the bf16 layout: 16 outputs x 2 inputs in 32 bytes);
// scales [N/16][K/group][16] float32, one per output and group of `group` inputs (group = K: per output
// channel). Each row of activations is quantized to int16 in chunks of up to Q8_CHUNK inputs inside a group
// (scale = max |x| / 32767: at most 1.5e-5 of the chunk's largest value off, far below the weights' own int8
// step), and 16 outputs x 2 inputs meet in one vpmaddwd (the int8 weights widened to int16, each pair summed in
// int32): half the instructions per weight byte of widening to float32 for FMAs, which held batch-1 decoding
// below the memory's rate (measured 22 GB/s against a 30 GB/s sum-read on 2 AMX cores). A chunk's int32 sums
// cannot overflow (256 x 127 x 32767 < 2^31); they are scaled into float32 once per chunk, by the weights'
// scale once per group.
constexpr int64_t Q8_CHUNK = 256;

#if defined(__AVX512F__) || defined(__AVX2__)
struct Int8Acts {  // the activations, quantized per row and chunk
  std::vector<int16_t> q;   // [T, K]
  std::vector<float> scale;  // [T, chunks per row]
};

#if defined(__AVX512F__)
inline vi madd_pairs(const uint8_t* p, int, vi xp) {  // 16 outputs x 2 inputs
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_madd_epi16(_mm512_cvtepi8_epi16(w), xp);
}
#else
inline vi madd_pairs(const uint8_t* p, int v, vi xp) {  // outputs 8v..8v+7 x 2 inputs
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v));
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(w), xp);
}
#endif

// MC rows of int16 activations times one block of 16 outputs -> y [MC][16] float32.
template <int MC>
inline void block_rows_q8(const int16_t* xq, const float* xs, int64_t K, int64_t G, int64_t cpg,
                          const uint8_t* wb, const float* sb, int64_t group, float* y) {
  vf acc[MC][NV];
  fill(acc, set1(0.0f));
  for (int64_t g = 0; g < G; ++g, sb += 16) {
    vf gacc[MC][NV];
    fill(gacc, set1(0.0f));
    for (int64_t c = 0; c < cpg; ++c) {
      const int64_t k0 = g * group + c * Q8_CHUNK, k1 = std::min(k0 + Q8_CHUNK, (g + 1) * group);
      vi dots[MC][NV];
      fill(dots, zero_vi());
      for (int64_t k = k0; k < k1; k += 2) {
        prefetch_ahead(wb + k * 16);
#pragma GCC unroll 8
        for (int m = 0; m < MC; ++m) {
          const vi xp = bcast4(reinterpret_cast<const int8_t*>(xq + m * K + k));  // inputs k, k + 1
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) dots[m][v] = add_vi(dots[m][v], madd_pairs(wb + k * 16, v, xp));
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MC; ++m) {
        const vf chunk_scale = set1(xs[m * G * cpg + g * cpg + c]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) gacc[m][v] = fmadd(group_value(dots[m][v], 0), chunk_scale, gacc[m][v]);
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const vf scale = load(sb + v * W);
#pragma GCC unroll 8
      for (int m = 0; m < MC; ++m) acc[m][v] = fmadd(gacc[m][v], scale, acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MC; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store(y + m * 16 + v * W, acc[m][v]);
}

// The packed int8 weights of E experts (layout above): `run` multiplies rows of x by block nb of expert e.
struct Int8Weights {
  const uint8_t* p;
  const float* scales;
  int64_t N, K, group;
  int64_t chunks_per_group() const { return (group + Q8_CHUNK - 1) / Q8_CHUNK; }
  template <typename X>
  Int8Acts prepare(const X* x, int64_t T) const {
    const int64_t G = K / group, cpg = chunks_per_group(), per_row = G * cpg;
    Int8Acts a{std::vector<int16_t>(T * K), std::vector<float>(T * per_row)};
    at::parallel_for(0, T * per_row, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / per_row, g = (i % per_row) / cpg, c = i % cpg;
        const int64_t k0 = g * group + c * Q8_CHUNK, k1 = std::min(k0 + Q8_CHUNK, (g + 1) * group);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(as_float(x[t * K + k])));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int64_t k = k0; k < k1; ++k)
          a.q[t * K + k] = static_cast<int16_t>(std::nearbyint(as_float(x[t * K + k]) * inv));
        a.scale[i] = amax / 32767.f;
      }
    });
    return a;
  }
  template <typename X, typename Y>
  void run(int64_t M, const X*, int64_t e, int64_t nb, Y* y, int64_t ldy, const Int8Acts& a, int64_t r0) const {
    const int64_t G = K / group, cpg = chunks_per_group();
    const uint8_t* wb = p + (e * N + nb * 16) * K;
    const float* sb = scales + (e * N + nb * 16) * G;
    in_blocks<ROWS_Q>(M, [&](auto mc, int64_t m) {
      constexpr int MC = decltype(mc)::value;
      const int64_t r = r0 + m;
      float out[MC * 16];
      block_rows_q8<MC>(a.q.data() + r * K, a.scale.data() + r * G * cpg, K, G, cpg, wb, sb, group, out);
      for (int i = 0; i < MC; ++i)
        for (int j = 0; j < 16; j += W) store(y + (m + i) * ldy + j, load(out + i * 16 + j));
    });
  }
};
#endif

// y [T, N] = rows off[e]..off[e+1] of x [T, K] times packed weight e, for every expert e with rows.
template <typename Wt, typename X, typename Y>
void grouped(const X* xp, const Wt& w, int64_t E, const int64_t* off, Y* yp) {
  const int64_t N = w.N, K = w.K;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);
  const int64_t blocks = N / 16, items = static_cast<int64_t>(active.size()) * blocks;
  const auto acts = w.prepare(xp, off[E]);  // the activations in the form the weights multiply (once per call)
  // Work items in memory order (expert, row block): each thread streams one contiguous stretch of weights.
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = active[i / blocks], nb = i % blocks, r0 = off[e];
      w.run(off[e + 1] - r0, xp + r0 * K, e, nb, yp + r0 * N + nb * 16, N, acts, r0);
    }
  });
}

// Calls f with a null pointer of x's storage type (bf16 -> uint16_t, float32 -> float).
template <typename F>
void dispatch(const torch::Tensor& x, F f, const char* what = "activations") {
  if (x.scalar_type() == at::kBFloat16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, what, " must be bf16 or float32");
    f(static_cast<float*>(nullptr));
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace

// Weights [E, N, K] (or [N, K]) -> the packed layout: bf16 [E, N/16, K/2, 16, 2], float32 [E, N/16, K, 16].
torch::Tensor pack(torch::Tensor w) {
  if (w.dim() == 2) w = w.unsqueeze(0);
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  if (w.scalar_type() == at::kFloat) {
    TORCH_CHECK(N % 16 == 0, "pack needs weights with rows divisible by 16");
    return w.reshape({E, N / 16, 16, K}).permute({0, 1, 3, 2}).contiguous();
  }
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && N % 16 == 0 && K % 2 == 0,
              "pack needs bf16 or float32 weights with rows divisible by 16 (bf16: an even input width)");
  return w.reshape({E, N / 16, 16, K / 2, 2}).permute({0, 1, 3, 2, 4}).contiguous();
}

namespace {
// Calls f with the weights view of a `pack`ed stack [E, ...] (bf16 or float32) of E weights [N, K].
template <typename F>
void with_packed(const torch::Tensor& w, int64_t N, int64_t K, F f) {
  TORCH_CHECK(w.is_contiguous() && w.numel() == w.size(0) * N * K, "packed weights do not match their shape");
  if (w.scalar_type() == at::kFloat) {
    f(Float32Weights{ptr<float>(w), N, K});
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "packed weights are bf16 or float32");
    f(Bf16Weights{ptr<uint16_t>(w), N, K});
  }
}
}  // namespace

// x [T, K] (bf16 or float32) with the rows of expert e at offsets[e]..offsets[e+1]; w packed [E, ...] ->
// y [T, N] in x's dtype.
torch::Tensor grouped_linear(torch::Tensor x, torch::Tensor w, torch::Tensor offsets, int64_t N) {
  x = x.contiguous();
  offsets = offsets.to(torch::kLong).contiguous();
  const int64_t T = x.size(0), K = x.size(1), E = w.size(0);
  TORCH_CHECK(offsets.numel() == E + 1, "offsets do not match the weights");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == T, "offsets must span the rows of x");
  auto y = torch::empty({T, N}, x.options());
  with_packed(w, N, K, [&](const auto& weights) {
    dispatch(x, [&](auto* tx) {
      using X = std::remove_pointer_t<decltype(tx)>;
      grouped(ptr<X>(x), weights, E, off, ptr<X>(y));
    });
  });
  return y;
}

// A routed-expert SwiGLU layer in one call: x [N, H] (bf16 or float32), routing weights [N, k] float32 and
// expert indices [N, k]; gate_up packed [E, 2I, H], down packed [E, H, I] -> sum over k of weight * expert(x),
// [N, H] in x's dtype. For bf16 x it rounds where the eager layer does (silu, its product with up, each
// expert's output, its routing weight); the k weighted outputs are summed in float32 and rounded once.
namespace {
template <typename Wt>
torch::Tensor moe_layer(torch::Tensor x, torch::Tensor weights, torch::Tensor indices, const Wt& gate_up,
                        const Wt& down, int64_t E, int64_t I) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "float32 routing weights");
  x = x.contiguous();
  weights = weights.contiguous();
  indices = indices.to(torch::kLong).contiguous();
  const int64_t N = x.size(0), H = x.size(1), k = indices.size(1), T = N * k;
  TORCH_CHECK(gate_up.K == H && gate_up.N == 2 * I && down.K == I && down.N == H, "expert weights do not match x");
  const int64_t* idx = indices.data_ptr<int64_t>();
  // Counting sort of the N*k (token, slot) pairs by expert, stable.
  std::vector<int64_t> off(E + 1, 0), pos(E), pair_of(T);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(idx[t] >= 0 && idx[t] < E, "expert index out of range");
    ++off[idx[t] + 1];
  }
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  for (int64_t e = 0; e < E; ++e) pos[e] = off[e];
  for (int64_t t = 0; t < T; ++t) pair_of[pos[idx[t]]++] = t;
  std::vector<int64_t> row_of(T);
  for (int64_t r = 0; r < T; ++r) row_of[pair_of[r]] = r;
  auto opts = x.options();
  auto xs = torch::empty({T, H}, opts), ys = torch::empty({T, H}, opts);
  auto gu = torch::empty({T, 2 * I}, opts);
  auto acc = torch::zeros({N, H}, x.options().dtype(at::kFloat));
  float* ap = acc.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  dispatch(x, [&](auto* tx) {
    using X = std::remove_pointer_t<decltype(tx)>;
    constexpr bool rounded = std::is_same<X, uint16_t>::value;
    X* xsp = ptr<X>(xs);
    const X* xp = ptr<X>(x);
    for (int64_t r = 0; r < T; ++r) std::memcpy(xsp + r * H, xp + (pair_of[r] / k) * H, H * sizeof(X));
    grouped(xsp, gate_up, E, off.data(), ptr<X>(gu));
    // ATen's vectorised silu and product, with the eager layer's roundings.
    auto h = at::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));
    grouped(ptr<X>(h), down, E, off.data(), ptr<X>(ys));
    const X* ysp = ptr<X>(ys);
    at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t t = n * k + j, r = row_of[t];
          if constexpr (rounded) {
            const float w = static_cast<float>(at::BFloat16(wp[t]));
            for (int64_t d = 0; d < H; ++d)
              ap[n * H + d] += static_cast<float>(at::BFloat16(as_float(ysp[r * H + d]) * w));
          } else {
            const vf w = set1(wp[t]);
            for_lanes(H, [&](int64_t d, int64_t m) {
              store(ap + n * H + d, fmadd(w, load(ysp + r * H + d, m), load(ap + n * H + d, m)), m);
            });
          }
        }
      }
    });
  });
  return x.scalar_type() == at::kFloat ? acc : acc.to(x.scalar_type());
}
}  // namespace

// The shared expert of a DeepSeekMoE layer for every row of x [N, H]: gate_up packed [1, 2I, H], down [1, H, I]
// -> [N, H] in x's dtype, with the eager MLP's roundings (the same products, silu and product rounded).
torch::Tensor shared_expert(const torch::Tensor& x, const torch::Tensor& gate_up, const torch::Tensor& down,
                            int64_t I) {
  const int64_t N = x.size(0), H = x.size(1);
  const int64_t off[2] = {0, N};
  auto gu = torch::empty({N, 2 * I}, x.options()), y = torch::empty({N, H}, x.options());
  torch::Tensor h;
  dispatch(x, [&](auto* tx) {
    using X = std::remove_pointer_t<decltype(tx)>;
    with_packed(gate_up, 2 * I, H, [&](const auto& w) { grouped(ptr<X>(x), w, 1, off, ptr<X>(gu)); });
    h = at::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));
    with_packed(down, H, I, [&](const auto& w) { grouped(ptr<X>(h), w, 1, off, ptr<X>(y)); });
  });
  return y;
}

// With `shared_gate_up` / `shared_down` (the layer's shared expert, intermediate shared_I) the layer's output
// includes it: routed sum rounded to x's dtype, then the shared expert added in x's dtype, as the eager layer
// adds its two halves.
torch::Tensor moe_swiglu(torch::Tensor x, torch::Tensor weights, torch::Tensor indices, torch::Tensor gate_up,
                         torch::Tensor down, int64_t I, c10::optional<torch::Tensor> shared_gate_up,
                         c10::optional<torch::Tensor> shared_down, int64_t shared_I) {
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "both expert stacks are packed in one dtype");
  TORCH_CHECK(shared_gate_up.has_value() == shared_down.has_value(), "the shared expert needs gate_up and down");
  const int64_t E = gate_up.size(0), H = x.size(1);
  torch::Tensor out;
  with_packed(gate_up, 2 * I, H, [&](const auto& gu) {
    with_packed(down, H, I, [&](const auto& dn) {
      if constexpr (std::is_same<std::decay_t<decltype(gu)>, std::decay_t<decltype(dn)>>::value)
        out = moe_layer(x, weights, indices, gu, dn, E, I);
    });
  });
  if (shared_gate_up.has_value()) out.add_(shared_expert(x.contiguous(), *shared_gate_up, *shared_down, shared_I));
  return out;
}

// Calls f with the QuantWeights view of packed quantized weights [E, ...] (uint8) and scales [E, N/16, G, 16].
template <typename F>
void with_quant(const torch::Tensor& w, const torch::Tensor& scales, int64_t N, int64_t K, int64_t bits, F f) {
  TORCH_CHECK(w.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat && w.is_contiguous() &&
                  scales.is_contiguous(), "quantized weights are packed uint8 with float32 scales");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const int64_t E = w.size(0), G = scales.numel() / (E * N);
  TORCH_CHECK(N % 16 == 0 && G > 0 && K % G == 0 && (K / G) % 2 == 0 && w.numel() == E * N * K * bits / 8 &&
                  scales.numel() == E * N * G, "quantized weights do not match their shape");
  const int64_t group = K / G;
  TORCH_CHECK(bits == 8 || group % 8 == 0, "int4 groups must be a multiple of 8 inputs");
#if defined(__AVX512F__) || defined(__AVX2__)
  if (bits == 8)
    f(Int8Weights{ptr<uint8_t>(w), ptr<float>(scales), N, K, group});
  else
    f(Int4Weights{ptr<uint8_t>(w), ptr<float>(scales), N, K, group});
#else
  TORCH_CHECK(false, "quantized weights need an AVX2 or AVX-512 build");
#endif
}

// grouped_linear over quantized weights: x [T, K] (bf16 or float32), rows of expert e at offsets[e]..[e+1].
torch::Tensor grouped_linear_q(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor offsets,
                               int64_t N, int64_t bits) {
  x = x.contiguous();
  offsets = offsets.to(torch::kLong).contiguous();
  const int64_t T = x.size(0), K = x.size(1), E = w.size(0);
  TORCH_CHECK(offsets.numel() == E + 1, "offsets do not match the weights");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == T, "offsets must span the rows of x");
  auto y = torch::empty({T, N}, x.options());
  with_quant(w, scales, N, K, bits, [&](const auto& weights) {
    dispatch(x, [&](auto* tx) {
      using X = std::remove_pointer_t<decltype(tx)>;
      grouped(ptr<X>(x), weights, E, off, ptr<X>(y));
    });
  });
  return y;
}

// moe_swiglu over quantized experts (both stacks of the same bit width).
torch::Tensor moe_swiglu_q(torch::Tensor x, torch::Tensor weights, torch::Tensor indices, torch::Tensor gate_up,
                           torch::Tensor gate_up_scales, torch::Tensor down, torch::Tensor down_scales, int64_t I,
                           int64_t bits) {
  const int64_t E = gate_up.size(0), H = x.size(1);
  torch::Tensor out;
  with_quant(gate_up, gate_up_scales, 2 * I, H, bits, [&](const auto& gu) {
    with_quant(down, down_scales, H, I, bits, [&](const auto& dn) {
      if constexpr (std::is_same<std::decay_t<decltype(gu)>, std::decay_t<decltype(dn)>>::value)
        out = moe_layer(x, weights, indices, gu, dn, E, I);
    });
  });
  return out;
}

// RMSNorm of rows in one pass. bf16 x: transformers' rounding (normalise in float32, round to bf16, then
// multiply by the weight, one more rounding); float32 x: w * x * rsqrt(mean(x^2) + eps) in float32, the weight
// bf16 or float32. Eager PyTorch spends ~9 small ops on the bf16 case per call.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  x = x.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  TORCH_CHECK(weight.numel() == D && weight.is_contiguous(), "weight must match the last dimension");
  auto y = torch::empty_like(x);
  dispatch(x, [&](auto* tx) {
    using X = std::remove_pointer_t<decltype(tx)>;
    dispatch(weight, [&](auto* tw) {
      using Wt = std::remove_pointer_t<decltype(tw)>;
      const X* xp = ptr<X>(x);
      const Wt* wp = ptr<Wt>(weight);
      X* yp = ptr<X>(y);
      at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        std::vector<uint16_t> normed(D);
        for (int64_t r = r0; r < r1; ++r) {
          const X* xr = xp + r * D;
          vf ss = set1(0.0f);
          for_lanes(D, [&](int64_t d, int64_t n) { const vf v = load(xr + d, n); ss = fmadd(v, v, ss); });
          const vf inv = set1(1.f / std::sqrt(sum(ss) / static_cast<float>(D) + static_cast<float>(eps)));
          for_lanes(D, [&](int64_t d, int64_t n) {
            vf v = mul(load(xr + d, n), inv);
            if constexpr (std::is_same<X, uint16_t>::value) {
              store(normed.data() + d, v, n);
              v = load(normed.data() + d, n);
            }
            store(yp + r * D + d, mul(load(wp + d, n), v), n);
          });
        }
      });
    });
  });
  return y;
}

// Expert selection of DeepSeek's routers for rows of float32 choice scores [N, E] (scores, plus the balancing
// bias for V3): keep the `topk_group` best of `n_group` groups (group score: 1 = sum of its top 2, as V3's
// noaux_tc; 2 = its max, as V2's group_limited_greedy; 0 = no groups), then the `top_k` best experts in them.
// Returns indices [N, top_k], best first; ties go to the lower index. One call instead of ~10 small ops.
torch::Tensor select_experts(torch::Tensor choice, int64_t n_group, int64_t topk_group, int64_t top_k,
                             int64_t rule) {
  TORCH_CHECK(choice.scalar_type() == at::kFloat && choice.dim() == 2, "float32 [N, E] scores");
  choice = choice.contiguous();
  const int64_t N = choice.size(0), E = choice.size(1);
  if (rule == 0) n_group = topk_group = 1;
  const int64_t per = E / n_group;
  TORCH_CHECK(per * n_group == E && topk_group <= n_group && top_k <= topk_group * per, "bad routing sizes");
  auto out = torch::empty({N, top_k}, choice.options().dtype(torch::kLong));
  const float* cp = choice.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const float* row = cp + n * E;
    std::vector<float> group_score(n_group);
    for (int64_t g = 0; g < n_group; ++g) {
      float best = -INFINITY, second = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        if (row[e] > best) {
          second = best;
          best = row[e];
        } else if (row[e] > second) {
          second = row[e];
        }
      }
      group_score[g] = rule == 1 ? best + (per > 1 ? second : 0.f) : best;
    }
    std::vector<char> keep(n_group, 0);
    for (int64_t j = 0; j < topk_group; ++j) {
      int64_t arg = -1;
      for (int64_t g = 0; g < n_group; ++g)
        if (!keep[g] && (arg < 0 || group_score[g] > group_score[arg])) arg = g;
      keep[arg] = 1;
    }
    std::vector<char> taken(E, 0);
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t arg = -1;
      for (int64_t e = 0; e < E; ++e)
        if (keep[e / per] && !taken[e] && (arg < 0 || row[e] > row[arg])) arg = e;
      taken[arg] = 1;
      op[n * top_k + j] = arg;
    }
  }
  return out;
}

namespace {

// Scores of one cached row against HG heads: each W-wide chunk of the row widened once for all of them.
template <int HG, typename C>
inline void row_scores(const float* qh, int64_t hn, int64_t D, const C* row, float scale, float* out, int64_t S) {
  vf acc[HG];
#pragma GCC unroll 8
  for (int j = 0; j < HG; ++j) acc[j] = set1(0.0f);
  for_lanes(D, [&](int64_t d, int64_t n) {
    const vf k = load(row + d, n);
#pragma GCC unroll 8
    for (int j = 0; j < HG; ++j)
      if (j < hn) acc[j] = fmadd(load(qh + j * D + d, n), k, acc[j]);
  });
  for (int j = 0; j < hn; ++j) out[j * S] = sum(acc[j]) * scale;
}

// out[h, chunks c0.. c0+CG) = sum over the cached rows of p[h, s] * row_s, for HG heads (hn live).
template <int HG, int CG, typename C>
inline void rows_weighted(const float* pp, int64_t S, int64_t len, const C* cp, const int64_t* slots, int64_t D,
                          int64_t L, int64_t c0, int64_t hn, float* outp) {
  vf acc[HG][CG];
#pragma GCC unroll 8
  for (int j = 0; j < HG; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) acc[j][c] = set1(0.0f);
  for (int64_t s = 0; s < len; ++s) {
    const C* row = cp + slots[s] * D;
    vf kv[CG];
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) {
      const int64_t at = (c0 + c) * W;
      kv[c] = at < L ? load(row + at, std::min<int64_t>(W, L - at)) : set1(0.0f);
    }
#pragma GCC unroll 8
    for (int j = 0; j < HG; ++j) {
      const vf p = set1(j < hn ? pp[j * S + s] : 0.0f);
#pragma GCC unroll 4
      for (int c = 0; c < CG; ++c) acc[j][c] = fmadd(p, kv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < hn; ++j)
    for (int c = 0; c < CG; ++c) {
      const int64_t at = (c0 + c) * W;
      if (at < L) store(outp + j * L + at, acc[j][c], std::min<int64_t>(W, L - at));
    }
}

}  // namespace

// MLA decode attention from the paged latent cache for float32 queries, on every ISA the kernels build for
// (AVX2, AVX-512, scalar): q [B, H, D] float32 (the absorbed query: latent L + rope), cache [slots, D] float32
// or bf16 (widened in registers), slots [B, S] (padded), lengths [B] -> [B, H, L] float32. What the float32
// engine did in ~6 ops per layer (gather the context, widen it, baddbmm, softmax, bmm, slice) in one call
// that reads the context rows in place.
torch::Tensor mla_decode_attention_f32(torch::Tensor q, torch::Tensor cache, torch::Tensor slots,
                                       torch::Tensor lengths, double scale, int64_t L) {
  TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 queries");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 2, "cache must be a contiguous [slots, width] tensor");
  q = q.contiguous();
  slots = slots.to(torch::kLong).contiguous();
  lengths = lengths.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = slots.size(1);
  TORCH_CHECK(cache.size(1) == D && L <= D, "q and the cache rows must have the same width");
  const float* qp = q.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  auto scores = torch::full({B, H, S}, -INFINITY, q.options());
  float* scp = scores.data_ptr<float>();
  auto out = torch::empty({B, H, L}, q.options());
  float* outp = out.data_ptr<float>();
  constexpr int HG = 4, CG = W == 1 ? 8 : 2;
  const int64_t head_groups = (H + HG - 1) / HG, chunks = (L + W - 1) / W;
  const float sc = static_cast<float>(scale);
  auto run = [&](auto* tc) {
    using C = std::remove_pointer_t<decltype(tc)>;
    const C* cp = ptr<C>(cache);
    at::parallel_for(0, B * head_groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / head_groups, h0 = (i % head_groups) * HG, hn = std::min<int64_t>(HG, H - h0);
        for (int64_t s = 0; s < lp[b]; ++s)
          row_scores<HG>(qp + (b * H + h0) * D, hn, D, cp + sp[b * S + s] * D, sc, scp + (b * H + h0) * S + s, S);
      }
    });
    auto probs = at::_softmax(scores, -1, false);
    const float* pp = probs.data_ptr<float>();
    at::parallel_for(0, B * head_groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / head_groups, h0 = (i % head_groups) * HG, hn = std::min<int64_t>(HG, H - h0);
        for (int64_t c0 = 0; c0 < chunks; c0 += CG)
          rows_weighted<HG, CG>(pp + (b * H + h0) * S, S, lp[b], cp, sp + b * S, D, L, c0, hn,
                                outp + (b * H + h0) * L);
      }
    });
  };
  dispatch(cache, run, "the cache");
  return out;
}

// GQA (Llama / Qwen2) decode attention read in place from the paged K/V cache, on every ISA the kernels build
// for: q [B, H, D] float32 (rotated), cache [slots, 2, Hkv, D] float32 or bf16 (widened in registers), slots
// [B, S] (padded), lengths [B] -> [B, H, D] float32. Query head i reads KV head i / (H / Hkv), as torch's
// enable_gqa does. Replaces the gather of the context, its float32 copy and ~10 small ops per layer.
torch::Tensor gqa_decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor slots, torch::Tensor lengths,
                                   double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3, "float32 queries [B, heads, head_dim]");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && cache.size(1) == 2,
              "cache must be a contiguous [slots, 2, kv_heads, head_dim] tensor");
  q = q.contiguous();
  slots = slots.to(torch::kLong).contiguous();
  lengths = lengths.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = slots.size(1), Hkv = cache.size(2);
  TORCH_CHECK(cache.size(3) == D && H % Hkv == 0 && slots.size(0) == B && lengths.numel() == B,
              "q, the cache, slots and lengths do not match");
  const int64_t G = H / Hkv;
  const int64_t* lp = lengths.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t n_slots = cache.size(0);
  // Each slot's first row in the cache seen as [slots * 2 * Hkv, D]: K of head h is row + h, V row + Hkv + h.
  std::vector<int64_t> rows(B * S, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= S, "lengths must be in 1..slots per sequence");
    for (int64_t s = 0; s < lp[b]; ++s) {
      TORCH_CHECK(sp[b * S + s] >= 0 && sp[b * S + s] < n_slots, "slot out of range");
      rows[b * S + s] = sp[b * S + s] * 2 * Hkv;
    }
  }
  const float* qp = q.data_ptr<float>();
  auto scores = torch::full({B, H, S}, -INFINITY, q.options());
  float* scp = scores.data_ptr<float>();
  auto out = torch::empty({B, H, D}, q.options());
  float* outp = out.data_ptr<float>();
  constexpr int HG = 8, CG = W == 1 ? 8 : (W == 8 ? 1 : 2);
  const int64_t groups = (G + HG - 1) / HG, items = B * Hkv * groups, chunks = (D + W - 1) / W;
  const float sc = static_cast<float>(scale);
  auto run = [&](auto* tc) {
    using C = std::remove_pointer_t<decltype(tc)>;
    const C* cp = ptr<C>(cache);
    auto item = [&](int64_t i, int64_t& b, int64_t& h, int64_t& hq, int64_t& gn) {
      b = i / (Hkv * groups);
      h = (i / groups) % Hkv;
      const int64_t g0 = (i % groups) * HG;
      hq = h * G + g0;
      gn = std::min<int64_t>(HG, G - g0);
    };
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        int64_t b, h, hq, gn;
        item(i, b, h, hq, gn);
        for (int64_t s = 0; s < lp[b]; ++s)
          row_scores<HG>(qp + (b * H + hq) * D, gn, D, cp + (rows[b * S + s] + h) * D, sc,
                         scp + (b * H + hq) * S + s, S);
      }
    });
    auto probs = at::_softmax(scores, -1, false);
    const float* pp = probs.data_ptr<float>();
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        int64_t b, h, hq, gn;
        item(i, b, h, hq, gn);
        for (int64_t c0 = 0; c0 < chunks; c0 += CG)
          rows_weighted<HG, CG>(pp + (b * H + hq) * S, S, lp[b], cp + (Hkv + h) * D, rows.data() + b * S, D, D, c0,
                                gn, outp + (b * H + hq) * D);
      }
    });
  };
  dispatch(cache, run, "the cache");
  return out;
}

namespace {
// v as x's dtype holds it: bf16 rounds to nearest even (what each eager bf16 op does to its result).
template <typename X>
inline vf rounded(vf v) {
  if constexpr (std::is_same<X, float>::value) {
    return v;
  } else {
    uint16_t t[W];
    store(t, v);
    return load(t);
  }
}
}  // namespace

// DeepSeek's router in one call: float32 logits of x [N, H] (bf16 or float32) by the router's float32 weight
// [E, H], scores (sigmoid, or softmax), the choice scores (+ the balancing bias where given), select_experts,
// and the chosen experts' scores, normalised where `normalize`, times `scaling` -> (weights [N, k] float32,
// indices [N, k]). The eager Router's ATen ops one for one, so the same bits, without ~9 Python-level calls.
std::tuple<torch::Tensor, torch::Tensor> route(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                                               bool sigmoid, int64_t n_group, int64_t topk_group, int64_t top_k,
                                               int64_t rule, bool normalize, double scaling) {
  auto logits = at::linear(x.to(at::kFloat), weight);
  auto scores = sigmoid ? logits.sigmoid() : logits.softmax(-1);
  auto indices = select_experts(bias.has_value() ? scores + *bias : scores, n_group, topk_group, top_k, rule);
  auto weights = scores.gather(1, indices);
  if (normalize) weights = weights / (weights.sum(-1, true) + 1e-20);
  return {weights * scaling, indices};
}

namespace {
// RoPE of x [N, heads, D] by cos, sin [N, D/2] float32 -> a new tensor in x's dtype: rotate(x row, y row, cos
// row, sin row, D / 2) for each position and head. One call instead of ~10 small ops per rotated tensor.
template <typename F>
torch::Tensor rope_rows(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, F rotate) {
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(x.dim() == 3 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "x [N, heads, head_dim] with float32 cos and sin");
  const int64_t N = x.size(0), Hh = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.numel() == N * half && sin.numel() == N * half, "cos and sin must be [N, head_dim/2]");
  auto y = torch::empty_like(x);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  dispatch(x, [&](auto* tx) {
    using X = std::remove_pointer_t<decltype(tx)>;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < Hh; ++h)
        rotate(ptr<X>(x) + (n * Hh + h) * D, ptr<X>(y) + (n * Hh + h) * D, cp + n * half, sp + n * half, half);
  });
  return y;
}

inline float stored(float v, float) { return v; }
inline uint16_t stored(float v, uint16_t) { return to_bf16_scalar(v); }
}  // namespace

// Half-split RoPE (Llama / Qwen2): [x1 c - x2 s, x2 c + x1 s] with the eager roundings (bf16: cos and sin
// rounded, each product and each sum rounded).
torch::Tensor rope_half(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  return rope_rows(x, cos, sin, [](const auto* xr, auto* yr, const float* c_row, const float* s_row, int64_t half) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xr)>>;
    for_lanes(half, [&](int64_t d, int64_t m) {
      const vf c = rounded<X>(load(c_row + d, m)), s = rounded<X>(load(s_row + d, m));
      const vf x1 = load(xr + d, m), x2 = load(xr + half + d, m);
      store(yr + d, rounded<X>(sub(rounded<X>(mul(x1, c)), rounded<X>(mul(x2, s)))), m);
      store(yr + half + d, rounded<X>(add(rounded<X>(mul(x2, c)), rounded<X>(mul(x1, s)))), m);
    });
  });
}

// Interleaved RoPE (DeepSeek's MLA): each pair (a, b) at 2i, 2i + 1 is the complex number a + ib times
// cos + i sin, in float32, rounded once to x's dtype -- the eager complex multiply's arithmetic. The rotated
// dims are few (MLA's 64 per head), so plain scalar code.
torch::Tensor rope_interleaved(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  return rope_rows(x, cos, sin, [](const auto* xr, auto* yr, const float* c_row, const float* s_row, int64_t half) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xr)>>;
    for (int64_t i = 0; i < half; ++i) {
      const float a = as_float(xr[2 * i]), b = as_float(xr[2 * i + 1]), c = c_row[i], s = s_row[i];
      yr[2 * i] = stored(a * c - b * s, X{});
      yr[2 * i + 1] = stored(a * s + b * c, X{});
    }
  });
}

#if defined(__AVX512BF16__)
namespace {

inline __m512 load_bf16(const uint16_t* p, __mmask16 m = 0xFFFF) {  // up to 16 bf16 -> float32
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);  // bf16 is float32's upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __mmask16 tail_mask(int64_t width, int64_t c) {  // lanes of chunk c (16 wide) inside `width`
  const int64_t left = width - c * 16;
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

}  // namespace

// In place: r[i] (16 rows of 16 32-bit values) becomes its transpose, r[j] lane i = old r[i] lane j.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // within each 128-bit lane: 4 x 4 blocks transposed
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // then the 128-bit lanes across the four groups of rows
    t[k] = _mm512_shuffle_i32x4(u[k], u[k + 4], 0x88);
    t[k + 4] = _mm512_shuffle_i32x4(u[k], u[k + 4], 0xdd);
    t[k + 8] = _mm512_shuffle_i32x4(u[k + 8], u[k + 12], 0x88);
    t[k + 12] = _mm512_shuffle_i32x4(u[k + 8], u[k + 12], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
    r[k + 4] = _mm512_shuffle_i32x4(t[k + 4], t[k + 12], 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    r[k + 12] = _mm512_shuffle_i32x4(t[k + 4], t[k + 12], 0xdd);
  }
}

// Scores of one block of up to 16 cached rows (`rows`: their first bf16 pairs; n of them) against HN query heads.
// Each row's next 16 column pairs are one cache line; 16 such lines are loaded and transposed so that a register
// holds one column pair of all 16 rows (each lane one row: no horizontal sums), exactly vdpbf16ps's operand, and
// each head's pair is broadcast against it, the HN accumulators staying in registers. Products of bf16 values
// are exact in float32. (A 32-bit gather per column pair does the same 1.3-1.4x slower: gathers are slow here.)
template <int HN>
inline void score_block(const int32_t* qh, int64_t pairs, const int32_t* const* rows, int64_t n, float scale,
                        float* out, int64_t S) {
  __m512 acc[HN];
#pragma GCC unroll 16
  for (int j = 0; j < HN; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < pairs; c += 16) {
    const int64_t width = std::min<int64_t>(16, pairs - c);
    const __mmask16 m = tail_mask(width, 0);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_maskz_loadu_epi32(m, rows[i] + c) : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t p = 0; p < width; ++p) {
#pragma GCC unroll 16
      for (int j = 0; j < HN; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi32(qh[j * pairs + c + p]), (__m512bh)r[p]);
    }
  }
  const __mmask16 live = tail_mask(n, 0);
#pragma GCC unroll 16
  for (int j = 0; j < HN; ++j) _mm512_mask_storeu_ps(out + j * S, live, _mm512_mul_ps(acc[j], _mm512_set1_ps(scale)));
}

template <int... N>
inline void score_block_for(int64_t hn, std::integer_sequence<int, N...>, const int32_t* qh, int64_t pairs,
                            const int32_t* const* rows, int64_t n, float scale, float* out, int64_t S) {
  ((hn == N + 1 ? score_block<N + 1>(qh, pairs, rows, n, scale, out, S) : void()), ...);
}

// out[h] += sum over the cached rows of p[h, s] * k_s[:L] for HG heads and CG 16-column chunks starting at
// chunk c0: each cached chunk converted once for the HG heads.
template <int HG, int CG>
inline void weighted_sum(const float* pp, int64_t S, int64_t len, const uint16_t* cp, const int64_t* slots, int64_t D,
                         int64_t L, int64_t c0, int64_t hn, int64_t cn, float* outp) {
  __m512 acc[HG][CG];
#pragma GCC unroll 8
  for (int j = 0; j < HG; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < len; ++s) {
    const uint16_t* k = cp + slots[s] * D;
    __m512 kv[CG];
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) kv[c] = c < cn ? load_bf16(k + (c0 + c) * 16, tail_mask(L, c0 + c)) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j < HG; ++j) {
      const __m512 p = _mm512_set1_ps(j < hn ? pp[j * S + s] : 0.0f);
#pragma GCC unroll 4
      for (int c = 0; c < CG; ++c) acc[j][c] = _mm512_fmadd_ps(p, kv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < hn; ++j)
    for (int c = 0; c < cn; ++c)
      _mm512_mask_storeu_ps(outp + j * L + (c0 + c) * 16, tail_mask(L, c0 + c), acc[j][c]);
}

// MLA decode attention straight from the paged latent cache: q [B, H, D] bf16 (D = latent L + rope width, the
// absorbed query), cache [slots, D] bf16, slots [B, S] (padded), lengths [B] -> [B, H, L] float32,
// softmax(q . k * scale) summed over the latent columns of k. The keys are read in place, never gathered
// or converted to float32 copies; scores and sums are float32.
torch::Tensor mla_decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor slots,
                                   torch::Tensor lengths, double scale, int64_t L) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && cache.scalar_type() == at::kBFloat16, "bf16 q and cache");
  q = q.contiguous();
  slots = slots.to(torch::kLong).contiguous();
  lengths = lengths.to(torch::kLong).contiguous();
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 2, "cache must be a contiguous [slots, width] tensor");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = slots.size(1);
  TORCH_CHECK(cache.size(1) == D && L <= D, "q and the cache rows must have the same width");
  TORCH_CHECK(D % 2 == 0, "cache rows must have an even width");
  const auto* qp = reinterpret_cast<const int32_t*>(q.data_ptr());  // bf16 pairs
  const auto* cp = reinterpret_cast<const uint16_t*>(cache.data_ptr());
  const auto* cw = reinterpret_cast<const int32_t*>(cache.data_ptr());  // the cache as 32-bit column pairs
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  auto scores = torch::full({B, H, S}, -INFINITY, q.options().dtype(at::kFloat));
  float* scp = scores.data_ptr<float>();
  const int64_t blocks = (S + 15) / 16;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * blocks, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, s0 = (i % blocks) * 16;
      if (s0 >= lp[b]) continue;
      const int64_t n = std::min<int64_t>(16, lp[b] - s0);
      const int32_t* rows[16];
      for (int64_t r = 0; r < n; ++r) rows[r] = cw + sp[b * S + s0 + r] * (D / 2);
      for (int64_t h0 = 0; h0 < H; h0 += 16)
        score_block_for(std::min<int64_t>(16, H - h0), std::make_integer_sequence<int, 16>{},
                        qp + (b * H + h0) * (D / 2), D / 2, rows, n, sc, scp + (b * H + h0) * S + s0, S);
    }
  });
  auto probs = at::_softmax(scores, -1, false);
  const float* pp = probs.data_ptr<float>();
  auto out = torch::empty({B, H, L}, q.options().dtype(at::kFloat));
  float* outp = out.data_ptr<float>();
  // Accumulators in registers: head groups that divide the heads (8 x 3 chunks, 6 x 4, else 4 x 4). (bf16
  // probabilities on vdpbf16ps measured 1.5x faster for 12 heads, 1.3x slower for 4, and cost float32 accuracy:
  // not taken.)
  const int64_t HG = H % 8 == 0 ? 8 : H % 6 == 0 ? 6 : 4, CG = HG == 8 ? 3 : 4;
  const int64_t chunks = (L + 15) / 16, head_groups = (H + HG - 1) / HG;
  at::parallel_for(0, B * head_groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / head_groups, h0 = (i % head_groups) * HG, hn = std::min<int64_t>(HG, H - h0);
      for (int64_t c0 = 0; c0 < chunks; c0 += CG) {
        const int64_t cn = std::min<int64_t>(CG, chunks - c0);
        const float* ph = pp + (b * H + h0) * S;
        float* oh = outp + (b * H + h0) * L;
        if (HG == 8)
          weighted_sum<8, 3>(ph, S, lp[b], cp, sp + b * S, D, L, c0, hn, cn, oh);
        else if (HG == 6)
          weighted_sum<6, 4>(ph, S, lp[b], cp, sp + b * S, D, L, c0, hn, cn, oh);
        else
          weighted_sum<4, 4>(ph, S, lp[b], cp, sp + b * S, D, L, c0, hn, cn, oh);
      }
    }
  });
  return out;
}

#endif  // __AVX512BF16__

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = simd::kIsa;
#if defined(__AVX512BF16__)
  m.attr("native_bf16") = true;
  m.def("mla_decode_attention", &mla_decode_attention);
#else
  m.attr("native_bf16") = false;
#endif
  m.def("mla_decode_attention_f32", &mla_decode_attention_f32);
  m.def("gqa_decode_attention", &gqa_decode_attention);
  m.def("rope_half", &rope_half);
  m.def("rope_interleaved", &rope_interleaved);
  m.def("route", &route);
  m.def("rms_norm", &rms_norm);
  m.def("pack", &pack);
  m.def("grouped_linear", &grouped_linear);
  m.def("moe_swiglu", &moe_swiglu);
  m.def("grouped_linear_q", &grouped_linear_q);
  m.def("moe_swiglu_q", &moe_swiglu_q);
}
