// Emulated CUDA threads for host tests of device code written against kvq::cuda::warp
// (kernels/cuda/warp_quant.cuh): the threads of one block (32 = one warp, up to 1024) are fibers
// (their own stack switch on x86-64, ucontext elsewhere) run in turn on the calling thread. A warp
// operation publishes the thread's value in its warp's buffer and yields; by the time its turn
// comes back every other thread has run once, so every lane of its warp has published, and it
// reads what it needs. Values alternate between two buffers per warp, so a lane's next write never
// meets a slower lane's read. BlockSync waits (yielding) until every thread of the block has arrived. As on the GPU, every lane of a warp must
// reach the same warp operations in the same order, and every thread the same barriers.
// Include this before the device header; run code with RunWarp or RunBlock.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "kvq/numeric.h"

// Fiber switch without system calls on x86-64 (swapcontext saves the signal mask with a system
// call per switch, which dominated the emulated kernels' run time): saves the callee-saved
// registers, MXCSR and the x87 control word on the old stack, switches stacks, restores.
#if defined(__x86_64__) && defined(__linux__)
#define KVQ_EMU_FAST_SWITCH 1
extern "C" void kvq_emu_switch(void** save_sp, void* load_sp);
extern "C" void kvq_emu_fiber_start();
asm(R"(
  .text
  .weak kvq_emu_switch
  .type kvq_emu_switch,@function
kvq_emu_switch:
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
  .size kvq_emu_switch,.-kvq_emu_switch
  .weak kvq_emu_fiber_start
  .type kvq_emu_fiber_start,@function
kvq_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size kvq_emu_fiber_start,.-kvq_emu_fiber_start
)");
#endif

namespace kvq {
namespace cuda {
namespace warp {

// One execution context: a fiber's, or the caller's while fibers run.
struct FiberCtx {
#if defined(KVQ_EMU_FAST_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void FiberSwitch(FiberCtx* from, FiberCtx* to) {
#if defined(KVQ_EMU_FAST_SWITCH)
  kvq_emu_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

#if !defined(KVQ_EMU_FAST_SWITCH)
inline void UcEntry(int f0, int f1, int a0, int a1) {
  auto fn = reinterpret_cast<void (*)(void*)>(uint64_t(uint32_t(f0)) | (uint64_t(uint32_t(f1)) << 32));
  fn(reinterpret_cast<void*>(uint64_t(uint32_t(a0)) | (uint64_t(uint32_t(a1)) << 32)));
}
#endif

// Prepares c to run fn(arg) on [stack, stack + size) at its first switch; fn never returns.
inline void FiberMake(FiberCtx* c, uint8_t* stack, size_t size, void (*fn)(void*), void* arg) {
#if defined(KVQ_EMU_FAST_SWITCH)
  // Frame popped by kvq_emu_switch: [mxcsr, x87 cw][r15][r14][r13 = fn][r12 = arg][rbx][rbp][return
  // = kvq_emu_fiber_start]; the return slot sits at 8 mod 16 so that the call in
  // kvq_emu_fiber_start is made with the ABI's 16-byte alignment.
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);
  ret[0] = reinterpret_cast<uint64_t>(&kvq_emu_fiber_start);
  ret[-1] = 0;                                   // rbp
  ret[-2] = 0;                                   // rbx
  ret[-3] = reinterpret_cast<uint64_t>(arg);     // r12
  ret[-4] = reinterpret_cast<uint64_t>(fn);      // r13
  ret[-5] = 0;                                   // r14
  ret[-6] = 0;                                   // r15
  ret[-7] = uint64_t{0x1F80} | (uint64_t{0x037F} << 32);  // default MXCSR, x87 control word
  c->sp = &ret[-7];
#else
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  // makecontext passes ints: the pointers in two halves each
  const uint64_t f = reinterpret_cast<uint64_t>(fn), a = reinterpret_cast<uint64_t>(arg);
  makecontext(&c->uc, reinterpret_cast<void (*)()>(&UcEntry), 4, int(uint32_t(f)), int(uint32_t(f >> 32)),
              int(uint32_t(a)), int(uint32_t(a >> 32)));
#endif
}

class EmuBlock {
 public:
  static constexpr size_t kStack = 128 * 1024;
  static constexpr int kMaxWords = 16;

  // seed != 0: the threads take their turns in another order than thread order (the same for a
  // seed): the warps in a pseudo-random order, the lanes of every warp descending for odd seeds,
  // so that code reading another thread's shared-memory write without a barrier between them sees
  // the stale value under some order. (Lanes stay in runs: a fully random order of the fibers'
  // stacks made the suite 2.6x slower.)
  EmuBlock(int threads, const std::function<void(int)>& body, uint32_t seed = 0)
      : n_(threads), body_(body), ctx_(size_t(threads)), starts_(size_t(threads)),
        slots_(size_t((threads + 31) / 32) * 2 * kMaxWords * 32, 0u), parity_(size_t(threads), 0),
        order_(size_t(threads)), pos_(size_t(threads)) {
    const int warps = (n_ + 31) / 32;
    std::vector<int> worder(static_cast<size_t>(warps));
    for (int w = 0; w < warps; ++w) worder[size_t(w)] = w;
    uint32_t x = seed;
    for (int i = warps - 1; seed != 0 && i > 0; --i) {  // Fisher-Yates with xorshift32
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      std::swap(worder[size_t(i)], worder[x % uint32_t(i + 1)]);
    }
    int k = 0;
    for (int w : worder) {
      const int lanes = std::min(32, n_ - 32 * w);
      for (int l = 0; l < lanes; ++l) order_[size_t(k++)] = 32 * w + ((seed & 1u) ? lanes - 1 - l : l);
    }
    for (int i = 0; i < n_; ++i) pos_[size_t(order_[size_t(i)])] = i;
  }

  void Run() {
    static thread_local std::unique_ptr<uint8_t[]> stacks;  // reused: no per-block allocation
    static thread_local int stacks_for = 0;
    if (stacks_for < n_) {
      stacks.reset(new uint8_t[size_t(n_) * kStack]);
      stacks_for = n_;
    }
    for (int t = 0; t < n_; ++t) {
      starts_[size_t(t)] = {this, t};
      FiberMake(&ctx_[size_t(t)], stacks.get() + size_t(t) * kStack, kStack, &EmuBlock::Entry, &starts_[size_t(t)]);
    }
    cur_ = order_[0];
    FiberSwitch(&main_, &ctx_[size_t(cur_)]);
  }

  int thread() const { return cur_; }
  // Ends the calling thread here, as if its kernel had returned (a block whose launch is deferred,
  // cuda_emu_runtime.cc's programmatic dependent launch): back to Entry on the thread's own stack.
  // The frames skipped hold no destructors to run (kernel code).
  [[noreturn]] void Abandon() {
    ++abandoned_;
    std::longjmp(jmp_[size_t(cur_)].b, 1);
  }
  int abandoned() const { return abandoned_; }
  int lane() const { return cur_ & 31; }

  // Publishes v for this lane; all[] gets every lane's value of its warp.
  void Exchange(uint32_t v, uint32_t (&all)[32]) { ExchangeN(&v, 1, all); }
  // Publishes n <= kMaxWords words; all[i * 32 + l] gets lane l's word i (warp-wide instructions
  // with several operand registers: mma, ldmatrix addresses).
  void ExchangeN(const uint32_t* v, int n, uint32_t* all) {
    const int t = cur_;
    uint32_t* buf = &slots_[(size_t(t / 32) * 2 + size_t(parity_[t])) * kMaxWords * 32];
    parity_[t] ^= 1;
    for (int i = 0; i < n; ++i) buf[i * 32 + (t & 31)] = v[i];
    // A lane that has exited by now never reaches this instruction (lanes that reached it may
    // exit before this one reads): undefined on the GPU.
    if (exited_[size_t(t / 32)] != 0) {
      std::fprintf(stderr, "emulated warp instruction by thread %d after a lane of its warp exited\n", t);
      std::abort();
    }
    Yield();
    std::memcpy(all, buf, size_t(n) * 32 * sizeof(uint32_t));
  }
  // Exited threads count as arrived (as on sm_70 and later).
  void Barrier() {
    const uint64_t gen = gen_;
    if (++arrived_ + done_ == n_) {
      arrived_ = 0;
      ++gen_;
      return;
    }
    while (gen_ == gen) Yield();
  }
  void Yield() {
    const int me = cur_;
    const int next = NextLive(me);
    cur_ = next;
    if (next != me) FiberSwitch(&ctx_[size_t(me)], &ctx_[size_t(next)]);
  }

 private:
  struct Start {
    EmuBlock* block;
    int thread;
  };
  static void Entry(void* arg) {
    const Start st = *static_cast<Start*>(arg);
    EmuBlock* b = st.block;
    const int t = st.thread;
    if (setjmp(b->jmp_[size_t(t)].b) == 0) b->body_(t);
    b->finished_[size_t(t)] = 1;
    ++b->exited_[size_t(t / 32)];
    FiberCtx dead;  // this fiber is never resumed
    if (++b->done_ == b->n_) {
      FiberSwitch(&dead, &b->main_);  // the last thread to finish
    }
    if (b->arrived_ > 0 && b->arrived_ + b->done_ == b->n_) {  // the others wait at a barrier
      b->arrived_ = 0;
      ++b->gen_;
    }
    const int next = b->NextLive(t);
    b->cur_ = next;
    FiberSwitch(&dead, &b->ctx_[size_t(next)]);
  }
  // The next thread after t in the turn order that has not finished (t itself if none).
  int NextLive(int t) const {
    int i = pos_[size_t(t)];
    for (int k = 0; k < n_; ++k) {
      if (++i == n_) i = 0;
      const int u = order_[size_t(i)];
      if (!finished_[size_t(u)]) return u;
    }
    return t;
  }

  const int n_;
  const std::function<void(int)>& body_;
  FiberCtx main_;
  std::vector<FiberCtx> ctx_;
  std::vector<Start> starts_;
  struct JmpBuf {
    std::jmp_buf b;
  };
  std::vector<JmpBuf> jmp_ = std::vector<JmpBuf>(size_t(n_));  // each thread's Entry, for Abandon
  int abandoned_ = 0;
  std::vector<uint32_t> slots_;  // [warp][2][kMaxWords][32]
  std::vector<int> parity_;
  std::vector<int> order_, pos_;  // turn order of the threads, and each thread's place in it
  std::vector<int> exited_ = std::vector<int>(size_t((n_ + 31) / 32), 0);  // per warp
  std::vector<uint8_t> finished_ = std::vector<uint8_t>(size_t(n_), 0);
  int cur_ = 0;
  int done_ = 0;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

inline EmuBlock*& CurrentBlock() {
  static EmuBlock* b = nullptr;
  return b;
}

inline float ShflXor(float v, int off) {
  uint32_t all[32];
  const int lane = CurrentBlock()->lane();
  CurrentBlock()->Exchange(kvq::FloatAsBits(v), all);
  return kvq::BitsAsFloat(all[lane ^ off]);
}
inline float Shfl(float v, int src) {
  uint32_t all[32];
  CurrentBlock()->Exchange(kvq::FloatAsBits(v), all);
  return kvq::BitsAsFloat(all[src]);
}
inline uint32_t Ballot(bool p) {
  uint32_t all[32], m = 0;
  CurrentBlock()->Exchange(p ? 1u : 0u, all);
  for (int i = 0; i < 32; ++i) m |= all[i] << i;
  return m;
}
inline bool All(bool p) { return Ballot(p) == 0xffffffffu; }
inline uint32_t ReduceOr(uint32_t v) {
  uint32_t all[32], r = 0;
  CurrentBlock()->Exchange(v, all);
  for (int i = 0; i < 32; ++i) r |= all[i];
  return r;
}
// __syncwarp: the lanes of a warp all reach it; one full turn of the block passes them all.
inline void Sync() { CurrentBlock()->Yield(); }
inline void BlockSync() { CurrentBlock()->Barrier(); }
inline void SetFlag(int32_t* flag, int32_t v) { *flag = v; }

// Runs body(thread) for the threads of one block (fibers on the calling thread); returns how many
// threads ended by EmuBlock::Abandon.
inline int RunBlock(int threads, const std::function<void(int)>& body, uint32_t seed = 0) {
  EmuBlock b(threads, body, seed);
  CurrentBlock() = &b;
  b.Run();
  CurrentBlock() = nullptr;
  return b.abandoned();
}
inline void RunWarp(const std::function<void(int)>& body) { RunBlock(32, body); }

}  // namespace warp
}  // namespace cuda
}  // namespace kvq
