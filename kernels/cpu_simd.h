// Helpers shared by our CPU kernels (cpu_gemm.cpp, cpu_rows.cpp, cpu_router.cpp,
// cpu_activation.cpp): a tensor's elements as bf16 or float, 16 float32 lanes of AVX-512
// loaded from and stored to them, and the check of a row tensor.
//
// torch's extension loader rebuilds when a source file or a flag changes, not a header:
// cpu_gemm.py passes this file's digest as a flag.

#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <type_traits>

using bf16 = uint16_t;

// A bfloat16 or float32 tensor's elements (the caller has checked the dtype).
template <typename T>
T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, bf16>) return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  else return t.data_ptr<float>();
}

// The first n lanes (none for n <= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // round to nearest even

// 16 values (the first lanes of m) as float32, from float32 or bfloat16 ...
inline __m512 load16(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// ... and back, rounded to nearest even for bfloat16 (as .to() rounds). Masked only where m
// is partial: on AMD's Zen a masked store costs several plain ones (a gather of 4096
// bfloat16 rows of 128 took 76 us with masked stores, 24 us without).
inline void store16(float* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) _mm512_storeu_ps(p, v);
  else if (m) _mm512_mask_storeu_ps(p, m, v);
}
inline void store16(bf16* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) _mm256_storeu_si256((__m256i*)p, to_bf16(v));
  else if (m) _mm256_mask_storeu_epi16(p, m, to_bf16(v));
}

// Rows as our row kernels take them: a contiguous 2-d bfloat16 or float32 CPU tensor.
inline void check_rows(const at::Tensor& t, const char* name) {
  const bool ok = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat;
  TORCH_CHECK(ok && t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 2-d bfloat16 or float32 CPU tensor");
}
