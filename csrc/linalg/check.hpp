// The one place where LAPACK `info` codes become exceptions.
#pragma once
#include <string>

#include "../core/error.hpp"

namespace isofast {

inline void check_lapack_info(const char* routine, int info, int m, int n) {
  if (info == 0) return;
  if (info < 0) {
    // LAPACK >= 3.10 reports non-finite input to the SVD drivers as argument -4 (A).
    throw LinAlgError(concat(routine, " on a ", m, " x ", n, " matrix: argument ", -info,
                             " had an illegal value", (info == -4 ? " (the input holds NaN or Inf)" : "")));
  }
  throw LinAlgError(concat(routine, " on a ", m, " x ", n, " matrix did not converge (info = ", info,
                           "); the input may hold NaN/Inf or be badly scaled"));
}

}  // namespace isofast
