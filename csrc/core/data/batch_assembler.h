// Gathers the samples of one batch into one pooled buffer, field after field.
//
// Buffer layout, each part 64-byte aligned:
//   fixed field:    batch_len * sample_bytes bytes, samples in batch order
//   variable field: int64 offsets[batch_len + 1] (in elements), then the elements
// Integrity: each sample's payload blocks are checked (ShardFile::verify: once per block per
// process) before its bytes are copied, and before the block cache is filled from them. All
// reads of the maps run in guarded regions (one for the sizes, one for the copies): a file
// that shrinks under the loader is a DataError naming it, and the half-built batch is dropped.
// Concurrency: immutable after construction; any number of threads may assemble batches.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "data/batch_pool.h"
#include "data/block_cache.h"
#include "data/mmap_dataset.h"

namespace pe::data {

struct FieldLayout {
  uint64_t data_offset = 0;
  uint64_t data_bytes = 0;
  int64_t offsets_offset = -1;  // variable fields only
};

struct Batch {
  BatchPool::Lease buffer;
  uint64_t epoch = 0;
  uint64_t index = 0;  // batch index within the epoch
  uint64_t size = 0;   // samples
  uint64_t bytes = 0;  // used bytes of the buffer
  std::vector<FieldLayout> fields;
};

class BatchAssembler {
 public:
  BatchAssembler(std::shared_ptr<const MmapDataset> dataset, uint64_t cache_bytes, size_t pool_keep_free);

  // Reads samples indices[0..n) into a fresh pooled buffer. Throws DataError (a bad block, a
  // file that shrank) or InvalidArgument (an index out of range).
  Batch assemble(const uint64_t* indices, uint64_t n) const;
  // Bytes a batch of n samples needs when every field is fixed-size; 0 otherwise.
  uint64_t fixed_batch_bytes(uint64_t n) const;

  const std::shared_ptr<BatchPool>& pool() const { return pool_; }
  BlockCache& cache() const { return *cache_; }
  const MmapDataset& dataset() const { return *dataset_; }

 private:
  std::shared_ptr<const MmapDataset> dataset_;
  std::unique_ptr<BlockCache> cache_;
  std::shared_ptr<BatchPool> pool_;
};

}  // namespace pe::data
