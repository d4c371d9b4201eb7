// The emulator's access checks (cuda_emu_runtime.cc): tiny kernels, compiled and launched as the
// project's are (kvq::cuda::LaunchKernel; the kvq_emu calls are those the kernels' CpAsync16 and
// LdMatrixX4 wrappers make), each breaking one rule the GPU faults on in one thread, must fail
// their launch with the GPU's error and name the thread; the same kernels by the rules must pass
// and move the right bytes, so a check that rejects everything fails here too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "device_common.cuh"

namespace {

constexpr int kLanes = 32;
constexpr int kOdd = 5;             // the one thread that breaks the rule
constexpr int kSmem = kLanes * 16;  // 16 bytes per thread

// cp.async by every thread: 16 bytes from src + 16 t to dynamic shared memory at 16 t, except thread
// kOdd's copy (odd_src, odd_dst, src-size n); after the wait, every thread's slot goes to out.
struct CpArgs {
  const uint8_t* src;
  uint8_t* out;
  const uint8_t* odd_src;
  ptrdiff_t odd_dst;
  int n;
};

__global__ void CpAsyncKernel(CpArgs a) {
  uint8_t* const smem = kvq_emu::DynamicShared();
  const int t = threadIdx.x;
  if (t == kOdd)
    kvq_emu::CpAsync(smem + a.odd_dst, a.odd_src, a.n);
  else
    kvq_emu::CpAsync(smem + 16 * t, a.src + 16 * t, 16);
  kvq_emu::CpAsyncCommit();
  kvq_emu::CpAsyncWait(0);
  std::memcpy(a.out + 16 * t, smem + 16 * t, 16);
}

// ldmatrix .x4 by one warp: thread t writes row t (matrix t / 8, row t % 8: element c is
// 64 (t / 8) + 8 (t % 8) + c) to dynamic shared memory, or to a static __shared__ array; lane kOdd
// then passes odd_row (its offset from the rows) as its row address; out gets every lane's r[4].
struct LdArgs {
  uint32_t* out;
  ptrdiff_t odd_row;
  bool trans;
  bool static_rows;
};

__global__ void LdMatrixKernel(LdArgs a) {
  __shared__ __align__(16) uint16_t static_rows[kLanes * 8];
  uint16_t* const rows = a.static_rows ? static_rows : reinterpret_cast<uint16_t*>(kvq_emu::DynamicShared());
  const int t = threadIdx.x;
  for (int c = 0; c < 8; ++c) rows[8 * t + c] = static_cast<uint16_t>(64 * (t / 8) + 8 * (t % 8) + c);
  __syncwarp();
  const uint8_t* const base = reinterpret_cast<const uint8_t*>(rows);
  uint32_t r[4];
  kvq_emu::LdMatrixX4(r, t == kOdd ? base + a.odd_row : base + 16 * t, a.trans);
  for (int j = 0; j < 4; ++j) a.out[4 * t + j] = r[j];
}

template <typename T>
struct DevBuf {
  T* p = nullptr;
  explicit DevBuf(size_t bytes) { EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess); }
  ~DevBuf() { cudaFree(p); }
};

class CudaEmu : public ::testing::Test {
 protected:
  // src: kSmem + 8 bytes (not a multiple of 16: a copy of its last 16 runs 8 past its end)
  void SetUp() override {
    std::vector<uint8_t> bytes(kSrcBytes);
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(7 * i + 1);
    ASSERT_EQ(cudaMemcpy(src_.p, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  // Every thread by the rules.
  CpArgs GoodCopy() const { return CpArgs{src_.p, out_.p, src_.p + 16 * kOdd, 16 * kOdd, 16}; }
  LdArgs Ld(ptrdiff_t odd_row, bool trans = false, bool static_rows = false) const {
    return LdArgs{frag_.p, odd_row, trans, static_rows};
  }
  // Launches one warp, expects e (and the same as the last error), and for a failure the report on
  // stderr naming thread kOdd and what.
  template <typename Args>
  void Launch(void (*kernel)(Args), const Args& a, cudaError_t e, const char* what, size_t smem = kSmem) {
    testing::internal::CaptureStderr();
    EXPECT_EQ(kvq::cuda::LaunchKernel(kernel, dim3(1), dim3(kLanes), int(smem), nullptr, a, false), e);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(cudaGetLastError(), e);
    if (e == cudaSuccess)
      EXPECT_EQ(err, "");
    else
      EXPECT_NE(err.find("block (0, 0, 0) thread " + std::to_string(kOdd) + ": " + what), std::string::npos) << err;
  }
  template <typename T>
  static std::vector<T> Read(const T* p, size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  std::vector<uint8_t> Out() const { return Read(out_.p, kSmem); }
  std::vector<uint8_t> Src() const { return Read(src_.p, kSmem); }

  static constexpr size_t kSrcBytes = kSmem + 8;
  DevBuf<uint8_t> src_{kSrcBytes}, out_{kSmem};
  DevBuf<uint32_t> frag_{4 * kLanes * sizeof(uint32_t)};
};

// The host plan's closed form of the step's writes (FirstStepWriteFrom) against the ranges the
// kernels test (RangeMeetsStepWrites): a range [begin, end) meets them exactly when end is past the
// first write from begin, for random states (sink growing, flushes of either tensor, full-precision
// tensors, new tokens) and every range inside them.
TEST(StepWrites, FirstWriteFromMatchesRangeMeets) {
  std::mt19937 rng(5);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int met = 0, clear = 0;
  for (int trial = 0; trial < 400; ++trial) {
    kvq::cuda::DevSeq s{};
    s.sink_cap = pick(0, 8);
    s.sink_len = pick(0, s.sink_cap);
    s.n_new = pick(0, 6);
    s.to_sink = std::min(s.n_new, s.sink_cap - s.sink_len);
    for (kvq::cuda::DevTensor* x : {&s.k, &s.v}) {
      x->mode = pick(0, 3) == 0 ? static_cast<int32_t>(kvq::QuantMode::kFull) : static_cast<int32_t>(kvq::QuantMode::kAsym);
      x->body_len = pick(0, 40);
      x->flush = pick(0, 3) == 0 ? pick(1, 12) : 0;
    }
    const int b0 = s.sink_len + s.to_sink;
    s.length = b0 + std::max(s.k.body_len + s.k.flush, s.v.body_len + s.v.flush) + pick(0, 20) + (s.n_new - s.to_sink);
    for (int begin = 0; begin <= s.length + 2; ++begin) {
      const int w = kvq::cuda::FirstStepWriteFrom(s, begin);
      for (int end = begin; end <= s.length + 40; ++end) {
        const bool meets = kvq::cuda::RangeMeetsStepWrites(s, begin, end);
        ASSERT_EQ(meets, end > w) << "trial " << trial << " [" << begin << ", " << end << ") first write " << w;
        (meets ? met : clear) += 1;
      }
    }
  }
  EXPECT_GT(met, 1000);
  EXPECT_GT(clear, 1000);
}

TEST_F(CudaEmu, CpAsyncLandsAfterWait) {
  Launch(CpAsyncKernel, GoodCopy(), cudaSuccess, "");
  EXPECT_EQ(Out(), Src());
}

TEST_F(CudaEmu, CpAsyncMisalignedSource) {
  CpArgs a = GoodCopy();
  a.odd_src += 4;
  Launch(CpAsyncKernel, a, cudaErrorMisalignedAddress, "cp.async source");
  // the next launch by the rules passes: the failure was this launch's
  Launch(CpAsyncKernel, GoodCopy(), cudaSuccess, "");
}

TEST_F(CudaEmu, CpAsyncMisalignedDestination) {
  CpArgs a = GoodCopy();
  a.odd_dst += 8;
  Launch(CpAsyncKernel, a, cudaErrorMisalignedAddress, "cp.async destination");
}

TEST_F(CudaEmu, CpAsyncSourcePastAllocationEnd) {
  CpArgs a = GoodCopy();
  a.odd_src = src_.p + kSmem;  // 8 bytes inside, 8 past the end
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async source");
  a.odd_src = src_.p + kSmem - 8;  // just inside: misaligned, not out of bounds
  Launch(CpAsyncKernel, a, cudaErrorMisalignedAddress, "cp.async source");
}

TEST_F(CudaEmu, CpAsyncSourceInNoAllocation) {
  alignas(16) static uint8_t host[16];
  CpArgs a = GoodCopy();
  a.odd_src = host;
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async source");
  // pinned host memory is not a device allocation either (see cuda_emu_runtime.cc)
  void* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 16), cudaSuccess);
  a.odd_src = static_cast<const uint8_t*>(pinned);
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async source");
  cudaFreeHost(pinned);
  // nor is a freed one
  uint8_t* freed = nullptr;
  ASSERT_EQ(cudaMalloc(&freed, 1024), cudaSuccess);
  ASSERT_EQ(cudaFree(freed), cudaSuccess);
  a.odd_src = freed;
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async source");
}

TEST_F(CudaEmu, CpAsyncDestinationOutsideDynamicShared) {
  CpArgs a = GoodCopy();
  a.odd_dst = kSmem;  // 8 more bytes of dynamic shared memory: 8 bytes inside, 8 past its end
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async destination", kSmem + 8);
  a.odd_dst = -16;  // in the guard band before it
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async destination");
  a.odd_dst = kSmem + 256;  // past the guard band after it
  Launch(CpAsyncKernel, a, cudaErrorIllegalAddress, "cp.async destination");
}

TEST_F(CudaEmu, CpAsyncZeroFillReadsNoSource) {
  CpArgs a = GoodCopy();
  a.odd_src = reinterpret_cast<const uint8_t*>(uintptr_t{3});  // neither aligned nor readable
  a.n = 0;
  Launch(CpAsyncKernel, a, cudaSuccess, "");
  std::vector<uint8_t> want = Src();
  std::fill(want.begin() + 16 * kOdd, want.begin() + 16 * (kOdd + 1), uint8_t{0});
  EXPECT_EQ(Out(), want);
}

// Threads kOdd - 1 and kOdd read the two halves of one 32-byte sector: to two 32-byte units of
// shared memory the launch fails (whichever of the two copies second is named), to one it passes.
TEST_F(CudaEmu, CpAsyncSectorSplitOverTwoUnits) {
  static_assert(kOdd % 2 == 1, "kOdd reads a sector's second half");
  CpArgs a = GoodCopy();
  a.odd_dst = 16 * kOdd + 32;  // its half one unit further than its neighbour's
  testing::internal::CaptureStderr();
  EXPECT_EQ(kvq::cuda::LaunchKernel(CpAsyncKernel, dim3(1), dim3(kLanes), kSmem, nullptr, a, false),
            cudaErrorLaunchFailure);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_NE(err.find("its 32-byte sector goes to two 32-byte units of shared memory"), std::string::npos) << err;
  a.odd_dst = 16 * (kOdd - 1);  // both halves into one unit (here onto one slot): no second fetch
  Launch(CpAsyncKernel, a, cudaSuccess, "");
}

// Lane l gets matrix j's M[l / 4][2 (l % 4) .. +1] (.trans: M[2 (l % 4) .. +1][l / 4]).
uint32_t Fragment(int lane, int j, bool trans) {
  auto m = [&](int row, int col) { return uint32_t(64 * j + 8 * row + col); };
  const int g = lane / 4, c = 2 * (lane % 4);
  return trans ? m(c, g) | (m(c + 1, g) << 16) : m(g, c) | (m(g, c + 1) << 16);
}

TEST_F(CudaEmu, LdMatrixFragments) {
  for (const bool static_rows : {false, true})
    for (const bool trans : {false, true}) {
      SCOPED_TRACE(testing::Message() << "static_rows " << static_rows << " trans " << trans);
      Launch(LdMatrixKernel, Ld(16 * kOdd, trans, static_rows), cudaSuccess, "");
      const std::vector<uint32_t> r = Read(frag_.p, 4 * kLanes);
      for (int l = 0; l < kLanes; ++l)
        for (int j = 0; j < 4; ++j) EXPECT_EQ(r[size_t(4 * l + j)], Fragment(l, j, trans)) << "lane " << l << ", " << j;
    }
}

TEST_F(CudaEmu, LdMatrixMisalignedRow) {
  Launch(LdMatrixKernel, Ld(16 * kOdd + 2), cudaErrorMisalignedAddress, "ldmatrix row address");
  // static __shared__ rows: alignment is checked there too
  Launch(LdMatrixKernel, Ld(16 * kOdd + 8, true, true), cudaErrorMisalignedAddress, "ldmatrix row address");
}

TEST_F(CudaEmu, LdMatrixRowPastDynamicSharedEnd) {
  // the rows fill kSmem; 8 more bytes: lane kOdd's row at kSmem has 8 bytes inside, 8 past the end
  Launch(LdMatrixKernel, Ld(kSmem), cudaErrorIllegalAddress, "ldmatrix row address", kSmem + 8);
  Launch(LdMatrixKernel, Ld(-16), cudaErrorIllegalAddress, "ldmatrix row address");  // in the guard band before
}

// Programmatic dependent launch as the emulator runs it (cuda_emu_runtime.cc, PdlWindow): the
// primary grid (2 blocks) sets x to 2; its dependent's blocks copy x to seen, block b first waiting
// for the primary when bit b of wait_mask is set. A dependent block that does not wait runs before
// the primary's writes; a byte that both grids write fails the dependent's launch.
struct PdlArgs {
  uint32_t* x;
  uint32_t* seen;
  uint32_t wait_mask;
  int clobber;  // the dependent's block 0 writes x[clobber] (-1: none)
};

__global__ void PdlPrimary(PdlArgs a) {
  kvq::cuda::GridDependentsLaunch();
  a.x[blockIdx.x * kLanes + threadIdx.x] = 2u;
}

__global__ void PdlDependent(PdlArgs a) {
  if ((a.wait_mask >> blockIdx.x) & 1u) kvq::cuda::GridDependencyWait();
  const int t = static_cast<int>(threadIdx.x);
  a.seen[blockIdx.x * 2 * kLanes + t] = a.x[t];
  a.seen[blockIdx.x * 2 * kLanes + kLanes + t] = a.x[kLanes + t];
  if (blockIdx.x == 0 && t == 0 && a.clobber >= 0) a.x[a.clobber] = 7u;
}

class CudaEmuPdl : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::vector<uint32_t> ones(2 * kLanes, 1u);
    ASSERT_EQ(cudaMemcpy(x_.p, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  }
  // The primary, then (pdl or not, a memset of an unrelated buffer between when `between`) the
  // dependent; returns the dependent's launch status and what each of its 2 blocks saw.
  cudaError_t Run(uint32_t wait_mask, bool pdl, bool between, int clobber, std::vector<uint32_t>* seen) {
    const PdlArgs a{x_.p, seen_.p, wait_mask, clobber};
    EXPECT_EQ(kvq::cuda::LaunchKernel(PdlPrimary, dim3(2), dim3(kLanes), 0, nullptr, a, false), cudaSuccess);
    if (between) {
      EXPECT_EQ(cudaMemsetAsync(other_.p, 0, 4, nullptr), cudaSuccess);
    }
    testing::internal::CaptureStderr();
    const cudaError_t e = kvq::cuda::LaunchKernel(PdlDependent, dim3(2), dim3(kLanes), 0, nullptr, a, pdl);
    err_ = testing::internal::GetCapturedStderr();
    (void)cudaGetLastError();
    seen->assign(4 * kLanes, 0u);
    EXPECT_EQ(cudaMemcpy(seen->data(), seen_.p, seen->size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return e;
  }
  std::vector<uint32_t> X() {
    std::vector<uint32_t> v(2 * kLanes);
    EXPECT_EQ(cudaMemcpy(v.data(), x_.p, v.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  static bool All(const std::vector<uint32_t>& v, size_t b, size_t e, uint32_t want) {
    return std::all_of(v.begin() + b, v.begin() + e, [&](uint32_t u) { return u == want; });
  }
  DevBuf<uint32_t> x_{2 * kLanes * 4}, seen_{4 * kLanes * 4}, other_{4};
  std::string err_;
};

TEST_F(CudaEmuPdl, BlocksThatDoNotWaitRunBeforeThePrimarysWrites) {
  std::vector<uint32_t> seen;
  ASSERT_EQ(Run(0b10u, true, false, -1, &seen), cudaSuccess) << err_;
  EXPECT_TRUE(All(seen, 0, 2 * kLanes, 1u)) << "block 0 did not wait: the bytes before the primary";
  EXPECT_TRUE(All(seen, 2 * kLanes, 4 * kLanes, 2u)) << "block 1 waited: the primary's bytes";
  EXPECT_TRUE(All(X(), 0, 2 * kLanes, 2u)) << "the primary's writes stay";
}

TEST_F(CudaEmuPdl, PlainLaunchOrAnOperationBetweenSerializes) {
  std::vector<uint32_t> seen;
  ASSERT_EQ(Run(0u, false, false, -1, &seen), cudaSuccess) << err_;
  EXPECT_TRUE(All(seen, 0, 4 * kLanes, 2u));
  SetUp();
  ASSERT_EQ(Run(0u, true, true, -1, &seen), cudaSuccess) << err_;
  EXPECT_TRUE(All(seen, 0, 4 * kLanes, 2u));
}

TEST_F(CudaEmuPdl, ByteWrittenByBothGridsFailsTheLaunch) {
  std::vector<uint32_t> seen;
  EXPECT_EQ(Run(0b10u, true, false, 3, &seen), cudaErrorLaunchFailure);
  EXPECT_NE(err_.find("written by both"), std::string::npos) << err_;
  // the same write after a wait is ordered: no race
  SetUp();
  EXPECT_EQ(Run(0b11u, true, false, 3, &seen), cudaSuccess) << err_;
  EXPECT_EQ(X()[3], 7u);
}

}  // namespace
