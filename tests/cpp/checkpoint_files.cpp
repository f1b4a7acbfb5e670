#include "checkpoint_files.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "checkpoint/shard_layout.h"
#include "common/crc32c.h"
#include "common/file_io.h"
#include "temp_dir.h"

namespace pe::test {

TestTensor make_tensor(const std::string& name, size_t floats, uint32_t seed) {
  TestTensor t;
  t.spec = TensorSpec{name, "F32", {static_cast<int64_t>(floats)}, floats * 4};
  t.bytes.resize(floats * 4);
  uint32_t x = seed * 2654435761u + 1;
  for (uint8_t& b : t.bytes) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<uint8_t>(x);
  }
  return t;
}

std::vector<TensorSource> sources_of(const std::vector<TestTensor>& tensors) {
  std::vector<TensorSource> out;
  for (const TestTensor& t : tensors) out.push_back(t.source());
  return out;
}

std::vector<TensorSpec> specs_of(const std::vector<TestTensor>& tensors) {
  std::vector<TensorSpec> out;
  for (const TestTensor& t : tensors) out.push_back(t.spec);
  return out;
}

std::vector<ShardRead> part_reads(const std::string& dir, const std::vector<TestTensor>& tensors, size_t max_shards,
                                  std::vector<std::vector<uint8_t>>& out) {
  CheckpointLayout layout = plan_layout(specs_of(tensors), max_shards);
  out.assign(tensors.size(), {});
  std::vector<ShardRead> reads;
  for (const ShardPlan& plan : layout.shards) {
    ShardRead r;
    r.path = join_path(dir, plan.file_name);
    r.file_bytes = plan.file_bytes();
    r.header_bytes = plan.header.size();
    r.file_crc32c = crc32c(plan.header.data(), plan.header.size());
    for (size_t i : plan.tensors) {
      const TestTensor& t = tensors[i];
      uint32_t crc = crc32c(t.bytes.data(), t.bytes.size());
      out[i].assign(t.bytes.size(), 0);
      uint64_t offset = plan.header.size() + layout.tensors[i].data_begin;
      r.tensors.push_back(TensorRead{t.spec.name, offset, t.spec.nbytes, crc, out[i].data()});
      r.extents.push_back(TensorExtent{offset, t.spec.nbytes, crc});
      r.file_crc32c = crc32c_combine(r.file_crc32c, crc, t.spec.nbytes);
    }
    reads.push_back(std::move(r));
  }
  return reads;
}

std::string checked_manifest(const std::string& dir) {
  const std::string path = join_path(dir, "manifest.json");
  if (!path_exists(path)) {
    ADD_FAILURE() << "no manifest.json in " << dir;
    return "";
  }
  // {"manifest_crc32c":"xxxxxxxx","manifest":<m>}\n, the CRC over <m>.
  const std::string text = read_file(path);
  const std::string head = "{\"manifest_crc32c\":\"";
  const std::string mid = "\",\"manifest\":";
  if (text.compare(0, head.size(), head) != 0 || text.size() < head.size() + 8 + mid.size() + 2 ||
      text.compare(head.size() + 8, mid.size(), mid) != 0 || text.substr(text.size() - 2) != "}\n") {
    ADD_FAILURE() << "malformed manifest wrapper: " << text.substr(0, 80);
    return "";
  }
  const std::string inner = text.substr(head.size() + 8 + mid.size(), text.size() - head.size() - 8 - mid.size() - 2);
  char want[16];
  std::snprintf(want, sizeof(want), "%08x", crc32c(inner.data(), inner.size()));
  if (text.compare(head.size(), 8, want) != 0) {
    ADD_FAILURE() << "manifest CRC mismatch in " << path;
    return "";
  }
  return inner;
}

void expect_complete_part(const std::string& dir, const std::vector<TestTensor>& tensors, size_t max_shards,
                          uint64_t step) {
  CheckpointLayout layout = plan_layout(specs_of(tensors), max_shards);
  std::vector<std::string> expected{"manifest.json"};
  for (const ShardPlan& plan : layout.shards) expected.push_back(plan.file_name);
  std::vector<std::string> present = list_directory(dir);
  std::sort(expected.begin(), expected.end());
  std::sort(present.begin(), present.end());
  EXPECT_EQ(present, expected) << "in " << dir;

  const std::string manifest = checked_manifest(dir);
  EXPECT_NE(manifest.find("\"step\":" + std::to_string(step) + ","), std::string::npos) << manifest.substr(0, 120);

  std::vector<std::vector<uint8_t>> out;
  std::vector<ShardRead> reads = part_reads(dir, tensors, max_shards, out);
  ASSERT_NO_THROW(read_shards(reads, 2)) << "in " << dir;
  for (size_t i = 0; i < tensors.size(); ++i) EXPECT_EQ(out[i], tensors[i].bytes) << tensors[i].spec.name;
}

}  // namespace pe::test
