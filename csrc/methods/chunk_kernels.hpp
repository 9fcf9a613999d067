// Per-chunk conversion kernels of the streaming merges (weight averaging, task arithmetic,
// the Iso-C task sum): they read every input byte once, so they run at memory speed only
// when vectorised wide and kept in L1. Built for AVX2 and for the baseline; the loader picks
// one per CPU.
#pragma once
#include <cstddef>

#include "../core/dtype.hpp"

namespace isofast {

// dst = src (n elements of dtype d) in the compute type; false if a value is NaN or +-inf.
template <class T>
bool load_chunk(const void* src, DType d, size_t n, T* dst);

// One chunk of a streamed sum over inputs read once: inputs[0] is the base, inputs[1..models)
// the fine-tuned tensors, n elements each. Forms sum = sum_t (x_t - base), added in task order
// from 0 (the order of the general path's task_sum), block by block in L1, and writes it to
// `sum` (if set) and/or out = base + alpha * (sum * scale) in out_dtype to `out` (if set).
// finite[m] is cleared when input m holds NaN or +-inf.
template <class T>
struct SumChunk {
  const void* const* inputs;
  const DType* dtypes;
  size_t models;
  size_t n;
  bool* finite;
  T* sum = nullptr;
  void* out = nullptr;
  DType out_dtype = DType::F32;
  T alpha = 1;
  T scale = 1;
};

template <class T>
void sum_chunk(const SumChunk<T>& job);

}  // namespace isofast
