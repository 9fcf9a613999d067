// Error types of the core. The bindings translate each class into one Python exception;
// nothing else in the core knows about Python.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace isofast {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Bad arguments or bad data from the user (maps to ValueError).
struct ValueError : Error {
  using Error::Error;
};
// A LAPACK/BLAS or cuSOLVER routine reported failure (maps to isofast.LinAlgError).
struct LinAlgError : Error {
  using Error::Error;
};
// A CUDA runtime / cuBLAS / cuSOLVER call failed (maps to isofast.IsofastError); raised by the
// checks of csrc/cuda/cuda_check.cuh.
struct CudaError : Error {
  using Error::Error;
};

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

}  // namespace isofast

#define ISOFAST_CHECK(cond, ...)                                 \
  do {                                                           \
    if (!(cond)) throw ::isofast::ValueError(::isofast::concat(__VA_ARGS__)); \
  } while (0)
