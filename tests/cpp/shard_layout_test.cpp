// plan_layout: every validation (before a save allocates or writes anything) and the layout's
// invariants (balance, caller order, alignment, safetensors headers).
#include "checkpoint/shard_layout.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/errors.h"

namespace pe {
namespace {

TensorSpec f32(const std::string& name, std::vector<int64_t> shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return TensorSpec{name, "F32", std::move(shape), n * 4};
}

void expect_refused(std::vector<TensorSpec> specs, const std::string& needle) {
  try {
    plan_layout(std::move(specs), 4);
    ADD_FAILURE() << "accepted; expected an InvalidArgument mentioning '" << needle << "'";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

uint64_t header_length_prefix(const std::string& header) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t{static_cast<uint8_t>(header[i])} << (8 * i);
  return n;
}

TEST(ShardLayout, DtypeSizes) {
  EXPECT_EQ(dtype_size("F64"), 8u);
  EXPECT_EQ(dtype_size("BF16"), 2u);
  EXPECT_EQ(dtype_size("BOOL"), 1u);
  EXPECT_EQ(dtype_size("C64"), 8u);
  EXPECT_THROW(dtype_size("F128"), InvalidArgument);
  EXPECT_THROW(dtype_size("f32"), InvalidArgument);  // names are case-sensitive, as in safetensors
}

TEST(ShardLayout, RefusesBadNames) {
  expect_refused({f32("", {1})}, "empty");
  expect_refused({f32("__metadata__", {1})}, "reserved");
  for (const char* name : {"/etc/passwd", "..", "../x", "a/../b", "a/.."})
    expect_refused({f32(name, {1})}, "looks like a path");
  expect_refused({f32("w", {1}), f32("b", {2}), f32("w", {3})}, "duplicate tensor name 'w'");
}

TEST(ShardLayout, AcceptsNamesThatOnlyContainDots) {
  CheckpointLayout layout = plan_layout({f32("a..b", {1}), f32("layer.0/weight", {2}), f32("x/..y", {1})}, 4);
  EXPECT_EQ(layout.tensors.size(), 3u);
}

TEST(ShardLayout, RefusesBadShapesDtypesAndSizes) {
  expect_refused({f32("w", {2, -1})}, "negative dimension");
  expect_refused({TensorSpec{"w", "F31", {1}, 4}}, "unsupported tensor dtype 'F31'");
  expect_refused({TensorSpec{"w", "F32", {3}, 11}}, "11 bytes do not match");
  expect_refused({TensorSpec{"w", "BF16", {}, 4}}, "do not match");  // a scalar is one element
}

// Regression: the element count and byte size were multiplied in uint64 without an overflow
// check, so a shape whose byte size wraps to a small number (here 2^62 F32 elements = 2^64
// bytes, "0" after wrapping) was accepted and written into a header that no reader can honour.
TEST(ShardLayout, RefusesShapesWhoseByteSizeOverflows) {
  expect_refused({TensorSpec{"w", "F32", {int64_t{1} << 62}, 0}}, "too large");
  expect_refused({TensorSpec{"w", "U8", {int64_t{1} << 32, int64_t{1} << 32}, 0}}, "too large");
  expect_refused({TensorSpec{"w", "F64", {int64_t{1} << 31, int64_t{1} << 31, 4}, 0}}, "too large");
  // A zero dimension makes any other dimension harmless.
  CheckpointLayout layout = plan_layout({TensorSpec{"w", "F32", {0, int64_t{1} << 62}, 0}}, 1);
  EXPECT_EQ(layout.total_data_bytes, 0u);
}

TEST(ShardLayout, SpreadsTensorsOverAtMostMaxShardsBalancedByBytes) {
  std::vector<TensorSpec> specs{f32("a", {1000}), f32("b", {10}), f32("c", {990}), f32("d", {5}), f32("e", {1})};
  CheckpointLayout layout = plan_layout(specs, 2);
  ASSERT_EQ(layout.shards.size(), 2u);
  EXPECT_EQ(layout.shards[0].file_name, "shard-00000-of-00002.safetensors");
  EXPECT_EQ(layout.shards[1].file_name, "shard-00001-of-00002.safetensors");
  // Largest first onto the lightest (the first of equals): a | c, b -> c's, d -> a's, e -> c's.
  EXPECT_EQ(layout.shards[0].data_bytes, 4020u);
  EXPECT_EQ(layout.shards[1].data_bytes, 4004u);
  EXPECT_EQ(layout.shards[0].tensors, (std::vector<size_t>{0, 3}));
  EXPECT_EQ(layout.shards[1].tensors, (std::vector<size_t>{1, 2, 4}));
  EXPECT_EQ(layout.total_data_bytes, 8024u);
  EXPECT_EQ(layout.tensors[0].shard, 0u);
  EXPECT_EQ(layout.tensors[2].shard, 1u);

  EXPECT_EQ(plan_layout(specs, 100).shards.size(), 5u);  // never more shards than tensors
  EXPECT_EQ(plan_layout(specs, 0).shards.size(), 1u);
  EXPECT_EQ(plan_layout({}, 4).shards.size(), 1u);  // an empty checkpoint still has one (empty) shard
}

TEST(ShardLayout, OffsetsFollowTheCallersOrderAndStagingIsAligned) {
  std::vector<TensorSpec> specs{f32("a", {3}), f32("b", {1000}), f32("c", {0}), f32("d", {7}), f32("e", {2000})};
  CheckpointLayout layout = plan_layout(specs, 2);
  uint64_t staging = 0;
  for (const ShardPlan& shard : layout.shards) {
    EXPECT_EQ(shard.staging_offset, staging);
    EXPECT_EQ(shard.staging_offset % kFileAlign, 0u);
    uint64_t begin = 0;
    for (size_t k = 0; k < shard.tensors.size(); ++k) {
      const PlacedTensor& t = layout.tensors[shard.tensors[k]];
      if (k > 0) {
        EXPECT_LT(shard.tensors[k - 1], shard.tensors[k]);  // file order = caller order
      }
      EXPECT_EQ(t.data_begin, begin);
      EXPECT_EQ(t.staging_offset, shard.staging_offset + begin);
      begin += t.spec.nbytes;
    }
    EXPECT_EQ(begin, shard.data_bytes);
    staging += (shard.data_bytes + kFileAlign - 1) / kFileAlign * kFileAlign;
  }
  EXPECT_EQ(layout.staging_bytes, staging);
  for (size_t i = 0; i < specs.size(); ++i) EXPECT_EQ(layout.tensors[i].spec.name, specs[i].name);
}

TEST(ShardLayout, HeadersAreAlignedSafetensorsHeaders) {
  CheckpointLayout layout = plan_layout({f32("w\"q", {2, 3}), TensorSpec{"flag", "BOOL", {5}, 5}}, 1);
  const std::string& h = layout.shards[0].header;
  EXPECT_EQ(h.size() % kFileAlign, 0u);
  EXPECT_EQ(header_length_prefix(h), h.size() - 8);
  const std::string json = h.substr(8);
  EXPECT_EQ(json.front(), '{');
  EXPECT_NE(json.find("\"w\\\"q\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}"), std::string::npos)
      << json.substr(0, 200);
  EXPECT_NE(json.find("\"flag\":{\"dtype\":\"BOOL\",\"shape\":[5],\"data_offsets\":[24,29]}"), std::string::npos);
  EXPECT_NE(json.find("\"__metadata__\""), std::string::npos);
  const size_t close = json.find_last_not_of(' ');
  EXPECT_EQ(json[close], '}');  // padded with trailing spaces only
  EXPECT_EQ(layout.shards[0].file_bytes(), h.size() + 29);
}

}  // namespace
}  // namespace pe
