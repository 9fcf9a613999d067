// DELLA's MagPrune (mergekit's della_magprune) on one flat task vector, with the counter-based
// draw of the contract, so results do not depend on order or threads.
#pragma once
#include <cstddef>
#include <cstdint>

namespace isofast {

// In place. Vectors: the tensor's rows along its second axis (a 1-D tensor: one row): `rows`
// rows of `len` entries, entry k of row r at (r / stride) * len * stride + k * stride +
// r % stride. Per row, ascending (|x|, index) rank j in [0, len): p_j = (density - epsilon) +
// j / (len - 1) * 2 epsilon (0 for len 1); entry i stays when the draw u_i(key) >= 1 - p_j.
// density >= 1 keeps all, <= 0 none; else density +- epsilon must lie in (0, 1). With rescale
// the result is scaled to the L1 norm of the input (unless either is below 1e-7).
template <class T>
void della_magprune(T* x, size_t n, size_t len, size_t stride, double density, double epsilon,
                    bool rescale, uint64_t key, int threads);

}  // namespace isofast
