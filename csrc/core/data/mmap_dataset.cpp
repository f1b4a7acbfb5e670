#include "data/mmap_dataset.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/errors.h"
#include "common/mapped_read_guard.h"

namespace pe::data {

MmapDataset::MmapDataset(const std::vector<FieldSpec>& fields, const std::vector<uint64_t>& shard_counts,
                         Verify verify, uint32_t version)
    : specs_(fields), verify_(verify) {
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
      shards.push_back(ShardFile::open(ShardExpectation{spec.shard_paths[s], spec.kind, shard_counts[s],
                                                        spec.sample_bytes, spec.dtype, spec.shape, version,
                                                        shard_starts_[s]},
                                       verify));
    }
    fields_.push_back(std::move(shards));
  }
}

bool MmapDataset::checks_blocks() const {
  for (const auto& shards : fields_)
    for (const ShardFile& f : shards)
      if (f.block_checksums() == nullptr) return false;
  return verify_ != Verify::kNever;
}

void MmapDataset::locate(uint64_t i, size_t* shard, uint64_t* local) const {
  if (i >= num_samples_) throw InvalidArgument("sample index " + std::to_string(i) + " out of range");
  auto it = std::upper_bound(shard_starts_.begin(), shard_starts_.end(), i);
  *shard = static_cast<size_t>(it - shard_starts_.begin()) - 1;
  *local = i - shard_starts_[*shard];
}

void MmapDataset::sample_sizes(uint64_t i, uint64_t* sizes) const {
  size_t s = 0;
  uint64_t local = 0;
  locate(i, &s, &local);
  try {
    guard_mapped_reads([&] {
      for (size_t f = 0; f < fields_.size(); ++f) sizes[f] = fields_[f][s].sample_size(local);
    });
  } catch (const MappedReadFault& fault) {
    throw read_fault(fault.address());
  }
}

void MmapDataset::read_sample(uint64_t i, uint8_t* const* dst) const {
  size_t s = 0;
  uint64_t local = 0;
  locate(i, &s, &local);
  try {
    guard_mapped_reads([&] {
      for (size_t f = 0; f < fields_.size(); ++f) {
        const ShardFile& file = fields_[f][s];
        const uint64_t offset = file.sample_offset(local), n = file.sample_size(local);
        file.verify(offset, n);
        if (n != 0) std::memcpy(dst[f], file.payload() + offset, n);  // an empty sample may have no buffer
      }
    });
  } catch (const MappedReadFault& fault) {
    throw read_fault(fault.address());
  }
}

DataError MmapDataset::read_fault(const void* address) const {
  for (const auto& shards : fields_)
    for (const ShardFile& f : shards)
      if (f.maps(address)) return f.read_fault();
  return DataError("reading the dataset's files failed with SIGBUS at an address none of them maps; one of them "
                   "may have shrunk while being read. Open the dataset again.");
}

}  // namespace pe::data
