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
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;  // rows per partial sum: fixed, so sums do not depend on threads

struct Row {
  float max_logit = 0, sum_exp = 0;  // softmax(l) = exp(l - max) / sum_exp
  float score_sum = 0;               // sum of the scores (sigmoid; 1 for softmax)
  float lse() const { return max_logit + std::log(sum_exp); }
};

// Scores, probs and softmax(l) of one row into s, p and soft, with one exp per logit (the
// row's cost): sigmoid(l) = u / (u + exp(-max)) with u = exp(l - max), where exp(-max) is
// finite; otherwise directly.
Row scores_of(const float* l, int64_t E, bool sigmoid, float* s, float* p, float* soft) {
  Row r;
  r.max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) r.max_logit = std::max(r.max_logit, l[e]);
  for (int64_t e = 0; e < E; ++e) {
    soft[e] = std::exp(l[e] - r.max_logit);
    r.sum_exp += soft[e];
  }
  const float c = std::exp(-r.max_logit), inv = 1.0f / r.sum_exp;
  for (int64_t e = 0; e < E; ++e) {
    const float u = soft[e];
    soft[e] = u * inv;
    if (sigmoid) s[e] = std::isfinite(c) ? u / (u + c) : 1.0f / (1.0f + std::exp(-l[e]));
    else s[e] = soft[e];
    r.score_sum += s[e];
  }
  if (!sigmoid) r.score_sum = 1.0f;
  const float inv_sum = 1.0f / r.score_sum;
  for (int64_t e = 0; e < E; ++e) p[e] = sigmoid ? s[e] * inv_sum : s[e];
  return r;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "logits must be a contiguous float32 [T, E] CPU tensor");
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
    std::vector<float> s(E), p(E), soft(E), key(E);
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
        // Softmax: log p = l - lse, no log per logit.
        double entropy = 0;
        const float lse = r.lse();
        for (int64_t e = 0; e < E; ++e) {
          part[e] += p[e];
          const float log_p = sigmoid ? std::log(std::max(p[e], 1e-20f)) : std::max(l[e] - lse, -46.0517f);
          entropy -= p[e] * log_p;
        }
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
    std::vector<float> s(E), p(E), soft(E), ds(E);
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

void add_router_ops(pybind11::module_& m) {
  m.def("route_forward", &route_forward, "scores, top-k, gates and the router's sums");
  m.def("route_backward", &route_backward, "d logits of route_forward's outputs");
}
