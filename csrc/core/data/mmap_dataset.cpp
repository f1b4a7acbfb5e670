#include "data/mmap_dataset.h"

#include <algorithm>
#include <cstdint>

#include "common/errors.h"

namespace pe::data {

MmapDataset::MmapDataset(const std::vector<FieldSpec>& fields, const std::vector<uint64_t>& shard_counts,
                         bool verify)
    : specs_(fields) {
  if (fields.empty()) throw InvalidArgument("a dataset needs at least one field");
  shard_starts_.push_back(0);
  for (uint64_t c : shard_counts) {
    // Each file checks its own count, but not their sum: a wrapped total would make every
    // index past it unreachable, or locate() point into the wrong shard.
    if (c > UINT64_MAX - shard_starts_.back())
      throw DataError("dataset.json lists shard counts that add up to 2^64 samples or more");
    shard_starts_.push_back(shard_starts_.back() + c);
  }
  num_samples_ = shard_starts_.back();
  for (const FieldSpec& spec : fields) {
    if (spec.shard_paths.size() != shard_counts.size())
      throw DataError("dataset.json lists " + std::to_string(spec.shard_paths.size()) + " files for field '" +
                      spec.name + "' but " + std::to_string(shard_counts.size()) + " shards");
    std::vector<ShardFile> shards;
    shards.reserve(shard_counts.size());
    for (size_t s = 0; s < shard_counts.size(); ++s) {
      shards.push_back(ShardFile::open(
          ShardExpectation{spec.shard_paths[s], spec.kind, shard_counts[s], spec.sample_bytes, spec.dtype, spec.shape},
          verify));
    }
    fields_.push_back(std::move(shards));
  }
}

void MmapDataset::locate(uint64_t i, size_t* shard, uint64_t* local) const {
  if (i >= num_samples_) throw InvalidArgument("sample index " + std::to_string(i) + " out of range");
  auto it = std::upper_bound(shard_starts_.begin(), shard_starts_.end(), i);
  *shard = static_cast<size_t>(it - shard_starts_.begin()) - 1;
  *local = i - shard_starts_[*shard];
}

}  // namespace pe::data
