#include "chunk_kernels.hpp"

#include <cstdint>
#include <cstring>

namespace isofast {
namespace {

// One body, compiled once per target below: inlined into each clone, it is vectorised with
// that clone's instruction set.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define ISOFAST_WIDE __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef ISOFAST_WIDE
#define ISOFAST_WIDE
#endif
#define ISOFAST_INLINE inline __attribute__((always_inline))

// Reads ahead of a stream: the hardware prefetcher stops at every 4 KiB page of a memory-
// mapped file, and without this the streaming merges ran at half the speed of reading their
// inputs (measured 3.9 vs 5.6 GiB/s on one core).
constexpr size_t kAheadBytes = 8192;

ISOFAST_INLINE void prefetch_next(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p) + kAheadBytes;
  for (size_t l = 0; l < bytes; l += 64) __builtin_prefetch(c + l);
}

// fn(i, value) for n bf16 inputs; false if any is NaN or +-inf. The check runs on the 16-bit
// inputs (|x| as bits is >= 0x7f80 exactly then: 16 to a 256-bit register), beside the
// conversion, which widens to 8 to a register.
template <class Fn>
ISOFAST_INLINE bool visit_bf16(const uint16_t* p, size_t n, Fn&& fn) {
  uint16_t largest = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint16_t magnitude = static_cast<uint16_t>(p[i] & 0x7fffu);
    largest = magnitude > largest ? magnitude : largest;
    fn(i, bf16_to_float(p[i]));
  }
  return largest < 0x7f80u;
}

template <class T>
ISOFAST_INLINE bool load_block(const void* src, DType d, size_t n, T* dst) {
  if (d != DType::BF16) return load_as(src, d, n, dst);
  return visit_bf16(static_cast<const uint16_t*>(src), n,
                    [dst](size_t i, float x) { dst[i] = static_cast<T>(x); });
}

// A whole chunk, in blocks of 2 KiB, each prefetching ahead: blocks keep the vectorised loop
// long (one per cache line was not).
template <class T>
ISOFAST_INLINE bool load_any(const void* src, DType d, size_t n, T* dst) {
  constexpr size_t kBlock = 1024;  // elements
  if (d != DType::BF16) return load_as(src, d, n, dst);
  const uint16_t* p = static_cast<const uint16_t*>(src);
  bool finite = true;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = b + kBlock < n ? kBlock : n - b;
    prefetch_next(p + b, m * sizeof(uint16_t));
    if (!load_block(p + b, d, m, dst + b)) finite = false;
  }
  return finite;
}

// One block of a streamed sum, small enough for L1: base and sum never leave it, and every
// input is read once.
constexpr size_t kSumBlock = 512;  // elements

template <class T>
ISOFAST_INLINE bool add_delta_block(const void* src, DType d, size_t n, const T* base, T* acc,
                                    T* scratch) {
  if (d == DType::BF16)
    return visit_bf16(static_cast<const uint16_t*>(src), n, [base, acc](size_t i, float x) {
      acc[i] += static_cast<T>(x) - base[i];
    });
  if (d == DType::F32) {
    const float* p = static_cast<const float*>(src);
    uint32_t hit = 0;
    for (size_t i = 0; i < n; ++i) {
      uint32_t b;
      std::memcpy(&b, p + i, 4);
      hit |= static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
      acc[i] += static_cast<T>(p[i]) - base[i];
    }
    return hit == 0;
  }
  // Other dtypes (f16, f64): convert first; f64 -> f32 may overflow, which the check sees.
  const bool finite = load_as(src, d, n, scratch);
  for (size_t i = 0; i < n; ++i) acc[i] += scratch[i] - base[i];
  return finite;
}

template <class T>
ISOFAST_INLINE void sum_chunk_any(const SumChunk<T>& job) {
  T base[kSumBlock], acc[kSumBlock], scratch[kSumBlock];
  for (size_t o = 0; o < job.n; o += kSumBlock) {
    const size_t m = job.n - o < kSumBlock ? job.n - o : kSumBlock;
    for (size_t k = 0; k < job.models; ++k) {
      const size_t size = dtype_size(job.dtypes[k]);
      const char* src = static_cast<const char*>(job.inputs[k]) + o * size;
      prefetch_next(src, m * size);
      if (k == 0) {
        if (!load_block(src, job.dtypes[0], m, base)) job.finite[0] = false;
        for (size_t i = 0; i < m; ++i) acc[i] = T(0);
      } else if (!add_delta_block(src, job.dtypes[k], m, base, acc, scratch)) {
        job.finite[k] = false;
      }
    }
    if (job.sum != nullptr)
      for (size_t i = 0; i < m; ++i) job.sum[o + i] = acc[i];
    if (job.out != nullptr) {
      for (size_t i = 0; i < m; ++i) acc[i] = base[i] + job.alpha * (acc[i] * job.scale);
      store_as(acc, m, static_cast<char*>(job.out) + o * dtype_size(job.out_dtype),
               job.out_dtype);
    }
  }
}

ISOFAST_WIDE bool load_f(const void* src, DType d, size_t n, float* dst) {
  return load_any(src, d, n, dst);
}
ISOFAST_WIDE bool load_d(const void* src, DType d, size_t n, double* dst) {
  return load_any(src, d, n, dst);
}
ISOFAST_WIDE void sum_f(const SumChunk<float>& job) { sum_chunk_any(job); }
ISOFAST_WIDE void sum_d(const SumChunk<double>& job) { sum_chunk_any(job); }

}  // namespace

template <>
bool load_chunk<float>(const void* src, DType d, size_t n, float* dst) {
  return load_f(src, d, n, dst);
}
template <>
bool load_chunk<double>(const void* src, DType d, size_t n, double* dst) {
  return load_d(src, d, n, dst);
}
template <>
void sum_chunk<float>(const SumChunk<float>& job) {
  sum_f(job);
}
template <>
void sum_chunk<double>(const SumChunk<double>& job) {
  sum_d(job);
}

}  // namespace isofast
