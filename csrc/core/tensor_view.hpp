// A non-owning view of a contiguous row-major array that lives in someone else's memory
// (torch, numpy, a memory-mapped file). No Python or torch types here.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dtype.hpp"

namespace isofast {

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  bool readonly = false;
  // An input still in its file (fd >= 0, `data` unused): the core reads it chunk by chunk with
  // pread into small buffers that stay in cache. Reading a warm page cache that way costs what
  // `cat` does; mapping it costs page faults per 64 KiB and page-table teardown.
  int fd = -1;
  int64_t file_offset = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  std::string shape_str() const {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

}  // namespace isofast
