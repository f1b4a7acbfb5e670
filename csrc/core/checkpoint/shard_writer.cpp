#include "checkpoint/shard_writer.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "common/crc32c.h"
#include "common/errors.h"
#include "common/file_io.h"

namespace pe {
namespace {

// Data goes to write(2) in chunks of this size.
constexpr uint64_t kChunk = uint64_t{8} << 20;

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

// Writes [data, data + n) at the file's current position. With O_DIRECT on, the bytes go
// from staging memory to the device without a copy into the page cache (on this class of
// disk about twice the bandwidth of buffered writes + fsync); where the filesystem refuses
// a direct write, the rest of the file is written buffered.
void write_chunk(File& file, bool& direct, const uint8_t* data, uint64_t n) {
  if (direct) {
    try {
      file.write_all(data, n);
      return;
    } catch (const IoError& e) {
      if (e.error_number() != EINVAL) throw;
      direct = false;
      file.set_direct(false);
    }
  }
  file.write_all(data, n);
}

}  // namespace

uint32_t write_shard(const std::string& path, const CheckpointLayout& layout, size_t shard, const uint8_t* staging,
                     const std::vector<uint32_t>& tensor_crcs) {
  const ShardPlan& plan = layout.shards[shard];
  File file(path, File::Mode::kCreateNew);
  bool direct = file.set_direct(true);

  // The header is padded to kFileAlign, so it too can be written directly from an aligned copy.
  void* raw = nullptr;
  if (posix_memalign(&raw, kFileAlign, plan.header.size()) != 0) throw std::bad_alloc();
  std::unique_ptr<void, AlignedFree> header(raw);
  std::memcpy(header.get(), plan.header.data(), plan.header.size());
  write_chunk(file, direct, static_cast<const uint8_t*>(header.get()), plan.header.size());

  // The shard's data is its tensors back to back, so the file CRC chains the tensors' CRCs.
  uint32_t file_crc = crc32c(plan.header.data(), plan.header.size());
  for (size_t index : plan.tensors)
    file_crc = crc32c_combine(file_crc, tensor_crcs.at(index), layout.tensors[index].spec.nbytes);

  const uint8_t* base = staging + plan.staging_offset;
  const uint64_t aligned_end = plan.data_bytes / kFileAlign * kFileAlign;
  for (uint64_t begin = 0; begin < plan.data_bytes;) {
    uint64_t end = begin < aligned_end ? std::min(begin + kChunk, aligned_end) : plan.data_bytes;
    // The unaligned tail (< kFileAlign bytes) cannot go through O_DIRECT.
    if (begin >= aligned_end && direct) {
      direct = false;
      file.set_direct(false);
    }
    write_chunk(file, direct, base + begin, end - begin);
    begin = end;
  }
  file.sync();
  file.close();
  return file_crc;
}

}  // namespace pe
