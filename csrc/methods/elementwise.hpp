// Elementwise merging methods on flat task vectors of one tensor: TIES (trim, elect,
// disjoint merge), DARE (seeded drop and rescale), consensus (TALL) masks, and the magnitude
// histograms that give TIES its exact whole-model threshold.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace isofast {

struct TiesSpec {
  std::vector<double> thresholds;  // per task: keep |x| >= threshold (-inf keeps everything)
  int majority_sign = 0;           // fallback sign where the elected sum is 0
  bool sum = false;                // disjoint sum instead of disjoint mean
};

// kth smallest |x| as TIES' trim threshold for `density` (docs/CONTRACT.md); -inf keeps all.
template <class T>
double ties_threshold(const T* x, size_t n, double density);

// Sum over entries of the elected sign (+1/-1/0), the vote that gives the majority sign.
template <class T>
int64_t ties_sign_vote(const std::vector<T*>& deltas, size_t n, const TiesSpec& spec, int threads);

// out[i] = TIES-merged update at entry i.
template <class T>
void ties_merge(const std::vector<T*>& deltas, size_t n, const TiesSpec& spec, T* out, int threads);

// In place: x_i = keep_i ? x_i / (1 - p) : 0, keep decided by the counter-based RNG.
template <class T>
void dare_drop(T* x, size_t n, double drop_rate, uint64_t seed, const std::string& name,
               uint64_t task, int threads);

// In place: out_i = 0 where fewer than min_agree tasks pass |D_t| >= lam |sum - D_t|.
template <class T>
void consensus_mask(const std::vector<T*>& deltas, size_t n, double lam, int min_agree, T* out,
                    int threads);

// out = sum (or mean) over tasks.
template <class T>
void task_sum(const std::vector<T*>& deltas, size_t n, bool mean, T* out, int threads);

// Keep the entries of x whose rank, in the order of ascending |x| with ties broken by flat
// index (ascending when index_ascending, else descending), lies in [lo, hi); zero the others.
// Exactly hi - lo entries stay (of n); independent of the thread count.
template <class T>
void keep_rank_range(T* x, size_t n, size_t lo, size_t hi, bool index_ascending, int threads);

// mergekit's sparsifications of one task vector (in place), then the optional L1 rescale:
// magnitude keeps the top max(1, int(density n)) |x| (ties: lowest index first); random keeps
// x_i where the contract's DARE draw u_i >= 1 - density (no 1/density rescale); outliers
// (breadcrumbs) drops the int(gamma n) largest and keeps the next int(density n).
template <class T>
void gta_sparsify(T* x, size_t n, int method, double density, double gamma, bool rescale,
                  uint64_t key, int threads);

// mergekit's merge of sparsified, weighted task vectors: the sum over tasks (elect 0), or over
// those whose sign equals the elected one (1: sign of the sum, 2: of the sum of signs; a zero
// vote elects +), divided, when normalize, by the sum of the weights of the summed entries
// (0 -> 1; without election |sum of weights| < 1e-8 -> 1).
template <class T>
void gta_merge(const std::vector<T*>& deltas, size_t n, const std::vector<double>& weights,
               int elect, bool normalize, T* out, int threads);

// 16-bit digit histogram of the bit patterns of |x| (monotone in |x|), for radix selection:
// digit 0 is the top 16 bits; entries count only when their bits above the digit equal prefix.
template <class T>
void abs_digit_histogram(const T* x, size_t n, int digit, uint64_t prefix, int64_t* hist);

}  // namespace isofast
