// The asynchronous checkpoint pipeline: snapshot -> persist -> commit -> prune.
//
// Concurrency contract:
// - save() is called by one thread (the training loop). It waits for a free in-flight slot
//   (at most max_in_flight saves are unfinished), copies the first `sync_count` sources
//   into a staging block, starts the save's pipeline thread and returns. The remaining
//   sources are copied by that thread; the caller must keep every source buffer alive and
//   unchanged until wait_snapshot() returns for that save.
// - The pipeline thread writes shards on parallel writer threads, fsyncs each, writes
//   manifest.json last, renames step-N.tmp-<id> to step-N, fsyncs the directory, then
//   removes committed checkpoints beyond keep_last. A failed save removes its temp dir and
//   never commits; committed checkpoints are never touched except by pruning after a
//   newer commit.
// - A pipeline error is kept and rethrown once: by wait() on that save, or else by the
//   next save() / wait_all(). Background threads never touch Python objects.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/shard_layout.h"
#include "checkpoint/staging_pool.h"

namespace pe {

struct WriterOptions {
  std::string directory;
  size_t max_shards = 4;
  size_t copy_threads = 2;
  size_t max_in_flight = 1;
  uint64_t staging_cap_bytes = 0;  // 0: no cap
  size_t keep_last = 0;            // 0: keep every checkpoint
  // Added to the nice value of the background threads (overlapped copy, CRC, writes), so that
  // on a host whose cores all train they run in the gaps instead of preempting training threads.
  int background_nice = 0;
};

struct TensorSource {
  TensorSpec spec;
  const uint8_t* data = nullptr;
};

struct SaveStats {
  uint64_t step = 0;
  uint64_t bytes = 0;
  double snapshot_seconds = 0;  // until every byte was staged
  double persist_seconds = 0;   // from save() to durable commit
  bool snapshot_done = false;
  bool done = false;
  bool failed = false;
  std::string path;
};

class AsyncCheckpointWriter {
 public:
  explicit AsyncCheckpointWriter(WriterOptions options);
  ~AsyncCheckpointWriter();  // waits for every save in flight; errors are dropped there
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  // Blocks for an in-flight slot and for copying sources[0, sync_count). Returns a save id.
  // `directory` (default: the writer's own) is where step-N is committed; a distributed save
  // commits each rank's part into a new temp tree, and reuses this writer's staging for it.
  // keep_last prunes only the writer's own directory.
  uint64_t save(uint64_t step, std::vector<TensorSource> sources, std::string state_json, size_t sync_count,
                const std::string& directory = std::string());
  // Allocates (and touches) the staging memory a save of these tensors needs, so that the first
  // save() does not pay for it. Returns the staging bytes now held by the pool.
  uint64_t reserve(const std::vector<TensorSpec>& specs);
  void wait_snapshot(uint64_t id);
  void wait(uint64_t id);
  void wait_all();
  SaveStats stats(uint64_t id);
  uint64_t staging_bytes() const { return pool_.allocated_bytes(); }
  const WriterOptions& options() const { return options_; }

 private:
  struct Save;
  void run_pipeline(const std::shared_ptr<Save>& save);
  void persist(Save& save);
  void prune();
  std::shared_ptr<Save> find(uint64_t id);
  void rethrow_unreported_locked();
  void forget_finished_locked();

  const WriterOptions options_;
  StagingPool pool_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::map<uint64_t, std::shared_ptr<Save>> saves_;
  uint64_t next_id_ = 1;
  size_t in_flight_ = 0;
};

// Copies sources[first, last) into staging at their planned offsets, split across threads,
// and sets tensor_crcs[i] to the CRC32C of tensor i's bytes for i in [first, last): the copy
// reads each byte once for both, so the writers need not read staging again to checksum it.
void copy_into_staging(const CheckpointLayout& layout, const std::vector<TensorSource>& sources, size_t first,
                       size_t last, uint8_t* staging, size_t threads, uint32_t* tensor_crcs);

}  // namespace pe
