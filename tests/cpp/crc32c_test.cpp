// CRC32C against published vectors (RFC 3720 B.4, and the "123456789" check value), the
// SSE4.2 path against the portable table on data that crosses every code path's boundary
// (alignment prologue, three-stream blocks, 8-byte words, byte tail), and combine/copy.
#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace pe {
namespace {

using Impl = uint32_t (*)(uint32_t, const void*, size_t);

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (uint8_t& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// The lengths at which the hardware path changes strategy: 8-byte words, and three 8 KiB streams.
const size_t kLengths[] = {0,     1, 7, 8, 9, 63, 64, 65, 4095, 8192, 24575, 24576, 24577, 49152 + 13, 3 * 24576 + 8,
                           100003};

void expect_known_vectors(Impl impl) {
  std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xFF), up(32), down(32);
  std::iota(up.begin(), up.end(), 0);
  for (int i = 0; i < 32; ++i) down[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(impl(0, zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(impl(0, ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(impl(0, up.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(impl(0, down.data(), 32), 0x113FDB5Cu);
  // RFC 3720 B.4: an iSCSI SCSI Read (10) command PDU.
  const uint8_t pdu[48] = {0x01, 0xc0, 0, 0,    0, 0, 0, 0,    0,    0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0x04, 0,
                           0,    0,    0, 0x14, 0, 0, 0, 0x18, 0x28, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0,    0};
  EXPECT_EQ(impl(0, pdu, sizeof(pdu)), 0xD9963A56u);
  EXPECT_EQ(impl(0, "123456789", 9), 0xE3069283u);
  EXPECT_EQ(impl(0, "", 0), 0u);
}

TEST(Crc32c, DispatchedImplementationMatchesPublishedVectors) { expect_known_vectors(&crc32c_extend); }

TEST(Crc32c, PortableImplementationMatchesPublishedVectors) { expect_known_vectors(&crc32c_extend_portable); }

TEST(Crc32c, HardwareAndPortableAgreeAtEveryLengthAndAlignment) {
#if defined(__x86_64__)
  EXPECT_TRUE(crc32c_hardware_available()) << "x86-64 CI machines have SSE4.2: the fast path went untested";
#endif
  const std::vector<uint8_t> data = random_bytes(100003 + 16, 1);
  for (size_t n : kLengths)
    for (size_t misalign = 0; misalign < 8; ++misalign)
      for (uint32_t seed_crc : {0u, 0xDEADBEEFu})
        ASSERT_EQ(crc32c_extend(seed_crc, data.data() + misalign, n),
                  crc32c_extend_portable(seed_crc, data.data() + misalign, n))
            << "n=" << n << " misalign=" << misalign << " crc=" << seed_crc;
}

TEST(Crc32c, ExtendingInPiecesEqualsTheWhole) {
  const std::vector<uint8_t> data = random_bytes(300, 2);
  const uint32_t whole = crc32c(data.data(), data.size());
  for (size_t split = 0; split <= data.size(); ++split) {
    uint32_t a = crc32c(data.data(), split);
    ASSERT_EQ(crc32c_extend(a, data.data() + split, data.size() - split), whole) << split;
  }
}

TEST(Crc32c, CombineEqualsTheChecksumOfTheConcatenation) {
  const std::vector<uint8_t> data = random_bytes((1 << 20) + 777, 3);
  for (size_t len_a : {size_t{0}, size_t{1}, size_t{13}, size_t{4096}, size_t{1} << 20})
    for (size_t len_b : kLengths) {
      if (len_a + len_b > data.size()) continue;
      const uint32_t a = crc32c(data.data(), len_a), b = crc32c(data.data() + len_a, len_b);
      ASSERT_EQ(crc32c_combine(a, b, len_b), crc32c(data.data(), len_a + len_b)) << len_a << "+" << len_b;
    }
  EXPECT_EQ(crc32c_combine(0x12345678u, 0, 0), 0x12345678u);  // nothing appended
}

TEST(Crc32c, CopyCopiesExactlyAndReturnsTheSourceChecksum) {
  const std::vector<uint8_t> src = random_bytes(100003 + 16, 4);
  for (size_t n : kLengths)
    for (size_t dst_misalign : {0, 1, 3, 7, 8, 13}) {
      // Guard bytes on both sides catch a store outside [dst, dst + n).
      std::vector<uint8_t> dst(n + 32, 0xA5);
      uint32_t crc = crc32c_copy(dst.data() + 8 + dst_misalign, src.data() + 3, n);
      ASSERT_EQ(crc, crc32c_extend_portable(0, src.data() + 3, n)) << n;
      for (size_t i = 0; i < dst.size(); ++i) {
        const bool inside = i >= 8 + dst_misalign && i < 8 + dst_misalign + n;
        ASSERT_EQ(dst[i], inside ? src[3 + i - 8 - dst_misalign] : 0xA5) << "n=" << n << " byte " << i;
      }
    }
}

}  // namespace
}  // namespace pe
