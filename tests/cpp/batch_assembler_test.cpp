// BatchAssembler over real dataset files: every field of every sample lands where the
// layout says, across shard boundaries, with and without the block cache.
#include "data/batch_assembler.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "batch_contents.h"
#include "dataset_files.h"
#include "temp_dir.h"

namespace pe::data {
namespace {

TEST(BatchAssembler, GathersFixedAndVariableFieldsIntoAlignedParts) {
  test::TempDir tmp;
  auto ds = test::make_index_dataset(tmp, {5, 1, 9}, /*tokens=*/true);
  for (uint64_t cache : {uint64_t{0}, uint64_t{1} << 30}) {
    BatchAssembler assembler(ds, cache, 2);
    const std::vector<uint64_t> indices{14, 0, 5, 7, 3, 3, 13};  // every shard, a repeat, out of order
    Batch b = assembler.assemble(indices.data(), indices.size());
    EXPECT_EQ(b.size, indices.size());
    ASSERT_EQ(b.fields.size(), 2u);
    for (const FieldLayout& f : b.fields) EXPECT_EQ(f.data_offset % 64, 0u);
    EXPECT_EQ(b.fields[0].offsets_offset, -1);
    EXPECT_EQ(b.fields[1].offsets_offset % 64, 0);
    EXPECT_LE(b.bytes, b.buffer.capacity());
    test::expect_batch_holds(b, indices, true);
  }
}

TEST(BatchAssembler, FixedBatchBytesIsTheBufferSizeOfAllFixedDatasets) {
  test::TempDir tmp;
  auto fixed = test::make_index_dataset(tmp, {4}, false);
  BatchAssembler assembler(fixed, 0, 1);
  EXPECT_EQ(assembler.fixed_batch_bytes(3), 24u);
  const uint64_t idx[3] = {0, 1, 2};
  EXPECT_EQ(assembler.assemble(idx, 3).bytes, 24u);
  test::TempDir tmp2;
  BatchAssembler variable(test::make_index_dataset(tmp2, {4}, true), 0, 1);
  EXPECT_EQ(variable.fixed_batch_bytes(3), 0u);
}

TEST(BatchAssembler, ASampleIndexOutOfRangeIsRefused) {
  test::TempDir tmp;
  BatchAssembler assembler(test::make_index_dataset(tmp, {4, 4}, false), 0, 1);
  const uint64_t idx[2] = {1, 8};
  EXPECT_THROW(assembler.assemble(idx, 2), std::invalid_argument);
}

}  // namespace
}  // namespace pe::data
