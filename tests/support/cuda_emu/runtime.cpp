// The scheduler of the CPU execution layer (see runtime.h): worker threads that run blocks, and
// within a block one fiber per CUDA thread, with warp and block synchronisation.
//
// Under ThreadSanitizer this file is compiled without instrumentation (its bookkeeping moves
// between fibers in ways only the schedule orders) and with BDFAST_EMU_TSAN, which tells TSan
// about the fibers and about the happens-before edges a GPU guarantees: a launch's start and
// end, every barrier and every warp exchange. Everything else between two CUDA threads is
// unordered for TSan, so a missing __syncthreads shows as a race on shared memory. Under
// AddressSanitizer (__SANITIZE_ADDRESS__) the fibers' stack switches are announced to ASan.
#include "runtime.h"

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define BDFAST_EMU_ASAN 1
#endif
#if defined(BDFAST_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace bdfast_emu {

thread_local const ThreadCoordinates* current_coordinates = nullptr;

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // what a block gets without an opt-in
// Kernel parameters are copied onto each fiber's stack (medic's descriptors take 30 KiB), and
// sanitizers grow frames: 512 KiB is mapped, of which a fiber touches only what it uses.
constexpr size_t kStackBytes = 512 * 1024;

thread_local cudaError_t last_error = cudaSuccess;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "bdfast CUDA emulation: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

void tsan_release(const void* token) {
#if defined(BDFAST_EMU_TSAN)
  __tsan_release(const_cast<void*>(token));
#else
  (void)token;
#endif
}

void tsan_acquire(const void* token) {
#if defined(BDFAST_EMU_TSAN)
  __tsan_acquire(const_cast<void*>(token));
#else
  (void)token;
#endif
}

// ---- Execution contexts -----------------------------------------------------------------------
// On x86-64 a context is a stack pointer: a switch pushes the callee-saved registers and the
// floating-point control words on the running stack, saves its pointer and pops the target's.
// No system call and no signal mask, unlike swapcontext, which under ASan also clears the shadow
// of the whole target stack at every switch (a sanitized run crawled). Elsewhere, or with
// BDFAST_EMU_UCONTEXT defined: ucontext.
#if defined(__x86_64__) && !defined(BDFAST_EMU_UCONTEXT)
#define BDFAST_EMU_X86_64_SWITCH 1

struct Context {
  void* sp = nullptr;
};

extern "C" void bdfast_emu_switch(void** save_sp, void* load_sp);
extern "C" void bdfast_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .hidden bdfast_emu_switch
  .type bdfast_emu_switch, @function
bdfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bdfast_emu_switch, .-bdfast_emu_switch

  .p2align 4
  .hidden bdfast_emu_fiber_start
  .type bdfast_emu_fiber_start, @function
bdfast_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size bdfast_emu_fiber_start, .-bdfast_emu_fiber_start
)");

// A context on a fresh stack that, switched to, calls entry(argument) with the floating-point
// control words of the calling thread.
void make_context(Context& c, char* stack_bottom, size_t stack_bytes, void (*entry)(void*),
                  void* argument) {
  const auto top = reinterpret_cast<uintptr_t>(stack_bottom + stack_bytes) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 64);  // 16-byte aligned after the final ret
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  frame[0] = mxcsr | static_cast<uint64_t>(fpu_control) << 32;
  frame[1] = frame[2] = 0;                                         // r15, r14
  frame[3] = reinterpret_cast<uint64_t>(entry);                    // r13
  frame[4] = reinterpret_cast<uint64_t>(argument);                 // r12
  frame[5] = frame[6] = 0;                                         // rbx, rbp
  frame[7] = reinterpret_cast<uint64_t>(&bdfast_emu_fiber_start);  // where the switch returns
  c.sp = frame;
}

void swap_context(Context& save, const Context& load) { bdfast_emu_switch(&save.sp, load.sp); }

#else

struct Context {
  ucontext_t uc;
  void (*entry)(void*) = nullptr;
  void* argument = nullptr;
};

void context_start(unsigned hi, unsigned lo) {
  const auto* c = reinterpret_cast<const Context*>(static_cast<uintptr_t>(hi) << 32 | lo);
  c->entry(c->argument);
}

void make_context(Context& c, char* stack_bottom, size_t stack_bytes, void (*entry)(void*),
                  void* argument) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_bottom;
  c.uc.uc_stack.ss_size = stack_bytes;
  c.uc.uc_link = nullptr;
  c.entry = entry;
  c.argument = argument;
  const auto address = reinterpret_cast<uintptr_t>(&c);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(context_start), 2,
              static_cast<unsigned>(address >> 32), static_cast<unsigned>(address));
}

void swap_context(Context& save, const Context& load) { swapcontext(&save.uc, &load.uc); }

#endif

// A fiber stack with an inaccessible guard page below it (an overflow faults at once).
struct Stack {
  char* base = nullptr;  // the guard page
  char* bottom() const { return base + page(); }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

  Stack() {
    void* p = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    base = static_cast<char*>(p);
    mprotect(base, page(), PROT_NONE);
  }
  ~Stack() { munmap(base, kStackBytes + page()); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
};

// ---- Static shared memory ----------------------------------------------------------------------
// `__shared__` declares a thread_local object of this library, and a worker runs one block at a
// time, so a block's static shared memory is the worker's instance of those objects. The
// runtime finds them in the library's own symbol table (it is linked unstripped) and fills them
// with 0xff bytes before every block. The runtime's own thread_locals are in namespace
// bdfast_emu; every other thread-local object of the library is a __shared__ one (the kernels,
// their host code and the probes declare no other thread_local: tests/ops/test_cuda_emu.py checks).
struct SharedVariable {
  size_t offset, size;  // within the library's TLS segment
};

constexpr unsigned char kSharedPoison = 0xff;

// The path and load address of the object that holds this function: this library.
Dl_info this_library() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<const void*>(&this_library), &info) || !info.dli_fname)
    fail("cannot find the emulation library's own file");
  return info;
}

bool is_runtime_symbol(const char* mangled) {
  for (const char* prefix : {"_ZN10bdfast_emu", "_ZZN10bdfast_emu", "_ZGVZN10bdfast_emu"})
    if (std::strncmp(mangled, prefix, std::strlen(prefix)) == 0) return true;
  return false;
}

// Reads the library's .symtab from its file: the thread-local objects that are not the runtime's.
std::vector<SharedVariable> find_static_shared() {
  const Dl_info library = this_library();
  const std::string path = library.dli_fname;
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat file_stat {};
  if (fd < 0 || fstat(fd, &file_stat) != 0)
    fail("cannot read " + path + " to find its __shared__ variables");
  const size_t bytes = static_cast<size_t>(file_stat.st_size);
  void* mapped = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (mapped == MAP_FAILED) fail("cannot map " + path);
  const auto* image = static_cast<const char*>(mapped);
  const auto* header = reinterpret_cast<const ElfW(Ehdr)*>(image);
  const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(image + header->e_shoff);
  std::vector<SharedVariable> found;
  bool has_symtab = false;
  for (unsigned i = 0; i < header->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    has_symtab = true;
    const char* names = image + sections[sections[i].sh_link].sh_offset;
    const auto* symbols = reinterpret_cast<const ElfW(Sym)*>(image + sections[i].sh_offset);
    for (size_t k = 0; k < sections[i].sh_size / sizeof(ElfW(Sym)); ++k) {
      const ElfW(Sym)& sym = symbols[k];
      const char* name = names + sym.st_name;
      if (ELF64_ST_TYPE(sym.st_info) != STT_TLS || sym.st_shndx == SHN_UNDEF ||
          is_runtime_symbol(name))
        continue;
      // A static or function-local variable is a local symbol; anything else (an inline
      // function's static in a header) could be shared with other libraries.
      if (ELF64_ST_BIND(sym.st_info) != STB_LOCAL)
        fail("the thread_local " + std::string(name) + " in " + path + " has external " +
             "linkage, so it cannot be told from a __shared__ variable and refilled per block");
      found.push_back({sym.st_value, sym.st_size});
    }
  }
  munmap(mapped, bytes);
  if (!has_symtab)
    fail(path + " has no symbol table (stripped?), so its __shared__ variables cannot be found");
  return found;
}

const std::vector<SharedVariable>& static_shared_variables() {
  static const std::vector<SharedVariable> variables = find_static_shared();
  return variables;
}

// The calling thread's instance of the library's TLS segment (allocated by then: the caller has
// used a thread_local of the library).
char* thread_tls_block() {
  struct Query {
    const void* library_base;
    char* block = nullptr;
  } query{this_library().dli_fbase};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* q = static_cast<Query*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type == PT_LOAD && ph.p_offset == 0 &&
              reinterpret_cast<const void*>(info->dlpi_addr + ph.p_vaddr) == q->library_base) {
            q->block = static_cast<char*>(info->dlpi_tls_data);
            return 1;
          }
        }
        return 0;
      },
      &query);
  if (!query.block) fail("cannot find this thread's instance of the emulation's thread_locals");
  return query.block;
}

enum class State : uint8_t { kRunnable, kAtBarrier, kAtWarp, kExited };

struct Block;

// One CUDA thread.
struct Fiber {
  Context context;
  Stack* stack = nullptr;
  ThreadCoordinates coordinates;
  Block* block = nullptr;
  int linear = 0, lane = 0, warp = 0;  // thread index in the block, lane, warp
  State state = State::kRunnable;
  // Block barrier: the call site, the predicate brought and the block-wide AND handed back.
  std::source_location barrier_site;
  int predicate = 0, barrier_result = 0;
  // Warp exchange: mask, value and source lane brought, value handed back.
  unsigned warp_mask = 0;
  uint64_t exchange_value = 0, exchange_result = 0;
  int exchange_source = -1;
#if defined(BDFAST_EMU_TSAN)
  void* tsan_fiber = nullptr;
#endif
};

// Per worker thread: the fibers and stacks it reuses from block to block.
struct WorkerFibers {
  // The shared memory a worker's blocks use in turn passes from one block to the next, as an SM
  // hands it on: for TSan, every thread of a block happens before every thread of the worker's
  // next block. (So TSan checks global memory only between blocks that ran on different
  // workers.)
  char handoff = 0;
  char* tls_block = nullptr;  // this worker's static shared memory lies in it
  std::vector<std::unique_ptr<Stack>> stacks;
  std::vector<Fiber> fibers;
#if defined(BDFAST_EMU_TSAN)
  std::vector<void*> tsan_fibers;
#endif

  ~WorkerFibers() {
#if defined(BDFAST_EMU_TSAN)
    for (void* f : tsan_fibers) __tsan_destroy_fiber(f);
#endif
  }
};

struct WarpState {
  int waiting = 0;  // lanes inside warp_exchange
  unsigned generation = 0;
  char tsan_tokens[2] = {};  // happens-before of alternate generations
};

// The block a worker is running.
struct Block {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber*> fibers;
  std::vector<Fiber*> runnable;
  std::vector<WarpState> warps;
  int live = 0, at_barrier = 0;
  const Fiber* first_at_barrier = nullptr;  // of the barrier being gathered
  unsigned barrier_generation = 0;
  char barrier_tokens[2] = {};
  std::vector<unsigned char> dynamic_shared;
  std::mt19937_64 rng;
  // Half the blocks run the runnable fiber of highest priority (a random order of the threads),
  // so that some warps race ahead of others as far as the barriers let them: that is how a
  // missing __syncthreads shows in the results. The other half pick uniformly at random.
  bool by_priority = false;
  std::vector<uint32_t> priority;  // per thread
  Context worker_context;
  const void* launch_token = nullptr;  // TSan: the launch's start and end
  const void* worker_token = nullptr;  // TSan: the worker hands its shared memory on
#if defined(BDFAST_EMU_TSAN)
  void* worker_tsan_fiber = nullptr;
#endif
#if defined(BDFAST_EMU_ASAN)
  const void* worker_stack_bottom = nullptr;
  size_t worker_stack_size = 0;
#endif
};

thread_local Block* current_block = nullptr;
thread_local Fiber* current_fiber = nullptr;

// Switches from the running context to `to` (a fiber, or the worker when to is null).
// `exiting`: the running fiber never resumes.
void switch_to(Context& from, Fiber* to, bool exiting) {
  Block& block = *current_block;
#if defined(BDFAST_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack,
                                 to ? to->stack->bottom() : block.worker_stack_bottom,
                                 to ? kStackBytes : block.worker_stack_size);
#else
  (void)exiting;
#endif
#if defined(BDFAST_EMU_TSAN)
  __tsan_switch_to_fiber(to ? to->tsan_fiber : block.worker_tsan_fiber,
                         __tsan_switch_to_fiber_no_sync);
#endif
  Fiber* self = current_fiber;
  current_fiber = to;
  current_coordinates = to ? &to->coordinates : nullptr;
  swap_context(from, to ? to->context : block.worker_context);
  // Resumed.
  current_fiber = self;
  current_coordinates = self ? &self->coordinates : nullptr;
#if defined(BDFAST_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

std::string describe_site(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + ":" +
         std::to_string(site.column());
}

std::string describe_states(const Block& block) {
  std::string out;
  for (const Fiber* f : block.fibers) {
    const std::string what = f->state == State::kAtBarrier
                                 ? "__syncthreads at " + describe_site(f->barrier_site)
                             : f->state == State::kAtWarp ? "a warp shuffle"
                             : f->state == State::kExited ? ""
                                                          : "runnable";
    if (!what.empty())
      out += " thread " + std::to_string(f->coordinates.thread_idx.x) + ": " + what + ";";
    if (out.size() > 400) return out + " ...";
  }
  return out;
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Removes and returns the runnable fiber to run next (see Block::by_priority).
Fiber* take_runnable(Block& block) {
  size_t pick = 0;
  if (block.by_priority) {
    const auto rank = [&](size_t i) { return block.priority[block.runnable[i]->linear]; };
    for (size_t i = 1; i < block.runnable.size(); ++i)
      if (rank(i) > rank(pick)) pick = i;
  } else {
    pick = block.rng() % block.runnable.size();
  }
  Fiber* next = block.runnable[pick];
  block.runnable[pick] = block.runnable.back();
  block.runnable.pop_back();
  return next;
}

// Gives the worker to another runnable fiber of the block; returns when this fiber is runnable
// again and scheduled. `exiting`: it never is.
void yield(Fiber* self, bool exiting) {
  Block& block = *current_block;
  if (block.runnable.empty()) {
    if (block.live == 0) {
      switch_to(self->context, nullptr, exiting);
      return;
    }
    fail("deadlock in block " + std::to_string(self->coordinates.block_idx.x) +
         ": no thread can go on;" + describe_states(block));
  }
  Fiber* next = take_runnable(block);
  if (next != self) switch_to(self->context, next, exiting);
}

void make_runnable(Block& block, Fiber* f) {
  f->state = State::kRunnable;
  block.runnable.push_back(f);
}

// Releases the barrier once every live thread waits at it.
void complete_barrier_if_ready(Block& block) {
  if (block.at_barrier == 0 || block.at_barrier != block.live) return;
  int all = 1;
  for (Fiber* f : block.fibers)
    if (f->state == State::kAtBarrier) all = all && f->predicate;
  for (Fiber* f : block.fibers) {
    if (f->state != State::kAtBarrier) continue;
    f->barrier_result = all;
    make_runnable(block, f);
  }
  block.at_barrier = 0;
  block.first_at_barrier = nullptr;
  ++block.barrier_generation;
}

unsigned lanes_of(const Block& block, int warp) {
  const int first = warp * kWarpSize;
  const int count = std::min<int>(kWarpSize, static_cast<int>(block.fibers.size()) - first);
  return count == kWarpSize ? ~0u : (1u << count) - 1;
}

// Completes the warp's exchange once every lane of the mask waits in it.
void complete_exchange_if_ready(Block& block, int warp) {
  WarpState& w = block.warps[warp];
  if (w.waiting == 0) return;
  Fiber** lanes = block.fibers.data() + warp * kWarpSize;
  unsigned mask = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(lanes_of(block, warp) >> l & 1u)) break;
    if (lanes[l]->state != State::kAtWarp) continue;
    if (mask == 0) mask = lanes[l]->warp_mask;
    if (lanes[l]->warp_mask != mask)
      fail("lanes of warp " + std::to_string(warp) + " shuffle with different masks");
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (!(lanes_of(block, warp) >> l & 1u))
      fail("a shuffle mask names lane " + std::to_string(l) + ", which the block does not have");
    if (lanes[l]->state == State::kExited)
      fail("a shuffle of warp " + std::to_string(warp) + " waits for lane " + std::to_string(l) +
           ", which has returned");
    if (lanes[l]->state != State::kAtWarp) return;  // not there yet
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber* f = lanes[l];
    const int source = f->exchange_source < 0 ? l : f->exchange_source;
    if (!(mask >> source & 1u))
      fail("lane " + std::to_string(l) + " reads lane " + std::to_string(source) +
           ", which is not in the shuffle's mask");
    f->exchange_result = lanes[source]->exchange_value;
    make_runnable(block, f);
    --w.waiting;
  }
  ++w.generation;
}

void fiber_entry(void* fiber) {
  Fiber* self = static_cast<Fiber*>(fiber);
  Block& block = *self->block;
#if defined(BDFAST_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  tsan_acquire(block.launch_token);
  tsan_acquire(block.worker_token);
  (*block.body)();
  tsan_release(static_cast<const char*>(block.launch_token) + 1);
  tsan_release(block.worker_token);
  self->state = State::kExited;
  --block.live;
  complete_exchange_if_ready(block, self->warp);
  complete_barrier_if_ready(block);
  yield(self, true);
  fail("an exited fiber was resumed");
}

WorkerFibers& worker_fibers() {
  static thread_local WorkerFibers fibers;
  return fibers;
}

void run_block(const std::function<void()>& body, dim3 grid, dim3 dim, size_t smem,
               uint3 block_idx, uint64_t seed, const void* launch_token) {
  const int threads = static_cast<int>(dim.x * dim.y * dim.z);
  WorkerFibers& pool = worker_fibers();
  while (static_cast<int>(pool.stacks.size()) < threads)
    pool.stacks.push_back(std::make_unique<Stack>());
  if (static_cast<int>(pool.fibers.size()) < threads) pool.fibers.resize(threads);
#if defined(BDFAST_EMU_TSAN)
  while (static_cast<int>(pool.tsan_fibers.size()) < threads)
    pool.tsan_fibers.push_back(__tsan_create_fiber(0));
#endif

  Block block;
  block.body = &body;
  block.rng.seed(seed);
  block.by_priority = block.rng() & 1;
  if (block.by_priority) {
    block.priority.resize(threads);
    for (int i = 0; i < threads; ++i) block.priority[i] = static_cast<uint32_t>(i);
    std::shuffle(block.priority.begin(), block.priority.end(), block.rng);
  }
  block.live = threads;
  block.launch_token = launch_token;
  block.worker_token = &pool.handoff;
  block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  block.dynamic_shared.assign(smem, kSharedPoison);
  if (!pool.tls_block) pool.tls_block = thread_tls_block();
  for (const SharedVariable& v : static_shared_variables())
    std::memset(pool.tls_block + v.offset, kSharedPoison, v.size);
#if defined(BDFAST_EMU_TSAN)
  block.worker_tsan_fiber = __tsan_get_current_fiber();
#endif
#if defined(BDFAST_EMU_ASAN)
  pthread_attr_t attributes;
  void* worker_stack = nullptr;
  pthread_getattr_np(pthread_self(), &attributes);
  pthread_attr_getstack(&attributes, &worker_stack, &block.worker_stack_size);
  pthread_attr_destroy(&attributes);
  block.worker_stack_bottom = worker_stack;
#endif
  block.fibers.resize(threads);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = pool.fibers[i];
    f = Fiber{};
    f.stack = pool.stacks[i].get();
    f.block = &block;
    f.coordinates = {{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)}, block_idx, dim, grid};
    f.linear = i;
    f.lane = i % kWarpSize;
    f.warp = i / kWarpSize;
#if defined(BDFAST_EMU_TSAN)
    f.tsan_fiber = pool.tsan_fibers[i];
#endif
#if defined(BDFAST_EMU_ASAN)
    // A finished fiber's frames left their redzones poisoned on the reused stack.
    __asan_unpoison_memory_region(f.stack->bottom(), kStackBytes);
#endif
    make_context(f.context, f.stack->bottom(), kStackBytes, fiber_entry, &f);
    block.fibers[i] = &f;
    block.runnable.push_back(&f);
  }

  current_block = &block;
  tsan_release(block.worker_token);
  Fiber* first = take_runnable(block);
  switch_to(block.worker_context, first, false);
  tsan_acquire(block.worker_token);
  current_block = nullptr;
}

// One launch being run by the pool.
struct Grid {
  const std::function<void()>* body;
  dim3 grid, block;
  size_t smem;
  std::vector<uint32_t> order;  // the blocks, shuffled
  uint64_t seed;
  std::atomic<size_t> next{0};
  size_t workers_done = 0;
  char tsan_tokens[2] = {};
};

class Pool {
 public:
  void configure(int workers, uint64_t seed) {
    std::unique_lock<std::mutex> lock(mutex_);
    workers_wanted_ = std::max(1, workers);
    seed_ = seed;
  }

  void run(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex_);
    Grid g;
    g.body = &body;
    g.grid = grid;
    g.block = block;
    g.smem = smem;
    int workers;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      g.seed = seed_ ? seed_ + launches_ : std::random_device{}() ^ (launches_ << 32);
      ++launches_;
      workers = workers_wanted_;
      while (static_cast<int>(threads_.size()) < workers)
        threads_.emplace_back([this, index = threads_.size()] { work(index); });
    }
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    g.order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) g.order[i] = static_cast<uint32_t>(i);
    std::mt19937_64 rng(g.seed);
    std::shuffle(g.order.begin(), g.order.end(), rng);
    tsan_release(g.tsan_tokens);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      grid_ = &g;
      active_workers_ = workers;
      ++generation_;
      wake_.notify_all();
      done_.wait(lock, [&] { return g.workers_done == static_cast<size_t>(workers); });
      grid_ = nullptr;
    }
    tsan_acquire(g.tsan_tokens + 1);
  }

 private:
  void work(size_t index) {
    uint64_t seen = 0;
    for (;;) {
      Grid* g;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen && index < active_workers_; });
        seen = generation_;
        g = grid_;
      }
      for (size_t i; (i = g->next.fetch_add(1)) < g->order.size();) {
        const uint32_t b = g->order[i];
        const uint3 idx{b % g->grid.x, b / g->grid.x % g->grid.y, b / (g->grid.x * g->grid.y)};
        run_block(*g->body, g->grid, g->block, g->smem, idx, g->seed * 1000003u + b,
                  g->tsan_tokens);
      }
      std::unique_lock<std::mutex> lock(mutex_);
      if (++g->workers_done == active_workers_) done_.notify_all();
    }
  }

  std::mutex launch_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  Grid* grid_ = nullptr;
  size_t active_workers_ = 0;
  uint64_t generation_ = 0, launches_ = 0, seed_ = 0;
  int workers_wanted_ = 2;
};

Pool& pool() {
  // Never destroyed: its workers wait for work until the process ends.
  static Pool* p = new Pool;
  return *p;
}

}  // namespace

cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                     const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  cudaError_t error = cudaSuccess;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u || threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64)
    error = cudaErrorInvalidConfiguration;
  else if (dynamic_shared_bytes > kMaxDynamicShared)
    error = cudaErrorInvalidValue;
  if (error != cudaSuccess) {
    if (last_error == cudaSuccess) last_error = error;
    return error;
  }
  if (current_block) fail("a kernel launched a kernel");
  pool().run(grid, block, dynamic_shared_bytes, body);
  return cudaSuccess;
}

void configure(int workers, uint64_t seed) { pool().configure(workers, seed); }

void* dynamic_shared_memory() {
  if (!current_block) fail("dynamic shared memory used outside a kernel");
  return current_block->dynamic_shared.data();
}

int lane_id() { return current_fiber->lane; }

int block_barrier(int pred, const std::source_location& where) {
  Fiber* self = current_fiber;
  if (!self) fail("__syncthreads outside a kernel");
  Block& block = *current_block;
  // A GPU counts arrivals at the block's barrier whichever __syncthreads they come from, so
  // threads split across two of them pass each other's and go on out of step (undefined
  // behaviour that compute-sanitizer's synccheck reports as divergent threads).
  if (const Fiber* first = block.first_at_barrier; first && !same_site(first->barrier_site, where))
    fail("divergent __syncthreads in block " + std::to_string(self->coordinates.block_idx.x) +
         ": thread " + std::to_string(first->coordinates.thread_idx.x) + " waits at " +
         describe_site(first->barrier_site) + ", thread " +
         std::to_string(self->coordinates.thread_idx.x) + " at " + describe_site(where));
  const unsigned generation = block.barrier_generation;
  tsan_release(block.barrier_tokens + (generation & 1));
  self->state = State::kAtBarrier;
  self->barrier_site = where;
  if (!block.first_at_barrier) block.first_at_barrier = self;
  self->predicate = pred != 0;
  ++block.at_barrier;
  complete_barrier_if_ready(block);
  yield(self, false);  // also when this thread completed the barrier: any waiter may go first
  tsan_acquire(block.barrier_tokens + (generation & 1));
  return self->barrier_result;
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int source) {
  Fiber* self = current_fiber;
  if (!self) fail("warp shuffle outside a kernel");
  Block& block = *current_block;
  if (!(mask >> self->lane & 1u))
    fail("lane " + std::to_string(self->lane) + " shuffles with a mask that excludes it");
  WarpState& w = block.warps[self->warp];
  const unsigned generation = w.generation;
  tsan_release(w.tsan_tokens + (generation & 1));
  self->state = State::kAtWarp;
  self->warp_mask = mask;
  self->exchange_value = value;
  self->exchange_source = source;
  ++w.waiting;
  complete_exchange_if_ready(block, self->warp);
  yield(self, false);
  tsan_acquire(w.tsan_tokens + (generation & 1));
  return self->exchange_result;
}

}  // namespace bdfast_emu

cudaError_t cudaGetLastError() {
  const cudaError_t error = bdfast_emu::last_error;
  bdfast_emu::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
