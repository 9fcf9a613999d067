// CRC-32C (Castagnoli) of a byte range: the checksum of a merge's journal (resuming). The
// SSE4.2 crc32 instruction, on three interleaved streams, does several times zlib's crc32, so
// checksumming every output byte stays a small part of a streamed merge; other CPUs use a
// table.
#pragma once
#include <cstddef>
#include <cstdint>

namespace isofast {

uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace isofast
