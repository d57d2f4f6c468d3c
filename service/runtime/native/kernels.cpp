// CPU kernels of the decode step that PyTorch has no fast path for at a few rows:
//
//   nemotron::int4_matmul       x [M, K] times a weight-only 4-bit matrix (groups of 32 with an
//                               fp32 scale and minimum each), for the few rows of a decode step;
//   nemotron::int8_matmul       x [M, K] times an int8 matrix with an fp32 scale per output row;
//   nemotron::decode_attention  one query per sequence over the slots of the paged KV store it
//                               reads (no gathered copy), grouped-query heads.
//
// Built on the machine that runs it (service/runtime/native/__init__.py compiles this file with
// -march=native), so the AVX2 paths below are taken where the CPU has AVX2 and the plain loops
// otherwise. The products take the activations as int16 per group of 32 (Int16Rows: within a
// relative 1.5e-5 of the group's largest value) and sum weight x activation in int32 per group;
// scales, minimums and attention are fp32; the output is rounded once to the activations' dtype.
// Rows are split over torch's intra-op threads (at::parallel_for), so torch.set_num_threads
// governs them like every other kernel.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NEMOTRON_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 32;        // int4 values per group (the GGUF Q4_1 block)
constexpr int64_t kGroupBytes = 16;   // byte j holds value j (low nibble) and j + 16 (high)
constexpr int64_t kRowBlock = 4;      // activation rows sharing one decoded weight group
constexpr int64_t kGrainRows = 16;    // weight rows per parallel task, at least
constexpr int64_t kAttentionGrainWork = 1 << 16;  // multiply-adds per parallel attention task

// The activations as fp32 [M, K] (a copy: the kernels read every row once per weight row).
std::vector<float> rows_as_float(const at::Tensor& x) {
  const int64_t count = x.numel();
  std::vector<float> out(count);
  if (x.scalar_type() == at::kFloat) {
    const float* src = x.const_data_ptr<float>();
    std::copy(src, src + count, out.begin());
  } else {
    const c10::BFloat16* src = x.const_data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(src[i]);
  }
  return out;
}

// Where values go in an output of either dtype: the pointer resolved once per product (getting
// it from the tensor checks its storage and dtype, too slow for every element).
struct Output {
  float* f32 = nullptr;
  c10::BFloat16* bf16 = nullptr;
  explicit Output(const at::Tensor& out) {
    if (out.scalar_type() == at::kFloat) {
      f32 = out.mutable_data_ptr<float>();
    } else {
      bf16 = out.mutable_data_ptr<c10::BFloat16>();
    }
  }
  void store(int64_t index, float value) const {
    if (f32 != nullptr) {
      f32[index] = value;
    } else {
      bf16[index] = c10::BFloat16(value);
    }
  }
};

void check_rows(const at::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [rows, in] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == in_features, op, ": x has ", x.size(1), " columns, the matrix ",
              in_features);
}

#ifdef NEMOTRON_AVX2
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dot(w, x) over a group of 32 in 8 fp32 lanes: w as int16 in two halves (values 0..15 and
// 16..31), x the group's int16 activations; pairs summed in int32 (4 x 128 x 32767 fits).
inline __m256 group_dot(__m256i w_first, __m256i w_second, const int16_t* x) {
  const __m256i* xv = reinterpret_cast<const __m256i*>(x);
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w_first, _mm256_loadu_si256(xv)),
                                             _mm256_madd_epi16(w_second, _mm256_loadu_si256(xv + 1))));
}
#endif

// sum(a[i] * b[i]), i < count.
inline float dot(const float* a, const float* b, int64_t count) {
  int64_t i = 0;
  float total = 0.f;
#ifdef NEMOTRON_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  }
  total = horizontal_sum(acc);
#endif
  for (; i < count; ++i) total += a[i] * b[i];
  return total;
}

// The activations of a product as int16 per group of 32: x ~ step[g] * x16, step[g] =
// max|x_g| / 32767, rounded to nearest; each value within step / 2 of its fp32 one, 1.5e-5 of
// the group's largest (finer than the bf16 the activations arrive in for values above 1/128 of
// their group's largest, coarser below). Integer products of the 4-bit or int8 weights and
// int16 activations (pairs summed in int32) replace converting every weight to fp32. A group
// whose largest is below 1e-30 is all zeros (step 0); one holding an inf or NaN gets an
// infinite step and zero values, so its products come out NaN, as fp32 arithmetic's would.
struct Int16Rows {
  int64_t groups;               // per row: in / 32, rounded up (the last may be shorter)
  std::vector<int16_t> values;  // [rows, in]
  std::vector<float> step;      // [rows, groups]
  std::vector<float> sum;       // [rows, groups]: fp32 sums of the group's activations
  Int16Rows(const std::vector<float>& xf, int64_t rows, int64_t in_features)
      : groups((in_features + kGroup - 1) / kGroup), values(rows * in_features),
        step(rows * groups), sum(rows * groups) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = r * in_features + g * kGroup;
        const int64_t count = std::min(kGroup, in_features - g * kGroup);
        float top = 0.f, total = 0.f;
        bool finite = true;
        for (int64_t j = 0; j < count; ++j) {
          finite = finite && std::isfinite(xf[first + j]);
          top = std::max(top, std::abs(xf[first + j]));
          total += xf[first + j];
        }
        if (!finite) top = std::numeric_limits<float>::infinity();
        if (top < 1e-30f) top = 0.f;
        step[r * groups + g] = top / 32767.f;
        sum[r * groups + g] = total;
        const float inverse = top > 0.f && finite ? 32767.f / top : 0.f;
        for (int64_t j = 0; j < count; ++j) {
          values[first + j] = static_cast<int16_t>(std::nearbyint(xf[first + j] * inverse));
        }
      }
    }
  }
};

// out[r] = sum over groups of scale[g] * step_r[g] * dot(q_g, x16_r,g) + low[g] * sum_r[g].
template <int64_t Rows>
void int4_row(const uint8_t* q, const float* scale, const float* low, const Int16Rows& x,
              int64_t row, int64_t in_features, int64_t groups, float* out) {
  float totals[Rows];
  const int16_t* x16 = x.values.data() + row * in_features;
  const float* step = x.step.data() + row * groups;
#ifdef NEMOTRON_AVX2
  // Two accumulators per row, even and odd groups: one row's additions are not one long chain.
  __m256 acc[2][Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(0x0F);
  const auto add_group = [&](int64_t g, __m256* into) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * kGroupBytes));
    const __m256i low16 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));  // values 0..15
    const __m256i high16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
    for (int64_t r = 0; r < Rows; ++r) {
      into[r] = _mm256_fmadd_ps(group_dot(low16, high16, x16 + r * in_features + g * kGroup),
                                _mm256_set1_ps(scale[g] * step[r * groups + g]), into[r]);
    }
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    add_group(g, acc[0]);
    add_group(g + 1, acc[1]);
  }
  if (g < groups) add_group(g, acc[0]);
  for (int64_t r = 0; r < Rows; ++r) totals[r] = horizontal_sum(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
  for (int64_t r = 0; r < Rows; ++r) totals[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * kGroupBytes;
    for (int64_t r = 0; r < Rows; ++r) {
      const int16_t* xr = x16 + r * in_features + g * kGroup;
      int32_t d = 0;
      for (int64_t j = 0; j < kGroupBytes; ++j) d += (qg[j] & 0x0F) * xr[j] + (qg[j] >> 4) * xr[j + 16];
      totals[r] += scale[g] * step[r * groups + g] * static_cast<float>(d);
    }
  }
#endif
  for (int64_t r = 0; r < Rows; ++r) {
    out[r] = totals[r] + dot(low, x.sum.data() + (row + r) * groups, groups);
  }
}

// Calls row(Rows constant) with Rows = block (1..kRowBlock): the row kernels are templates on
// how many activation rows share each decoded weight group.
template <typename Kernel>
inline void with_block(int64_t block, Kernel row) {
  switch (block) {
    case 4: row(std::integral_constant<int64_t, 4>{}); break;
    case 3: row(std::integral_constant<int64_t, 3>{}); break;
    case 2: row(std::integral_constant<int64_t, 2>{}); break;
    default: row(std::integral_constant<int64_t, 1>{}); break;
  }
}

// out [rows, out features] of a product: weight rows split over torch's threads, each weight
// row against blocks of up to kRowBlock activation rows; compute(n, r, block, values) writes
// out[r .. r + block, n] into values, stored here in out's dtype.
template <typename Compute>
void for_each_output(const at::Tensor& out, Compute compute) {
  const int64_t rows = out.size(0), out_features = out.size(1);
  const Output destination(out);
  at::parallel_for(0, out_features, kGrainRows, [&](int64_t begin, int64_t end) {
    float values[kRowBlock];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r = 0; r < rows; r += kRowBlock) {
        const int64_t block = std::min(kRowBlock, rows - r);
        compute(n, r, block, values);
        for (int64_t i = 0; i < block; ++i) destination.store((r + i) * out_features + n, values[i]);
      }
    }
  });
}

void check_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low,
                const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              op, ": packed must be contiguous uint8 [out, in / 2]");
  const int64_t out_features = packed.size(0), in_features = packed.size(1) * 2;
  TORCH_CHECK(in_features % kGroup == 0, op, ": in features must be a multiple of ", kGroup);
  for (const at::Tensor* t : {&scale, &low}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == out_features && t->size(1) == in_features / kGroup,
                op, ": scale and low must be contiguous float32 [out, in / 32]");
  }
}

// Checks an int4 product's operands; its output [rows, out features], uninitialized.
at::Tensor int4_output(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& low, const char* op) {
  check_int4(packed, scale, low, op);
  check_rows(x, packed.size(1) * 2, op);
  return at::empty({x.size(0), packed.size(0)}, x.options());
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& low) {
  at::Tensor out = int4_output(x, packed, scale, low, "int4_matmul");
  if (out.numel() == 0) return out;
  const int64_t rows = x.size(0), in_features = x.size(1), groups = in_features / kGroup;
  const Int16Rows x16(rows_as_float(x), rows, in_features);
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  const float* sc = scale.const_data_ptr<float>();
  const float* lo = low.const_data_ptr<float>();
  for_each_output(out, [&](int64_t n, int64_t r, int64_t block, float* values) {
    with_block(block, [&](auto rows_in_block) {
      int4_row<decltype(rows_in_block)::value>(q + n * groups * kGroupBytes, sc + n * groups,
                                               lo + n * groups, x16, r, in_features, groups,
                                               values);
    });
  });
  return out;
}

// out[r] = scale * sum over groups of step_r[g] * dot(w_g, x16_r,g), r < rows: int8 weights
// times the int16 activations (Int16Rows), pairs summed in int32 (32 x 128 x 32767 fits).
template <int64_t Rows>
void int8_row(const int8_t* w, float scale, const Int16Rows& x, int64_t row, int64_t in_features,
              float* out) {
  const int64_t groups = x.groups, full = in_features / kGroup;
  float totals[Rows];
  int64_t g = 0;
#ifdef NEMOTRON_AVX2
  __m256 acc[2][Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  const auto add_group = [&](int64_t group, __m256* into) {
    const __m128i* wg = reinterpret_cast<const __m128i*>(w + group * kGroup);
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wg));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wg + 1));
    for (int64_t r = 0; r < Rows; ++r) {
      const int16_t* xr = x.values.data() + (row + r) * in_features + group * kGroup;
      into[r] = _mm256_fmadd_ps(group_dot(w0, w1, xr),
                                _mm256_set1_ps(x.step[(row + r) * groups + group]), into[r]);
    }
  };
  for (; g + 2 <= full; g += 2) {
    add_group(g, acc[0]);
    add_group(g + 1, acc[1]);
  }
  if (g < full) add_group(g++, acc[0]);
  for (int64_t r = 0; r < Rows; ++r) totals[r] = horizontal_sum(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
  for (int64_t r = 0; r < Rows; ++r) totals[r] = 0.f;
#endif
  for (; g < groups; ++g) {  // what the vector loop left: every group, or a last short one
    const int64_t first = g * kGroup, count = std::min(kGroup, in_features - first);
    for (int64_t r = 0; r < Rows; ++r) {
      const int16_t* xr = x.values.data() + (row + r) * in_features + first;
      int32_t d = 0;
      for (int64_t j = 0; j < count; ++j) d += w[first + j] * xr[j];
      totals[r] += x.step[(row + r) * groups + g] * static_cast<float>(d);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) out[r] = totals[r] * scale;
}

void check_int8(const at::Tensor& weight, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              op, ": weight must be contiguous int8 [out, in]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 &&
                  scale.size(0) == weight.size(0),
              op, ": scale must be contiguous float32 [out]");
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  check_int8(weight, scale, "int8_matmul");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  check_rows(x, in_features, "int8_matmul");
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return out;
  const Int16Rows x16(rows_as_float(x), rows, in_features);
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const float* sc = scale.const_data_ptr<float>();
  for_each_output(out, [&](int64_t n, int64_t r, int64_t block, float* values) {
    with_block(block, [&](auto rows_in_block) {
      int8_row<decltype(rows_in_block)::value>(w + n * in_features, sc[n], x16, r, in_features,
                                               values);
    });
  });
  return out;
}

// A row of the store (fp32 or bf16) as fp32.
template <typename T>
inline void row_as_float(const T* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

#ifdef NEMOTRON_AVX2
// Eight consecutive values of a row as fp32 lanes (bf16 is the top half of an fp32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#endif

#ifdef NEMOTRON_AVX2
// exp of eight lanes: within 1 ulp of the correctly rounded exp for x in [-87.3, 0] (checked
// in steps of 1e-4; below -87.3: ~1e-38, not 0); NaN stays NaN.
// Cephes' expf: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts),
// exp(r) by its degree-7 polynomial.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // maxps returns its second operand for NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// s = softmax(s) over `count` scores, in place.
inline void softmax(float* s, int64_t count) {
  const float top = *std::max_element(s, s + count);
  float total = 0.f;
  int64_t l = 0;
#ifdef NEMOTRON_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; l + 8 <= count; l += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(top)));
    _mm256_storeu_ps(s + l, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = horizontal_sum(sum);
#endif
  for (; l < count; ++l) total += (s[l] = std::exp(s[l] - top));
  const float inverse = 1.f / total;
  for (l = 0; l < count; ++l) s[l] *= inverse;
}

constexpr int64_t kQueryBlock = 4;  // query heads scored together against one key row

// scores[j * stride] = scale * dot(query_j, key) for the Count (<= kQueryBlock) queries from
// `query` (fp32, `dim` apart): the key row is read once for all of them, one accumulator each.
template <int64_t Count, typename T>
inline void score_block(const float* query, const T* key, int64_t dim, float scale,
                        float* scores, int64_t stride) {
  float totals[Count];
  int64_t i = 0;
#ifdef NEMOTRON_AVX2
  __m256 acc[Count];
  for (int64_t j = 0; j < Count; ++j) acc[j] = _mm256_setzero_ps();
  for (; i + 8 <= dim; i += 8) {
    const __m256 k = load8(key + i);
    for (int64_t j = 0; j < Count; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(query + j * dim + i), k, acc[j]);
    }
  }
  for (int64_t j = 0; j < Count; ++j) totals[j] = horizontal_sum(acc[j]);
#else
  for (int64_t j = 0; j < Count; ++j) totals[j] = 0.f;
#endif
  for (; i < dim; ++i) {
    const float k = static_cast<float>(key[i]);
    for (int64_t j = 0; j < Count; ++j) totals[j] += query[j * dim + i] * k;
  }
  for (int64_t j = 0; j < Count; ++j) scores[j * stride] = totals[j] * scale;
}

// out_j = sum over l < length of weights[j * stride + l] * value_l, j < Count (<= kQueryBlock),
// value_l the row at values + offsets[l]; out fp32, `dim` apart. Sixteen lanes of every row at a
// time, so that Count x 2 accumulators stay in registers across the rows.
template <int64_t Count, typename T>
void weighted_values(const T* values, const int64_t* offsets, int64_t length, int64_t dim,
                     const float* weights, int64_t stride, float* out) {
  int64_t i = 0;
#ifdef NEMOTRON_AVX2
  for (; i + 16 <= dim; i += 16) {
    __m256 acc[Count][2];
    for (int64_t j = 0; j < Count; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int64_t l = 0; l < length; ++l) {
      const T* v = values + offsets[l] + i;
      const __m256 v0 = load8(v), v1 = load8(v + 8);
      for (int64_t j = 0; j < Count; ++j) {
        const __m256 w = _mm256_set1_ps(weights[j * stride + l]);
        acc[j][0] = _mm256_fmadd_ps(w, v0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w, v1, acc[j][1]);
      }
    }
    for (int64_t j = 0; j < Count; ++j) {
      _mm256_storeu_ps(out + j * dim + i, acc[j][0]);
      _mm256_storeu_ps(out + j * dim + i + 8, acc[j][1]);
    }
  }
#endif
  for (; i < dim; ++i) {
    for (int64_t j = 0; j < Count; ++j) {
      float total = 0.f;
      for (int64_t l = 0; l < length; ++l) {
        total += weights[j * stride + l] * static_cast<float>(values[offsets[l] + i]);
      }
      out[j * dim + i] = total;
    }
  }
}

template <typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& read, const at::Tensor& lengths, double scale,
                 const at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), slots = keys.size(0), width = read.size(1);
  const int64_t group = heads / kv_heads;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = keys.const_data_ptr<T>();
  const T* vp = values.const_data_ptr<T>();
  const int64_t* rp = read.const_data_ptr<int64_t>();
  const int64_t* lp = lengths.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) {  // checked before any thread starts: errors propagate
    const int64_t length = std::min(std::max<int64_t>(lp[b], 1), width);
    for (int64_t l = 0; l < length; ++l) {
      const int64_t slot = rp[b * width + l];
      TORCH_CHECK(slot >= 0 && slot < slots, "decode_attention: slot ", slot, " is outside the store");
    }
  }
  // A task (one sequence's query heads of one KV head) is width * group * dim multiply-adds:
  // at one short sequence, far less than waking a second thread costs, so small steps stay on
  // the calling thread (parallel_for runs inline when the range fits in one grain).
  const int64_t grain = std::max<int64_t>(1, kAttentionGrainWork / std::max<int64_t>(1, width * group * dim));
  at::parallel_for(0, batch * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), scores;
    std::vector<int64_t> offsets(width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t length = std::min(std::max<int64_t>(lp[b], 1), width);
      const int64_t* slot_of = rp + b * width;
      for (int64_t l = 0; l < length; ++l) offsets[l] = (slot_of[l] * kv_heads + h) * dim;
      scores.resize(group * length);
      row_as_float(qp + (b * heads + h * group) * dim, group * dim, query.data());
      for (int64_t j = 0; j < group; j += kQueryBlock) {
        with_block(std::min(kQueryBlock, group - j), [&](auto count) {
          constexpr int64_t Count = decltype(count)::value;
          for (int64_t l = 0; l < length; ++l) {
            score_block<Count>(query.data() + j * dim, kp + offsets[l], dim,
                               static_cast<float>(scale), scores.data() + j * length + l, length);
          }
        });
      }
      for (int64_t j = 0; j < group; ++j) softmax(scores.data() + j * length, length);
      for (int64_t j = 0; j < group; j += kQueryBlock) {
        with_block(std::min(kQueryBlock, group - j), [&](auto count) {
          weighted_values<decltype(count)::value>(vp, offsets.data(), length, dim,
                                                  scores.data() + j * length, length,
                                                  acc.data() + j * dim);
        });
      }
      for (int64_t j = 0; j < group; ++j) {
        T* dst = op + (b * heads + h * group + j) * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(acc[j * dim + i]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& read, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(),
              "decode_attention: q [batch, heads, dim], keys and values [slots, kv heads, dim]");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() &&
                  read.is_contiguous() && lengths.is_contiguous(),
              "decode_attention: contiguous tensors only");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(),
              "decode_attention: q, keys and values must share a dtype");
  TORCH_CHECK(q.size(2) == keys.size(2) && keys.size(1) > 0 && q.size(1) % keys.size(1) == 0,
              "decode_attention: heads must be a multiple of kv heads, with the same head dim");
  TORCH_CHECK(read.dim() == 2 && read.size(0) == q.size(0) && read.scalar_type() == at::kLong &&
                  lengths.dim() == 1 && lengths.size(0) == q.size(0) &&
                  lengths.scalar_type() == at::kLong && read.size(1) > 0,
              "decode_attention: read int64 [batch, width > 0], lengths int64 [batch]");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat) {
    attend_rows<float>(q, keys, values, read, lengths, scale, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_attention: float32 or bfloat16 only");
    attend_rows<c10::BFloat16>(q, keys, values, read, lengths, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(nemotron, m) {
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scale, Tensor low) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor read, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nemotron, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("decode_attention", &decode_attention);
}
