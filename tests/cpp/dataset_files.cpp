#include "dataset_files.h"

#include <algorithm>
#include <cstring>

#include "common/crc32c.h"

namespace pe::test {
namespace {

template <class T>
void put(std::string& out, size_t at, T value) {
  std::memcpy(&out[at], &value, sizeof(value));
}

std::string index_sample(uint64_t i) { return std::string(reinterpret_cast<const char*>(&i), sizeof(i)); }

std::string token_sample(uint64_t i) {
  std::string s;
  for (uint64_t k = 0; k < i % 4; ++k) {
    auto v = static_cast<int32_t>(i);
    s.append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  return s;
}

}  // namespace

std::string field_file_bytes(data::FieldKind kind, uint64_t sample_bytes, const std::string& dtype,
                             const std::vector<std::string>& samples, uint32_t version, uint64_t block_bytes) {
  std::string payload;
  std::vector<uint64_t> offsets{0};
  for (const std::string& s : samples) {
    payload += s;
    offsets.push_back(payload.size());
  }
  std::string blocks;  // version 2's block table
  for (uint64_t at = 0; at < payload.size(); at += block_bytes) {
    uint32_t crc = crc32c(payload.data() + at, std::min<uint64_t>(block_bytes, payload.size() - at));
    blocks.append(reinterpret_cast<const char*>(&crc), 4);
  }
  // The RawHeader of shard_file.cpp: magic, version, kind, count, sample_bytes, payload_bytes,
  // payload_crc32c, ndim, dtype[16], shape[8], block_bytes, block_table_crc32c, offsets_crc32c;
  // its CRC32C at kHeaderCrcOffset.
  std::string file(data::kHeaderBytes, '\0');
  std::memcpy(&file[0], data::kMagic, sizeof(data::kMagic));
  put<uint32_t>(file, 8, version);
  put<uint32_t>(file, 12, static_cast<uint32_t>(kind));
  put<uint64_t>(file, 16, samples.size());
  put<uint64_t>(file, 24, sample_bytes);
  put<uint64_t>(file, 32, payload.size());
  put<uint32_t>(file, 40, crc32c(payload.data(), payload.size()));
  put<uint32_t>(file, 44, 0);  // ndim 0: scalar fixed samples; variable ones record no shape
  std::memcpy(&file[48], dtype.data(), std::min<size_t>(dtype.size(), 16));
  if (version >= 2) {
    put<uint64_t>(file, 128, block_bytes);
    put<uint32_t>(file, 136, crc32c(blocks.data(), blocks.size()));
    if (kind == data::FieldKind::kVariable)
      put<uint32_t>(file, 140, crc32c(offsets.data(), offsets.size() * sizeof(uint64_t)));
  }
  put<uint32_t>(file, data::kHeaderCrcOffset, crc32c(file.data(), data::kHeaderCrcOffset));
  file += payload;
  if (kind == data::FieldKind::kVariable || version >= 2) file.resize((file.size() + 7) / 8 * 8, '\0');
  if (kind == data::FieldKind::kVariable)
    file.append(reinterpret_cast<const char*>(offsets.data()), offsets.size() * sizeof(uint64_t));
  if (version >= 2) file += blocks;
  return file;
}

std::shared_ptr<const data::MmapDataset> make_index_dataset(const TempDir& dir,
                                                            const std::vector<uint64_t>& shard_counts, bool tokens,
                                                            data::Verify verify, uint32_t version) {
  auto field = [](const char* name, data::FieldKind kind, uint64_t sample_bytes, const char* dtype) {
    data::FieldSpec f;  // member by member: later members (an expected shape, ...) keep their defaults
    f.name = name;
    f.kind = kind;
    f.sample_bytes = sample_bytes;
    f.dtype = dtype;
    return f;
  };
  data::FieldSpec index = field("index", data::FieldKind::kFixed, 8, "<u8");
  data::FieldSpec token = field("tokens", data::FieldKind::kVariable, 4, "<i4");
  uint64_t first = 0;
  for (size_t s = 0; s < shard_counts.size(); ++s) {
    std::vector<std::string> index_samples, token_samples;
    for (uint64_t i = first; i < first + shard_counts[s]; ++i) {
      index_samples.push_back(index_sample(i));
      token_samples.push_back(token_sample(i));
    }
    first += shard_counts[s];
    index.shard_paths.push_back(dir.file("index." + std::to_string(s) + ".bin"));
    write_file(index.shard_paths.back(), field_file_bytes(index.kind, 8, index.dtype, index_samples, version));
    token.shard_paths.push_back(dir.file("tokens." + std::to_string(s) + ".bin"));
    write_file(token.shard_paths.back(), field_file_bytes(token.kind, 4, token.dtype, token_samples, version));
  }
  std::vector<data::FieldSpec> fields{index};
  if (tokens) fields.push_back(token);
  return std::make_shared<const data::MmapDataset>(fields, shard_counts, verify, version);
}

}  // namespace pe::test
