// CRC32C (Castagnoli), the checksum of every checkpoint shard and tensor.
// Uses the SSE4.2 crc32 instruction when the CPU has it, a slicing-by-8 table otherwise;
// both give identical results (tests compare them on random data).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pe {

// Extends `crc` (a finished CRC32C of earlier bytes, 0 for none) with `n` more bytes.
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n);

inline uint32_t crc32c(const void* data, size_t n) { return crc32c_extend(0, data, n); }

// The portable implementation, exposed so tests can check the hardware path against it.
uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t n);

// CRC32C of A||B given crc(A), crc(B) and len(B): lets writer threads checksum each tensor
// once and still get the whole-shard checksum (zlib's crc32_combine, for the Castagnoli
// polynomial).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

bool crc32c_hardware_available();

// Copies n bytes from src to dst and returns their CRC32C, reading src once. On x86-64 with
// SSE4.2 the stores bypass the cache (non-temporal), so a large copy neither evicts the
// caller's working set nor pays a read-for-ownership per line; they are fenced before return.
// The buffers must not overlap.
uint32_t crc32c_copy(void* dst, const void* src, size_t n);

}  // namespace pe
