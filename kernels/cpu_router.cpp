// The router's work after its logits, on the CPU, one pass over the [T, E] logits forward and
// one backward (moe.layers.router has the contract; kernels/cpu_router.py the Python side).
//
// Why: PyTorch takes about 25 small operations for it (scores, their normalisation, top-k,
// the gates, the mean probabilities of the balancing loss, logsumexp for the z-loss, the
// entropy, the expert counts), each a pass over [T, E] with its own dispatch cost, and as
// many again backward: 0.3 ms of a `tiny` layer's 1.8 ms forward.
//
// Scores are softmax(l) or sigmoid(l); probs are the scores normalised to sum 1 (softmax:
// the scores themselves). Selection takes the K best of score + bias (ties: lower expert
// first); gates are the chosen scores, renormalised to sum 1 if asked, times scale.
// Shape legend: T tokens, E experts, K chosen per token. All float32.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int64_t BLOCK = 256;  // rows per partial sum: fixed, so sums do not depend on threads
constexpr int64_t MAX_LINEAR_EXPERTS = 32;  // accumulators of router_logits: one register each

// exp of 16 lanes (Cephes' expf: 2^n * exp(r), |r| <= ln2 / 2, a degree-7 polynomial; about
// one unit in the last place). The row's exps were its cost: glibc's scalar expf, 5 ns each.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// log of 16 positive normal lanes (Cephes' logf on the mantissa in [sqrt(1/2), sqrt(2))).
inline __m512 log16(__m512 x) {
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f)), z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  for (float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                  2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, _mm512_mul_ps(_mm512_mul_ps(y, f), z));
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147181f), _mm512_add_ps(f, y));
}

inline int64_t padded(int64_t E) { return (E + 15) / 16 * 16; }

struct Row {
  float max_logit = 0, sum_exp = 0;  // softmax(l) = exp(l - max) / sum_exp
  float score_sum = 0;               // sum of the scores (sigmoid; 1 for softmax)
  float lse() const { return max_logit + std::log(sum_exp); }
};

// Scores, probs and softmax(l) of one row into s, p and soft (padded(E) entries each; zero
// past E), 16 lanes at a time.
Row scores_of(const float* l, int64_t E, bool sigmoid, float* s, float* p, float* soft) {
  Row r;
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t e = 0; e < E; e += 16)
    mx = _mm512_mask_max_ps(mx, first_lanes(E - e), mx, _mm512_maskz_loadu_ps(first_lanes(E - e), l + e));
  r.max_logit = _mm512_reduce_max_ps(mx);
  const __m512 max = _mm512_set1_ps(r.max_logit);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 m = first_lanes(E - e);
    const __m512 u = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, l + e), max)));
    _mm512_storeu_ps(soft + e, u);
    sum = _mm512_add_ps(sum, u);
  }
  r.sum_exp = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.0f / r.sum_exp), one = _mm512_set1_ps(1.0f);
  __m512 score_sum = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    const __mmask16 m = first_lanes(E - e);
    const __m512 u = _mm512_loadu_ps(soft + e), q = _mm512_mul_ps(u, inv);
    _mm512_storeu_ps(soft + e, q);
    __m512 sc = q;
    if (sigmoid) {  // 1 / (1 + exp(-l)); exp16 clamps, so no inf / inf
      const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(m, l + e));
      sc = _mm512_maskz_mov_ps(m, _mm512_div_ps(one, _mm512_add_ps(one, exp16(neg))));
    }
    _mm512_storeu_ps(s + e, sc);
    score_sum = _mm512_add_ps(score_sum, sc);
  }
  r.score_sum = sigmoid ? _mm512_reduce_add_ps(score_sum) : 1.0f;
  const __m512 inv_sum = _mm512_set1_ps(1.0f / r.score_sum);
  for (int64_t e = 0; e < E; e += 16) _mm512_storeu_ps(p + e, _mm512_mul_ps(_mm512_loadu_ps(s + e), inv_sum));
  return r;
}

// -sum_e p log p of one row (p clamped at 1e-20 inside the log, as the PyTorch path does).
float entropy_of(const float* p, int64_t E) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 16) {
    const __m512 v = _mm512_loadu_ps(p + e);  // zero past E: contributes 0
    acc = _mm512_fnmadd_ps(v, log16(_mm512_max_ps(v, _mm512_set1_ps(1e-20f))), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "logits must be a contiguous float32 [T, E] CPU tensor");
}

template <typename Body>
void with_row_type(const at::Tensor& x, Body body) {
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 &&
                  x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous bfloat16 or float32 [T, D] CPU tensor");
  if (x.scalar_type() == at::kBFloat16) body((const bf16*)data<bf16>(x));
  else body((const float*)data<float>(x));
}

void check_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) &&
                  w.size(0) <= MAX_LINEAR_EXPERTS,
              "weight must be a contiguous float32 [E, D] with E <= ", MAX_LINEAR_EXPERTS,
              " and x's D; got ", w.sizes(), " for x ", x.sizes());
}

constexpr int EC = 8;  // experts per register block: 8 accumulators for each of 2 rows

// w [E, D] with zero rows up to a multiple of EC, so register blocks need no bounds.
std::vector<float> padded_weight(const at::Tensor& w) {
  const int64_t E = w.size(0), D = w.size(1), E8 = (E + EC - 1) / EC * EC;
  std::vector<float> out(E8 * D, 0.0f);
  std::copy(w.data_ptr<float>(), w.data_ptr<float>() + E * D, out.begin());
  return out;
}

}  // namespace

// Returns ids_TK (int64), gates_TK, probs_sum_E (sum over tokens of the probs), lse_sq_sum
// (sum of logsumexp(l_t)^2), entropy_sum (nats, summed over tokens) and routed_E (int64).
std::vector<at::Tensor> route_forward(const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t K,
                                      bool sigmoid, bool renormalize, double scale) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(K >= 1 && K <= E, "top_k must be in [1, ", E, "], got ", K);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == E,
                "bias must be contiguous float32 [E]");
    b = bias->data_ptr<float>();
  }
  const float* lp = logits.data_ptr<float>();
  auto ids = at::empty({T, K}, logits.options().dtype(at::kLong));
  auto gates = at::empty({T, K}, logits.options());
  const int64_t blocks = (T + BLOCK - 1) / BLOCK;
  // Per block: E probability sums, then lse^2 and entropy sums; counts per block.
  std::vector<double> partial(blocks * (E + 2), 0.0);
  std::vector<int64_t> counts(blocks * E, 0);
  int64_t* ip = ids.data_ptr<int64_t>();
  float* gp = gates.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(padded(E)), p(padded(E)), soft(padded(E)), key(E);
    std::vector<char> taken(E);
    for (int64_t blk = b0; blk < b1; ++blk) {
      double* part = &partial[blk * (E + 2)];
      int64_t* count = &counts[blk * E];
      for (int64_t t = blk * BLOCK; t < std::min(T, (blk + 1) * BLOCK); ++t) {
        const float* l = lp + t * E;
        const Row r = scores_of(l, E, sigmoid, s.data(), p.data(), soft.data());
        for (int64_t e = 0; e < E; ++e) key[e] = b ? s[e] + b[e] : s[e];
        std::fill(taken.begin(), taken.end(), 0);
        float chosen_sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e)
            if (!taken[e] && (best < 0 || key[e] > key[best])) best = e;
          taken[best] = 1;
          ip[t * K + k] = best;
          gp[t * K + k] = s[best];
          chosen_sum += s[best];
          ++count[best];
        }
        for (int64_t k = 0; k < K; ++k) {
          if (renormalize) gp[t * K + k] /= chosen_sum;
          gp[t * K + k] *= (float)scale;
        }
        for (int64_t e = 0; e < E; ++e) part[e] += p[e];
        const double entropy = entropy_of(p.data(), E), lse = r.lse();
        part[E] += lse * lse;
        part[E + 1] += entropy;
      }
    }
  });
  auto probs_sum = at::zeros({E}, logits.options());
  auto routed = at::zeros({E}, logits.options().dtype(at::kLong));
  std::vector<double> total(E + 2, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t i = 0; i < E + 2; ++i) total[i] += partial[blk * (E + 2) + i];
    for (int64_t e = 0; e < E; ++e) routed.data_ptr<int64_t>()[e] += counts[blk * E + e];
  }
  for (int64_t e = 0; e < E; ++e) probs_sum.data_ptr<float>()[e] = (float)total[e];
  auto lse_sq_sum = at::full({}, total[E], logits.options());
  auto entropy_sum = at::full({}, total[E + 1], logits.options());
  return {ids, gates, probs_sum, lse_sq_sum, entropy_sum, routed};
}

// d logits from the gradients of gates_TK (or undefined), probs_sum_E (or undefined) and
// lse_sq_sum (a number; 0 for none).
at::Tensor route_backward(const at::Tensor& logits, const at::Tensor& ids, const c10::optional<at::Tensor>& dgates,
                          const c10::optional<at::Tensor>& dprobs_sum, double dlse_sq_sum, bool sigmoid,
                          bool renormalize, double scale) {
  check_logits(logits);
  const int64_t T = logits.size(0), E = logits.size(1), K = ids.size(1);
  const float* lp = logits.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float* dg = nullptr;
  if (dgates.has_value()) {
    TORCH_CHECK(dgates->scalar_type() == at::kFloat && dgates->is_contiguous(), "dgates must be contiguous float32");
    dg = dgates->data_ptr<float>();
  }
  const float* dP = nullptr;
  if (dprobs_sum.has_value()) {
    TORCH_CHECK(dprobs_sum->scalar_type() == at::kFloat && dprobs_sum->is_contiguous(), "dprobs must be contiguous float32");
    dP = dprobs_sum->data_ptr<float>();
  }
  auto dlogits = at::empty({T, E}, logits.options());
  float* dl = dlogits.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(padded(E)), p(padded(E)), soft(padded(E)), ds(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = lp + t * E;
      const Row r = scores_of(l, E, sigmoid, s.data(), p.data(), soft.data());
      std::fill(ds.begin(), ds.end(), 0.0f);
      if (dg) {  // gates: scale * s[id_k] (/ sum_j s[id_j] if renormalised)
        float chosen_sum = 0, dot = 0;
        for (int64_t k = 0; k < K; ++k) chosen_sum += s[ip[t * K + k]];
        for (int64_t k = 0; k < K; ++k) dot += dg[t * K + k] * s[ip[t * K + k]];
        for (int64_t k = 0; k < K; ++k) {
          const float g = dg[t * K + k];
          ds[ip[t * K + k]] += (float)scale * (renormalize ? (g - dot / chosen_sum) / chosen_sum : g);
        }
      }
      if (dP) {  // probs = s / sum(s) (softmax: s itself)
        float dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += dP[e] * p[e];
        for (int64_t e = 0; e < E; ++e) ds[e] += sigmoid ? (dP[e] - dot) / r.score_sum : dP[e];
      }
      // Through the scores to the logits, then the z-loss term through logsumexp.
      float soft_dot = 0;
      if (!sigmoid)
        for (int64_t e = 0; e < E; ++e) soft_dot += ds[e] * s[e];
      const float dlse = (float)(2.0 * dlse_sq_sum * r.lse());
      for (int64_t e = 0; e < E; ++e) {
        const float from_scores = sigmoid ? ds[e] * s[e] * (1.0f - s[e]) : s[e] * (ds[e] - soft_dot);
        dl[t * E + e] = from_scores + dlse * soft[e];
      }
    }
  });
  return dlogits;
}

// logits = x @ w^T in float32 (x bfloat16 or float32, w float32 [E, D] with E <= 32): for a
// block of RB rows, each x value broadcast against w^T's row of up to 32 experts, the
// block's logits summed in registers (RB x 2 accumulators) along d. A library GEMM with 8
// output columns ran at a tenth of its peak (50 us for 2048 rows of 128) and needed x cast
// to float32 first; dot products along d with a horizontal sum per logit ran at 0.4x
// torch's float32 GEMM at 32 experts (the sums were its cost).
at::Tensor router_logits(const at::Tensor& x, const at::Tensor& w) {
  check_weight(w, x);
  const int64_t T = x.size(0), D = x.size(1), E = w.size(0);
  constexpr int RB = 8;
  const int V = E > 16 ? 2 : 1;  // 16-expert vectors of w^T
  std::vector<float> wt(D * 16 * V, 0.0f);  // w^T, zero past E
  const float* wp = w.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t d = 0; d < D; ++d) wt[d * 16 * V + e] = wp[e * D + d];
  auto logits = at::empty({T, E}, w.options());
  float* out = logits.data_ptr<float>();
  with_row_type(x, [&](auto xp) {
    at::parallel_for(0, (T + RB - 1) / RB, 8, [&](int64_t b0, int64_t b1) {
      std::vector<float> xs(RB * D);  // the block's rows in float32, to broadcast from memory
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * RB, rows = std::min<int64_t>(RB, T - t0);
        std::fill(xs.begin() + rows * D, xs.end(), 0.0f);  // a last block's missing rows
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; d += 16)
            store16(&xs[r * D + d], load16(xp + (t0 + r) * D + d, first_lanes(D - d)), first_lanes(D - d));
        auto block = [&](auto v_const) {
          constexpr int NV = decltype(v_const)::value;
          __m512 acc[RB][NV];
#pragma GCC unroll 8
          for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
          const float* xd = xs.data();
          for (int64_t d = 0; d < D; ++d) {
            __m512 wv[NV];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(&wt[(d * NV + v) * 16]);
#pragma GCC unroll 8
            for (int r = 0; r < RB; ++r) {
              const __m512 xv = _mm512_set1_ps(xd[r * D + d]);
#pragma GCC unroll 2
              for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
            }
          }
          // Unrolled with r known at compile time: acc indexed by a run-time r would keep all
          // of acc on the stack, loaded and stored at every d.
#pragma GCC unroll 8
          for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v)
              if (r < rows) store16(out + (t0 + r) * E + 16 * v, acc[r][v], first_lanes(E - 16 * v));
        };
        if (V == 2) block(std::integral_constant<int, 2>{});
        else block(std::integral_constant<int, 1>{});
      }
    });
  });
  return logits;
}

// dx = dlogits @ w (in x's dtype) and dw = dlogits^T @ x (float32). Per block of rows and
// 16 features: EC experts' weight vectors and dw accumulators stay in registers while the
// block's rows pass. dw is summed over fixed blocks of rows in order, so it does not depend
// on the thread count.
std::vector<at::Tensor> router_linear_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dlogits) {
  check_weight(w, x);
  check_logits(dlogits);
  const int64_t T = x.size(0), D = x.size(1), E = w.size(0);
  const std::vector<float> wpad = padded_weight(w);
  const int64_t E8 = (int64_t)wpad.size() / std::max<int64_t>(D, 1);
  const float* dl = dlogits.data_ptr<float>();
  auto dx = at::empty({T, D}, x.options());
  const int64_t blocks = (T + BLOCK - 1) / BLOCK;
  std::vector<float> partial(blocks * E8 * D, 0.0f);
  with_row_type(x, [&](auto xp) {
    using X = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    X* dxp = reinterpret_cast<X*>(dx.data_ptr());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> g(BLOCK * 16);  // the block's dx for 16 features, summed over experts
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * BLOCK, r1 = std::min(T, r0 + BLOCK);
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = first_lanes(D - d);
          std::fill(g.begin(), g.end(), 0.0f);
          for (int64_t c = 0; c < E8; c += EC) {
            __m512 wv[EC], acc[EC];
            for (int j = 0; j < EC; ++j) {
              wv[j] = load16(wpad.data() + (c + j) * D + d, m);
              acc[j] = _mm512_setzero_ps();
            }
            // R rows at a time: each row's dx is a chain of EC dependent multiply-adds, and one
            // row alone left the FMA units waiting on it (0.2 ms for 2048 rows of 128).
            auto rows = [&](auto r_const, int64_t t) {
              constexpr int R = decltype(r_const)::value;
              __m512 v[R], gt[R];
              for (int i = 0; i < R; ++i) {
                v[i] = load16(xp + (t + i) * D + d, m);
                gt[i] = _mm512_loadu_ps(&g[(t + i - r0) * 16]);
              }
              for (int j = 0; j < EC; ++j)
                for (int i = 0; i < R; ++i) {
                  const __m512 s = _mm512_set1_ps(c + j < E ? dl[(t + i) * E + c + j] : 0.0f);
                  gt[i] = _mm512_fmadd_ps(s, wv[j], gt[i]);
                  acc[j] = _mm512_fmadd_ps(s, v[i], acc[j]);
                }
              for (int i = 0; i < R; ++i) _mm512_storeu_ps(&g[(t + i - r0) * 16], gt[i]);
            };
            int64_t t = r0;
            for (; t + 4 <= r1; t += 4) rows(std::integral_constant<int, 4>{}, t);
            for (; t < r1; ++t) rows(std::integral_constant<int, 1>{}, t);
            for (int j = 0; j < EC; ++j) store16(&partial[(blk * E8 + c + j) * D + d], acc[j], m);
          }
          for (int64_t t = r0; t < r1; ++t) store16(dxp + t * D + d, _mm512_loadu_ps(&g[(t - r0) * 16]), m);
        }
      }
    });
  });
  auto dw = at::zeros({E, D}, w.options());
  float* dwp = dw.data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t i = 0; i < E * D; ++i) dwp[i] += partial[blk * E8 * D + i];
  return {dx, dw};
}

void add_router_ops(pybind11::module_& m) {
  m.attr("router_linear_experts") = MAX_LINEAR_EXPERTS;  // router_logits' limit
  m.def("router_logits", &router_logits, "x @ w^T in float32, for E <= router_linear_experts");
  m.def("router_linear_backward", &router_linear_backward, "dx and dw of router_logits");
  m.def("route_forward", &route_forward, "scores, top-k, gates and the router's sums");
  m.def("route_backward", &route_backward, "d logits of route_forward's outputs");
}
