// Element types the core reads and writes, and exact conversions between them and the
// compute type (float or double). bf16/fp16 are converted here, inside the core.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace isofast {

enum class DType { F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    case DType::U16: return "uint16";
    case DType::U32: return "uint32";
    case DType::U64: return "uint64";
    case DType::Bool: return "bool";
  }
  return "?";
}

inline bool is_float(DType d) {
  return d == DType::F32 || d == DType::F64 || d == DType::F16 || d == DType::BF16;
}

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: case DType::U64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
    default: return 1;
  }
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  // Both results computed and one selected, without a branch, so loops over it vectorise.
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, overflow to inf.
inline uint16_t float_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;               // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;              // >= 65520 rounds to inf
  if (abs < 0x38800000u) {                                    // below smallest normal 2^-14
    // Subnormal: scale to units of 2^-24 and round to nearest even.
    float a;
    std::memcpy(&a, &abs, 4);
    float scaled = a * 16777216.0f;  // exact (power of two)
    float r = std::nearbyint(scaled);
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t mant = abs & 0x7fffffu;
  uint32_t exp = (abs >> 23) - 112;
  uint32_t half = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;  // may carry into exp
  return sign | static_cast<uint16_t>(half);
}

// True when no element is NaN or +-inf: an integer OR over the exponent bits, which
// vectorises (a floating-point sum is a serial dependency chain the compiler may not reorder:
// it cost 4 cycles per element and dominated streaming merges).
template <class T>
bool all_finite(const T* x, size_t n) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits exp_mask = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits hit = 0;
  for (size_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, x + i, sizeof(T));
    hit |= static_cast<Bits>((b & exp_mask) == exp_mask);
  }
  return hit == 0;
}

// Read n elements of dtype `d` at `src` as compute type T. Returns false on a non-finite value.
template <class T>
bool load_as(const void* src, DType d, size_t n, T* dst) {
  bool finite = true;
  switch (d) {
    case DType::F32: {
      auto* p = static_cast<const float*>(src);
      for (size_t i = 0; i < n; ++i) { dst[i] = static_cast<T>(p[i]); }
      break;
    }
    case DType::F64: {
      auto* p = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) { dst[i] = static_cast<T>(p[i]); }
      break;
    }
    case DType::BF16: {
      auto* p = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_to_float(p[i]));
      break;
    }
    case DType::F16: {
      auto* p = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(f16_to_float(p[i]));
      break;
    }
    default:
      return false;
  }
  return finite && all_finite(dst, n);
}

template <class T>
void store_as(const T* src, size_t n, void* dst, DType d) {
  switch (d) {
    case DType::F32: {
      auto* p = static_cast<float*>(dst);
      for (size_t i = 0; i < n; ++i) p[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::F64: {
      auto* p = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) p[i] = static_cast<double>(src[i]);
      break;
    }
    case DType::BF16: {
      auto* p = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) p[i] = float_to_bf16(static_cast<float>(src[i]));
      break;
    }
    case DType::F16: {
      auto* p = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) p[i] = float_to_f16(static_cast<float>(src[i]));
      break;
    }
    default:
      break;
  }
}

}  // namespace isofast
