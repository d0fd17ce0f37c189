// Attention of a decode step over a bf16 KV cache, for CPUs with AVX512-BF16: built with -mavx512bf16 by
// cpu_attention.py, and loaded only where the CPU has it.
//
// One query per row and head: out = softmax(q k^T / sqrt(D)) v over the first kv_len cache positions. Each thread
// takes a range of (row, head) pairs and walks the positions in order, so that with a position-major cache (all
// rows' keys of a position side by side) it reads the filled cache as one stream. Scores are exact products of
// bf16 summed in fp32 (_mm512_dpbf16_ps), as in the matmuls of a bf16 step; softmax and the weighted sum in fp32.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

namespace {

// e^x for x <= 0: 2^n e^r with n = round(x log2 e), |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 6
// (relative error under 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32).
inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

}  // namespace

// q [B, H, 1, D] bf16; keys, values [B, H, kv_len, D] bf16, any strides but a contiguous last dimension;
// D a multiple of 32 -> [B, H, 1, D] fp32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values) {
  const int64_t B = keys.size(0), H = keys.size(1), kv_len = keys.size(2), D = keys.size(3);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16, "decode_attention: bf16 q, keys and values");
  TORCH_CHECK(D % 32 == 0 && keys.stride(3) == 1 && values.stride(3) == 1 && values.strides() == keys.strides(),
              "decode_attention: head_dim a multiple of 32, keys and values alike with a contiguous last dim");
  TORCH_CHECK(kv_len >= 1 && values.sizes() == keys.sizes() && q.size(0) == B && q.size(1) == H && q.size(2) == 1 &&
              q.size(3) == D, "decode_attention: q [B, H, 1, D] for keys and values [B, H, kv_len, D]");
  const auto qc = q.contiguous();
  auto out = torch::zeros({B, H, 1, D}, q.options().dtype(at::kFloat));
  const int64_t row_stride = kv_len + 1;  // a pair's scores, then the reciprocal of their softmax sum
  auto scores = torch::empty({B * H, row_stride}, out.options());
  const at::BFloat16* qp = qc.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = keys.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = values.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  const int64_t sb = keys.stride(0), sh = keys.stride(1), sl = keys.stride(2);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));

  at::parallel_for(0, B * H, 64, [&](int64_t begin, int64_t end) {
    auto pair_offset = [&](int64_t i) { return (i / H) * sb + (i % H) * sh; };
    for (int64_t l = 0; l < kv_len; ++l) {  // scores, position by position
      for (int64_t i = begin; i < end; ++i) {
        const at::BFloat16* k = kp + pair_offset(i) + l * sl;
        const at::BFloat16* qi = qp + i * D;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32)
          acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qi + d), (__m512bh)_mm512_loadu_si512(k + d));
        sp[i * row_stride + l] = _mm512_reduce_add_ps(acc) * scale;
      }
    }
    for (int64_t i = begin; i < end; ++i) {  // softmax's numerators and the reciprocal of their sum
      float* s = sp + i * row_stride;
      float top = -INFINITY;
      for (int64_t l = 0; l < kv_len; ++l) top = std::max(top, s[l]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t l = 0; l < kv_len; l += 16) {
        const __mmask16 valid = kv_len - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (kv_len - l)) - 1);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + l), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(s + l, valid, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(valid, e));
      }
      s[kv_len] = 1.f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t l = 0; l < kv_len; ++l) {  // the weighted sum of the values, position by position
      for (int64_t i = begin; i < end; ++i) {
        const at::BFloat16* v = vp + pair_offset(i) + l * sl;
        const __m512 p = _mm512_set1_ps(sp[i * row_stride + l]);
        float* o = op + i * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_fmadd_ps(p, load_bf16(v + d), _mm512_loadu_ps(o + d)));
      }
    }
    for (int64_t i = begin; i < end; ++i) {
      const __m512 inverse_sum = _mm512_set1_ps(sp[i * row_stride + kv_len]);
      float* o = op + i * D;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), inverse_sum));
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one-query attention over a bf16 KV cache (AVX512-BF16)");
}
