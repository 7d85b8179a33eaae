// Fused elementwise passes for CPU training: the forward and backward halves of RMSNorm, SwiGLU, causal
// softmax and cross-entropy, each one pass over memory in float32 arithmetic with bf16 or float32 storage (the
// dtype the products around them run in: bf16 where the CPU has native bf16, float32 elsewhere).
//
// Built on first use by torch.utils.cpp_extension (model/kernels/build.py) for the CPU's ISA level (AVX-512,
// AVX2 or portable C++, the vector layer in simd.h), with -fopenmp (at::parallel_for runs serially without
// it). Why by hand: on a 2-core machine every eager PyTorch elementwise op on a training activation costs
// ~1 ns per element (a fresh output each time, bf16 -> float -> bf16 round trips), and an eager SwiGLU, norm
// or softmax backward is 5-10 such ops, while the GEMMs around them run near the machine's peak: these passes
// were most of a training step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using namespace simd;

// Storage: bf16 tensors as raw 16-bit words (the vector layer converts them), float32 as float.
template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
inline void copy_n(const T* src, T* dst, int64_t n) { std::memcpy(dst, src, sizeof(T) * n); }

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_scalar(v); }
inline void assign(float& d, float v) { d = v; }
inline void assign(uint16_t& d, float v) { d = to_bf16_scalar(v); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// Calls f with a null pointer of t's storage type (bf16 -> uint16_t, float32 -> float).
template <typename F>
void dispatch(const torch::Tensor& t, const char* name, F f) {
  check_rows(t, name);
  if (t.scalar_type() == torch::kBFloat16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be bf16 or float32");
    f(static_cast<float*>(nullptr));
  }
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  check_rows(b, name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have the dtype of the other operands");
}

// ---- RMSNorm: y = w * n, n = x * rstd, n rounded to bf16 first when x is bf16 (the reference order); y in
// bf16 (the next product's input under bf16 compute) or float32 ----

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

std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor weight, double eps, bool bf16_out) {
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto w = weight.to(torch::kFloat32).contiguous();
  auto y = torch::empty(x.sizes(), x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  auto rstd = torch::empty({R}, x.options().dtype(torch::kFloat32));
  dispatch(x, "x", [&](auto* tx) {
    using T = std::remove_pointer_t<decltype(tx)>;
    if (bf16_out)
      rms_norm_rows(ptr<T>(x), w.data_ptr<float>(), ptr<uint16_t>(y), rstd.data_ptr<float>(), R, D, float(eps));
    else
      rms_norm_rows(ptr<T>(x), w.data_ptr<float>(), ptr<float>(y), rstd.data_ptr<float>(), R, D, float(eps));
  });
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
  dy = dy.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto w = weight.to(torch::kFloat32).contiguous();
  auto dx = torch::empty_like(x);
  auto parts = torch::zeros({at::get_num_threads(), D}, x.options().dtype(torch::kFloat32));
  dispatch(x, "x", [&](auto* tx) {
    using T = std::remove_pointer_t<decltype(tx)>;
    dispatch(dy, "dy", [&](auto* tg) {
      using G = std::remove_pointer_t<decltype(tg)>;
      rms_norm_backward_rows(ptr<G>(dy), ptr<T>(x), w.data_ptr<float>(), rstd.data_ptr<float>(), ptr<T>(dx),
                             parts.data_ptr<float>(), R, D);
    });
  });
  return {dx, parts.sum(0)};
}

// ---- SwiGLU on [gate | up] rows of h: act = silu(gate) * up ----

torch::Tensor swiglu_forward(torch::Tensor h) {
  const int64_t I = h.size(-1) / 2, R = h.numel() / (2 * I);
  auto sizes = h.sizes().vec();
  sizes.back() = I;
  auto act = torch::empty(sizes, h.options());
  dispatch(h, "h", [&](auto* th) {
    using T = std::remove_pointer_t<decltype(th)>;
    const T* hp = ptr<T>(h);
    T* ap = ptr<T>(act);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = hp + r * 2 * I;
        T* a = ap + r * I;
        for_lanes(I, [&](int64_t i, int64_t n) {
          const vf gv = load(g + i, n);
          store(a + i, mul(mul(gv, vsigmoid(gv)), load(g + I + i, n)), n);
        });
      }
    });
  });
  return act;
}

// d gate = dact * up * sig * (1 + gate * (1 - sig)),  d up = dact * silu(gate).
torch::Tensor swiglu_backward(torch::Tensor h, torch::Tensor dact) {
  dact = dact.contiguous();
  check_same(h, dact, "dact");
  const int64_t I = h.size(-1) / 2, R = h.numel() / (2 * I);
  auto dh = torch::empty_like(h);
  dispatch(h, "h", [&](auto* th) {
    using T = std::remove_pointer_t<decltype(th)>;
    const T* hp = ptr<T>(h);
    const T* dp = ptr<T>(dact);
    T* op = ptr<T>(dh);
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = hp + r * 2 * I;
        const T* d = dp + r * I;
        T* dg = op + r * 2 * I;
        for_lanes(I, [&](int64_t i, int64_t n) {
          const vf gv = load(g + i, n), uv = load(g + I + i, n), dv = load(d + i, n);
          const vf s = vsigmoid(gv);
          const vf one = set1(1.0f);
          store(dg + i, mul(mul(mul(dv, uv), s), fmadd(gv, sub(one, s), one)), n);
          store(dg + I + i, mul(dv, mul(gv, s)), n);
        });
      }
    });
  });
  return dh;
}

// ---- causal softmax over score rows [G, T, T] (G = batch x heads): row i attends to keys 0..i ----

torch::Tensor causal_softmax_forward(torch::Tensor scores, double scale) {
  TORCH_CHECK(scores.dim() == 3 && scores.size(1) == scores.size(2), "scores must be [G, T, T]");
  const int64_t G = scores.size(0), T = scores.size(1);
  auto probs = torch::empty_like(scores);
  const vf sc = set1(float(scale));
  dispatch(scores, "scores", [&](auto* ts) {
    using S = std::remove_pointer_t<decltype(ts)>;
    const S* sp = ptr<S>(scores);
    S* pp = ptr<S>(probs);
    at::parallel_for(0, G * T, 64, [&](int64_t i0, int64_t i1) {
      std::vector<float> e(T + W);
      for (int64_t gi = i0; gi < i1; ++gi) {
        const int64_t len = gi % T + 1;  // keys 0..i
        const S* s = sp + gi * T;
        S* p = pp + gi * T;
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
        std::memset(p + len, 0, sizeof(S) * (T - len));
      }
    });
  });
  return probs;
}

// d scores = scale * P * (dP - sum_j P dP), written over dP.
torch::Tensor softmax_backward(torch::Tensor probs, torch::Tensor dprobs, double scale) {
  check_same(probs, dprobs, "dprobs");
  const int64_t T = probs.size(-1), R = probs.numel() / T;
  const vf sc = set1(float(scale));
  dispatch(probs, "probs", [&](auto* tp) {
    using S = std::remove_pointer_t<decltype(tp)>;
    const S* pp = ptr<S>(probs);
    S* dp = ptr<S>(dprobs);
    at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const S* p = pp + r * T;
        S* d = dp + r * T;
        vf dot = set1(0.0f);
        for_lanes(T, [&](int64_t j, int64_t n) { dot = fmadd(load(p + j, n), load(d + j, n), dot); });
        const vf dt = set1(sum(dot));
        for_lanes(T, [&](int64_t j, int64_t n) {
          store(d + j, mul(sc, mul(load(p + j, n), sub(load(d + j, n), dt))), n);
        });
      }
    });
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
      const float s = sum(total), target = to_float(zr[t]);
      loss[r] = wr * (hmax(mx) + std::log(s) - target);
      const vf scale = set1(wr / s);
      for_lanes(V, [&](int64_t v, int64_t n) { store(zr + v, mul(vexp(sub(load(zr + v, n), mx)), scale), n); });
      assign(zr[t], to_float(zr[t]) - wr);
    }
  });
}

torch::Tensor cross_entropy_forward_backward(torch::Tensor logits, torch::Tensor targets,
                                             c10::optional<torch::Tensor> row_weight) {
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  TORCH_CHECK(y.numel() == R, "one target per row of logits");
  TORCH_CHECK(R == 0 || y.max().item<int64_t>() < V, "a target is out of range for ", V, " classes");
  torch::Tensor w;
  if (row_weight.has_value()) w = row_weight->to(torch::kFloat32).contiguous();
  auto loss = torch::empty({R}, logits.options().dtype(torch::kFloat32));
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  dispatch(logits, "logits", [&](auto* tz) {
    using T = std::remove_pointer_t<decltype(tz)>;
    cross_entropy_rows(ptr<T>(logits), y.data_ptr<int64_t>(), wp, loss.data_ptr<float>(), R, V);
  });
  return loss;
}

// ---- routed experts: combining the sorted expert outputs per token, and the gradients of that ----

// out[n] = sum_j w[n, j] * src[index[n, j]] (w omitted: plain sum), in float32, stored as out's dtype.
template <typename S, typename O>
void gather_sum_rows(const S* src, const int64_t* index, const float* w, O* out, int64_t N, int64_t K, int64_t H) {
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
  check_rows(index, "index");
  const int64_t N = index.size(0), K = index.size(1), H = src.size(1);
  torch::Tensor w;
  if (weights.has_value()) w = weights->to(torch::kFloat32).contiguous();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  auto out = torch::empty({N, H}, src.options().dtype(float_out ? torch::kFloat32 : src.scalar_type()));
  const int64_t* ip = index.data_ptr<int64_t>();
  dispatch(src, "src", [&](auto* ts) {
    using S = std::remove_pointer_t<decltype(ts)>;
    if (float_out)
      gather_sum_rows(ptr<S>(src), ip, wp, ptr<float>(out), N, K, H);
    else
      gather_sum_rows(ptr<S>(src), ip, wp, ptr<S>(out), N, K, H);
  });
  return out;
}

// Rows of src [M, H] picked by index -> [len(index), H] in bf16 or float32; a negative index gives a zero row
// (padding).
template <typename S, typename O>
void gather_rows_into(const S* sp, const int64_t* ip, O* op, int64_t R, int64_t H) {
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (ip[r] < 0)
        std::memset(op + r * H, 0, sizeof(O) * H);
      else if constexpr (std::is_same<S, O>::value)
        copy_n(sp + ip[r] * H, op + r * H, H);
      else
        for_lanes(H, [&](int64_t d, int64_t n) { store(op + r * H + d, load(sp + ip[r] * H + d, n), n); });
    }
  });
}

torch::Tensor gather_rows(torch::Tensor src, torch::Tensor index, bool bf16_out) {
  check_rows(index, "index");
  const int64_t R = index.numel(), H = src.size(1);
  auto out = torch::empty({R, H}, src.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  dispatch(src, "src", [&](auto* ts) {
    using S = std::remove_pointer_t<decltype(ts)>;
    if (bf16_out)
      gather_rows_into(ptr<S>(src), index.data_ptr<int64_t>(), ptr<uint16_t>(out), R, H);
    else
      gather_rows_into(ptr<S>(src), index.data_ptr<int64_t>(), ptr<float>(out), R, H);
  });
  return out;
}

// Backward of out[n] = sum_j w[n, j] y[index[n, j]]: dy[index[n, j]] = w[n, j] dout[n] (y's dtype) and
// dw[n, j] = dout[n] . y[index[n, j]].
std::vector<torch::Tensor> scatter_weighted(torch::Tensor dout, torch::Tensor y, torch::Tensor index,
                                            torch::Tensor weights) {
  check_rows(index, "index");
  auto g = dout.to(torch::kFloat32).contiguous();
  auto w = weights.to(torch::kFloat32).contiguous();
  const int64_t N = index.size(0), K = index.size(1), H = y.size(1);
  auto dy = torch::zeros_like(y);  // rows no copy maps to (padding) stay zero
  auto dw = torch::empty({N, K}, g.options());
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* ip = index.data_ptr<int64_t>();
  float* dwp = dw.data_ptr<float>();
  dispatch(y, "y", [&](auto* ty) {
    using T = std::remove_pointer_t<decltype(ty)>;
    const T* yp = ptr<T>(y);
    T* dyp = ptr<T>(dy);
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
  check_same(q, kv, "kv");
  check_same(q, k_rope, "k_rope");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dq = q.size(3), Dr = Dq - Dn, Dv = kv.size(3) - Dn;
  auto Q = torch::empty({B * H, T, Dq}, q.options());
  auto K = torch::empty({B * H, T, Dq}, q.options());
  auto V = torch::empty({B * H, T, Dv}, q.options());
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  dispatch(q, "q", [&](auto* tq) {
    using S = std::remove_pointer_t<decltype(tq)>;
    const S *qp = ptr<S>(q), *kvp = ptr<S>(kv), *krp = ptr<S>(k_rope);
    S *Qp = ptr<S>(Q), *Kp = ptr<S>(K), *Vp = ptr<S>(V);
    at::parallel_for(0, B * T, 8, [&](int64_t i0, int64_t i1) {
      std::vector<float> in(Dr), out(Dr);
      std::vector<S> key(Dr);
      for (int64_t bt = i0; bt < i1; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cp + bt * (Dr / 2), *s = sp + bt * (Dr / 2);
        for (int64_t d = 0; d < Dr; ++d) in[d] = to_float(krp[bt * Dr + d]);
        rotate(in.data(), c, s, Dr, interleaved, 1.0f, out.data());
        for (int64_t d = 0; d < Dr; ++d) assign(key[d], out[d]);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t row = (b * H + h) * T + t;
          const S* qr = qp + (bt * H + h) * Dq;
          const S* kvr = kvp + (bt * H + h) * (Dn + Dv);
          copy_n(qr, Qp + row * Dq, Dn);
          for (int64_t d = 0; d < Dr; ++d) in[d] = to_float(qr[Dn + d]);
          rotate(in.data(), c, s, Dr, interleaved, 1.0f, out.data());
          for (int64_t d = 0; d < Dr; ++d) assign(Qp[row * Dq + Dn + d], out[d]);
          copy_n(kvr, Kp + row * Dq, Dn);
          copy_n(key.data(), Kp + row * Dq + Dn, Dr);
          copy_n(kvr + Dn, Vp + row * Dv, Dv);
        }
      }
    });
  });
  return {Q, K, V};
}

// Gradients of mla_qkv_forward: dq [B, T, H, Dn + Dr], dkv [B, T, H, Dn + Dv], dk_rope [B, T, Dr] (the shared
// rotary key's gradient summed over heads), each rotary part rotated back.
std::vector<torch::Tensor> mla_qkv_backward(torch::Tensor dQ, torch::Tensor dK, torch::Tensor dV, torch::Tensor cos,
                                            torch::Tensor sin, int64_t B, int64_t Dn, bool interleaved) {
  check_same(dQ, dK, "dK");
  check_same(dQ, dV, "dV");
  const int64_t H = dQ.size(0) / B, T = dQ.size(1), Dq = dQ.size(2), Dr = Dq - Dn, Dv = dV.size(2);
  auto dq = torch::empty({B, T, H, Dq}, dQ.options());
  auto dkv = torch::empty({B, T, H, Dn + Dv}, dQ.options());
  auto dkr = torch::empty({B, T, Dr}, dQ.options());
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  dispatch(dQ, "dQ", [&](auto* tq) {
    using S = std::remove_pointer_t<decltype(tq)>;
    const S *dQp = ptr<S>(dQ), *dKp = ptr<S>(dK), *dVp = ptr<S>(dV);
    S *dqp = ptr<S>(dq), *dkvp = ptr<S>(dkv), *dkrp = ptr<S>(dkr);
    at::parallel_for(0, B * T, 8, [&](int64_t i0, int64_t i1) {
      std::vector<float> in(Dr), out(Dr), key(Dr);
      for (int64_t bt = i0; bt < i1; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cp + bt * (Dr / 2), *s = sp + bt * (Dr / 2);
        std::fill(key.begin(), key.end(), 0.0f);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t row = (b * H + h) * T + t;
          S* dqr = dqp + (bt * H + h) * Dq;
          S* dkvr = dkvp + (bt * H + h) * (Dn + Dv);
          copy_n(dQp + row * Dq, dqr, Dn);
          for (int64_t d = 0; d < Dr; ++d) in[d] = to_float(dQp[row * Dq + Dn + d]);
          rotate(in.data(), c, s, Dr, interleaved, -1.0f, out.data());
          for (int64_t d = 0; d < Dr; ++d) assign(dqr[Dn + d], out[d]);
          copy_n(dKp + row * Dq, dkvr, Dn);
          for (int64_t d = 0; d < Dr; ++d) key[d] += to_float(dKp[row * Dq + Dn + d]);
          copy_n(dVp + row * Dv, dkvr + Dn, Dv);
        }
        rotate(key.data(), c, s, Dr, interleaved, -1.0f, out.data());
        for (int64_t d = 0; d < Dr; ++d) assign(dkrp[bt * Dr + d], out[d]);
      }
    });
  });
  return {dq, dkv, dkr};
}

// ---- per-token log-probabilities of chosen tokens (policy-gradient training) ----
// z = logits * inv_temperature per row; logp_r = z[y_r] - lse_r and entropy_r = lse_r - sum_v p_v z_v, with
// lse_r = logsumexp(z_r) kept for the backward.

std::vector<torch::Tensor> token_logprobs_forward(torch::Tensor logits, torch::Tensor targets, double inv_temperature) {
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  TORCH_CHECK(y.numel() == R && (R == 0 || (y.min().item<int64_t>() >= 0 && y.max().item<int64_t>() < V)),
              "one target in [0, ", V, ") per row of logits");
  auto opts = logits.options().dtype(torch::kFloat32);
  auto logp = torch::empty({R}, opts), entropy = torch::empty({R}, opts), lse = torch::empty({R}, opts);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *ep = entropy.data_ptr<float>(), *sp = lse.data_ptr<float>();
  const vf it = set1(float(inv_temperature));
  dispatch(logits, "logits", [&](auto* tz) {
    using S = std::remove_pointer_t<decltype(tz)>;
    const S* zp = ptr<S>(logits);
    at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const S* z = zp + r * V;
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
        lp[r] = to_float(z[yp[r]]) * float(inv_temperature) - l;
        ep[r] = l - sum(weighted) / s;
      }
    });
  });
  return {logp, entropy, lse};
}

// d z_v = g_r * inv_temperature * (onehot(y_r) - softmax(z_r)), over the logits (in place).
torch::Tensor token_logprobs_backward(torch::Tensor logits, torch::Tensor lse, torch::Tensor targets,
                                      torch::Tensor grad, double inv_temperature) {
  const int64_t V = logits.size(-1), R = logits.numel() / V;
  auto y = targets.to(torch::kInt64).contiguous();
  auto g = grad.to(torch::kFloat32).contiguous();
  auto l = lse.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float *gp = g.data_ptr<float>(), *lp = l.data_ptr<float>();
  const vf it = set1(float(inv_temperature));
  dispatch(logits, "logits", [&](auto* tz) {
    using S = std::remove_pointer_t<decltype(tz)>;
    S* zp = ptr<S>(logits);
    at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        S* z = zp + r * V;
        const float gs = gp[r] * float(inv_temperature);
        const vf neg = set1(-gs), ls = set1(lp[r]);
        for_lanes(V, [&](int64_t v, int64_t n) { store(z + v, mul(neg, vexp(sub(mul(load(z + v, n), it), ls))), n); });
        assign(z[yp[r]], to_float(z[yp[r]]) + gs);
      }
    });
  });
  return logits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = simd::kIsa;
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
  m.def("mla_qkv_backward", &mla_qkv_backward);
  m.def("token_logprobs_forward", &token_logprobs_forward);
  m.def("token_logprobs_backward", &token_logprobs_backward);
}
