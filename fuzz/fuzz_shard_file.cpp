// libFuzzer target: opening one dataset field-shard file (csrc/core/data/shard_file).
//
// Input: what dataset.json promises about the file, then the file itself:
//   u8 flags          bit0: variable kind (else fixed); bit1: verify the payload checksum;
//                     bit2: rewrite the header CRC32C to match the (mutated) header, so the
//                     fuzzer explores the fields behind it; bit3: the same for the payload CRC
//   u64 count, u64 sample_bytes, char dtype[16] (NUL-padded)
//   u8 rank           0..8: the sample shape to check follows, as that many u64; else none
//   the rest:         the .bin file
// fuzz/make_corpus.py writes real files of pe.data.write_dataset in this form.
//
// Contract: ShardFile::open either throws DataError / IoError or returns a file whose every
// sample lies inside the payload, which lies inside the file, and (verified) whose samples in
// order are exactly the bytes the payload checksum covers.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/crc32c.h"
#include "common/errors.h"
#include "data/shard_file.h"
#include "fuzz_input.h"

namespace {

using pe::fuzz::require;
namespace data = pe::data;

// RawHeader's fields in shard_file.cpp.
constexpr uint64_t kPayloadCrcAt = 40;
constexpr uint64_t kNdimAt = 44;
constexpr uint64_t kShapeAt = 64;
constexpr uint8_t kMaxDims = 8;
// Samples walked per input: enough for every seed, bounded for a fixed field of empty samples,
// whose count no file size limits.
constexpr uint64_t kMaxSamples = 1 << 16;

void fix_checksums(std::string& file, uint8_t flags) {
  if (file.size() < data::kHeaderBytes) return;
  if (flags & 8) {
    uint64_t payload_bytes = 0;
    std::memcpy(&payload_bytes, file.data() + 32, 8);
    if (payload_bytes <= file.size() - data::kHeaderBytes) {
      uint32_t crc = pe::crc32c(file.data() + data::kHeaderBytes, payload_bytes);
      std::memcpy(file.data() + kPayloadCrcAt, &crc, 4);
    }
  }
  if (flags & 4) {
    uint32_t crc = pe::crc32c(file.data(), data::kHeaderCrcOffset);
    std::memcpy(file.data() + data::kHeaderCrcOffset, &crc, 4);
  }
}

void check_opened(const data::ShardFile& f, const data::ShardExpectation& expect, const std::string& file,
                  bool verified) {
  const auto* base = reinterpret_cast<const uint8_t*>(f.payload()) - data::kHeaderBytes;
  require(file.size() >= data::kHeaderBytes && std::memcmp(file.data(), data::kMagic, 8) == 0,
          "opened a file without the magic");
  uint32_t stored = 0;
  std::memcpy(&stored, file.data() + data::kHeaderCrcOffset, 4);
  require(pe::crc32c(file.data(), data::kHeaderCrcOffset) == stored, "opened a file whose header fails its CRC");
  require(f.count() == expect.count && f.kind() == expect.kind, "opened a file that differs from dataset.json");
  if (expect.shape) {
    uint32_t ndim = 0;
    std::memcpy(&ndim, file.data() + kNdimAt, 4);
    std::vector<uint64_t> shape(std::min<uint32_t>(ndim, kMaxDims));
    if (!shape.empty()) std::memcpy(shape.data(), file.data() + kShapeAt, 8 * shape.size());
    require(ndim == expect.shape->size() && shape == *expect.shape, "opened a file of another sample shape");
  }
  require(f.payload_bytes() <= file.size() - data::kHeaderBytes, "the payload extends past the end of the file");
  if (f.kind() == data::FieldKind::kFixed) {
    require(f.offsets() == nullptr, "a fixed field has an offset table");
    require(expect.sample_bytes == 0 || f.payload_bytes() / expect.sample_bytes == f.count(),
            "a fixed field's payload does not hold count samples");
    require(f.payload_bytes() == f.count() * expect.sample_bytes, "a fixed field's payload size is wrong");
    require(file.size() == data::kHeaderBytes + f.payload_bytes(), "a fixed field has trailing bytes");
  } else {
    const auto* table = reinterpret_cast<const uint8_t*>(f.offsets());
    require(table >= base + data::kHeaderBytes + f.payload_bytes(), "the offset table overlaps the payload");
    require(f.count() < file.size() / 8 && table + 8 * (f.count() + 1) == base + file.size(),
            "the offset table does not end the file");
  }
  uint64_t at = 0;
  uint32_t crc = 0;
  const uint64_t walk = std::min(f.count(), kMaxSamples);
  for (uint64_t i = 0; i < walk; ++i) {
    const uint64_t off = f.sample_offset(i), n = f.sample_size(i);
    require(off == at, "samples do not follow each other in the payload");
    require(off <= f.payload_bytes() && n <= f.payload_bytes() - off, "a sample lies outside the payload");
    if (f.kind() == data::FieldKind::kVariable)
      require(expect.sample_bytes != 0 && n % expect.sample_bytes == 0, "a sample is not whole elements");
    crc = pe::crc32c_extend(crc, f.payload() + off, n);  // reads every byte: a bad map faults here
    at += n;
  }
  if (walk == f.count()) {
    require(at == f.payload_bytes(), "the samples do not cover the payload");
    uint32_t header_crc = 0;
    std::memcpy(&header_crc, file.data() + kPayloadCrcAt, 4);
    if (verified) require(crc == header_crc, "verified samples are not the checksummed payload");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pe::fuzz::ByteReader in(data, size);
  const auto flags = in.take<uint8_t>();
  data::ShardExpectation expect;
  expect.kind = (flags & 1) ? data::FieldKind::kVariable : data::FieldKind::kFixed;
  expect.count = in.take<uint64_t>();
  expect.sample_bytes = in.take<uint64_t>();
  expect.dtype = in.take_string(16);
  const auto rank = in.take<uint8_t>();
  if (rank <= kMaxDims) {
    expect.shape.emplace();
    for (uint8_t d = 0; d < rank; ++d) expect.shape->push_back(in.take<uint64_t>());
  }
  std::string file = in.rest();
  fix_checksums(file, flags);
  expect.path = pe::fuzz::write_temp_file(file);
  const bool verify = flags & 2;
  try {
    data::ShardFile f = data::ShardFile::open(expect, verify);
    check_opened(f, expect, file, verify);
  } catch (const pe::DataError&) {
  } catch (const pe::IoError&) {
  }
  return 0;
}
