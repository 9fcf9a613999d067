// Per-chunk conversion kernels of the streaming merges (weight averaging, task arithmetic,
// the Iso-C task sum): they read every input byte once, so they run at memory speed only
// when vectorised wide. Built for AVX2 and for the baseline; the loader picks one per CPU.
#pragma once
#include <cstddef>

#include "../core/dtype.hpp"

namespace isofast {

// dst = src (n elements of dtype d) in the compute type; false if a value is NaN or +-inf.
template <class T>
bool load_chunk(const void* src, DType d, size_t n, T* dst);

// acc += src - base, elementwise, src converted as by load_chunk; false on NaN/inf in src.
// `scratch` (n elements) is used for dtypes without a fused loop.
template <class T>
bool add_delta_chunk(const void* src, DType d, size_t n, const T* base, T* acc, T* scratch);

// acc = base + alpha * (acc * scale), then stored as n elements of dtype d at dst.
template <class T>
void store_linear_chunk(const T* base, T alpha, T scale, T* acc, size_t n, void* dst, DType d);

}  // namespace isofast
