#include "checkpoint/async_writer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "checkpoint/shard_writer.h"
#include "common/crc32c.h"
#include "common/errors.h"
#include "common/file_io.h"
#include "common/interruptible_wait.h"
#include "common/json_writer.h"
#include "common/parallel.h"

namespace pe {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Below this, fanning a copy out to threads costs more than it saves.
constexpr uint64_t kParallelCopyMinBytes = uint64_t{8} << 20;

std::string build_manifest(uint64_t step, const CheckpointLayout& layout, const std::vector<uint32_t>& file_crcs,
                           const std::vector<uint32_t>& tensor_crcs,
                           const std::string& state_json) {
  std::string m = "{\"format\":\"pyengine.checkpoint\",\"version\":1,\"step\":" + std::to_string(step) +
                  ",\"created_unix\":" +
                  std::to_string(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()) +
                  ",\"shards\":[";
  for (size_t s = 0; s < layout.shards.size(); ++s) {
    const ShardPlan& plan = layout.shards[s];
    m += (s ? ",{\"file\":" : "{\"file\":");
    append_json_string(m, plan.file_name);
    m += ",\"bytes\":" + std::to_string(plan.file_bytes()) + ",\"header_bytes\":" + std::to_string(plan.header.size()) +
         ",\"crc32c\":" + std::to_string(file_crcs[s]) + "}";
  }
  m += "],\"tensors\":{";
  for (size_t i = 0; i < layout.tensors.size(); ++i) {
    const PlacedTensor& t = layout.tensors[i];
    const ShardPlan& plan = layout.shards[t.shard];
    if (i) m += ",";
    append_json_string(m, t.spec.name);
    m += ":{\"shard\":" + std::to_string(t.shard) + ",\"dtype\":\"" + t.spec.dtype + "\",\"shape\":[";
    for (size_t d = 0; d < t.spec.shape.size(); ++d) m += (d ? "," : "") + std::to_string(t.spec.shape[d]);
    m += "],\"offset\":" + std::to_string(plan.header.size() + t.data_begin) +
         ",\"nbytes\":" + std::to_string(t.spec.nbytes) + ",\"crc32c\":" + std::to_string(tensor_crcs.at(i)) +
         "}";
  }
  m += "},\"state\":" + (state_json.empty() ? std::string("null") : state_json) + "}";
  // The manifest checks itself: a flipped byte in the JSON state is caught too.
  char prefix[64];
  std::snprintf(prefix, sizeof(prefix), "{\"manifest_crc32c\":\"%08x\",\"manifest\":", crc32c(m.data(), m.size()));
  return prefix + m + "}\n";
}

// The part is all its directory holds: a leftover file (say a shard of an earlier, wider
// layout) would otherwise sit beside the new manifest. Emptiness also makes every file of the
// layout found there after a failure one that the failed save created.
void check_empty_part_directory(const std::string& dir) {
  std::vector<std::string> present;
  try {
    present = list_directory(dir);
  } catch (const IoError& e) {
    throw IoError(e.error_number(), dir,
                  "cannot open checkpoint part directory (save() writes into one the caller created)");
  }
  if (!present.empty()) {
    throw IoError(ENOTEMPTY, dir,
                  "checkpoint part directory holds '" + present.front() +
                      "'; save() writes only into a new, empty directory");
  }
}

}  // namespace

struct AsyncCheckpointWriter::Save {
  uint64_t id = 0;
  uint64_t step = 0;
  std::string directory;  // where the part is written
  CheckpointLayout layout;
  std::vector<TensorSource> sources;
  size_t sync_count = 0;
  std::string state_json;
  std::unique_ptr<StagingLease> staging;
  std::vector<uint32_t> tensor_crcs;  // by layout tensor index, computed by the copy
  Clock::time_point started;
  std::thread thread;
  SaveStats stats;
  std::exception_ptr error;
  bool error_reported = false;
};

void copy_into_staging(const CheckpointLayout& layout, const std::vector<TensorSource>& sources, size_t first,
                       size_t last, uint8_t* staging, size_t threads, uint32_t* tensor_crcs) {
  uint64_t total = 0;
  for (size_t i = first; i < last; ++i) total += sources[i].spec.nbytes;
  if (total < kParallelCopyMinBytes) threads = 1;
  threads = std::max<size_t>(1, threads);
  // Thread t copies bytes [t*total/threads, (t+1)*total/threads) of the concatenated sources,
  // so the work is even whatever the tensor sizes are. A tensor split between threads gets a
  // CRC per piece; the pieces are combined in order below.
  struct Piece {
    size_t tensor;
    uint64_t length;
    uint32_t crc;
  };
  std::vector<std::vector<Piece>> pieces(threads);
  parallel_for(threads, "pe-ckpt-copy", [&](size_t t) {
    uint64_t lo = total * t / threads, hi = total * (t + 1) / threads, pos = 0;
    for (size_t i = first; i < last && pos < hi; ++i) {
      uint64_t n = sources[i].spec.nbytes;
      uint64_t b = std::max(lo, pos), e = std::min(hi, pos + n);
      if (b < e) {
        uint32_t crc = crc32c_copy(staging + layout.tensors[i].staging_offset + (b - pos), sources[i].data + (b - pos),
                                   e - b);
        pieces[t].push_back(Piece{i, e - b, crc});
      }
      pos += n;
    }
  });
  for (size_t i = first; i < last; ++i) tensor_crcs[i] = 0;  // empty tensors have no piece
  for (const auto& thread_pieces : pieces)  // threads hold consecutive byte ranges, in order
    for (const Piece& piece : thread_pieces)
      tensor_crcs[piece.tensor] = crc32c_combine(tensor_crcs[piece.tensor], piece.crc, piece.length);
}

AsyncCheckpointWriter::AsyncCheckpointWriter(WriterOptions options)
    : options_(std::move(options)), pool_(options_.staging_cap_bytes) {
  if (options_.max_in_flight == 0) throw InvalidArgument("max_in_flight must be at least 1");
  if (options_.max_shards == 0) throw InvalidArgument("max_shards must be at least 1");
}

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  std::vector<std::shared_ptr<Save>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, s] : saves_) all.push_back(s);
  }
  for (auto& s : all)
    if (s->thread.joinable()) s->thread.join();
}

uint64_t AsyncCheckpointWriter::save(uint64_t step, std::vector<TensorSource> sources, std::string state_json,
                                     size_t sync_count, const std::string& directory, const Poll& poll) {
  if (directory.empty()) throw InvalidArgument("checkpoint part directory is empty");
  std::vector<TensorSpec> specs;
  specs.reserve(sources.size());
  for (const auto& s : sources) specs.push_back(s.spec);
  CheckpointLayout layout = plan_layout(std::move(specs), options_.max_shards);  // validates before any waiting

  auto save = std::make_shared<Save>();
  {
    std::unique_lock<std::mutex> lock(mu_);
    rethrow_unreported_locked();
    // An interrupted wait leaves here holding nothing.
    wait_polling(changed_, lock, [&] { return in_flight_ < options_.max_in_flight; }, poll);
    rethrow_unreported_locked();  // the save we waited for may have failed
    forget_finished_locked();
    save->id = next_id_++;
    ++in_flight_;
  }
  try {
    save->step = step;
    save->directory = directory;
    save->started = Clock::now();
    save->stats.step = step;
    save->stats.bytes = layout.total_data_bytes;
    save->stats.path = directory;
    save->sync_count = std::min(sync_count, sources.size());
    save->staging = std::make_unique<StagingLease>(pool_, layout.staging_bytes, poll);
    save->tensor_crcs.assign(sources.size(), 0);
    copy_into_staging(layout, sources, 0, save->sync_count, save->staging->data(), options_.copy_threads,
                      save->tensor_crcs.data());
    save->layout = std::move(layout);
    save->state_json = std::move(state_json);
    if (save->sync_count < sources.size()) {
      save->sources = std::move(sources);
    } else {
      // Everything is staged already: a blocking save reports its snapshot done on return.
      save->stats.snapshot_done = true;
      save->stats.snapshot_seconds = seconds_since(save->started);
    }
    start_pipeline(save);
  } catch (...) {
    // Nothing was started: give the slot back (the staging lease goes with `save`).
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
    changed_.notify_all();
    throw;
  }
  return save->id;
}

void AsyncCheckpointWriter::start_pipeline(const std::shared_ptr<Save>& save) {
  std::lock_guard<std::mutex> lock(mu_);
  auto listed = saves_.emplace(save->id, save).first;
  try {
    save->thread = std::thread([this, save] { run_pipeline(save); });
  } catch (...) {
    saves_.erase(listed);  // only saves whose thread runs are listed: those always finish
    throw;
  }
}

uint64_t AsyncCheckpointWriter::reserve(const std::vector<TensorSpec>& specs, const Poll& poll) {
  CheckpointLayout layout = plan_layout(specs, options_.max_shards);
  { StagingLease lease(pool_, layout.staging_bytes, poll); }  // released to the pool, which keeps it
  return pool_.allocated_bytes();
}

void AsyncCheckpointWriter::run_pipeline(const std::shared_ptr<Save>& save) {
  name_this_thread("pe-ckpt-" + std::to_string(save->step));
  // Linux keeps a nice value per thread; the writer threads started below inherit it.
  if (options_.background_nice > 0) lower_this_thread_priority(options_.background_nice);
  if (!save->sources.empty()) {
    try {
      copy_into_staging(save->layout, save->sources, save->sync_count, save->sources.size(), save->staging->data(),
                        options_.copy_threads, save->tensor_crcs.data());
    } catch (...) {
      save->error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      save->sources.clear();  // the caller may reuse its buffers from here on
      save->stats.snapshot_done = true;
      save->stats.snapshot_seconds = seconds_since(save->started);
    }
    changed_.notify_all();
  }
  if (!save->error) {
    try {
      persist(*save);
    } catch (...) {
      save->error = std::current_exception();
    }
  }
  // A finished save keeps only its stats and error: its layout and JSON may be megabytes.
  save->staging.reset();
  save->layout = CheckpointLayout{};
  save->state_json = std::string{};
  save->tensor_crcs = std::vector<uint32_t>{};
  {
    std::lock_guard<std::mutex> lock(mu_);
    save->stats.done = true;
    save->stats.failed = static_cast<bool>(save->error);
    save->stats.persist_seconds = seconds_since(save->started);
    --in_flight_;
  }
  changed_.notify_all();
}

void AsyncCheckpointWriter::persist(Save& save) {
  const std::string& dir = save.directory;
  const CheckpointLayout& layout = save.layout;
  check_empty_part_directory(dir);
  std::vector<std::string> files;
  for (const ShardPlan& plan : layout.shards) files.push_back(join_path(dir, plan.file_name));
  files.push_back(join_path(dir, "manifest.json"));
  try {
    std::vector<uint32_t> file_crcs(layout.shards.size());
    size_t writers = std::min(layout.shards.size(), std::max<size_t>(1, options_.max_shards));
    parallel_for(writers, "pe-ckpt-write", [&](size_t w) {
      for (size_t s = w; s < layout.shards.size(); s += writers)
        file_crcs[s] = write_shard(files[s], layout, s, save.staging->data(), save.tensor_crcs);
    });
    std::string manifest = build_manifest(save.step, layout, file_crcs, save.tensor_crcs, save.state_json);
    File mf(files.back(), File::Mode::kCreateNew);
    mf.write_all(manifest.data(), manifest.size());
    mf.sync();
    mf.close();
    sync_directory(dir);
  } catch (...) {
    for (const std::string& f : files) remove_file_quietly(f);
    throw;
  }
}

std::shared_ptr<AsyncCheckpointWriter::Save> AsyncCheckpointWriter::find(uint64_t id) {
  auto it = saves_.find(id);
  return it == saves_.end() ? nullptr : it->second;
}

void AsyncCheckpointWriter::wait_snapshot(uint64_t id, const Poll& poll) {
  std::unique_lock<std::mutex> lock(mu_);
  auto save = find(id);
  if (!save) return;  // long finished and forgotten
  wait_polling(changed_, lock, [&] { return save->stats.snapshot_done; }, poll);
}

void AsyncCheckpointWriter::wait(uint64_t id, const Poll& poll) {
  std::unique_lock<std::mutex> lock(mu_);
  auto save = find(id);
  if (!save) return;
  wait_polling(changed_, lock, [&] { return save->stats.done; }, poll);
  if (save->error && !save->error_reported) {
    save->error_reported = true;
    std::rethrow_exception(save->error);
  }
}

void AsyncCheckpointWriter::wait_all(const Poll& poll) {
  std::unique_lock<std::mutex> lock(mu_);
  wait_polling(changed_, lock, [&] { return in_flight_ == 0; }, poll);
  rethrow_unreported_locked();
}

bool AsyncCheckpointWriter::snapshot_done(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto save = find(id);
  return !save || save->stats.snapshot_done;
}

SaveStats AsyncCheckpointWriter::stats(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto save = find(id);
  if (!save) throw InvalidArgument("unknown save id " + std::to_string(id));
  return save->stats;
}

void AsyncCheckpointWriter::rethrow_unreported_locked() {
  for (auto& [id, s] : saves_) {
    if (s->stats.done && s->error && !s->error_reported) {
      s->error_reported = true;
      std::rethrow_exception(s->error);
    }
  }
}

void AsyncCheckpointWriter::forget_finished_locked() {
  // Keep recent saves for stats(); join and drop older finished ones whose errors were seen.
  constexpr size_t kKeep = 1024;
  for (auto it = saves_.begin(); it != saves_.end() && saves_.size() > kKeep;) {
    auto& s = it->second;
    if (s->stats.done && (!s->error || s->error_reported)) {
      if (s->thread.joinable()) s->thread.join();
      it = saves_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace pe
