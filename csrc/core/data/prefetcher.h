// Worker threads that assemble batches ahead of the consumer, delivered in order.
//
// Concurrency contract:
//  - One consumer thread calls start() / next() / stop(); `threads` named workers
//    ("pe-data-N") claim batch tickets in order and assemble them in parallel (fewer, if
//    not all threads can be started; start() throws only when none can).
//  - The ready queue is a ring of `depth` slots: ticket t may be claimed only when
//    t < consumed + depth, so at most `depth` batches are being built or waiting
//    (bounded memory), and slot t % depth is always free when t is claimed.
//  - Idle workers are woken once half the ring is free (fewer wake-ups on the consumer).
//  - next() returns batches in ticket order whatever order workers finish in, so the
//    sequence is the sampler's, independent of thread timing.
//  - A worker's exception is stored in its ticket's slot and rethrown by next() when the
//    consumer reaches that ticket (earlier batches are still delivered), then the run stops.
//  - stop() closes the ring (wakes every waiter, workers abandon their work) and joins.
//    It is idempotent, called by start() and by the destructor, and never needs Python.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "data/batch_assembler.h"
#include "data/sampler.h"

namespace pe::data {

class Prefetcher {
 public:
  enum class Status { kBatch, kEnd, kTimeout };

  Prefetcher(std::shared_ptr<const BatchAssembler> assembler, Sampler sampler, size_t threads, size_t depth);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Starts producing from batch `batch` of `epoch`. Finite: ends after the epoch's last
  // batch. Infinite: continues into epoch + 1, ... Stops any previous run first.
  void start(uint64_t epoch, uint64_t batch, bool infinite);
  // Waits up to `timeout` for the next batch. Rethrows a worker's error.
  Status next(Batch* out, std::chrono::milliseconds timeout);
  void stop();

  bool running() const;
  // Test hook (a faulty backend): assembling batch `index` of any epoch throws DataError.
  void inject_failure(int64_t index) { fail_index_ = index; }
  // Test hook (a slow backend): every batch takes at least `ms` longer; stop() cuts it short.
  void inject_delay(uint32_t ms) { delay_ms_ = ms; }
  const Sampler& sampler() const { return sampler_; }

 private:
  struct Slot {
    bool filled = false;
    bool end = false;
    std::exception_ptr error;
    Batch batch;
  };

  void worker_loop();
  Batch build(uint64_t ticket) const;

  const std::shared_ptr<const BatchAssembler> assembler_;
  const Sampler sampler_;
  const size_t threads_;
  const size_t depth_;

  mutable std::mutex mu_;
  std::condition_variable space_cv_;  // consumer -> workers: a slot was freed, or closed
  std::condition_variable ready_cv_;  // workers -> consumer: a slot was filled
  std::vector<Slot> ring_;
  std::vector<std::thread> workers_;
  bool closed_ = true;
  bool exhausted_ = false;  // the end marker (or an error) has been claimed
  uint64_t next_ticket_ = 0;
  uint64_t consumed_ = 0;
  size_t idle_workers_ = 0;  // workers waiting on space_cv_
  uint64_t total_tickets_ = 0;  // finite runs: batches left in the epoch
  uint64_t start_epoch_ = 0;
  uint64_t start_batch_ = 0;
  bool infinite_ = false;
  int64_t fail_index_ = -1;  // test hooks: set only between runs
  uint32_t delay_ms_ = 0;
  std::atomic<bool> stopping_{false};  // lets a delayed build notice stop() without the lock
};

}  // namespace pe::data
