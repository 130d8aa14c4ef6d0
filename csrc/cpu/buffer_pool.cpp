// The pool behind zeros_for_accumulation.
//
// A backward returns a new value-sized grad_value on every call. glibc serves blocks of 32 MiB and more
// with a fresh mapping and unmaps it on free, so each call page-faults the whole buffer while filling it,
// several times what zeroing mapped memory costs; asking for 2 MiB pages instead helped only when the kernel
// had some free, and stalled for compaction when not (the numbers: bench/results/cpu-kernel-design/). So
// large buffers are mapped here and, when freed, kept for the next call, as PyTorch's CUDA caching allocator
// does for GPU memory:
// at most kMaxIdleBlocks of them, until empty_cpu_cache(). Smaller blocks are left to malloc, which
// reuses them from its heap.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>

#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rtdetrv2_kernels {
namespace {

#if defined(__linux__)
constexpr size_t kPooledBytes = size_t(32) << 20;

// Allocates zero-filled memory: a fresh anonymous mapping reads as zeros, a reused one is cleared.
class ZeroedBufferPool final : public c10::Allocator {
 public:
  // Two: a backward's new gradient is often allocated while the previous one (the last layer's, or the
  // fp32 accumulator of a half-precision gradient) is still alive.
  static constexpr size_t kMaxIdleBlocks = 2;

  // Never destroyed: tensors holding its blocks may be freed after static destructors have run.
  static ZeroedBufferPool& instance() {
    static auto* pool = new ZeroedBufferPool();
    return *pool;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
    Block block = take_idle(nbytes);
    if (block.data != nullptr) {
      at::parallel_for(0, int64_t(nbytes), int64_t(1) << 20, [&](int64_t begin, int64_t end) {
        std::memset(static_cast<char*>(block.data) + begin, 0, size_t(end - begin));
      });
    } else {
      void* data = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(data != MAP_FAILED, "rtdetrv2_kernels: could not map ", nbytes, " bytes for a gradient");
      block = {data, nbytes, 0};
    }
    block.used = nbytes;
    report(block, int64_t(nbytes));
    return {block.data, new Block(block), &release, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(idle_);
    }
    for (const Block& block : blocks) munmap(block.data, block.nbytes);
  }

 private:
  struct Block {
    void* data;
    size_t nbytes;  // mapped
    size_t used;    // asked for by the tensor holding it
  };

  // Tells the profiler (torch.profiler with profile_memory=True) about every allocation and free, as c10's
  // CPU allocator does, so that the pool's buffers count in memory profiles like any other tensor.
  void report(const Block& block, int64_t delta) {
    int64_t allocated = 0;
    size_t reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocated_ += delta;
      allocated = allocated_;
      for (const Block& idle : idle_) reserved += idle.nbytes;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block.data, delta, size_t(allocated), size_t(allocated) + reserved,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  // The smallest idle block that holds nbytes and is at most twice that size; {nullptr, 0} if none.
  Block take_idle(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->nbytes >= nbytes && it->nbytes / 2 <= nbytes && (best == idle_.end() || it->nbytes < best->nbytes)) {
        best = it;
      }
    }
    if (best == idle_.end()) return {nullptr, 0, 0};
    const Block block = *best;
    idle_.erase(best);
    return block;
  }

  static void release(void* context) {
    const auto* block = static_cast<Block*>(context);
    if (block == nullptr) return;
    instance().keep(*block);  // first, so that the report counts it as reserved
    instance().report(*block, -int64_t(block->used));
    delete block;
  }

  // Keeps a freed block, unmapping the oldest idle one beyond kMaxIdleBlocks.
  void keep(const Block& block) {
    Block evicted{nullptr, 0, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(block);
      if (idle_.size() > kMaxIdleBlocks) {
        evicted = idle_.front();
        idle_.erase(idle_.begin());
      }
    }
    if (evicted.data != nullptr) munmap(evicted.data, evicted.nbytes);
  }

  std::mutex mutex_;
  std::vector<Block> idle_;  // oldest first
  int64_t allocated_ = 0;    // bytes held by live tensors
};
#endif

}  // namespace

at::Tensor zeros_for_accumulation(at::IntArrayRef sizes, at::ScalarType dtype) {
#if defined(__linux__)
  if (size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype) >= kPooledBytes) {
    return at::detail::empty_generic(sizes, &ZeroedBufferPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     dtype, std::nullopt);
  }
#endif
  return at::zeros(sizes, at::TensorOptions().dtype(dtype));
}

void empty_cpu_cache() {
#if defined(__linux__)
  ZeroedBufferPool::instance().empty();
#endif
}

}  // namespace rtdetrv2_kernels
