// Python bindings of the GEMM-only polar iteration (csrc/linalg/polar_iter.hpp), registered
// into isofast._core by register_polar_bindings() from csrc/bindings.cpp. numpy arrays in and
// out; errors are isofast::Error subclasses, translated by the module's translator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.hpp"
#include "linalg/backend.hpp"
#include "linalg/polar_iter.hpp"

namespace py = pybind11;

namespace isofast {
namespace {

// Row-major m x n A is the column-major n x m matrix X = A^T, and polar(A^T) = polar(A)^T, so
// the polar factor of X, written column-major, is exactly polar(A) row-major: no transposes.
template <class In, class C>
py::tuple polar_as(const py::array& input, const PolarOptions& opt) {
  auto arr = py::array_t<In, py::array::c_style>::ensure(input);
  ISOFAST_CHECK(static_cast<bool>(arr), "polar_iter: could not read the input as a C-contiguous array");
  const py::ssize_t m = arr.shape(0), n = arr.shape(1);
  ISOFAST_CHECK(m <= 2147483647 && n <= 2147483647, "polar_iter: matrix too large");
  py::array_t<In> q({m, n});
  const In* src = arr.data();
  In* dst = q.mutable_data();
  PolarResult res;
  {
    py::gil_scoped_release release;
    const int rows = static_cast<int>(n), cols = static_cast<int>(m), ld = std::max(rows, 1);
    const size_t count = static_cast<size_t>(m) * static_cast<size_t>(n);
    if constexpr (std::is_same_v<In, C>) {
      res = polar_iter<C>(cpu_backend<C>(), rows, cols, src, ld, dst, ld, opt);
    } else {
      std::vector<C> a(src, src + count), out(count);
      res = polar_iter<C>(cpu_backend<C>(), rows, cols, a.data(), ld, out.data(), ld, opt);
      std::transform(out.begin(), out.end(), dst, [](C v) { return static_cast<In>(v); });
    }
  }
  return py::make_tuple(q, res.cert_orth, res.cert_sym, res.converged, res.steps);
}

py::tuple polar_iter_py(const py::array& a, double lower_bound, double tol,
                        const py::object& compute) {
  ISOFAST_CHECK(a.ndim() == 2, "polar_iter input must be 2-D, got ", a.ndim(), " dimensions");
  const bool is64 = a.dtype().is(py::dtype::of<double>());
  ISOFAST_CHECK(is64 || a.dtype().is(py::dtype::of<float>()),
                "polar_iter input must be float32 or float64, got ",
                std::string(py::str(a.dtype())));
  bool compute64 = is64;
  if (!compute.is_none()) {
    const std::string c = compute.cast<std::string>();
    ISOFAST_CHECK(c == "float32" || c == "float64",
                  "polar_iter: compute must be 'float32', 'float64' or None, got '", c, "'");
    compute64 = c == "float64";
  }
  PolarOptions opt;
  opt.lower_bound = lower_bound;
  opt.tol = tol;
  ISOFAST_CHECK(lower_bound > 0 && lower_bound < 1,
                "polar_iter: lower_bound must be in (0, 1), got ", lower_bound);
  ISOFAST_CHECK(tol > 0, "polar_iter: tol must be > 0, got ", tol);
  if (is64) return compute64 ? polar_as<double, double>(a, opt) : polar_as<double, float>(a, opt);
  return compute64 ? polar_as<float, double>(a, opt) : polar_as<float, float>(a, opt);
}

std::vector<py::tuple> polar_schedule_py(double lower_bound, double target) {
  std::vector<py::tuple> out;
  for (const PolarStep& s : polar_schedule(lower_bound, target))
    out.push_back(py::make_tuple(s.a, s.b, s.c, s.lo, s.hi));
  return out;
}

}  // namespace
}  // namespace isofast

void register_polar_bindings(py::module_& m) {
  m.def("polar_iter", &isofast::polar_iter_py, py::arg("a"), py::arg("lower_bound") = 1e-6,
        py::arg("tol") = 1e-5, py::arg("compute") = py::none(),
        "GEMM-only polar factor of a 2-D float32/float64 array by minimax quintic steps.\n"
        "Returns (Q, cert_orth, cert_sym, converged, steps): cert_orth = ||Q^T Q - I||_F / "
        "sqrt(r), cert_sym = ||Q^T A - A^T Q||_F / ||A||_F (float64), converged = both <= tol. "
        "compute: 'float32' / 'float64' (default: the input's dtype).");
  m.def("polar_schedule", &isofast::polar_schedule_py, py::arg("lower_bound") = 1e-6,
        py::arg("target") = 1.1920928955078125e-07,
        "Coefficients (a, b, c, lo, hi) of the polar iteration's steps for singular values in "
        "[lower_bound, 1]; [lo, hi] holds them after the step.");
}
