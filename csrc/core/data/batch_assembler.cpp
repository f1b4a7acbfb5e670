#include "data/batch_assembler.h"

#include <utility>

#include "common/mapped_read_guard.h"

namespace pe::data {
namespace {

uint64_t align64(uint64_t x) { return (x + 63) & ~uint64_t{63}; }

std::vector<std::pair<const uint8_t*, uint64_t>> payload_regions(const MmapDataset& ds) {
  std::vector<std::pair<const uint8_t*, uint64_t>> regions;  // index = field * shards + shard
  for (size_t f = 0; f < ds.num_fields(); ++f)
    for (size_t s = 0; s < ds.num_shards(); ++s) regions.emplace_back(ds.shard(f, s).payload(), ds.shard(f, s).payload_bytes());
  return regions;
}

}  // namespace

BatchAssembler::BatchAssembler(std::shared_ptr<const MmapDataset> dataset, uint64_t cache_bytes, size_t pool_keep_free)
    : dataset_(std::move(dataset)),
      cache_(std::make_unique<BlockCache>(payload_regions(*dataset_), cache_bytes,
                                          [ds = dataset_.get()](size_t region, uint64_t offset, uint64_t n) {
                                            const BlockChecksums* checks =
                                                ds->shard(region / ds->num_shards(), region % ds->num_shards())
                                                    .block_checksums();
                                            return checks == nullptr ||
                                                   checks->first_bad_block(offset, n) == BlockChecksums::kNoBlock;
                                          })),
      pool_(std::make_shared<BatchPool>(pool_keep_free)) {}

uint64_t BatchAssembler::fixed_batch_bytes(uint64_t n) const {
  uint64_t bytes = 0;
  for (size_t f = 0; f < dataset_->num_fields(); ++f) {
    if (dataset_->spec(f).kind != FieldKind::kFixed) return 0;
    bytes = align64(bytes) + n * dataset_->spec(f).sample_bytes;
  }
  return bytes;
}

Batch BatchAssembler::assemble(const uint64_t* indices, uint64_t n) const {
  const MmapDataset& ds = *dataset_;
  const size_t nf = ds.num_fields(), ns = ds.num_shards();
  std::vector<size_t> shard(n);
  std::vector<uint64_t> local(n);
  for (uint64_t k = 0; k < n; ++k) ds.locate(indices[k], &shard[k], &local[k]);

  // Pass 1: the layout (variable fields need their sizes first, from the offset tables).
  Batch batch;
  batch.size = n;
  batch.fields.resize(nf);
  std::vector<uint64_t> field_bytes(nf, 0);
  bool any_variable = false;
  for (size_t f = 0; f < nf; ++f) any_variable |= ds.spec(f).kind == FieldKind::kVariable;
  if (any_variable) {
    try {
      guard_mapped_reads([&] {
        for (size_t f = 0; f < nf; ++f) {
          if (ds.spec(f).kind == FieldKind::kFixed) continue;
          uint64_t bytes = 0;
          for (uint64_t k = 0; k < n; ++k) bytes += ds.shard(f, shard[k]).sample_size(local[k]);
          field_bytes[f] = bytes;
        }
      });
    } catch (const MappedReadFault& fault) {
      throw ds.read_fault(fault.address());
    }
  }
  uint64_t end = 0;
  for (size_t f = 0; f < nf; ++f) {
    FieldLayout& lay = batch.fields[f];
    const FieldSpec& spec = ds.spec(f);
    uint64_t bytes = 0;
    if (spec.kind == FieldKind::kFixed) {
      bytes = n * spec.sample_bytes;
    } else {
      bytes = field_bytes[f];
      lay.offsets_offset = static_cast<int64_t>(align64(end));
      end = static_cast<uint64_t>(lay.offsets_offset) + 8 * (n + 1);
    }
    lay.data_offset = align64(end);
    lay.data_bytes = bytes;
    end = lay.data_offset + bytes;
  }
  batch.bytes = end;
  batch.buffer = pool_->acquire(end);

  // Pass 2: check and copy, in one guarded region (a fault drops the batch: `batch` and its
  // buffer live outside the region and are released as the error propagates).
  uint8_t* base = batch.buffer.data();
  try {
    guard_mapped_reads([&] {
      for (size_t f = 0; f < nf; ++f) {
        const FieldLayout& lay = batch.fields[f];
        const FieldSpec& spec = ds.spec(f);
        uint8_t* dst = base + lay.data_offset;
        auto* offsets = lay.offsets_offset >= 0 ? reinterpret_cast<int64_t*>(base + lay.offsets_offset) : nullptr;
        if (offsets != nullptr) offsets[0] = 0;
        for (uint64_t k = 0; k < n; ++k) {
          if (k + 1 < n) {
            // Random samples each start with a TLB and cache miss; touching the next one's first
            // line now overlaps that miss with this copy.
            const ShardFile& next = ds.shard(f, shard[k + 1]);
            __builtin_prefetch(next.payload() + next.sample_offset(local[k + 1]));
          }
          const ShardFile& file = ds.shard(f, shard[k]);
          const uint64_t offset = file.sample_offset(local[k]);
          const uint64_t size = file.sample_size(local[k]);
          file.verify(offset, size);
          cache_->copy(f * ns + shard[k], offset, size, dst);
          dst += size;
          if (offsets != nullptr) offsets[k + 1] = offsets[k] + static_cast<int64_t>(size / spec.sample_bytes);
        }
      }
    });
  } catch (const MappedReadFault& fault) {
    throw ds.read_fault(fault.address());
  }
  return batch;
}

}  // namespace pe::data
