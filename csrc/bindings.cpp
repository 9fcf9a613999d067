// The only file that knows about Python: turns DLPack capsules / tuples into TensorViews,
// validates, releases the GIL around compute, and maps core errors to Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/dlpack.h"
#include "core/error.hpp"
#include "core/route_log.hpp"
#include "io/crc32c.hpp"
#include "core/tensor_view.hpp"
#include "linalg/backend.hpp"
#include "linalg/spectral.hpp"
#include "methods/matrix_methods.hpp"
#include "methods/merge.hpp"
#include "py_dlpack.hpp"

namespace py = pybind11;
using namespace isofast;
using isofast::pyglue::Keepalive;

void register_polar_bindings(py::module_& m);  // csrc/polar_bindings.cpp
void register_options(py::module_& m);         // csrc/options_bindings.cpp

namespace {

DType dtype_from_dl(const IsoDLDataType& t, const std::string& what) {
  ISOFAST_CHECK(t.lanes == 1, what, ": vector dtypes (lanes != 1) are not supported");
  switch (t.code) {
    case kIsoDLFloat:
      if (t.bits == 32) return DType::F32;
      if (t.bits == 64) return DType::F64;
      if (t.bits == 16) return DType::F16;
      break;
    case kIsoDLBfloat:
      if (t.bits == 16) return DType::BF16;
      break;
    case kIsoDLInt:
      if (t.bits == 8) return DType::I8;
      if (t.bits == 16) return DType::I16;
      if (t.bits == 32) return DType::I32;
      if (t.bits == 64) return DType::I64;
      break;
    case kIsoDLUInt:
      if (t.bits == 8) return DType::U8;
      if (t.bits == 16) return DType::U16;
      if (t.bits == 32) return DType::U32;
      if (t.bits == 64) return DType::U64;
      break;
    case kIsoDLBool:
      return DType::Bool;
  }
  throw ValueError(concat(what, ": unsupported dtype (code ", int(t.code), ", ", int(t.bits),
                          " bits)"));
}

DType dtype_from_name(const std::string& name, const std::string& what) {
  if (name == "float32") return DType::F32;
  if (name == "float64") return DType::F64;
  if (name == "float16") return DType::F16;
  if (name == "bfloat16") return DType::BF16;
  throw ValueError(concat(what, ": unknown dtype override '", name, "'"));
}

TensorView view_of_dl(const IsoDLTensor& t, bool readonly, const std::string& what) {
  ISOFAST_CHECK(t.device.device_type == kIsoDLCPU || t.device.device_type == kIsoDLCUDAHost,
                what, ": the CPU core got an array on device type ", t.device.device_type,
                " (use device='cuda' for GPU arrays)");
  TensorView v;
  v.dtype = dtype_from_dl(t.dtype, what);
  v.shape.assign(t.shape, t.shape + t.ndim);
  v.readonly = readonly;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  pyglue::check_row_major(t, what, "array");
  return v;
}

// ("file", fd, offset, dtype_name, shape): a tensor the core reads from an open file itself.
TensorView file_view(const py::tuple& tup, const std::string& what) {
  ISOFAST_CHECK(tup.size() == 5, what, ": expected (\"file\", fd, offset, dtype_name, shape)");
  TensorView v;
  v.fd = tup[1].cast<int>();
  v.file_offset = tup[2].cast<int64_t>();
  ISOFAST_CHECK(v.fd >= 0 && v.file_offset >= 0, what, ": bad file descriptor or offset");
  v.dtype = dtype_from_name(tup[3].cast<std::string>(), what);
  v.shape = tup[4].cast<std::vector<int64_t>>();
  for (int64_t s : v.shape) ISOFAST_CHECK(s >= 0, what, ": negative dimension");
  v.readonly = true;
  return v;
}

TensorView view_of(py::handle obj, const std::string& what, Keepalive& keep) {
  // (array, "bfloat16"): reinterpret 16-bit integers (numpy has no bfloat16).
  if (py::isinstance<py::tuple>(obj)) {
    auto tup = obj.cast<py::tuple>();
    if (tup.size() > 0 && py::isinstance<py::str>(tup[0]) && tup[0].cast<std::string>() == "file")
      return file_view(tup, what);
    ISOFAST_CHECK(tup.size() == 2, what, ": expected (array, dtype_name)");
    TensorView v = view_of(tup[0], what, keep);
    const DType to = dtype_from_name(tup[1].cast<std::string>(), what);
    ISOFAST_CHECK(dtype_size(v.dtype) == dtype_size(to), what, ": cannot view ",
                  dtype_name(v.dtype), " data as ", dtype_name(to));
    v.dtype = to;
    return v;
  }
  ISOFAST_CHECK(py::hasattr(obj, "__dlpack__"), what,
                ": expected a torch tensor or numpy array (an object with __dlpack__), got ",
                std::string(py::str(py::type::of(obj).attr("__name__"))));
  const pyglue::DLView dl = pyglue::dlpack_tensor(obj, py::dict(), what, keep);
  return view_of_dl(*dl.tensor, dl.readonly, what);
}

void check_options(const MergeOptions& o) {
  ISOFAST_CHECK(std::isfinite(o.alpha), "alpha must be finite, got ", o.alpha);
  ISOFAST_CHECK(o.threads >= 1 && o.item_threads >= 1, "threads must be >= 1");
}

// items: list of (name, base, [finetuned...], out, is_matrix); out may be None (histograms).
std::vector<MergeItem> items_from(const py::list& items, Keepalive& keep) {
  std::vector<MergeItem> out;
  for (auto h : items) {
    auto tup = h.cast<py::tuple>();
    ISOFAST_CHECK(tup.size() == 5, "merge item must be (name, base, finetuned, out, is_matrix)");
    MergeItem it;
    it.name = tup[0].cast<std::string>();
    it.base = view_of(tup[1], concat("tensor '", it.name, "' of the base model"), keep);
    auto fts = tup[2].cast<py::list>();
    for (size_t t = 0; t < fts.size(); ++t)
      it.finetuned.push_back(
          view_of(fts[t], concat("tensor '", it.name, "' of fine-tuned model ", t), keep));
    if (tup[3].is_none()) {
      it.out = it.base;  // histogram passes write nothing
      it.out.readonly = false;
      it.out.dtype = is_float(it.base.dtype) ? it.base.dtype : DType::F32;
    } else {
      it.out = view_of(tup[3], concat("output tensor '", it.name, "'"), keep);
      ISOFAST_CHECK(it.out.fd < 0, "output tensor '", it.name, "' must be an array, not a file");
    }
    it.matrix = tup[4].cast<bool>();
    validate_item(it);
    out.push_back(std::move(it));
  }
  return out;
}

void merge_items(const MergeOptions& opt, const py::list& items) {
  Keepalive keep;
  check_options(opt);
  std::vector<MergeItem> parsed = items_from(items, keep);
  py::gil_scoped_release release;
  merge_batch(opt, parsed);
}

py::array_t<int64_t> abs_histogram_py(const py::list& items, const MergeOptions& opt, int digit,
                                      const std::vector<uint64_t>& prefixes) {
  Keepalive keep;
  check_options(opt);
  std::vector<MergeItem> parsed = items_from(items, keep);
  ISOFAST_CHECK(digit >= 0 && digit < (opt.compute64 ? 4 : 2), "histogram digit out of range");
  py::array_t<int64_t> hist({static_cast<py::ssize_t>(prefixes.size()), py::ssize_t{65536}});
  std::memset(hist.mutable_data(), 0, sizeof(int64_t) * prefixes.size() * 65536);
  int64_t* h = hist.mutable_data();
  {
    py::gil_scoped_release release;
    for (const MergeItem& it : parsed) abs_histogram(opt, it, digit, prefixes, h);
  }
  return hist;
}

int64_t ties_vote_py(const py::list& items, const MergeOptions& opt) {
  Keepalive keep;
  check_options(opt);
  std::vector<MergeItem> parsed = items_from(items, keep);
  py::gil_scoped_release release;
  int64_t vote = 0;
  for (const MergeItem& it : parsed) vote += ties_vote(opt, it);
  return vote;
}

// Thin SVD of a 2-D float32/float64 array through the same backend as the methods (row-major
// in, row-major out): returns (U, S, Vt). NaN input raises LinAlgError from LAPACK's check.
template <class T>
py::tuple svd_as(const TensorView& v) {
  const int m = static_cast<int>(v.shape[0]), n = static_cast<int>(v.shape[1]);
  const int r = std::min(m, n);
  ThinSvd<T> f;
  {
    py::gil_scoped_release release;
    // Row-major m x n is column-major X = A^T (n x m): A = (X's vt)^T S (X's u)^T.
    f = thin_svd(cpu_backend<T>(), n, m, static_cast<const T*>(v.data), n);
  }
  py::array_t<T> u({m, r}), s(r), vt({r, n});
  // X's vt is r x m column-major == m x r row-major: exactly U of A.
  std::memcpy(u.mutable_data(), f.vt.ptr(), sizeof(T) * m * r);
  std::memcpy(s.mutable_data(), f.s.data(), sizeof(T) * r);
  std::memcpy(vt.mutable_data(), f.u.ptr(), sizeof(T) * n * r);
  return py::make_tuple(u, s, vt);
}

py::tuple svd_py(py::handle a) {
  Keepalive keep;
  TensorView v = view_of(a, "svd input", keep);
  ISOFAST_CHECK(v.shape.size() == 2, "svd input must be 2-D, got ", v.shape_str());
  if (v.dtype == DType::F64) return svd_as<double>(v);
  ISOFAST_CHECK(v.dtype == DType::F32, "svd input must be float32 or float64");
  return svd_as<float>(v);
}

std::uintptr_t data_ptr(py::handle a) {
  Keepalive keep;
  return reinterpret_cast<std::uintptr_t>(view_of(a, "array", keep).data);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "isofast compiled core (CPU backend: OpenBLAS/LAPACK)";

  pyglue::register_error_translator();

  register_options(m);
  m.def("merge_items", &merge_items, py::arg("options"), py::arg("items"),
        "Merge each (name, base, finetuned, out, is_matrix) item into `out` in place.");
  m.def("abs_histogram", &abs_histogram_py, py::arg("items"), py::arg("options"), py::arg("digit"),
        py::arg("prefixes"), "Per-task 65536-bin histogram of one 16-bit digit of |task vector|.");
  m.def("ties_vote", &ties_vote_py, py::arg("items"), py::arg("options"),
        "Sum of elected TIES signs under the given global thresholds.");
  m.def(
      "crc32c",
      [](py::buffer data, uint32_t crc) {
        py::buffer_info info = data.request();
        ISOFAST_CHECK(info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize),
                      "crc32c needs a contiguous one-dimensional buffer");
        const size_t size = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
        py::gil_scoped_release release;
        return crc32c(info.ptr, size, crc);
      },
      py::arg("data"), py::arg("crc") = 0,
      "CRC-32C of a contiguous buffer, continuing from `crc` (the journal's checksum).");
  m.def("take_route_counts", [] { return RouteLog::instance().take(); },
        "Routes and fallbacks the matrix methods took since the last call, with counts.");
  m.def("svd", &svd_py, py::arg("a"), "Thin SVD (gesdd) of a 2-D float32/float64 array.");
  m.def("data_ptr", &data_ptr, py::arg("a"), "Address of the memory the core sees (zero-copy check).");
  m.def("iso_cts_sizes", &iso_cts_sizes, py::arg("r"), py::arg("tasks"), py::arg("fraction"));
  m.def("set_num_threads", &set_blas_threads, py::arg("threads"));
  m.def("get_num_threads", &get_blas_threads);
  m.def("blas_config", &blas_config);
  register_polar_bindings(m);
#ifdef ISOFAST_HAS_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
