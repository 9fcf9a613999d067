// The one checker of solver status codes: LAPACK's `info` and cuSOLVER's (copied to the host)
// follow the same convention and become the same exceptions here.
#pragma once
#include <string>

#include "../core/error.hpp"

namespace isofast {

// info < 0: argument -info was illegal; info > 0: the routine did not converge on this input.
inline void check_solver_info(const char* routine, int info, long long m, long long n) {
  if (info == 0) return;
  if (info < 0) {
    // LAPACK >= 3.10 reports non-finite input to the SVD drivers as argument -4 (A).
    throw LinAlgError(concat(routine, " on a ", m, " x ", n, " matrix: argument ", -info,
                             " had an illegal value",
                             (info == -4 ? " (the input holds NaN or Inf)" : "")));
  }
  throw LinAlgError(concat(routine, " on a ", m, " x ", n, " matrix did not converge (info = ", info,
                           "); the input may hold NaN/Inf or be badly scaled"));
}

}  // namespace isofast
