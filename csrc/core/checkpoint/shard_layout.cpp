#include "checkpoint/shard_layout.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <unordered_set>

#include "common/errors.h"
#include "common/json_writer.h"

namespace pe {
namespace {

void validate_name(const std::string& name) {
  if (name.empty()) throw InvalidArgument("tensor name is empty");
  if (name == "__metadata__") throw InvalidArgument("tensor name '__metadata__' is reserved by safetensors");
  // Names are never used as paths, but a name that looks like one is refused so that no
  // tool that maps names to files can be led outside the checkpoint.
  if (name.front() == '/' || name == ".." || name.rfind("../", 0) == 0 || name.find("/../") != std::string::npos ||
      (name.size() >= 3 && name.compare(name.size() - 3, 3, "/..") == 0))
    throw InvalidArgument("tensor name '" + name + "' looks like a path outside the checkpoint");
}

std::string shard_file_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05zu-of-%05zu.safetensors", i, n);
  return buf;
}

std::string make_header(const CheckpointLayout& layout, const ShardPlan& shard) {
  std::string json = "{";
  for (size_t idx : shard.tensors) {
    const PlacedTensor& t = layout.tensors[idx];
    append_json_string(json, t.spec.name);
    json += ":{\"dtype\":\"" + t.spec.dtype + "\",\"shape\":[";
    for (size_t d = 0; d < t.spec.shape.size(); ++d) json += (d ? "," : "") + std::to_string(t.spec.shape[d]);
    json += "],\"data_offsets\":[" + std::to_string(t.data_begin) + "," +
            std::to_string(t.data_begin + t.spec.nbytes) + "]},";
  }
  json += "\"__metadata__\":{\"format\":\"pt\",\"writer\":\"pyengine\"}}";
  // safetensors allows trailing spaces; padding aligns the data section for O_DIRECT.
  json.append((kFileAlign - (8 + json.size()) % kFileAlign) % kFileAlign, ' ');
  std::string header(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) header[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return header + json;
}

}  // namespace

uint64_t dtype_size(const std::string& dtype) {
  static const std::pair<const char*, uint64_t> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U64", 8}, {"U32", 4},  {"U16", 2},     {"U8", 1},      {"BOOL", 1}, {"C64", 8}};
  for (const auto& [name, size] : kSizes)
    if (dtype == name) return size;
  throw InvalidArgument("unsupported tensor dtype '" + dtype + "'");
}

CheckpointLayout plan_layout(std::vector<TensorSpec> specs, size_t max_shards) {
  CheckpointLayout layout;
  std::unordered_set<std::string> seen;
  for (auto& s : specs) {
    validate_name(s.name);
    if (!seen.insert(s.name).second) throw InvalidArgument("duplicate tensor name '" + s.name + "'");
    // Checked products: a wrapped size (say 2^62 F32 elements, 2^64 bytes, wraps to 0) would
    // match a small byte count and put a shape no reader can honour into the header.
    uint64_t elems = 1;
    bool zero = false, overflow = false;
    for (int64_t d : s.shape) {
      if (d < 0) throw InvalidArgument("tensor '" + s.name + "' has a negative dimension");
      zero = zero || d == 0;
      overflow = __builtin_mul_overflow(elems, static_cast<uint64_t>(d), &elems) || overflow;
    }
    uint64_t bytes = 0;
    overflow = __builtin_mul_overflow(elems, dtype_size(s.dtype), &bytes) || overflow;
    if (zero) bytes = 0;
    if (overflow && !zero)
      throw InvalidArgument("tensor '" + s.name + "' is too large: its shape holds more than 2^64 bytes");
    if (bytes != s.nbytes)
      throw InvalidArgument("tensor '" + s.name + "': " + std::to_string(s.nbytes) + " bytes do not match dtype " +
                            s.dtype + " and its shape");
    layout.total_data_bytes += s.nbytes;
    layout.tensors.push_back(PlacedTensor{std::move(s), 0, 0, 0});
  }

  size_t n_shards = std::max<size_t>(1, std::min(max_shards, layout.tensors.size()));
  layout.shards.resize(n_shards);
  // Greedy balance: largest tensor first onto the lightest shard.
  std::vector<size_t> order(layout.tensors.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return layout.tensors[a].spec.nbytes > layout.tensors[b].spec.nbytes;
  });
  for (size_t idx : order) {
    auto lightest = std::min_element(layout.shards.begin(), layout.shards.end(),
                                     [](const ShardPlan& a, const ShardPlan& b) { return a.data_bytes < b.data_bytes; });
    lightest->tensors.push_back(idx);
    lightest->data_bytes += layout.tensors[idx].spec.nbytes;
    layout.tensors[idx].shard = static_cast<uint32_t>(lightest - layout.shards.begin());
  }

  uint64_t staging = 0;
  for (size_t s = 0; s < n_shards; ++s) {
    ShardPlan& shard = layout.shards[s];
    std::sort(shard.tensors.begin(), shard.tensors.end());  // file order follows the caller's order
    shard.file_name = shard_file_name(s, n_shards);
    shard.staging_offset = staging;
    uint64_t begin = 0;
    for (size_t idx : shard.tensors) {
      layout.tensors[idx].data_begin = begin;
      layout.tensors[idx].staging_offset = staging + begin;
      begin += layout.tensors[idx].spec.nbytes;
    }
    staging += (shard.data_bytes + kFileAlign - 1) / kFileAlign * kFileAlign;
    shard.header = make_header(layout, shard);
  }
  layout.staging_bytes = staging;
  return layout;
}

}  // namespace pe
