// The vector layer nanoseek's CPU kernels are written against: `vf` holds W float32 lanes, `n` of them (<= W)
// live at a tail. One implementation per ISA the kernels are compiled for (model/kernels/build.py passes the
// flags): 16 lanes of AVX-512, 8 lanes of AVX2 + FMA, or one lane of plain C++ (arm64 and anything else). GCC
// does not vectorise the bf16 bit casts or expf by itself, hence by hand.
// bf16 is handled as raw 16-bit words (float32's upper half); every bf16 store rounds to nearest even, as torch
// does, and NaN stays NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace simd {

inline float bf16_scalar(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t to_bf16_scalar(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return std::isnan(v) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
constexpr int64_t W = 16;
using vf = __m512;
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline vf load(const float* p, int64_t n = W) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline vf load(const uint16_t* p, int64_t n = W) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store(float* p, vf v, int64_t n = W) { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline void store(uint16_t* p, vf v, int64_t n = W) {
#if defined(__AVX512BF16__)
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_mask_storeu_epi16(p, lanes(n), h);
}
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf keep(vf a, int64_t n) { return _mm512_maskz_mov_ps(lanes(n), a); }  // dead lanes -> 0
inline vf keep_or(vf a, int64_t n, float fill) { return _mm512_mask_mov_ps(set1(fill), lanes(n), a); }
inline float sum(vf a) { return _mm512_reduce_add_ps(a); }
inline float hmax(vf a) { return _mm512_reduce_max_ps(a); }
inline float first(vf a) { return _mm512_cvtss_f32(a); }
inline vf round_nearest(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf times_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }

#elif defined(__AVX2__)
constexpr const char* kIsa = "avx2";
constexpr int64_t W = 8;
using vf = __m256;
// AVX2 has no mask registers: tails go through a small stack buffer (they are at most one vector per row).
inline vf load(const float* p, int64_t n = W) {
  if (n >= W) return _mm256_loadu_ps(p);
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, sizeof(float) * n);
  return _mm256_load_ps(t);
}
inline vf widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline vf load(const uint16_t* p, int64_t n = W) {
  if (n >= W) return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, sizeof(uint16_t) * n);
  return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}
inline void store(float* p, vf v, int64_t n = W) {
  if (n >= W) return _mm256_storeu_ps(p, v);
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::memcpy(p, t, sizeof(float) * n);
}
inline __m128i narrow(vf v) {  // 8 floats -> 8 bf16, round to nearest even, NaN kept
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // Pack the low 16 bits of the 8 lanes (values < 2^16, so unsigned saturation keeps them exact).
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store(uint16_t* p, vf v, int64_t n = W) {
  const __m128i h = narrow(v);
  if (n >= W) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t t[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
  std::memcpy(p, t, sizeof(uint16_t) * n);
}
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf live(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, 8))), idx));
}
inline vf keep(vf a, int64_t n) { return n >= W ? a : _mm256_and_ps(a, live(n)); }
inline vf keep_or(vf a, int64_t n, float fill) { return n >= W ? a : _mm256_blendv_ps(set1(fill), a, live(n)); }
inline float sum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float first(vf a) { return _mm256_cvtss_f32(a); }
inline vf round_nearest(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-126, 127] (vexp's clamp keeps it there): n goes straight into the exponent.
inline vf times_pow2(vf p, vf n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#else
constexpr const char* kIsa = "scalar";
constexpr int64_t W = 1;
using vf = float;
inline vf load(const float* p, int64_t = W) { return *p; }
inline vf load(const uint16_t* p, int64_t = W) { return bf16_scalar(*p); }
inline void store(float* p, vf v, int64_t = W) { *p = v; }
inline void store(uint16_t* p, vf v, int64_t = W) { *p = to_bf16_scalar(v); }
inline vf set1(float x) { return x; }
inline vf add(vf a, vf b) { return a + b; }
inline vf sub(vf a, vf b) { return a - b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
inline vf div(vf a, vf b) { return a / b; }
inline vf vmax(vf a, vf b) { return std::fmax(a, b); }
inline vf keep(vf a, int64_t n) { return n > 0 ? a : 0.0f; }
inline vf keep_or(vf a, int64_t n, float fill) { return n > 0 ? a : fill; }
inline float sum(vf a) { return a; }
inline float hmax(vf a) { return a; }
inline float first(vf a) { return a; }
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// exp, Cephes' polynomial after a base-2 range reduction (within 2 ulp of expf here).
inline vf vexp(vf x) {
  x = vmax(x, set1(-87.0f));
#if defined(__AVX512F__)
  x = _mm512_min_ps(x, set1(88.0f));
#else
  x = _mm256_min_ps(x, set1(88.0f));
#endif
  const vf n = round_nearest(mul(x, set1(1.44269504088896341f)));
  const vf r = fmadd(n, set1(2.12194440e-4f), fmadd(n, set1(-0.693359375f), x));
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = add(fmadd(p, mul(r, r), r), set1(1.0f));
  return times_pow2(p, n);
}
#else
inline vf vexp(vf x) { return std::exp(x); }
#endif

inline vf vsigmoid(vf x) { return div(set1(1.0f), add(set1(1.0f), vexp(mul(x, set1(-1.0f))))); }

// Runs f(offset, live lanes) over [0, n) in steps of W.
template <typename F>
inline void for_lanes(int64_t n, F f) {
  for (int64_t i = 0; i < n; i += W) f(i, std::min<int64_t>(W, n - i));
}

}  // namespace simd
