// Counter-based random numbers for DARE (docs/CONTRACT.md): the keep/drop decision of entry
// i depends only on (seed, tensor name, task index, i), never on threads or chunking.
#pragma once
#include <cstdint>
#include <string>

namespace isofast {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ULL;
  return h;
}

inline uint64_t dare_key(uint64_t seed, const std::string& name, uint64_t task) {
  return mix64(mix64(mix64(seed) ^ fnv1a64(name)) ^ task);
}

// Uniform in [0, 1) with 53 random bits.
inline double dare_uniform(uint64_t key, uint64_t i) {
  return static_cast<double>(mix64(key + (i + 1) * 0x9E3779B97F4A7C15ULL) >> 11) *
         (1.0 / 9007199254740992.0);
}

}  // namespace isofast
