// libFuzzer target: opening a whole dataset (csrc/core/data/mmap_dataset) of one or two fields
// over several shards, and locating samples in it.
//
// Input: what dataset.json promises, then the shard files:
//   u8 shards (1..4), u8 flags (bit0: variable kind; bit1: verify payloads at open (else each
//   block on read); bit2: a second field over the same files; bit3: rewrite each header's
//   CRC32C to match the mutated header; bit4: dataset.json says format version 2 (else 1);
//   bit5: verify never), u64 count per shard, u64 sample_bytes, char dtype[16]
//   per shard:        u32 length, then that many bytes of the .bin file
// fuzz/make_corpus.py writes real datasets of pe.data.write_dataset in this form.
//
// Contract: the constructor throws DataError / IoError / InvalidArgument, or the dataset holds
// exactly the sum of the shard counts, locate() maps every index to a sample that exists, and
// reading a located sample (sample_sizes, read_sample) gives its bytes or a DataError.
#include <cstring>
#include <vector>

#include "common/crc32c.h"
#include "common/errors.h"
#include "data/mmap_dataset.h"
#include "fuzz_input.h"

namespace {

using pe::fuzz::require;
namespace data = pe::data;

constexpr size_t kMaxShards = 4;

std::string with_header_crc(std::string file) {
  if (file.size() >= data::kHeaderBytes) {
    uint32_t crc = pe::crc32c(file.data(), data::kHeaderCrcOffset);
    std::memcpy(file.data() + data::kHeaderCrcOffset, &crc, 4);
  }
  return file;
}

void check_locate(const data::MmapDataset& ds, const std::vector<uint64_t>& counts, uint64_t i) {
  size_t shard = 0;
  uint64_t local = 0;
  ds.locate(i, &shard, &local);
  require(shard < counts.size() && local < counts[shard], "locate() points past its shard");
  uint64_t before = 0;
  for (size_t s = 0; s < shard; ++s) before += counts[s];
  require(before + local == i, "locate() points at another sample");
  for (size_t f = 0; f < ds.num_fields(); ++f) {
    const data::ShardFile& file = ds.shard(f, shard);
    require(file.count() == counts[shard], "a shard holds another count than dataset.json");
    require(file.sample_offset(local) <= file.payload_bytes() &&
                file.sample_size(local) <= file.payload_bytes() - file.sample_offset(local),
            "a located sample lies outside its payload");
  }
  std::vector<uint64_t> sizes(ds.num_fields());
  ds.sample_sizes(i, sizes.data());
  std::vector<std::vector<uint8_t>> bytes(ds.num_fields());
  std::vector<uint8_t*> dst;
  for (size_t f = 0; f < ds.num_fields(); ++f) {
    bytes[f].resize(sizes[f]);
    dst.push_back(bytes[f].data());
  }
  try {
    ds.read_sample(i, dst.data());
  } catch (const pe::DataError&) {
    return;  // a block that fails its checksum
  }
  for (size_t f = 0; f < ds.num_fields(); ++f) {
    const data::ShardFile& file = ds.shard(f, shard);
    require(sizes[f] == 0 || std::memcmp(bytes[f].data(), file.payload() + file.sample_offset(local), sizes[f]) == 0,
            "read_sample() returned other bytes than the file holds");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pe::fuzz::ByteReader in(data, size);
  const size_t n_shards = 1 + in.take<uint8_t>() % kMaxShards;
  const auto flags = in.take<uint8_t>();
  std::vector<uint64_t> counts(n_shards);
  for (uint64_t& c : counts) c = in.take<uint64_t>();
  data::FieldSpec spec{"f",
                       (flags & 1) ? data::FieldKind::kVariable : data::FieldKind::kFixed,
                       in.take<uint64_t>(),
                       in.take_string(16),
                       {}};
  for (size_t s = 0; s < n_shards; ++s) {
    std::string file = in.take_bytes(in.take<uint32_t>());
    if (flags & 8) file = with_header_crc(std::move(file));
    spec.shard_paths.push_back(pe::fuzz::write_temp_file(file, static_cast<int>(s)));
  }
  std::vector<data::FieldSpec> fields{spec};
  if (flags & 4) fields.push_back(data::FieldSpec{"g", spec.kind, spec.sample_bytes, spec.dtype, spec.shard_paths});

  try {
    const data::Verify verify =
        (flags & 32) ? data::Verify::kNever : (flags & 2) ? data::Verify::kOpen : data::Verify::kOnRead;
    data::MmapDataset ds(fields, counts, verify, (flags & 16) ? 2 : 1);
    unsigned __int128 total = 0;
    for (uint64_t c : counts) total += c;
    require(total == ds.size(), "the dataset's size is not the sum of its shards' counts");
    require(ds.num_shards() == n_shards && ds.num_fields() == fields.size(), "the dataset lost shards or fields");
    if (ds.size() > 0) {
      check_locate(ds, counts, 0);
      check_locate(ds, counts, ds.size() / 2);
      check_locate(ds, counts, ds.size() - 1);
    }
    bool refused = false;
    try {
      size_t shard = 0;
      uint64_t local = 0;
      ds.locate(ds.size(), &shard, &local);
    } catch (const pe::InvalidArgument&) {
      refused = true;
    }
    require(refused, "locate() accepted an index past the end");
  } catch (const pe::DataError&) {
  } catch (const pe::IoError&) {
  }
  return 0;
}
