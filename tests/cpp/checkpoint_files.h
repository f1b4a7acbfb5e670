// Tensors to save and the checks that a checkpoint part on disk holds them, without Python:
// the reads are built the way src/pyengine/checkpoint builds them from a manifest, from the same
// deterministic plan_layout the writer used.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/async_writer.h"
#include "checkpoint/shard_reader.h"

namespace pe::test {

struct TestTensor {
  TensorSpec spec;
  std::vector<uint8_t> bytes;
  TensorSource source() const { return TensorSource{spec, bytes.data()}; }
};

// `floats` F32 values, their bytes a function of `seed`.
TestTensor make_tensor(const std::string& name, size_t floats, uint32_t seed);
std::vector<TensorSource> sources_of(const std::vector<TestTensor>& tensors);
std::vector<TensorSpec> specs_of(const std::vector<TestTensor>& tensors);

// The reads of every tensor of the part in `dir` into out[i] (resized here), each shard with its
// whole-file CRC, as the manifest of a save of `tensors` with `max_shards` records them.
std::vector<ShardRead> part_reads(const std::string& dir, const std::vector<TestTensor>& tensors, size_t max_shards,
                                  std::vector<std::vector<uint8_t>>& out);

// The manifest text inside its self-check wrapper, after verifying the wrapper's CRC32C; empty
// (and a test failure) when the file is missing or the CRC does not match.
std::string checked_manifest(const std::string& dir);

// Fails the test unless `dir` holds exactly a complete part: every shard and manifest.json,
// the manifest records `step`, and every byte reads back equal and verified.
void expect_complete_part(const std::string& dir, const std::vector<TestTensor>& tensors, size_t max_shards,
                          uint64_t step);

}  // namespace pe::test
