#include "data/batch_pool.h"

#include <cstdlib>
#include <new>

namespace pe::data {
namespace {
constexpr uint64_t kAlign = 4096;  // page-aligned: friendly to DMA and to SIMD copies
}

BatchPool::Lease& BatchPool::Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    reset();
    pool_ = std::move(o.pool_);
    buffer_ = o.buffer_;
    o.buffer_ = Buffer{};
  }
  return *this;
}

void BatchPool::Lease::reset() {
  if (pool_ && buffer_.data != nullptr) pool_->release(buffer_);
  buffer_ = Buffer{};
  pool_.reset();
}

BatchPool::~BatchPool() {
  for (Buffer& b : free_) std::free(b.data);
}

BatchPool::Lease BatchPool::acquire(uint64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto* list : {&free_external_, &free_}) {
      for (size_t i = 0; i < list->size(); ++i) {
        if ((*list)[i].capacity >= bytes) {
          Buffer b = (*list)[i];
          (*list)[i] = list->back();
          list->pop_back();
          return Lease(shared_from_this(), b);
        }
      }
    }
  }
  const uint64_t capacity = bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, capacity);
  if (p == nullptr) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(mu_);
  allocated_ += capacity;
  return Lease(shared_from_this(), Buffer{static_cast<uint8_t*>(p), capacity, false});
}

void BatchPool::add_external(uint8_t* data, uint64_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  free_external_.push_back(Buffer{data, capacity, true});
}

void BatchPool::release(Buffer b) {
  std::lock_guard<std::mutex> lock(mu_);
  if (b.external) {
    free_external_.push_back(b);
  } else if (free_.size() < keep_free_) {
    free_.push_back(b);
  } else {
    allocated_ -= b.capacity;
    std::free(b.data);
  }
}

uint64_t BatchPool::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return allocated_;
}

}  // namespace pe::data
