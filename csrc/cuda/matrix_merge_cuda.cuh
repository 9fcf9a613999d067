// One 2-D key merged on the GPU by the same method code as on the CPU (iso_c.cpp, iso_cts.cpp,
// tsv_m.cpp over CudaBackend<T>): task matrices D_t = theta_t - theta_0 formed on the device
// from any float dtype (bf16 uploaded as is and converted there), the method run on the
// device, and base + alpha * M written in the output's dtype. All tensors are device memory;
// the work runs on `stream`, which is synchronised before returning.
#pragma once
#include <cuda_runtime.h>

#include <vector>

#include "../core/tensor_view.hpp"
#include "../methods/merge.hpp"

namespace isofast {

// The CPU core's view type, holding device pointers here.
using DeviceTensor = TensorView;

// finetuned[t]: theta_t (or D_t when base is null); out: same shape (any float dtype).
// options.kernel must be a matrix kernel (iso_c, iso_cts, tsv_m). Handles and workspaces are
// cached per (device, stream) between calls; calls are serialised.
void merge_matrix_cuda(const MergeOptions& options, const std::vector<DeviceTensor>& finetuned,
                       const DeviceTensor* base, const DeviceTensor& out, cudaStream_t stream);

// Destroy the cached handles (registered with Python's atexit by the module, so that it runs
// before the CUDA runtime shuts down; safe to call at any time).
void release_cuda_contexts();

}  // namespace isofast
