// Writes one shard file (a valid safetensors file) from staging, checksumming as it goes.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>

#include "checkpoint/shard_layout.h"

namespace pe {

struct ShardResult {
  uint32_t file_crc = 0;                          // CRC32C of the whole file
  std::unordered_map<size_t, uint32_t> tensor_crcs;  // layout tensor index -> CRC32C of its bytes
};

// Creates `path` (which must not exist), writes header and data, fsyncs and closes it.
ShardResult write_shard(const std::string& path, const CheckpointLayout& layout, size_t shard, const uint8_t* staging);

}  // namespace pe
