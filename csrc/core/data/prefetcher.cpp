#include "data/prefetcher.h"

#include <pthread.h>
#include <sched.h>

#include <string>

#include "common/errors.h"

namespace pe::data {

Prefetcher::Prefetcher(std::shared_ptr<const BatchAssembler> assembler, Sampler sampler, size_t threads, size_t depth)
    : assembler_(std::move(assembler)), sampler_(std::move(sampler)), threads_(threads), depth_(depth) {
  if (threads_ == 0) throw InvalidArgument("threads must be at least 1");
  if (depth_ == 0) throw InvalidArgument("prefetch depth must be at least 1");
}

Prefetcher::~Prefetcher() { stop(); }

void Prefetcher::start(uint64_t epoch, uint64_t batch, bool infinite) {
  stop();
  const uint64_t nb = sampler_.num_batches();
  if (batch > nb) throw InvalidArgument("batch position past the end of the epoch");
  if (infinite && nb == 0) throw InvalidArgument("an infinite loader needs at least one batch per epoch");
  std::lock_guard<std::mutex> lock(mu_);
  ring_.clear();
  ring_.resize(depth_);
  closed_ = false;
  stopping_.store(false);
  exhausted_ = false;
  next_ticket_ = 0;
  consumed_ = 0;
  idle_workers_ = 0;
  start_epoch_ = epoch;
  start_batch_ = batch;
  infinite_ = infinite;
  total_tickets_ = nb - batch;
  workers_.reserve(threads_);
  for (size_t i = 0; i < threads_; ++i) {
    try {
      workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {
      // Workers are interchangeable: when a thread cannot be started (a process or memory
      // limit), the run goes on with those that were; with none, start() fails and the
      // prefetcher stays stopped, rather than throwing with a half-started run behind it.
      if (!workers_.empty()) break;
      closed_ = true;
      throw;
    }
    // Named here, not in the thread, so every worker has its name once start() returns.
    pthread_setname_np(workers_.back().native_handle(), ("pe-data-" + std::to_string(i)).c_str());
  }
}

void Prefetcher::stop() {
  std::vector<std::thread> workers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    stopping_.store(true);
    workers.swap(workers_);
  }
  space_cv_.notify_all();
  ready_cv_.notify_all();
  for (std::thread& t : workers) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  ring_.clear();  // returns undelivered batches to the pool
}

bool Prefetcher::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !workers_.empty() && !closed_;
}

Batch Prefetcher::build(uint64_t ticket) const {
  const uint64_t nb = sampler_.num_batches();
  const uint64_t global = start_batch_ + ticket;
  const uint64_t epoch = start_epoch_ + global / nb;
  const uint64_t index = global % nb;
  for (uint32_t waited = 0; waited < delay_ms_ && !stopping_.load(); waited += 5)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (fail_index_ >= 0 && index == static_cast<uint64_t>(fail_index_))
    throw DataError("injected failure while reading batch " + std::to_string(index) + " (test hook)");
  const uint64_t len = sampler_.batch_len(index);
  std::vector<uint64_t> indices(len);
  sampler_.batch_indices(epoch, index, indices.data());
  Batch batch = assembler_->assemble(indices.data(), len);
  batch.epoch = epoch;
  batch.index = index;
  return batch;
}

void Prefetcher::worker_loop() {
  // Workers do throughput work ahead of time; the consumer (the training step) is the one
  // whose latency matters. SCHED_BATCH stops a waking worker from preempting it when
  // cores are scarce. Best effort: without it the order and results are the same.
  sched_param param{};
  pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    ++idle_workers_;
    space_cv_.wait(lock, [&] { return closed_ || (!exhausted_ && next_ticket_ < consumed_ + depth_); });
    --idle_workers_;
    if (closed_) return;
    const uint64_t ticket = next_ticket_++;
    Slot slot;
    if (!infinite_ && ticket >= total_tickets_) {
      slot.end = true;
      exhausted_ = true;
    } else {
      lock.unlock();
      try {
        slot.batch = build(ticket);
      } catch (...) {
        slot.error = std::current_exception();
      }
      lock.lock();
      if (closed_) return;  // slot's batch goes back to the pool as it is destroyed
      if (slot.error) exhausted_ = true;
    }
    slot.filled = true;
    ring_[ticket % depth_] = std::move(slot);
    ready_cv_.notify_all();
  }
}

Prefetcher::Status Prefetcher::next(Batch* out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (closed_) return Status::kEnd;
  Slot* slot = &ring_[consumed_ % depth_];
  if (!ready_cv_.wait_for(lock, timeout, [&] { return closed_ || slot->filled; })) return Status::kTimeout;
  if (closed_) return Status::kEnd;
  if (slot->end) {
    lock.unlock();
    stop();
    return Status::kEnd;
  }
  if (slot->error) {
    std::exception_ptr error = slot->error;
    lock.unlock();
    stop();
    std::rethrow_exception(error);
  }
  *out = std::move(slot->batch);
  *slot = Slot{};
  ++consumed_;
  // Wake idle workers only once half the ring is free: each wake-up is a syscall (and an
  // inter-processor interrupt in a VM) on the training thread, so batch them.
  const uint64_t free_slots = consumed_ + depth_ - next_ticket_;
  const bool wake = idle_workers_ > 0 && free_slots >= (depth_ + 1) / 2;
  lock.unlock();
  if (wake) space_cv_.notify_all();
  return Status::kBatch;
}

}  // namespace pe::data
