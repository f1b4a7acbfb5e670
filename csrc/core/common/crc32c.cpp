#include "common/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <nmmintrin.h>
#define PE_CRC32C_X86 1
#endif

namespace pe {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, reflected

struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
  }
};

const Tables& tables() {
  static const Tables kTables;
  return kTables;
}

#ifdef PE_CRC32C_X86
// Advances a raw CRC register over `len` zero bytes: the linear map M^len, as four byte
// tables. It lets three independent streams be stitched back into one CRC.
class ZeroShift {
 public:
  explicit ZeroShift(uint64_t len) {
    uint32_t column[32];
    for (int i = 0; i < 32; ++i) column[i] = crc32c_combine(1u << i, 0, len);  // M^len e_i
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int i = 0; i < 8; ++i)
          if (b & (1 << i)) v ^= column[8 * k + i];
        table_[k][b] = v;
      }
  }
  uint32_t operator()(uint32_t x) const {
    return table_[0][x & 0xFF] ^ table_[1][(x >> 8) & 0xFF] ^ table_[2][(x >> 16) & 0xFF] ^ table_[3][x >> 24];
  }

 private:
  uint32_t table_[4][256];
};

// Non-temporal 8-byte store: bypasses the caches and the read-for-ownership of the line.
__attribute__((target("sse4.2"))) inline void stream_store(uint8_t* to, uint64_t v) {
  _mm_stream_si64(reinterpret_cast<long long*>(to), static_cast<long long>(v));
}

// One pass of CRC32C over [p, p + n), extending `crc`; with kCopy, each word is also stored to
// dst (non-temporally) right after it is checksummed, so a copy reads its source once.
template <bool kCopy>
__attribute__((target("sse4.2"))) uint32_t crc_pass(uint32_t crc, uint8_t* dst, const uint8_t* p, size_t n) {
  uint64_t c = ~crc;
  if constexpr (kCopy) {
    // Non-temporal 8-byte stores need 8-byte aligned destinations: copy up to alignment first.
    while (n > 0 && (reinterpret_cast<uintptr_t>(dst) & 7u) != 0) {
      c = _mm_crc32_u8(static_cast<uint32_t>(c), *p);
      *dst++ = *p++;
      --n;
    }
  }
  // The instruction has a latency of 3 cycles and a throughput of 1: three streams over
  // adjacent blocks keep it busy (~3x one stream), then their registers are combined.
  constexpr size_t kBlock = 8192;
  static const ZeroShift kShift(kBlock);
  while (n >= 3 * kBlock) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < kBlock; i += 8) {
      uint64_t a, b, d;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + kBlock + i, 8);
      std::memcpy(&d, p + 2 * kBlock + i, 8);
      c = _mm_crc32_u64(c, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
      if constexpr (kCopy) {
        stream_store(dst + i, a);
        stream_store(dst + kBlock + i, b);
        stream_store(dst + 2 * kBlock + i, d);
      }
    }
    uint32_t merged = kShift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1);
    c = kShift(merged) ^ static_cast<uint32_t>(c2);
    p += 3 * kBlock;
    if constexpr (kCopy) dst += 3 * kBlock;
    n -= 3 * kBlock;
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    if constexpr (kCopy) {
      stream_store(dst, v);
      dst += 8;
    }
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) {
    c32 = _mm_crc32_u8(c32, *p);
    if constexpr (kCopy) *dst++ = *p;
    ++p;
  }
  if constexpr (kCopy) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
  return ~c32;
}
#endif

uint32_t gf2_times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  while (vec) {
    if (vec & 1u) sum ^= *mat;
    vec >>= 1;
    ++mat;
  }
  return sum;
}

void gf2_square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = gf2_times(mat, mat[n]);
}

}  // namespace

uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t n) {
  const auto& t = tables().t;
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return ~c;
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (len_b == 0) return crc_a;
  uint32_t even[32], odd[32];
  odd[0] = kPoly;
  uint32_t row = 1;
  for (int n = 1; n < 32; ++n) {
    odd[n] = row;
    row <<= 1;
  }
  gf2_square(even, odd);  // operator for two zero bits
  gf2_square(odd, even);  // four zero bits
  do {
    gf2_square(even, odd);
    if (len_b & 1u) crc_a = gf2_times(even, crc_a);
    len_b >>= 1;
    if (len_b == 0) break;
    gf2_square(odd, even);
    if (len_b & 1u) crc_a = gf2_times(odd, crc_a);
    len_b >>= 1;
  } while (len_b != 0);
  return crc_a ^ crc_b;
}

bool crc32c_hardware_available() {
#ifdef PE_CRC32C_X86
  static const bool kHas = __builtin_cpu_supports("sse4.2");
  return kHas;
#else
  return false;
#endif
}

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) {
#ifdef PE_CRC32C_X86
  if (crc32c_hardware_available()) return crc_pass<false>(crc, nullptr, static_cast<const uint8_t*>(data), n);
#endif
  return crc32c_extend_portable(crc, data, n);
}

uint32_t crc32c_copy(void* dst, const void* src, size_t n) {
#ifdef PE_CRC32C_X86
  if (crc32c_hardware_available())
    return crc_pass<true>(0, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n);
#endif
  std::memcpy(dst, src, n);
  return crc32c_extend_portable(0, dst, n);
}

}  // namespace pe
