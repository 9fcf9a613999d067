#include "matrix_merge_cuda.cuh"

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "../core/error.hpp"
#include "../methods/matrix_methods.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernels.cuh"

namespace isofast {
namespace {

std::mutex& context_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<std::pair<int, cudaStream_t>, std::unique_ptr<CudaContext>>& context_cache() {
  static std::map<std::pair<int, cudaStream_t>, std::unique_ptr<CudaContext>> cache;
  return cache;
}
CudaContext& cached_context(cudaStream_t stream) {
  int device = 0;
  ISOFAST_CUDA_CHECK(cudaGetDevice(&device));
  auto& slot = context_cache()[{device, stream}];
  if (!slot) slot = std::make_unique<CudaContext>(stream);
  return *slot;
}

template <class T>
void run(const MergeOptions& opt, const std::vector<DeviceTensor>& fts, const DeviceTensor* base,
         const DeviceTensor& out, cudaStream_t stream) {
  CudaContext& ctx = cached_context(stream);
  CudaBackend<T> be(ctx);
  const int rows = static_cast<int>(out.shape[1]), cols = static_cast<int>(out.shape[0]);
  const size_t count = static_cast<size_t>(rows) * cols;
  // Iso-C reads only the task sum: one matrix instead of T (as the CPU core streams it).
  const bool sum_only = opt.kernel == Kernel::IsoC;
  const size_t tasks = fts.size();
  std::vector<Matrix<T>> deltas(sum_only ? 1 : tasks);
  for (Matrix<T>& d : deltas) d = be.matrix(rows, cols);
  DeviceBuffer<int> bad(tasks, stream);
  ISOFAST_CUDA_CHECK(cudaMemsetAsync(bad.get(), 0, sizeof(int) * tasks, stream));
  for (size_t t = 0; t < tasks; ++t)
    cuda::accumulate_task<T>(fts[t].data, fts[t].dtype, base ? base->data : nullptr,
                             base ? base->dtype : DType::F32,
                             deltas[sum_only ? 0 : t].ptr(), count, !sum_only || t == 0,
                             bad.get() + t, stream);
  std::vector<int> host_bad(tasks);
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(host_bad.data(), bad.get(), sizeof(int) * tasks,
                                     cudaMemcpyDeviceToHost, stream));
  ctx.synchronize();
  for (size_t t = 0; t < tasks; ++t) {
    ISOFAST_CHECK(!(host_bad[t] & 2), "the base model's tensor holds NaN or Inf");
    ISOFAST_CHECK(!(host_bad[t] & 1), "the tensor of fine-tuned model ", t, " holds NaN or Inf");
  }
  MatrixProblem<T> p;
  p.rows = rows;
  p.cols = cols;
  for (const Matrix<T>& d : deltas) p.deltas.push_back(d.ptr());
  p.release_deltas = [&deltas] { deltas.clear(); };
  Matrix<T> m = be.matrix(rows, cols);
  if (opt.kernel == Kernel::IsoC)
    iso_c(be, p, opt.matrix, m.ptr());
  else if (opt.kernel == Kernel::IsoCts)
    iso_cts(be, p, opt.matrix, m.ptr());
  else
    tsv_m(be, p, opt.matrix, m.ptr());
  cuda::write_merged<T>(m.ptr(), opt.alpha, base ? base->data : nullptr,
                        base ? base->dtype : DType::F32, out.data, out.dtype, count, stream);
  ctx.synchronize();
}

}  // namespace

void merge_matrix_cuda(const MergeOptions& options, const std::vector<DeviceTensor>& finetuned,
                       const DeviceTensor* base, const DeviceTensor& out, cudaStream_t stream) {
  ISOFAST_CHECK(is_matrix_kernel(options.kernel), "the CUDA backend merges with iso_c, iso_cts "
                "or tsv_m; got ", kernel_name(options.kernel));
  ISOFAST_CHECK(!finetuned.empty(), "a GPU merge needs at least one fine-tuned tensor");
  ISOFAST_CHECK(out.shape.size() == 2, "the CUDA backend merges 2-D tensors, got ",
                out.shape.size(), " dimensions");
  ISOFAST_CHECK(out.shape[0] <= std::numeric_limits<int>::max() &&
                    out.shape[1] <= std::numeric_limits<int>::max(),
                "matrix too large for the CUDA backend");
  for (size_t t = 0; t < finetuned.size(); ++t)
    ISOFAST_CHECK(finetuned[t].shape == out.shape, "fine-tuned tensor ", t,
                  " has a different shape from the output");
  if (base) ISOFAST_CHECK(base->shape == out.shape, "the base tensor has a different shape");
  ISOFAST_CHECK(std::isfinite(options.alpha), "alpha must be finite, got ", options.alpha);
  if (out.numel() == 0) return;
  std::lock_guard<std::mutex> lock(context_mutex());
  if (options.compute64)
    run<double>(options, finetuned, base, out, stream);
  else
    run<float>(options, finetuned, base, out, stream);
}

void release_cuda_contexts() {
  std::lock_guard<std::mutex> lock(context_mutex());
  for (auto& [key, ctx] : context_cache()) {
    if (!ctx) continue;
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(key.first) == cudaSuccess) {
      cudaStreamSynchronize(key.second);
      ctx.reset();
      cudaMemPool_t pool = nullptr;  // hand the pool's kept memory back (CudaContext keeps it)
      if (cudaDeviceGetDefaultMemPool(&pool, key.first) == cudaSuccess) cudaMemPoolTrimTo(pool, 0);
      cudaSetDevice(previous);
    }
  }
  context_cache().clear();
}

}  // namespace isofast
