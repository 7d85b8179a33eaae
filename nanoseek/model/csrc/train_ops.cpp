// Fused elementwise passes for CPU training: the forward and backward halves of RMSNorm, SwiGLU, causal
// softmax and cross-entropy, each one pass over memory in float32 arithmetic with bf16 (or float32) storage.
//
// Built on first use by torch.utils.cpp_extension (model/train_kernels.py) on any CPU with a C++ compiler,
// with -march=native and -fopenmp (at::parallel_for runs serially without it). Why by hand: on this 2-core
// machine every eager PyTorch elementwise op on a training activation costs ~1 ns per element (a bf16 ->
// float -> bf16 round trip and a fresh output each time), and an eager SwiGLU, norm or softmax backward is
// 5-10 such ops, while the GEMMs around them run at ~700 GFLOP/s: these passes were most of a training step.
//
// The kernels are written once against a small vector layer: 16 float32 lanes of AVX-512 where the compiler
// targets it (GCC does not vectorise the bf16 bit casts or exp by itself), one lane of plain C++ elsewhere.
// Rounding: every bf16 store rounds to nearest even, as torch does; NaN stays NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

// ---- the vector layer: vf holds W float32 lanes; `n` lanes (<= W) are live at a tail ----
#if defined(__AVX512F__)
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
// exp, Cephes' polynomial after a base-2 range reduction; scalef applies 2^n (within 2 ulp of expf here).
inline vf vexp(vf x) {
  x = _mm512_min_ps(_mm512_max_ps(x, set1(-87.0f)), set1(88.0f));
  const vf n = _mm512_roundscale_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = fmadd(n, set1(2.12194440e-4f), fmadd(n, set1(-0.693359375f), x));
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = add(fmadd(p, mul(r, r), r), set1(1.0f));
  return _mm512_scalef_ps(p, n);
}
#else
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
inline vf vexp(vf x) { return std::exp(x); }
#endif

inline vf vsigmoid(vf x) { return div(set1(1.0f), add(set1(1.0f), vexp(mul(x, set1(-1.0f))))); }

// Runs f(offset, live lanes) over [0, n) in steps of W.
template <typename F>
inline void for_lanes(int64_t n, F f) {
  for (int64_t i = 0; i < n; i += W) f(i, std::min<int64_t>(W, n - i));
}

// bf16 tensors are handled as raw 16-bit words: the vector layer converts them.
uint16_t* bf16_ptr(const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

inline void copy_bf16(const uint16_t* src, uint16_t* dst, int64_t n) { std::memcpy(dst, src, sizeof(uint16_t) * n); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

void check_bf16(const torch::Tensor& t, const char* name) {
  check_rows(t, name);
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, name, " must be bf16");
}

// ---- RMSNorm: y = w * n (bf16 or float32), n = x * rstd, rounded to bf16 first when x is bf16 (the reference
// order) ----

template <typename T, typename Y>
void rms_norm_rows(const T* x, const float* w, Y* y, float* rstd, int64_t R, int64_t D, float eps) {
  constexpr bool round_normed = std::is_same<T, uint16_t>::value;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint16_t> normed(round_normed ? D : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      vf ss = set1(0.0f);
      for_lanes(D, [&](int64_t d, int64_t n) { const vf v = load(xr + d, n); ss = fmadd(v, v, ss); });
      const float s = 1.0f / std::sqrt(sum(ss) / float(D) + eps);
      rstd[r] = s;
      Y* yr = y + r * D;
      for_lanes(D, [&](int64_t d, int64_t n) {
        vf v = mul(load(xr + d, n), set1(s));
        if (round_normed) {
          store(normed.data() + d, v, n);
          v = load(normed.data() + d, n);
        }
        store(yr + d, mul(load(w + d, n), v), n);
      });
    }
  });
}

std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor weight, double eps, bool float_out) {
  check_rows(x, "x");
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto w = weight.to(torch::kFloat32).contiguous();
  auto y = torch::empty(x.sizes(), x.options().dtype(float_out ? torch::kFloat32 : torch::kBFloat16));
  auto rstd = torch::empty({R}, x.options().dtype(torch::kFloat32));
  const float* wp = w.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  const bool xb = x.scalar_type() == torch::kBFloat16;
  if (xb && float_out)
    rms_norm_rows(bf16_ptr(x), wp, y.data_ptr<float>(), sp, R, D, float(eps));
  else if (xb)
    rms_norm_rows(bf16_ptr(x), wp, bf16_ptr(y), sp, R, D, float(eps));
  else if (float_out)
    rms_norm_rows(x.data_ptr<float>(), wp, y.data_ptr<float>(), sp, R, D, float(eps));
  else
    rms_norm_rows(x.data_ptr<float>(), wp, bf16_ptr(y), sp, R, D, float(eps));
  return {y, rstd};
}

// dn = dy * w;  dx = rstd * (dn - n * mean(dn * n));  dw = sum over rows of dy * n.
template <typename T, typename G>
void rms_norm_backward_rows(const G* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_parts,
                            int64_t R, int64_t D) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    float* dw = dw_parts + int64_t(at::get_thread_num()) * D;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      const G* gr = dy + r * D;
      const vf s = set1(rstd[r]);
      vf dot = set1(0.0f);
      for_lanes(D, [&](int64_t d, int64_t n) {
        const vf nv = mul(load(xr + d, n), s), g = load(gr + d, n);
        dot = fmadd(mul(g, load(w + d, n)), nv, dot);
        store(dw + d, fmadd(g, nv, load(dw + d, n)), n);
      });
      const vf mean = set1(sum(dot) / float(D));
      T* dxr = dx + r * D;
      for_lanes(D, [&](int64_t d, int64_t n) {
        const vf nv = mul(load(xr + d, n), s);
        store(dxr + d, mul(s, sub(mul(load(gr + d, n), load(w + d, n)), mul(nv, mean))), n);
      });
    }
  });
}

std::vector<torch::Tensor> rms_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor weight,
                                             torch::Tensor rstd) {
  check_rows(x, "x");
  dy = dy.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto w = weight.to(torch::kFloat32).contiguous();
  auto dx = torch::empty_like(x);
  auto parts = torch::zeros({at::get_num_threads(), D}, x.options().dtype(torch::kFloat32));
  const float* wp = w.data_ptr<float>();
  const float* sp = rstd.data_ptr<float>();
  float* pp = parts.data_ptr<float>();
  const bool xb = x.scalar_type() == torch::kBFloat16, gb = dy.scalar_type() == torch::kBFloat16;
  if (xb && gb)
    rms_norm_backward_rows(bf16_ptr(dy), bf16_ptr(x), wp, sp, bf16_ptr(dx), pp, R, D);
  else if (xb)
    rms_norm_backward_rows(dy.data_ptr<float>(), bf16_ptr(x), wp, sp, bf16_ptr(dx), pp, R, D);
  else if (gb)
    rms_norm_backward_rows(bf16_ptr(dy), x.data_ptr<float>(), wp, sp, dx.data_ptr<float>(), pp, R, D);
  else
    rms_norm_backward_rows(dy.data_ptr<float>(), x.data_ptr<float>(), wp, sp, dx.data_ptr<float>(), pp, R, D);
  return {dx, parts.sum(0)};
}

// ---- SwiGLU on [gate | up] rows of h: act = silu(gate) * up ----

torch::Tensor swiglu_forward(torch::Tensor h) {
  check_bf16(h, "h");
  const int64_t I = h.size(-1) / 2, R = h.numel() / (2 * I);
  auto sizes = h.sizes().vec();
  sizes.back() = I;
  auto act = torch::empty(sizes, h.options());
  const uint16_t* hp = bf16_ptr(h);
  uint16_t* ap = bf16_ptr(act);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* g = hp + r * 2 * I;
      uint16_t* a = ap + r * I;
      for_lanes(I, [&](int64_t i, int64_t n) {
        const vf gv = load(g + i, n);
        store(a + i, mul(mul(gv, vsigmoid(gv)), load(g + I + i, n)), n);
      });
    }
  });
  return act;
}

// d gate = dact * up * sig * (1 + gate * (1 - sig)),  d up = dact * silu(gate).
torch::Tensor swiglu_backward(torch::Tensor h, torch::Tensor dact) {
  check_bf16(h, "h");
  dact = dact.contiguous();
  check_bf16(dact, "dact");
  const int64_t I = h.size(-1) / 2, R = h.numel() / (2 * I);
  auto dh = torch::empty_like(h);
  const uint16_t* hp = bf16_ptr(h);
  const uint16_t* dp = bf16_ptr(dact);
  uint16_t* op = bf16_ptr(dh);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* g = hp + r * 2 * I;
      const uint16_t* d = dp + r * I;
      uint16_t* dg = op + r * 2 * I;
      for_lanes(I, [&](int64_t i, int64_t n) {
        const vf gv = load(g + i, n), uv = load(g + I + i, n), dv = load(d + i, n);
        const vf s = vsigmoid(gv);
        const vf one = set1(1.0f);
        store(dg + i, mul(mul(mul(dv, uv), s), fmadd(gv, sub(one, s), one)), n);
        store(dg + I + i, mul(dv, mul(gv, s)), n);
      });
    }
  });
  return dh;
}

// ---- causal softmax over score rows [G, T, T] (G = batch x heads): row i attends to keys 0..i ----

torch::Tensor causal_softmax_forward(torch::Tensor scores, double scale) {
  check_bf16(scores, "scores");
  TORCH_CHECK(scores.dim() == 3 && scores.size(1) == scores.size(2), "scores must be [G, T, T]");
  const int64_t G = scores.size(0), T = scores.size(1);
  auto probs = torch::empty_like(scores);
  const uint16_t* sp = bf16_ptr(scores);
  uint16_t* pp = bf16_ptr(probs);
  const vf sc = set1(float(scale));
  at::parallel_for(0, G * T, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> e(T + W);
    for (int64_t gi = i0; gi < i1; ++gi) {
      const int64_t len = gi % T + 1;  // keys 0..i
      const uint16_t* s = sp + gi * T;
      uint16_t* p = pp + gi * T;
      vf m = set1(-INFINITY);
      for_lanes(len, [&](int64_t j, int64_t n) { m = vmax(m, keep_or(mul(load(s + j, n), sc), n, -INFINITY)); });
      const vf mx = set1(hmax(m));
      vf total = set1(0.0f);
      for_lanes(len, [&](int64_t j, int64_t n) {
        const vf v = keep(vexp(sub(mul(load(s + j, n), sc), mx)), n);
        store(e.data() + j, v, n);
        total = add(total, v);
      });
      const vf inv = set1(1.0f / sum(total));
      for_lanes(len, [&](int64_t j, int64_t n) { store(p + j, mul(load(e.data() + j, n), inv), n); });
      std::memset(p + len, 0, sizeof(uint16_t) * (T - len));
    }
  });
  return probs;
}

// d scores = scale * P * (dP - sum_j P dP), written over dP.
torch::Tensor softmax_backward(torch::Tensor probs, torch::Tensor dprobs, double scale) {
  check_bf16(probs, "probs");
  check_bf16(dprobs, "dprobs");
  const int64_t T = probs.size(-1), R = probs.numel() / T;
  const uint16_t* pp = bf16_ptr(probs);
  uint16_t* dp = bf16_ptr(dprobs);
  const vf sc = set1(float(scale));
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* p = pp + r * T;
      uint16_t* d = dp + r * T;
      vf dot = set1(0.0f);
      for_lanes(T, [&](int64_t j, int64_t n) { dot = fmadd(load(p + j, n), load(d + j, n), dot); });
      const vf dt = set1(sum(dot));
      for_lanes(T, [&](int64_t j, int64_t n) {
        store(d + j, mul(sc, mul(load(p + j, n), sub(load(d + j, n), dt))), n);
      });
    }
  });
  return dprobs;
}

// ---- cross-entropy rows: loss_r = w_r * (logsumexp(z_r) - z_r[y_r]); z is overwritten with its gradient
// dz = w_r * (softmax(z_r) - onehot(y_r)). Targets < 0 are ignored (loss 0, gradient 0). ----

template <typename T>
void cross_entropy_rows(T* z, const int64_t* y, const float* w, float* loss, int64_t R, int64_t V) {
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* zr = z + r * V;
      const int64_t t = y[r];
      const float wr = w ? w[r] : 1.0f;
      if (t < 0 || wr == 0.0f) {
        loss[r] = 0.0f;
        for_lanes(V, [&](int64_t v, int64_t n) { store(zr + v, set1(0.0f), n); });
        continue;
      }
      vf m = set1(-INFINITY);
      for_lanes(V, [&](int64_t v, int64_t n) { m = vmax(m, keep_or(load(zr + v, n), n, -INFINITY)); });
      const vf mx = set1(hmax(m));
      vf total = set1(0.0f);
      for_lanes(V, [&](int64_t v, int64_t n) { total = add(total, keep(vexp(sub(load(zr + v, n), mx)), n)); });
      const float s = sum(total), target = first(load(zr + t, 1));
      loss[r] = wr * (hmax(mx) + std::log(s) - target);
      const vf scale = set1(wr / s);
      for_lanes(V, [&](int64_t v, int64_t n) { store(zr + v, mul(vexp(sub(load(zr + v, n), mx)), scale), n); });
      store(zr + t, sub(load(zr + t, 1), set1(wr)), 1);
    }
  });
}

torch::Tensor cross_entropy_forward_backward(torch::Tensor logits, torch::Tensor targets,
                                             c10::optional<torch::Tensor> row_weight) {
  check_rows(logits, "logits");
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  TORCH_CHECK(y.numel() == R, "one target per row of logits");
  TORCH_CHECK(R == 0 || y.max().item<int64_t>() < V, "a target is out of range for ", V, " classes");
  torch::Tensor w;
  if (row_weight.has_value()) w = row_weight->to(torch::kFloat32).contiguous();
  auto loss = torch::empty({R}, logits.options().dtype(torch::kFloat32));
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  if (logits.scalar_type() == torch::kBFloat16)
    cross_entropy_rows(bf16_ptr(logits), y.data_ptr<int64_t>(), wp, loss.data_ptr<float>(), R, V);
  else
    cross_entropy_rows(logits.data_ptr<float>(), y.data_ptr<int64_t>(), wp, loss.data_ptr<float>(), R, V);
  return loss;
}


// ---- routed experts: combining the sorted expert outputs per token, and the gradients of that ----

// out[n] = sum_j w[n, j] * src[index[n, j]] (w omitted: plain sum), in float32, stored as out's dtype.
template <typename O>
void gather_sum_rows(const uint16_t* src, const int64_t* index, const float* w, O* out, int64_t N, int64_t K,
                     int64_t H) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for_lanes(H, [&](int64_t d, int64_t m) {
        vf acc = set1(0.0f);
        for (int64_t j = 0; j < K; ++j) {
          const vf v = load(src + index[n * K + j] * H + d, m);
          acc = w ? fmadd(set1(w[n * K + j]), v, acc) : add(acc, v);
        }
        store(out + n * H + d, acc, m);
      });
    }
  });
}

torch::Tensor gather_sum(torch::Tensor src, torch::Tensor index, c10::optional<torch::Tensor> weights,
                         bool float_out) {
  check_bf16(src, "src");
  check_rows(index, "index");
  const int64_t N = index.size(0), K = index.size(1), H = src.size(1);
  torch::Tensor w;
  if (weights.has_value()) w = weights->to(torch::kFloat32).contiguous();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  auto out = torch::empty({N, H}, src.options().dtype(float_out ? torch::kFloat32 : torch::kBFloat16));
  const int64_t* ip = index.data_ptr<int64_t>();
  if (float_out)
    gather_sum_rows(bf16_ptr(src), ip, wp, out.data_ptr<float>(), N, K, H);
  else
    gather_sum_rows(bf16_ptr(src), ip, wp, bf16_ptr(out), N, K, H);
  return out;
}

// Backward of out[n] = sum_j w[n, j] y[index[n, j]]: dy[index[n, j]] = w[n, j] dout[n] (bf16) and
// dw[n, j] = dout[n] . y[index[n, j]].
// Rows of src (bf16 or float32 [M, H]) picked by index -> bf16 [len(index), H]; a negative index gives a zero
// row (padding).
template <typename T>
void gather_rows_into(const T* sp, const int64_t* ip, uint16_t* op, int64_t R, int64_t H) {
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (ip[r] < 0)
        std::memset(op + r * H, 0, sizeof(uint16_t) * H);
      else if constexpr (std::is_same<T, uint16_t>::value)
        copy_bf16(sp + ip[r] * H, op + r * H, H);
      else
        for_lanes(H, [&](int64_t d, int64_t n) { store(op + r * H + d, load(sp + ip[r] * H + d, n), n); });
    }
  });
}

torch::Tensor gather_rows(torch::Tensor src, torch::Tensor index) {
  check_rows(src, "src");
  check_rows(index, "index");
  const int64_t R = index.numel(), H = src.size(1);
  auto out = torch::empty({R, H}, src.options().dtype(torch::kBFloat16));
  if (src.scalar_type() == torch::kBFloat16)
    gather_rows_into(bf16_ptr(src), index.data_ptr<int64_t>(), bf16_ptr(out), R, H);
  else
    gather_rows_into(src.data_ptr<float>(), index.data_ptr<int64_t>(), bf16_ptr(out), R, H);
  return out;
}

std::vector<torch::Tensor> scatter_weighted(torch::Tensor dout, torch::Tensor y, torch::Tensor index,
                                            torch::Tensor weights) {
  check_bf16(y, "y");
  check_rows(index, "index");
  auto g = dout.to(torch::kFloat32).contiguous();
  auto w = weights.to(torch::kFloat32).contiguous();
  const int64_t N = index.size(0), K = index.size(1), H = y.size(1);
  auto dy = torch::zeros_like(y);  // rows no copy maps to (padding) stay zero
  auto dw = torch::empty({N, K}, g.options());
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* ip = index.data_ptr<int64_t>();
  const uint16_t* yp = bf16_ptr(y);
  uint16_t* dyp = bf16_ptr(dy);
  float* dwp = dw.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = ip[n * K + j];
        const vf wv = set1(wp[n * K + j]);
        vf dot = set1(0.0f);
        for_lanes(H, [&](int64_t d, int64_t m) {
          const vf gv = load(gp + n * H + d, m);
          dot = fmadd(gv, load(yp + row * H + d, m), dot);
          store(dyp + row * H + d, mul(wv, gv), m);
        });
        dwp[n * K + j] = sum(dot);
      }
    }
  });
  return {dy, dw};
}

// ---- MLA: per-head queries, keys and values for attention, rotary applied, heads first ----
// q [B, T, H, Dn + Dr], kv [B, T, H, Dn + Dv] (kv_b_proj's output), k_rope [B, T, Dr] (shared by all heads),
// cos/sin [B, T, Dr / 2] -> Q, K [B * H, T, Dn + Dr], V [B * H, T, Dv]. The rotary half of each query and of
// the shared key is rotated in float32 and rounded once, as model.rope.Rope.rotate does: interleaved pairs
// (x[2i], x[2i+1]) or halves (x[i], x[i + Dr/2]).

inline void rope_pairs(int64_t Dr, bool interleaved, int64_t i, int64_t& a, int64_t& b) {
  a = interleaved ? 2 * i : i;
  b = interleaved ? 2 * i + 1 : i + Dr / 2;
}

// out = x rotated by +theta (sign 1) or -theta (sign -1, the transpose: backward), in float32.
inline void rotate(const float* x, const float* c, const float* s, int64_t Dr, bool interleaved, float sign,
                   float* out) {
  for (int64_t i = 0; i < Dr / 2; ++i) {
    int64_t a, b;
    rope_pairs(Dr, interleaved, i, a, b);
    const float xa = x[a], xb = x[b];
    out[a] = xa * c[i] - sign * xb * s[i];
    out[b] = xb * c[i] + sign * xa * s[i];
  }
}


std::vector<torch::Tensor> mla_qkv_forward(torch::Tensor q, torch::Tensor kv, torch::Tensor k_rope, torch::Tensor cos,
                                           torch::Tensor sin, int64_t Dn, bool interleaved) {
  check_bf16(q, "q");
  check_bf16(kv, "kv");
  check_bf16(k_rope, "k_rope");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dq = q.size(3), Dr = Dq - Dn, Dv = kv.size(3) - Dn;
  auto Q = torch::empty({B * H, T, Dq}, q.options());
  auto K = torch::empty({B * H, T, Dq}, q.options());
  auto V = torch::empty({B * H, T, Dv}, q.options());
  const uint16_t *qp = bf16_ptr(q), *kvp = bf16_ptr(kv), *krp = bf16_ptr(k_rope);
  uint16_t *Qp = bf16_ptr(Q), *Kp = bf16_ptr(K), *Vp = bf16_ptr(V);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, B * T, 8, [&](int64_t i0, int64_t i1) {
    std::vector<float> in(Dr), out(Dr);
    std::vector<uint16_t> key(Dr);
    for (int64_t bt = i0; bt < i1; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float *c = cp + bt * (Dr / 2), *s = sp + bt * (Dr / 2);
      for (int64_t d = 0; d < Dr; ++d) in[d] = bf16_scalar(krp[bt * Dr + d]);
      rotate(in.data(), c, s, Dr, interleaved, 1.0f, out.data());
      for (int64_t d = 0; d < Dr; ++d) key[d] = to_bf16_scalar(out[d]);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = (b * H + h) * T + t;
        const uint16_t* qr = qp + (bt * H + h) * Dq;
        const uint16_t* kvr = kvp + (bt * H + h) * (Dn + Dv);
        copy_bf16(qr, Qp + row * Dq, Dn);
        for (int64_t d = 0; d < Dr; ++d) in[d] = bf16_scalar(qr[Dn + d]);
        rotate(in.data(), c, s, Dr, interleaved, 1.0f, out.data());
        for (int64_t d = 0; d < Dr; ++d) Qp[row * Dq + Dn + d] = to_bf16_scalar(out[d]);
        copy_bf16(kvr, Kp + row * Dq, Dn);
        copy_bf16(key.data(), Kp + row * Dq + Dn, Dr);
        copy_bf16(kvr + Dn, Vp + row * Dv, Dv);
      }
    }
  });
  return {Q, K, V};
}

// Gradients of mla_qkv_forward: dq [B, T, H, Dn + Dr], dkv [B, T, H, Dn + Dv], dk_rope [B, T, Dr] (the shared
// rotary key's gradient summed over heads), each rotary part rotated back.
std::vector<torch::Tensor> mla_qkv_backward(torch::Tensor dQ, torch::Tensor dK, torch::Tensor dV, torch::Tensor cos,
                                            torch::Tensor sin, int64_t B, int64_t Dn, bool interleaved) {
  check_bf16(dQ, "dQ");
  check_bf16(dK, "dK");
  check_bf16(dV, "dV");
  const int64_t H = dQ.size(0) / B, T = dQ.size(1), Dq = dQ.size(2), Dr = Dq - Dn, Dv = dV.size(2);
  auto dq = torch::empty({B, T, H, Dq}, dQ.options());
  auto dkv = torch::empty({B, T, H, Dn + Dv}, dQ.options());
  auto dkr = torch::empty({B, T, Dr}, dQ.options());
  const uint16_t *dQp = bf16_ptr(dQ), *dKp = bf16_ptr(dK), *dVp = bf16_ptr(dV);
  uint16_t *dqp = bf16_ptr(dq), *dkvp = bf16_ptr(dkv), *dkrp = bf16_ptr(dkr);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, B * T, 8, [&](int64_t i0, int64_t i1) {
    std::vector<float> in(Dr), out(Dr), key(Dr);
    for (int64_t bt = i0; bt < i1; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float *c = cp + bt * (Dr / 2), *s = sp + bt * (Dr / 2);
      std::fill(key.begin(), key.end(), 0.0f);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = (b * H + h) * T + t;
        uint16_t* dqr = dqp + (bt * H + h) * Dq;
        uint16_t* dkvr = dkvp + (bt * H + h) * (Dn + Dv);
        copy_bf16(dQp + row * Dq, dqr, Dn);
        for (int64_t d = 0; d < Dr; ++d) in[d] = bf16_scalar(dQp[row * Dq + Dn + d]);
        rotate(in.data(), c, s, Dr, interleaved, -1.0f, out.data());
        for (int64_t d = 0; d < Dr; ++d) dqr[Dn + d] = to_bf16_scalar(out[d]);
        copy_bf16(dKp + row * Dq, dkvr, Dn);
        for (int64_t d = 0; d < Dr; ++d) key[d] += bf16_scalar(dKp[row * Dq + Dn + d]);
        copy_bf16(dVp + row * Dv, dkvr + Dn, Dv);
      }
      rotate(key.data(), c, s, Dr, interleaved, -1.0f, out.data());
      for (int64_t d = 0; d < Dr; ++d) dkrp[bt * Dr + d] = to_bf16_scalar(out[d]);
    }
  });
  return {dq, dkv, dkr};
}


// ---- per-token log-probabilities of chosen tokens (policy-gradient training) ----
// z = logits * inv_temperature per row; logp_r = z[y_r] - lse_r and entropy_r = lse_r - sum_v p_v z_v, with
// lse_r = logsumexp(z_r) kept for the backward.

std::vector<torch::Tensor> token_logprobs_forward(torch::Tensor logits, torch::Tensor targets, double inv_temperature) {
  check_bf16(logits, "logits");
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  TORCH_CHECK(y.numel() == R && (R == 0 || (y.min().item<int64_t>() >= 0 && y.max().item<int64_t>() < V)),
              "one target in [0, ", V, ") per row of logits");
  auto opts = logits.options().dtype(torch::kFloat32);
  auto logp = torch::empty({R}, opts), entropy = torch::empty({R}, opts), lse = torch::empty({R}, opts);
  const uint16_t* zp = bf16_ptr(logits);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *ep = entropy.data_ptr<float>(), *sp = lse.data_ptr<float>();
  const vf it = set1(float(inv_temperature));
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* z = zp + r * V;
      vf m = set1(-INFINITY);
      for_lanes(V, [&](int64_t v, int64_t n) { m = vmax(m, keep_or(mul(load(z + v, n), it), n, -INFINITY)); });
      const vf mx = set1(hmax(m));
      vf total = set1(0.0f), weighted = set1(0.0f);
      for_lanes(V, [&](int64_t v, int64_t n) {
        const vf zv = mul(load(z + v, n), it);
        const vf e = keep(vexp(sub(zv, mx)), n);
        total = add(total, e);
        weighted = fmadd(e, keep(zv, n), weighted);
      });
      const float s = sum(total), l = hmax(mx) + std::log(s);
      sp[r] = l;
      lp[r] = first(load(z + yp[r], 1)) * float(inv_temperature) - l;
      ep[r] = l - sum(weighted) / s;
    }
  });
  return {logp, entropy, lse};
}

// d z_v = g_r * inv_temperature * (onehot(y_r) - softmax(z_r)), over the logits (bf16, in place).
torch::Tensor token_logprobs_backward(torch::Tensor logits, torch::Tensor lse, torch::Tensor targets,
                                      torch::Tensor grad, double inv_temperature) {
  check_bf16(logits, "logits");
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  auto g = grad.to(torch::kFloat32).contiguous();
  auto l = lse.contiguous();
  uint16_t* zp = bf16_ptr(logits);
  const int64_t* yp = y.data_ptr<int64_t>();
  const float *gp = g.data_ptr<float>(), *lp = l.data_ptr<float>();
  const vf it = set1(float(inv_temperature));
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* z = zp + r * V;
      const float gs = gp[r] * float(inv_temperature);
      const vf neg = set1(-gs), ls = set1(lp[r]);
      for_lanes(V, [&](int64_t v, int64_t n) { store(z + v, mul(neg, vexp(sub(mul(load(z + v, n), it), ls))), n); });
      store(z + yp[r], add(load(z + yp[r], 1), set1(gs)), 1);
    }
  });
  return logits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward", &swiglu_backward);
  m.def("causal_softmax_forward", &causal_softmax_forward);
  m.def("softmax_backward", &softmax_backward);
  m.def("cross_entropy_forward_backward", &cross_entropy_forward_backward);
  m.def("gather_sum", &gather_sum);
  m.def("scatter_weighted", &scatter_weighted);
  m.def("gather_rows", &gather_rows);
  m.def("mla_qkv_forward", &mla_qkv_forward);
  m.def("token_logprobs_forward", &token_logprobs_forward);
  m.def("token_logprobs_backward", &token_logprobs_backward);
  m.def("mla_qkv_backward", &mla_qkv_backward);
}
