#include "crc32c.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define ISOFAST_X86_64 1
#endif

namespace isofast {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // Castagnoli, bit-reflected

// The register update is linear over GF(2) in (register, data), so a register can be advanced
// over n zero bytes by one 32 x 32 bit matrix: "shift". Three streams over three adjacent
// blocks then combine as crc(A B C) = shift(shift(crc(A)) ^ crc0(B)) ^ crc0(C), where crc0
// starts from a zero register. Matrices are stored as 32 columns (images of each bit).
using Matrix = std::array<uint32_t, 32>;

uint32_t apply(const Matrix& m, uint32_t v) {
  uint32_t out = 0;
  for (int bit = 0; v != 0; ++bit, v >>= 1)
    if (v & 1) out ^= m[bit];
  return out;
}

Matrix compose(const Matrix& a, const Matrix& b) {  // a after b
  Matrix out{};
  for (int bit = 0; bit < 32; ++bit) out[bit] = apply(a, b[bit]);
  return out;
}

// The register after `bytes` zero bytes, as 4 byte-indexed tables (one lookup per byte).
struct Shift {
  std::array<std::array<uint32_t, 256>, 4> table{};
  explicit Shift(size_t bytes) {
    Matrix one_bit{};  // one zero bit: shift right, fold the polynomial in on a carry
    one_bit[0] = kPolynomial;
    for (int bit = 1; bit < 32; ++bit) one_bit[bit] = 1u << (bit - 1);
    Matrix power = one_bit, result{};
    for (int bit = 0; bit < 32; ++bit) result[bit] = 1u << bit;  // identity
    for (size_t bits = bytes * 8; bits != 0; bits >>= 1, power = compose(power, power))
      if (bits & 1) result = compose(power, result);
    for (uint32_t i = 0; i < 256; ++i)
      for (int k = 0; k < 4; ++k) table[k][i] = apply(result, i << (8 * k));
  }
  uint32_t operator()(uint32_t crc) const {
    return table[0][crc & 0xFF] ^ table[1][(crc >> 8) & 0xFF] ^ table[2][(crc >> 16) & 0xFF] ^
           table[3][crc >> 24];
  }
};

uint32_t crc32c_table(const uint8_t* p, size_t n, uint32_t c) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t v = i;
      for (int k = 0; k < 8; ++k) v = (v & 1) ? (v >> 1) ^ kPolynomial : v >> 1;
      t[i] = v;
    }
    return t;
  }();
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c;
}

#ifdef ISOFAST_X86_64
constexpr size_t kStream = 8192;  // bytes per stream and round: the shift amortises over it

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const uint8_t* p, size_t n, uint32_t c) {
  static const Shift shift(kStream);
  auto load = [](const uint8_t* q) {
    uint64_t word;
    std::memcpy(&word, q, 8);
    return word;
  };
  // Three independent streams hide the instruction's 3-cycle latency.
  for (; n >= 3 * kStream; n -= 3 * kStream, p += 3 * kStream) {
    uint64_t c0 = c, c1 = 0, c2 = 0;
    for (size_t i = 0; i < kStream; i += 8) {
      c0 = _mm_crc32_u64(c0, load(p + i));
      c1 = _mm_crc32_u64(c1, load(p + kStream + i));
      c2 = _mm_crc32_u64(c2, load(p + 2 * kStream + i));
    }
    c = shift(shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^
        static_cast<uint32_t>(c2);
  }
  uint64_t c64 = c;
  for (; n >= 8; n -= 8, p += 8) c64 = _mm_crc32_u64(c64, load(p));
  c = static_cast<uint32_t>(c64);
  for (; n > 0; --n, ++p) c = _mm_crc32_u8(c, *p);
  return c;
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
#ifdef ISOFAST_X86_64
  static const bool sse42 = __builtin_cpu_supports("sse4.2");
  if (sse42) return ~crc32c_sse42(p, size, ~crc);
#endif
  return ~crc32c_table(p, size, ~crc);
}

}  // namespace isofast
