// Writes one shard file (a valid safetensors file) from staging.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/shard_layout.h"

namespace pe {

// Creates `path` (which must not exist), writes header and data, fsyncs and closes it, and
// returns the CRC32C of the whole file. tensor_crcs holds each layout tensor's CRC32C, computed
// when it was copied into staging; the file's CRC is combined from them and the header's,
// without reading the data again.
uint32_t write_shard(const std::string& path, const CheckpointLayout& layout, size_t shard, const uint8_t* staging,
                     const std::vector<uint32_t>& tensor_crcs);

}  // namespace pe
