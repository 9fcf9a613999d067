// isofast._cuda: the CUDA backend as its own extension module, so that `import isofast` never
// needs libcudart. Consumes DLPack capsules of CUDA tensors (device type 2) the way
// csrc/bindings.cpp consumes CPU ones, releases the GIL around device work, and maps core
// errors to the same Python classes (isofast.errors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <vector>

#include "../core/dlpack.h"
#include "../core/error.hpp"
#include "../py_dlpack.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "../core/route_log.hpp"
#include "matrix_merge_cuda.cuh"

namespace py = pybind11;
using namespace isofast;
using isofast::pyglue::Keepalive;

namespace {

DType dtype_from_dl(const IsoDLDataType& t, const std::string& what) {
  ISOFAST_CHECK(t.lanes == 1, what, ": vector dtypes (lanes != 1) are not supported");
  if (t.code == kIsoDLFloat && t.bits == 32) return DType::F32;
  if (t.code == kIsoDLFloat && t.bits == 64) return DType::F64;
  if (t.code == kIsoDLFloat && t.bits == 16) return DType::F16;
  if (t.code == kIsoDLBfloat && t.bits == 16) return DType::BF16;
  throw ValueError(concat(what, ": the CUDA backend takes float32/float64/float16/bfloat16 "
                                "tensors (DLPack code ",
                          int(t.code), ", ", int(t.bits), " bits)"));
}

struct Viewed {
  DeviceTensor tensor;
  int device = 0;
};

Viewed view_of_dl(const IsoDLTensor& t, bool readonly, bool writable, const std::string& what) {
  ISOFAST_CHECK(t.device.device_type == kIsoDLCUDA || t.device.device_type == kIsoDLCUDAManaged,
                what, ": the CUDA backend needs a tensor on a CUDA device, got DLPack device type ",
                t.device.device_type, " (move it with .cuda() or use the CPU backend)");
  ISOFAST_CHECK(!(writable && readonly), what, ": the output tensor is read-only");
  Viewed v;
  v.device = t.device.device_id;
  v.tensor.dtype = dtype_from_dl(t.dtype, what);
  v.tensor.shape.assign(t.shape, t.shape + t.ndim);
  v.tensor.data = static_cast<char*>(t.data) + t.byte_offset;
  pyglue::check_row_major(t, what, "tensor");
  return v;
}

// The DLPack stream argument: the consumer's stream, so the producer orders its pending work
// before ours (1 = the legacy default stream; 0 is not allowed for CUDA).
py::object dlpack_stream_arg(std::uintptr_t stream) {
  return py::int_(stream == 0 ? std::uintptr_t{1} : stream);
}

Viewed view_of(py::handle obj, const std::string& what, bool writable, std::uintptr_t stream,
               Keepalive& keep) {
  ISOFAST_CHECK(py::hasattr(obj, "__dlpack__"), what,
                ": expected a CUDA tensor (an object with __dlpack__), got ",
                std::string(py::str(py::type::of(obj).attr("__name__"))));
  // Ask where the data lives first: a CPU producer must not be handed a CUDA stream.
  if (py::hasattr(obj, "__dlpack_device__")) {
    auto dev = obj.attr("__dlpack_device__")().cast<py::tuple>();
    const int type = dev[0].cast<int>();
    ISOFAST_CHECK(type == kIsoDLCUDA || type == kIsoDLCUDAManaged, what,
                  ": the CUDA backend needs a tensor on a CUDA device, got DLPack device type ",
                  type, " (move it with .cuda() or use the CPU backend)");
  }
  py::dict kwargs;
  kwargs["stream"] = dlpack_stream_arg(stream);
  const pyglue::DLView dl = pyglue::dlpack_tensor(obj, kwargs, what, keep);
  return view_of_dl(*dl.tensor, dl.readonly, writable, what);
}

// Current device switched for the duration of a call, restored afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    ISOFAST_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) ISOFAST_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void merge_matrix_py(const MergeOptions& options, const py::list& finetuned, py::handle out,
                     py::handle base, const py::object& stream_obj) {
  const std::uintptr_t stream = stream_obj.is_none() ? 0 : stream_obj.cast<std::uintptr_t>();
  Keepalive keep;
  std::vector<DeviceTensor> fts;
  int device = -1;
  auto check_device = [&](const Viewed& v, const std::string& what) {
    if (device < 0) device = v.device;
    ISOFAST_CHECK(v.device == device, what, " is on cuda:", v.device, ", other tensors on cuda:",
                  device);
  };
  for (size_t t = 0; t < finetuned.size(); ++t) {
    const std::string what = concat("fine-tuned tensor ", t);
    Viewed v = view_of(finetuned[t], what, false, stream, keep);
    check_device(v, what);
    fts.push_back(std::move(v.tensor));
  }
  Viewed o = view_of(out, "output tensor", true, stream, keep);
  check_device(o, "the output tensor");
  DeviceTensor base_tensor;
  const bool has_base = !base.is_none();
  if (has_base) {
    Viewed b = view_of(base, "base tensor", false, stream, keep);
    check_device(b, "the base tensor");
    base_tensor = std::move(b.tensor);
  }
  py::gil_scoped_release release;
  DeviceGuard guard(device < 0 ? 0 : device);
  merge_matrix_cuda(options, fts, has_base ? &base_tensor : nullptr, o.tensor,
                    reinterpret_cast<cudaStream_t>(stream));
}

std::string device_name_py(int device) {
  ISOFAST_CHECK(cuda_available(), "no CUDA device is available");
  return cuda_device_name(device);
}

void synchronize_py() {
  py::gil_scoped_release release;
  ISOFAST_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "isofast CUDA backend (cuBLAS / cuSOLVER): the core's matrix methods on the GPU";

  pyglue::register_error_translator();

  m.def("available", &cuda_available, "True when a CUDA device is usable.");
  m.def("release", &release_cuda_contexts,
        "Free the cached cuBLAS/cuSOLVER handles and workspaces (also run at exit).");
  py::module_::import("atexit").attr("register")(m.attr("release"));
  m.def("device_name", &device_name_py, py::arg("device") = 0, "Name of a CUDA device.");
  m.def("synchronize", &synchronize_py, "cudaDeviceSynchronize().");
  // MergeOptions is the type isofast._core registers: import it first, share its binding.
  py::module_::import("isofast._core");
  m.def("merge_matrix", &merge_matrix_py, py::arg("options"), py::arg("finetuned"),
        py::arg("out"), py::arg("base") = py::none(), py::arg("stream") = py::none(),
        "One 2-D key merged on the GPU by the core's method code (options.kernel: iso_c, iso_cts "
        "or tsv_m). finetuned: CUDA tensors theta_t (or task matrices D_t when base is None); out "
        "(written): base + alpha * M. stream: a cudaStream_t as int (e.g. "
        "torch.cuda.current_stream().cuda_stream); None: the legacy default stream.");
  m.def("take_route_counts", [] { return RouteLog::instance().take(); },
        "Routes and fallbacks the GPU merges took since the last call, with counts.");
}
