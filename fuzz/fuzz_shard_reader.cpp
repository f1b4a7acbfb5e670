// libFuzzer target: reading and verifying one checkpoint shard (csrc/core/checkpoint/shard_reader).
//
// Input: what manifest.json says about the shard, then the shard file itself:
//   u8 flags         bit0: set each tensor's CRC to that of its bytes in the file (so the reader
//                    gets past the tensor checksums to the header and whole-file checks);
//                    bit1: set the file CRC to that of the whole file
//   u64 file_bytes, u64 header_bytes, u32 file_crc32c, u8 tensor count (at most 16)
//   per tensor:      u64 offset, u64 nbytes, u32 crc32c, u8 role (bit0: read it, bit1: an extent)
//   the rest:        the shard file
// fuzz/make_corpus.py writes real shards and manifests of pe.Checkpointer in this form.
//
// Contract: read_shards and verify_file either throw one of the core's errors or return
// exactly the file's bytes for every tensor, with every checksum the call claims to check true.
#include <algorithm>
#include <memory>
#include <vector>

#include "checkpoint/shard_reader.h"
#include "common/crc32c.h"
#include "common/errors.h"
#include "fuzz_input.h"

namespace {

using pe::fuzz::require;

constexpr size_t kMaxTensors = 16;

struct Claim {
  pe::TensorExtent extent;
  bool read = false;
  bool is_extent = false;
};

bool inside(const std::string& file, uint64_t offset, uint64_t nbytes) {
  return offset <= file.size() && nbytes <= file.size() - offset;
}

uint32_t crc_of(const std::string& file, uint64_t offset, uint64_t nbytes) {
  return pe::crc32c(file.data() + offset, nbytes);
}

// Whether the ranges, sorted by offset, cover [begin, end) exactly once.
bool tiles(std::vector<pe::TensorExtent> ranges, uint64_t begin, uint64_t end) {
  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) { return a.offset < b.offset; });
  uint64_t at = begin;
  for (const auto& r : ranges) {
    if (r.offset != at) return false;
    at += r.nbytes;
  }
  return at == end;
}

void check_read(pe::ShardRead& shard, const std::string& file, const std::vector<Claim>& claims) {
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  for (const Claim& c : claims) {
    if (!c.read) continue;
    // Destinations are sized as the manifest says, but never beyond the file: a claim larger than
    // the file must be refused before any byte is read, and a write past this buffer would be
    // caught by ASan.
    uint64_t size = std::min<uint64_t>(c.extent.nbytes, file.size());
    buffers.emplace_back(new uint8_t[std::max<uint64_t>(size, 1)]);
    shard.tensors.push_back(pe::TensorRead{"t" + std::to_string(shard.tensors.size()), c.extent.offset, c.extent.nbytes,
                                           c.extent.crc32c, buffers.back().get()});
  }
  std::vector<pe::ShardRead> shards{shard};
  try {
    pe::read_shards(shards, 1);
  } catch (const pe::CheckpointError&) {
    return;
  } catch (const pe::IoError&) {
    return;
  }

  require(file.size() == shard.file_bytes, "read a file whose size differs from the manifest's");
  require(shard.header_bytes >= 8 && shard.header_bytes <= file.size(), "read with a header outside the file");
  std::vector<pe::TensorExtent> read_ranges;
  for (const pe::TensorRead& t : shard.tensors) {
    require(t.offset >= shard.header_bytes && inside(file, t.offset, t.nbytes),
            "read tensor bytes outside the data section");
    require(std::memcmp(t.dst, file.data() + t.offset, t.nbytes) == 0, "returned bytes that are not the file's");
    require(pe::crc32c(t.dst, t.nbytes) == t.crc32c, "returned a tensor that fails its checksum");
    read_ranges.push_back({t.offset, t.nbytes, t.crc32c});
  }
  const uint32_t whole = pe::crc32c(file.data(), file.size());
  if (tiles(read_ranges, shard.header_bytes, file.size()))
    require(whole == shard.file_crc32c, "a full read passed a file that fails its checksum");
  // A partial read checks the header against the extents: when every extent matches the file,
  // the header is all that is left to differ, so the whole file must match.
  bool extents_match = !shard.extents.empty() && tiles(shard.extents, shard.header_bytes, file.size());
  for (const auto& e : shard.extents)
    extents_match = extents_match && inside(file, e.offset, e.nbytes) && crc_of(file, e.offset, e.nbytes) == e.crc32c;
  if (extents_match) require(whole == shard.file_crc32c, "a partial read passed a corrupt header");
}

void check_verify(const std::string& path, const std::string& file, uint64_t file_bytes, uint32_t crc) {
  bool ok = true;
  try {
    pe::verify_file(path, file_bytes, crc);
  } catch (const pe::CheckpointError&) {
    ok = false;
  }
  require(ok == (file.size() == file_bytes && pe::crc32c(file.data(), file.size()) == crc),
          "verify_file disagrees with the file's size and checksum");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pe::fuzz::ByteReader in(data, size);
  const auto flags = in.take<uint8_t>();
  pe::ShardRead shard;
  shard.file_bytes = in.take<uint64_t>();
  shard.header_bytes = in.take<uint64_t>();
  shard.file_crc32c = in.take<uint32_t>();
  std::vector<Claim> claims(std::min<size_t>(in.take<uint8_t>(), kMaxTensors));
  for (Claim& c : claims) {
    c.extent.offset = in.take<uint64_t>();
    c.extent.nbytes = in.take<uint64_t>();
    c.extent.crc32c = in.take<uint32_t>();
    const auto role = in.take<uint8_t>();
    c.read = role & 1;
    c.is_extent = role & 2;
  }
  const std::string file = in.rest();
  for (Claim& c : claims)
    if ((flags & 1) && inside(file, c.extent.offset, c.extent.nbytes))
      c.extent.crc32c = crc_of(file, c.extent.offset, c.extent.nbytes);
  if (flags & 2) shard.file_crc32c = pe::crc32c(file.data(), file.size());
  for (const Claim& c : claims)
    if (c.is_extent) shard.extents.push_back(c.extent);

  shard.path = pe::fuzz::write_temp_file(file);
  check_read(shard, file, claims);
  check_verify(shard.path, file, shard.file_bytes, shard.file_crc32c);
  return 0;
}
