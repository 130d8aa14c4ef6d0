// The emulated CUDA runtime: runs a launch's threads as fibers of the calling OS thread, one warp at a time,
// each lane on its own stack, switching (by a hand-written x86-64 register switch) only when a lane reaches
// a warp-synchronous operation, exits or faults. When no lane of a warp can run, the lowest waiting lane's
// operation completes if every lane of its mask waits at the same call site with the same mask; otherwise
// the launch raises a convergence error (what compute-sanitizer's synccheck reports), never a deadlock.
//
// Sanitizers: under AddressSanitizer every switch is announced (__sanitizer_start/finish_switch_fiber) and a
// stack is unpoisoned before it is reused. Under ThreadSanitizer each emulated thread of a launch is a TSan
// fiber of its own, entered the first time with synchronization (the host's writes happen before the
// kernel's reads) and later without (lanes stay unordered with each other, as on a GPU), releasing a token
// on exit that the host acquires after the launch (the kernel's writes happen before the host's reads).
#include <sys/mman.h>
#include <torch/library.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "cuda_emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMULATION_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMULATION_TSAN 1
#endif
#if defined(EMULATION_TSAN)
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif
#if !defined(__x86_64__)
#error "the CUDA emulation's context switch is written for x86-64"
#endif

// switch_stack(save, next): pushes the callee-saved registers, stores the stack pointer in *save, loads
// `next` and pops the registers saved there. Caller-saved registers are the caller's concern (it is a call).
extern "C" void rtdetrv2_emulation_switch_stack(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .hidden rtdetrv2_emulation_switch_stack
  .globl rtdetrv2_emulation_switch_stack
  .type rtdetrv2_emulation_switch_stack, @function
rtdetrv2_emulation_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rtdetrv2_emulation_switch_stack, .-rtdetrv2_emulation_switch_stack
)");

namespace rtdetrv2_cuda_emulation {

thread_local const ThreadState* current_thread = nullptr;

namespace {

#if defined(EMULATION_ASAN)
constexpr size_t kStackBytes = 1 << 20;  // ASan's redzones make frames several times larger
#else
constexpr size_t kStackBytes = 256 << 10;
#endif
constexpr size_t kGuardBytes = 4096;

// One mmap'd stack with a guard page below it, so that an overflow faults instead of corrupting a neighbour.
struct Stack {
  char* mapping = nullptr;
  Stack() {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "emulated CUDA: cannot map a fiber stack");
    mapping = static_cast<char*>(p);
    mprotect(mapping, kGuardBytes, PROT_NONE);
  }
  ~Stack() { munmap(mapping, kStackBytes + kGuardBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return mapping + kGuardBytes; }
  char* top() const { return bottom() + kStackBytes; }
};

// The emulation's own bookkeeping (a lane posting its shuffle operand, the host reading it) is hidden from
// ThreadSanitizer, which checks only the kernels' accesses; ordering those through it would hide races.
struct Bookkeeping {
#if defined(EMULATION_TSAN)
  Bookkeeping() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Bookkeeping() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

enum class LaneState { kRunnable, kWaiting, kExited, kFaulted };

struct Lane {
  ThreadState index;
  LaneState state = LaneState::kExited;
  void* stack_pointer = nullptr;  // where the lane resumes
  Stack* stack = nullptr;
  bool entered = false;
  // The warp-synchronous operation it waits at, and its result.
  unsigned mask = 0;
  int lane_mask = 0, width = 0;  // __shfl_xor_sync's
  uint64_t value = 0, result = 0;
  const char* what = nullptr;
  std::source_location site;
  std::string fault_message;
#if defined(EMULATION_ASAN)
  void* fake_stack = nullptr;
#endif
#if defined(EMULATION_TSAN)
  void* fiber = nullptr;
#endif
};

// Per OS thread: the stacks, and what the lanes need to switch back to the host.
struct Scheduler {
  std::vector<std::unique_ptr<Stack>> stacks;  // one per lane of a warp (under TSan, per thread of a launch)
  Lane lanes[32];
  Lane* running = nullptr;
  void* host_stack_pointer = nullptr;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
#if defined(EMULATION_ASAN)
  void* host_fake_stack = nullptr;
  const void* host_stack_bottom = nullptr;
  size_t host_stack_size = 0;
#endif
#if defined(EMULATION_TSAN)
  void* host_fiber = nullptr;
  std::vector<void*> fibers;  // one per thread of the largest launch so far
  char exit_token = 0;
#endif
};

thread_local Scheduler scheduler;

// Lane -> host. `exiting`: the lane never resumes (ASan then frees its fake stack).
void yield_to_host(Lane& lane, bool exiting) {
#if defined(EMULATION_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &lane.fake_stack, scheduler.host_stack_bottom,
                                 scheduler.host_stack_size);
#endif
#if defined(EMULATION_TSAN)
  if (exiting) __tsan_release(&scheduler.exit_token);
  __tsan_switch_to_fiber(scheduler.host_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  rtdetrv2_emulation_switch_stack(&lane.stack_pointer, scheduler.host_stack_pointer);
#if defined(EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(lane.fake_stack, &scheduler.host_stack_bottom, &scheduler.host_stack_size);
#endif
}

// Every lane starts here (by the `ret` of the first switch onto its stack).
[[noreturn]] void lane_entry() {
  Lane& lane = *scheduler.running;
#if defined(EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.host_stack_bottom, &scheduler.host_stack_size);
#endif
  try {
    scheduler.body(scheduler.context);
    const Bookkeeping bookkeeping;
    lane.state = LaneState::kExited;
  } catch (const std::exception& error) {
    const Bookkeeping bookkeeping;
    lane.fault_message = error.what();
    lane.state = LaneState::kFaulted;
  }
  const Bookkeeping bookkeeping;
  yield_to_host(lane, true);
  __builtin_trap();  // an exited lane is never resumed
}

// Host -> lane, until it waits, exits or faults.
void resume(Lane& lane) {
  scheduler.running = &lane;
  current_thread = &lane.index;
#if defined(EMULATION_ASAN)
  __sanitizer_start_switch_fiber(&scheduler.host_fake_stack, lane.stack->bottom(), kStackBytes);
#endif
  const bool first_entry = !lane.entered;
  lane.entered = true;
#if defined(EMULATION_TSAN)
  // From here to the switch, TSan takes this for the lane's code: nothing else may come in between.
  __tsan_switch_to_fiber(lane.fiber, first_entry ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
  rtdetrv2_emulation_switch_stack(&scheduler.host_stack_pointer, lane.stack_pointer);
#if defined(EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(scheduler.host_fake_stack, nullptr, nullptr);
#endif
  scheduler.running = nullptr;
  current_thread = nullptr;
}

// A fresh lane on `stack`: the first switch pops six zeroed registers and returns into lane_entry with the
// stack pointer at 8 mod 16, as after a call (the ABI, and the unwinder, expect that alignment).
void start_lane(Lane& lane, Stack& stack) {
#if defined(EMULATION_ASAN)
  __asan_unpoison_memory_region(stack.bottom(), kStackBytes);  // an abandoned lane may have left redzones
#endif
  auto* top = reinterpret_cast<uintptr_t*>(stack.top());  // 16-byte aligned
  top[-1] = 0;                                             // lane_entry's return address: none
  top[-2] = reinterpret_cast<uintptr_t>(&lane_entry);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  lane.stack_pointer = top - 8;
  lane.stack = &stack;
  lane.state = LaneState::kRunnable;
  lane.entered = false;
  lane.fault_message.clear();
}

// "lane 5" or "lanes 5, 6".
std::string lane_list(uint32_t lanes) {
  std::ostringstream out;
  out << (__builtin_popcount(lanes) == 1 ? "lane " : "lanes ");
  const char* separator = "";
  for (int i = 0; i < 32; ++i) {
    if (lanes & (1u << i)) {
      out << separator << i;
      separator = ", ";
    }
  }
  return out.str();
}

std::string where(const KernelRecord& kernel, const ThreadState& index, int warp) {
  std::ostringstream out;
  out << "in kernel " << kernel.name << ", block (" << index.block_idx.x << ", " << index.block_idx.y << ", "
      << index.block_idx.z << "), warp " << warp;
  return out.str();
}

std::string site_text(const Lane& lane) {
  return std::string(lane.what) + " at " + lane.site.file_name() + ":" + std::to_string(lane.site.line());
}

[[noreturn]] void convergence_error(const KernelRecord& kernel, const Lane& caller, int warp, const std::string& what) {
  TORCH_CHECK(false, "emulated CUDA: convergence error ", where(kernel, caller.index, warp), ": ", site_text(caller),
              " with mask 0x", std::hex, caller.mask, std::dec, " (lane ", caller.index.thread_idx.x % 32, "): ", what,
              " (compute-sanitizer --tool synccheck would report this on a GPU)");
}

// The lane that lane i of `lane` reads from.
int source_lane(const Lane& lane, int i) {
  const int segment = i / lane.width * lane.width;
  const int source = i ^ lane.lane_mask;
  return source >= segment + lane.width ? i : source;  // xor beyond the segment reads the caller's own value
}

// All lanes that can run have waited: complete the lowest waiting lane's operation, or raise.
void complete_exchange(const KernelRecord& kernel, Lane* lanes, int count, int warp) {
  int first = 0;
  while (lanes[first].state != LaneState::kWaiting) ++first;
  const Lane& caller = lanes[first];
  const unsigned mask = caller.mask;
  if (!(mask & (1u << first))) convergence_error(kernel, caller, warp, "the calling lane is not in its own mask");
  uint32_t exited = 0, elsewhere = 0;
  for (int i = 0; i < 32; ++i) {
    if (!(mask & (1u << i))) continue;
    if (i >= count || lanes[i].state != LaneState::kWaiting) {
      exited |= 1u << i;
    } else if (lanes[i].mask != mask || lanes[i].site.line() != caller.site.line() ||
               std::strcmp(lanes[i].site.file_name(), caller.site.file_name()) != 0 || lanes[i].what != caller.what) {
      elsewhere |= 1u << i;
    }
  }
  if (exited) convergence_error(kernel, caller, warp, lane_list(exited) + " of the mask exited before it");
  if (elsewhere) {
    const Lane& other = lanes[__builtin_ctz(elsewhere)];
    std::ostringstream detail;
    detail << lane_list(elsewhere) << " of the mask wait elsewhere (lane " << __builtin_ctz(elsewhere)
           << ": " << site_text(other) << " with mask 0x" << std::hex << other.mask << ")";
    convergence_error(kernel, caller, warp, detail.str());
  }
  for (int i = 0; i < 32; ++i) {
    if (!(mask & (1u << i))) continue;
    const int source = source_lane(lanes[i], i);
    if (!(mask & (1u << source))) {
      convergence_error(kernel, lanes[i], warp,
                        "lane " + std::to_string(i) + " reads lane " + std::to_string(source) + ", outside the mask");
    }
  }
  for (int i = 0; i < 32; ++i) {
    if (!(mask & (1u << i))) continue;
    lanes[i].result = lanes[source_lane(lanes[i], i)].value;  // values are posted, never overwritten here
    lanes[i].state = LaneState::kRunnable;
  }
}

// Runs the `count` started lanes of a warp to the end: every runnable lane until it waits, exits or
// faults, then one warp-synchronous operation completes, until no lane waits.
void run_warp(const KernelRecord& kernel, Lane* lanes, int count, int warp) {
  while (true) {
    bool waiting = false;
    for (int i = 0; i < count; ++i) {
      if (lanes[i].state == LaneState::kRunnable) resume(lanes[i]);
    }
    for (int i = 0; i < count; ++i) {
      const Lane& lane = lanes[i];
      if (lane.state == LaneState::kFaulted) {
        TORCH_CHECK(false, "emulated CUDA: device fault ", where(kernel, lane.index, warp), ", lane ", i, ": ",
                    lane.fault_message);
      }
      waiting |= lane.state == LaneState::kWaiting;
    }
    if (!waiting) return;
    complete_exchange(kernel, lanes, count, warp);
  }
}

std::mutex registry_mutex;
std::vector<KernelRecord*>& registry() {
  static std::vector<KernelRecord*> records;
  return records;
}

// "... [with auto Kernel = NAME]" -> NAME, less this project's namespaces.
std::string kernel_name(const std::string& pretty) {
  const std::string marker = "Kernel = ";
  auto begin = pretty.find(marker);
  std::string name = begin == std::string::npos ? pretty : pretty.substr(begin + marker.size());
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if (depth == 0 && (c == ';' || c == ']')) {
      name.resize(i);
      break;
    }
  }
  for (const std::string prefix : {"rtdetrv2_kernels::", "{anonymous}::", "(anonymous namespace)::"}) {
    for (auto at = name.find(prefix); at != std::string::npos; at = name.find(prefix)) name.erase(at, prefix.size());
  }
  return name;
}

}  // namespace

KernelRecord* register_kernel(std::string pretty_function) {
  auto* record = new KernelRecord{kernel_name(pretty_function)};  // lives as long as the library
  const std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back(record);
  return record;
}

std::string launch_counts() {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  std::map<std::string, int64_t> counts;
  for (const KernelRecord* record : registry()) counts[record->name] += record->launches;
  std::string out;
  for (const auto& [name, count] : counts) out += std::to_string(count) + "\t" + name + "\n";
  return out;
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int lane_mask, int width, const char* what,
                       const std::source_location& site) {
  const Bookkeeping bookkeeping;
  Lane* lane = scheduler.running;
  if (lane == nullptr) fault(std::string(what) + " called outside a kernel", site);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fault(std::string(what) + ": width " + std::to_string(width) + " is not a power of two up to 32", site);
  }
  lane->mask = mask;
  lane->lane_mask = lane_mask;
  lane->width = width;
  lane->value = value;
  lane->what = what;
  lane->site = site;
  lane->state = LaneState::kWaiting;
  yield_to_host(*lane, false);
  return lane->result;
}

void fault(const std::string& message, const std::source_location& site) {
  const Bookkeeping bookkeeping;
  Lane* lane = scheduler.running;
  const std::string text = message + " at " + site.file_name() + ":" + std::to_string(site.line());
  TORCH_CHECK(lane != nullptr, "emulated CUDA: ", text);
  lane->fault_message = text;
  lane->state = LaneState::kFaulted;
  yield_to_host(*lane, true);
  __builtin_trap();
}

void run_grid(KernelRecord& kernel, dim3 grid, dim3 block, void (*body)(void*), void* context) {
  const Bookkeeping bookkeeping;  // the host's side: everything here is the emulation's
  Scheduler& s = scheduler;
  TORCH_CHECK(s.running == nullptr, "emulated CUDA: a kernel launched from inside a kernel");
  {
    const std::lock_guard<std::mutex> lock(registry_mutex);
    ++kernel.launches;
  }
  const int64_t block_threads = int64_t(block.x) * block.y * block.z;
  const int64_t warps = (block_threads + 31) / 32;
#if defined(EMULATION_TSAN)
  // A fiber and a stack of its own for every thread of the launch: TSan tells threads apart by fiber, and
  // one lane's stack frames reused by another unordered lane would look like a race.
  const int64_t total_threads = block_threads * grid.x * grid.y * grid.z;
  if (s.host_fiber == nullptr) s.host_fiber = __tsan_get_current_fiber();
  while (static_cast<int64_t>(s.fibers.size()) < total_threads) s.fibers.push_back(__tsan_create_fiber(0));
  while (static_cast<int64_t>(s.stacks.size()) < total_threads) s.stacks.push_back(std::make_unique<Stack>());
  int64_t next_thread = 0;
#else
  while (s.stacks.size() < 32) s.stacks.push_back(std::make_unique<Stack>());
#endif
  s.body = body;
  s.context = context;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t block_index = 0; block_index < blocks; ++block_index) {
    const uint3 block_idx{static_cast<unsigned>(block_index % grid.x),
                          static_cast<unsigned>(block_index / grid.x % grid.y),
                          static_cast<unsigned>(block_index / (int64_t(grid.x) * grid.y))};
    for (int64_t warp = 0; warp < warps; ++warp) {
      const int count = static_cast<int>(std::min<int64_t>(32, block_threads - warp * 32));
      for (int i = 0; i < count; ++i) {
        Lane& lane = s.lanes[i];
        const int64_t t = warp * 32 + i;
        lane.index = {{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                       static_cast<unsigned>(t / (int64_t(block.x) * block.y))},
                      block_idx, block, grid};
#if defined(EMULATION_TSAN)
        lane.fiber = s.fibers[next_thread];
        start_lane(lane, *s.stacks[next_thread++]);
#else
        start_lane(lane, *s.stacks[i]);
#endif
      }
      for (int i = count; i < 32; ++i) s.lanes[i].state = LaneState::kExited;
      run_warp(kernel, s.lanes, count, warp);
    }
  }
#if defined(EMULATION_TSAN)
  __tsan_acquire(&s.exit_token);
#endif
}

}  // namespace rtdetrv2_cuda_emulation
