#include "checkpoint/shard_writer.h"

#include <algorithm>

#include "common/crc32c.h"
#include "common/file_io.h"

namespace pe {
namespace {
// Checksum a chunk while it is still in cache, then hand it to write(2).
constexpr uint64_t kChunk = uint64_t{4} << 20;
}  // namespace

ShardResult write_shard(const std::string& path, const CheckpointLayout& layout, size_t shard, const uint8_t* staging) {
  const ShardPlan& plan = layout.shards[shard];
  ShardResult result;
  File file(path, File::Mode::kCreateNew);
  file.write_all(plan.header.data(), plan.header.size());
  uint32_t file_crc = crc32c(plan.header.data(), plan.header.size());
  for (size_t idx : plan.tensors) {
    const PlacedTensor& t = layout.tensors[idx];
    const uint8_t* p = staging + t.staging_offset;
    uint32_t crc = 0;
    for (uint64_t done = 0; done < t.spec.nbytes;) {
      uint64_t n = std::min(kChunk, t.spec.nbytes - done);
      crc = crc32c_extend(crc, p + done, n);
      file.write_all(p + done, n);
      done += n;
    }
    result.tensor_crcs[idx] = crc;
    file_crc = crc32c_combine(file_crc, crc, t.spec.nbytes);
  }
  file.sync();
  file.close();
  result.file_crc = file_crc;
  return result;
}

}  // namespace pe
