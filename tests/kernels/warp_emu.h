// An emulated CUDA warp for host tests of device code written against kvq::cuda::warp
// (kernels/cuda/warp_quant.cuh): the 32 lanes are fibers (ucontext) run in turn on the calling
// thread. A warp operation publishes the lane's value and yields to the next lane; when the turn
// comes back every lane has published and the lane reads what it needs. Values alternate between
// two buffers, so a lane's next write never meets a slower lane's read. As on the GPU with a full
// mask, every lane must reach the same warp operations in the same order.
// Include this before the device header; run a warp body with RunWarp.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace kvq {
namespace cuda {
namespace warp {

class EmuWarp {
 public:
  static constexpr size_t kStack = 256 * 1024;

  explicit EmuWarp(const std::function<void(int)>& body) : body_(body), stacks_(32 * kStack) {}

  void Run() {
    for (int lane = 0; lane < 32; ++lane) {
      getcontext(&ctx_[lane]);
      ctx_[lane].uc_stack.ss_sp = stacks_.data() + size_t(lane) * kStack;
      ctx_[lane].uc_stack.ss_size = kStack;
      ctx_[lane].uc_link = nullptr;
      // makecontext passes ints: the object's address in two halves
      const uintptr_t self = reinterpret_cast<uintptr_t>(this);
      makecontext(&ctx_[lane], reinterpret_cast<void (*)()>(&EmuWarp::Entry), 3, int(lane),
                  int(uint32_t(self)), int(uint32_t(uint64_t(self) >> 32)));
    }
    lane_ = 0;
    swapcontext(&main_, &ctx_[0]);
  }

  int lane() const { return lane_; }

  // Publishes v for this lane; all[] gets every lane's value.
  void Exchange(uint32_t v, uint32_t (&all)[32]) {
    uint32_t* buf = slots_[parity_[lane_]];
    parity_[lane_] ^= 1;
    buf[lane_] = v;
    Yield();
    std::memcpy(all, buf, sizeof(all));
  }
  void Yield() {
    const int me = lane_;
    lane_ = (me + 1) % 32;
    swapcontext(&ctx_[me], &ctx_[lane_]);
  }

 private:
  static void Entry(int lane, int lo, int hi) {
    EmuWarp* w = reinterpret_cast<EmuWarp*>(uintptr_t(uint32_t(lo)) | (uintptr_t(uint32_t(hi)) << 32));
    w->body_(lane);
    w->done_ += 1;
    if (w->done_ == 32) setcontext(&w->main_);  // the last lane to finish
    w->lane_ = (lane + 1) % 32;
    setcontext(&w->ctx_[w->lane_]);  // the next lane finishes its last operation
  }

  const std::function<void(int)>& body_;
  std::vector<uint8_t> stacks_;
  ucontext_t main_;
  ucontext_t ctx_[32];
  uint32_t slots_[2][32] = {};
  int parity_[32] = {};
  int lane_ = 0;
  int done_ = 0;
};

inline EmuWarp*& CurrentWarp() {
  static EmuWarp* w = nullptr;
  return w;
}

inline uint32_t EmuBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float EmuFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float ShflXor(float v, int off) {
  uint32_t all[32];
  const int lane = CurrentWarp()->lane();
  CurrentWarp()->Exchange(EmuBits(v), all);
  return EmuFloat(all[lane ^ off]);
}
inline float Shfl(float v, int src) {
  uint32_t all[32];
  CurrentWarp()->Exchange(EmuBits(v), all);
  return EmuFloat(all[src]);
}
inline uint32_t Ballot(bool p) {
  uint32_t all[32], m = 0;
  CurrentWarp()->Exchange(p ? 1u : 0u, all);
  for (int i = 0; i < 32; ++i) m |= all[i] << i;
  return m;
}
inline bool All(bool p) { return Ballot(p) == 0xffffffffu; }
inline uint32_t ReduceOr(uint32_t v) {
  uint32_t all[32], r = 0;
  CurrentWarp()->Exchange(v, all);
  for (int i = 0; i < 32; ++i) r |= all[i];
  return r;
}
inline void Sync() { CurrentWarp()->Yield(); }
inline void SetFlag(int32_t* flag, int32_t v) { *flag = v; }

// Runs body(lane) for the 32 lanes of one warp (fibers on the calling thread).
inline void RunWarp(const std::function<void(int)>& body) {
  EmuWarp w(body);
  CurrentWarp() = &w;
  w.Run();
  CurrentWarp() = nullptr;
}

}  // namespace warp
}  // namespace cuda
}  // namespace kvq
