// DLPack ABI (v1.x), declared from the public specification. Only the parts isofast reads.
#pragma once
#include <cstdint>

extern "C" {

enum IsoDLDeviceType : int32_t {
  kIsoDLCPU = 1,
  kIsoDLCUDA = 2,
  kIsoDLCUDAHost = 3,
  kIsoDLCUDAManaged = 13,
};

enum IsoDLDataTypeCode : uint8_t {
  kIsoDLInt = 0,
  kIsoDLUInt = 1,
  kIsoDLFloat = 2,
  kIsoDLBfloat = 4,
  kIsoDLBool = 6,
};

struct IsoDLDevice {
  int32_t device_type;
  int32_t device_id;
};

struct IsoDLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct IsoDLTensor {
  void* data;
  IsoDLDevice device;
  int32_t ndim;
  IsoDLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

struct IsoDLManagedTensor {
  IsoDLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(IsoDLManagedTensor* self);
};

struct IsoDLPackVersion {
  uint32_t major;
  uint32_t minor;
};

// Flag bit of the versioned struct: the producer's memory must not be written.
constexpr uint64_t kIsoDLFlagReadOnly = 1ULL << 0;

struct IsoDLManagedTensorVersioned {
  IsoDLPackVersion version;
  void* manager_ctx;
  void (*deleter)(IsoDLManagedTensorVersioned* self);
  uint64_t flags;
  IsoDLTensor dl_tensor;
};

}  // extern "C"
