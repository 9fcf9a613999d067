// Python glue shared by the two extension modules (_core in bindings.cpp, _cuda in
// cuda/bindings_cuda.cpp): the DLPack capsule protocol, the row-major contiguity rule, and the
// mapping of core errors to the classes of isofast.errors. What differs between the modules
// (accepted devices and dtypes, the consumer stream) stays with each module.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "core/dlpack.h"
#include "core/error.hpp"

namespace isofast::pyglue {

namespace py = pybind11;

// Views of Python arrays stay valid while the objects that own their memory are alive; the
// capsules (and the producers they reference) are kept here for the duration of one call.
// Hidden like the pybind11 types it holds (they are hidden in every extension module).
struct __attribute__((visibility("hidden"))) Keepalive {
  std::vector<py::object> objects;
};

struct DLView {
  const IsoDLTensor* tensor = nullptr;
  bool readonly = false;
};

// obj.__dlpack__(**kwargs) asking for a versioned (1.x) capsule first, with the pre-1.0
// signature as the fallback. The capsule and obj are kept alive in `keep`.
inline DLView dlpack_tensor(py::handle obj, const py::dict& kwargs, const std::string& what,
                            Keepalive& keep) {
  py::object capsule;
  try {
    py::dict versioned(kwargs);
    versioned["max_version"] = py::make_tuple(1, 0);
    capsule = obj.attr("__dlpack__")(**versioned);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError) && !e.matches(PyExc_BufferError)) throw;
    capsule = obj.attr("__dlpack__")(**kwargs);
  }
  keep.objects.push_back(capsule);
  keep.objects.push_back(py::reinterpret_borrow<py::object>(obj));
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<IsoDLManagedTensorVersioned*>(
        PyCapsule_GetPointer(cap, "dltensor_versioned"));
    ISOFAST_CHECK(m->version.major == 1, what, ": unsupported DLPack major version ",
                  m->version.major);
    return {&m->dl_tensor, (m->flags & kIsoDLFlagReadOnly) != 0};
  }
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<IsoDLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    return {&m->dl_tensor, false};
  }
  throw ValueError(concat(what, ": __dlpack__ did not return a DLPack capsule"));
}

// Row-major contiguity from the strides (absent strides mean contiguous; the strides of an
// empty array mean nothing). `noun` names the thing in the message: "array", "tensor".
inline void check_row_major(const IsoDLTensor& t, const std::string& what, const char* noun) {
  int64_t numel = 1;
  for (int d = 0; d < t.ndim; ++d) numel *= t.shape[d];
  if (t.strides == nullptr || numel == 0) return;
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    ISOFAST_CHECK(t.shape[d] == 1 || t.strides[d] == expected, what, ": ", noun,
                  " is not contiguous (row-major); call .contiguous() first");
    expected *= t.shape[d];
  }
}

// Core errors raise isofast.errors classes: LinAlgError, MergeInputError (bad input),
// IsofastError (anything else the core reports).
inline void register_error_translator() {
  py::register_local_exception_translator([](std::exception_ptr p) {
    auto error_class = [](const char* name) {
      return py::module_::import("isofast.errors").attr(name);
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const LinAlgError& e) {
      PyErr_SetString(error_class("LinAlgError").ptr(), e.what());
    } catch (const ValueError& e) {
      PyErr_SetString(error_class("MergeInputError").ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(error_class("IsofastError").ptr(), e.what());
    }
  });
}

}  // namespace isofast::pyglue
