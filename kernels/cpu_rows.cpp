// Token dispatch on the CPU: the dispatch plan and the row primitives of permute and
// unpermute (moe.kernels.row_ops has the contract and the plain PyTorch versions), each one
// pass where PyTorch takes several operations.
//
// Why: at a small model width the layer's time is in these operations, not in its GEMMs. At
// the `tiny` preset's layer (2048 tokens, d=128, 8 experts, top-2) PyTorch's versions took
// two sorts and about 20 small operations to plan, and a gather, a multiply and a cast per
// row primitive, each a pass over a buffer larger than the L2 cache.
//
// Rows are bfloat16 or float32 in any combination of source and output; sums are float32.
// Shape legend: T tokens, K copies per token, E experts, N rows of the plan, D features.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace {

// Calls body(S{}, O{}) with the element types of a source and an output tensor.
template <typename Body>
void with_row_types(const at::Tensor& src, at::ScalarType out, Body body) {
  const bool src_bf16 = src.scalar_type() == at::kBFloat16, out_bf16 = out == at::kBFloat16;
  if (src_bf16 && out_bf16) body(bf16{}, bf16{});
  else if (src_bf16) body(bf16{}, float{});
  else if (out_bf16) body(float{}, bf16{});
  else body(float{}, float{});
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous int64 CPU tensor");
}

// Optional float32 weights, one per index entry.
const float* weights_of(const c10::optional<at::Tensor>& w, int64_t n) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == n,
              "weights must be contiguous float32, one per index entry");
  return w->data_ptr<float>();
}

constexpr int64_t GRAIN = 64;  // rows per parallel task

}  // namespace

// out[n] = src[index[n]] * scale[n] (no scale: 1), in dtype `out`.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index,
                       const c10::optional<at::Tensor>& scale, at::ScalarType out_dtype) {
  check_rows(src, "src");
  check_index(index, "index");
  const int64_t N = index.numel(), D = src.size(1), T = src.size(0);
  const float* s = weights_of(scale, N);
  const int64_t* idx = index.data_ptr<int64_t>();
  auto out = at::empty({N, D}, src.options().dtype(out_dtype));
  with_row_types(src, out_dtype, [&](auto st, auto ot) {
    using S = decltype(st);
    using O = decltype(ot);
    const S* x = data<S>(src);
    O* y = data<O>(out);
    at::parallel_for(0, N, GRAIN, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        TORCH_CHECK(idx[n] >= 0 && idx[n] < T, "gather_rows: index ", idx[n], " out of range");
        const S* r = x + idx[n] * D;
        O* o = y + n * D;
        if constexpr (std::is_same_v<S, O>) {
          if (s == nullptr) {
            std::memcpy(o, r, D * sizeof(S));
            continue;
          }
        }
        const __m512 g = _mm512_set1_ps(s ? s[n] : 1.0f);
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = first_lanes(D - d);
          store16(o + d, _mm512_mul_ps(load16(r + d, m), g), m);
        }
      }
    });
  });
  return out;
}

// out[t] = sum over k with pos[t, k] >= 0 of weight[t, k] * y[pos[t, k]] (no weight: 1), in
// dtype `out`; rows of y past the ones a copy names are never read.
at::Tensor combine_rows(const at::Tensor& y, const at::Tensor& pos,
                        const c10::optional<at::Tensor>& weight, at::ScalarType out_dtype) {
  check_rows(y, "y");
  check_index(pos, "pos");
  TORCH_CHECK(pos.dim() == 2, "pos must be [T, K]");
  const int64_t T = pos.size(0), K = pos.size(1), D = y.size(1), N = y.size(0);
  const float* w = weights_of(weight, T * K);
  const int64_t* p = pos.data_ptr<int64_t>();
  auto out = at::empty({T, D}, y.options().dtype(out_dtype));
  with_row_types(y, out_dtype, [&](auto st, auto ot) {
    using S = decltype(st);
    using O = decltype(ot);
    const S* src = data<S>(y);
    O* dst = data<O>(out);
    at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
      std::vector<const S*> rows(K);
      std::vector<__m512> gates(K);
      for (int64_t t = lo; t < hi; ++t) {
        // The token's copies, checked and their gates broadcast once, not per 16 features:
        // per vector, this loop made the combine run at a fifth of a copy's rate.
        int64_t n = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = p[t * K + k];
          if (row < 0) continue;  // a dropped copy
          TORCH_CHECK(row < N, "combine_rows: position ", row, " past the ", N, " rows");
          rows[n] = src + row * D;
          gates[n++] = _mm512_set1_ps(w ? w[t * K + k] : 1.0f);
        }
        O* o = dst + t * D;
        if (n == 2) {  // top-2, the common case: no loop over copies
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = first_lanes(D - d);
            store16(o + d, _mm512_fmadd_ps(gates[1], load16(rows[1] + d, m),
                                           _mm512_mul_ps(gates[0], load16(rows[0] + d, m))), m);
          }
          continue;
        }
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = first_lanes(D - d);
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < n; ++i) acc = _mm512_fmadd_ps(gates[i], load16(rows[i] + d, m), acc);
          store16(o + d, acc, m);
        }
      }
    });
  });
  return out;
}

// out[t, k] = <y[pos[t, k]], g[t]> in float32, 0 where pos[t, k] < 0 (the gate gradient).
at::Tensor copy_dot_rows(const at::Tensor& y, const at::Tensor& pos, const at::Tensor& g) {
  check_rows(y, "y");
  check_rows(g, "g");
  check_index(pos, "pos");
  const int64_t T = pos.size(0), K = pos.size(1), D = y.size(1), N = y.size(0);
  TORCH_CHECK(g.size(0) == T && g.size(1) == D, "g must be [T, D] like the plan and y");
  const int64_t* p = pos.data_ptr<int64_t>();
  auto out = at::empty({T, K}, y.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  with_row_types(y, g.scalar_type(), [&](auto yt, auto gt) {
    using Y = decltype(yt);
    using G = decltype(gt);
    const Y* src = data<Y>(y);
    const G* grad = data<G>(g);
    at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        for (int64_t k = 0; k < K; ++k)
          TORCH_CHECK(p[t * K + k] < N, "copy_dot_rows: position ", p[t * K + k], " past the ", N, " rows");
        const G* gt = grad + t * D;
        const int64_t* pt = p + t * K;
        if (K == 2 && pt[0] >= 0 && pt[1] >= 0) {  // top-2: the token's gradient read once
          const Y *y0 = src + pt[0] * D, *y1 = src + pt[1] * D;
          __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = first_lanes(D - d);
            const __m512 gv = load16(gt + d, m);
            acc0 = _mm512_fmadd_ps(load16(y0 + d, m), gv, acc0);
            acc1 = _mm512_fmadd_ps(load16(y1 + d, m), gv, acc1);
          }
          o[t * K] = _mm512_reduce_add_ps(acc0);
          o[t * K + 1] = _mm512_reduce_add_ps(acc1);
          continue;
        }
        for (int64_t k = 0; k < K; ++k) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; pt[k] >= 0 && d < D; d += 16) {
            const __mmask16 m = first_lanes(D - d);
            acc = _mm512_fmadd_ps(load16(src + pt[k] * D + d, m), load16(gt + d, m), acc);
          }
          o[t * K + k] = _mm512_reduce_add_ps(acc);
        }
      }
    });
  });
  return out;
}

// The dropless plan with sequence priority (moe.kernels.dispatch_plan has the contract): a
// counting sort of the copies by expert in (k, t) order, which is the stable sort's order.
// Returns row_token_N, row_copy_N, pos_TK, counts_E (int64) and offsets_E (int32); nothing
// when an id is out of range.
std::vector<at::Tensor> plan_dropless(const at::Tensor& ids, int64_t E) {
  check_index(ids, "ids");
  TORCH_CHECK(ids.dim() == 2, "ids must be [T, K]");
  const int64_t T = ids.size(0), K = ids.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  auto opts = ids.options();
  auto counts = at::zeros({E}, opts);
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i) {
    if (id[i] < 0 || id[i] >= E) return {};  // the caller names the bad id (no C++ exception:
    ++c[id[i]];                              // one crashed the process on a GPU image)
  }
  auto offsets = at::empty({E}, opts.dtype(at::kInt));
  std::vector<int64_t> next(E);
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = end;
    end += c[e];
    offsets.data_ptr<int32_t>()[e] = (int32_t)end;
  }
  auto row_token = at::empty({T * K}, opts), row_copy = at::empty({T * K}, opts), pos = at::empty({T, K}, opts);
  int64_t *rt = row_token.data_ptr<int64_t>(), *rc = row_copy.data_ptr<int64_t>(), *ps = pos.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t copy = t * K + k, row = next[id[copy]]++;
      rt[row] = t;
      rc[row] = copy;
      ps[copy] = row;
    }
  }
  return {row_token, row_copy, pos, counts, offsets};
}

void add_row_ops(pybind11::module_& m) {
  m.def("gather_rows", &gather_rows, "out[n] = src[index[n]] * scale[n]");
  m.def("combine_rows", &combine_rows, "out[t] = sum_k weight[t, k] * y[pos[t, k]]");
  m.def("copy_dot_rows", &copy_dot_rows, "out[t, k] = <y[pos[t, k]], g[t]>");
  m.def("plan_dropless", &plan_dropless, "dropless dispatch plan, sequence priority");
}
