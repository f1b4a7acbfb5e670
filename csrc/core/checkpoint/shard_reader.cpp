#include "checkpoint/shard_reader.h"

#include <algorithm>
#include <memory>

#include "common/crc32c.h"
#include "common/errors.h"
#include "common/file_io.h"
#include "common/parallel.h"

namespace pe {
namespace {

constexpr uint64_t kChunk = uint64_t{4} << 20;

void check_size(const File& file, uint64_t expected) {
  uint64_t actual = file.size();
  if (actual != expected)
    throw CheckpointError("shard " + file.path() + " is " + std::to_string(actual) + " bytes but the manifest says " +
                          std::to_string(expected) + (actual < expected ? " (truncated)" : ""));
}

uint32_t read_and_crc(const File& file, uint8_t* dst, uint64_t offset, uint64_t n) {
  uint32_t crc = 0;
  for (uint64_t done = 0; done < n;) {
    uint64_t k = std::min(kChunk, n - done);
    file.pread_exact(dst + done, k, offset + done);
    crc = crc32c_extend(crc, dst + done, k);
    done += k;
  }
  return crc;
}

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

void read_one(ShardRead& shard) {
  File file(shard.path, File::Mode::kRead);
  check_size(file, shard.file_bytes);
  if (shard.header_bytes < 8 || shard.header_bytes > shard.file_bytes)
    throw CheckpointError("shard " + shard.path + ": header size " + std::to_string(shard.header_bytes) +
                          " lies outside the file");
  // Validate every range before the first read.
  for (const TensorRead& t : shard.tensors) {
    if (t.offset < shard.header_bytes || t.nbytes > shard.file_bytes || t.offset > shard.file_bytes - t.nbytes)
      throw CheckpointError("tensor '" + t.name + "' in " + shard.path + " claims bytes [" + std::to_string(t.offset) +
                            ", " + std::to_string(t.offset + t.nbytes) + ") outside the data section of a " +
                            std::to_string(shard.file_bytes) + "-byte file");
    if (t.nbytes > 0 && t.dst == nullptr) throw InvalidArgument("no destination buffer for tensor '" + t.name + "'");
  }
  std::vector<const TensorRead*> by_offset;
  for (const TensorRead& t : shard.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });

  // When the tensors tile the data section exactly, the whole-file checksum is checked too.
  uint64_t expect_next = shard.header_bytes;
  bool tiles = true;
  std::unique_ptr<uint8_t[]> header(new uint8_t[shard.header_bytes]);
  file.pread_exact(header.get(), shard.header_bytes, 0);
  uint32_t file_crc = crc32c(header.get(), shard.header_bytes);
  for (const TensorRead* t : by_offset) {
    uint32_t crc = read_and_crc(file, t->dst, t->offset, t->nbytes);
    if (crc != t->crc32c)
      throw CheckpointError("checksum mismatch in tensor '" + t->name + "' of " + shard.path + " (expected " +
                            hex(t->crc32c) + ", read " + hex(crc) + "): the file is corrupt");
    tiles = tiles && t->offset == expect_next;
    expect_next = t->offset + t->nbytes;
    file_crc = crc32c_combine(file_crc, crc, t->nbytes);
  }
  if (!(tiles && expect_next == shard.file_bytes) && !shard.extents.empty()) {
    // A partial read: the tensors not read are not checked, but the header is, against the
    // manifest's record of the whole file (their CRCs stand in for their bytes).
    std::vector<TensorExtent> extents = shard.extents;
    std::sort(extents.begin(), extents.end(), [](const auto& a, const auto& b) { return a.offset < b.offset; });
    file_crc = crc32c(header.get(), shard.header_bytes);
    expect_next = shard.header_bytes;
    tiles = true;
    for (const TensorExtent& e : extents) {
      tiles = tiles && e.offset == expect_next;
      expect_next = e.offset + e.nbytes;
      file_crc = crc32c_combine(file_crc, e.crc32c, e.nbytes);
    }
  }
  if (tiles && expect_next == shard.file_bytes && file_crc != shard.file_crc32c)
    throw CheckpointError("checksum mismatch in the header of " + shard.path + ": the file is corrupt");
}

}  // namespace

void read_shards(std::vector<ShardRead>& shards, size_t threads) {
  threads = std::max<size_t>(1, std::min(threads, shards.size()));
  parallel_for(threads, "pe-ckpt-read", [&](size_t t) {
    for (size_t s = t; s < shards.size(); s += threads) read_one(shards[s]);
  });
}

void verify_file(const std::string& path, uint64_t file_bytes, uint32_t file_crc32c) {
  File file(path, File::Mode::kRead);
  check_size(file, file_bytes);
  // No larger than the file (whose size is now checked): verifying many small files, as inspect
  // and the fuzzer do, then costs no 4 MiB allocation each.
  std::unique_ptr<uint8_t[]> buf(new uint8_t[std::max<uint64_t>(1, std::min(kChunk, file_bytes))]);
  uint32_t crc = 0;
  for (uint64_t done = 0; done < file_bytes;) {
    uint64_t k = std::min(kChunk, file_bytes - done);
    file.pread_exact(buf.get(), k, done);
    crc = crc32c_extend(crc, buf.get(), k);
    done += k;
  }
  if (crc != file_crc32c)
    throw CheckpointError("checksum mismatch in " + path + " (expected " + hex(file_crc32c) + ", read " + hex(crc) +
                          "): the file is corrupt");
}

}  // namespace pe
