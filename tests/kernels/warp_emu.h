// Emulated CUDA threads for host tests of device code written against kvq::cuda::warp
// (kernels/cuda/warp_quant.cuh): the threads of one block (32 = one warp, up to 1024) are fibers
// (ucontext) run in turn on the calling thread. A warp operation publishes the thread's value in
// its warp's buffer and yields; by the time its turn comes back every other thread has run once,
// so every lane of its warp has published, and it reads what it needs. Values alternate between
// two buffers per warp, so a lane's next write never meets a slower lane's read. BlockSync waits
// (yielding) until every thread of the block has arrived. As on the GPU, every lane of a warp must
// reach the same warp operations in the same order, and every thread the same barriers.
// Include this before the device header; run code with RunWarp or RunBlock.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "kvq/numeric.h"

namespace kvq {
namespace cuda {
namespace warp {

class EmuBlock {
 public:
  static constexpr size_t kStack = 64 * 1024;

  EmuBlock(int threads, const std::function<void(int)>& body)
      : n_(threads), body_(body), ctx_(threads), slots_(size_t((threads + 31) / 32) * 64, 0u),
        parity_(threads, 0) {}

  void Run() {
    static thread_local std::unique_ptr<uint8_t[]> stacks;  // reused: no per-block allocation
    static thread_local int stacks_for = 0;
    if (stacks_for < n_) {
      stacks.reset(new uint8_t[size_t(n_) * kStack]);
      stacks_for = n_;
    }
    const uintptr_t self = reinterpret_cast<uintptr_t>(this);
    for (int t = 0; t < n_; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = stacks.get() + size_t(t) * kStack;
      ctx_[t].uc_stack.ss_size = kStack;
      ctx_[t].uc_link = nullptr;
      // makecontext passes ints: the object's address in two halves
      makecontext(&ctx_[t], reinterpret_cast<void (*)()>(&EmuBlock::Entry), 3, t, int(uint32_t(self)),
                  int(uint32_t(uint64_t(self) >> 32)));
    }
    cur_ = 0;
    swapcontext(&main_, &ctx_[0]);
  }

  int thread() const { return cur_; }
  int lane() const { return cur_ & 31; }

  // Publishes v for this lane; all[] gets every lane's value of its warp.
  void Exchange(uint32_t v, uint32_t (&all)[32]) {
    const int t = cur_;
    uint32_t* buf = &slots_[size_t(t / 32) * 64 + size_t(parity_[t]) * 32];
    parity_[t] ^= 1;
    buf[t & 31] = v;
    Yield();
    std::memcpy(all, buf, sizeof(all));
  }
  void Barrier() {
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      return;
    }
    while (gen_ == gen) Yield();
  }
  void Yield() {
    const int me = cur_;
    int next = me;
    do {
      next = (next + 1) % n_;
    } while (finished_[size_t(next)] && next != me);
    cur_ = next;
    if (next != me) swapcontext(&ctx_[size_t(me)], &ctx_[size_t(next)]);
  }

 private:
  static void Entry(int t, int lo, int hi) {
    EmuBlock* b = reinterpret_cast<EmuBlock*>(uintptr_t(uint32_t(lo)) | (uintptr_t(uint32_t(hi)) << 32));
    b->body_(t);
    b->finished_[size_t(t)] = true;
    if (++b->done_ == b->n_) setcontext(&b->main_);  // the last thread to finish
    int next = t;
    do {
      next = (next + 1) % b->n_;
    } while (b->finished_[size_t(next)]);
    b->cur_ = next;
    setcontext(&b->ctx_[size_t(next)]);
  }

  const int n_;
  const std::function<void(int)>& body_;
  ucontext_t main_;
  std::vector<ucontext_t> ctx_;
  std::vector<uint32_t> slots_;  // [warp][2][32]
  std::vector<int> parity_;
  std::vector<bool> finished_ = std::vector<bool>(size_t(n_), false);
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

// Runs body(thread) for the threads of one block (fibers on the calling thread).
inline void RunBlock(int threads, const std::function<void(int)>& body) {
  EmuBlock b(threads, body);
  CurrentBlock() = &b;
  b.Run();
  CurrentBlock() = nullptr;
}
inline void RunWarp(const std::function<void(int)>& body) { RunBlock(32, body); }

}  // namespace warp
}  // namespace cuda
}  // namespace kvq
