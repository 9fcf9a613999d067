#include "merge.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <memory>

#include <sys/mman.h>
#include <unistd.h>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/rng.hpp"
#include "../core/route_log.hpp"
#include "../linalg/backend.hpp"
#include "chunk_kernels.hpp"
#include "della.hpp"
#include "sce.hpp"
#include "elementwise.hpp"
#include "interpolation.hpp"
#include "matrix_methods.hpp"

namespace isofast {
namespace {

constexpr size_t kChunk = 1 << 15;
constexpr int64_t kBlasThreadsFrom = 1 << 20;  // elements

std::string model_label(size_t model) {
  return model == 0 ? std::string("the base model") : concat("fine-tuned model ", model - 1);
}

// Task vectors of one tensor in the compute type, DARE already applied. The base is not kept:
// the final write reads it again from the caller's memory (one copy fewer at peak).
template <class T>
struct TaskVectors {
  size_t n = 0;
  std::vector<std::vector<T>> deltas;
  std::vector<T*> ptrs;
};

const char* element_ptr(const TensorView& v, size_t index) {
  return static_cast<const char*>(v.data) + index * dtype_size(v.dtype);
}

const TensorView& input_of(const MergeItem& item, size_t model) {
  return model == 0 ? item.base : item.finetuned[model - 1];
}

// The bytes of elements [first, first + count) of input `model` (0: the base): a pointer into
// memory, or for a tensor still in its file, the bytes read into `buf`.
const void* input_chunk(const MergeItem& item, size_t model, size_t first, size_t count,
                        std::vector<char>& buf) {
  const TensorView& v = input_of(item, model);
  if (v.fd < 0) return element_ptr(v, first);
  const size_t size = dtype_size(v.dtype);
  buf.resize(count * size);
  size_t done = 0;
  while (done < buf.size()) {
    const off_t at = static_cast<off_t>(v.file_offset + static_cast<int64_t>(first * size + done));
    const ssize_t got = pread(v.fd, buf.data() + done, buf.size() - done, at);
    if (got < 0 && errno == EINTR) continue;
    ISOFAST_CHECK(got >= 0, "tensor '", item.name, "' of ", model_label(model),
                  ": read failed: ", std::strerror(errno));
    ISOFAST_CHECK(got > 0, "tensor '", item.name, "' of ", model_label(model),
                  ": the file ended before the tensor did (was it changed during the merge?)");
    done += static_cast<size_t>(got);
  }
  return buf.data();
}

// Drop the resident pages of a read-only file mapping (they stay in the page cache), so the
// process's RSS holds converted task vectors only. Never used on anonymous memory, where
// MADV_DONTNEED would zero the data: the caller opts in for memory-mapped files only.
// Rounded out to whole pages: a dropped page of a read-only file mapping that a neighbouring
// chunk or tensor still reads is simply faulted in again from the page cache.
void release_range(const TensorView& v, size_t first_elem, size_t count) {
  if (v.fd >= 0) return;  // read from its file: nothing mapped
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(element_ptr(v, first_elem));
  const uintptr_t first = begin / page * page;
  const uintptr_t last = (begin + count * dtype_size(v.dtype) + page - 1) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

void release_pages(const TensorView& v) {
  release_range(v, 0, static_cast<size_t>(v.numel()));
}

template <class T>
TaskVectors<T> load_task_vectors(const MergeOptions& opt, const MergeItem& item) {
  TaskVectors<T> tv;
  tv.n = static_cast<size_t>(item.base.numel());
  const size_t tasks = item.finetuned.size();
  tv.deltas.assign(tasks, std::vector<T>(tv.n));
  std::vector<std::atomic<bool>> bad(tasks + 1);
  const size_t chunks = (tv.n + kChunk - 1) / kChunk;
  parallel_take(chunks, opt.threads, [&](auto take) {
    std::vector<T> base(kChunk);
    std::vector<char> raw;
    for (size_t c = take(); c < chunks; c = take()) {
      const size_t b = c * kChunk, len = std::min(kChunk, tv.n - b);
      if (!load_chunk(input_chunk(item, 0, b, len, raw), item.base.dtype, len, base.data()))
        bad[0] = true;
      for (size_t t = 0; t < tasks; ++t) {
        T* d = tv.deltas[t].data() + b;
        if (!load_chunk(input_chunk(item, t + 1, b, len, raw), item.finetuned[t].dtype, len, d))
          bad[t + 1] = true;
        for (size_t i = 0; i < len; ++i) d[i] -= base[i];
        // Drop each converted chunk's file pages at once: with T inputs mapped, keeping them
        // to the end of the load would hold T more input-sized copies at the peak.
        if (opt.release_inputs) release_range(item.finetuned[t], b, len);
      }
    }
  });
  for (size_t m = 0; m <= tasks; ++m)
    ISOFAST_CHECK(!bad[m], "tensor '", item.name, "' of ", model_label(m), " holds NaN or Inf");
  for (size_t t = 0; t < tasks; ++t) {
    if (opt.dare.drop_rate > 0)
      dare_drop(tv.deltas[t].data(), tv.n, opt.dare.drop_rate, opt.dare.seed, item.name, t,
                opt.threads);
    tv.ptrs.push_back(tv.deltas[t].data());
  }
  return tv;
}

// The base tensor in the compute type (for the methods that interpolate full weights).
template <class T>
std::vector<T> load_base(const MergeOptions& opt, const MergeItem& item) {
  const size_t n = static_cast<size_t>(item.base.numel());
  std::vector<T> base(n);
  const size_t chunks = (n + kChunk - 1) / kChunk;
  parallel_take(chunks, opt.threads, [&](auto take) {
    std::vector<char> raw;
    for (size_t c = take(); c < chunks; c = take()) {
      const size_t b = c * kChunk, len = std::min(kChunk, n - b);
      load_chunk(input_chunk(item, 0, b, len, raw), item.base.dtype, len, base.data() + b);
    }
  });
  return base;
}

template <class T>
void slerp_dispatch(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv, T* m) {
  const SlerpOptions& s = opt.slerp;
  ISOFAST_CHECK(std::isfinite(s.t), "tensor '", item.name, "': slerp t must be finite");
  const T* other = tv.ptrs[0];
  if (tv.ptrs.size() > 1) {  // several fine-tunes: the other endpoint is their mean
    task_sum(tv.ptrs, tv.n, true, m, opt.threads);
    other = m;
  }
  const std::vector<T> base = load_base<T>(opt, item);
  slerp_update(base.data(), other, tv.n, s.t, s.dot_threshold, s.eps, m, opt.threads);
}

template <class T>
void model_stock_dispatch(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv,
                          T* m) {
  ISOFAST_CHECK(tv.ptrs.size() >= 2, "tensor '", item.name,
                "': model_stock needs at least two fine-tuned models, got ", tv.ptrs.size());
  const std::vector<int64_t>& shape = item.base.shape;
  const size_t row_len = opt.model_stock.filter_wise && shape.size() >= 2
                             ? static_cast<size_t>(shape.back())
                             : tv.n;
  model_stock_update(tv.ptrs, tv.n, row_len, m, opt.threads);
}

// A per-task option: its value for task t; one value is every task's, none is `fallback`.
std::vector<double> task_values(const std::vector<double>& values, size_t tasks, double fallback,
                                const char* method, const char* what) {
  if (values.empty()) return std::vector<double>(tasks, fallback);
  if (values.size() == 1) return std::vector<double>(tasks, values[0]);
  ISOFAST_CHECK(values.size() == tasks, method, ": ", values.size(), " ", what, " for ", tasks,
                " tasks");
  return values;
}

template <class T>
void nuslerp_dispatch(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv, T* m) {
  const NuslerpOptions& o = opt.nuslerp;
  const size_t tasks = tv.ptrs.size();
  const std::vector<double> w = task_values(o.weights, tasks, 1.0, "nuslerp", "weights");
  const std::vector<int64_t>& shape = item.base.shape;
  size_t len = tv.n;
  bool strided = false;
  if (!o.flatten && !shape.empty()) {
    strided = o.row_wise;
    len = static_cast<size_t>(o.row_wise ? shape.front() : shape.back());
  }
  // mergekit's pair (T = 2); more tasks fold in one at a time, the running result weighted
  // by the sum of the weights so far (a running spherical mean); one task: D_0.
  std::copy(tv.ptrs[0], tv.ptrs[0] + tv.n, m);
  double seen = w[0];
  for (size_t k = 1; k < tasks; ++k) {
    const double total = seen + w[k];
    const double t = std::fabs(total) < 1e-6 ? 0.5 : w[k] / total;
    ISOFAST_CHECK(std::isfinite(t), "tensor '", item.name, "': nuslerp weights must be finite");
    nuslerp_update(m, tv.ptrs[k], tv.n, len, strided, t, o.eps, m, opt.threads);
    seen = total;
  }
}

template <class T>
void multislerp_dispatch(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv,
                         T* m) {
  const MultislerpOptions& o = opt.multislerp;
  const std::vector<double> w =
      task_values(o.weights, tv.ptrs.size(), 1.0, "multislerp", "weights");
  for (double v : w)
    ISOFAST_CHECK(std::isfinite(v), "tensor '", item.name, "': multislerp weights must be finite");
  multislerp_update(tv.ptrs, tv.n, w, o.normalize_weights, o.eps, m, opt.threads);
}

template <class T>
void karcher_dispatch(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv, T* m) {
  const KarcherOptions& o = opt.karcher;
  ISOFAST_CHECK(o.max_iter >= 0 && std::isfinite(o.tol) && o.tol >= 0, "tensor '", item.name,
                "': karcher needs max_iter >= 0 and a finite tol >= 0");
  const std::vector<T> base = load_base<T>(opt, item);
  karcher_update(base.data(), tv.ptrs, tv.n, o.max_iter, o.tol, m, opt.threads);
}

template <class T>
TiesSpec ties_spec(const MergeOptions& opt, const TaskVectors<T>& tv) {
  TiesSpec spec;
  spec.sum = opt.ties.sum;
  if (opt.ties.trim_global) {
    ISOFAST_CHECK(opt.ties.thresholds.size() == tv.ptrs.size(),
                  "global TIES needs one threshold per task");
    spec.thresholds = opt.ties.thresholds;
    spec.majority_sign = opt.ties.majority_sign;
    return spec;
  }
  for (T* d : tv.ptrs) spec.thresholds.push_back(ties_threshold(d, tv.n, opt.ties.density));
  const int64_t vote = ties_sign_vote(tv.ptrs, tv.n, spec, opt.threads);
  spec.majority_sign = (vote > 0) - (vote < 0);
  return spec;
}

// A per-task option: its value for task t; one value is every task's, none is `fallback`.
double per_task(const std::vector<double>& values, size_t t, size_t tasks, double fallback,
                const char* what) {
  if (values.empty()) return fallback;
  if (values.size() == 1) return values[0];
  ISOFAST_CHECK(values.size() == tasks, "gta: ", values.size(), " ", what, " for ", tasks,
                " tasks");
  return values[t];
}

template <class T>
void gta_update(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv, T* m) {
  const GtaOptions& g = opt.gta;
  const size_t tasks = tv.ptrs.size();
  std::vector<double> weights(tasks);
  // DELLA's rows: along the second axis (a 1-D tensor: one row), as mergekit ranks them.
  const std::vector<int64_t>& shape = item.base.shape;
  const size_t row_len = shape.size() >= 2 ? static_cast<size_t>(shape[1]) : tv.n;
  const size_t row_stride =
      shape.size() >= 2 && row_len > 0 ? tv.n / (static_cast<size_t>(shape[0]) * row_len) : 1;
  for (size_t t = 0; t < tasks; ++t) {
    const double density = per_task(g.densities, t, tasks, 1.0, "densities");
    if (g.sparsify == Sparsify::DellaMagprune)
      della_magprune(tv.ptrs[t], tv.n, row_len, row_stride, density,
                     per_task(g.epsilons, t, tasks, 0.15, "epsilons"), g.rescale,
                     dare_key(opt.dare.seed, item.name, t), opt.threads);
    else
      gta_sparsify(tv.ptrs[t], tv.n, static_cast<int>(g.sparsify), density,
                   per_task(g.gammas, t, tasks, 0.0, "gammas"), g.rescale,
                   dare_key(opt.dare.seed, item.name, t), opt.threads);
    weights[t] = per_task(g.weights, t, tasks, 1.0, "weights");
    const T w = static_cast<T>(weights[t]);
    if (w != T(1)) {
      T* d = tv.ptrs[t];
      parallel_for(tv.n, opt.threads, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) d[i] *= w;
      });
    }
  }
  gta_merge(tv.ptrs, tv.n, weights, static_cast<int>(g.elect), g.normalize, m, opt.threads);
  if (g.lambda != 1.0) {
    const T lambda = static_cast<T>(g.lambda);
    parallel_for(tv.n, opt.threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) m[i] *= lambda;
    });
  }
}

template <class T>
void merged_update(const MergeOptions& opt, const MergeItem& item, TaskVectors<T>& tv, T* m) {
  switch (opt.kernel) {
    case Kernel::Mean:
    case Kernel::Sum:
      return task_sum(tv.ptrs, tv.n, opt.kernel == Kernel::Mean, m, opt.threads);
    case Kernel::Ties:
      return ties_merge(tv.ptrs, tv.n, ties_spec(opt, tv), m, opt.threads);
    case Kernel::Consensus:
      if (opt.consensus.on_ties)
        ties_merge(tv.ptrs, tv.n, ties_spec(opt, tv), m, opt.threads);
      else
        task_sum(tv.ptrs, tv.n, false, m, opt.threads);
      return consensus_mask(tv.ptrs, tv.n, opt.consensus.lam, opt.consensus.min_agree, m,
                            opt.threads);
    case Kernel::Gta:
      return gta_update(opt, item, tv, m);
    case Kernel::Slerp:
      return slerp_dispatch(opt, item, tv, m);
    case Kernel::ModelStock:
      return model_stock_dispatch(opt, item, tv, m);
    case Kernel::Nuslerp:
      return nuslerp_dispatch(opt, item, tv, m);
    case Kernel::Multislerp:
      return multislerp_dispatch(opt, item, tv, m);
    case Kernel::Karcher:
      return karcher_dispatch(opt, item, tv, m);
    case Kernel::Sce:
      ISOFAST_CHECK(std::isfinite(opt.sce.select_topk), "tensor '", item.name,
                    "': sce select_topk must be finite");
      return sce_update(tv.ptrs, tv.n, opt.sce.select_topk, m, opt.threads);
    case Kernel::TsvM:
    case Kernel::IsoC:
    case Kernel::IsoCts:
      break;
  }
  if (!item.matrix) return task_sum(tv.ptrs, tv.n, true, m, opt.threads);
  MatrixProblem<T> p;
  p.rows = static_cast<int>(item.base.shape[1]);  // row-major m x n == column-major n x m
  p.cols = static_cast<int>(item.base.shape[0]);
  p.deltas.assign(tv.ptrs.begin(), tv.ptrs.end());
  p.release_deltas = [&tv] {
    for (std::vector<T>& d : tv.deltas) std::vector<T>().swap(d);
  };
  Backend<T>& be = cpu_backend<T>();
  if (opt.kernel == Kernel::IsoC) return iso_c(be, p, opt.matrix, m);
  if (opt.kernel == Kernel::IsoCts) return iso_cts(be, p, opt.matrix, m);
  tsv_m(be, p, opt.matrix, m);
}

// The task sum S = sum_t (ft_t - base), streamed chunk by chunk through the cache: into `sum`
// (n elements) when set, or straight into out = base + alpha * (S * scale) otherwise. No task
// vector is materialised: for the methods that need only the sum, T fresh task vectors (their
// page faults and memory traffic) made merges 20x slower than reading their inputs. The
// additions happen in the same order as the general path's, so results are bitwise the same.
template <class T>
void stream_task_sum(const MergeOptions& opt, const MergeItem& item, T* sum, T scale) {
  const size_t n = static_cast<size_t>(item.base.numel()), models = item.finetuned.size() + 1;
  std::vector<std::atomic<bool>> bad(models);
  std::vector<DType> dtypes(models);
  for (size_t m = 0; m < models; ++m) dtypes[m] = input_of(item, m).dtype;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  const size_t out_size = dtype_size(item.out.dtype);
  parallel_take(chunks, opt.threads, [&](auto take) {
    std::vector<std::vector<char>> raw(models);
    std::vector<const void*> inputs(models);
    auto finite = std::make_unique<bool[]>(models);
    for (size_t c = take(); c < chunks; c = take()) {
      const size_t b = c * kChunk, len = std::min(kChunk, n - b);
      for (size_t m = 0; m < models; ++m) {
        inputs[m] = input_chunk(item, m, b, len, raw[m]);
        finite[m] = true;
      }
      SumChunk<T> job{inputs.data(), dtypes.data(), models, len, finite.get()};
      if (sum != nullptr) {
        job.sum = sum + b;
      } else {
        job.out = static_cast<char*>(item.out.data) + b * out_size;
        job.out_dtype = item.out.dtype;
        job.alpha = static_cast<T>(opt.alpha);
        job.scale = scale;
      }
      sum_chunk(job);
      for (size_t m = 0; m < models; ++m)
        if (!finite[m]) bad[m] = true;
    }
  });
  for (size_t m = 0; m < models; ++m)
    ISOFAST_CHECK(!bad[m], "tensor '", item.name, "' of ", model_label(m), " holds NaN or Inf");
  if (opt.release_inputs)
    for (const TensorView& ft : item.finetuned) release_pages(ft);
}

// out = base + alpha * m, converted to the output dtype.
template <class T>
void write_output(const MergeOptions& opt, const MergeItem& item, T* m) {
  const size_t n = static_cast<size_t>(item.base.numel());
  const T alpha = static_cast<T>(opt.alpha);
  const size_t chunks = (n + kChunk - 1) / kChunk;
  const size_t out_size = dtype_size(item.out.dtype);
  parallel_take(chunks, opt.threads, [&](auto take) {
    std::vector<T> base(kChunk);
    std::vector<char> raw;
    for (size_t c = take(); c < chunks; c = take()) {
      const size_t b = c * kChunk, len = std::min(kChunk, n - b);
      load_chunk(input_chunk(item, 0, b, len, raw), item.base.dtype, len, base.data());
      for (size_t i = 0; i < len; ++i) m[b + i] = base[i] + alpha * m[b + i];
      store_as(m + b, len, static_cast<char*>(item.out.data) + b * out_size, item.out.dtype);
    }
  });
  if (opt.release_inputs) release_pages(item.base);
}

// Weight averaging / task arithmetic without DARE: one pass, the output formed in cache too.
template <class T>
void merge_linear_streamed(const MergeOptions& opt, const MergeItem& item) {
  const T scale = opt.kernel == Kernel::Mean ? T(1) / T(item.finetuned.size()) : T(1);
  stream_task_sum<T>(opt, item, nullptr, scale);
  if (opt.release_inputs) release_pages(item.base);
}

// Iso-C needs only the task sum: merge it as a one-task problem on the streamed sum.
template <class T>
void merge_iso_c_streamed(const MergeOptions& opt, const MergeItem& item) {
  TaskVectors<T> tv;
  tv.n = static_cast<size_t>(item.base.numel());
  tv.deltas.assign(1, std::vector<T>(tv.n));
  stream_task_sum<T>(opt, item, tv.deltas[0].data(), T(1));
  tv.ptrs.assign(1, tv.deltas[0].data());
  std::vector<T> m(tv.n);
  merged_update(opt, item, tv, m.data());
  tv.deltas.clear();
  write_output(opt, item, m.data());
}

template <class T>
void merge_item_as(const MergeOptions& opt, const MergeItem& item) {
  if (opt.dare.drop_rate <= 0) {
    if (opt.kernel == Kernel::Mean || opt.kernel == Kernel::Sum)
      return merge_linear_streamed<T>(opt, item);
    if (opt.kernel == Kernel::IsoC && item.matrix) return merge_iso_c_streamed<T>(opt, item);
  }
  TaskVectors<T> tv = load_task_vectors<T>(opt, item);
  std::vector<T> m(tv.n);
  merged_update(opt, item, tv, m.data());
  tv.deltas.clear();  // free the task vectors before the output pass
  write_output(opt, item, m.data());
}

}  // namespace

void validate_item(const MergeItem& item) {
  const std::string& name = item.name;
  ISOFAST_CHECK(!item.finetuned.empty(), "tensor '", name, "': no fine-tuned models (T = 0)");
  ISOFAST_CHECK(is_float(item.base.dtype), "tensor '", name, "' of the base model has dtype ",
                dtype_name(item.base.dtype), "; only float tensors are merged");
  for (size_t t = 0; t < item.finetuned.size(); ++t) {
    const TensorView& ft = item.finetuned[t];
    ISOFAST_CHECK(ft.shape == item.base.shape, "tensor '", name, "': fine-tuned model ", t,
                  " has shape ", ft.shape_str(), " but the base model has ",
                  item.base.shape_str());
    ISOFAST_CHECK(is_float(ft.dtype), "tensor '", name, "' of fine-tuned model ", t,
                  " has dtype ", dtype_name(ft.dtype), "; only float tensors are merged");
  }
  ISOFAST_CHECK(item.out.shape == item.base.shape, "tensor '", name, "': output shape ",
                item.out.shape_str(), " differs from ", item.base.shape_str());
  ISOFAST_CHECK(is_float(item.out.dtype), "tensor '", name, "': output dtype must be float");
  ISOFAST_CHECK(!item.out.readonly, "tensor '", name, "': output array is read-only");
  ISOFAST_CHECK(!item.matrix || item.base.shape.size() == 2, "tensor '", name,
                "': matrix treatment needs a 2-D tensor, got shape ", item.base.shape_str());
}

void merge_item(const MergeOptions& opt, const MergeItem& item) {
  validate_item(item);
  if (item.base.numel() == 0) return;  // nothing to merge (and no matrix to factor)
  if (opt.compute64)
    merge_item_as<double>(opt, item);
  else
    merge_item_as<float>(opt, item);
}

void merge_batch(const MergeOptions& opt, const std::vector<MergeItem>& items) {
  const int side_by_side = std::min<int>(opt.item_threads, static_cast<int>(items.size()));
  if (side_by_side <= 1) {
    for (const MergeItem& it : items) {
      // Small matrices: waking BLAS threads costs more than it saves (and spinning threads
      // stall badly on a busy machine). Elementwise work never calls BLAS: leave its
      // threads asleep (each wake-up spins a core for a while).
      if (it.matrix) set_blas_threads(it.base.numel() >= kBlasThreadsFrom ? opt.threads : 1);
      merge_item(opt, it);
    }
    return;
  }
  MergeOptions single = opt;
  single.threads = 1;
  set_blas_threads(1);
  parallel_take(items.size(), side_by_side, [&](auto take) {
    for (size_t i = take(); i < items.size(); i = take()) merge_item(single, items[i]);
  });
}

namespace {
template <class T>
void abs_histogram_as(const MergeOptions& opt, const MergeItem& item, int digit,
                      const std::vector<uint64_t>& prefixes, int64_t* hist) {
  TaskVectors<T> tv = load_task_vectors<T>(opt, item);
  ISOFAST_CHECK(prefixes.size() == tv.ptrs.size(), "one histogram prefix per task expected");
  for (size_t t = 0; t < tv.ptrs.size(); ++t)
    abs_digit_histogram(tv.ptrs[t], tv.n, digit, prefixes[t], hist + t * 65536);
  // The whole-model passes read every base tensor too: without this its pages would pile up.
  if (opt.release_inputs) release_pages(item.base);
}
template <class T>
int64_t ties_vote_as(const MergeOptions& opt, const MergeItem& item) {
  TaskVectors<T> tv = load_task_vectors<T>(opt, item);
  TiesSpec spec;
  spec.thresholds = opt.ties.thresholds;
  ISOFAST_CHECK(spec.thresholds.size() == tv.ptrs.size(), "one TIES threshold per task expected");
  const int64_t vote = ties_sign_vote(tv.ptrs, tv.n, spec, opt.threads);
  if (opt.release_inputs) release_pages(item.base);
  return vote;
}
}  // namespace

void abs_histogram(const MergeOptions& opt, const MergeItem& item, int digit,
                   const std::vector<uint64_t>& prefixes, int64_t* hist) {
  validate_item(item);
  if (opt.compute64)
    abs_histogram_as<double>(opt, item, digit, prefixes, hist);
  else
    abs_histogram_as<float>(opt, item, digit, prefixes, hist);
}

int64_t ties_vote(const MergeOptions& opt, const MergeItem& item) {
  validate_item(item);
  return opt.compute64 ? ties_vote_as<double>(opt, item) : ties_vote_as<float>(opt, item);
}

}  // namespace isofast
