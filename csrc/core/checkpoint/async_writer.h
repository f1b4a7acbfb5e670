// The asynchronous checkpoint pipeline: snapshot -> persist one part into a given directory.
//
// The writer writes a *part*: shard files and manifest.json, in today's format, straight into
// a directory that the caller created empty. Naming, committing (rename), pruning and the
// coordination of ranks belong to the caller (src/pyengine/checkpoint), which renames the part's
// directory into place only after wait() returned for it.
//
// Concurrency contract:
// - save(), reserve() and the waits are called by one thread (the training loop). save()
//   waits for a free in-flight slot (at most max_in_flight saves are unfinished), copies the
//   first `sync_count` sources into a staging block, starts the save's pipeline thread and
//   returns. That thread copies the remaining sources; every source buffer must stay alive
//   and unchanged until wait_snapshot() returns for the save (the Python binding holds them).
// - The pipeline thread checks that the directory exists and is empty (else the save fails),
//   writes the shards on parallel writer threads, fsyncs each, writes manifest.json last, and
//   fsyncs it and the directory; nothing is renamed and the parent is not fsynced. A failed
//   save removes its own files from the directory (never the directory itself, nor what was
//   there before) and keeps the error.
// - A pipeline error is kept and rethrown once: by wait() on that save, or else by the next
//   save() / wait_all().
// - Every wait (in-flight slot, staging cap, wait_snapshot, wait, wait_all) takes a Poll
//   (common/interruptible_wait.h): when it throws, the waiting call ends with that exception
//   and nothing of its own half-done (save() then holds no slot and no staging, and has started
//   nothing), while saves already started go on and finish, durable or failed, as before.
// - Background threads never call the poll; the core never touches Python objects.
// - The destructor waits for every save in flight (its errors are dropped there).
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
#include "common/interruptible_wait.h"

namespace pe {

struct WriterOptions {
  size_t max_shards = 4;
  size_t copy_threads = 2;
  size_t max_in_flight = 1;
  uint64_t staging_cap_bytes = 0;  // 0: no cap
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
  double persist_seconds = 0;   // from save() to the part being durable
  bool snapshot_done = false;
  bool done = false;
  bool failed = false;
  std::string path;  // the directory the part is written into
};

class AsyncCheckpointWriter {
 public:
  explicit AsyncCheckpointWriter(WriterOptions options);
  ~AsyncCheckpointWriter();  // waits for every save in flight; errors are dropped there
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  // Blocks for an in-flight slot and for copying sources[0, sync_count). Returns a save id.
  // The part is written into `directory`, which must exist and be empty by the time the
  // pipeline starts writing (a distributed save gives each rank's part its own directory).
  uint64_t save(uint64_t step, std::vector<TensorSource> sources, std::string state_json, size_t sync_count,
                const std::string& directory, const Poll& poll = Poll());
  // Allocates (and touches) the staging memory a save of these tensors needs, so that the first
  // save() does not pay for it. Returns the staging bytes now held by the pool.
  uint64_t reserve(const std::vector<TensorSpec>& specs, const Poll& poll = Poll());
  void wait_snapshot(uint64_t id, const Poll& poll = Poll());
  void wait(uint64_t id, const Poll& poll = Poll());
  void wait_all(const Poll& poll = Poll());
  // True once save `id` no longer reads its sources: every byte staged, or the copy failed.
  // Also true for an id unknown here (long finished and forgotten).
  bool snapshot_done(uint64_t id);
  SaveStats stats(uint64_t id);
  uint64_t staging_bytes() const { return pool_.allocated_bytes(); }
  const WriterOptions& options() const { return options_; }

 private:
  struct Save;
  // Lists the save and starts its thread; when it throws, neither happened.
  void start_pipeline(const std::shared_ptr<Save>& save);
  void run_pipeline(const std::shared_ptr<Save>& save);
  void persist(Save& save);
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
