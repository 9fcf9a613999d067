// One merge step on one tensor: read base and fine-tunes (any float dtype) into the compute
// type, form task vectors, run the method kernel, write base + alpha * M in the out dtype.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../core/tensor_view.hpp"
#include "matrix_methods.hpp"

namespace isofast {

// The merge kernels; the Python method registry maps every method onto one of them (checked
// at import time).
enum class Kernel { Mean, Sum, Ties, Consensus, Gta, TsvM, IsoC, IsoCts, Slerp, ModelStock,
                    Nuslerp, Multislerp, Karcher, Sce };
inline const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::Mean: return "mean";
    case Kernel::Sum: return "sum";
    case Kernel::Ties: return "ties";
    case Kernel::Consensus: return "consensus";
    case Kernel::Gta: return "gta";
    case Kernel::TsvM: return "tsv_m";
    case Kernel::IsoC: return "iso_c";
    case Kernel::IsoCts: return "iso_cts";
    case Kernel::Slerp: return "slerp";
    case Kernel::ModelStock: return "model_stock";
    case Kernel::Nuslerp: return "nuslerp";
    case Kernel::Multislerp: return "multislerp";
    case Kernel::Karcher: return "karcher";
    case Kernel::Sce: return "sce";
  }
  return "?";
}
inline bool is_matrix_kernel(Kernel k) {
  return k == Kernel::TsvM || k == Kernel::IsoC || k == Kernel::IsoCts;
}

// DARE preprocessing of the task vectors (on when drop_rate > 0).
struct DareOptions {
  double drop_rate = 0.0;
  uint64_t seed = 0;
};

struct TiesOptions {
  double density = 0.2;
  bool trim_global = false;
  std::vector<double> thresholds;  // per task, when trim_global
  int majority_sign = 0;           // when trim_global
  bool sum = false;                // sum of the kept entries instead of their mean
};

struct ConsensusOptions {
  double lam = 0.4;
  int min_agree = 2;
  bool on_ties = false;  // mask a TIES merge instead of the task sum
};

// mergekit's "generalized task arithmetic" family (task_arithmetic, ties, dare_*, breadcrumbs*):
// per task sparsify (+ L1 rescale) and weight; then the sum, optionally masked by the elected
// sign, optionally divided by the sum of the weights of the kept entries (docs/MERGEKIT.md).
enum class Sparsify { None, Magnitude, Random, MagnitudeOutliers, DellaMagprune };
enum class Elect { None, Sum, Count };
struct GtaOptions {
  Sparsify sparsify = Sparsify::None;
  Elect elect = Elect::None;
  // Per task; one value applies to every task; empty: 1, 1, 0.
  std::vector<double> weights;
  std::vector<double> densities;
  std::vector<double> gammas;  // MagnitudeOutliers: the share of largest entries dropped
  std::vector<double> epsilons;  // DellaMagprune: keep probabilities density +- epsilon
  bool rescale = false;           // match each sparsified task vector's L1 norm to the original
  bool normalize = false;         // divide by the sum of the weights of the kept entries
  double lambda = 1.0;            // scale of the merged update (mergekit's `lambda`)
};

// mergekit's slerp of the base and the other model (with several fine-tunes: their mean).
struct SlerpOptions {
  double t = 0.5;                 // 0: the base, 1: the other model
  double dot_threshold = 0.9995;  // |cos| above it: linear interpolation
  double eps = 1e-8;              // norms at or below it count as 1
};

// mergekit's model_stock: one interpolation ratio per tensor, or per row of its last axis.
struct ModelStockOptions {
  bool filter_wise = false;
};

// mergekit's nuslerp of two task vectors at t = w_1 / (w_0 + w_1) (0.5 where
// |w_0 + w_1| < 1e-6): over the whole tensor (flatten), its rows of the last axis, or
// (row_wise) its vectors along the first axis. More tasks fold in one at a time.
struct NuslerpOptions {
  std::vector<double> weights;  // per task; one value: every task's; empty: 1, 1
  bool row_wise = false;
  bool flatten = true;
  double eps = 1e-8;
};

// mergekit's multislerp of the task vectors with per-task weights.
struct MultislerpOptions {
  std::vector<double> weights;  // per task; one value: every task's; empty: 1, 1, ...
  bool normalize_weights = true;
  double eps = 1e-8;
};

// mergekit's karcher: the Karcher mean of the base and the fine-tuned weights.
struct KarcherOptions {
  int max_iter = 10;
  double tol = 1e-5;
};

// mergekit's sce: variance-based selection, mean-square weights, sign-elected weighted mean.
struct SceOptions {
  double select_topk = 1.0;
};

struct MergeOptions {
  Kernel kernel = Kernel::Mean;
  double alpha = 1.0;
  bool compute64 = false;
  int threads = 1;       // threads inside one item (BLAS and elementwise loops)
  int item_threads = 1;  // items of a batch merged side by side, one thread each
  DareOptions dare;
  TiesOptions ties;
  ConsensusOptions consensus;
  GtaOptions gta;
  SlerpOptions slerp;
  ModelStockOptions model_stock;
  NuslerpOptions nuslerp;
  MultislerpOptions multislerp;
  KarcherOptions karcher;
  SceOptions sce;
  MatrixOptions matrix;
  // Inputs are read-only file mappings whose pages may be dropped once converted.
  bool release_inputs = false;
};

struct MergeItem {
  std::string name;
  TensorView base;
  std::vector<TensorView> finetuned;
  TensorView out;
  bool matrix = false;  // a 2-D key that gets the matrix treatment
};

void validate_item(const MergeItem& item);
void merge_item(const MergeOptions& opt, const MergeItem& item);

// A batch of items (typically same-shape matrices of one model). With item_threads > 1 the
// items run side by side, each single-threaded: small SVDs scale far better across matrices
// than inside one LAPACK call on few cores.
void merge_batch(const MergeOptions& opt, const std::vector<MergeItem>& items);

// TIES' whole-model passes: per-task digit histograms of |DARE(D_t)| (tasks x 65536 counts,
// added into hist) and the vote for the majority sign under the given global thresholds.
void abs_histogram(const MergeOptions& opt, const MergeItem& item, int digit,
                   const std::vector<uint64_t>& prefixes, int64_t* hist);
int64_t ties_vote(const MergeOptions& opt, const MergeItem& item);

}  // namespace isofast
