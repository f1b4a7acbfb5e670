// read_shards / verify_file against real shard files with one thing wrong at a time: every
// size and offset check must refuse before reading, every corruption must be caught by a
// checksum, and each error must name the file (and the tensor).
#include "checkpoint/shard_reader.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint/async_writer.h"
#include "checkpoint_files.h"
#include "common/crc32c.h"
#include "common/errors.h"
#include "temp_dir.h"

namespace pe {
namespace {

using test::TestTensor;

class ShardReader : public ::testing::Test {
 protected:
  void SetUp() override {
    tensors_ = {test::make_tensor("alpha", 1000, 1), test::make_tensor("beta", 3, 2),
                test::make_tensor("gamma", 257, 3)};
    dir_ = tmp_.make_subdir("part");
    WriterOptions one_shard;  // every tensor in one file
    one_shard.max_shards = 1;
    AsyncCheckpointWriter writer(one_shard);
    writer.wait(writer.save(7, test::sources_of(tensors_), "", tensors_.size(), dir_));
    reads_ = test::part_reads(dir_, tensors_, 1, out_);
    ASSERT_EQ(reads_.size(), 1u);
    ASSERT_EQ(reads_[0].tensors.size(), 3u);
  }

  ShardRead& shard() { return reads_[0]; }
  TensorRead& tensor(size_t i) { return reads_[0].tensors[i]; }
  std::string path() { return reads_[0].path; }

  void flip_byte(uint64_t offset) {
    std::fstream f(path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c = 0;
    f.get(c);
    f.seekp(static_cast<std::streamoff>(offset));
    f.put(static_cast<char>(c ^ 0x01));
  }

  // The read must throw E, whose message holds every one of `needles`.
  template <class E>
  void expect_read_error(std::vector<std::string> needles) {
    try {
      read_shards(reads_, 2);
      ADD_FAILURE() << "read succeeded";
    } catch (const E& e) {
      for (const std::string& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
  }

  test::TempDir tmp_;
  std::string dir_;
  std::vector<TestTensor> tensors_;
  std::vector<std::vector<uint8_t>> out_;
  std::vector<ShardRead> reads_;
};

TEST_F(ShardReader, ReadsAndVerifiesAnIntactShard) {
  read_shards(reads_, 4);
  for (size_t i = 0; i < tensors_.size(); ++i) EXPECT_EQ(out_[i], tensors_[i].bytes);
  EXPECT_NO_THROW(verify_file(path(), shard().file_bytes, shard().file_crc32c));
}

TEST_F(ShardReader, RefusesAFileShorterThanTheManifestSays) {
  ASSERT_EQ(::truncate(path().c_str(), static_cast<off_t>(shard().file_bytes - 1)), 0);
  expect_read_error<CheckpointError>({path(), "truncated", std::to_string(shard().file_bytes)});
  EXPECT_THROW(verify_file(path(), shard().file_bytes, shard().file_crc32c), CheckpointError);
}

TEST_F(ShardReader, RefusesAFileLongerThanTheManifestSays) {
  std::ofstream(path(), std::ios::app | std::ios::binary) << 'x';
  expect_read_error<CheckpointError>({path(), std::to_string(shard().file_bytes + 1) + " bytes"});
  EXPECT_THROW(verify_file(path(), shard().file_bytes, shard().file_crc32c), CheckpointError);
}

TEST_F(ShardReader, RefusesAHeaderSizeOutsideTheFile) {
  shard().header_bytes = 7;  // shorter than the 8-byte length prefix
  expect_read_error<CheckpointError>({path(), "header size 7"});
  shard().header_bytes = shard().file_bytes + 1;
  expect_read_error<CheckpointError>({"lies outside the file"});
}

TEST_F(ShardReader, RefusesATensorThatStartsInsideTheHeader) {
  tensor(0).offset = shard().header_bytes - 4;
  expect_read_error<CheckpointError>({"tensor 'alpha'", path(), "outside the data section"});
}

TEST_F(ShardReader, RefusesATensorThatEndsPastTheFile) {
  tensor(2).offset = shard().file_bytes - tensor(2).nbytes + 1;
  expect_read_error<CheckpointError>({"tensor 'gamma'", "outside the data section"});
}

TEST_F(ShardReader, RefusesATensorThatStartsPastTheFile) {
  tensor(1).offset = shard().file_bytes + 4096;
  expect_read_error<CheckpointError>({"tensor 'beta'"});
}

TEST_F(ShardReader, RefusesALengthLargerThanTheFile) {
  tensor(1).nbytes = shard().file_bytes + 1;
  expect_read_error<CheckpointError>({"tensor 'beta'"});
}

TEST_F(ShardReader, RefusesARangeWhoseEndOverflows) {
  // offset + nbytes wraps around 2^64 to a small number: the check must not add them.
  tensor(1).offset = UINT64_MAX - 2;
  tensor(1).nbytes = 12;
  expect_read_error<CheckpointError>({"tensor 'beta'"});
}

TEST_F(ShardReader, RefusesAMissingDestination) {
  tensor(0).dst = nullptr;
  expect_read_error<InvalidArgument>({"alpha"});
}

TEST_F(ShardReader, ChecksEveryRangeBeforeWritingAnyDestination) {
  tensor(2).offset = shard().file_bytes;  // the last tensor's range is bad
  expect_read_error<CheckpointError>({"tensor 'gamma'"});
  for (uint8_t b : out_[0]) ASSERT_EQ(b, 0) << "a tensor was read before every range was checked";
}

TEST_F(ShardReader, CatchesAFlippedByteInATensor) {
  flip_byte(tensor(2).offset + 100);
  expect_read_error<CheckpointError>({"checksum mismatch in tensor 'gamma'", path()});
  EXPECT_THROW(verify_file(path(), shard().file_bytes, shard().file_crc32c), CheckpointError);
}

TEST_F(ShardReader, CatchesAFlippedByteInTheHeaderOnAFullRead) {
  flip_byte(shard().header_bytes - 1);  // header padding: no tensor CRC covers it
  expect_read_error<CheckpointError>({"checksum mismatch in the header", path()});
}

TEST_F(ShardReader, CatchesAFlippedHeaderByteOnAPartialReadThroughTheExtents) {
  flip_byte(shard().header_bytes - 1);
  shard().tensors.erase(shard().tensors.begin());  // read beta and gamma only
  expect_read_error<CheckpointError>({"checksum mismatch in the header"});
}

TEST_F(ShardReader, APartialReadOfAnIntactShardSucceeds) {
  shard().tensors.erase(shard().tensors.begin() + 1);
  EXPECT_NO_THROW(read_shards(reads_, 1));
  EXPECT_EQ(out_[2], tensors_[2].bytes);
}

TEST_F(ShardReader, CatchesAWrongWholeFileChecksum) {
  shard().file_crc32c ^= 1;
  expect_read_error<CheckpointError>({"checksum mismatch in the header"});
  EXPECT_THROW(verify_file(path(), shard().file_bytes, shard().file_crc32c), CheckpointError);
}

TEST_F(ShardReader, AMissingFileIsAnIoErrorWithItsPath) {
  ASSERT_EQ(::unlink(path().c_str()), 0);
  try {
    read_shards(reads_, 1);
    ADD_FAILURE() << "read succeeded";
  } catch (const IoError& e) {
    EXPECT_EQ(e.error_number(), ENOENT);
    EXPECT_EQ(e.path(), path());
  }
  EXPECT_THROW(verify_file(path(), 1, 0), IoError);
}

TEST_F(ShardReader, AnEmptyTensorAtTheEndOfTheFileIsInside) {
  // A zero-length range at exactly file_bytes is legal (the end of the last tensor).
  shard().tensors.push_back(TensorRead{"empty", shard().file_bytes, 0, 0, nullptr});
  EXPECT_NO_THROW(read_shards(reads_, 1));
}

TEST(ShardReaderMany, ReadsEveryShardOfAPartWithMoreThreadsThanShards) {
  test::TempDir tmp;
  std::vector<TestTensor> tensors;
  for (int i = 0; i < 9; ++i) tensors.push_back(test::make_tensor("t" + std::to_string(i), 100 + 37 * i, i));
  const std::string dir = tmp.make_subdir("part");
  WriterOptions options;
  options.max_shards = 4;
  AsyncCheckpointWriter writer(options);
  writer.wait(writer.save(1, test::sources_of(tensors), "", 0, dir));
  std::vector<std::vector<uint8_t>> out;
  std::vector<ShardRead> reads = test::part_reads(dir, tensors, 4, out);
  ASSERT_EQ(reads.size(), 4u);
  read_shards(reads, 16);
  for (size_t i = 0; i < tensors.size(); ++i) EXPECT_EQ(out[i], tensors[i].bytes);
  // A corrupt second shard fails the whole read, whichever thread reads it.
  reads[1].file_crc32c ^= 0x80;
  EXPECT_THROW(read_shards(reads, 16), CheckpointError);
}

}  // namespace
}  // namespace pe
