// Checks that a batch assembled from make_index_dataset (dataset_files.h) holds exactly the
// samples `indices`, decoding the buffer layout documented in data/batch_assembler.h.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "data/batch_assembler.h"

namespace pe::test {

inline void expect_batch_holds(const data::Batch& b, const std::vector<uint64_t>& indices, bool tokens) {
  ASSERT_EQ(b.size, indices.size());
  const uint8_t* base = b.buffer.data();
  for (size_t k = 0; k < indices.size(); ++k) {
    uint64_t v = 0;
    std::memcpy(&v, base + b.fields[0].data_offset + 8 * k, 8);
    ASSERT_EQ(v, indices[k]) << "index field of sample " << k;
  }
  if (!tokens) return;
  const data::FieldLayout& f = b.fields[1];
  std::vector<int64_t> offsets(indices.size() + 1);
  std::memcpy(offsets.data(), base + f.offsets_offset, 8 * offsets.size());
  ASSERT_EQ(offsets[0], 0);
  for (size_t k = 0; k < indices.size(); ++k) {
    ASSERT_EQ(offsets[k + 1] - offsets[k], static_cast<int64_t>(indices[k] % 4)) << "tokens of sample " << k;
    for (int64_t e = offsets[k]; e < offsets[k + 1]; ++e) {
      int32_t t = 0;
      std::memcpy(&t, base + f.data_offset + 4 * e, 4);
      ASSERT_EQ(t, static_cast<int32_t>(indices[k]));
    }
  }
  EXPECT_EQ(f.data_bytes, static_cast<uint64_t>(offsets.back()) * 4);
}

}  // namespace pe::test
