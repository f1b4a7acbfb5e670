// Block checksums and the SIGBUS guard, end to end through MmapDataset and BatchAssembler: a
// damaged payload byte is refused on first read naming the file and the dataset samples of its
// block (not shard-local indices); kNever really does not check, kOpen checks at open; version
// 1 files open unchecked; and a file truncated under the map is a DataError, not a SIGBUS.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "batch_contents.h"
#include "data/batch_assembler.h"
#include "dataset_files.h"
#include "temp_dir.h"

namespace pe::data {
namespace {

// 3 shards of 100 samples: index.<s>.bin holds 800 payload bytes, two 512-byte blocks (samples
// 0-63 and 64-99 of the shard).
const std::vector<uint64_t> kCounts{100, 100, 100};

// In place (the open dataset's mapping sees it, as it would see damage on disk).
void flip_byte(const std::string& path, uint64_t at, uint8_t mask = 0x40) {
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  uint8_t b = 0;
  ASSERT_EQ(::pread(fd, &b, 1, static_cast<off_t>(at)), 1);
  b ^= mask;
  ASSERT_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(at)), 1);
  ::close(fd);
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

std::vector<uint64_t> range(uint64_t first, uint64_t n) {
  std::vector<uint64_t> v(n);
  for (uint64_t k = 0; k < n; ++k) v[k] = first + k;
  return v;
}

TEST(DatasetIntegrity, ADamagedBlockIsRefusedOnFirstReadNamingItsDatasetSamples) {
  test::TempDir tmp;
  auto ds = test::make_index_dataset(tmp, kCounts, true, Verify::kOnRead);
  flip_byte(tmp.file("index.1.bin"), test::kPayloadAt + 8 * 70);  // shard 1, sample 70: block 1
  for (uint64_t cache : {uint64_t{0}, uint64_t{1} << 30}) {
    BatchAssembler assembler(ds, cache, 2);
    const auto good = range(100, 64);  // shard 1's block 0 and the other shards read normally
    test::expect_batch_holds(assembler.assemble(good.data(), good.size()), good, true);
    const uint64_t bad[2] = {5, 170};
    const std::string msg = message_of([&] { assembler.assemble(bad, 2); });
    EXPECT_NE(msg.find("index.1.bin has corrupt data"), std::string::npos) << msg;
    EXPECT_NE(msg.find("samples 164 to 199"), std::string::npos) << msg;
  }
  for (uint64_t i : {uint64_t{170}, uint64_t{163}}) {  // through read_sample too (Dataset[i])
    uint64_t sizes[2];
    ds->sample_sizes(i, sizes);
    std::vector<uint8_t> a(sizes[0]), b(sizes[1]);
    uint8_t* dst[2] = {a.data(), b.data()};
    const std::string msg = message_of([&] { ds->read_sample(i, dst); });
    if (i == 170) {
      EXPECT_NE(msg.find("samples 164 to 199"), std::string::npos) << msg;
    } else {
      EXPECT_EQ(msg, "");
      uint64_t v = 0;
      std::memcpy(&v, a.data(), 8);
      EXPECT_EQ(v, 163u);
    }
  }
}

TEST(DatasetIntegrity, NeverDoesNotCheckAndOpenChecksEverythingAtOpen) {
  test::TempDir tmp;
  test::make_index_dataset(tmp, kCounts, false, Verify::kNever);
  const std::string path = tmp.file("index.2.bin");
  flip_byte(path, test::kPayloadAt + 8 * 3, 1);
  FieldSpec spec{"index", FieldKind::kFixed, 8, "<u8", {tmp.file("index.0.bin"), tmp.file("index.1.bin"), path}, std::nullopt};
  auto never = std::make_shared<const MmapDataset>(std::vector<FieldSpec>{spec}, kCounts, Verify::kNever);
  EXPECT_FALSE(never->checks_blocks());
  BatchAssembler assembler(never, 0, 1);
  const uint64_t idx[1] = {203};
  Batch batch = assembler.assemble(idx, 1);
  uint64_t v = 0;
  std::memcpy(&v, batch.buffer.data(), 8);
  EXPECT_EQ(v, 203u ^ 1u);  // the damaged value, delivered: the opt-out is real
  EXPECT_NE(message_of([&] { MmapDataset({spec}, kCounts, Verify::kOpen); }).find("samples 200 to 263"),
            std::string::npos);
  EXPECT_TRUE(MmapDataset({spec}, kCounts, Verify::kOnRead).checks_blocks());
}

TEST(DatasetIntegrity, VersionOneFilesOpenWithoutBlockChecks) {
  test::TempDir tmp;
  auto ds = test::make_index_dataset(tmp, kCounts, true, Verify::kOnRead, /*version=*/1);
  EXPECT_FALSE(ds->checks_blocks());
  BatchAssembler assembler(ds, 0, 1);
  const auto all = range(0, 300);
  test::expect_batch_holds(assembler.assemble(all.data(), all.size()), all, true);
  FieldSpec spec{"index", FieldKind::kFixed, 8, "<u8", {tmp.file("index.0.bin"), tmp.file("index.1.bin"),
                                                        tmp.file("index.2.bin")}, std::nullopt};
  EXPECT_NE(message_of([&] { MmapDataset({spec}, kCounts, Verify::kOnRead, /*version=*/2); })
                .find("has format version 1 but dataset.json says 2"),
            std::string::npos);
}

TEST(DatasetIntegrity, AFileTruncatedUnderTheMapIsADataErrorNamingIt) {
  test::TempDir tmp;
  // Big enough that the cut leaves whole pages of the payload unmapped.
  const std::vector<uint64_t> counts{4096};
  auto ds = test::make_index_dataset(tmp, counts, true, Verify::kOnRead);
  ASSERT_EQ(::truncate(tmp.file("index.0.bin").c_str(), 8192), 0);
  for (uint64_t cache : {uint64_t{0}, uint64_t{1} << 30}) {
    BatchAssembler assembler(ds, cache, 2);
    const uint64_t idx[2] = {1, 4000};
    const std::string msg = message_of([&] { assembler.assemble(idx, 2); });
    EXPECT_NE(msg.find("index.0.bin shrank while being read"), std::string::npos) << msg;
    EXPECT_EQ(assembler.cache().cached_bytes(), 0u) << "a failed fill left bytes charged";
  }
  ASSERT_EQ(::truncate(tmp.file("tokens.0.bin").c_str(), 4096), 0);  // the offset table is gone too
  uint64_t sizes[2];
  EXPECT_NE(message_of([&] { ds->sample_sizes(4000, sizes); }).find("tokens.0.bin shrank"), std::string::npos);
}

}  // namespace
}  // namespace pe::data
