// SwiGLU on the CPU, forward and backward, one pass each (moe.kernels.cpu_activation has the
// contract). PyTorch's chunk, silu and multiply take two passes forward and, backward, two
// multiplies, silu's backward and a concatenation of the two halves' gradients: five passes
// over buffers larger than the caches, each rounding to bfloat16 in between.
//
// Rows are bfloat16 or float32; everything in between in float32, rounded once at the end.
// Shape legend: N rows, F hidden features (h holds the gate's F columns, then the up's).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu_simd.h"

namespace {

// exp(x) in float32: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor polynomial of
// degree 7 (error below 2^-24 of the result), times 2^n by scalef (which saturates to 0 or
// inf as exp does).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts:
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);    // exact n * hi
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// sigmoid(g) = 1 / (1 + exp(-g)); g past -88 makes exp overflow to inf and the result 0.
inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

void check_h(const at::Tensor& h) {
  check_rows(h, "h");
  TORCH_CHECK(h.size(1) % 2 == 0, "h must have an even number of columns (gate, then up)");
}

template <typename Body>
void with_type(const at::Tensor& h, Body body) {
  if (h.scalar_type() == at::kBFloat16) body(bf16{});
  else body(float{});
}

constexpr int64_t GRAIN = 16;  // rows per parallel task

}  // namespace

// a[n, f] = silu(h[n, f]) * h[n, F + f].
at::Tensor swiglu_forward(const at::Tensor& h) {
  check_h(h);
  const int64_t N = h.size(0), F = h.size(1) / 2;
  auto a = at::empty({N, F}, h.options());
  with_type(h, [&](auto t) {
    using T = decltype(t);
    const T* hp = data<T>(h);
    T* ap = data<T>(a);
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t f = 0; f < F; f += 16) {
          const __mmask16 m = first_lanes(F - f);
          const __m512 g = load16(hp + n * 2 * F + f, m), u = load16(hp + n * 2 * F + F + f, m);
          store16(ap + n * F + f, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u), m);
        }
    });
  });
  return a;
}

// dh = [da * u * silu'(g), da * silu(g)], silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
at::Tensor swiglu_backward(const at::Tensor& h, const at::Tensor& da) {
  check_h(h);
  const int64_t N = h.size(0), F = h.size(1) / 2;
  TORCH_CHECK(da.scalar_type() == h.scalar_type() && da.is_contiguous() && da.dim() == 2 && da.size(0) == N &&
                  da.size(1) == F,
              "da must be a contiguous [N, F] tensor of h's dtype");
  auto dh = at::empty_like(h);
  with_type(h, [&](auto t) {
    using T = decltype(t);
    const T *hp = data<T>(h), *dap = data<T>(da);
    T* dhp = data<T>(dh);
    const __m512 one = _mm512_set1_ps(1.0f);
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t f = 0; f < F; f += 16) {
          const __mmask16 m = first_lanes(F - f);
          const __m512 g = load16(hp + n * 2 * F + f, m), u = load16(hp + n * 2 * F + F + f, m);
          const __m512 d = load16(dap + n * F + f, m), s = sigmoid16(g);
          const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
          store16(dhp + n * 2 * F + f, _mm512_mul_ps(_mm512_mul_ps(d, u), dsilu), m);
          store16(dhp + n * 2 * F + F + f, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), m);
        }
    });
  });
  return dh;
}

void add_activation_ops(pybind11::module_& m) {
  m.def("swiglu_forward", &swiglu_forward, "a = silu(h[:, :F]) * h[:, F:]");
  m.def("swiglu_backward", &swiglu_backward, "dh of swiglu_forward");
}
