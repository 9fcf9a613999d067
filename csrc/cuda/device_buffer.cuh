// Owning, move-only device memory on a stream: cudaMallocAsync in the constructor,
// cudaFreeAsync on the same stream in the destructor (stream-ordered, so a buffer may go out
// of scope while kernels that use it are still queued on that stream).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "cuda_check.cuh"

namespace isofast {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t count, cudaStream_t stream) : stream_(stream) { allocate(count); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)), stream_(o.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  cudaStream_t stream() const { return stream_; }

  // Grow (never shrink) to at least `count` elements; the contents are not kept.
  T* reserve(size_t count, cudaStream_t stream) {
    if (count <= count_ && stream == stream_) return ptr_;
    release();
    stream_ = stream;
    allocate(count);
    return ptr_;
  }

 private:
  void allocate(size_t count) {
    if (count == 0) return;
    void* p = nullptr;
    ISOFAST_CUDA_CHECK(cudaMallocAsync(&p, count * sizeof(T), stream_));
    ptr_ = static_cast<T*>(p);
    count_ = count;
  }
  void release() noexcept {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);  // a destructor cannot throw; errors of
    ptr_ = nullptr;                                    // the stream surface at the next check
    count_ = 0;
  }

  T* ptr_ = nullptr;
  size_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace isofast
