// libFuzzer target: opening one dataset field-shard file (csrc/core/data/shard_file) and
// reading every sample of it through the block checks.
//
// Input: what dataset.json promises about the file, then the file itself:
//   u8 flags          bit0: variable kind (else fixed); bit1: verify everything at open (else
//                     each block on read); bit2: rewrite the header CRC32C to match the (mutated)
//                     header, so the fuzzer explores the fields behind it; bit3: the same for the
//                     payload checksums (version 1: the payload CRC; version 2: every block CRC,
//                     the block table's and the offset table's CRCs); bit4: dataset.json says
//                     format version 2 (else 1); bit5: verify never (overrides bit1)
//   u64 count, u64 sample_bytes, char dtype[16] (NUL-padded)
//   u8 rank           0..8: the sample shape to check follows, as that many u64; else none
//   the rest:         the .bin file
// fuzz/make_corpus.py writes real files of pe.data.write_dataset in this form.
//
// Contract: ShardFile::open either throws DataError / IoError or returns a file whose every
// sample lies inside the payload, which lies inside the file; a version-2 file's offset and
// block tables match the header's CRCs (unless verify is never); a sample read through
// verify() passes only if every block it touches matches its table entry, and is refused only
// if one does not; and (verified at open) the payload is exactly what its checksums cover.
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
constexpr uint64_t kVersionAt = 8;
constexpr uint64_t kCountAt = 16;
constexpr uint64_t kPayloadBytesAt = 32;
constexpr uint64_t kPayloadCrcAt = 40;
constexpr uint64_t kNdimAt = 44;
constexpr uint64_t kShapeAt = 64;
constexpr uint64_t kBlockBytesAt = 128;
constexpr uint64_t kBlockTableCrcAt = 136;
constexpr uint64_t kOffsetsCrcAt = 140;
constexpr uint8_t kMaxDims = 8;
// Samples walked per input: enough for every seed, bounded for a fixed field of empty samples,
// whose count no file size limits.
constexpr uint64_t kMaxSamples = 1 << 16;

template <class T>
T field_at(const std::string& file, uint64_t at) {
  T v{};
  if (at + sizeof(T) <= file.size()) std::memcpy(&v, file.data() + at, sizeof(T));
  return v;
}

uint64_t align8(uint64_t x) { return (x + 7) & ~uint64_t{7}; }

// Where a version-2 file's tables are, from its (mutated) header; false if they do not fit.
struct Tables {
  uint64_t payload_bytes = 0, block_bytes = 0, blocks = 0, offsets_at = 0, offsets_bytes = 0, block_table_at = 0;
};
bool locate_tables(const std::string& file, bool variable, Tables* t) {
  t->payload_bytes = field_at<uint64_t>(file, kPayloadBytesAt);
  t->block_bytes = field_at<uint64_t>(file, kBlockBytesAt);
  if (t->payload_bytes > file.size() - data::kHeaderBytes || t->block_bytes < data::kMinBlockBytes ||
      t->block_bytes > data::kMaxBlockBytes || (t->block_bytes & (t->block_bytes - 1)) != 0)
    return false;
  t->blocks = data::BlockChecksums::num_blocks(t->payload_bytes, t->block_bytes);
  t->offsets_at = align8(data::kHeaderBytes + t->payload_bytes);
  const uint64_t count = field_at<uint64_t>(file, kCountAt);
  if (variable && count >= file.size() / 8) return false;
  t->offsets_bytes = variable ? 8 * (count + 1) : 0;
  t->block_table_at = align8(t->offsets_at + t->offsets_bytes);
  return t->block_table_at + 4 * t->blocks <= file.size();
}

void fix_checksums(std::string& file, uint8_t flags) {
  if (file.size() < data::kHeaderBytes) return;
  const bool version2 = flags & 16;
  if ((flags & 8) && !version2) {
    uint64_t payload_bytes = field_at<uint64_t>(file, kPayloadBytesAt);
    if (payload_bytes <= file.size() - data::kHeaderBytes) {
      uint32_t crc = pe::crc32c(file.data() + data::kHeaderBytes, payload_bytes);
      std::memcpy(file.data() + kPayloadCrcAt, &crc, 4);
    }
  }
  Tables t;
  if ((flags & 8) && version2 && locate_tables(file, flags & 1, &t)) {
    for (uint64_t b = 0; b < t.blocks; ++b) {
      const uint64_t start = b * t.block_bytes, n = std::min(t.block_bytes, t.payload_bytes - start);
      uint32_t crc = pe::crc32c(file.data() + data::kHeaderBytes + start, n);
      std::memcpy(file.data() + t.block_table_at + 4 * b, &crc, 4);
    }
    uint32_t table_crc = pe::crc32c(file.data() + t.block_table_at, 4 * t.blocks);
    std::memcpy(file.data() + kBlockTableCrcAt, &table_crc, 4);
    if (flags & 1) {
      uint32_t offsets_crc = pe::crc32c(file.data() + t.offsets_at, t.offsets_bytes);
      std::memcpy(file.data() + kOffsetsCrcAt, &offsets_crc, 4);
    }
  }
  if (flags & 4) {
    uint32_t crc = pe::crc32c(file.data(), data::kHeaderCrcOffset);
    std::memcpy(file.data() + data::kHeaderCrcOffset, &crc, 4);
  }
}

// Whether every block of the file that [offset, offset + n) of the payload touches matches its
// entry in the block table, recomputed from the file's bytes (not through the code under test).
bool blocks_match(const std::string& file, const Tables& t, uint64_t offset, uint64_t n) {
  if (n == 0) return true;
  for (uint64_t b = offset / t.block_bytes; b <= (offset + n - 1) / t.block_bytes; ++b) {
    const uint64_t start = b * t.block_bytes, len = std::min(t.block_bytes, t.payload_bytes - start);
    if (pe::crc32c(file.data() + data::kHeaderBytes + start, len) != field_at<uint32_t>(file, t.block_table_at + 4 * b))
      return false;
  }
  return true;
}

void check_opened(const data::ShardFile& f, const data::ShardExpectation& expect, const std::string& file,
                  data::Verify verify) {
  const auto* base = reinterpret_cast<const uint8_t*>(f.payload()) - data::kHeaderBytes;
  require(file.size() >= data::kHeaderBytes && std::memcmp(file.data(), data::kMagic, 8) == 0,
          "opened a file without the magic");
  require(pe::crc32c(file.data(), data::kHeaderCrcOffset) == field_at<uint32_t>(file, data::kHeaderCrcOffset),
          "opened a file whose header fails its CRC");
  require(f.count() == expect.count && f.kind() == expect.kind, "opened a file that differs from dataset.json");
  require(f.version() == expect.version && field_at<uint32_t>(file, kVersionAt) == expect.version,
          "opened a file of another format version than dataset.json's");
  if (expect.shape) {
    uint32_t ndim = field_at<uint32_t>(file, kNdimAt);
    std::vector<uint64_t> shape(std::min<uint32_t>(ndim, kMaxDims));
    if (!shape.empty()) std::memcpy(shape.data(), file.data() + kShapeAt, 8 * shape.size());
    require(ndim == expect.shape->size() && shape == *expect.shape, "opened a file of another sample shape");
  }
  require(f.payload_bytes() <= file.size() - data::kHeaderBytes, "the payload extends past the end of the file");
  const bool version2 = f.version() >= 2;
  Tables t;
  require(!version2 || locate_tables(file, f.kind() == data::FieldKind::kVariable, &t),
          "opened a version-2 file whose tables do not fit in it");
  const uint64_t tables_end = version2 ? t.block_table_at + 4 * t.blocks : 0;
  if (f.kind() == data::FieldKind::kFixed) {
    require(f.offsets() == nullptr, "a fixed field has an offset table");
    require(expect.sample_bytes == 0 || f.payload_bytes() / expect.sample_bytes == f.count(),
            "a fixed field's payload does not hold count samples");
    require(f.payload_bytes() == f.count() * expect.sample_bytes, "a fixed field's payload size is wrong");
    require(file.size() == (version2 ? tables_end : data::kHeaderBytes + f.payload_bytes()),
            "a fixed field has trailing bytes");
  } else {
    const auto* table = reinterpret_cast<const uint8_t*>(f.offsets());
    require(table >= base + data::kHeaderBytes + f.payload_bytes(), "the offset table overlaps the payload");
    require(f.count() < file.size() / 8, "the offset table is larger than the file");
    if (version2) {
      require(table == base + t.offsets_at && file.size() == tables_end, "the tables do not end the file");
    } else {
      require(table + 8 * (f.count() + 1) == base + file.size(), "the offset table does not end the file");
    }
  }
  const bool checked = version2 && verify != data::Verify::kNever;
  require(checked == (f.block_checksums() != nullptr), "block checks are on when they should be off, or off when on");
  if (checked) {
    require(pe::crc32c(file.data() + t.block_table_at, 4 * t.blocks) == field_at<uint32_t>(file, kBlockTableCrcAt),
            "opened a file whose block table fails its CRC");
    if (f.kind() == data::FieldKind::kVariable)
      require(pe::crc32c(file.data() + t.offsets_at, t.offsets_bytes) == field_at<uint32_t>(file, kOffsetsCrcAt),
              "opened a file whose offset table fails its CRC");
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
    bool refused = false;
    try {
      f.verify(off, n);
    } catch (const pe::DataError&) {
      refused = true;
    }
    if (checked) {
      require(refused != blocks_match(file, t, off, n), refused ? "refused a sample whose blocks match their checksums"
                                                                : "passed a sample whose blocks fail their checksums");
      require(!(refused && verify == data::Verify::kOpen), "a file verified at open refused a sample");
    } else {
      require(!refused, "refused a sample without block checks");
    }
    crc = pe::crc32c_extend(crc, f.payload() + off, n);  // reads every byte: a bad map faults here
    at += n;
  }
  if (walk == f.count()) {
    require(at == f.payload_bytes(), "the samples do not cover the payload");
    if (verify == data::Verify::kOpen && !version2)
      require(crc == field_at<uint32_t>(file, kPayloadCrcAt), "verified samples are not the checksummed payload");
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
  expect.version = (flags & 16) ? 2 : 1;
  const data::Verify verify = (flags & 32) ? data::Verify::kNever : (flags & 2) ? data::Verify::kOpen : data::Verify::kOnRead;
  try {
    data::ShardFile f = data::ShardFile::open(expect, verify);
    check_opened(f, expect, file, verify);
  } catch (const pe::DataError&) {
  } catch (const pe::IoError&) {
  }
  return 0;
}
